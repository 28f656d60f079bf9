"""Depth evaluation of a model on KITTI (Eigen / Eigen benchmark) and Make3D test sets.

KITTI (Monodepth2's evaluate_depth.py, reference §6.1): each split line's camera image is read
from the raw layout (`DATA/FOLDER/image_0{2,3}/data/%010d.png`, or `.jpg`), resized to the
training size with PIL LANCZOS, run through the depth net (jitted, batches padded so every image
counts once), and scored against the GT file written by `xdistill export-gt`, whose stored split
lines must equal the split file's:
- `eigen`: Garg crop, 1e-3 < gt < 80, per-image median scaling (mono) then clamp to [1e-3, 80]
  (`evaluation.eval_eigen_image`, the same function the training loop validates with);
- `eigen_benchmark`: every gt > 0 pixel, no crop, no GT cap; prediction clamped to [1e-3, 80];
- `stereo`: prediction x 5.4, no median scaling; `post_process`: flip averaging.

Make3D (reference §6.6; the authors' script is only partly public, so this is OUR protocol):
the 134 (here: all listed) `Test134/img-*.jpg` images are centre-cropped to 2:1 (cols : rows,
1704 x 852 for the real 2272 x 1704 portraits: rows [(H - W/2)//2, +W/2)), resized to the
training size with LANCZOS; the laser depth `Position3DGrid[:, :, 3]` (55 x 305) is centre
cropped to its 21 middle rows [17, 38); the predicted scaled disparity is resized bilinearly to
21 x 305 and inverted; pixels with 0 < gt < 70 m count (70 m cap, the usual choice; the
scanner's 81.92 m saturation is excluded with it); per-image median scaling; prediction
clamped to [1e-3, 70]. Metrics: the seven standard ones (rmse_log with the natural log, as on
KITTI) plus `log10 = sqrt(mean((log10 gt - log10 pred)^2))`, the authors' Make3D compute_errors'
"rmse_log" (it takes log10) and so the "log10" column of Monodepth2's and X-Distill's Make3D
table, and `log10_abs = mean |log10 gt - log10 pred|`, the classic Saxena / Eigen log10 error
(reported as `log10` until 2026-12-07). Final figures are means over images.

The GT is checked when it is read, before any inference: every entry a 2-D map, each with at
least one pixel the protocol scores. Monodepth2 would score an entry without one as NaN (the
median and means of no pixels), and so every mean; here it is a ValueError naming the file, the
entry and its split line (Make3D: the depth file and image).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import pathlib
from typing import Sequence

import numpy as np

from xdistill_jax import evaluation
from xdistill_jax.inference import DepthModel, DepthPredictor, batched, load_resized

KITTI_PROTOCOLS = ("eigen", "eigen_benchmark")
MAKE3D_MAX_DEPTH = 70.0
MAKE3D_GT_ROWS = 21


@dataclasses.dataclass
class EvalResult:
    """`summary`: means over images (+ num_images, ratio_median/ratio_std with median scaling);
    `rows`: one dict per image (id, metrics, ratio)."""

    summary: dict
    rows: list[dict]
    metric_keys: tuple[str, ...]


def splits_dir() -> pathlib.Path:
    """`data_pipelines/kitti/splits`, the split lists shipped as package data."""
    import data_pipelines.kitti

    return pathlib.Path(data_pipelines.kitti.__file__).resolve().parent / "splits"


def shipped_split_file(split: str) -> pathlib.Path:
    """The Eigen / Eigen benchmark test list shipped with the package."""
    if split not in KITTI_PROTOCOLS:
        raise ValueError(f"--split: no shipped list for {split!r}; expected one of {KITTI_PROTOCOLS}")
    return splits_dir() / split / "test_files.txt"


def load_matching_gt(gt_path, lines: Sequence, allow_pickle: bool = False, *, protocol: str | None = None,
                     crop: str | None = "garg") -> list[np.ndarray]:
    """GT depth maps of `gt_path` (export-gt format), checked entry by entry against the split lines.

    A count mismatch, or the first stored line that differs from the split's, raises ValueError
    naming both. Monodepth2's pickled file has no names: only its count is checked. Every entry
    is a 2-D (H,W) map (`load_gt_depths` checks). With `protocol` ("eigen" with `crop`, or
    "eigen_benchmark"), an entry without a single pixel that protocol scores raises ValueError
    naming the entry and its split line (see the module docstring).
    """
    from data_pipelines.kitti.export_gt import load_gt_depths

    depths, names = load_gt_depths(gt_path, allow_pickle=allow_pickle)
    wanted = [str(line) for line in lines]
    for i, (have, want) in enumerate(zip(names, wanted)):
        if have and have != want:
            raise ValueError(f"--gt {gt_path}: entry {i} is '{have}' but split line {i + 1} is '{want}' "
                             "(export the GT with the same split file)")
    if len(depths) != len(wanted):
        raise ValueError(f"--gt {gt_path}: {len(depths)} depth maps for a split of {len(wanted)} lines"
                         + (f"; first unmatched split line {len(depths) + 1}: '{wanted[len(depths)]}'"
                            if len(depths) < len(wanted) else ""))
    if protocol is not None:
        for i, (depth, want) in enumerate(zip(depths, wanted)):
            if not kitti_valid_mask(depth, protocol, crop).any():
                scored = ("0 < gt" if protocol == "eigen_benchmark" else
                          f"{evaluation.MIN_DEPTH} < gt < {evaluation.MAX_DEPTH} m"
                          + (" inside the Garg crop" if crop == "garg" else ""))
                raise ValueError(f"--gt {gt_path}: entry {i} (split line {i + 1}: '{want}') has no pixel "
                                 f"with {scored} ({protocol}); Monodepth2 would score it NaN and every "
                                 "mean with it: leave the frame out of the split, or export its GT again")
    return depths


def kitti_valid_mask(gt_depth, protocol: str, crop: str | None = "garg") -> np.ndarray:
    """(H,W) bool: the pixels `protocol` scores (eigen: 1e-3 < gt < 80 [& Garg crop]; eigen_benchmark: gt > 0)."""
    if protocol == "eigen":
        return evaluation.eigen_mask(gt_depth, crop=crop)
    if protocol == "eigen_benchmark":
        return np.asarray(gt_depth) > 0
    raise ValueError(f"protocol: expected one of {KITTI_PROTOCOLS}, got {protocol!r}")


def kitti_image(data_dir, line) -> pathlib.Path:
    """The raw-layout camera image of a split line (.png, else .jpg as Monodepth2's converted copies)."""
    from data_pipelines.kitti import raw

    path = raw.image_path(data_dir, line)
    if not path.is_file():
        jpg = path.with_suffix(".jpg")
        if jpg.is_file():
            return jpg
        raise ValueError(f"image of split line '{line}' not found: {path} (nor {jpg.name})")
    return path


def eval_benchmark_image(gt_depth, pred_disp, *, stereo: bool = False):
    """Monodepth2's non-Eigen branch: mask gt > 0 (no crop, no GT cap); returns (errors, ratio)."""
    gt = np.asarray(gt_depth, np.float64)
    if gt.ndim != 2:
        raise ValueError(f"gt_depth: expected a 2-D (H,W) depth map, got shape {gt.shape}")
    h, w = gt.shape
    pred = 1.0 / evaluation.resize_linear(pred_disp, h, w)
    mask = gt > 0
    if not mask.any():
        raise ValueError("gt_depth: no pixel with gt > 0")
    gt_v, pred_v = gt[mask], pred[mask] * (evaluation.STEREO_SCALE_FACTOR if stereo else 1.0)
    ratio = None
    if not stereo:
        ratio = float(np.median(gt_v) / np.median(pred_v))
        pred_v = pred_v * ratio
    pred_v = np.clip(pred_v, evaluation.MIN_DEPTH, evaluation.MAX_DEPTH)
    return evaluation.compute_depth_errors(gt_v, pred_v), ratio


def score_kitti_image(gt_depth, pred_disp, protocol: str, *, stereo: bool = False, crop: str | None = "garg"):
    """(errors, ratio) of one image under `protocol` ("eigen" or "eigen_benchmark")."""
    if protocol == "eigen":
        return evaluation.eval_eigen_image(gt_depth, pred_disp, stereo=stereo, crop=crop)
    if protocol == "eigen_benchmark":
        return eval_benchmark_image(gt_depth, pred_disp, stereo=stereo)
    raise ValueError(f"protocol: expected one of {KITTI_PROTOCOLS}, got {protocol!r}")


def make_result(per_image: list, ids: list[str], keys: Sequence[str]) -> EvalResult:
    """The summary (means, median-scaling ratios) and per-image rows named by `ids` of scored images."""
    summary = evaluation.aggregate(per_image)
    for k in keys:
        if k not in summary:
            summary[k] = float(np.mean([e[k] for e, _ in per_image]))
    rows = [dict(index=i, id=name, **{k: e[k] for k in keys}, ratio=r)
            for i, (name, (e, r)) in enumerate(zip(ids, per_image))]
    return EvalResult(summary, rows, tuple(keys))


def evaluate_kitti(model: DepthModel, data_dir, split_file, gt_path, *, protocol: str = "eigen",
                   stereo: bool = False, post_process: bool = False, batch_size: int = 16,
                   crop: str | None = "garg", allow_pickle: bool = False,
                   show_progress: bool = True) -> EvalResult:
    """Evaluate `model` on a KITTI split (see the module docstring). `crop` applies to "eigen" only."""
    from data_pipelines.kitti import raw

    if protocol not in KITTI_PROTOCOLS:
        raise ValueError(f"--split: expected one of {KITTI_PROTOCOLS}, got {protocol!r}")
    lines = raw.read_split_file(split_file)
    if not lines:
        raise ValueError(f"{split_file}: split file has no lines")
    # the GT's shapes and scored pixels, and every image's presence, are checked before computing
    gt = load_matching_gt(gt_path, lines, allow_pickle=allow_pickle, protocol=protocol, crop=crop)
    paths = [kitti_image(data_dir, line) for line in lines]
    predictor = DepthPredictor(model, batch_size, post_process)
    per_image = []
    load = lambda p: load_resized(p, model.height, model.width)[0]  # noqa: E731
    for chunk, images in batched(list(range(len(lines))), predictor.batch_size,
                                 lambda i: load(paths[i]), desc="eval", show_progress=show_progress):
        disp = predictor.predict(np.stack(images))
        for j, i in enumerate(chunk):
            per_image.append(score_kitti_image(gt[i], disp[j], protocol, stereo=stereo, crop=crop))
    return make_result(per_image, [str(line) for line in lines], evaluation.METRIC_KEYS)


# ------------------------------------------------------------------------------------------ Make3D


def make3d_crop_rows(height: int, width: int) -> tuple[int, int]:
    """Rows [r0, r1) of the 2:1 (cols : rows) centre crop of a portrait Make3D image."""
    rows = width // 2
    if rows > height:
        raise ValueError(f"Make3D image {height}x{width} (rows x cols) is too wide for a 2:1 centre crop")
    r0 = (height - rows) // 2
    return r0, r0 + rows


def make3d_gt_crop(depth: np.ndarray) -> np.ndarray:
    """The 21 central rows of a (55, 305) laser depth grid: rows [17, 38)."""
    r0 = (depth.shape[0] - MAKE3D_GT_ROWS) // 2
    return depth[r0:r0 + MAKE3D_GT_ROWS]


def make3d_valid_mask(gt_depth, max_depth: float = MAKE3D_MAX_DEPTH) -> np.ndarray:
    """(h,w) bool: the laser depths the Make3D protocol scores, 0 < gt < max_depth."""
    gt = np.asarray(gt_depth)
    return (gt > 0) & (gt < max_depth)


def score_make3d_image(gt_depth, pred_disp, max_depth: float = MAKE3D_MAX_DEPTH):
    """(errors, ratio) of one Make3D image: gt (h,w) metres, already cropped to 21 rows; pred_disp
    any (h',w') scaled disparity. errors: evaluation.MAKE3D_METRIC_KEYS (see the module doc)."""
    gt = np.asarray(gt_depth, np.float64)
    if gt.ndim != 2:
        raise ValueError(f"gt_depth: expected a 2-D (h,w) depth map, got shape {gt.shape}")
    h, w = gt.shape
    pred = 1.0 / evaluation.resize_linear(pred_disp, h, w)
    mask = make3d_valid_mask(gt, max_depth)
    if not mask.any():
        raise ValueError(f"gt_depth: no laser depth in (0, {max_depth}) m")
    gt_v, pred_v = gt[mask], pred[mask]
    ratio = float(np.median(gt_v) / np.median(pred_v))
    pred_v = np.clip(pred_v * ratio, evaluation.MIN_DEPTH, max_depth)
    errors = evaluation.compute_depth_errors(gt_v, pred_v)
    errors.update(evaluation.make3d_log10_errors(gt_v, pred_v))
    return errors, ratio


def load_make3d_gts(items, max_depth: float = MAKE3D_MAX_DEPTH) -> list[np.ndarray]:
    """The (21, 305) cropped laser depths of Make3D `items` (reader.Make3DItem), before any inference.

    A grid of another shape is refused by `reader.load_depth`; a crop without a single depth in
    (0, max_depth) m raises ValueError naming the depth file and its image (the authors' median
    scaling of no pixels would score it NaN, and every mean with it).
    """
    from data_pipelines.make3d.reader import GRID_SHAPE, load_depth

    r0 = (GRID_SHAPE[0] - MAKE3D_GT_ROWS) // 2
    gts = []
    for i, item in enumerate(items):
        gt = make3d_gt_crop(load_depth(item.depth_path))
        if not make3d_valid_mask(gt, max_depth).any():
            raise ValueError(f"{item.depth_path}: no laser depth in (0, {max_depth}) m in rows "
                             f"[{r0}, {r0 + MAKE3D_GT_ROWS}) of Position3DGrid[:, :, 3] (test image {i}, "
                             f"{item.image_path.name}); its median scaling would score NaN: leave it out "
                             "of make3d_test_files.txt")
        gts.append(gt)
    return gts


def _load_make3d_image(path, height: int, width: int) -> np.ndarray:
    from data_pipelines.kitti.triplets import load_rgb, resize_lanczos

    image = load_rgb(pathlib.Path(path))
    r0, r1 = make3d_crop_rows(image.height, image.width)
    image = image.crop((0, r0, image.width, r1))
    return np.asarray(resize_lanczos(image, height, width), np.uint8)


def evaluate_make3d(model: DepthModel, make3d_dir, *, batch_size: int = 16, post_process: bool = False,
                    max_depth: float = MAKE3D_MAX_DEPTH, show_progress: bool = True) -> EvalResult:
    """Evaluate `model` on a Make3D-layout test set (Test134/, Gridlaserdata/) with our protocol."""
    from data_pipelines.make3d.reader import list_test_set

    items = list_test_set(make3d_dir)
    gts = load_make3d_gts(items, max_depth)  # bad laser files fail here, before inference
    predictor = DepthPredictor(model, batch_size, post_process)
    per_image = []
    for chunk, images in batched(list(range(len(items))), predictor.batch_size,
                                 lambda i: _load_make3d_image(items[i].image_path, model.height, model.width),
                                 desc="make3d", show_progress=show_progress):
        disp = predictor.predict(np.stack(images))
        for j, i in enumerate(chunk):
            per_image.append(score_make3d_image(gts[i], disp[j], max_depth))
    return make_result(per_image, [item.image_path.name for item in items], evaluation.MAKE3D_METRIC_KEYS)


# ------------------------------------------------------------------------------------------ output


def format_table(summary: dict, keys: Sequence[str]) -> str:
    """The published-table layout: a header row of metric names, a row of values (3 decimals)."""
    head = " | ".join(f"{k:>8}" for k in keys)
    vals = " | ".join(f"{summary[k]:8.3f}" for k in keys)
    return f"{head}\n{vals}"


def _atomic_write(path: pathlib.Path, text: str) -> None:
    """Write `text` to `path` through a hidden temporary file; no part is left on failure (an
    OSError naming the file is raised)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def write_result(out_dir, name: str, result: EvalResult, settings: dict | None = None) -> tuple[pathlib.Path, pathlib.Path]:
    """Write `out_dir/<name>.json` (metrics, num_images, settings) and `<name>.csv` (per image), atomically."""
    out_dir = pathlib.Path(out_dir)
    summary = {k: (int(v) if k == "num_images" else float(v)) for k, v in result.summary.items()}
    if settings:
        summary["settings"] = settings
    json_path = out_dir / f"{name}.json"
    csv_path = out_dir / f"{name}.csv"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["index", "id", *result.metric_keys, "ratio"], lineterminator="\n")
    writer.writeheader()
    for row in result.rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    _atomic_write(csv_path, buf.getvalue())
    _atomic_write(json_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return json_path, csv_path
