"""xdistill_jax: X-Distill self-supervised monocular depth in JAX/Flax.

Core modules (models, geometry, losses, objective, train step) import with only jax, flax,
optax, numpy and ml_collections installed; TFDS, grain and PIL are imported where data is read.
"""

__version__ = "0.1.0"
