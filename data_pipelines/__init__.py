"""Data pipelines: synthetic world, KITTI raw -> TFDS, Make3D, teacher logits."""
