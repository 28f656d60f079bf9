"""The training runs of `xdistill demo` (X-Distill and its Monodepth2 baseline on the synthetic world).

`xdistill demo` trains two runs from this file with the same seed and number of steps:
X-Distill (as below) and the Monodepth2 baseline (`--config.distill.weight=0`). It fills in the
data paths; to rerun either run by hand from a demo workdir W:

  xdistill train --config configs/demo.py[:quick] --workdir W/runs/xdistill \\
      --config.data.dataset_dir=W/tfds --config.data.teacher_dir=W/teacher_logits/train
  xdistill train --config configs/demo.py[:quick] --workdir W/runs/baseline \\
      --config.data.dataset_dir=W/tfds --config.distill.weight=0

(the saved W/runs/*/config.json hold the resolved configs). Variants:
  ""       the default demo (<= 15 min on a 2-core CPU), 64x192.
  "quick"  `xdistill demo --quick` (<= 3 min), 64x192, fewer steps.
Both: ResNet-18 depth and pose nets from scratch (no ImageNet weights on a laptop demo), batch 4,
no validation split (the demo's eval stage scores the test split), checkpoints only at the end
and half way (what a killed run resumes from). Distillation: geometric grouping, hard mode,
lambda 0.1 (the paper setting in `config_defaults.py`). Larger settings: configs/synthetic_benchmark.py.
"""

from xdistill_jax.config_defaults import base_config


def get_config(variant: str = ""):
    config = base_config()
    config.data.height = 64
    config.data.width = 192
    config.data.val_split = ""
    config.data.val_gt_crop = "garg"
    config.optim.batch_size = 4
    config.optim.epochs = -1
    config.run.seed = 0
    config.run.async_checkpoints = False
    config.run.keep = 1
    if variant == "":
        config.optim.num_steps = 600
        config.optim.lr_drop_steps = (450,)
        config.run.log_every = 25
        config.run.ckpt_every = 300
    elif variant == "quick":
        config.optim.num_steps = 150
        config.optim.lr_drop_steps = ()
        config.run.log_every = 10
        config.run.ckpt_every = 150
    else:
        raise ValueError(f"configs/demo.py: unknown variant {variant!r} (known: '', quick)")
    config.run.val_every = config.optim.num_steps
    config.run.image_every = config.optim.num_steps
    return config
