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
- `NAME_disp.png`: the disparity coloured as test_simple colours it (matplotlib's magma, vmin =
  the map's minimum, vmax = its 95th percentile, clipped; the same bytes as its matplotlib calls).
Images are taken as viewers show them: a JPEG's EXIF orientation (a phone's portrait photo) is
applied first, so the maps line up with the photo (test_simple ignores it; evaluation never reads
EXIF, as KITTI and Make3D carry none).

Which files are inputs: the named image files, and in the named folders (searched recursively,
following symlinked folders; a symlink loop, or a link to nothing named as an image or a
folder, is an error) every file with an image suffix but
- hidden files and folders (`.name`, as this tool's temporary files while it writes), and
- this tool's outputs: a `NAME_disp.png` with `NAME_depth.npy` beside it, the pair it writes,
  wherever it is (so a folder predicted in place, or into a folder inside it, can be predicted
  again); a `NAME_disp.png` of the user's without that `.npy` stays an input.
Naming such an output file explicitly, or an output that would overwrite an input, is an error.
Everything is checked before the model runs or anything is written (`prepare`): ValueError
naming the file or option.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Iterator, Sequence

import numpy as np

from xdistill_jax import evaluation
from xdistill_jax.inference import DepthModel, DepthPredictor, batched, exif_oriented, load_resized
from xdistill_jax.colormap import colorize_disparity
from xdistill_jax.output_dirs import check_output_dir

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")

OUTPUT_SUFFIXES = ("_depth.npy", "_disp.png")  # what predict writes per image


def is_prediction(path: pathlib.Path) -> bool:
    """Whether `path` is a `NAME_disp.png` this tool wrote: its `NAME_depth.npy` lies beside it."""
    name = path.name
    if not name.endswith("_disp.png"):
        return False
    return path.with_name(name[:-len("_disp.png")] + "_depth.npy").is_file()


def _files_under(root: pathlib.Path) -> Iterator[pathlib.Path]:
    """Files under `root`, as reached through it (a symlinked folder's files keep the link's name),
    hidden files and folders left out. Symlinked folders are followed (Path.rglob before Python
    3.13 does not: a folder of links to drives gave nothing); a folder that is one of its own
    ancestors (a symlink loop) or a link to nothing raises ValueError naming the link."""
    stack = [(root, (root.resolve(),))]
    while stack:
        folder, ancestors = stack.pop()
        for entry in folder.iterdir():
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                real = entry.resolve()
                if real in ancestors:
                    raise ValueError(f"input folder {root}: {entry} links back to {real} (a symlink "
                                     "loop); remove the link or name the folders to predict")
                stack.append((entry, ancestors + (real,)))
            elif entry.is_file():
                yield entry
            elif entry.is_symlink() and entry.suffix.lower() in IMAGE_SUFFIXES + ("",):
                # a link to nothing that was an image, or may have been a folder: not left out
                # without a word (a link to a missing notes.txt is no input anyway)
                raise ValueError(f"input folder {root}: {entry} links to {entry.readlink()}, which does "
                                 "not exist; remove the link or restore its target")


def scan_inputs(inputs: Sequence) -> tuple[list[tuple[pathlib.Path, str]], list[pathlib.Path]]:
    """((image path, output stem) of every input, sorted per folder; the earlier outputs of this
    tool found in the folders and left out). See the module doc for which files are inputs.

    A missing input, a folder without images, a named file that is not an image or is an output
    of this tool, and a name used twice raise ValueError naming it."""
    out, seen, left_out = [], {}, []
    for item in inputs:
        path = pathlib.Path(item)
        if path.is_dir():
            found = sorted(p for p in _files_under(path) if p.suffix.lower() in IMAGE_SUFFIXES)
            outputs = {p for p in found if is_prediction(p)}
            left_out += sorted(outputs)
            files = [p for p in found if p not in outputs]
            if not files:
                also = " other than this tool's outputs (NAME_disp.png beside NAME_depth.npy)" if outputs else ""
                raise ValueError(f"input folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}){also}")
            pairs = [(p, str(p.relative_to(path).with_suffix(""))) for p in files]
        elif path.is_file():
            if is_prediction(path):
                raise ValueError(f"input {path} is a disparity map this tool wrote ({path.name[:-len('_disp.png')]}"
                                 "_depth.npy lies beside it), not an image to predict")
            pairs = [(path, path.stem)]
        else:
            raise ValueError(f"input not found: {path}")
        for p, stem in pairs:
            if stem in seen:
                raise ValueError(f"inputs {seen[stem]} and {p} would both write '{stem}_depth.npy'; "
                                 "predict them into different --out folders")
            seen[stem] = p
            out.append((p, stem))
    return out, left_out


def collect_inputs(inputs: Sequence) -> list[tuple[pathlib.Path, str]]:
    """(image path, output stem) of every input: `scan_inputs` without the list of left-out outputs."""
    return scan_inputs(inputs)[0]


def _check_no_overwrite(items: Sequence[tuple[pathlib.Path, str]], out_dir: pathlib.Path) -> None:
    """Predicting in place must not replace an input: `x.png`'s `x_disp.png` is a user's image too."""
    inputs = {p.resolve(): p for p, _ in items}
    for path, stem in items:
        for suffix in OUTPUT_SUFFIXES:
            target = (out_dir / f"{stem}{suffix}").resolve()
            if target in inputs and target != path.resolve():
                raise ValueError(f"predicting {path} would overwrite the input {inputs[target]}; "
                                 "predict into another --out folder")


def _save_atomic(path: pathlib.Path, write) -> None:
    """Write `path` through a hidden temporary file; an OSError (disk full, permission) becomes a
    ValueError naming the file, and no partial file is left behind."""
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def depth_at_size(scaled_disp: np.ndarray, height: int, width: int, scale: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Network-size scaled disparity -> (disparity, depth) at (height, width); see the module doc."""
    disp = evaluation.resize_linear(scaled_disp, height, width)
    depth = (1.0 if scale is None else float(scale)) / disp
    return disp, depth.astype(np.float32)


@dataclasses.dataclass
class Prepared:
    """Checked inputs and options of a prediction (`prepare`), before any model is loaded."""

    items: list[tuple[pathlib.Path, str]]  # (image, output stem)
    left_out: list[pathlib.Path]           # earlier outputs of this tool in the input folders
    out_dir: pathlib.Path
    scale: float | None
    batch_size: int


def prepare(inputs: Sequence, out_dir, *, scale: float | None = None, batch_size: int = 8) -> Prepared:
    """Check the options, the inputs and every image (decoded in full) without writing anything.

    A bad option or input raises ValueError naming it (see the module doc)."""
    from PIL import Image

    from data_pipelines.kitti.triplets import check_image_mode

    if scale is not None and not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"--scale must be a finite number > 0, got {scale}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"--batch-size must be an integer > 0, got {batch_size}")
    out_dir = pathlib.Path(out_dir)
    check_output_dir(out_dir, "--out")
    items, left_out = scan_inputs(inputs)
    _check_no_overwrite(items, out_dir)
    for path, _ in items:  # name an unreadable image before any compute: decoded in full, as a
        try:               # truncated JPEG passes PIL's verify()
            with Image.open(path) as im:
                im.load()
                check_image_mode(im, path)
                exif_oriented(im.convert("RGB"), path)  # as predict_prepared reads it (the opened
                # JPEG itself parses EXIF more leniently than its RGB copy)
        except ValueError:
            raise
        except Exception as e:  # PIL raises several types
            raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    return Prepared(items, left_out, out_dir, scale, int(batch_size))


def predict_prepared(model: DepthModel, job: Prepared, *, show_progress: bool = True) -> list[pathlib.Path]:
    """Predict the images of `job`; returns the written `.npy` paths (PNG next to each)."""
    from PIL import Image

    try:
        job.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # checked in prepare, but the file system may have changed since
        raise ValueError(f"--out {job.out_dir}: cannot make the folder: {e.strerror or e}") from e
    predictor = DepthPredictor(model, min(job.batch_size, len(job.items)))
    written = []
    # EXIF orientation applied: the maps line up with the photo as viewers show it
    load = lambda item: load_resized(item[0], model.height, model.width, exif_orientation=True)  # noqa: E731
    for chunk, loaded in batched(job.items, predictor.batch_size, load, desc="predict", show_progress=show_progress):
        disp = predictor.predict(np.stack([img for img, _ in loaded]))
        for (path, stem), (_, (h, w)), d in zip(chunk, loaded, disp):
            full_disp, depth = depth_at_size(d, h, w, job.scale)
            npy = job.out_dir / f"{stem}_depth.npy"
            _save_atomic(npy, lambda p: np.save(p, depth))
            png = job.out_dir / f"{stem}_disp.png"
            _save_atomic(png, lambda p: Image.fromarray(colorize_disparity(full_disp)).save(p, format="PNG"))
            written.append(npy)
    return written


def predict_paths(model: DepthModel, inputs: Sequence, out_dir, *, scale: float | None = None,
                  batch_size: int = 8, show_progress: bool = True) -> list[pathlib.Path]:
    """Predict every input image; returns the written `.npy` paths (PNG next to each).

    `prepare` then `predict_prepared`; the CLI calls them apart, to check before loading the model."""
    return predict_prepared(model, prepare(inputs, out_dir, scale=scale, batch_size=batch_size),
                            show_progress=show_progress)
