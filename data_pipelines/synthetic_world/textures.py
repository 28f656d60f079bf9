"""Procedural Lambertian textures fixed in world (or object) coordinates, vectorised numpy.

Every texture is a function of a 3-D surface point in metres, so a surface looks the same from
every viewpoint (what photometric self-supervision needs). Detail exists at every scale: fractal
value noise from 8 m down to 1 cm, plus structure (lane markings, paving joints, windows, slats).
To keep frames consistent instead of aliasing, each noise octave is faded out once its wavelength
drops below ~2 pixel footprints (`footprint`: metres covered by one pixel at the hit point).
"""

from __future__ import annotations

import numpy as np

_PRIME = np.array([0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D], dtype=np.uint32)


def _salt(seed) -> np.ndarray:
    """Seed (int or (N,) int array) -> uint32 salt mixed into the lattice hash."""
    return (np.asarray(seed, np.int64) * 0x27D4EB2F & 0xFFFFFFFF).astype(np.uint32)


def _hash3(ix, iy, iz, seed) -> np.ndarray:
    """Integer lattice (int64 arrays) -> float32 in [0, 1), a fixed function of (ix, iy, iz, seed)."""
    h = (ix.astype(np.uint32) * _PRIME[0]) ^ (iy.astype(np.uint32) * _PRIME[1])
    h ^= iz.astype(np.uint32) * _PRIME[2] + _salt(seed)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(16)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def value_noise(p: np.ndarray, seed) -> np.ndarray:
    """Smooth value noise in [0,1) at points p (N,3) with unit lattice spacing (trilinear, smoothstep).

    Lattice values are `_hash3` of the corner; the per-axis products are computed once per
    axis and shared by the 8 corners (same numbers as calling `_hash3` per corner).
    """
    fl = np.floor(p)
    f = (p - fl).astype(np.float32)
    i = fl.astype(np.int64)
    w = f * f * (3.0 - 2.0 * f)
    salt = _salt(seed)
    hx = [(i[:, 0] + d).astype(np.uint32) * _PRIME[0] for d in (0, 1)]
    hy = [(i[:, 1] + d).astype(np.uint32) * _PRIME[1] for d in (0, 1)]
    hz = [(i[:, 2] + d).astype(np.uint32) * _PRIME[2] + salt for d in (0, 1)]
    corner = {}
    for dx in (0, 1):
        for dy in (0, 1):
            hxy = hx[dx] ^ hy[dy]
            for dz in (0, 1):
                h = hxy ^ hz[dz]
                h ^= h >> np.uint32(13)
                h *= np.uint32(0x2C1B3C6D)
                h ^= h >> np.uint32(16)
                corner[dx, dy, dz] = (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))
    wx, wy, wz = w[:, 0], w[:, 1], w[:, 2]
    x00 = corner[0, 0, 0] + wx * (corner[1, 0, 0] - corner[0, 0, 0])
    x10 = corner[0, 1, 0] + wx * (corner[1, 1, 0] - corner[0, 1, 0])
    x01 = corner[0, 0, 1] + wx * (corner[1, 0, 1] - corner[0, 0, 1])
    x11 = corner[0, 1, 1] + wx * (corner[1, 1, 1] - corner[0, 1, 1])
    y0 = x00 + wy * (x10 - x00)
    y1 = x01 + wy * (x11 - x01)
    return y0 + wz * (y1 - y0)


def fbm(p: np.ndarray, footprint: np.ndarray, seed, coarsest: float = 8.0,
        finest: float = 0.01, gain: float = 0.72) -> np.ndarray:
    """Band-limited fractal noise, zero mean, roughly in [-1, 1].

    p (N,3) metres; footprint (N,) metres per pixel; seed an int or one per point (N,). Octaves from wavelength `coarsest` halving
    down to `finest`; an octave fades out linearly as its wavelength goes from 4 to 2 footprints.
    """
    out = np.zeros(p.shape[0], np.float32)
    amp, total, wavelength, octave = 1.0, 0.0, coarsest, 0
    while wavelength >= finest:
        fade = np.clip(wavelength / np.maximum(footprint, 1e-6) * 0.5 - 1.0, 0.0, 1.0)
        live = np.nonzero(fade > 0)[0]  # only points where this octave is resolved
        if len(live):
            sd = seed[live] if np.ndim(seed) else seed
            n = value_noise(p[live] / wavelength, sd + 101 * octave) * 2.0 - 1.0
            out[live] += (amp * fade[live] * n).astype(np.float32)
        total += amp
        amp *= gain
        wavelength *= 0.5
        octave += 1
    return out / np.float32(total * 0.5)


def soft_step(x: np.ndarray, width: np.ndarray) -> np.ndarray:
    """0 for x << 0, 1 for x >> 0, a linear ramp `width` wide (anti-aliased edge)."""
    return np.clip(x / np.maximum(width, 1e-6) + 0.5, 0.0, 1.0)


def band(x: np.ndarray, lo: float, hi: float, width: np.ndarray) -> np.ndarray:
    """Anti-aliased indicator of lo <= x <= hi."""
    return soft_step(x - lo, width) * soft_step(hi - x, width)


def periodic_band(x: np.ndarray, period: float, lo: float, hi: float, width: np.ndarray) -> np.ndarray:
    """Anti-aliased indicator of lo <= (x mod period) <= hi; fades to its mean when under-sampled."""
    m = np.mod(x, period)
    value = band(m, lo, hi, width)
    mean = (hi - lo) / period
    # When a period spans fewer than ~3 pixels, show the average instead of aliasing.
    fade = np.clip(period / np.maximum(width, 1e-6) / 3.0 - 1.0, 0.0, 1.0)
    return fade * value + (1.0 - fade) * mean


def mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-point blend of colours a, b (N,3) or (3,) by weight t (N,)."""
    return a + (b - a) * t[:, None]
