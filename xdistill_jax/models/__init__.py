"""Flax networks: ResNet encoders, depth decoder, pose network, translator, segmentation teacher."""
