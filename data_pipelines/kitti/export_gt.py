"""Ground-truth depth export for a KITTI test split (Monodepth2's `export_gt_depth.py`, reference 6.2).

- `eigen`: `generate_depth_map(DATE, velodyne .bin, cam=2 or 3 by side, vel_depth=True)`, i.e.
  the velodyne forward coordinate x as depth, at camera 02's image size.
- `eigen_benchmark`: `DATE/DRIVE/proj_depth/groundtruth/image_0X/%010d.png` (uint16) / 256.

Output: `np.savez_compressed` WITHOUT pickle: keys `depth_00000`, `depth_00001`, ... (float32
(H,W), one per split line, in order) and `files` (the split lines, str array). Written to a
temporary name and renamed, so a crash never leaves a file that looks complete.

`load_gt_depths` reads that format, and also Monodepth2's own `data` object array (ragged depth
maps pickled by numpy), but only when the caller passes `allow_pickle=True` explicitly: unpickling
runs code from the file, so only do it for files you trust.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import raw

SPLIT_KINDS = ("eigen", "eigen_benchmark")


def benchmark_gt_path(root, line: raw.SplitLine) -> Path:
    """`ROOT/FOLDER/proj_depth/groundtruth/image_0X/%010d.png` (KITTI depth benchmark annotations)."""
    return (Path(root) / line.folder / "proj_depth" / "groundtruth" / f"image_0{line.camera}"
            / f"{line.frame_index:010d}.png")


def gt_depth_for_line(root, line: raw.SplitLine, split: str = "eigen") -> np.ndarray:
    """(H,W) float32 depth in metres for one split line, 0 where there is no measurement."""
    if split == "eigen":
        return raw.generate_depth_map(raw.calib_dir(root, line), raw.velodyne_path(root, line),
                                      cam=line.camera, vel_depth=True)
    if split == "eigen_benchmark":
        from PIL import Image  # lazily: PIL only where PNGs are read

        path = benchmark_gt_path(root, line)
        if not path.is_file():
            raise FileNotFoundError(f"benchmark ground truth not found for split line '{line}': {path}")
        return (np.asarray(Image.open(path), dtype=np.float32) / 256.0).astype(np.float32)
    raise ValueError(f"unknown split kind {split!r}; expected one of {SPLIT_KINDS}")


def export_gt_depths(raw_dir, split_file, out_path, split: str = "eigen") -> int:
    """Export GT for every line of `split_file`; returns the number of depth maps written."""
    if split not in SPLIT_KINDS:
        raise ValueError(f"--split must be one of {SPLIT_KINDS}, got {split!r}")
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"--raw folder not found: {raw_dir}")
    lines = raw.read_split_file(split_file)
    if not lines:
        raise ValueError(f"{split_file}: split file has no lines")
    arrays = {}
    for i, line in enumerate(lines):
        arrays[f"depth_{i:05d}"] = gt_depth_for_line(raw_dir, line, split)
    arrays["files"] = np.array([str(line) for line in lines])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + f".tmp{os.getpid()}.npz")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return len(lines)


def load_gt_depths(path, allow_pickle: bool = False) -> tuple[list[np.ndarray], list[str]]:
    """(depth maps, split lines) from a GT file written by `export_gt_depths`.

    Monodepth2's own `gt_depths.npz` (a pickled object array under `data`, no file names) is
    read only with `allow_pickle=True`; its lines come back as empty strings.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file not found: {path}")
    with np.load(path, allow_pickle=False) as npz:
        keys = set(npz.files)
        depth_keys = sorted((k for k in keys if k.startswith("depth_")), key=lambda k: int(k[6:]))
        if depth_keys:
            if "files" not in keys:
                raise ValueError(f"{path}: has depth_* arrays but no 'files' array")
            files = [str(f) for f in npz["files"]]
            if len(files) != len(depth_keys):
                raise ValueError(f"{path}: {len(depth_keys)} depth maps but {len(files)} file names")
            return [np.asarray(npz[k], np.float32) for k in depth_keys], files
        if "data" not in keys:
            raise ValueError(f"{path}: neither depth_* arrays nor Monodepth2's 'data' array inside")
    if not allow_pickle:
        raise ValueError(
            f"{path} is in Monodepth2's pickled format ('data' object array); loading it runs "
            "pickle. Pass allow_pickle=True only if you trust the file, or re-export it with "
            "`xdistill export-gt`.")
    with np.load(path, allow_pickle=True) as npz:
        data = npz["data"]
    depths = [np.asarray(d, np.float32) for d in data]
    return depths, [""] * len(depths)
