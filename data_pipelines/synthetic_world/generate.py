"""Generate the whole synthetic world: drives in KITTI raw layout, split files, Make3D test set.

`generate_world(out, seed=0, drives=3, frames=100, width=416, height=128)` builds everything in
a temporary sibling folder and renames it to `out` at the end, so an interrupted run never
leaves a world that looks complete. Output is a fixed function of the arguments (not of the
number of worker processes). See README.md in this folder for the layout and units.
"""

from __future__ import annotations

import json
import os
import multiprocessing
import shutil
import time
from pathlib import Path

from .kitti_writer import (FPS, default_workers, drive_rng, write_calibration, write_drive,
                           write_drive_metadata, write_splits)
from .make3d_writer import write_make3d, write_make3d_list
from .scene import DriveScene

DATE = "2021_01_01"
DEMO = dict(drives=3, frames=100, width=416, height=128, make3d_images=20, make3d_size=(284, 213),
            velodyne="test")
MAKE3D_SIZE = (568, 426)  # rows x cols: a quarter of the real 2272 x 1704
KITTI_NATIVE = dict(width=1242, height=375)


FRAMES_PER_JOB = 20
IMAGES_PER_JOB = 5


def _job(args):
    """One unit of work for the pool: a chunk of a drive's frames or of the Make3D images."""
    kind, root, seed, frames = args[:4]
    if kind == "frames":
        drive, lidar_azimuths, velodyne, chunk = args[4:]
        write_drive(Path(root), DATE, drive, seed, frames, lidar_azimuths, velodyne, frames=chunk)
    else:
        drive, num_images, size, chunk = args[4:]
        scene = DriveScene(drive_rng(seed, drive), frames, fps=FPS)
        write_make3d(Path(root) / "make3d", scene, seed, num_images, frames, *size, indices=chunk)
    return args[0]


def generate_world(out, seed: int = 0, drives: int = DEMO["drives"], frames: int = DEMO["frames"],
                   width: int = KITTI_NATIVE["width"], height: int = KITTI_NATIVE["height"],
                   make3d_images: int = DEMO["make3d_images"], make3d_size: tuple[int, int] = MAKE3D_SIZE,
                   lidar_azimuths: int = 1024, velodyne: str = "all", workers: int | None = None,
                   overwrite: bool = False) -> dict:
    """Write the world to `out`; returns a summary dict (also saved as `out/world.json`).

    make3d_size is (rows, cols) of the Make3D images (the real ones are 2272 x 1704).
    velodyne: "all" drives get scans (as real KITTI), or only the held-out "test" drive.
    """
    if velodyne not in ("all", "test"):
        raise ValueError(f"--velodyne must be 'all' or 'test', got {velodyne!r}")
    out = Path(out)
    # the seed too, before the temporary folder is made (numpy refused it there, naming no option)
    for name, value, low in (("seed", seed, 0), ("drives", drives, 2), ("frames", frames, 3),
                             ("width", width, 16), ("height", height, 8), ("make3d_images", make3d_images, 0),
                             ("lidar_azimuths", lidar_azimuths, 16)):
        if int(value) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if (int(drives) - 1) * (int(frames) - 2) < 2:  # frames 1..F-2 of every drive but the test drive
        raise ValueError(f"--drives {drives} and --frames {frames} give {(int(drives) - 1) * (int(frames) - 2)} "
                         "training line(s), (drives - 1) x (frames - 2); the train and val splits need at "
                         "least 2: more drives or frames")
    if workers is not None and (isinstance(workers, bool) or int(workers) < 1):
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    absolute = Path(os.path.abspath(out))
    if not absolute.name or absolute == Path(os.path.abspath(os.getcwd())):
        # the world is built beside --out and renamed into its place: not this process's folder
        raise ValueError(f"--out {out} is the current folder (or a file system root): name a folder "
                         "for the world, e.g. --out world")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ValueError(f"--out {out}: cannot be made: {blocker} is a file")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {out} exists and is not empty (--overwrite replaces a world written there)")
        if not (out / "world.json").is_file():  # --overwrite deletes the folder: only a world of ours
            found = ", ".join(sorted(p.name for p in out.iterdir())[:5])
            raise ValueError(f"--out {out} holds no synthetic world (no world.json; found {found}): "
                             "--overwrite replaces only a world `xdistill synth` wrote")
    start = time.time()
    tmp = absolute.with_name(absolute.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_calibration(tmp / DATE, width, height)
    drive_ids = list(range(1, drives + 1))
    test_drive = drive_ids[-1]
    # Work split in chunks that any process can do in any order (every frame and image is a
    # fixed function of the seed); heavy chunks (the test drive's scans, Make3D) go first.
    jobs = []
    for d in [test_drive] + drive_ids[:-1]:
        scans = velodyne == "all" or d == test_drive
        for a in range(0, frames, FRAMES_PER_JOB):
            jobs.append(("frames", str(tmp), seed, frames, d, lidar_azimuths, scans,
                         range(a, min(a + FRAMES_PER_JOB, frames))))
        if d == test_drive:
            for a in range(0, make3d_images, IMAGES_PER_JOB):
                jobs.append(("make3d", str(tmp), seed, frames, d, make3d_images, tuple(make3d_size),
                             range(a, min(a + IMAGES_PER_JOB, make3d_images))))
    workers = default_workers(len(jobs)) if workers is None else int(workers)
    if workers > 1:
        # spawn: the parent may hold threads (e.g. jax), which fork would copy in a broken state.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            list(pool.imap_unordered(_job, jobs))
    else:
        for job in jobs:
            _job(job)
    for d in drive_ids:
        write_drive_metadata(tmp, DATE, d, seed, frames, velodyne == "all" or d == test_drive)
    if make3d_images:
        write_make3d_list(tmp / "make3d", seed, make3d_images)
    splits = write_splits(tmp, DATE, drive_ids, frames, seed)
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
