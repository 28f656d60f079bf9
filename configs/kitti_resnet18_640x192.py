"""X-Distill, ResNet-18 depth and pose encoders, 640x192, KITTI Eigen-Zhou split (the paper setting).

Adam 1e-4 (betas 0.9/0.999, eps 1e-8, no weight decay), batch 12, 20 epochs (39,810 // 12 =
3,317 steps each, 66,340 steps), learning rate x0.1 after epoch 14: the original Monodepth2 code
steps its StepLR at the start of each epoch, so its "step size 15" really drops after 14 epochs;
we copy what the authors ran (`optim.lr_drop_epochs=(14,)`; use `(15,)` for the paper's text).

Run (prepare the data and the teacher store first: `xdistill prepare` of the train split,
data_pipelines/kitti/splits/eigen_zhou/train_files.txt, and of the val split, val_files.txt with
`--split val`, both at 640x192; `xdistill teacher precompute` of the train split. Without a val
teacher store the validation loss is the photometric loss; `--config.data.val_split=""` skips
validation):

  xdistill train --config configs/kitti_resnet18_640x192.py --workdir runs/xd_r18 \
      --config.data.dataset_dir=DATA/kitti_tfds --config.data.teacher_dir=DATA/teacher_train \
      --config.model.init=weights/resnet18_imagenet.msgpack

Baseline Monodepth2 (no distillation, translator not built): add `--config.distill.weight=0`.
bf16 compute (the GPU speed figures' step; parameters and losses stay float32): add
`--config.model.dtype=bfloat16`.

Expected time: not yet measured (Monodepth2's PyTorch step: 148 images/s on one H100, i.e.
about 1.5 h for 66,340 steps; see benchmarks/RESULTS.md for this port's figures).
Expected metrics (KITTI Eigen, mono, median scaling): baseline Monodepth2 abs_rel 0.115,
a1 0.877 (Monodepth2 README, ImageNet-pretrained); X-Distill: not yet measured here.
"""

from xdistill_jax.config_defaults import base_config


def get_config():
    config = base_config()
    config.data.num_workers = -1  # a grain worker process per CPU core (less one; at most 16)
    # ImageNet encoders (Monodepth2's default, the paper's figures): train asks for the file's
    # path, --config.model.init=PATH.msgpack (`xdistill convert-weights --torchvision`), or scratch
    config.model.init = "imagenet"
    return config
