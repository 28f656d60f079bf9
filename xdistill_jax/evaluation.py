"""Depth evaluation (numpy, float64): the seven standard metrics and the KITTI Eigen protocol.

Reproduces Monodepth2's evaluate_depth.py per image (reference §6.1): the predicted *scaled
disparity* is resized to the ground-truth size (bilinear like cv2.resize INTER_LINEAR), inverted to
depth, masked to min_depth < gt < max_depth inside the Garg crop, multiplied by a fixed scale factor
(5.4 for stereo models), median-scaled per image (mono), clamped to [min_depth, max_depth], and
scored. The final figures are means over images of the per-image metrics.

`rmse_log` is the natural-log RMS of every split, as Monodepth2 computes it. Make3D adds two log10
metrics (`make3d_log10_errors`): `log10`, the RMS of the log10 differences that the authors'
Make3D script (reference §6.6) computes and Monodepth2's Make3D table prints as "log10", and
`log10_abs`, the classic mean absolute log10 difference of Saxena et al. / Eigen et al.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

METRIC_KEYS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "a1", "a2", "a3")
MAKE3D_METRIC_KEYS = METRIC_KEYS + ("log10", "log10_abs")
MIN_DEPTH = 1e-3
MAX_DEPTH = 80.0
STEREO_SCALE_FACTOR = 5.4  # KITTI baseline 0.54 m over Monodepth2's nominal training baseline 0.1
GARG_CROP = (0.40810811, 0.99189189, 0.03594771, 0.96405229)  # fractions of (h, h, w, w)


def compute_depth_errors(gt, pred) -> dict:
    """Seven depth metrics between 1-D arrays of valid ground-truth and predicted depths (> 0).

    abs_rel = mean(|gt-pred|/gt), sq_rel = mean((gt-pred)^2/gt), rmse,
    rmse_log = sqrt(mean((ln gt - ln pred)^2)) (natural log, Monodepth2's evaluate_depth.py; the
    Make3D "log10" column is another metric, see `make3d_log10_errors`),
    a1/a2/a3 = fraction with max(gt/pred, pred/gt) < 1.25, 1.25^2, 1.25^3. Floats out.
    """
    gt, pred = _valid_pair(gt, pred)
    thresh = np.maximum(gt / pred, pred / gt)
    diff = gt - pred
    return {
        "abs_rel": float(np.mean(np.abs(diff) / gt)),
        "sq_rel": float(np.mean(diff**2 / gt)),
        "rmse": float(np.sqrt(np.mean(diff**2))),
        "rmse_log": float(np.sqrt(np.mean((np.log(gt) - np.log(pred)) ** 2))),
        "a1": float(np.mean(thresh < 1.25)),
        "a2": float(np.mean(thresh < 1.25**2)),
        "a3": float(np.mean(thresh < 1.25**3)),
    }


def _valid_pair(gt, pred) -> tuple[np.ndarray, np.ndarray]:
    gt = np.asarray(gt, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if gt.ndim != 1 or pred.shape != gt.shape:
        raise ValueError(f"gt/pred: expected two 1-D arrays of equal length, got {gt.shape} and {pred.shape}")
    if gt.size == 0:
        raise ValueError("gt/pred: no valid pixels to evaluate")
    if np.any(gt <= 0) or np.any(pred <= 0):
        raise ValueError("gt/pred: depths must be > 0 (mask and clamp before calling)")
    return gt, pred


def make3d_log10_errors(gt, pred) -> dict:
    """The two log10 metrics of Make3D tables, between 1-D arrays of valid depths (> 0).

    log10 = sqrt(mean((log10 gt - log10 pred)^2)): what the authors' Make3D script's compute_errors
      returns as rmse_log (it takes log10 there; reference §6.6), i.e. the "log10" column of
      Monodepth2's and X-Distill's Make3D table (Monodepth2 M: 0.163).
    log10_abs = mean |log10 gt - log10 pred|: the classic log10 error of Saxena et al. and Eigen
      et al. (what this project reported as `log10` until 2026-12-07).
    """
    gt, pred = _valid_pair(gt, pred)
    d = np.log10(gt) - np.log10(pred)
    return {"log10": float(np.sqrt(np.mean(d**2))), "log10_abs": float(np.mean(np.abs(d)))}


def garg_crop_mask(h: int, w: int) -> np.ndarray:
    """(h,w) bool mask of the Garg crop: rows [int(0.408 h), int(0.992 h)), cols [int(0.036 w), int(0.964 w))."""
    r0, r1, c0, c1 = garg_crop_bounds(h, w)
    mask = np.zeros((h, w), dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


def garg_crop_bounds(h: int, w: int) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1) of the Garg crop (int32 truncation, as evaluate_depth.py)."""
    frac = np.array(GARG_CROP) * np.array([h, h, w, w])
    return tuple(int(v) for v in frac.astype(np.int32))


def _linear_taps(out_size: int, in_size: int):
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    src = np.clip(src, 0.0, in_size - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, src - i0


def resize_linear(img, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of a 2-D map like cv2.resize(INTER_LINEAR): half-pixel centres, edge clamp,
    no antialiasing (a downscale reads only the two nearest samples per axis). float64 out."""
    img = np.asarray(img, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"img: expected a 2-D (h,w) map, got shape {img.shape}")
    if img.shape == (out_h, out_w):
        return img
    c0, c1, cw = _linear_taps(out_w, img.shape[1])
    r0, r1, rw = _linear_taps(out_h, img.shape[0])
    cols = img[:, c0] * (1.0 - cw) + img[:, c1] * cw
    return cols[r0] * (1.0 - rw)[:, None] + cols[r1] * rw[:, None]


def eigen_mask(gt, *, min_depth: float = MIN_DEPTH, max_depth: float = MAX_DEPTH,
               crop: str | None = "garg") -> np.ndarray:
    """(H,W) bool: the pixels the Eigen protocol scores, min_depth < gt < max_depth [& Garg crop]."""
    gt = np.asarray(gt)
    if crop not in ("garg", None):
        raise ValueError(f"crop: expected 'garg' or None, got {crop!r}")
    mask = (gt > min_depth) & (gt < max_depth)
    if crop == "garg":
        mask &= garg_crop_mask(*gt.shape)
    return mask


def eval_eigen_image(
    gt_depth,
    pred_disp,
    *,
    stereo: bool = False,
    min_depth: float = MIN_DEPTH,
    max_depth: float = MAX_DEPTH,
    crop: str | None = "garg",
    median_scaling: bool | None = None,
    scale_factor: float | None = None,
):
    """Score one image by the Eigen protocol. Returns (errors dict, ratio or None).

    gt_depth: (H,W) ground-truth depth in metres (0 = no measurement).
    pred_disp: (h,w) predicted *scaled* disparity (disp_to_depth(...)[0]), any size; resized to (H,W).
    stereo: Monodepth2's --eval_stereo: scale_factor defaults to 5.4 and median scaling to off.
    crop: "garg" (Eigen split) or None (no crop).
    median_scaling: per-image ratio median(gt)/median(pred) (default: on for mono, off for stereo).
    The ratio used is returned (None without median scaling).
    """
    gt = np.asarray(gt_depth, dtype=np.float64)
    disp = np.asarray(pred_disp)
    if gt.ndim != 2:
        raise ValueError(f"gt_depth: expected a 2-D (H,W) depth map, got shape {gt.shape}")
    if disp.ndim != 2:
        raise ValueError(f"pred_disp: expected a 2-D (h,w) disparity map, got shape {disp.shape}")
    if crop not in ("garg", None):
        raise ValueError(f"crop: expected 'garg' or None, got {crop!r}")
    if scale_factor is None:
        scale_factor = STEREO_SCALE_FACTOR if stereo else 1.0
    if median_scaling is None:
        median_scaling = not stereo
    h, w = gt.shape
    pred_depth = 1.0 / resize_linear(disp, h, w)
    mask = eigen_mask(gt, min_depth=min_depth, max_depth=max_depth, crop=crop)
    if not mask.any():
        raise ValueError(f"gt_depth: no pixel with {min_depth} < gt < {max_depth} m"
                         + (" inside the Garg crop" if crop == "garg" else ""))
    gt_v = gt[mask]
    pred_v = pred_depth[mask] * scale_factor
    ratio = None
    if median_scaling:
        ratio = float(np.median(gt_v) / np.median(pred_v))
        pred_v = pred_v * ratio
    pred_v = np.clip(pred_v, min_depth, max_depth)
    return compute_depth_errors(gt_v, pred_v), ratio


def aggregate(results: Iterable[tuple[dict, float | None]]) -> dict:
    """Mean of per-image metrics over images; results are (errors, ratio) pairs from eval_eigen_image.

    Adds num_images, and with median scaling ratio_median = median(ratios) and
    ratio_std = std(ratios / ratio_median) (population std, as Monodepth2 prints).
    """
    results = list(results)
    if not results:
        raise ValueError("results: no images to aggregate")
    out = {k: float(np.mean([errors[k] for errors, _ in results])) for k in METRIC_KEYS}
    out["num_images"] = len(results)
    ratios = np.array([r for _, r in results if r is not None], dtype=np.float64)
    if ratios.size:
        med = float(np.median(ratios))
        out["ratio_median"] = med
        out["ratio_std"] = float(np.std(ratios / med))
    return out


def post_process_disparity(disp, disp_flipped):
    """Monodepth2's flip post-processing (reference §6.1).

    disp: (..., H, W) prediction for the image; disp_flipped: (..., H, W) prediction for the
    horizontally flipped image, *as the network returned it* (it is flipped back here).
    A trailing channel axis of size 1 ((N,H,W,1)) is accepted on both. The left 5% of columns
    take the flipped prediction, the right 5% the plain one, with a 5% linear ramp, and the mean
    elsewhere. Returns float64 of the input's shape.
    """
    l_disp = np.asarray(disp, dtype=np.float64)
    r_disp = np.asarray(disp_flipped, dtype=np.float64)
    if l_disp.shape != r_disp.shape:
        raise ValueError(f"disp/disp_flipped: shapes differ: {l_disp.shape} vs {r_disp.shape}")
    channel = l_disp.ndim == 4
    if channel:
        if l_disp.shape[-1] != 1:
            raise ValueError(f"disp: expected (N,H,W,1) or (...,H,W), got {l_disp.shape}")
        l_disp, r_disp = l_disp[..., 0], r_disp[..., 0]
    if l_disp.ndim < 2:
        raise ValueError(f"disp: expected (...,H,W), got {l_disp.shape}")
    r_disp = r_disp[..., ::-1]
    w = l_disp.shape[-1]
    ramp = np.linspace(0.0, 1.0, w)
    l_mask = 1.0 - np.clip(20.0 * (ramp - 0.05), 0.0, 1.0)
    r_mask = l_mask[::-1]
    out = r_mask * l_disp + l_mask * r_disp + (1.0 - l_mask - r_mask) * 0.5 * (l_disp + r_disp)
    return out[..., None] if channel else out


def errors_as_array(errors: dict, keys: Sequence[str] = METRIC_KEYS) -> np.ndarray:
    """The metrics dict as a float64 vector in Monodepth2's printing order."""
    return np.array([errors[k] for k in keys], dtype=np.float64)
