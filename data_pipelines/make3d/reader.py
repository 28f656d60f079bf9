"""Reader for the Make3D test set layout (real Test134 and the synthetic world's copy).

Layout: `ROOT/Test134/img-NAME.jpg` and `ROOT/Gridlaserdata/depth_sph_corr-NAME.mat` holding
`Position3DGrid` (55, 305, 4); channel 3 (`[:, :, 3]`) is the depth in metres that evaluations
use. `ROOT/make3d_test_files.txt` (one `img-NAME.jpg` per line, as Monodepth2's script reads)
fixes the order when present; otherwise images are taken in sorted order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

GRID_SHAPE = (55, 305, 4)


@dataclasses.dataclass(frozen=True)
class Make3DItem:
    name: str  # NAME in img-NAME.jpg
    image_path: Path
    depth_path: Path


def list_test_set(root) -> list[Make3DItem]:
    """Every test image with its laser-depth file; a missing .mat raises naming it."""
    root = Path(root)
    image_dir, depth_dir = root / "Test134", root / "Gridlaserdata"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"Make3D image folder not found: {image_dir}")
    list_file = root / "make3d_test_files.txt"
    if list_file.is_file():
        files = [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip()]
        for lineno, f in enumerate(files, 1):
            if not (f.startswith("img-") and f.endswith(".jpg")):
                raise ValueError(f"{list_file}:{lineno}: expected 'img-NAME.jpg', got {f!r}")
    else:
        files = sorted(p.name for p in image_dir.glob("img-*.jpg"))
    if not files:
        raise ValueError(f"no img-*.jpg images under {image_dir}")
    items = []
    for f in files:
        name = f[len("img-"):-len(".jpg")]
        image = image_dir / f
        depth = depth_dir / f"depth_sph_corr-{name}.mat"
        if not image.is_file():
            raise FileNotFoundError(f"Make3D image not found: {image}")
        if not depth.is_file():
            raise FileNotFoundError(f"Make3D image {image.name} has no depth file: {depth}")
        items.append(Make3DItem(name, image, depth))
    return items


def load_depth(path) -> np.ndarray:
    """(55, 305) float32 depth in metres: `Position3DGrid[:, :, 3]` of a Make3D .mat file.

    ValueError naming the file when it cannot be read or its grid is not (55, 305, 4) numbers.
    """
    import scipy.io  # lazily: scipy only where .mat files are read

    path = Path(path)
    try:
        mat = scipy.io.loadmat(path)
    except FileNotFoundError:
        raise
    except (ValueError, TypeError, OSError, scipy.io.matlab.MatReadError) as e:  # truncated, not a .mat
        raise ValueError(f"{path}: cannot read the Make3D depth file ({type(e).__name__}: {e})") from e
    except NotImplementedError as e:  # a MATLAB v7.3 (HDF5) file: scipy reads v4-v7.2 only
        raise ValueError(f"{path}: a MATLAB v7.3 (HDF5) file, which scipy cannot read ({e}); the Make3D "
                         "release's Gridlaserdata files are v5: use the original file, or save it again "
                         "in MATLAB with save(..., '-v7')") from e
    if "Position3DGrid" not in mat:
        raise ValueError(f"{path}: no 'Position3DGrid' variable")
    grid = np.asarray(mat["Position3DGrid"])
    # Every evaluation crops fixed rows of this grid (17:38 of 55): a grid of another shape, e.g.
    # a transposed (305, 55, 4) one, would be cropped and scored as something else.
    if grid.shape != GRID_SHAPE:
        raise ValueError(f"{path}: Position3DGrid has shape {grid.shape}, expected {GRID_SHAPE} "
                         "(rows, cols, [X, Y, Z, depth]) as in Make3D's Gridlaserdata")
    if not np.issubdtype(grid.dtype, np.number):
        raise ValueError(f"{path}: Position3DGrid is of type {grid.dtype}, expected numbers")
    return grid[:, :, 3].astype(np.float32)


def load_image(path) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError) as e:  # not an image, or truncated
        raise ValueError(f"{path}: cannot read the Make3D image ({type(e).__name__}: {e})") from e


def load_test_set(root):
    """(items, images list of (H,W,3) uint8, depths list of (55,305) float32)."""
    items = list_test_set(root)
    return items, [load_image(i.image_path) for i in items], [load_depth(i.depth_path) for i in items]
