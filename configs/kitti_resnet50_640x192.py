"""X-Distill with ResNet-50 depth and pose encoders, 640x192, KITTI Eigen-Zhou.

Monodepth2's `--num_layers 50` makes both encoders ResNet-50, each from the ImageNet weights (the
pose encoder's first convolution takes them for its two images, halved): so does this config,
from the one `model.init` file. Until 2026-12-07 it kept a ResNet-18 pose encoder, which the
ResNet-50 file could not initialise: it trained from scratch, unlike Monodepth2's.

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
    # ImageNet encoders (Monodepth2's default, the paper's figures): train asks for the file's
    # path, --config.model.init=PATH.msgpack (`xdistill convert-weights --torchvision`), or scratch
    config.model.init = "imagenet"
    config.model.num_layers = 50
    config.model.pose_num_layers = 50  # Monodepth2's: one --num_layers for both encoders
    return config
