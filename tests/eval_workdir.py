"""One tiny trained workdir shared by the evaluation, prediction and notebook tests of a session.

A synthetic world (2 drives x 8 frames at 192x64; drive 0002 is the test drive, 2 Make3D images),
its train/val splits prepared at 32x96, GT exported for val and test, and 2 training steps of
ResNet-18 at 32x96 (batch 2, one device, no distillation) that validate on the val split with
depth metrics at step 2. Built once per session (lru_cache) and removed at exit. The notebook
trains with exactly this config (TRAIN_OVERRIDES), so its compile comes from the cache.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import pathlib
import shutil
import tempfile
import types

REPO = pathlib.Path(__file__).resolve().parent.parent
HEIGHT, WIDTH = 32, 96
WORLD = dict(seed=3, drives=2, frames=8, width=192, height=64, make3d_images=2, make3d_size=(96, 72),
             lidar_azimuths=512, workers=1)
TEST_DRIVE = "2021_01_01/2021_01_01_drive_0002_sync"

# `configs/synthetic_demo.py:smoke` plus these: small enough for a 2-core CPU test.
TRAIN_OVERRIDES = {
    "data.height": HEIGHT, "data.width": WIDTH, "data.val_batches": -1, "data.augment": False,
    "optim.batch_size": 2, "optim.num_steps": 2, "mesh.num_devices": 1, "distill.weight": 0.0,
    "run.ckpt_every": 1, "run.val_every": 2, "run.async_checkpoints": False,
}


def make_world(root: pathlib.Path) -> pathlib.Path:
    from data_pipelines.synthetic_world.generate import generate_world

    kwargs = dict(WORLD)
    if "velodyne" in inspect.signature(generate_world).parameters:
        kwargs["velodyne"] = "all"  # the val split's GT needs scans of the training drive too
    generate_world(root, **kwargs)
    return root


def train_config(dataset_dir, val_gt):
    from xdistill_jax import config_utils

    config = config_utils.load_config_file(str(REPO / "configs" / "synthetic_demo.py") + ":smoke")
    overrides = dict(TRAIN_OVERRIDES, **{"data.dataset_dir": str(dataset_dir), "data.val_gt_depth": str(val_gt)})
    config = config_utils.apply_overrides(config, [f"--config.{k}={v}" for k, v in overrides.items()])
    config_utils.validate(config)
    return config


@functools.lru_cache(maxsize=None)
def trained() -> types.SimpleNamespace:
    from data_pipelines.kitti.export_gt import export_gt_depths
    from data_pipelines.kitti.prepare import prepare_split
    from xdistill_jax import train

    base = pathlib.Path(tempfile.mkdtemp(prefix="xdistill_eval_"))
    atexit.register(shutil.rmtree, base, True)
    world = make_world(base / "world")
    splits = world / "splits"
    for name in ("train", "val"):
        prepare_split(world, splits / f"{name}_files.txt", base / "tfds", name, HEIGHT, WIDTH)
    gt_val, gt_test = base / "gt_val.npz", base / "gt_test.npz"
    export_gt_depths(world, splits / "val_files.txt", gt_val)
    export_gt_depths(world, splits / "test_files.txt", gt_test)
    workdir = base / "workdir"
    status = train.train_and_evaluate(train_config(base / "tfds", gt_val), workdir)
    assert status == 0, f"training the shared test workdir failed with status {status}"
    return types.SimpleNamespace(base=base, world=world, splits=splits, gt_val=gt_val, gt_test=gt_test,
                                 workdir=workdir)
