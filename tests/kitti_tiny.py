"""A tiny KITTI-raw-layout tree for the prepare / loader tests, built in the test session.

One date with its `calib_cam_to_cam.txt` (real KITTI values and key format) and two drives of
`FRAMES` frames for both cameras:
- drive 0001 "moving": smooth colour patterns shifted a few pixels per frame, plus a little
  noise, so every frame differs (JPEG-friendly: smooth, not white noise);
- drive 0002 "static": every frame of a camera is the same image, so the three frames of a
  triplet are equal and any per-frame difference after augmentation is a bug.
The split file lists frames 1..FRAMES-2 of both drives, alternating sides.
"""

from __future__ import annotations

import pathlib

import numpy as np

DATE = "2011_09_26"
FRAMES = 5
NATIVE_H, NATIVE_W = 30, 100
DRIVES = {"moving": f"{DATE}/{DATE}_drive_0001_sync", "static": f"{DATE}/{DATE}_drive_0002_sync"}

# Real KITTI 2011_09_26 values (calib_cam_to_cam.txt), 3x4 row-major.
P_RECT = {
    2: [721.5377, 0.0, 609.5593, 44.85728, 0.0, 721.5377, 172.854, 0.2163791, 0.0, 0.0, 1.0, 0.002745884],
    3: [721.5377, 0.0, 609.5593, -339.5242, 0.0, 721.5377, 172.854, 2.199936, 0.0, 0.0, 1.0, 0.002729905],
}


def calib_text(cameras=(2, 3)) -> str:
    lines = ["calib_time: 09-Jan-2012 13:57:47", "corner_dist: 9.950000e-02"]
    for cam in cameras:
        lines.append(f"S_rect_0{cam}: 1.242000e+03 3.750000e+02")
        lines.append(f"P_rect_0{cam}: " + " ".join(f"{v:.6e}" for v in P_RECT[cam]))
    return "\n".join(lines) + "\n"


def _pattern(rng: np.random.Generator, shift: int, cam: int) -> np.ndarray:
    y, x = np.mgrid[0:NATIVE_H, 0:NATIVE_W].astype(np.float64)
    x = x + shift
    r = 128 + 90 * np.sin(x / 7.0 + cam) * np.cos(y / 5.0)
    g = 128 + 80 * np.cos(x / 11.0 - y / 9.0)
    b = 60 + 1.5 * ((x + 2 * y) % 120)
    img = np.stack([r, g, b], -1) + rng.normal(0, 3, (NATIVE_H, NATIVE_W, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_tree(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes the tree under `root`; returns (raw_dir, split_file)."""
    from PIL import Image

    root = pathlib.Path(root)
    raw = root / "raw"
    (raw / DATE).mkdir(parents=True, exist_ok=True)
    (raw / DATE / "calib_cam_to_cam.txt").write_text(calib_text())
    rng = np.random.default_rng(0)
    lines = []
    for kind, drive in DRIVES.items():
        for cam in (2, 3):
            folder = raw / drive / f"image_0{cam}" / "data"
            folder.mkdir(parents=True, exist_ok=True)
            still = _pattern(rng, 0, cam)
            for f in range(FRAMES):
                img = still if kind == "static" else _pattern(rng, 3 * f, cam)
                Image.fromarray(img).save(folder / f"{f:010d}.png")
        for f in range(1, FRAMES - 1):
            lines.append(f"{drive} {f} {'lr'[f % 2]}")
    split = root / "train_files.txt"
    split.write_text("\n".join(lines) + "\n")
    return raw, split


def split_lines(split_file: pathlib.Path) -> list[str]:
    return [t.strip() for t in split_file.read_text().splitlines() if t.strip()]


def source_image(raw: pathlib.Path, line: str, offset: int) -> pathlib.Path:
    folder, frame, side = line.split()
    cam = 2 if side == "l" else 3
    return raw / folder / f"image_0{cam}" / "data" / f"{int(frame) + offset:010d}.png"


def resized_source(raw: pathlib.Path, line: str, offset: int, height: int, width: int) -> np.ndarray:
    """The source frame resized with PIL LANCZOS, computed here independently of the code."""
    from PIL import Image

    with Image.open(source_image(raw, line, offset)) as im:
        return np.asarray(im.convert("RGB").resize((width, height), Image.LANCZOS))


def damage_shard(dataset_dir, accept) -> set[int]:
    """Overwrites 16 bytes of the prepared train split's shard (one shard: these splits are small)
    at the first 512-byte step where the examples that then cannot be read, a non-empty set,
    satisfy `accept(damaged, num_examples)`, as a partial copy or a bad disk leaves a shard (its
    size unchanged). Ranges in the file's header, block headers or index fail every record.
    Returns the damaged examples' indices."""
    from data_pipelines.damaged_store import DamagedStoreError
    from data_pipelines.kitti.tfds_builder import open_split

    (shard,) = pathlib.Path(dataset_dir).rglob("*.array_record-00000-of-00001")
    original = shard.read_bytes()
    for offset in range(512, len(original) // 2, 512):
        data = bytearray(original)
        data[offset:offset + 16] = bytes(b ^ 0xFF for b in data[offset:offset + 16])
        shard.write_bytes(bytes(data))
        source, damaged = open_split(dataset_dir, "train"), set()
        for i in range(len(source)):
            try:
                source[i]
            except DamagedStoreError:
                damaged.add(i)
        if damaged and accept(damaged, len(source)):
            return damaged
    shard.write_bytes(original)
    raise AssertionError(f"no overwritten range of {shard} damaged records as asked")
