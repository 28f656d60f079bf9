"""X-Distill, ResNet-18, high resolution 1024x320, KITTI Eigen-Zhou.

Same optimisation as `kitti_resnet18_640x192.py`, and the same data to prepare first, at 1024x320
(`xdistill prepare --height 320 --width 1024` of the train and val splits: training refuses a
split prepared at another size). The teacher store must be precomputed for this split (its
logits are resized to the translator's resolution inside the loss).

  xdistill train --config configs/kitti_resnet18_1024x320.py --workdir runs/xd_r18_hr \
      --config.data.dataset_dir=DATA/kitti_tfds_1024x320 --config.data.teacher_dir=DATA/teacher_train \
      --config.model.init=weights/resnet18_imagenet.msgpack

Baseline: `--config.distill.weight=0`.
Expected time: not yet measured. Expected metrics: not yet measured.
"""

from xdistill_jax.config_defaults import base_config


def get_config():
    config = base_config()
    config.data.num_workers = -1  # a grain worker process per CPU core (less one; at most 16)
    # ImageNet encoders (Monodepth2's default, the paper's figures): train asks for the file's
    # path, --config.model.init=PATH.msgpack (`xdistill convert-weights --torchvision`), or scratch
    config.model.init = "imagenet"
    config.data.height = 320
    config.data.width = 1024
    return config
