"""X-Distill with a ResNet-50 depth encoder (pose encoder ResNet-18), 640x192, KITTI Eigen-Zhou.

Same optimisation as `kitti_resnet18_640x192.py` (Adam 1e-4, batch 12, 20 epochs, x0.1 after 14),
and the same data to prepare first (train and val splits, the train split's teacher store).

  xdistill train --config configs/kitti_resnet50_640x192.py --workdir runs/xd_r50 \
      --config.data.dataset_dir=DATA/kitti_tfds --config.data.teacher_dir=DATA/teacher_train \
      --config.model.init=weights/resnet50_imagenet.msgpack

Baseline: `--config.distill.weight=0`.
Expected time: not yet measured. Expected metrics: not yet measured.
"""

from xdistill_jax.config_defaults import base_config


def get_config():
    config = base_config()
    config.data.num_workers = -1  # a grain worker process per CPU core (less one; at most 16)
    config.model.num_layers = 50
    return config
