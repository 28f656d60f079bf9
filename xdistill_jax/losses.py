"""Monodepth2 photometric losses in JAX: SSIM, reprojection, edge-aware smoothness, the full loss.

All images are NHWC float in [0,1]; every loss is computed in float32 even if inputs are bf16.
The full loss (`monodepth2_loss`) reproduces Monodepth2's `generate_images_pred` + `compute_losses`
(reference §5): per-pixel minimum over the warped sources and (auto-masking) the un-warped sources,
mean over all pixels, plus mean-normalised edge-aware smoothness / 2^s, averaged over scales.

Work that does not depend on the scale is done once: the target's SSIM statistics (shared by every
comparison with the target), the identity reprojection losses (identical at every scale unless
v1_multiscale; only the tie-break noise differs per scale) and the per-pixel rays of the projection.
"""

from __future__ import annotations

import functools
from typing import Mapping

import numpy as np
import jax
import jax.numpy as jnp

from xdistill_jax import geometry, platform_forms

SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
SSIM_WEIGHT = 0.85  # reprojection = 0.85 * SSIM + 0.15 * L1
TIEBREAK_STD = 1e-5
SOURCE_FRAMES = (-1, 1)


def _f32(x):
    return jnp.asarray(x, dtype=jnp.float32)


def first_minimum(candidates):
    """Element-wise minimum of a list of same-shape arrays and the index of the first minimal one,
    as torch.min(x, dim) gives them over the stacked candidates (Monodepth2's auto-mask): ties go to
    the earlier candidate; NaN counts as smallest (the first NaN wins, and propagates).

    Built as a chain of `where`s, so the gradient of the minimum reaches only the chosen candidate
    (torch's routing; `jnp.min` over a stack would split it among ties) and no stacked copy of the
    full-resolution candidates is made (XLA materialised the stack for the min and the argmin;
    benchmarks/RESULTS.md has the bytes).

    Returns (minimum, index int32), both of the candidates' shape.
    """
    if not candidates:
        raise ValueError("first_minimum: no candidates")
    best = candidates[0]
    index = jnp.zeros(jnp.shape(best), jnp.int32)
    for k, candidate in enumerate(candidates[1:], start=1):
        take = (candidate < best) | (jnp.isnan(candidate) & ~jnp.isnan(best))
        best = jnp.where(take, candidate, best)
        index = jnp.where(take, jnp.int32(k), index)
    return best, index


def _check_image(name: str, x, channels: int | None = None, hw: tuple | None = None, batch: int | None = None):
    """Shape check for an NHWC map; the message names the argument and expected vs actual shape."""
    shape = tuple(np.shape(x))
    expected = (
        batch if batch is not None else "B",
        hw[0] if hw else "H",
        hw[1] if hw else "W",
        channels if channels is not None else "C",
    )
    exp_str = "(" + ",".join(str(e) for e in expected) + ")"
    bad = len(shape) != 4
    if not bad:
        for e, s in zip(expected, shape):
            if isinstance(e, int) and e != s:
                bad = True
    if bad:
        hint = ""
        if len(shape) == 4 and channels is not None and shape[1] == channels and shape[-1] != channels:
            hint = " (looks like NCHW; pass NHWC)"
        raise ValueError(f"{name}: expected shape {exp_str} NHWC, got {shape}{hint}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name}: expected a floating dtype (images in [0,1]), got {jnp.result_type(x)}")


def _box3_separable(x):
    x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 1, 1), (1, 1, 1, 1), "VALID")
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 1, 3, 1), (1, 1, 1, 1), "VALID") * (1.0 / 9.0)


def _box3_window(x):
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "VALID") * (1.0 / 9.0)


def _box3(x):
    """3x3 mean (stride 1, no padding) of x (B,H+2,W+2,C) -> (B,H,W,C).

    Window sums (reduce_window), whose gradient is again a window sum (a sum of shifted slices
    materialises three zero-padded copies in its transpose; ~3x slower forward+backward on CPU).
    The form depends on the platform the step is compiled for (`platform_forms.choose`; the
    same mean, rounded differently):
    - CPU: two separable 3-tap sums (XLA:CPU runs the loss's forward + gradient ~9 % faster
      than with one 3x3 window; the demo's and tests' figures are this form's);
    - GPU and others: one 3x3 window. XLA:GPU fuses a single window with the SSIM arithmetic
      around it, where the two passes each write a full-resolution intermediate per statistic:
      1.26 GB less memory traffic per train step on an H100 target (benchmarks/RESULTS.md). Its
      row-major sum is also closer to torch's avg_pool2d, which Monodepth2's SSIM uses.
    """
    return platform_forms.choose(x, cpu=_box3_separable, default=_box3_window)


def _reflect_pad1_axis(x, axis: int):
    n = x.shape[axis]
    zero = jnp.zeros((), x.dtype)

    def pad(a, lo, hi):
        return jax.lax.pad(a, zero, [(lo, hi, 0) if d == axis else (0, 0, 0) for d in range(x.ndim)])

    first = jax.lax.slice_in_dim(x, 1, 2, axis=axis)       # x[1] goes to position -1
    last = jax.lax.slice_in_dim(x, n - 2, n - 1, axis=axis)  # x[n-2] goes to position n
    return pad(x, 1, 1) + pad(first, 0, n + 1) + pad(last, n + 1, 0)


def _reflect_pad1_concat(x):
    return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")


def _reflect_pad1_sum(x):
    return _reflect_pad1_axis(_reflect_pad1_axis(x, 1), 2)


def _reflect_pad1(x):
    """Reflection padding of 1 on H and W of (B,H,W,C) (torch ReflectionPad2d(1)).

    Two forms of the same values, chosen by platform like `_box3`:
    - CPU: `jnp.pad(mode="reflect")`, a concatenation of reversed slices (the demo's and
      tests' figures are this form's);
    - GPU and others: a sum of zero pads. Each position receives one value plus exact zeros,
      so the padded array is the same bitwise, but XLA:GPU fuses pads into the SSIM window
      sums that read them, where it wrote each concatenated copy of the warped images to
      memory: 0.79 GB less traffic per train step on an H100 target (benchmarks/RESULTS.md).
      On XLA:CPU the different fusion changes the rounding of later reductions, hence the split.
    """
    return platform_forms.choose(x, cpu=_reflect_pad1_concat, default=_reflect_pad1_sum)


def _target_stats(y):
    """Local mean and mean of squares of the target (B,H,W,C), shared by all its comparisons."""
    yp = _reflect_pad1(y)
    return y, _box3(yp), _box3(yp * yp)


def _ssim_with_stats(x, stats):
    y, mu_y, e_yy = stats
    xp = _reflect_pad1(x)
    yp = _reflect_pad1(y)
    mu_x = _box3(xp)
    sigma_x = _box3(xp * xp) - mu_x * mu_x
    sigma_y = e_yy - mu_y * mu_y
    sigma_xy = _box3(xp * yp) - mu_x * mu_y
    num = (2.0 * mu_x * mu_y + SSIM_C1) * (2.0 * sigma_xy + SSIM_C2)
    den = (mu_x * mu_x + mu_y * mu_y + SSIM_C1) * (sigma_x + sigma_y + SSIM_C2)
    return jnp.clip((1.0 - num / den) / 2.0, 0.0, 1.0)


def ssim(x, y):
    """Per-pixel, per-channel SSIM dissimilarity clip((1 - SSIM)/2, 0, 1): (B,H,W,C) x2 -> (B,H,W,C).

    Reflection padding of 1, 3x3 box means (Monodepth2 layers.SSIM); float32.
    """
    _check_image("x", x)
    _check_image("y", y, channels=np.shape(x)[-1], hw=np.shape(x)[1:3], batch=np.shape(x)[0])
    return _ssim_with_stats(_f32(x), _target_stats(_f32(y)))


def _reprojection_with_stats(pred, stats, no_ssim: bool):
    target = stats[0]
    l1 = jnp.mean(jnp.abs(target - pred), axis=-1, keepdims=True)
    if no_ssim:
        return l1
    s = jnp.mean(_ssim_with_stats(pred, stats), axis=-1, keepdims=True)
    return SSIM_WEIGHT * s + (1.0 - SSIM_WEIGHT) * l1


def _reprojection_recomputed(pred, stats, no_ssim: bool):
    """`_reprojection_with_stats` of a warped image in the train step; the same values.

    On GPU/TPU under `jax.checkpoint`: the backward pass recomputes the SSIM statistics from
    `pred` instead of the forward writing them out as residuals (per scale and frame at full
    resolution). On an H100 target: 0.55 GB less memory traffic per train step and 0.65 GB less
    device memory (benchmarks/RESULTS.md). XLA:CPU would round the gradient differently with
    the rematerialised graph, so the CPU keeps the plain form (its figures are that form's).
    """
    plain = functools.partial(_reprojection_with_stats, no_ssim=no_ssim)
    return platform_forms.choose(pred, stats, cpu=plain, default=jax.checkpoint(plain))


def reprojection_loss(pred, target, no_ssim: bool = False):
    """Photometric error (B,H,W,C) x2 -> (B,H,W,1): 0.85 mean_c SSIM + 0.15 mean_c |target - pred|.

    With no_ssim=True only the L1 term (unweighted) is returned.
    """
    _check_image("pred", pred)
    _check_image("target", target, channels=np.shape(pred)[-1], hw=np.shape(pred)[1:3], batch=np.shape(pred)[0])
    return _reprojection_with_stats(_f32(pred), _target_stats(_f32(target)), no_ssim)


def smoothness_loss(disp, image):
    """Edge-aware first-order smoothness: disp (B,H,W,1), image (B,H,W,C) -> scalar.

    mean(|dx d| exp(-mean_c |dx I|)) + mean(|dy d| exp(-mean_c |dy I|)) (two separate means).
    Monodepth2 applies it to disparity divided by its per-image mean (done in monodepth2_loss).
    """
    _check_image("disp", disp, channels=1)
    _check_image("image", image, hw=np.shape(disp)[1:3], batch=np.shape(disp)[0])
    d, img = _f32(disp), _f32(image)
    dx = jnp.abs(d[:, :, :-1] - d[:, :, 1:])
    dy = jnp.abs(d[:, :-1] - d[:, 1:])
    ix = jnp.mean(jnp.abs(img[:, :, :-1] - img[:, :, 1:]), axis=-1, keepdims=True)
    iy = jnp.mean(jnp.abs(img[:, :-1] - img[:, 1:]), axis=-1, keepdims=True)
    return jnp.mean(dx * jnp.exp(-ix)) + jnp.mean(dy * jnp.exp(-iy))


def _lookup(mapping, key, name: str, what: str):
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{name}: expected a dict keyed by {what}, got {type(mapping).__name__}")
    if key not in mapping:
        raise ValueError(f"{name}: missing {what} {key!r} (have {sorted(mapping.keys())})")
    return mapping[key]


def _color(colors, frame, scale):
    return _lookup(_lookup(colors, frame, "colors", "frame"), scale, f"colors[{frame}]", "scale")


def _validate_loss_inputs(colors, disps, cam_T_cam, Ks, inv_Ks, tiebreak_noise, v1_multiscale, n_identity):
    """Check every array monodepth2_loss will read; returns (sorted scales, (B, H, W)).

    Errors name the argument (e.g. "colors[-1][0]", "Ks[0]", "tiebreak_noise[3]") and give the
    expected and actual shapes; missing frames / scales are named too.
    """
    if not isinstance(disps, Mapping) or not disps:
        raise ValueError("disps: expected a non-empty dict {scale: (B,h,w,1) disparity}")
    scales = sorted(disps.keys())
    target0 = _color(colors, 0, 0)
    _check_image("colors[0][0]", target0, channels=3)
    b, h, w, _ = np.shape(target0)
    for s in scales:
        if not isinstance(s, (int, np.integer)) or s < 0:
            raise ValueError(f"disps: scale keys must be non-negative ints, got {s!r}")
        hs, ws = h // 2**s, w // 2**s
        _check_image(f"disps[{s}]", disps[s], channels=1, hw=(hs, ws), batch=b)
        _check_image(f"colors[0][{s}]", _color(colors, 0, s), channels=3, hw=(hs, ws), batch=b)
    for f in SOURCE_FRAMES:
        _lookup(cam_T_cam, f, "cam_T_cam", "frame")
        geometry.check_matrices(f"cam_T_cam[{f}]", cam_T_cam[f], b)
    for s in scales if v1_multiscale else [0]:
        hs, ws = h // 2**s, w // 2**s
        geometry.check_matrices(f"Ks[{s}]", _lookup(Ks, s, "Ks", "scale"), b)
        geometry.check_matrices(f"inv_Ks[{s}]", _lookup(inv_Ks, s, "inv_Ks", "scale"), b)
        for f in SOURCE_FRAMES:
            _check_image(f"colors[{f}][{s}]", _color(colors, f, s), channels=3, hw=(hs, ws), batch=b)
    if tiebreak_noise is not None:
        for s in scales:
            hs, ws = (h // 2**s, w // 2**s) if v1_multiscale else (h, w)
            shape = tuple(np.shape(_lookup(tiebreak_noise, s, "tiebreak_noise", "scale")))
            if len(shape) != 4 or shape[:3] != (b, hs, ws) or shape[3] not in (n_identity, 2):
                raise ValueError(
                    f"tiebreak_noise[{s}]: expected shape ({b},{hs},{ws},{n_identity}) NHWC "
                    f"(frames -1, +1), got {shape}"
                )
    return scales, (b, h, w)


def monodepth2_loss(
    colors,
    disps,
    cam_T_cam,
    Ks,
    inv_Ks,
    *,
    tiebreak_noise=None,
    rng=None,
    automask: bool = True,
    avg_reprojection: bool = False,
    v1_multiscale: bool = False,
    no_ssim: bool = False,
    smoothness_weight: float = 1e-3,
    min_depth: float = 0.1,
    max_depth: float = 100.0,
    align_corners: bool = True,
):
    """Monodepth2's self-supervised loss. Returns (loss scalar float32, aux dict).

    Args:
      colors: colors[frame][scale] (B,H/2^s,W/2^s,3) un-augmented images in [0,1], frames 0, -1, 1.
      disps: disps[scale] (B,H/2^s,W/2^s,1) sigmoid disparities; its keys are the loss scales.
      cam_T_cam: cam_T_cam[frame] (B,4,4) for frames -1, 1: target camera -> source camera.
      Ks, inv_Ks: Ks[scale] (B,4,4) intrinsics in pixels at each scale (only scale 0 is read
        unless v1_multiscale).
      tiebreak_noise: optional tiebreak_noise[scale] (B,h,w,2) added to the identity losses of
        frames (-1, +1) (h,w = loss resolution: full unless v1_multiscale). With avg_reprojection
        only one identity channel exists: (B,h,w,1), or channel 0 of a (B,h,w,2) array is used.
      rng: alternatively a PRNG key; noise = 1e-5 * normal(fold_in(rng, scale)). Neither: no noise.
        Noise only matters (and is only checked) with automask.
      automask: include the identity (un-warped source) losses in the per-pixel minimum.
      avg_reprojection: average over source frames instead of the per-pixel minimum.
      v1_multiscale: compute each scale's photometric loss at that scale (K_s, colors[f][s])
        instead of upsampling the disparity to full resolution.
      no_ssim: L1-only photometric error.
      smoothness_weight, min_depth, max_depth: as Monodepth2's options.
      align_corners: exact-pixel sampling (True, default) or current torch's grid_sample default.

    aux: "loss/{s}" per-scale loss (photometric + smoothness term); "identity_selection/{s}"
      (B,h,w) float32, 1 where a warped source won the minimum (pixel kept), 0 where auto-masked
      (all ones without automask); "color_pred/{f}/{s}" the warped sources (B,h,w,3);
      "depth/{s}" the depth used for warping (B,h,w,1).
    """
    if tiebreak_noise is not None and rng is not None:
        raise ValueError("tiebreak_noise and rng: give at most one of them")
    n_identity = 1 if avg_reprojection else 2
    scales, (b, h, w) = _validate_loss_inputs(
        colors, disps, cam_T_cam, Ks, inv_Ks, tiebreak_noise if automask else None, v1_multiscale, n_identity
    )

    T = {f: _f32(cam_T_cam[f]) for f in SOURCE_FRAMES}
    # The warp is recomputed in the backward pass (jax.checkpoint) instead of storing what its
    # gradient reads (the four gathered taps per channel and the tap indices, per scale and
    # source): the gather re-reads a small image, the stored taps cost 12 full-resolution maps
    # per warp. Same arithmetic; benchmarks/RESULTS.md (deviceless H100 census) has the bytes.
    warp = jax.checkpoint(functools.partial(geometry.warp, align_corners=align_corners))

    def combine(per_frame):
        """Per-frame losses [(B,h,w,1) for frames -1, +1] -> the candidates of the per-pixel
        minimum: both frames, or their mean (avg_reprojection). A list, never stacked."""
        return [(per_frame[0] + per_frame[1]) / 2] if avg_reprojection else list(per_frame)

    def target_terms(res):
        """Target statistics and identity losses at resolution index `res` (None without automask)."""
        with jax.named_scope("reprojection"):
            stats = _target_stats(_f32(_color(colors, 0, res)))
            identity = None
            if automask:
                identity = combine(
                    [_reprojection_with_stats(_f32(_color(colors, f, res)), stats, no_ssim) for f in SOURCE_FRAMES]
                )
        return stats, identity

    def noise_for(s, shape):
        if tiebreak_noise is not None:
            return _f32(tiebreak_noise[s])[..., :n_identity]
        if rng is not None:
            return TIEBREAK_STD * jax.random.normal(jax.random.fold_in(rng, s), shape, jnp.float32)
        return jnp.zeros(shape, jnp.float32)

    def photometric(depth, noise, res, stats, identity):
        """Warp both sources with `depth` (B,h,w,1) at resolution index `res`; returns
        (mean of the per-pixel minimum, identity selection (B,h,w), {frame: warped source})."""
        with jax.named_scope("warp"):
            preds = {f: warp(_color(colors, f, res), depth, Ks[res], inv_Ks[res], T[f]) for f in SOURCE_FRAMES}
        with jax.named_scope("reprojection"):
            reproj = combine([_reprojection_recomputed(preds[f], stats, no_ssim) for f in SOURCE_FRAMES])
        with jax.named_scope("select"):
            if automask:
                noisy_identity = [loss + noise[..., k : k + 1] for k, loss in enumerate(identity)]
                best, index = first_minimum(noisy_identity + reproj)
                selection = (index[..., 0] >= n_identity).astype(jnp.float32)
            else:
                best, _ = first_minimum(reproj)
                selection = jnp.ones(best.shape[:3], jnp.float32)
            return jnp.mean(best), selection, preds

    aux = {}
    if v1_multiscale:  # each scale at its own resolution: shapes differ, so a loop
        photo = {}
        for s in scales:
            _, depth = geometry.disp_to_depth(_f32(disps[s]), min_depth, max_depth)
            stats, identity = target_terms(s)
            noise = noise_for(s, (b, h // 2**s, w // 2**s, n_identity))
            photo[s], aux[f"identity_selection/{s}"], preds = photometric(depth, noise, s, stats, identity)
            aux[f"depth/{s}"] = depth
            for f in SOURCE_FRAMES:
                aux[f"color_pred/{f}/{s}"] = preds[f]
    else:
        # Every scale warps at full resolution with scale-0 K and images, so the scales are one
        # batched computation (vmap over a leading scale axis): fewer, larger kernels. The target
        # statistics and the identity losses are computed once and shared by all scales.
        stats, identity = target_terms(0)
        with jax.named_scope("upsample"):
            disp_full = jnp.stack([geometry.upsample_bilinear(disps[s], (h, w)) for s in scales])
        _, depth = geometry.disp_to_depth(disp_full, min_depth, max_depth)  # (S,B,H,W,1)
        with jax.named_scope("select"):
            noise = jnp.stack([noise_for(s, (b, h, w, n_identity)) for s in scales])
        batched = jax.vmap(lambda d, n: photometric(d, n, 0, stats, identity))
        photo_all, selection, preds = batched(depth, noise)
        photo = {}
        for i, s in enumerate(scales):
            photo[s] = photo_all[i]
            aux[f"identity_selection/{s}"] = selection[i]
            aux[f"depth/{s}"] = depth[i]
            for f in SOURCE_FRAMES:
                aux[f"color_pred/{f}/{s}"] = preds[f][i]

    per_scale = []
    for s in scales:
        # edge-aware smoothness of the mean-normalised native-resolution disparity, / 2^s
        disp_s = _f32(disps[s])
        norm_disp = disp_s / (jnp.mean(disp_s, axis=(1, 2), keepdims=True) + 1e-7)
        with jax.named_scope("smoothness"):
            smooth = smoothness_loss(norm_disp, _color(colors, 0, s))
        aux[f"loss/{s}"] = photo[s] + smoothness_weight * smooth / (2**s)
        per_scale.append(aux[f"loss/{s}"])
    loss = sum(per_scale) / len(per_scale)
    return loss, aux
