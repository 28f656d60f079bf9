"""One tiny synthetic world shared by the data tests of a session (built once, removed at exit).

2 drives x 6 frames at 192x64, 256 lidar columns, 2 small Make3D images; drive 0002 is the
test drive. Import `tiny_world()` from the tests that need it (lru_cache makes it a singleton).
"""

from __future__ import annotations

import atexit
import functools
import pathlib
import shutil
import tempfile

SEED = 3
DRIVES, FRAMES, WIDTH, HEIGHT = 2, 6, 192, 64
DATE = "2021_01_01"


@functools.lru_cache(maxsize=None)
def tiny_world() -> pathlib.Path:
    from data_pipelines.synthetic_world.generate import generate_world

    base = pathlib.Path(tempfile.mkdtemp(prefix="xdistill_tiny_world_"))
    atexit.register(shutil.rmtree, base, True)
    root = base / "world"
    generate_world(root, seed=SEED, drives=DRIVES, frames=FRAMES, width=WIDTH, height=HEIGHT,
                   make3d_images=2, make3d_size=(96, 72), lidar_azimuths=512, workers=1)
    return root


def drive_folder(drive: int) -> str:
    return f"{DATE}/{DATE}_drive_{drive:04d}_sync"
