"""Generate the whole synthetic world: drives in KITTI raw layout, split files, Make3D test set.

`generate_world(out, seed=0, drives=3, frames=100, width=416, height=128)` builds everything in
a temporary sibling folder and renames it to `out` at the end, so an interrupted run never
leaves a world that looks complete. Output is a fixed function of the arguments (not of the
number of worker processes). See README.md in this folder for the layout and units.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from pathlib import Path

from .kitti_writer import default_workers, write_calibration, write_drive, write_splits
from .make3d_writer import write_make3d
from .scene import DriveScene

DATE = "2021_01_01"
DEMO = dict(drives=3, frames=100, width=416, height=128, make3d_images=20, velodyne="test")
KITTI_NATIVE = dict(width=1242, height=375)


def _drive_job(args):
    root, date, drive, seed, frames, lidar_azimuths, velodyne = args
    write_drive(Path(root), date, drive, seed, frames, lidar_azimuths, velodyne)
    return drive


def generate_world(out, seed: int = 0, drives: int = DEMO["drives"], frames: int = DEMO["frames"],
                   width: int = KITTI_NATIVE["width"], height: int = KITTI_NATIVE["height"],
                   make3d_images: int = DEMO["make3d_images"], make3d_size: tuple[int, int] = (568, 426),
                   lidar_azimuths: int = 1024, velodyne: str = "all", workers: int | None = None,
                   overwrite: bool = False) -> dict:
    """Write the world to `out`; returns a summary dict (also saved as `out/world.json`).

    make3d_size is (rows, cols) of the Make3D images (the real ones are 2272 x 1704).
    velodyne: "all" drives get scans (as real KITTI), or only the held-out "test" drive.
    """
    if velodyne not in ("all", "test"):
        raise ValueError(f"--velodyne must be 'all' or 'test', got {velodyne!r}")
    out = Path(out)
    for name, value, low in (("drives", drives, 2), ("frames", frames, 3), ("width", width, 16),
                             ("height", height, 8), ("make3d_images", make3d_images, 0),
                             ("lidar_azimuths", lidar_azimuths, 16)):
        if int(value) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"output folder {out} exists and is not empty (pass overwrite=True / --overwrite)")
    start = time.time()
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_calibration(tmp / DATE, width, height)
    drive_ids = list(range(1, drives + 1))
    jobs = [(str(tmp), DATE, d, seed, frames, lidar_azimuths, velodyne == "all" or d == drive_ids[-1])
            for d in drive_ids]
    jobs.reverse()  # the test drive (with scans, the longest job) first, for a balanced pool
    workers = default_workers(drives) if workers is None else max(1, int(workers))
    if workers > 1:
        # spawn: the parent may hold threads (e.g. jax), which fork would copy in a broken state.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            list(pool.imap_unordered(_drive_job, jobs))
    else:
        for job in jobs:
            _drive_job(job)
    splits = write_splits(tmp, DATE, drive_ids, frames, seed)
    if make3d_images:
        from .kitti_writer import FPS, drive_rng

        test_scene = DriveScene(drive_rng(seed, drive_ids[-1]), frames, fps=FPS)
        write_make3d(tmp / "make3d", test_scene, seed, make3d_images, frames, *make3d_size)
    summary = {
        "seed": int(seed), "date": DATE, "drives": drives, "frames": frames, "width": width,
        "height": height, "test_drive": f"{DATE}/{DATE}_drive_{drive_ids[-1]:04d}_sync",
        "split_sizes": {k: len(v) for k, v in splits.items()}, "make3d_images": make3d_images,
        "make3d_size": list(make3d_size), "lidar_azimuths": lidar_azimuths, "velodyne": velodyne,
    }
    (tmp / "world.json").write_text(json.dumps(summary, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    summary["seconds"] = time.time() - start
    return summary
