"""Monodepth2's depth network: ResNet encoder + U-Net style disparity decoder (reference §3.2).

Decoder, for i = 4..0 with ``num_ch_dec = (16, 32, 64, 128, 256)``::

    x = f4
    x = ELU(conv3x3_reflect(x))                        # "upconv_{i}_0" -> num_ch_dec[i]
    x = nearest_upsample_x2(x)
    if i > 0: x = concat([x, f_{i-1}], channels)       # skip connection
    x = ELU(conv3x3_reflect(x))                        # "upconv_{i}_1" -> num_ch_dec[i]
    if i in scales: disp_i = sigmoid(conv3x3_reflect(x))   # "dispconv_{i}" -> 1 channel

All decoder convs have a bias and PyTorch's default Conv2d init (W, b ~ U(+-1/sqrt(fan_in))),
as Monodepth2 trains them from that init.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from xdistill_jax import platform_forms
from xdistill_jax.models.activations import elu
from xdistill_jax.models.conv import Conv
from xdistill_jax.models.resnet import ResNetEncoder, encoder_channels

DECODER_CHANNELS = (16, 32, 64, 128, 256)

# PyTorch's default Conv2d weight init, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int):
    """PyTorch's default Conv2d bias init: U(+-1/sqrt(fan_in)), fan_in = in_channels * kh * kw."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_default_conv(features: int, in_features: int, kernel: int, *, name: str, dtype, param_dtype,
                       padding: Any = "VALID", kernel_layout: str = "OHWI") -> Conv:
    """A `Conv` with bias and PyTorch's default init (needs `in_features` for the bias bound)."""
    return Conv(
        features, (kernel, kernel), padding=padding, use_bias=True, dtype=dtype, param_dtype=param_dtype,
        kernel_init=torch_default_kernel_init, kernel_layout=kernel_layout,
        bias_init=torch_default_bias_init(in_features * kernel * kernel), name=name,
    )


def _reflect_pad1_by_pad(x):
    return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")


def _columns_by_matmul(x, src):
    """x (B,H,W,C) -> (B,H,len(src),C), out[:, :, v] = x[:, :, src[v]] (src: static indices), as a
    product with the 0/1 matrix that has column v's one in row src[v]: exact, each output is one
    term times 1 plus zeros (16-bit products are exact; wider types at HIGHEST precision, at which
    a TPU splits a float32 into three bf16 pieces, exact against a 1: not run on a TPU here).
    Unlike a copy, it spreads a non-finite input along its row (0 x inf), where a non-finite
    activation has made the loss non-finite anyway."""
    select = jnp.asarray(np.arange(x.shape[2])[:, None] == np.asarray(src)[None, :], x.dtype)
    precision = jax.lax.Precision.HIGHEST if jnp.finfo(x.dtype).bits > 16 else None
    return jnp.einsum("bhwc,wv->bhvc", x, select, precision=precision, preferred_element_type=x.dtype)


def _reflect_pad1_columns_by_matmul(x):
    h, w = x.shape[1:3]
    rows = np.pad(np.arange(h), 1, mode="reflect")  # jnp.pad's own rule, a size of 1 included
    x = jnp.concatenate([x[:, rows[0]:rows[0] + 1], x, x[:, rows[-1]:rows[-1] + 1]], axis=1)
    return _columns_by_matmul(x, np.pad(np.arange(w), 1, mode="reflect"))


def reflect_pad1(x):
    """torch.nn.ReflectionPad2d(1) on an NHWC tensor (edge pixel not repeated).

    On a TPU the columns are gathered by a matrix product (`_columns_by_matmul`), the same values:
    the decoder's maps have 16-64 channels, the minor dimension of a TPU tile of 128 lanes, and a
    pad along the width, the tile's other dimension, was a shifted copy of each padded tile; by
    libtpu's own cost estimate the depth net's forward + backward (batch 3, 640x192, bf16) took
    25.0 -> 21.2 ms with it (benchmarks/RESULTS.md, "The depth decoder on a TPU")."""
    return platform_forms.choose(x, cpu=_reflect_pad1_by_pad, default=_reflect_pad1_by_pad,
                                 tpu=_reflect_pad1_columns_by_matmul)


def _elu_then_pad(x, copies: int):
    y = elu(x)
    return tuple(reflect_pad1(y) for _ in range(copies))


def _pad_then_elu(x, copies: int):
    return (elu(reflect_pad1(x)),) * copies


def elu_reflect_padded(x, copies: int):
    """`copies` arrays, each reflect_pad1(ELU(x)): the input of each convolution that reads the
    activation (ELU and padding commute: the pad only copies values).

    On the CPU each reader pads its own copy, as the decoder always did. Elsewhere one padded
    ELU is shared: its derivative is read from that padded output, so the backward pass reads
    what the convolutions read instead of keeping the convolution's output and computing the
    activation twice. With `elu`, on an H100 target (benchmarks/RESULTS.md): 20.61 -> 20.20 GB of
    memory traffic per bf16 train step and 2.39 -> 2.18 GB of XLA memory (fp32 without
    distillation 26.28 -> 26.20 GB and 3.47 -> 3.18 GB). The gradients are the same sums
    in another order (the readers' cotangents are added before the pad's transpose folds the
    border back, not after), so XLA:CPU, whose rounding the demo and test figures were
    measured with, keeps the separate copies.
    """
    return platform_forms.choose(x, cpu=functools.partial(_elu_then_pad, copies=copies),
                                 default=functools.partial(_pad_then_elu, copies=copies))


def _upsample_nearest2_by_broadcast(x):
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


def _upsample_nearest2_columns_by_matmul(x):
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None], (b, h, 2, w, c)).reshape(b, 2 * h, w, c)
    return _columns_by_matmul(x, np.arange(2 * w) // 2)


def upsample_nearest2(x):
    """F.interpolate(scale_factor=2, mode="nearest") on NHWC: out[i, j] = in[i // 2, j // 2].

    The rows are repeated by a broadcast; on a TPU the columns by a matrix product
    (`_columns_by_matmul`; the same values), elsewhere by the same broadcast. The broadcast's
    (2, C) minor dimensions took a TPU tile of 128 lanes per 16-32 channels, and its gradient a
    reduction over them: by libtpu's cost estimate the depth net's forward + backward (batch 3,
    640x192, bf16) took 35.1 -> 25.0 ms with the product (benchmarks/RESULTS.md)."""
    return platform_forms.choose(x, cpu=_upsample_nearest2_by_broadcast, default=_upsample_nearest2_by_broadcast,
                                 tpu=_upsample_nearest2_columns_by_matmul)


class DepthDecoder(nn.Module):
    """Features [f0..f4] -> {scale: disparity (B, H/2^s, W/2^s, 1) float32 in (0,1)}.

    Convs run in `dtype`; the sigmoid is taken in float32 so disparities are float32 in any mode.
    `num_ch_enc` must match the encoder (`encoder_channels(num_layers)`).
    """

    num_ch_enc: Sequence[int] = (64, 64, 128, 256, 512)
    scales: Sequence[int] = (0, 1, 2, 3)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_layout: str = "OHWI"

    def _conv(self, features, in_features, name):
        return torch_default_conv(features, in_features, 3, name=name, dtype=self.dtype,
                                  param_dtype=self.param_dtype, kernel_layout=self.kernel_layout)

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> dict[int, jax.Array]:
        if len(features) != 5:
            raise ValueError(f"DepthDecoder expects 5 encoder features f0..f4, got {len(features)}")
        for k, (f, c) in enumerate(zip(features, self.num_ch_enc)):
            if f.shape[-1] != c:
                raise ValueError(f"DepthDecoder: feature f{k} has {f.shape[-1]} channels, num_ch_enc says {c}")
        bad = [s for s in self.scales if s not in (0, 1, 2, 3)]
        if bad:
            raise ValueError(f"DepthDecoder scales must be within (0, 1, 2, 3), got {tuple(self.scales)}")

        outputs = {}
        xp = reflect_pad1(features[4].astype(self.dtype))
        for i in range(4, -1, -1):
            x = elu(self._conv(DECODER_CHANNELS[i], xp.shape[-1], f"upconv_{i}_0")(xp))
            x = upsample_nearest2(x)
            if i > 0:
                x = jnp.concatenate([x, features[i - 1].astype(self.dtype)], axis=-1)
            x = self._conv(DECODER_CHANNELS[i], x.shape[-1], f"upconv_{i}_1")(reflect_pad1(x))
            readers = (i in self.scales) + (i > 0)  # dispconv_i, upconv_{i-1}_0
            if readers == 0:
                continue
            padded = elu_reflect_padded(x, readers)
            if i in self.scales:
                logits = self._conv(1, x.shape[-1], f"dispconv_{i}")(padded[0])
                outputs[i] = jax.nn.sigmoid(logits.astype(jnp.float32))
            xp = padded[-1]
        return outputs


class DepthNet(nn.Module):
    """Monodepth2 depth network: images (B,H,W,3) in [0,1] -> {scale: disparity (B,H/2^s,W/2^s,1)}.

    H and W must be multiples of 32 (so the decoder's x2 upsampling meets the skip features).
    Variables: {"params": {"encoder", "decoder"}, "batch_stats": {"encoder"}}; with
    ``train=True`` apply with ``mutable=["batch_stats"]``. Disparities are float32 sigmoid
    outputs whatever `dtype` the network computes in.
    """

    num_layers: int = 18
    dtype: Any = jnp.float32
    scales: Sequence[int] = (0, 1, 2, 3)
    param_dtype: Any = jnp.float32
    kernel_layout: str = "OHWI"  # conv kernels' storage (models/conv.py); "HWIO" for old checkpoints

    @nn.compact
    def __call__(self, images, train: bool = False) -> dict[int, jax.Array]:
        h, w = images.shape[1:3]
        if h % 32 or w % 32:
            raise ValueError(f"DepthNet needs height and width divisible by 32, got {h}x{w}")
        features = ResNetEncoder(self.num_layers, 1, dtype=self.dtype, param_dtype=self.param_dtype,
                                 kernel_layout=self.kernel_layout, name="encoder")(images, train=train)
        return DepthDecoder(encoder_channels(self.num_layers), tuple(self.scales), dtype=self.dtype,
                            param_dtype=self.param_dtype, kernel_layout=self.kernel_layout,
                            name="decoder")(features)
