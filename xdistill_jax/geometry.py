"""Monodepth2 camera geometry in JAX: disparity to depth, poses, back-projection, projection, warping.

Conventions (see DESIGN.md): images and maps are NHWC; intrinsics and poses are (B,4,4) float32.
Pixel coordinates are in pixels with (0,0) at the centre of the top-left pixel, x to the right.
All geometry is computed in float32 whatever the input dtype, and without `jnp.dot`/`einsum` on
per-pixel data: on GPUs and TPUs a float32 matmul defaults to reduced (TF32/bf16) precision, which
would move sample points by ~1e-3 px. Per-pixel 3x3 products are written as multiply-adds instead;
the few 4x4 products use `precision=HIGHEST`.

Sampling (`bilinear_sample`, `warp`) uses border padding and by default samples at the exact
projected pixel (`align_corners=True`), which is what Monodepth2 computed under the authors'
PyTorch 0.4.1. `align_corners=False` reproduces current PyTorch's `grid_sample` default applied to
Monodepth2's (W-1)-normalised grid: it reads the image at ``x * W/(W-1) - 0.5`` instead of ``x``
(reference §4), so the fixtures made with torch 2.x are reproduced too.
"""

from __future__ import annotations

import functools

import numpy as np
import jax
import jax.numpy as jnp

from xdistill_jax import platform_forms

_HIGHEST = jax.lax.Precision.HIGHEST


def _f32(x):
    return jnp.asarray(x, dtype=jnp.float32)


def _check_shape(name: str, x, expected: tuple, what: str):
    """Raise ValueError unless x.shape matches `expected` (None = any size)."""
    shape = tuple(np.shape(x))
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        exp = "(" + ",".join("?" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name}: expected shape {exp} {what}, got {shape}")


def check_matrices(name: str, m, batch: int | None = None):
    """Raise ValueError naming `name` unless m is (batch,4,4) (any batch when None)."""
    _check_shape(name, m, (batch, 4, 4), "(batch of 4x4 matrices)")


def _check_depth(name: str, depth):
    shape = tuple(np.shape(depth))
    if len(shape) != 4 or shape[-1] != 1:
        hint = " (looks like NCHW; pass NHWC)" if len(shape) == 4 and shape[1] == 1 else ""
        raise ValueError(f"{name}: expected shape (B,H,W,1) NHWC, got {shape}{hint}")


def disp_to_depth(disp, min_depth: float, max_depth: float):
    """Sigmoid disparity in [0,1] -> (scaled_disp in [1/max, 1/min], depth in [min, max]).

    Any shape; float32 out. Units of depth are those of min/max_depth (metres for KITTI).
    """
    min_disp = 1.0 / max_depth
    max_disp = 1.0 / min_depth
    scaled_disp = min_disp + (max_disp - min_disp) * _f32(disp)
    return scaled_disp, 1.0 / scaled_disp


def rot_from_axisangle(axisangle):
    """Axis-angle (B,3) (radians = vector norm) -> (B,4,4) rotation in the top-left block.

    Rodrigues' formula as Monodepth2 writes it: axis = v / (|v| + 1e-7). The norm uses a safe
    square root so the gradient at v = 0 is finite (zero) rather than NaN.
    """
    v = _f32(axisangle)
    _check_shape("axisangle", v, (None, 3), "(B,3) axis-angle")
    sq = jnp.sum(v * v, axis=-1, keepdims=True)
    positive = sq > 0
    angle = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    axis = v / (angle + 1e-7)
    ca, sa = jnp.cos(angle), jnp.sin(angle)
    c1 = 1.0 - ca
    x, y, z = axis[:, 0:1], axis[:, 1:2], axis[:, 2:3]
    xs, ys, zs = x * sa, y * sa, z * sa
    xc, yc, zc = x * c1, y * c1, z * c1
    xyc, yzc, zxc = x * yc, y * zc, z * xc
    zero, one = jnp.zeros_like(x), jnp.ones_like(x)
    rows = [
        [x * xc + ca, xyc - zs, zxc + ys, zero],
        [xyc + zs, y * yc + ca, yzc - xs, zero],
        [zxc - ys, yzc + xs, z * zc + ca, zero],
        [zero, zero, zero, one],
    ]
    return jnp.stack([jnp.concatenate(r, axis=-1) for r in rows], axis=1)


def translation_matrix(translation):
    """Translation (B,3) -> (B,4,4) identity with [:3,3] = t."""
    t = _f32(translation)
    _check_shape("translation", t, (None, 3), "(B,3) translation")
    eye = jnp.broadcast_to(jnp.eye(4, dtype=jnp.float32), (t.shape[0], 4, 4))
    return eye.at[:, :3, 3].set(t)


def pose_from_axisangle(axisangle, translation, invert: bool = False):
    """Pose network output -> (B,4,4) camera transform (Monodepth2 transformation_from_parameters).

    invert=False: [[R, t], [0, 1]] (rotate, then translate).
    invert=True:  [[R^T, -R^T t], [0, 1]], the exact inverse; used for source frames before
    the target (the network sees (I_-1, I_0) and predicts the motion -1 -> 0).
    """
    rot = rot_from_axisangle(axisangle)
    t = _f32(translation)
    _check_shape("translation", t, (rot.shape[0], 3), "(B,3) translation, same B as axisangle")
    if invert:
        rt = jnp.swapaxes(rot[:, :3, :3], 1, 2)
        t = -jnp.sum(rt * t[:, None, :], axis=-1)
        return translation_matrix(t).at[:, :3, :3].set(rt)
    return rot.at[:, :3, 3].set(t)


def pixel_grid(height: int, width: int):
    """(H,W,2) float32 pixel coordinates (x, y) of every pixel centre."""
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    return jnp.asarray(np.stack([xs, ys], axis=-1))


def backproject(depth, inv_K):
    """Depth (B,H,W,1) and inv_K (B,4,4) -> homogeneous camera points (B,H,W,4), last coord 1.

    point = depth * inv_K[:3,:3] @ [x, y, 1].
    """
    _check_depth("depth", depth)
    depth = _f32(depth)
    b, h, w, _ = depth.shape
    check_matrices("inv_K", inv_K, b)
    inv_k = _f32(inv_K)[:, None, None, :3, :3]
    grid = pixel_grid(h, w)
    pix = jnp.concatenate([grid, jnp.ones((h, w, 1), jnp.float32)], axis=-1)
    rays = jnp.sum(inv_k * pix[None, :, :, None, :], axis=-1)
    return jnp.concatenate([depth * rays, jnp.ones_like(depth)], axis=-1)


def projection_matrix(K, T):
    """(K @ T)[:, :3, :]: the (B,3,4) matrix taking target camera points to source pixels."""
    check_matrices("K", K)
    check_matrices("T", T, np.shape(K)[0])
    return jnp.matmul(_f32(K), _f32(T), precision=_HIGHEST)[:, :3, :]


def project(points, K, T, eps: float = 1e-7):
    """Camera points (B,H,W,3|4) -> pixel coordinates (B,H,W,2) in the camera K @ T.

    Monodepth2 Project3D without its final normalisation: pixel = c[:2] / (c[2] + eps) with
    c = (K @ T)[:3] @ [p, 1]. No validity mask and no abs() on depth (points behind the camera
    are projected as they fall).
    """
    points = _f32(points)
    if points.ndim != 4 or points.shape[-1] not in (3, 4):
        raise ValueError(f"points: expected shape (B,H,W,3) or (B,H,W,4), got {tuple(points.shape)}")
    P = projection_matrix(K, T)[:, None, None]  # (B,1,1,3,4)
    cam = jnp.sum(P[..., :3] * points[..., None, :3], axis=-1) + P[..., 3]
    return cam[..., :2] / (cam[..., 2:3] + eps)


def _rays_at(A, xs, ys):
    """A @ [x, y, 1] with xs, ys broadcastable to (1,h,w,1)."""
    col = lambda m: m[:, None, None, :]  # (B,3) -> (B,1,1,3)
    return col(A[:, :, 0]) * xs + col(A[:, :, 1]) * ys + col(A[:, :, 2])


def _rays_broadcast(A, h: int, w: int):
    return _rays_at(A, jnp.arange(w, dtype=jnp.float32)[None, None, :, None],
                    jnp.arange(h, dtype=jnp.float32)[None, :, None, None])


def _rays_grid(A, h: int, w: int):
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return _rays_at(A, jnp.asarray(gx)[None, :, :, None], jnp.asarray(gy)[None, :, :, None])


def _rays(A, h: int, w: int):
    """A (B,3,3) -> A @ [x, y, 1] at every pixel, (B,h,w,3); the same values in either form.

    The pixel positions are broadcast iotas on the CPU and full (h,w) constants elsewhere. With
    iotas XLA factors the pose gradient sum(g * depth * [x, y, 1]) into three reductions that
    each read the full-resolution gradient; with a grid it cannot, and XLA:GPU reads it fewer
    times (0.54 GB less memory traffic per train step on an H100 target, benchmarks/RESULTS.md).
    On XLA:CPU the gradient's rounding would change, so the CPU keeps the iotas.
    """
    return platform_forms.choose(A, cpu=functools.partial(_rays_broadcast, h=h, w=w),
                                 default=functools.partial(_rays_grid, h=h, w=w))


def pixel_coords(depth, K, inv_K, T, eps: float = 1e-7):
    """Fused back-project + project: depth (B,H,W,1) -> source pixel coordinates (B,H,W,2).

    Equal to project(backproject(depth, inv_K), K, T) but cheaper: with A = (K T)[:3,:3] inv_K[:3,:3]
    and b = (K T)[:3,3], c = depth * (A @ [x,y,1]) + b, where A @ [x,y,1] is affine in the pixel
    position, so no per-pixel matrix product is needed.
    """
    _check_depth("depth", depth)
    depth = _f32(depth)
    b, h, w, _ = depth.shape
    check_matrices("K", K, b)
    check_matrices("inv_K", inv_K, b)
    check_matrices("T", T, b)
    P = projection_matrix(K, T)
    A = jnp.matmul(P[:, :, :3], _f32(inv_K)[:, :3, :3], precision=_HIGHEST)  # (B,3,3)
    cam = depth * _rays(A, h, w) + P[:, :, 3][:, None, None, :]
    return cam[..., :2] / (cam[..., 2:3] + eps)


def pixels_to_grid(pix, height: int, width: int):
    """Pixel coordinates (...,2) -> Monodepth2's normalised grid: -1 <-> pixel 0, +1 <-> pixel W-1."""
    pix = _f32(pix)
    scale = jnp.asarray([width - 1, height - 1], jnp.float32)
    return (pix / scale - 0.5) * 2.0


def grid_to_pixels(grid, height: int, width: int):
    """Inverse of pixels_to_grid (the align_corners=True un-normalisation)."""
    grid = _f32(grid)
    scale = jnp.asarray([width - 1, height - 1], jnp.float32)
    return (grid + 1.0) / 2.0 * scale


def bilinear_sample(img, pix_xy, align_corners: bool = True):
    """Bilinear sampling with border padding: img (B,H,W,C), pix_xy (B,h,w,2) pixels -> (B,h,w,C).

    align_corners=True reads img at exactly (x, y). align_corners=False reads it where current
    torch's grid_sample (default align_corners=False) reads a Monodepth2 (W-1)-normalised grid:
    x' = ((g + 1) W - 1) / 2 with g = 2x/(W-1) - 1, i.e. x' = x W/(W-1) - 0.5.
    Coordinates are clamped to [0, W-1] x [0, H-1] (border padding) before interpolation.
    The four taps are gathered from the flattened image, one gather each; float32 throughout.
    """
    img = _f32(img)
    pix_xy = _f32(pix_xy)
    if img.ndim != 4:
        raise ValueError(f"img: expected shape (B,H,W,C) NHWC, got {tuple(img.shape)}")
    b, h, w, c = img.shape
    if pix_xy.ndim != 4 or pix_xy.shape[0] != b or pix_xy.shape[-1] != 2:
        raise ValueError(f"pix_xy: expected shape ({b},h,w,2) pixel coordinates, got {tuple(pix_xy.shape)}")
    x, y = pix_xy[..., 0], pix_xy[..., 1]
    if not align_corners:
        gx = (x / (w - 1) - 0.5) * 2.0
        gy = (y / (h - 1) - 0.5) * 2.0
        x = ((gx + 1.0) * w - 1.0) / 2.0
        y = ((gy + 1.0) * h - 1.0) / 2.0
    x = jnp.clip(x, 0.0, w - 1.0)
    y = jnp.clip(y, 0.0, h - 1.0)
    x0f, y0f = jnp.floor(x), jnp.floor(y)
    wx1, wy1 = x - x0f, y - y0f  # weights of the right / lower taps
    wx0, wy0 = 1.0 - wx1, 1.0 - wy1
    x0 = x0f.astype(jnp.int32)
    y0 = y0f.astype(jnp.int32)
    x1 = jnp.minimum(x0 + 1, w - 1)  # at the right/bottom edge the extra tap has weight 0
    y1 = jnp.minimum(y0 + 1, h - 1)
    flat = img.reshape(b, h * w, c)
    out_hw = pix_xy.shape[1:3]
    # One gather per tap, its flat index computed in the gather's fusion: a stacked (B,h,w,4) index
    # array was materialised by XLA:GPU per scale and source, in the forward and again in the
    # recomputed backward. The taps stacked after the gathers (not four separate arrays) keep the
    # backward's fusions as they were: 0.94 GB less memory traffic per train step on an H100
    # target, against 0.47 GB with four separate tap arrays (benchmarks/RESULTS.md). The same
    # taps, so the same values.
    def tap(yi, xi):
        return jnp.take_along_axis(flat, (yi * w + xi).reshape(b, -1, 1), axis=1, mode="clip").reshape(b, *out_hw, c)

    taps = jnp.stack([tap(y0, x0), tap(y0, x1), tap(y1, x0), tap(y1, x1)], axis=-2)  # (B,h,w,4,C)
    w_nw, w_ne, w_sw, w_se = wx0 * wy0, wx1 * wy0, wx0 * wy1, wx1 * wy1
    # Per channel on (B,h,w) planes, summed in grid_sample's order (nw, ne, sw, se): bitwise the
    # same whatever the batch sharding (tests/test_geometry.py). Against a sum of (B,h,w,4,C)
    # products over a tap axis, whose backward reduced the weights' cotangent over a broadcast
    # axis: the train step's warp forward + backward 2.6x faster on XLA:CPU, the whole loss's
    # 1.6-1.8x (benchmarks/RESULTS.md).
    return jnp.stack(
        [w_nw * taps[..., 0, k] + w_ne * taps[..., 1, k] + w_sw * taps[..., 2, k] + w_se * taps[..., 3, k]
         for k in range(c)],
        axis=-1,
    )


def warp(src, depth, K, inv_K, T, align_corners: bool = True):
    """Warp a source image into the target view: src (B,H,W,C), depth (B,H,W,1) -> (B,H,W,C).

    T (B,4,4) maps target camera points to the source camera (Monodepth2's cam_T_cam(0, f)).
    K / inv_K (B,4,4) are the intrinsics at this resolution (in pixels).
    """
    src = _f32(src)
    if src.ndim != 4:
        raise ValueError(f"src: expected shape (B,H,W,C) NHWC, got {tuple(src.shape)}")
    _check_depth("depth", depth)
    if tuple(src.shape[:3]) != tuple(np.shape(depth)[:3]):
        raise ValueError(
            f"src/depth: expected matching (B,H,W), got src {tuple(src.shape)} and depth {tuple(np.shape(depth))}"
        )
    pix = pixel_coords(depth, K, inv_K, T)
    return bilinear_sample(src, pix, align_corners=align_corners)


def _interp_taps(out_size: int, in_size: int):
    """Source taps and weights of torch bilinear interpolation with align_corners=False."""
    scale = np.float32(in_size / out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, (np.float32(1.0) - w1).astype(np.float32), w1


def _resize_axis(x, axis: int, out_size: int):
    """Linear resize of one axis (torch align_corners=False rule)."""
    in_size = x.shape[axis]
    if out_size == in_size:
        return x
    i0, i1, w0, w1 = _interp_taps(out_size, in_size)
    bshape = [1] * x.ndim
    bshape[axis] = out_size
    w0, w1 = w0.reshape(bshape), w1.reshape(bshape)
    if out_size % in_size:
        return w0 * jnp.take(x, i0, axis=axis) + w1 * jnp.take(x, i1, axis=axis)
    # Integer factor f (the 2^s disparity upsampling): output k*f + p reads the same two taps
    # relative to k for every k, so each phase p is two shifted slices of the edge-padded input and
    # the phases interleave by a reshape. Unlike a gather, its gradient needs no scatter-add.
    f = out_size // in_size
    # xp[j] = x[clip(j - 1, 0, n - 1)]. jnp.pad(mode="edge") slices and concatenates along every
    # axis, the batch too, and its gradient then shifts rows between the devices a sharded batch
    # lives on (collective-permutes); so a concatenation along `axis` alone, the same values.
    # A batch on one device keeps jnp.pad: the gradient rounds alike, not bitwise alike, and the
    # one-device step stays the program the demo's figures were measured with.
    if platform_forms.batch_devices() == 1:
        pad = [(0, 0)] * x.ndim
        pad[axis] = (1, 1)
        xp = jnp.pad(x, pad, mode="edge")
    else:
        n = x.shape[axis]
        xp = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis), x,
                              jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)
    phases = []
    for p in range(f):
        offset = np.float32((p + 0.5) / f - 0.5)  # source position of output k*f + p, minus k
        lo = 0 if offset < 0 else 1  # taps (k-1, k) or (k, k+1), in padded coordinates
        frac = offset % np.float32(1.0)
        a = jax.lax.slice_in_dim(xp, lo, lo + in_size, axis=axis)
        b = jax.lax.slice_in_dim(xp, lo + 1, lo + 1 + in_size, axis=axis)
        phases.append((np.float32(1.0) - frac) * a + frac * b)
    out = jnp.stack(phases, axis=axis + 1)
    return out.reshape(x.shape[:axis] + (out_size,) + x.shape[axis + 1 :])


def upsample_bilinear(x, size):
    """Resize x (B,h,w,C) to size (H,W) like F.interpolate(mode="bilinear", align_corners=False).

    Source coordinate (i + 0.5) * in/out - 0.5, clamped at 0; two taps per axis; no antialias.
    Separable: interpolate along W, then H (same products and order as torch's 2-D kernel).
    """
    x = _f32(x)
    if x.ndim != 4:
        raise ValueError(f"x: expected shape (B,h,w,C) NHWC, got {tuple(x.shape)}")
    out_h, out_w = int(size[0]), int(size[1])
    return _resize_axis(_resize_axis(x, 2, out_w), 1, out_h)
