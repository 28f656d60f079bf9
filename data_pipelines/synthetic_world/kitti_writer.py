"""Write synthetic drives in the exact KITTI raw layout, plus the side folders a real drive lacks.

Per drive `DATE/DATE_drive_XXXX_sync/`:
  image_0{2,3}/data/%010d.png      RGB uint8, rectified cameras 2 (left) and 3 (right)
  image_0{2,3}/timestamps.txt
  velodyne_points/data/%010d.bin    float32 (N,4) x, y, z, reflectance in the velodyne frame
  velodyne_points/timestamps{,_start,_end}.txt
  oxts/data/%010d.txt, oxts/timestamps.txt, oxts/dataformat.txt
  depth_0{2,3}/data/%010d.png       dense z-depth, uint16 = round(metres * 256), 0 = sky/none
  semantic_0{2,3}/data/%010d.png    uint8 Cityscapes trainIds (0..18, 255 = ignore)
  moving_0{2,3}/data/%010d.png      uint8 1 where the pixel shows an object that moves, else 0
"""

from __future__ import annotations

import datetime
import math
import os
from pathlib import Path

import numpy as np

from . import rig as rig_mod
from .raycast import NOTHING, pinhole_grid, spherical_grid
from .render import render_view
from .scene import DriveScene

FPS = 10.0
LIDAR_ELEVATIONS = np.linspace(2.0, -24.8, 64)  # degrees, like the HDL-64E's span
LIDAR_RANGE = 120.0
START_TIME = datetime.datetime(2021, 1, 1, 12, 0, 0)


def _save_png(path: Path, array: np.ndarray):
    from PIL import Image  # lazily: PIL only where files are written

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)


def _timestamps(num_frames: int, offset_s: float = 0.0) -> str:
    lines = []
    for i in range(num_frames):
        t = START_TIME + datetime.timedelta(seconds=i / FPS + offset_s)
        lines.append(t.strftime("%Y-%m-%d %H:%M:%S.") + f"{t.microsecond * 1000:09d}")
    return "\n".join(lines) + "\n"


def drive_rng(seed: int, drive: int) -> np.random.Generator:
    """The generator of one drive: a fixed function of (seed, drive), so drives render in any order."""
    return np.random.default_rng([int(seed), int(drive), 0x5EED])


def write_drive(root: Path, date: str, drive: int, seed: int, num_frames: int,
                lidar_azimuths: int = 1024, velodyne: bool = True, frames=None) -> DriveScene:
    """Render and write one drive; returns its scene (for callers that need the layout).

    `frames` (an iterable of frame indices) renders only those frames and skips the per-drive
    metadata, so a drive can be split across processes; by default all frames and the metadata
    (`write_drive_metadata`) are written. `velodyne=False` skips the scans, e.g. for training
    drives of the demo world, where nothing reads them and they would be most of the bytes.
    """
    rig = rig_mod.Rig(root / date)
    scene = DriveScene(drive_rng(seed, drive), num_frames, fps=FPS)
    folder = root / date / f"{date}_drive_{drive:04d}_sync"
    pixel_angle = 1.0 / rig.fx
    for frame in range(num_frames) if frames is None else frames:
        t = frame / FPS
        vehicle = scene.vehicle_pose(t)
        prims = scene.primitives_at(t)
        for cam in (2, 3):
            grid = pinhole_grid(vehicle @ rig.vehicle_from_cam[cam], rig.fx, rig.fy, rig.cx, rig.cy,
                                rig.width, rig.height)
            view = render_view(grid, prims, scene.road, pixel_angle)
            name = f"{frame:010d}.png"
            _save_png(folder / f"image_0{cam}" / "data" / name, view["rgb"])
            depth = np.where(np.isfinite(view["t"]), view["t"], 0.0)
            depth = np.clip(np.round(depth * 256.0), 0, 65535).astype(np.uint16)
            _save_png(folder / f"depth_0{cam}" / "data" / name, depth)
            _save_png(folder / f"semantic_0{cam}" / "data" / name, view["semantic"])
            _save_png(folder / f"moving_0{cam}" / "data" / name, view["moving"].astype(np.uint8))
        if not velodyne:
            continue
        velo_pose = vehicle @ rig.vehicle_from_velo
        grid = spherical_grid(velo_pose, LIDAR_ELEVATIONS, lidar_azimuths, t_max=LIDAR_RANGE)
        scan = render_view(grid, prims, scene.road, math.radians(360.0 / lidar_azimuths), shade=False)
        keep = (scan["prim"] != NOTHING) & (scan["t"] < LIDAR_RANGE)
        d_sensor = grid.dirs @ velo_pose[:3, :3]  # world -> sensor directions (unit length)
        pts = d_sensor[keep] * scan["t"][keep][:, None]
        points = np.concatenate([pts, scan["reflectance"][keep][:, None]], 1).astype(np.float32)
        velo_file = folder / "velodyne_points" / "data" / f"{frame:010d}.bin"
        velo_file.parent.mkdir(parents=True, exist_ok=True)
        points.tofile(velo_file)
    if frames is None:
        write_drive_metadata(root, date, drive, seed, num_frames, velodyne, scene)
    return scene


def write_drive_metadata(root: Path, date: str, drive: int, seed: int, num_frames: int,
                         velodyne: bool = True, scene: DriveScene | None = None):
    """oxts packets (from the true IMU poses) and the KITTI timestamps files of one drive."""
    rig = rig_mod.Rig(root / date)
    scene = scene or DriveScene(drive_rng(seed, drive), num_frames, fps=FPS)
    folder = root / date / f"{date}_drive_{drive:04d}_sync"
    imu_poses = np.stack([scene.vehicle_pose(i / FPS) @ rig.vehicle_from_imu for i in range(num_frames)])
    oxts_dir = folder / "oxts" / "data"
    oxts_dir.mkdir(parents=True, exist_ok=True)
    for frame, line in enumerate(rig_mod.oxts_lines(imu_poses, FPS)):
        (oxts_dir / f"{frame:010d}.txt").write_text(line + "\n")
    (folder / "oxts" / "dataformat.txt").write_text(rig_mod.OXTS_DATAFORMAT)
    (folder / "oxts" / "timestamps.txt").write_text(_timestamps(num_frames))
    for cam in (2, 3):
        (folder / f"image_0{cam}").mkdir(parents=True, exist_ok=True)
        (folder / f"image_0{cam}" / "timestamps.txt").write_text(_timestamps(num_frames))
    if velodyne:
        (folder / "velodyne_points").mkdir(parents=True, exist_ok=True)
        (folder / "velodyne_points" / "timestamps.txt").write_text(_timestamps(num_frames))
        (folder / "velodyne_points" / "timestamps_start.txt").write_text(_timestamps(num_frames, -0.05))
        (folder / "velodyne_points" / "timestamps_end.txt").write_text(_timestamps(num_frames, 0.05))


def write_calibration(date_dir: Path, width: int, height: int):
    date_dir.mkdir(parents=True, exist_ok=True)
    for name, text in rig_mod.calibration_texts(width, height).items():
        (date_dir / name).write_text(text)


def write_splits(root: Path, date: str, drives: list[int], num_frames: int, seed: int,
                 val_fraction: float = 0.1) -> dict[str, list[str]]:
    """Monodepth2-format split files under ROOT/splits/.

    The last drive is the held-out test drive (every frame, side `l`, velodyne for all).
    Train/val lines come from the other drives, frames 1..F-2 (both neighbours exist), one random
    side per frame (as eigen_zhou mixes l and r); about `val_fraction` of them go to val.
    """
    if len(drives) < 2:
        raise ValueError("--drives must be at least 2: the last drive is held out as the test split")
    if num_frames < 3:
        raise ValueError("--frames must be at least 3: training lines need frames -1 and +1")
    rng = np.random.default_rng([int(seed), 0x5B117])
    train, val = [], []
    for drive in drives[:-1]:
        for frame in range(1, num_frames - 1):
            line = f"{date}/{date}_drive_{drive:04d}_sync {frame} {'l' if rng.random() < 0.5 else 'r'}"
            (val if rng.random() < val_fraction else train).append(line)
    if not val:
        val.append(train.pop())
    order = rng.permutation(len(train))
    train = [train[i] for i in order]
    test = [f"{date}/{date}_drive_{drives[-1]:04d}_sync {frame:010d} l" for frame in range(num_frames)]
    splits = {"train": train, "val": val, "test": test}
    out = root / "splits"
    out.mkdir(parents=True, exist_ok=True)
    for name, lines in splits.items():
        (out / f"{name}_files.txt").write_text("\n".join(lines) + "\n")
    return splits


def default_workers(num_drives: int) -> int:
    return max(1, min(num_drives, os.cpu_count() or 1))
