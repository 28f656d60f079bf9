"""Monodepth2's separate pose network: 2-frame ResNet encoder + pose decoder (reference §3.3).

Decoder on the last encoder feature f4 (zero-padded convs with bias, PyTorch default init)::

    x = ReLU(conv1x1 "squeeze" C4 -> 256)
    x = ReLU(conv3x3 "pose_0" 256 -> 256, pad 1)
    x = ReLU(conv3x3 "pose_1" 256 -> 256, pad 1)
    x = conv1x1 "pose_2" 256 -> 6 * num_frames
    out = 0.01 * mean_{H,W}(x) viewed as (B, num_frames, 1, 6): axisangle = [..., :3], translation = [..., 3:]

Monodepth2 predicts two transforms per pair and uses only the first.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from xdistill_jax.models.activations import relu
from xdistill_jax.models.depth import torch_default_conv
from xdistill_jax.models.resnet import ResNetEncoder


class PoseDecoder(nn.Module):
    """f4 (B,h,w,C4) -> (axisangle, translation), each (B, num_frames, 1, 3) float32."""

    num_frames: int = 2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_layout: str = "OHWI"

    @nn.compact
    def __call__(self, f4) -> tuple[jax.Array, jax.Array]:
        conv = lambda n, cin, k, name: torch_default_conv(  # noqa: E731
            n, cin, k, name=name, dtype=self.dtype, param_dtype=self.param_dtype,
            padding=((k // 2, k // 2), (k // 2, k // 2)), kernel_layout=self.kernel_layout,
        )
        x = relu(conv(256, f4.shape[-1], 1, "squeeze")(f4.astype(self.dtype)))
        x = relu(conv(256, 256, 3, "pose_0")(x))
        x = relu(conv(256, 256, 3, "pose_1")(x))
        x = conv(6 * self.num_frames, 256, 1, "pose_2")(x)
        out = 0.01 * jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        out = out.reshape(-1, self.num_frames, 1, 6)
        return out[..., :3], out[..., 3:]


class PoseNet(nn.Module):
    """Pose network: pair (B,H,W,6) in [0,1], earlier frame in channels 0:3 -> (axisangle (B,3), translation (B,3)).

    Returns the first of the decoder's two transforms, as Monodepth2 uses it; turn it into a
    matrix with ``geometry.pose_from_axisangle(axisangle, translation, invert=(frame < 0))``.
    Variables: {"params": {"encoder", "decoder"}, "batch_stats": {"encoder"}}.

    `batch_groups` G > 1: the batch holds G batches of pairs interleaved example-major, each
    normalised with its own BatchNorm statistics, as G calls in a row (`TorchBatchNorm`).
    """

    num_layers: int = 18
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_layout: str = "OHWI"  # conv kernels' storage (models/conv.py); "HWIO" for old checkpoints
    batch_groups: int = 1

    @nn.compact
    def __call__(self, pair, train: bool = False) -> tuple[jax.Array, jax.Array]:
        features = ResNetEncoder(self.num_layers, 2, dtype=self.dtype, param_dtype=self.param_dtype,
                                 kernel_layout=self.kernel_layout, batch_groups=self.batch_groups,
                                 name="encoder")(pair, train=train)
        axisangle, translation = PoseDecoder(2, dtype=self.dtype, param_dtype=self.param_dtype,
                                             kernel_layout=self.kernel_layout, name="decoder")(features[-1])
        return axisangle[:, 0, 0], translation[:, 0, 0]

