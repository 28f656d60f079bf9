"""Photometric losses against Monodepth2's own numbers (tests/data/monodepth2_ref.npz: the real
Trainer.generate_images_pred + compute_losses at B=2, 64x192) and against cases worked by hand."""

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from xdistill_jax import geometry as G
from xdistill_jax import losses as L

FRAME_TAG = {0: "f0", -1: "fm1", 1: "fp1"}
SCALES = (0, 1, 2, 3)
# Elementwise maps: the fixture inputs are U[0,1) noise, so SSIM's E[x^2]-mu^2 cancellation leaves
# ~2e-6 between float32 implementations (float64 differs from torch by 1.9e-6 as well).
MAP_ATOL = 3e-6
# Warped images: ~1e-5 px of float32 rounding in the sample position times intensity slopes of the
# noise images; an exact float64 warp is 7e-6 from torch on the same data.
WARP_ATOL = 5e-5
LOSS_RTOL = 1e-5


def nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


@pytest.fixture(scope="session")
def full(ref):
    """The full-loss inputs in our layout: dicts keyed by frame / scale, NHWC."""
    colors = {f: {s: nhwc(ref[f"full_in_color_{tag}_s{s}"]) for s in SCALES} for f, tag in FRAME_TAG.items()}
    disps = {s: nhwc(ref[f"full_in_disp_s{s}"]) for s in SCALES}
    Ks = {s: ref[f"full_in_K_s{s}"] for s in SCALES}
    inv_Ks = {s: ref[f"full_in_inv_K_s{s}"] for s in SCALES}
    pose = {f: (ref[f"full_in_axisangle_{FRAME_TAG[f]}"][:, 0, 0], ref[f"full_in_translation_{FRAME_TAG[f]}"][:, 0, 0])
            for f in (-1, 1)}
    cam_T_cam = {f: G.pose_from_axisangle(*pose[f], invert=f < 0) for f in (-1, 1)}
    noise = {s: nhwc(ref[f"full_in_automask_noise_s{s}"]) for s in SCALES}
    zero = {s: np.zeros_like(v) for s, v in noise.items()}
    return dict(colors=colors, disps=disps, Ks=Ks, inv_Ks=inv_Ks, pose=pose, cam_T_cam=cam_T_cam,
                noise=noise, zero_noise=zero)


@functools.lru_cache(maxsize=None)
def jitted_loss(**opts):
    """One jit per option set (options are static), shared by all tests in the session."""

    def fn(colors, disps, cam_T_cam, Ks, inv_Ks, noise):
        return L.monodepth2_loss(colors, disps, cam_T_cam, Ks, inv_Ks, tiebreak_noise=noise, **opts)

    return jax.jit(fn)


def run(full, noise="zero_noise", **opts):
    noise_arg = None if noise is None else full[noise]
    return jitted_loss(**opts)(full["colors"], full["disps"], full["cam_T_cam"], full["Ks"], full["inv_Ks"], noise_arg)


# ----------------------------------------------------------------------------------- components

def test_ssim(ref):
    out = L.ssim(nhwc(ref["ssim_x"]), nhwc(ref["ssim_y"]))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, nhwc(ref["ssim_out"]), atol=MAP_ATOL)
    x = nhwc(ref["ssim_x"])
    np.testing.assert_allclose(L.ssim(x, x), 0.0, atol=1e-6)


def test_reprojection_loss(ref):
    pred, target = nhwc(ref["reproj_pred"]), nhwc(ref["reproj_target"])
    out = L.reprojection_loss(pred, target)
    assert out.shape == (2, 24, 40, 1)
    np.testing.assert_allclose(out, nhwc(ref["reproj_loss"]), atol=MAP_ATOL)
    np.testing.assert_allclose(L.reprojection_loss(pred, target, no_ssim=True), nhwc(ref["reproj_loss_no_ssim"]),
                               atol=1e-6)
    np.testing.assert_allclose(L.reprojection_loss(target, target), 0.0, atol=1e-6)


def test_smoothness_loss(ref):
    img = nhwc(ref["smooth_img"])
    np.testing.assert_allclose(L.smoothness_loss(nhwc(ref["smooth_disp"]), img), ref["smooth_loss"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(L.smoothness_loss(nhwc(ref["smooth_norm_disp"]), img), ref["smooth_loss_normdisp"],
                               rtol=LOSS_RTOL)
    # by hand: constant disparity is perfectly smooth; a unit step across a flat image costs 1 per
    # horizontal pair where it sits: one column of 3 pairs (of 3x3 horizontal pairs) -> 1/3
    assert float(L.smoothness_loss(np.full((1, 3, 4, 1), 0.3), img[:1, :3, :4])) == 0.0
    step = np.zeros((1, 3, 4, 1), np.float32)
    step[..., 2:, :] = 1.0
    np.testing.assert_allclose(L.smoothness_loss(step, np.zeros((1, 3, 4, 3))), 1.0 / 3.0, rtol=1e-6)


# ----------------------------------------------------------------------------------- full loss

def test_full_loss_intermediates_recorded_noise(ref, full):
    """torch-default sampling (align_corners=False) with the recorded tie-break noise: every
    intermediate Monodepth2 exposes, every scale."""
    loss, aux = run(full, noise="noise", align_corners=False)
    np.testing.assert_allclose(loss, ref["full_out_loss"], rtol=LOSS_RTOL)
    for f in (-1, 1):
        np.testing.assert_allclose(full["cam_T_cam"][f], ref[f"full_mid_cam_T_cam_{FRAME_TAG[f]}"], atol=1e-6)
    for s in SCALES:
        np.testing.assert_allclose(aux[f"loss/{s}"], ref[f"full_out_loss_s{s}"], rtol=LOSS_RTOL)
        np.testing.assert_allclose(G.upsample_bilinear(full["disps"][s], (64, 192)),
                                   nhwc(ref[f"full_mid_disp_up_s{s}"]), atol=1e-6)
        np.testing.assert_allclose(aux[f"depth/{s}"], nhwc(ref[f"full_mid_depth_s{s}"]), rtol=1e-6)
        for f in (-1, 1):
            tag = FRAME_TAG[f]
            pix = G.pixel_coords(aux[f"depth/{s}"], full["Ks"][0], full["inv_Ks"][0], full["cam_T_cam"][f])
            np.testing.assert_allclose(G.pixels_to_grid(pix, 64, 192), ref[f"full_mid_sample_{tag}_s{s}"], atol=1e-5)
            np.testing.assert_allclose(aux[f"color_pred/{f}/{s}"], nhwc(ref[f"full_mid_color_pred_{tag}_s{s}"]),
                                       atol=WARP_ATOL)
        sel = np.asarray(aux[f"identity_selection/{s}"])
        want = ref[f"full_mid_identity_selection_s{s}"]
        assert sel.shape == want.shape == (2, 64, 192)
        assert 0.0 < want.mean() < 1.0  # the static patch is auto-masked, the rest kept
        # The selection may differ only at near-ties (identity vs warped within float32 warp error).
        differ = sel != want
        assert differ.sum() <= 5, f"scale {s}: {differ.sum()} pixels select differently"
        if differ.any():
            tgt = full["colors"][0][0]
            ident = np.concatenate([L.reprojection_loss(full["colors"][f][0], tgt) for f in (-1, 1)], -1)
            ident = ident + full["noise"][s]
            warped = np.concatenate([L.reprojection_loss(aux[f"color_pred/{f}/{s}"], tgt) for f in (-1, 1)], -1)
            gap = np.abs(ident.min(-1) - warped.min(-1))[differ]
            assert gap.max() < 1e-4


def test_full_loss_without_noise(ref, full):
    loss, aux = run(full, align_corners=False)
    np.testing.assert_allclose(loss, ref["full_out_loss_nonoise"], rtol=LOSS_RTOL)
    for s in SCALES:
        np.testing.assert_allclose(aux[f"loss/{s}"], ref[f"full_out_loss_nonoise_s{s}"], rtol=LOSS_RTOL)
    # no noise given and no rng: zero noise, same value
    loss_none, _ = run(full, noise=None, align_corners=False)
    np.testing.assert_allclose(loss_none, loss, rtol=1e-7)


def test_full_loss_exact_pixel_sampling(ref, full):
    """Our default (align_corners=True, the authors' PyTorch 0.4.1 behaviour)."""
    loss, _ = run(full)
    np.testing.assert_allclose(loss, ref["full_out_loss_nonoise_aligncorners_true"], rtol=LOSS_RTOL)
    loss, _ = run(full, noise="noise")
    np.testing.assert_allclose(loss, ref["full_out_loss_aligncorners_true"], rtol=LOSS_RTOL)


VARIANTS = {
    "avg_reprojection": dict(avg_reprojection=True),
    "disable_automasking": dict(automask=False),
    "v1_multiscale": dict(v1_multiscale=True),
    "no_ssim": dict(no_ssim=True),
    "baseline": dict(v1_multiscale=True, automask=False, avg_reprojection=True),
}


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_full_loss_variants(ref, full, variant, align_corners):
    opts = VARIANTS[variant]
    noise = None
    if opts.get("automask", True):
        noise = "zero_noise"
        if opts.get("v1_multiscale"):  # noise lives at each scale's own resolution
            full = dict(full, zero_noise={s: np.zeros((2, 64 >> s, 192 >> s, 2), np.float32) for s in SCALES})
    loss, aux = run(full, noise=noise, align_corners=align_corners, **opts)
    key = f"full_out_loss_variant_{variant}" + ("_aligncorners_true" if align_corners else "")
    np.testing.assert_allclose(loss, ref[key], rtol=LOSS_RTOL)
    if not opts.get("automask", True):
        assert float(aux["identity_selection/0"].min()) == 1.0


def test_jit_equals_eager_and_rng_noise(full):
    args = (full["colors"], full["disps"], full["cam_T_cam"], full["Ks"], full["inv_Ks"])
    eager, eager_aux = L.monodepth2_loss(*args, tiebreak_noise=full["noise"])
    jitted, jit_aux = run(full, noise="noise")
    # fused float32 arithmetic moves warped values by ~1e-6, the loss by ~2e-6 relative
    np.testing.assert_allclose(jitted, eager, rtol=LOSS_RTOL)
    # XLA fusion reorders float32 sums, which may flip a handful of exact near-ties in the selection
    assert (np.asarray(jit_aux["identity_selection/0"]) != np.asarray(eager_aux["identity_selection/0"])).sum() <= 5
    np.testing.assert_allclose(jit_aux["color_pred/-1/0"], eager_aux["color_pred/-1/0"], atol=1e-5)
    # noise drawn from a key: deterministic per key, and only ~1e-7 away from the noiseless loss
    key = jax.random.key(0)
    # (inputs as arguments, not closed over: XLA would constant-fold the image statistics)
    drawn = jax.jit(lambda args, k: L.monodepth2_loss(*args, rng=k)[0])
    a, b = drawn(args, key), drawn(args, key)
    assert float(a) == float(b)
    assert float(a) != float(drawn(args, jax.random.key(1)))
    np.testing.assert_allclose(a, run(full)[0], atol=1e-6)


def test_gradients_finite_and_nonzero(full):
    def objective(disps, pose, colors, Ks, inv_Ks, noise):
        cam_T_cam = {f: G.pose_from_axisangle(*pose[f], invert=f < 0) for f in (-1, 1)}
        loss, _ = L.monodepth2_loss(colors, disps, cam_T_cam, Ks, inv_Ks, tiebreak_noise=noise)
        return loss

    grad_fn = jax.jit(jax.grad(objective, argnums=(0, 1)))
    g_disp, g_pose = grad_fn(full["disps"], full["pose"], full["colors"], full["Ks"], full["inv_Ks"], full["noise"])
    for s in SCALES:
        g = np.asarray(g_disp[s])
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, f"disps[{s}]"
    for f in (-1, 1):
        for name, g in zip(("axisangle", "translation"), g_pose[f]):
            g = np.asarray(g)
            assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, f"{name}[{f}]"


def test_first_minimum_ties_nan_and_gradient_routing():
    """The auto-mask's minimum, torch.min(x, dim) semantics worked by hand: the earliest minimal
    candidate wins ties, the first NaN wins, and the gradient reaches only the chosen candidate
    (a min over a stack would split it 1/2, 1/4 among ties)."""
    nan = np.nan
    table = np.array([  # rows: pixels; columns: candidates 0..3
        [1.0, 2.0, 3.0, 4.0],  # -> 0
        [2.0, 1.0, 1.0, 3.0],  # tie of 1 and 2 -> 1
        [3.0, 3.0, 3.0, 3.0],  # all tied -> 0
        [5.0, 4.0, 2.0, 2.0],  # tie of 2 and 3 -> 2
        [0.5, 0.2, 0.3, 0.1],  # -> 3
        [1.0, nan, 0.0, nan],  # first NaN -> 1
    ], np.float32)
    expected = np.array([0, 1, 0, 2, 3, 1])
    best, index = L.first_minimum([jnp.asarray(table[:, k]) for k in range(4)])
    assert index.dtype == jnp.int32
    np.testing.assert_array_equal(index, expected)
    np.testing.assert_array_equal(best, np.float32([1.0, 1.0, 3.0, 2.0, 0.1, nan]))

    finite = [jnp.asarray(table[:5, k]) for k in range(4)]
    weights = jnp.arange(1.0, 6.0)
    grads = jax.grad(lambda cs: jnp.sum(L.first_minimum(cs)[0] * weights))(finite)
    routed = np.zeros((5, 4), np.float32)
    routed[np.arange(5), expected[:5]] = np.arange(1.0, 6.0)
    np.testing.assert_array_equal(np.stack(grads, axis=1), routed)
    with pytest.raises(ValueError, match="no candidates"):
        L.first_minimum([])


def test_bf16_inputs_are_computed_in_float32(full):
    colors = {f: {s: jnp.asarray(v, jnp.bfloat16) for s, v in c.items()} for f, c in full["colors"].items()}
    loss, aux = jitted_loss(align_corners=True)(colors, full["disps"], full["cam_T_cam"], full["Ks"],
                                                full["inv_Ks"], full["zero_noise"])
    assert loss.dtype == jnp.float32 and aux["color_pred/1/0"].dtype == jnp.float32
    np.testing.assert_allclose(loss, run(full)[0], rtol=2e-2)  # only the input rounding differs


# ----------------------------------------------------------------------------------- bad input

def test_bad_inputs_name_the_argument(full):
    c, d, T, K, iK = full["colors"], full["disps"], full["cam_T_cam"], full["Ks"], full["inv_Ks"]
    nchw = {f: {s: np.transpose(v, (0, 3, 1, 2)) for s, v in cs.items()} for f, cs in c.items()}
    with pytest.raises(ValueError, match=r"colors\[0\]\[0\]: expected shape \(B,H,W,3\).*got \(2, 3, 64, 192\).*NCHW"):
        L.monodepth2_loss(nchw, d, T, K, iK)
    with pytest.raises(ValueError, match=r"Ks\[0\]: expected shape \(2,4,4\).*got \(2, 3, 3\)"):
        L.monodepth2_loss(c, d, T, {s: k[:, :3, :3] for s, k in K.items()}, iK)
    with pytest.raises(ValueError, match=r"disps\[2\]: expected shape \(2,16,48,1\).*got \(2, 1, 16, 48\)"):
        L.monodepth2_loss(c, {**d, 2: np.transpose(d[2], (0, 3, 1, 2))}, T, K, iK)
    with pytest.raises(ValueError, match=r"colors: missing frame 1"):
        L.monodepth2_loss({0: c[0], -1: c[-1]}, d, T, K, iK)
    with pytest.raises(ValueError, match=r"colors\[-1\]: missing scale 1"):
        L.monodepth2_loss({**c, -1: {0: c[-1][0]}}, d, T, K, iK, v1_multiscale=True)
    with pytest.raises(ValueError, match=r"cam_T_cam: missing frame -1"):
        L.monodepth2_loss(c, d, {1: T[1]}, K, iK)
    with pytest.raises(ValueError, match=r"tiebreak_noise\[3\]: expected shape \(2,64,192,2\).*got \(2, 8, 24, 2\)"):
        L.monodepth2_loss(c, d, T, K, iK, tiebreak_noise={**full["noise"], 3: np.zeros((2, 8, 24, 2))})
    with pytest.raises(ValueError, match=r"tiebreak_noise and rng"):
        L.monodepth2_loss(c, d, T, K, iK, tiebreak_noise=full["noise"], rng=jax.random.key(0))
    with pytest.raises(ValueError, match=r"colors\[0\]\[0\]: expected a floating dtype"):
        L.monodepth2_loss({**c, 0: {**c[0], 0: (c[0][0] * 255).astype(np.uint8)}}, d, T, K, iK)
    with pytest.raises(ValueError, match=r"y: expected shape \(2,24,40,3\)"):
        L.ssim(np.zeros((2, 24, 40, 3)), np.zeros((2, 3, 24, 40)))


# ------------------------------------------------------------- the 3x3 mean's per-platform form

def test_box_mean_forms_agree_and_are_chosen_by_platform():
    """`losses._box3` is two separable window sums when compiled for the CPU and one 3x3 window
    elsewhere (fewer bytes on a GPU). Both are the 3x3 mean to float32 rounding, with the same
    gradient; the form each platform gets is read from the exported StableHLO, no device needed."""
    import re

    from exported_forms import stablehlo_by_platform

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.uniform(0, 1, (2, 12, 17, 3)), jnp.float32)
    want = sum(np.asarray(x, np.float64)[:, a:a + 10, b:b + 15] for a in range(3) for b in range(3)) / 9
    for form in (L._box3_separable, L._box3_window):
        got = np.asarray(jax.jit(form)(x))
        np.testing.assert_allclose(got, want, rtol=0, atol=3e-7)
    # the gradient of sum(w * mean(x)) is the window sum of w, zero-padded by 2, / 9
    w = jnp.asarray(rng.normal(size=(2, 10, 15, 3)), jnp.float32)
    wp = np.pad(np.asarray(w, np.float64), ((0, 0), (2, 2), (2, 2), (0, 0)))
    want_grad = sum(wp[:, a:a + 12, b:b + 17] for a in range(3) for b in range(3)) / 9
    for form in (L._box3_separable, L._box3_window):
        got = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(w * form(x))))(x))
        np.testing.assert_allclose(got, want_grad, rtol=0, atol=2e-6)

    spec = jax.ShapeDtypeStruct((2, 12, 17, 3), jnp.float32)
    windows = {p: re.findall(r"window_dimensions = array<i64: ([0-9, ]+)>", text)
               for p, text in stablehlo_by_platform(L._box3, spec).items()}
    assert windows == {"cpu": ["1, 3, 1, 1", "1, 1, 3, 1"], "cuda": ["1, 3, 3, 1"], "tpu": ["1, 3, 3, 1"]}


def test_reflection_pad_forms_agree_and_are_chosen_by_platform():
    """`losses._reflect_pad1` is jnp.pad(mode="reflect") when compiled for the CPU and a sum of
    zero pads elsewhere (XLA:GPU fuses it into the SSIM windows). Both give torch's
    ReflectionPad2d(1) bitwise and route each gradient to the pixel it copied; the form each
    platform gets is read from the exported StableHLO, no device needed."""
    import re

    from exported_forms import stablehlo_by_platform

    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, (2, 6, 9, 3)).astype(np.float32)
    rows = np.array([1, *range(6), 4])   # padded index -> source index (reflection, not edge)
    cols = np.array([1, *range(9), 7])
    want = x[:, rows][:, :, cols]
    w = rng.normal(size=(2, 8, 11, 3))
    want_grad = np.zeros(x.shape)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            want_grad[:, r, c] += w[:, i, j]
    for form in (L._reflect_pad1_concat, L._reflect_pad1_sum):
        np.testing.assert_array_equal(np.asarray(jax.jit(form)(x)), want)
        got = jax.jit(jax.grad(lambda x: jnp.sum(jnp.asarray(w, jnp.float32) * form(x))))(x)
        np.testing.assert_allclose(np.asarray(got), want_grad, rtol=1e-6, atol=1e-6)

    spec = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    ops = {p: (len(re.findall(r"stablehlo\.concatenate", text)), len(re.findall(r"stablehlo\.pad", text)))
           for p, text in stablehlo_by_platform(L._reflect_pad1, spec).items()}
    assert ops["cpu"][0] > 0 and ops["cpu"][1] == 0, ops
    assert ops["cuda"] == ops["tpu"] == (0, 6), ops


def test_reprojection_is_recomputed_in_the_backward_on_gpu_only():
    """`losses._reprojection_recomputed` is `jax.checkpoint`ed when compiled for GPU/TPU (the
    backward recomputes the SSIM statistics) and plain on the CPU; both give the same loss and
    gradient. Read from the exported StableHLO (remat shows as an optimization barrier)."""
    import functools
    import re

    from exported_forms import stablehlo_by_platform

    rng = np.random.default_rng(11)
    pred = jnp.asarray(rng.uniform(0, 1, (2, 6, 9, 3)), jnp.float32)
    target = jnp.asarray(rng.uniform(0, 1, (2, 6, 9, 3)), jnp.float32)
    plain = functools.partial(L._reprojection_with_stats, no_ssim=False)
    results = []
    for form in (plain, jax.checkpoint(plain)):
        f = lambda p, y: jnp.sum(form(p, L._target_stats(y)) ** 2)
        results.append(jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(pred, target))
    # the same sums in another order (XLA fuses the recomputation differently): a gradient element
    # that cancels to ~5e-3 from terms of ~0.5 can move by a few ulp of those terms (2e-7 seen
    # with jax 0.12), hence atol 1e-6 on gradients of magnitude <= 1
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(L._reprojection_recomputed(pred, L._target_stats(target), False),
                                  plain(pred, L._target_stats(target)))

    spec = jax.ShapeDtypeStruct(pred.shape, jnp.float32)
    grad = jax.grad(lambda p, y: jnp.sum(L._reprojection_recomputed(p, L._target_stats(y), False)))
    barriers = {p: len(re.findall(r"stablehlo\.optimization_barrier", text))
                for p, text in stablehlo_by_platform(grad, spec, spec).items()}
    assert barriers == {"cpu": 0, "cuda": 1, "tpu": 1}, barriers


def test_gpu_forms_match_monodepth2(ref, full, monkeypatch):
    """The GPU forms of the 3x3 mean and the reflection pad against Monodepth2's numbers, run
    here on the CPU: SSIM, the reprojection loss and the full loss (recorded tie-break noise,
    torch-default sampling)."""
    monkeypatch.setattr(L, "_box3", L._box3_window)
    monkeypatch.setattr(L, "_reflect_pad1", L._reflect_pad1_sum)
    out = L.ssim(nhwc(ref["ssim_x"]), nhwc(ref["ssim_y"]))
    np.testing.assert_allclose(out, nhwc(ref["ssim_out"]), atol=MAP_ATOL)
    pred, target = nhwc(ref["reproj_pred"]), nhwc(ref["reproj_target"])
    np.testing.assert_allclose(L.reprojection_loss(pred, target), nhwc(ref["reproj_loss"]), atol=MAP_ATOL)
    loss, aux = jax.jit(lambda c, d, t, k, ik, n: L.monodepth2_loss(c, d, t, k, ik, tiebreak_noise=n,
                                                                   align_corners=False))(
        full["colors"], full["disps"], full["cam_T_cam"], full["Ks"], full["inv_Ks"], full["noise"])
    np.testing.assert_allclose(loss, ref["full_out_loss"], rtol=LOSS_RTOL)
    for s in SCALES:
        np.testing.assert_allclose(aux[f"loss/{s}"], ref[f"full_out_loss_s{s}"], rtol=LOSS_RTOL)
