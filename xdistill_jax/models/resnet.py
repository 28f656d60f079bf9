"""ResNet-18/34/50 feature encoders (Flax linen), numerically interchangeable with torchvision.

Monodepth2's depth and pose encoders are torchvision ResNets with the classifier removed
(reference §3.1, §3.3). To make ImageNet and Monodepth2 PyTorch weights convert exactly, every
layer copies torchvision's arithmetic rather than Flax's habits:

- explicit symmetric padding (conv1 7x7 s2 p3, 3x3 convs p1, 1x1 convs p0) instead of
  ``SAME``, which pads asymmetrically for stride 2 on even sizes;
- max-pool 3x3 s2 p1, padded with -inf (as torch does);
- stride on the first 3x3 conv of a BasicBlock and on the 3x3 conv of a Bottleneck
  (torchvision's "ResNet v1.5"), 1x1 stride-s projection + BN on the shortcut;
- no conv bias; BatchNorm with eps 1e-5, torch momentum 0.1 (running = 0.9 running + 0.1 batch)
  and torch's running-variance update with the *unbiased* batch variance (`TorchBatchNorm`).

Initialisation from scratch is torchvision's: kaiming-normal (fan_out, relu gain, untruncated)
for convs, BN scale 1 and bias 0.

Variable names mirror torchvision's so `xdistill_jax.convert` can map them one to one:
``conv1``, ``bn1``, ``layer{1..4}_{j}`` blocks holding ``conv1..3``, ``bn1..3``,
``downsample_conv``, ``downsample_bn``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from xdistill_jax import platform_forms
from xdistill_jax.models.activations import relu
from xdistill_jax.models.conv import Conv

ModuleDef = Any

# torchvision's `kaiming_normal_(mode="fan_out", nonlinearity="relu")`: untruncated normal with
# std sqrt(2 / (out_channels * kh * kw)). Flax's `kaiming_normal` would truncate.
torch_resnet_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Monodepth2's fixed input normalisation (one scalar mean/std for all channels, not ImageNet's).
INPUT_MEAN = 0.45
INPUT_STD = 0.225
BN_MOMENTUM = 0.9  # weight of the old running value in every BatchNorm here: torch momentum 0.1


@dataclasses.dataclass(frozen=True)
class GroupedBatch:
    """Moments' `axes` for a batch of `groups` batches interleaved example-major (row r is of
    group r % groups, `TorchBatchNorm.batch_groups`): statistics per group and channel, (G, C),
    summed per example first, then per group (each reduction one XLA reduces in a single
    kernel; one over the group axis in the middle of (B, G, H, W, C) is not), and `rows` gives
    each row its group's statistic, (N, 1, 1, C), to broadcast against the activations
    (`_expand`). Its gradient still moves more than a plain BatchNorm's on a GPU: one bf16
    pose-encoder layer (24x24x80x128) 272 MB against 107 MB (benchmarks/RESULTS.md)."""

    groups: int

    def mean(self, v):
        rows, channels = v.shape[0], v.shape[-1]
        per_example = jnp.sum(v, axis=tuple(range(1, v.ndim - 1)))  # (N, C)
        per_group = jnp.sum(per_example.reshape(rows // self.groups, self.groups, channels), axis=0)
        return per_group / ((rows // self.groups) * math.prod(v.shape[1:-1]))

    def rows(self, stat, x):
        per_row = jnp.tile(stat, (x.shape[0] // self.groups, 1))  # row r: group r % groups
        return per_row.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (stat.shape[-1],))


def _mean(v, axes):
    return axes.mean(v) if isinstance(axes, GroupedBatch) else jnp.mean(v, axis=axes)


def _expand(stat, axes, x):
    """A statistic as it broadcasts against `x`: per row for `GroupedBatch`, else as it is."""
    return axes.rows(stat, x) if isinstance(axes, GroupedBatch) else stat


def _moments_two_pass(x, shift, axes):
    del shift
    mean = _mean(x, axes)
    return mean, _mean(jnp.square(x - _expand(mean, axes, x)), axes)


def _moments_shifted(x, shift, axes):
    # E[(x-K)^2] - E[x-K]^2: one pass over the activation (both sums fuse into one reduction)
    xs = x - shift
    m = _mean(xs, axes)
    return m + shift, jnp.maximum(_mean(jnp.square(xs), axes) - jnp.square(m), 0.0)


def _normalise(x, mean, var, scale, bias, epsilon: float):
    mul = jax.lax.rsqrt(var + epsilon) * scale.astype(jnp.float32)
    return (x - mean) * mul + bias.astype(jnp.float32)


def _batch_norm_train(x, shift, scale, bias, *, axes, epsilon: float, moments):
    mean, var = moments(x, shift, axes)
    return _normalise(x, _expand(mean, axes, x), _expand(var, axes, x), scale, bias, epsilon), mean, var


def _batch_norm(x, shift, scale, bias, *, axes, epsilon: float):
    """(normalised x, batch mean, biased batch variance) over `axes`: the moments two-pass on
    the CPU and shifted one-pass elsewhere (`TorchBatchNorm`'s docstring). `shift` is a
    per-channel constant near the mean. The whole normalisation is in each branch: with only the
    moments there, XLA:CPU fused the step differently and rounded it differently. `axes`: a
    tuple, or `GroupedBatch` for statistics per group ((G, C) moments)."""
    branch = functools.partial(_batch_norm_train, axes=axes, epsilon=epsilon)
    return platform_forms.choose(x, shift, scale, bias,
                                 cpu=functools.partial(branch, moments=_moments_two_pass),
                                 default=functools.partial(branch, moments=_moments_shifted))


class TorchBatchNorm(nn.Module):
    """BatchNorm over the N, H, W axes of an NHWC tensor with torch.nn.BatchNorm2d's semantics.

    Flax's `nn.BatchNorm` updates the running variance with the biased batch variance; torch
    uses the unbiased one (x n/(n-1)). Normalisation itself uses the biased variance in both.
    Variables are named like Flax's (params ``scale``/``bias``, batch_stats ``mean``/``var``).
    Variance (`_batch_norm`): on the CPU two-pass, mean((x - mean)^2) (as torch). On GPU/TPU
    one pass shifted by the running mean K: E[(x-K)^2] - E[x-K]^2, the same mathematics with the
    same gradient, reading each activation once instead of twice (1.12 GB less memory traffic and
    147 fewer kernels per train step on an H100 target, benchmarks/RESULTS.md). Its rounding
    error grows with (mean - K)^2 / var, so it is as good as two-pass once the running mean has
    followed the batches (or is loaded with pretrained weights) and like the unshifted form for
    the first steps from scratch (K = 0). `use_fast_variance=True` (Flax's default) takes
    E[x^2]-E[x]^2 everywhere, which cancels catastrophically in float32 where the activations'
    mean is much larger than their spread: measured on the 32x96 test nets, it made gradients on
    1 and 4 devices differ by up to 6e-6 (22% of some pose-encoder gradients; 376 sign flips)
    against 2e-8 (0.3%; 31 flips) two-pass, and Adam turned that into ~lr weight drift.
    Statistics and the affine transform are computed in float32; the result is cast to `dtype`.

    Under `jit` with the batch sharded over devices, the means are over the global batch.

    `batch_groups` G > 1: the batch holds G batches interleaved example-major (row b * G + g is
    example b of batch g), normalised each with its own statistics, and the running statistics
    are updated G times in batch order: what G calls in a row do, in one call. Monodepth2's pose
    encoder runs once per source pair; its two pairs go through one call this way
    (`objective.predict_poses`), so that a batch sharded over devices stays sharded.

    A "bn_shift" variable collection holding `mean` (the batch_stats tree, passed with the
    variables) gives the one-pass variance its shift instead of the running mean: for a call
    that runs from zero running statistics to get the update terms alone.
    """

    use_running_average: bool = False
    momentum: float = BN_MOMENTUM
    epsilon: float = 1e-5
    use_fast_variance: bool = False
    batch_groups: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (features,), self.param_dtype)

        xf = x.astype(jnp.float32)
        if self.use_running_average:
            return _normalise(xf, ra_mean.value, ra_var.value, scale, bias, self.epsilon).astype(self.dtype)
        groups = self.batch_groups
        if groups < 1 or x.shape[0] % groups:
            raise ValueError(f"TorchBatchNorm: batch_groups={groups} must divide the batch, got shape {x.shape}")
        axes = tuple(range(x.ndim - 1)) if groups == 1 else GroupedBatch(groups)
        if self.use_fast_variance:
            y, mean, var = _batch_norm_train(xf, jnp.zeros((features,), jnp.float32), scale, bias, axes=axes,
                                             epsilon=self.epsilon, moments=_moments_shifted)
        else:
            # The one-pass variance's shift (GPU/TPU form): the running mean, or the "bn_shift"
            # collection's mean where the caller runs from other running statistics (the pose
            # net's one-device vmap starts each pair from zeros: `objective.predict_poses`).
            shift = (self.get_variable("bn_shift", "mean") if self.has_variable("bn_shift", "mean")
                     else ra_mean.value)
            y, mean, var = _batch_norm(xf, jax.lax.stop_gradient(shift), scale, bias, axes=axes,
                                       epsilon=self.epsilon)
        if not self.is_initializing():
            n = x.size // (groups * features)
            per_group = [(mean, var)] if groups == 1 else [(mean[g], var[g]) for g in range(groups)]
            for mean_g, var_g in per_group:  # as `groups` calls in a row
                unbiased = var_g * (n / max(n - 1, 1))
                ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean_g
                ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * unbiased
        return y.astype(self.dtype)


def _pad(p: int):
    return ((p, p), (p, p))


def _pool_with_argmax(x):
    """torch's max_pool2d(x, 3, stride=2, padding=1) on NHWC x: (max (B,Ho,Wo,C), which of the 9
    window taps (row-major) holds it, int8). Like torch's loop, a tap replaces the running maximum
    only if strictly greater (the first maximum wins ties) or NaN (NaN propagates); the padding
    is -inf. The maximum is the selected tap itself, so value and index can never disagree."""
    b, h, w, c = x.shape
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)

    def tap(k):
        dy, dx = divmod(k, 3)
        return jax.lax.slice(xp, (0, dy, dx, 0), (b, dy + 2 * ho - 1, dx + 2 * wo - 1, c), (1, 2, 2, 1))

    best = tap(0)
    index = jnp.zeros(best.shape, jnp.int8)
    for k in range(1, 9):
        t = tap(k)
        better = (t > best) | jnp.isnan(t)
        best = jnp.where(better, t, best)
        index = jnp.where(better, jnp.int8(k), index)
    return best, index


@jax.custom_vjp
def max_pool_3x3_s2(x):
    """torch's max_pool2d(x, 3, stride=2, padding=1) on NHWC x, the ResNet stem's pool.

    Value: `nn.max_pool`'s (XLA reduce_window). Gradient: each window's cotangent goes to the
    tap that held its maximum (the first one on ties, as torch and XLA's select-and-scatter
    choose), summed where windows overlap. The tap index is found in the forward pass, with the
    maximum, and is all the backward pass keeps: nine masked, strided pads of the cotangent that
    XLA fuses into loop kernels, instead of `nn.max_pool`'s select-and-scatter (a scatter:
    atomics on a GPU, and ~8 % of the train step's op time on XLA:CPU; benchmarks/RESULTS.md).
    (Re-finding the maximum in the backward pass by comparing with the stored output is not
    safe: XLA may recompute the input there with other rounding, and the gradient goes astray.)
    tests/test_models.py checks value and gradient against `nn.max_pool`'s, ties included, alone
    and inside the jitted encoder's gradient.
    """
    return _pool_with_argmax(x)[0]


def _max_pool_fwd(x):
    y, index = _pool_with_argmax(x)
    return y, (index, x.shape)


def _max_pool_bwd(residuals, g):
    index, (_, h, w, _) = residuals
    ho, wo = index.shape[1:3]
    zero = jnp.zeros((), g.dtype)
    grad = None
    # Overlapping windows add in the windows' raster order (that of XLA's scatter): a tap in the
    # last row / column of a window belongs to the window before the one it is first in.
    for k in reversed(range(9)):
        dy, dx = divmod(k, 3)
        part = jax.lax.pad(jnp.where(index == k, g, zero), zero,
                           ((0, 0, 0), (dy, h + 2 - dy - (2 * ho - 1), 1), (dx, w + 2 - dx - (2 * wo - 1), 1), (0, 0, 0)))
        grad = part if grad is None else grad + part
    return (grad[:, 1:-1, 1:-1],)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


def _relu_then_pool(x):
    y = relu(x)
    return y, max_pool_3x3_s2(y)


def _pool_then_relu(x):
    return relu(x), relu(max_pool_3x3_s2(x))


def stem_relu_and_pool(x):
    """(ReLU(x), max_pool_3x3_s2(ReLU(x))): the stem's feature f0 and the pooled input of layer1.

    The maximum commutes with the ReLU (both are monotone), and so does the gradient: a window
    whose maximum is <= 0 passes none either way, and otherwise the same tap holds both maxima.
    On the CPU the pool reads the ReLU's output, as it always did. Elsewhere the ReLU is applied
    after the pool, to the pooled quarter of the activation: where f0 is not used (the pose
    net), the backward's ReLU mask is a quarter of the size (on an H100 target 0.17 GB less
    memory traffic per bf16 train step, 0.62 GB fp32; benchmarks/RESULTS.md). XLA:CPU fuses the
    BatchNorm before it differently in the two forms and rounds the step differently, so the CPU
    keeps its form.
    """
    return platform_forms.choose(x, cpu=_relu_then_pool, default=_pool_then_relu)


class BasicBlock(nn.Module):
    """torchvision BasicBlock: 3x3(stride) -> BN -> ReLU -> 3x3 -> BN, + shortcut, ReLU."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    expansion = 1

    @nn.compact
    def __call__(self, x):
        s = (self.strides, self.strides)
        y = self.conv(self.filters, (3, 3), s, padding=_pad(1), name="conv1")(x)
        y = relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), padding=_pad(1), name="conv2")(y)
        y = self.norm(name="bn2")(y)
        residual = x
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), s, padding=_pad(0), name="downsample_conv")(x)
            residual = self.norm(name="downsample_bn")(residual)
        return relu(residual + y)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (v1.5): 1x1 -> 3x3(stride) -> 1x1 (x4 channels), + shortcut, ReLU."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    expansion = 4

    @nn.compact
    def __call__(self, x):
        s = (self.strides, self.strides)
        y = self.conv(self.filters, (1, 1), padding=_pad(0), name="conv1")(x)
        y = relu(self.norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), s, padding=_pad(1), name="conv2")(y)
        y = relu(self.norm(name="bn2")(y))
        y = self.conv(self.filters * 4, (1, 1), padding=_pad(0), name="conv3")(y)
        y = self.norm(name="bn3")(y)
        residual = x
        if residual.shape != y.shape:
            residual = self.conv(self.filters * 4, (1, 1), s, padding=_pad(0), name="downsample_conv")(x)
            residual = self.norm(name="downsample_bn")(residual)
        return relu(residual + y)


# num_layers -> (blocks per stage, block class), as torchvision's resnet18/34/50.
LAYOUTS: dict[int, tuple[tuple[int, ...], type[nn.Module]]] = {
    18: ((2, 2, 2, 2), BasicBlock),
    34: ((3, 4, 6, 3), BasicBlock),
    50: ((3, 4, 6, 3), Bottleneck),
}


def encoder_channels(num_layers: int) -> tuple[int, ...]:
    """Channels of the five features f0..f4 (Monodepth2's `num_ch_enc`)."""
    if num_layers not in LAYOUTS:
        raise ValueError(f"num_layers={num_layers}: supported ResNet depths are {sorted(LAYOUTS)}")
    expansion = LAYOUTS[num_layers][1].expansion
    return (64, 64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion)


class ResNetEncoder(nn.Module):
    """ResNet feature encoder: images (B,H,W,3n) in [0,1] -> [f0, f1, f2, f3, f4].

    f0 (B,H/2,W/2,64) after conv1/bn1/relu; f1 (B,H/4,W/4,C1) after maxpool + layer1;
    f2..f4 after layer2..4 at H/8, H/16, H/32 (sizes rounded as torch rounds), channels
    `encoder_channels(num_layers)`. Features are in `dtype`; params in `param_dtype`.

    `num_input_images` stacks frames on the channel axis (the pose encoder takes 2).
    BatchNorm uses batch statistics and updates "batch_stats" when `train` is true
    (apply with ``mutable=["batch_stats"]``), running statistics otherwise.
    """

    num_layers: int = 18
    num_input_images: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    norm: ModuleDef = TorchBatchNorm
    kernel_layout: str = "OHWI"  # models/conv.py: OHWI, or HWIO (flax's; the teacher's, old checkpoints)
    batch_groups: int = 1  # > 1: BatchNorm statistics per interleaved group (TorchBatchNorm's)

    @nn.compact
    def __call__(self, images, train: bool = False) -> list[jax.Array]:
        if self.num_layers not in LAYOUTS:
            raise ValueError(f"num_layers={self.num_layers}: supported ResNet depths are {sorted(LAYOUTS)}")
        expected_c = 3 * self.num_input_images
        if images.ndim != 4 or images.shape[-1] != expected_c:
            raise ValueError(
                f"ResNetEncoder(num_input_images={self.num_input_images}) expects images of shape "
                f"(B,H,W,{expected_c}), got {images.shape}"
            )
        stage_sizes, block_cls = LAYOUTS[self.num_layers]
        conv = functools.partial(
            Conv, kernel_layout=self.kernel_layout, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=torch_resnet_conv_init,
        )
        norm = functools.partial(
            self.norm, use_running_average=not train, momentum=BN_MOMENTUM, epsilon=1e-5,
            dtype=self.dtype, param_dtype=self.param_dtype,
            **({"batch_groups": self.batch_groups} if self.batch_groups != 1 else {}),
        )

        x = (images.astype(jnp.float32) - INPUT_MEAN) / INPUT_STD
        x = x.astype(self.dtype)
        x = conv(64, (7, 7), (2, 2), padding=_pad(3), name="conv1")(x)
        f0, x = stem_relu_and_pool(norm(name="bn1")(x))
        features = [f0]
        for i, num_blocks in enumerate(stage_sizes):
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = block_cls(64 * 2**i, conv=conv, norm=norm, strides=strides, name=f"layer{i + 1}_{j}")(x)
            features.append(x)
        return features


ResNet18Encoder = functools.partial(ResNetEncoder, num_layers=18)
ResNet34Encoder = functools.partial(ResNetEncoder, num_layers=34)
ResNet50Encoder = functools.partial(ResNetEncoder, num_layers=50)
