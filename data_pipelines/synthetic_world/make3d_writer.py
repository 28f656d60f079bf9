"""A Make3D-format test set rendered from the held-out drive's world with a different camera.

Layout, as the real Make3D Test134 (and Monodepth2's evaluation script, issue #89) expects:
  make3d/Test134/img-NAME.jpg                  RGB JPEG, portrait: rows = 4/3 x cols (real: 2272 x 1704)
  make3d/Gridlaserdata/depth_sph_corr-NAME.mat Position3DGrid (55, 305, 4) float64
  make3d/make3d_test_files.txt                 one `img-NAME.jpg` per line

Position3DGrid follows the Make3D readme: [:,:,0] vertical position Y (m, up positive),
[:,:,1] horizontal position X (m, right positive), [:,:,2] projective depth Z (m),
[:,:,3] depth d = range along the ray (m) - the channel evaluations read. Grid axis 0 spans the
image rows and axis 1 the image columns, which is the correspondence Monodepth2's script assumes
when it crops both centrally (1704/2 of 2272 image rows, 21 of 55 grid rows). Rays that hit
nothing within the laser's reach read 81.92 m, the real scanner's saturation value.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .raycast import NOTHING, RayGrid, cast, pinhole_grid
from .render import render_view
from .scene import DriveScene, LANE_OFFSET

GRID_ROWS, GRID_COLS = 55, 305
LASER_MAX = 81.92
CAMERA_HEIGHT = 1.6


def _camera_pose(scene: DriveScene, rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """A pedestrian-height camera on the road or sidewalk, looking roughly along the street."""
    s = float(scene.camera_s(rng.uniform(0, num_frames / scene.fps)))
    offset = rng.uniform(-7.5, 7.5) if rng.random() < 0.5 else -LANE_OFFSET
    xy, heading = scene.road.place(s, offset)
    yaw = float(heading) + math.radians(rng.uniform(-35.0, 35.0)) + (math.pi if rng.random() < 0.3 else 0.0)
    pitch = math.radians(rng.uniform(-2.0, 6.0))  # positive looks up
    forward = np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), math.sin(pitch)])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward], 1)  # camera x right, y down, z forward
    pose[:3, 3] = (xy[0], xy[1], CAMERA_HEIGHT)
    return pose


def _save_mat(path: Path, variables: dict):
    """scipy.io.savemat with the header's creation time fixed, so the bytes depend on the seed only."""
    import io

    import scipy.io

    buf = io.BytesIO()
    scipy.io.savemat(buf, variables, do_compression=True)
    data = bytearray(buf.getvalue())
    at = data.find(b"Created on: ", 0, 116)
    if at >= 0:  # the MAT 5 header is 116 bytes of text; time.asctime() is 24 characters
        data[at + 12:at + 36] = b"Fri Jan  1 12:00:00 2021"
    path.write_bytes(bytes(data))


def image_name(seed: int, index: int) -> str:
    return f"synth{int(seed)}-p-{index:03d}t000"


def write_make3d_list(out: Path, seed: int, num_images: int) -> list[str]:
    """`make3d_test_files.txt` (one `img-NAME.jpg` per line); returns the names."""
    names = [f"img-{image_name(seed, i)}.jpg" for i in range(num_images)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "make3d_test_files.txt").write_text("\n".join(names) + "\n")
    return names


def write_make3d(out: Path, scene: DriveScene, seed: int, num_images: int, num_frames: int,
                 rows: int = 568, cols: int = 426, indices=None) -> list[str]:
    """Render Make3D-style images + laser grids; returns the image file names.

    Image i is a fixed function of (seed, i) (its own generator), so `indices` can split the
    set across processes; by default all `num_images` are rendered and the list file written.
    """
    from PIL import Image

    (out / "Test134").mkdir(parents=True, exist_ok=True)
    (out / "Gridlaserdata").mkdir(parents=True, exist_ok=True)
    f = 0.9 * cols  # ~58 degrees across the columns, ~73 across the rows
    cx, cy = 0.5 * (cols - 1), 0.5 * (rows - 1)
    names = []
    for i in range(num_images) if indices is None else indices:
        rng = np.random.default_rng([int(seed), 0x3D3D, i])
        t = rng.uniform(0, num_frames / scene.fps)
        prims = scene.primitives_at(float(t))
        pose = _camera_pose(scene, rng, num_frames)
        view = render_view(pinhole_grid(pose, f, f, cx, cy, cols, rows), prims, scene.road, 1.0 / f)
        name = image_name(seed, i)
        Image.fromarray(view["rgb"]).save(out / "Test134" / f"img-{name}.jpg", quality=95)

        # Laser grid: rays through a 55 x 305 lattice spanning the same field of view.
        gv = (np.arange(GRID_ROWS) + 0.5) * rows / GRID_ROWS - 0.5
        gu = (np.arange(GRID_COLS) + 0.5) * cols / GRID_COLS - 0.5
        uu, vv = np.meshgrid(gu, gv)
        d_cam = np.stack([(uu - cx) / f, (vv - cy) / f, np.ones_like(uu)], -1)
        grid = RayGrid(origin=pose[:3, 3], dirs=d_cam @ pose[:3, :3].T,
                       cover=lambda *a: [(0, GRID_ROWS, 0, GRID_COLS)], t_max=200.0)
        z, prim, _ = cast(grid, prims)
        z = np.where(prim == NOTHING, np.inf, z)
        ray_len = np.linalg.norm(d_cam, axis=-1)
        dist = z * ray_len
        far = ~(dist < LASER_MAX)
        dist = np.where(far, LASER_MAX, dist)
        z = dist / ray_len
        grid3d = np.stack([-d_cam[..., 1] * z, d_cam[..., 0] * z, z, dist], -1).astype(np.float64)
        _save_mat(out / "Gridlaserdata" / f"depth_sph_corr-{name}.mat", {"Position3DGrid": grid3d})
        names.append(f"img-{name}.jpg")
    if indices is None:
        write_make3d_list(out, seed, num_images)
    return names
