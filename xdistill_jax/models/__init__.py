"""Flax networks: ResNet encoders, depth decoder, pose network, translator, segmentation teacher."""

from xdistill_jax.models.depth import DepthDecoder, DepthNet
from xdistill_jax.models.pose import PoseDecoder, PoseNet
from xdistill_jax.models.resnet import ResNetEncoder

__all__ = ["DepthDecoder", "DepthNet", "PoseDecoder", "PoseNet", "ResNetEncoder"]
