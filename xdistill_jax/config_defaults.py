"""The full set of config fields, with the paper setting (X-Distill on Monodepth2, ResNet-18,
640x192, KITTI Eigen-Zhou) as defaults, but for `model.init`: "scratch" here (the tests' and
synthetic worlds' configs), "imagenet" in the KITTI configs (ImageNet encoders, as the paper). The files under `configs/` start from `base_config()` and
change only what their experiment changes, so every field exists (and is type-checked by the
`--config.a.b=value` overrides) in every config.
"""

from __future__ import annotations

import ml_collections


INIT_IMAGENET = "imagenet"  # model.init of the KITTI configs: a path must be given (or "scratch")
STATE_LAYOUTS = ("default", "auto")  # run.state_layout, train.make_train_step(state_layout=)

# The element type of every tuple field, which `--config.a.b=(...)` overrides are checked against:
# a field whose value is an empty tuple (optim.lr_drop_steps' default, or one a config file empties)
# has no element to take the type from, and took any literal (negative, fractional or text drop
# steps that crashed or changed the run). tests/test_config.py checks every tuple field is here.
TUPLE_ELEMENT_TYPES = {
    "optim.lr_drop_epochs": int,
    "optim.lr_drop_steps": int,
    "distill.translator.dilations": int,
}

DISPARITY_SCALES = (0, 1, 2, 3)  # the depth net's outputs (models/depth.py); distill.scale is one


# What an empty `distill.translator` group meant in a config.json written before the group spelled
# out its fields (cbc9120, 2026-12-02): the Translator's defaults of that time. The default
# output_stride has been 4 since 2026-12-03; those files trained a full-resolution translator.
LEGACY_TRANSLATOR = {"features": 32, "dilations": (1, 2, 4), "output_stride": 1, "multi_scale": False}

# How the trained networks store their conv kernels (models/conv.py). `model.kernel_layout` "auto"
# (the default since 2026-12-06) is the platform's: OHWI on a GPU or TPU (since 2026-12-04), HWIO on
# the CPU. A run saves the layout it trained with in its config.json, so resuming or evaluating it
# on another platform rebuilds the same networks; a config.json without the field was written by a
# run whose kernels are flax's HWIO.
KERNEL_LAYOUTS = ("OHWI", "HWIO")
KERNEL_LAYOUT_SETTINGS = ("auto",) + KERNEL_LAYOUTS
LEGACY_KERNEL_LAYOUT = "HWIO"


def kernel_layout_for(setting: str, platform: str) -> str:
    """The layout that `model.kernel_layout` = `setting` stores kernels in on `platform` ("cpu",
    "gpu", "cuda", "rocm", "tpu"). "auto": OHWI, cuDNN's filter order, on a GPU (HWIO kernels made
    every step's Adam update of a conv kernel a transposing copy there), and on a TPU, as since
    2026-12-04; HWIO on the CPU, the order XLA:CPU's convolutions take: with OHWI kernels the
    `configs/demo.py` step took 1.5x as long there (benchmarks/RESULTS.md, "Kernel layout on the
    CPU"). OHWI and HWIO are themselves."""
    if setting == "auto":
        return "HWIO" if platform == "cpu" else "OHWI"
    if setting not in KERNEL_LAYOUTS:
        raise ValueError(f"model.kernel_layout must be one of {KERNEL_LAYOUT_SETTINGS}, got {setting!r}")
    return setting


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    c.data.dataset_dir = ""          # TFDS dir written by `xdistill prepare` (triplets)
    c.data.train_split = "train"
    c.data.val_split = "val"
    c.data.height = 192              # multiples of 32 (the encoder downsamples by 32)
    c.data.width = 640
    c.data.teacher_dir = ""          # `xdistill teacher precompute` store for train_split
    c.data.val_teacher_dir = ""      # same for val_split ("" = no distillation loss at validation)
    c.data.val_gt_depth = ""         # gt_depths.npz for val_split ("" = losses only at validation)
    c.data.val_gt_crop = "garg"      # "garg" (KITTI Eigen) | "" (no crop, e.g. the synthetic world)
    c.data.augment = True            # colour jitter + horizontal flip (Monodepth2, p=0.5 each)
    c.data.num_workers = 0           # grain worker processes (0 = this process's threads; -1 = one
                                     # per CPU core (or CPU of a container's quota) less one, at most 16,
                                     # 0 below 2: the KITTI configs')
    c.data.val_batches = 8           # validation batches per validation (-1 = whole split)

    c.model = ml_collections.ConfigDict()
    c.model.num_layers = 18          # depth encoder ResNet-18/34/50
    c.model.pose_num_layers = 18     # pose encoder ResNet-18/50 (two-image input)
    c.model.dtype = "float32"        # compute dtype ("bfloat16"); params and losses stay fp32
    c.model.init = "scratch"         # "scratch" | path to a `convert-weights` ImageNet .msgpack |
                                     # "imagenet" (the KITTI configs: ImageNet weights, as Monodepth2's
                                     # default and the paper; training asks for the file's path)
    c.model.kernel_layout = "auto"   # how the depth, pose and translator nets store conv kernels:
                                     # OHWI (cuDNN's; in-place Adam updates on a GPU) or HWIO (flax's,
                                     # XLA:CPU's); "auto": the platform's (`kernel_layout_for`),
                                     # saved resolved in the run's config.json
    c.model.gpu_channel_padding = True  # on a GPU, 16-bit convolutions whose channel counts the
                                     # tensor cores do not take (an image's 3) run with zero channels
                                     # added (models/conv.py; the same function)

    c.loss = ml_collections.ConfigDict()
    c.loss.smoothness_weight = 1e-3
    c.loss.min_depth = 0.1
    c.loss.max_depth = 100.0
    c.loss.automask = True
    c.loss.avg_reprojection = False
    c.loss.v1_multiscale = False
    c.loss.no_ssim = False
    # True = the authors' PyTorch 0.4.1 grid_sample (exact pixel sampling); False = current torch.
    c.loss.align_corners = True

    c.distill = ml_collections.ConfigDict()
    c.distill.weight = 0.1           # lambda; 0 = plain Monodepth2 (translator not even built)
    c.distill.mode = "hard"          # "hard" (CE to teacher argmax) | "soft" (T^2 KL)
    c.distill.temperature = 1.0      # soft mode only
    c.distill.grouping = "geometric"  # xdistill_jax.semantics grouping name
    c.distill.scale = 0              # disparity scale fed to the translator (DISPARITY_SCALES)
    c.distill.stop_gradient = False  # True: translator trains, depth net gets no distill gradient
    # Warm-up of the distillation gradient into the depth net (objective.depth_grad_factor): 0
    # before step depth_grad_start, then a linear ramp to 1 over depth_grad_ramp steps. The
    # translator learns from step 0 either way. 0 and 0 = the paper (full gradient from step 0).
    c.distill.depth_grad_start = 0
    c.distill.depth_grad_ramp = 0
    # models.translator.Translator's architecture (its defaults; tests/test_config.py checks they
    # agree). output_stride 4 (the default since 2026-12-03; 1 before) puts the translator at the
    # teacher logits' stride (their store's default): in every demo ablation it left the depth
    # net better than the full-resolution translator (6 of 6 runs: two seeds on each of three
    # VMs), and it costs +3 % of the step's bytes against +22 % (README "Demo results",
    # benchmarks/RESULTS.md).
    # 1 = full resolution (--config.distill.translator.output_stride=1).
    c.distill.translator = ml_collections.ConfigDict()
    c.distill.translator.features = 32
    c.distill.translator.dilations = (1, 2, 4)
    c.distill.translator.output_stride = 4
    c.distill.translator.multi_scale = False

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.batch_size = 12          # global batch (all devices, all hosts)
    c.optim.epochs = 20
    c.optim.num_steps = -1           # > 0 overrides epochs
    c.optim.steps_per_epoch = -1     # > 0 overrides len(train split) // batch_size
    # The original code calls StepLR.step() at the START of each epoch, so its "step size 15"
    # drops the rate after 14 epochs (reference §1). We copy what the authors ran: (14,).
    c.optim.lr_drop_epochs = (14,)
    c.optim.lr_drop_steps = ()       # non-empty: drop at these optimiser steps instead of epochs
                                     # (both: increasing integers > 0)
    c.optim.lr_decay_factor = 0.1

    c.run = ml_collections.ConfigDict()
    c.run.seed = 0
    c.run.log_every = 250
    c.run.ckpt_every = 2000
    c.run.val_every = 2000
    c.run.val_at_start = False       # also validate the initial state (step 0): the untrained baseline
    c.run.image_every = 2000         # sample disparity / translator PNGs (at validation)
    c.run.keep = 3                   # checkpoints kept
    c.run.async_checkpoints = True
    c.run.on_nonfinite = "stop"      # "stop" (keep last good checkpoint) | "skip" (count it)
    c.run.state_layout = "default"   # one of STATE_LAYOUTS; "auto": the train state's device
                                     # layouts left to XLA (train.make_train_step)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.num_devices = -1          # devices in the data mesh (-1 = all)

    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False    # call jax.distributed.initialize
    c.distributed.coordinator_address = ""  # "" = auto-detect (TPU/SLURM)
    c.distributed.num_processes = -1
    c.distributed.process_id = -1
    return c
