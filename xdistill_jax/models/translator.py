"""Depth -> segmentation translator: a small conv net from predicted disparity to group logits.

X-Distill supervises the depth network with a segmentation teacher *through* this translator;
it exists only at training time (predict and eval load the depth net alone). The paper does not
give its size, so we choose a deliberately small network: it must not be able to segment
on its own, so the semantic signal has to be carried by the disparity map.

Architecture (defaults: ``features=32``, ``dilations=(1, 2, 4)``, ``output_stride=4``,
``multi_scale=False``, ``num_groups=7``)::

    input   disparity at scale input_scale (default 0), (B,H,W,1)
                                                  [multi_scale: scales 0..3 bilinearly
                                                   upsampled to (H,W) and concatenated, 4 ch]
    k = log2(output_stride) x [conv3x3 stride 2, features, ReLU]     (2 by default; none at 1)
    for d in dilations: conv3x3 dilation d, features, ReLU  (receptive field 15 px at stride 1,
                                                             63 input px at stride 4)
    conv1x1 -> num_groups logits, float32, (B,H/output_stride,W/output_stride,G)

Parameter count (3x3 conv = 9*cin*cout + cout), output_stride=1: first conv 9*1*32+32 = 320,
  two dilated 2*(9*32*32+32) = 18,496, head 32*7+7 = 231 -> 19,047; ``multi_scale=True`` ->
  19,911; each stride-2 level adds 9,248: the default output_stride=4 -> **37,543**. Pinned in
  tests/test_translator.py.

Why stride 4 by default (full resolution until 2026-12-03): the teacher's logits are stored at
stride 4, so a full-resolution translator only learns nearest-upsampled targets; in the demo's
ablations (README "Demo results") the stride-4 translator left the depth net better than the
full-resolution one in every run (6 of 6: two seeds on each of three VMs), and it adds about 3 %
to the train step's memory traffic instead of 22 % (benchmarks/RESULTS.md, deviceless H100
census).

Gradient: the translator takes the disparity exactly as DepthNet returns it, so the distillation
gradient reaches the depth network. The ablation that stops it is `translate(...,
stop_depth_grad=True)`, which applies `jax.lax.stop_gradient` to the disparities before the
translator (the translator itself still trains).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from xdistill_jax.models.activations import relu
from xdistill_jax.models.conv import Conv


def _stack_inputs(disps, multi_scale: bool, input_scale: int = 0):
    """(B,h,w,1) float32 (scale `input_scale`) or (B,H,W,4) (scales 0..3 upsampled to scale 0)."""
    if not isinstance(disps, Mapping):
        if multi_scale:
            raise ValueError("multi_scale translator needs the dict {scale: disparity} of all "
                             "4 scales, got a single array")
        return jnp.asarray(disps, jnp.float32)
    if not multi_scale:
        if input_scale not in disps:
            raise ValueError(f"translator input_scale {input_scale} not among the disparity "
                             f"scales {sorted(disps)}")
        return jnp.asarray(disps[input_scale], jnp.float32)
    if 0 not in disps:
        raise ValueError(f"disparities dict must contain scale 0, has scales {sorted(disps)}")
    d0 = jnp.asarray(disps[0], jnp.float32)
    b, h, w, _ = d0.shape
    ups = []
    for s in (0, 1, 2, 3):
        if s not in disps:
            raise ValueError(f"multi_scale translator needs disparity scales 0..3, missing {s}")
        d = jnp.asarray(disps[s], jnp.float32)
        ups.append(d if d.shape[1:3] == (h, w) else
                   jax.image.resize(d, (b, h, w, d.shape[-1]), "linear", antialias=False))
    return jnp.concatenate(ups, axis=-1)


class Translator(nn.Module):
    """Disparity -> G group logits. See the module docstring for the architecture.

    ``__call__(disps)``: disps is DepthNet's ``{scale: (B,H/2^s,W/2^s,1)}`` dict or a scale-0
    array (B,H,W,1) in [0,1]; returns float32 logits (B,H/output_stride,W/output_stride,G).
    """

    num_groups: int = 7
    features: int = 32
    dilations: Sequence[int] = (1, 2, 4)
    output_stride: int = 4
    multi_scale: bool = False
    input_scale: int = 0  # which DepthNet scale feeds it when not multi_scale (distill.scale)
    dtype: Any = jnp.float32
    kernel_layout: str = "OHWI"  # conv kernels' storage (models/conv.py); "HWIO" for old checkpoints

    @nn.compact
    def __call__(self, disps):
        if self.output_stride < 1 or 2 ** round(math.log2(self.output_stride)) != self.output_stride:
            raise ValueError(f"translator output_stride must be a power of 2, got {self.output_stride}")
        x = _stack_inputs(disps, self.multi_scale, self.input_scale).astype(self.dtype)
        conv = lambda f, k, **kw: Conv(f, (k, k), dtype=self.dtype, param_dtype=jnp.float32,  # noqa: E731
                                        kernel_layout=self.kernel_layout, **kw)
        for i in range(round(math.log2(self.output_stride))):
            x = relu(conv(self.features, 3, strides=2, padding=1, name=f"down{i}")(x))
        for i, d in enumerate(self.dilations):
            x = relu(conv(self.features, 3, padding=d, kernel_dilation=d, name=f"conv{i}")(x))
        logits = conv(self.num_groups, 1, name="head")(x)
        return logits.astype(jnp.float32)


def translate(params, disps, stop_depth_grad: bool = False, *, module: Translator | None = None):
    """Applies the translator as the training objective should.

    Args:
      params: the translator's params (the ``"params"`` collection, or ``{"params": ...}``).
      disps: DepthNet output ``{scale: (B,h,w,1)}`` (or the scale-0 array).
      stop_depth_grad: ablation switch; True blocks the distillation gradient from reaching the
        depth network (``stop_gradient`` on the disparities); the translator still learns.
      module: the configured `Translator` (default ``Translator()``).
    Returns: float32 group logits (B,h/output_stride,w/output_stride,G).
    """
    module = module or Translator()
    if stop_depth_grad:
        disps = jax.tree_util.tree_map(jax.lax.stop_gradient, disps)
    variables = params if "params" in params else {"params": params}
    return module.apply(variables, disps)
