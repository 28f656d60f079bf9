"""Monodepth2's augmentation, exact to the PIL ops torchvision runs, and its scale chain.

Augmentation (Monodepth2, `mono_dataset.py`), drawn once per example from its own generator
seeded by (seed, epoch, example index), so data order and augmentation are reproducible and do
not depend on the number of hosts or loader threads:
- colour jitter with p=0.5: brightness, contrast, saturation ~ U(0.8, 1.2), hue ~ U(-0.1, 0.1),
  the four ops in a random order; ONE draw of parameters and order for all three frames
  (torchvision >= 0.8 users of the original code re-draw per frame, which this avoids).
  The ops are torchvision's PIL ones: ImageEnhance Brightness (blend with black), Contrast
  (blend with the rounded mean of the grey image), Color (blend with the grey image), and the
  hue shift of the PIL HSV hue channel by uint8(hue * 255) mod 256; each quantises to uint8.
- horizontal flip with p=0.5 of all frames (and of the teacher logits) together. K is left
  unchanged, as in Monodepth2, which assumes a centred principal point. Monodepth2 flips the
  native image before resizing; here the stored, already resized image is flipped (PIL's
  LANCZOS weights are mirror-symmetric, so the two agree up to float rounding).

Speed (issue #8; benchmarks/RESULTS.md): the hue step looks PIL's RGB<->HSV conversions up in
tables PIL itself filled (`_hue_tables`, 2 x 64 MiB per process): 1.7 instead of 3.0 ms per
640x192 frame, bit for bit. PIL is imported inside the functions that use it.
"""

from __future__ import annotations

import dataclasses
import sys
import threading

import numpy as np

NUM_SCALES = 4
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """One example's augmentation: flip and colour-jitter parameters (shared by its frames)."""

    flip: bool = False
    jitter: bool = False
    order: tuple[int, ...] = (0, 1, 2, 3)  # indices into JITTER_OPS, applied left to right
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one example's augmentation in one epoch (independent streams)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(index)]))


def sample_augmentation(rng: np.random.Generator) -> Augmentation:
    """Monodepth2's draws: jitter coin, flip coin, then (if jittering) order and factors."""
    jitter = bool(rng.random() > 0.5)
    flip = bool(rng.random() > 0.5)
    if not jitter:
        return Augmentation(flip=flip)
    order = tuple(int(i) for i in rng.permutation(4))
    b, c, s = rng.uniform(0.8, 1.2, size=3)
    h = rng.uniform(-0.1, 0.1)
    return Augmentation(flip, True, order, float(b), float(c), float(s), float(h))


_HUE_TABLES: tuple[np.ndarray, np.ndarray] | None = None
_HUE_LOCK = threading.Lock()


def _hue_tables() -> tuple[np.ndarray, np.ndarray]:
    """PIL's own RGB -> HSV and HSV -> RGB conversions, tabulated over all 2^24 colours.

    Returns (rgb_to_svh, svh_to_rgb), uint32 arrays of 2^24 entries (64 MiB each):
      rgb_to_svh[R | G<<8 | B<<16] = S | V<<8 | H<<16  (PIL's "HSV" of that RGB colour)
      svh_to_rgb[S | V<<8 | H<<16] = R | G<<8 | B<<16 | X<<24  (PIL's "RGB" of that HSV)
    Both conversions are per pixel (no neighbourhood), so looking the colours up is PIL's
    conversion exactly, by construction, for the installed Pillow; putting H in the top byte
    makes the hue shift one add and one mask. R | G<<8 | B<<16 is the little-endian uint32 of
    PIL's "RGBX" raw bytes, so an image goes in and out without a numpy channel shuffle.
    Built once per process on first use (~0.7 s CPU), guarded for the loader's threads, in
    16 chunks so that building needs little memory beyond the tables (each grain worker
    process builds its own).
    """
    global _HUE_TABLES
    with _HUE_LOCK:
        if _HUE_TABLES is None:
            from PIL import Image

            rgb_to_svh = np.empty(1 << 24, np.uint32)
            svh_to_rgb = np.empty(1 << 24, np.uint32)
            chunk = 1 << 20
            for start in range(0, 1 << 24, chunk):
                codes = np.arange(start, start + chunk, dtype=np.uint32)  # as RGBX bytes
                colours = Image.frombytes("RGB", (1024, 1024), codes, "raw", "RGBX")
                h, s, v = colours.convert("HSV").split()
                svh = Image.merge("RGB", (s, v, h)).tobytes("raw", "RGBX")
                rgb_to_svh[start:start + chunk] = np.frombuffer(svh, np.uint32) & 0xFFFFFF
                r, g, b = colours.split()  # the same codes read as bytes (S, V, H)
                rgb = Image.merge("HSV", (b, r, g)).convert("RGB").tobytes("raw", "RGBX")
                svh_to_rgb[start:start + chunk] = np.frombuffer(rgb, np.uint32)
            _HUE_TABLES = (rgb_to_svh, svh_to_rgb)
        return _HUE_TABLES


def _hue_shift(hue: float) -> int:
    """torchvision's np.uint8(hue * 255) added to the uint8 HSV hue channel (mod 256). The
    float -> uint8 cast truncates toward zero and wraps negatives (what C does on x86),
    written out explicitly."""
    return int(hue * 255) % 256


def _adjust_hue_reference(image, hue: float):
    """torchvision's PIL adjust_hue, literally (split HSV, shift H, merge, back to RGB): the
    definition `_adjust_hue` is tested against."""
    from PIL import Image

    h, s, v = image.convert("HSV").split()
    h = Image.fromarray(((np.asarray(h, np.uint16) + _hue_shift(hue)) % 256).astype(np.uint8), "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def _adjust_hue(image, hue: float):
    """`_adjust_hue_reference` through the tables of `_hue_tables` (same output, bit for bit;
    ~2.5x less CPU on a 640x192 frame: two gathers instead of two float conversions)."""
    from PIL import Image

    if sys.byteorder != "little":  # the tables' codes are little-endian views of RGBX bytes
        return _adjust_hue_reference(image, hue)
    rgb_to_svh, svh_to_rgb = _hue_tables()
    codes = np.frombuffer(image.tobytes("raw", "RGBX"), np.uint32).astype(np.intp)
    codes &= 0xFFFFFF
    svh = np.take(rgb_to_svh, codes).astype(np.intp)
    svh += _hue_shift(hue) << 16
    svh &= 0xFFFFFF  # the hue byte wraps mod 256, S and V untouched
    return Image.frombytes("RGB", image.size, np.take(svh_to_rgb, svh), "raw", "RGBX")


def _jitter_pil(pil, aug: Augmentation):
    """`aug`'s colour jitter of an RGB PIL image (a new image; the input when not jittering)."""
    if not aug.jitter:
        return pil
    from PIL import ImageEnhance

    for op in aug.order:
        name = JITTER_OPS[op]
        if name == "brightness":
            pil = ImageEnhance.Brightness(pil).enhance(aug.brightness)
        elif name == "contrast":
            pil = ImageEnhance.Contrast(pil).enhance(aug.contrast)
        elif name == "saturation":
            pil = ImageEnhance.Color(pil).enhance(aug.saturation)
        else:
            pil = _adjust_hue(pil, aug.hue)
    return pil


def color_jitter(image: np.ndarray, aug: Augmentation) -> np.ndarray:
    """Applies `aug`'s colour jitter to a uint8 (H,W,3) RGB image; identity when not jittering."""
    if not aug.jitter:
        return image
    from PIL import Image

    return np.asarray(_jitter_pil(Image.fromarray(image), aug))


def lanczos_half(image: np.ndarray) -> np.ndarray:
    """Halves a uint8 (H,W,3) image with PIL LANCZOS (Monodepth2's scale chain step)."""
    from PIL import Image

    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w // 2, h // 2), Image.Resampling.LANCZOS))


def _scale_chain(pil) -> list[np.ndarray]:
    """Scales 1..NUM_SCALES-1 of an RGB PIL image as uint8 arrays, each `lanczos_half` of the
    previous one (kept as a PIL image between the halvings)."""
    from PIL import Image

    out = []
    for _ in range(1, NUM_SCALES):
        pil = pil.resize((pil.width // 2, pil.height // 2), Image.Resampling.LANCZOS)
        out.append(np.asarray(pil))
    return out
