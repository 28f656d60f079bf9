"""One KITTI triplet example: read frames -1, 0, +1, resize, encode, intrinsics.

This module is what every example costs when `prepare` runs; it imports only numpy, PIL and
the KITTI raw readers (no TFDS), so multiprocessing workers start quickly. The TFDS builder
that stores these examples is `data_pipelines.kitti.tfds_builder`.

An example (the contract in the project's contracts; one per split line):
  id        str        the split line, e.g. "2011_09_26/2011_09_26_drive_0022_sync 473 r"
  image_m1, image_0, image_p1
            bytes      PNG or JPEG encoding of a uint8 (H, W, 3) RGB image at the stored size,
                       or (format "raw") the uint8 (H, W, 3) array itself, stored as its bytes
  image_0_s1, image_0_s2, image_0_s3
            (H/2^s, W/2^s, 3) uint8  only with `target_scales`: frame 0 at scales 1..3, each the
                       PIL LANCZOS halving of the previous scale (Monodepth2's chain) from the
                       stored-size image before encoding; always stored raw (lossless, no decode:
                       a JPEG of these small images was measured 5-20 grey levels off)
  K         (4, 4) float32  normalised intrinsics: row 0 divided by the image width, row 1 by
                            its height (so it holds for any resolution of the same view)
  index     int64      position of the line in the split file (0-based)
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
from typing import Any

import numpy as np

# Monodepth2's fixed normalised KITTI intrinsics (kitti_dataset.py), used for every drive and
# both cameras: the principal point is assumed exactly centred, which is also why a horizontal
# flip can leave K unchanged.
MONODEPTH2_K = np.array(
    [[0.58, 0.0, 0.5, 0.0], [0.0, 1.92, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]],
    dtype=np.float32,
)

FRAME_OFFSETS = (-1, 0, 1)
IMAGE_KEYS = ("image_m1", "image_0", "image_p1")  # in the order of FRAME_OFFSETS
TARGET_SCALE_KEYS = ("image_0_s1", "image_0_s2", "image_0_s3")  # frame 0 at scales 1, 2, 3
# png: lossless, ~3.2 ms to decode a 640x192 frame with PIL; jpeg: lossy, ~0.5 ms; raw: the
# uint8 pixels (H*W*3 bytes, ~1.7x a PNG of a noisy frame), no decode. benchmarks/RESULTS.md.
IMAGE_FORMATS = ("png", "jpeg", "raw")
# The shards' array_record compression: "zstd" (level 3, what TFDS writes) or "none". A raw
# 640x192 triplet record (~1.2 MB) took 3.2 ms of CPU to read with zstd and 1.6 ms without on
# the project's VM (benchmarks/RESULTS.md); PNG and JPEG bytes barely compress further.
COMPRESSIONS = ("zstd", "none")
INTRINSICS_SOURCES = ("monodepth2", "calib")


@dataclasses.dataclass(frozen=True)
class TripletSettings:
    """How the triplets are stored. Saved with the dataset; a re-run must ask for the same."""

    height: int = 192
    width: int = 640
    image_format: str = "png"  # "png" (lossless), "jpeg" (lossy) or "raw" (lossless, no decode)
    jpeg_quality: int = 92  # only used for "jpeg"
    intrinsics: str = "monodepth2"  # "monodepth2" fixed K, or "calib" per-drive P_rect_0X
    # Also store frame 0's scales 1..3 (raw, +1/3 of a raw frame), so the loader does not
    # compute the LANCZOS chain (1.7 ms of CPU per example at 640x192).
    target_scales: bool = False
    compression: str = "zstd"  # the shards' array_record compression, one of COMPRESSIONS

    def __post_init__(self):
        if self.height < 8 or self.width < 8 or self.height % 8 or self.width % 8:
            # Scales 1..3 halve the size three times; Monodepth2 needs sizes divisible by 32
            # for its networks, but the loader only needs the three halvings to be exact.
            raise ValueError(
                f"height and width must be positive multiples of 8, got {self.height}x{self.width}"
            )
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {self.image_format!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.intrinsics not in INTRINSICS_SOURCES:
            raise ValueError(
                f"intrinsics must be one of {INTRINSICS_SOURCES}, got {self.intrinsics!r}"
            )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_image_mode(image, path) -> None:
    """Refuses a 16-bit or float image (PIL modes I;16*, I, F), naming the file: PIL's RGB
    conversion clips such values to 255, a white image."""
    if image.mode.startswith("I") or image.mode == "F":
        raise ValueError(f"image {path} has mode {image.mode} (16-bit or float samples); convert it "
                         "to 8-bit RGB first (PIL would clip its values to white)")


def load_rgb(path: pathlib.Path):
    """Opens an image file as an RGB PIL image, fully decoded (so corruption shows here)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            check_image_mode(image, path)
            return image.convert("RGB")
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:  # PIL raises several types (OSError, SyntaxError, ValueError...)
        raise ValueError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e


def resize_lanczos(image, height: int, width: int):
    """PIL LANCZOS resize, as torchvision's Resize(interpolation=ANTIALIAS) on a PIL image."""
    from PIL import Image

    return image.resize((width, height), Image.Resampling.LANCZOS)


def encode_image(image, image_format: str, jpeg_quality: int = 92) -> bytes | np.ndarray:
    """Encodes a PIL RGB image as PNG or JPEG bytes (what TFDS stores without TensorFlow);
    for "raw", returns the uint8 (H, W, 3) array (the builder's Tensor feature stores its bytes)."""
    if image_format == "raw":
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
    elif image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=jpeg_quality)
    else:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    return buffer.getvalue()


def calib_intrinsics(calib_path: pathlib.Path, camera: int, image_size: tuple[int, int]) -> np.ndarray:
    """Normalised (4,4) K of camera `camera` from `P_rect_0<camera>` in calib_cam_to_cam.txt.

    `image_size` is (width, height) of the native image the calibration belongs to; row 0 of
    the 3x3 intrinsic part of P_rect is divided by the width and row 1 by the height, as
    Monodepth2 normalises its fixed K. The baseline column of P_rect is not intrinsics and is
    dropped. P_rect's principal point is in KITTI's 1-based pixel coordinates (the devkit's;
    Monodepth2's `generate_depth_map` subtracts 1 after projecting with it); the networks'
    pixel grid is 0-based, so 1 is subtracted from cx and cy first (the synthetic world, whose
    true K is Monodepth2's, then reads cx = cy = 0.5 exactly).
    """
    from data_pipelines.kitti import raw

    if not calib_path.is_file():
        raise ValueError(f"missing calibration file {calib_path}")
    calib = raw.read_calib_file(calib_path)  # a malformed line raises naming file:line
    # Names the file and key when the key is absent or not 12 numbers.
    p_rect = raw.calib_matrix(calib, f"P_rect_0{camera}", (3, 4), calib_path).astype(np.float64)
    width, height = image_size
    K = np.eye(4, dtype=np.float64)
    K[:3, :3] = p_rect[:, :3]
    K[0, 2] -= 1.0
    K[1, 2] -= 1.0
    K[0, :] /= width
    K[1, :] /= height
    return K.astype(np.float32)


def make_example(
    raw_dir: str | pathlib.Path, line, index: int, settings: TripletSettings, where: str
) -> dict[str, Any]:
    """Builds the stored example for one split line.

    Args:
      raw_dir: root of a KITTI raw tree (dates at the top).
      line: a `data_pipelines.kitti.raw.SplitLine`.
      index: 0-based position of the line in the split file.
      settings: storage settings.
      where: "FILE:LINE" of the split line, for error messages.

    Raises:
      ValueError naming the split line and the file when a frame is missing or corrupt, or a
      calibration file or key is missing.
    """
    from data_pipelines.kitti import raw

    raw_dir = pathlib.Path(raw_dir)
    images = {}
    native_size = None
    native_sizes = {}
    try:
        paths = raw.triplet_paths(raw_dir, line, FRAME_OFFSETS)
    except ValueError as e:  # frame 0 of a drive has no frame -1; a triplet of two formats
        raise ValueError(f"{where} ({str(line)!r}): {e}") from None
    for offset, key in zip(FRAME_OFFSETS, IMAGE_KEYS):
        path = pathlib.Path(paths[offset])
        if not path.is_file():
            what = "frame" if offset == 0 else f"neighbour frame {offset:+d}"
            raise ValueError(f"{where} ({str(line)!r}): missing {what}: {path}")
        try:
            image = load_rgb(path)
        except ValueError as e:
            raise ValueError(f"{where} ({str(line)!r}): {e}") from e
        native_sizes[path] = image.size
        if offset == 0:
            native_size = image.size
        resized = resize_lanczos(image, settings.height, settings.width)
        images[key] = encode_image(resized, settings.image_format, settings.jpeg_quality)
        if offset == 0 and settings.target_scales:
            scaled = resized
            for scale_key in TARGET_SCALE_KEYS:
                scaled = resize_lanczos(scaled, scaled.height // 2, scaled.width // 2)
                images[scale_key] = encode_image(scaled, "raw")

    if len(set(native_sizes.values())) > 1:
        # One camera films a drive at one size: a frame of another size is not the neighbour
        # (a damaged or foreign file), and resizing would stretch it into the triplet silently.
        sizes = ", ".join(f"{p} {w}x{h}" for p, (w, h) in native_sizes.items())
        raise ValueError(f"{where} ({str(line)!r}): the triplet's frames differ in size: {sizes}")
    if settings.intrinsics == "monodepth2":
        K = MONODEPTH2_K.copy()
    else:
        calib_path = raw_dir / line.folder.split("/")[0] / "calib_cam_to_cam.txt"
        try:
            K = calib_intrinsics(calib_path, line.camera, native_size)
        except ValueError as e:
            raise ValueError(f"{where} ({str(line)!r}): {e}") from e
    return {"id": str(line), **images, "K": K, "index": np.int64(index)}
