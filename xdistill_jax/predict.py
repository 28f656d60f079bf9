"""Depth for the user's own images: `predict_paths(model, inputs, out_dir, scale=None)`.

Inputs are image files and folders of images (a video: extract its frames into a folder first,
e.g. `ffmpeg -i clip.mp4 frames/%06d.png`). As Monodepth2's test_simple.py: each image is resized
to the training size with PIL LANCZOS, the depth net predicts the disparity, and the result is
resized back to the image's own size (bilinear, half-pixel centres, as F.interpolate with
align_corners=False). Per image `NAME` (relative names are kept for folders) it writes
- `NAME_depth.npy`: float32 (H,W) depth at the input's size,
    with `scale` given: metres = scale / scaled_disp (5.4 for stereo-trained models, or a median
      ratio measured on GT for monocular ones);
    without: relative depth = 1 / scaled_disp, in the units of the training min/max depth
      (`disp_to_depth`), correct only up to an unknown scale for monocular models;
- `NAME_disp.png`: the disparity mapped with magma, normalised like test_simple (vmin = the map's
  minimum, vmax = its 95th percentile, clipped).
Unreadable inputs raise ValueError naming the file before anything is computed.
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np

from xdistill_jax import evaluation
from xdistill_jax.inference import DepthModel, DepthPredictor, batched, load_resized

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")

# matplotlib's magma (CC0, BIDS colormap data) sampled at entries 0, 16, ..., 240 and 255 of its
# 256-entry table; linear interpolation between them stays within 1/255 of the full table.
_MAGMA_AT = np.array([0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 255]) / 255.0
_MAGMA = np.array([
    [0.001462, 0.000466, 0.013866], [0.039608, 0.031090, 0.133515], [0.113094, 0.065492, 0.276784],
    [0.211718, 0.061992, 0.418647], [0.316654, 0.071690, 0.485380], [0.414709, 0.110431, 0.504662],
    [0.512831, 0.148179, 0.507648], [0.613617, 0.181811, 0.498536], [0.716387, 0.214982, 0.475290],
    [0.816914, 0.255895, 0.436461], [0.904281, 0.319610, 0.388137], [0.960949, 0.418323, 0.359630],
    [0.986700, 0.535582, 0.382210], [0.996096, 0.653659, 0.446213], [0.996898, 0.769591, 0.534892],
    [0.992440, 0.884330, 0.640099], [0.987053, 0.991438, 0.749504],
])


def magma(x: np.ndarray) -> np.ndarray:
    """Values in [0,1] (clipped) -> (..., 3) float64 RGB in [0,1] on the magma colormap."""
    x = np.clip(np.asarray(x, np.float64), 0.0, 1.0)
    return np.stack([np.interp(x, _MAGMA_AT, _MAGMA[:, c]) for c in range(3)], axis=-1)


def colorize_disparity(disp: np.ndarray) -> np.ndarray:
    """(H,W) disparity -> (H,W,3) uint8 magma, vmin = min, vmax = 95th percentile (test_simple)."""
    disp = np.asarray(disp, np.float64)
    vmin, vmax = float(disp.min()), float(np.percentile(disp, 95))
    x = (disp - vmin) / (vmax - vmin) if vmax > vmin else np.zeros_like(disp)
    # matplotlib's to_rgba(...) * 255 then astype(uint8) truncates; we round instead.
    return (magma(x) * 255.0 + 0.5).astype(np.uint8)


def collect_inputs(inputs: Sequence, out_dir=None) -> list[tuple[pathlib.Path, str]]:
    """(image path, output stem) for files and folders (searched recursively, sorted).

    A folder's hidden files and the `*_disp.png` under `out_dir` are left out: predictions
    written into (a folder under) an input folder, as Monodepth2's test_simple writes next to
    its inputs, are not inputs of the next run. A missing input, an empty folder, a file that is
    not an image and a name used twice raise ValueError naming it.
    """
    out, seen = [], {}
    skip = pathlib.Path(out_dir).resolve() if out_dir is not None else None

    def wanted(p: pathlib.Path, root: pathlib.Path) -> bool:
        if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
            return False
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            return False
        return skip is None or not (p.name.endswith("_disp.png") and p.resolve().is_relative_to(skip))

    for item in inputs:
        path = pathlib.Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if wanted(p, path))
            if not files:
                raise ValueError(f"input folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            pairs = [(p, str(p.relative_to(path).with_suffix(""))) for p in files]
        elif path.is_file():
            pairs = [(path, path.stem)]
        else:
            raise ValueError(f"input not found: {path}")
        for p, stem in pairs:
            if stem in seen:
                raise ValueError(f"inputs {seen[stem]} and {p} would both write '{stem}_depth.npy'; "
                                 "predict them into different --out folders")
            seen[stem] = p
            out.append((p, stem))
    return out


def _save_atomic(path: pathlib.Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def depth_at_size(scaled_disp: np.ndarray, height: int, width: int, scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Network-size scaled disparity -> (disparity, depth) at (height, width); see the module doc."""
    disp = evaluation.resize_linear(scaled_disp, height, width)
    depth = (1.0 if scale is None else float(scale)) / disp
    return disp, depth.astype(np.float32)


def predict_paths(model: DepthModel, inputs: Sequence, out_dir, *, scale: float | None = None,
                  batch_size: int = 8, show_progress: bool = True) -> list[pathlib.Path]:
    """Predict every input image; returns the written `.npy` paths (PNG next to each)."""
    from PIL import Image

    from data_pipelines.kitti.triplets import check_image_mode

    if scale is not None and not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"--scale must be a finite number > 0, got {scale}")
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    items = collect_inputs(inputs, out_dir)
    for path, _ in items:  # name an unreadable image before any compute: decoded in full, as a
        try:               # truncated JPEG passes PIL's verify()
            with Image.open(path) as im:
                im.load()
                check_image_mode(im, path)
        except ValueError:
            raise
        except Exception as e:  # PIL raises several types
            raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    predictor = DepthPredictor(model, max(1, min(batch_size, len(items))))
    written = []
    load = lambda item: load_resized(item[0], model.height, model.width)  # noqa: E731
    for chunk, loaded in batched(items, predictor.batch_size, load, desc="predict", show_progress=show_progress):
        disp = predictor.predict(np.stack([img for img, _ in loaded]))
        for (path, stem), (_, (h, w)), d in zip(chunk, loaded, disp):
            full_disp, depth = depth_at_size(d, h, w, scale)
            npy = out_dir / f"{stem}_depth.npy"
            _save_atomic(npy, lambda p: np.save(p, depth))
            png = out_dir / f"{stem}_disp.png"
            _save_atomic(png, lambda p: Image.fromarray(colorize_disparity(full_disp)).save(p, format="PNG"))
            written.append(npy)
    return written

