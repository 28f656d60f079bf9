"""Semantic segmentation network used as our own distillation teacher (Flax linen).

A DeepLabv3+-style model, deliberately plain: the project's `ResNetEncoder` (torchvision-exact,
so ImageNet weights convert with `xdistill_jax.convert.load_torchvision_resnet`), an ASPP on the
stride-32 features, and a decoder that fuses the stride-4 features::

    images (B,H,W,3) in [0,1] -> ResNetEncoder -> f1 (H/4), f4 (H/32)
    ASPP(f4): 1x1 conv | 3x3 conv dilation r for r in aspp_rates | global-pool 1x1 conv,
              each head_features ch + BN + ReLU, concatenated -> 1x1 conv head_features
    upsample bilinearly to f1's size, concat 1x1 conv(f1) -> 48 ch (12 in the tiny variant)
    2 x [3x3 conv head_features + BN + ReLU] -> 1x1 conv num_classes
    logits float32 at stride 4 (B,H/4,W/4,C), or at (H,W) with output_stride=1 (bilinear)

Variants: `segmentation_resnet50` (ResNet-50, head 256, rates (1,2,3) -- the stride-32 map of a
640x192 image is 20x6, so DeepLab's (6,12,18) would sample padding only) is the real teacher;
`segmentation_resnet18_tiny` (ResNet-18, head 32) is for tests and the CPU demo.
BatchNorm everywhere uses the encoder's `TorchBatchNorm` ("batch_stats" collection).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from xdistill_jax.models.activations import relu
from xdistill_jax.models.resnet import ResNetEncoder, TorchBatchNorm


class ConvBNReLU(nn.Module):
    features: int
    kernel: int = 3
    dilation: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        pad = self.dilation * (self.kernel // 2)
        x = nn.Conv(self.features, (self.kernel, self.kernel), padding=pad,
                    kernel_dilation=self.dilation, use_bias=False, dtype=self.dtype)(x)
        x = TorchBatchNorm(use_running_average=not train, dtype=self.dtype)(x)
        return relu(x)


def _resize(x, height: int, width: int):
    return jax.image.resize(x, (x.shape[0], height, width, x.shape[-1]), "linear", antialias=False)


class SegmentationNet(nn.Module):
    """images (B,H,W,3) in [0,1] -> class logits float32 (B,H/s,W/s,num_classes), s=output_stride.

    ``apply(variables, images, train=False)``; with ``train=True`` pass ``mutable=["batch_stats"]``.
    """

    num_layers: int = 50
    num_classes: int = 19
    head_features: int = 256
    skip_features: int = 48
    aspp_rates: Sequence[int] = (1, 2, 3)
    output_stride: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        if self.output_stride not in (1, 4):
            raise ValueError(f"segmentation output_stride must be 1 or 4, got {self.output_stride}")
        feats = ResNetEncoder(num_layers=self.num_layers, dtype=self.dtype, kernel_layout="HWIO",
                              name="encoder")(images, train=train)
        f1, f4 = feats[1], feats[4]
        block = functools.partial(ConvBNReLU, self.head_features, dtype=self.dtype)
        branches = [block(kernel=1, name="aspp_1x1")(f4, train)]
        for r in self.aspp_rates:
            branches.append(block(kernel=3, dilation=r, name=f"aspp_r{r}")(f4, train))
        pooled = jnp.mean(f4.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
        pooled = block(kernel=1, name="aspp_pool")(pooled, train)
        branches.append(jnp.broadcast_to(pooled, branches[0].shape))
        x = block(kernel=1, name="aspp_project")(jnp.concatenate(branches, axis=-1), train)

        x = _resize(x, f1.shape[1], f1.shape[2])
        skip = ConvBNReLU(self.skip_features, kernel=1, dtype=self.dtype, name="skip")(f1, train)
        x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
        x = block(name="decoder_0")(x, train)
        x = block(name="decoder_1")(x, train)
        logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="classifier")(x)
        logits = logits.astype(jnp.float32)
        if self.output_stride == 1:
            logits = _resize(logits, images.shape[1], images.shape[2])
        return logits


segmentation_resnet50 = functools.partial(SegmentationNet, num_layers=50, head_features=256)
segmentation_resnet18_tiny = functools.partial(SegmentationNet, num_layers=18, head_features=32,
                                               skip_features=12)

VARIANTS = {"resnet50": segmentation_resnet50, "resnet18_tiny": segmentation_resnet18_tiny}


def make_segmentation_net(variant: str, **kwargs) -> SegmentationNet:
    """`SegmentationNet` by variant name ("resnet50" | "resnet18_tiny")."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown segmentation variant {variant!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[variant](**kwargs)
