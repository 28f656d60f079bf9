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
import re
import zipfile
import zlib
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

    Each map comes back as (H,W) float32. Monodepth2's own `gt_depths.npz` (a pickled object array
    under `data`, no file names) is read only with `allow_pickle=True`; a `data` array of
    same-size maps, which numpy stores as a plain (N,H,W) number array without pickle, is read
    without it. Their lines come back as empty strings.

    Whatever is wrong with the file raises ValueError naming it and what was expected: not an .npz
    (a .npy, text, empty, truncated or damaged archive), arrays other than `depth_NNNNN` + `files`
    or `data`, a missing entry number, or an entry that is not a 2-D map of numbers (named by its
    index and, where the file has them, its split line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file not found: {path}")
    npz = _open_npz(path)
    with npz:
        keys = set(npz.files)
        depth_keys = sorted(k for k in keys if k.startswith("depth_"))
        if "data" in keys and not depth_keys:
            if keys != {"data"}:
                raise ValueError(f"{path}: unexpected arrays {sorted(keys - {'data'})} beside Monodepth2's "
                                 "'data' array, which holds every depth map")
            return _monodepth2_data(path, npz, allow_pickle)
        if not depth_keys:
            raise ValueError(f"{path}: neither depth_NNNNN arrays nor Monodepth2's 'data' array inside "
                             f"(arrays: {sorted(keys)}); expected a file written by `xdistill export-gt`")
        stray = sorted(k for k in keys - {"files"} if not re.fullmatch(r"depth_[0-9]+", k))
        if stray:
            raise ValueError(f"{path}: unexpected arrays {stray}; an `xdistill export-gt` file holds "
                             "depth_NNNNN (one per split line) and files only")
        if "files" not in keys:
            raise ValueError(f"{path}: has depth_* arrays but no 'files' array")
        by_number = {}
        for k in depth_keys:
            if int(k[6:]) in by_number:
                raise ValueError(f"{path}: arrays {by_number[int(k[6:])]} and {k} are both entry {int(k[6:])}")
            by_number[int(k[6:])] = k
        if sorted(by_number) != list(range(len(by_number))):
            missing = min(set(range(len(by_number))) - set(by_number))
            raise ValueError(f"{path}: depth_{missing:05d} is missing (arrays up to depth_{max(by_number):05d}, "
                             f"{len(by_number)} in all): entries are numbered from 0, one per split line")
        files = _read_member(path, npz, "files")
        if files.ndim != 1 or files.dtype.kind not in "US":
            raise ValueError(f"{path}: 'files' is {files.dtype} {files.shape}, expected a 1-D array of split lines")
        files = [str(f) for f in files]
        if len(files) != len(by_number):
            raise ValueError(f"{path}: {len(by_number)} depth maps but {len(files)} file names")
        depths = [_depth_map(path, i, _read_member(path, npz, by_number[i]), files[i])
                  for i in range(len(by_number))]
        return depths, files


# what numpy and zipfile raise on a file that is not an .npz, or is one cut short or damaged
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    expected = "expected an .npz archive written by `xdistill export-gt` (or Monodepth2's gt_depths.npz)"
    with open(path, "rb") as f:
        head = f.read(8)
    # Told apart by their first bytes, so that nothing else reaches np.load, which would take any
    # other file for a pickle (and, refusing it, say so without naming the file).
    if not head:
        raise ValueError(f"{path}: is empty; {expected}")
    if head.startswith(b"\x93NUMPY"):
        raise ValueError(f"{path}: is a single .npy array, not an .npz archive; {expected}")
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise ValueError(f"{path}: is neither an .npz archive nor a numpy array (it starts with {head!r}); {expected}")
    try:
        return np.load(path, allow_pickle=False)
    except _UNREADABLE as e:  # a zip cut short (no central directory) or damaged
        raise ValueError(f"{path}: cannot be read as an .npz archive, truncated or damaged? "
                         f"({type(e).__name__}: {e}); {expected}") from e


def _read_member(path: Path, npz, key: str) -> np.ndarray:
    try:
        return npz[key]
    except _UNREADABLE as e:  # a damaged member (bad CRC, cut deflate stream), or an object array
        raise ValueError(f"{path}: array '{key}' cannot be read ({type(e).__name__}: {e})") from e


def _member_is_object_array(npz, key: str) -> bool:
    """Whether npz[key] is a pickled object array, from its .npy header alone (nothing unpickled)."""
    from numpy.lib import format as npy_format

    with npz.zip.open(f"{key}.npy") as f:
        version = npy_format.read_magic(f)
        read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        _, _, dtype = read(f)
    return dtype.hasobject


def _depth_map(path: Path, i: int, depth, line: str = "") -> np.ndarray:
    """Entry i as (H,W) float32, or ValueError naming the file, the entry and its split line."""
    name = f"entry {i}" + (f" (split line {i + 1}: '{line}')" if line else "")
    depth = np.asarray(depth)
    if depth.dtype.kind not in "biuf":
        raise ValueError(f"{path}: {name} is of type {depth.dtype}, expected a depth map of numbers")
    if depth.ndim != 2 or 0 in depth.shape:
        raise ValueError(f"{path}: {name} has shape {depth.shape}, expected a 2-D (H,W) depth map")
    if depth.dtype.kind == "f" and np.isinf(depth).any():
        # eigen_benchmark scores every gt > 0: an infinite depth would make every mean inf or NaN
        row, col = (int(v) for v in np.argwhere(np.isinf(depth))[0])
        raise ValueError(f"{path}: {name} holds an infinite depth (first at row {row}, column {col}); "
                         "a pixel without depth is 0")
    return depth.astype(np.float32)


def _monodepth2_data(path: Path, npz, allow_pickle: bool) -> tuple[list[np.ndarray], list[str]]:
    """Monodepth2's `data` array: (N,H,W) numbers, or an object array of (H,W) maps (pickled)."""
    try:
        pickled = _member_is_object_array(npz, "data")
    except _UNREADABLE as e:
        raise ValueError(f"{path}: array 'data' cannot be read ({type(e).__name__}: {e})") from e
    if not pickled:
        # same-size maps: np.array made a plain number array, stored without pickle
        data = _read_member(path, npz, "data")
        if data.ndim != 3:
            raise ValueError(f"{path}: 'data' has shape {data.shape}, expected (N,H,W) depth maps")
        return [_depth_map(path, i, d) for i, d in enumerate(data)], [""] * len(data)
    if not allow_pickle:
        raise ValueError(
            f"{path} is in Monodepth2's pickled format ('data' object array); loading it runs "
            "pickle. Only if you trust the file: `xdistill eval --allow-pickle` (allow_pickle=True "
            "in Python) reads it; or re-export it with `xdistill export-gt`, which writes no pickle "
            "(what config.data.val_gt_depth needs).")
    with np.load(path, allow_pickle=True) as trusted:
        data = _read_member(path, trusted, "data")
    if data.ndim != 1:
        raise ValueError(f"{path}: 'data' is an object array of shape {data.shape}, expected one (H,W) map per entry")
    depths = [_depth_map(path, i, d) for i, d in enumerate(data)]
    return depths, [""] * len(depths)
