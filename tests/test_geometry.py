"""Geometry against Monodepth2's own numbers (tests/data/monodepth2_ref.npz, NCHW as monodepth2
holds it) and against cases worked out by hand."""


import numpy as np
import pytest
import jax
import jax.numpy as jnp

from xdistill_jax import geometry as G

H, W = 24, 40


def nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


@pytest.fixture(scope="session")
def pose(ref):
    return ref["warp_axisangle"][:, 0], ref["warp_translation"][:, 0]


def test_disp_to_depth(ref):
    scaled, depth = G.disp_to_depth(nhwc(ref["d2d_disp"]), 0.1, 100.0)
    np.testing.assert_allclose(scaled, nhwc(ref["d2d_scaled_disp"]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(depth, nhwc(ref["d2d_depth"]), rtol=1e-6)
    # the ends of the sigmoid range map to max / min depth
    assert np.isclose(depth[0, 0, 0, 0], 100.0) and np.isclose(depth[0, 0, 1, 0], 0.1)


def test_rotation_translation_and_pose(ref, pose):
    aa, t = pose
    np.testing.assert_allclose(G.rot_from_axisangle(aa), ref["warp_rot"], atol=1e-6)
    np.testing.assert_allclose(G.translation_matrix(t), ref["warp_transl_mat"], atol=0)
    fwd = G.pose_from_axisangle(aa, t)
    inv = G.pose_from_axisangle(aa, t, invert=True)
    np.testing.assert_allclose(fwd, ref["warp_T_fwd"], atol=1e-6)
    np.testing.assert_allclose(inv, ref["warp_T_inv"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(fwd) @ np.asarray(inv), np.broadcast_to(np.eye(4), (2, 4, 4)), atol=1e-6)


def test_rotation_by_hand_and_gradient_at_zero():
    quarter_turn_z = np.array([[0.0, 0.0, np.pi / 2]], np.float32)
    r = np.asarray(G.rot_from_axisangle(quarter_turn_z))[0]
    np.testing.assert_allclose(r[:3, :3], [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-6)
    assert r[3, 3] == 1 and not r[3, :3].any() and not r[:3, 3].any()
    # the zero rotation (what a freshly initialised pose net predicts) must have a finite gradient
    g = jax.grad(lambda v: jnp.sum(G.pose_from_axisangle(v, jnp.zeros((1, 3))) ** 2))(jnp.zeros((1, 3)))
    assert np.all(np.isfinite(g))


def test_backproject_and_project(ref):
    cam = G.backproject(nhwc(ref["warp_depth"]), ref["warp_inv_K"])
    assert cam.shape == (2, H, W, 4)
    # monodepth2 stores (B,4,H*W) with column y*W + x
    np.testing.assert_allclose(np.asarray(cam).reshape(2, H * W, 4).transpose(0, 2, 1), ref["warp_cam_points"],
                               rtol=1e-6, atol=1e-5)
    for name in ("fwd", "inv"):
        T = ref[f"warp_T_{name}"]
        pix = G.project(cam, ref["warp_K"], T)
        grid = G.pixels_to_grid(pix, H, W)
        np.testing.assert_allclose(grid, ref[f"warp_pix_{name}"], atol=1e-5)
        fused = G.pixel_coords(nhwc(ref["warp_depth"]), ref["warp_K"], ref["warp_inv_K"], T)
        np.testing.assert_allclose(G.pixels_to_grid(fused, H, W), ref[f"warp_pix_{name}"], atol=1e-5)
        np.testing.assert_allclose(G.grid_to_pixels(grid, H, W), pix, atol=1e-4)


@pytest.mark.parametrize("name", ["fwd", "inv"])
def test_bilinear_sample_on_reference_grid(ref, name):
    src = nhwc(ref["warp_src"])
    pix = G.grid_to_pixels(ref[f"warp_pix_{name}"], H, W)
    np.testing.assert_allclose(G.bilinear_sample(src, pix, align_corners=True),
                               nhwc(ref[f"warp_out_{name}_aligncorners_true"]), atol=1e-6)
    # the torch default path un-normalises the same grid differently: ~4e-6 from float32 rounding
    np.testing.assert_allclose(G.bilinear_sample(src, pix, align_corners=False),
                               nhwc(ref[f"warp_out_{name}"]), atol=1e-5)


@pytest.mark.parametrize("name", ["fwd", "inv"])
def test_warp_matches_monodepth2(ref, name):
    args = (nhwc(ref["warp_src"]), nhwc(ref["warp_depth"]), ref["warp_K"], ref["warp_inv_K"], ref[f"warp_T_{name}"])
    # src is U[0,1) noise (intensity slope up to ~1 per pixel), so float32 rounding of the sample
    # position (~1e-5 px) shows as ~1e-5 here; an exact float64 warp differs from torch by 7e-6 too.
    np.testing.assert_allclose(G.warp(*args), nhwc(ref[f"warp_out_{name}_aligncorners_true"]), atol=3e-5)
    np.testing.assert_allclose(G.warp(*args, align_corners=False), nhwc(ref[f"warp_out_{name}"]), atol=3e-5)


def test_ray_forms_agree_and_are_chosen_by_platform():
    """`geometry._rays` (A @ [x, y, 1] per pixel) takes the pixel positions as broadcast iotas
    when compiled for the CPU and as full (h,w) constants elsewhere (XLA:GPU then reads the pose
    gradient fewer times). The values are the same bitwise, the gradient is sum(g [x, y, 1]);
    the form each platform gets is read from the exported StableHLO, no device needed."""
    import re

    from exported_forms import stablehlo_by_platform

    rng = np.random.default_rng(7)
    h, w = 5, 7
    A = jnp.asarray(rng.normal(size=(2, 3, 3)), jnp.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    pix = np.stack([xs, ys, np.ones_like(xs)], axis=-1)                 # (h,w,3)
    want = np.einsum("bij,hwj->bhwi", np.asarray(A, np.float64), pix)
    g = rng.normal(size=(2, h, w, 3))
    want_grad = np.einsum("bhwi,hwj->bij", g, pix)
    outs = []
    for form in (G._rays_broadcast, G._rays_grid):
        out = np.asarray(jax.jit(form, static_argnums=(1, 2))(A, h, w))
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-5)
        outs.append(out)
        grad = jax.jit(jax.grad(lambda A: jnp.sum(jnp.asarray(g, jnp.float32) * form(A, h, w))))(A)
        np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(outs[0], outs[1])

    spec = jax.ShapeDtypeStruct(A.shape, jnp.float32)
    found = {p: (len(re.findall(r"stablehlo\.iota", text)),
                 len(re.findall(rf"stablehlo\.constant dense<[^>]*> : tensor<{h}x{w}xf32>", text)))
             for p, text in stablehlo_by_platform(lambda A: G._rays(A, h, w), spec).items()}
    assert found == {"cpu": (2, 0), "cuda": (0, 2), "tpu": (0, 2)}, found


def test_warp_by_hand():
    """Identity pose reproduces the image; a sideways camera shift of 1 at depth 5 with fx = 10 moves
    the sample 2 px; align_corners=False reads x*W/(W-1) - 0.5."""
    b, h, w = 1, 4, 6
    ramp = np.broadcast_to(np.arange(w, dtype=np.float32)[None, None, :, None], (b, h, w, 1))
    K = np.array([[[10.0, 0, 3, 0], [0, 10, 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]]], np.float32)
    inv_K = np.linalg.inv(K).astype(np.float32)
    depth = np.full((b, h, w, 1), 5.0, np.float32)
    eye = np.eye(4, dtype=np.float32)[None]
    np.testing.assert_allclose(G.warp(ramp, depth, K, inv_K, eye), ramp, atol=1e-5)
    shift = eye.copy()
    shift[0, 0, 3] = 1.0
    expect = np.minimum(np.arange(w) + 2.0, w - 1)
    np.testing.assert_allclose(np.asarray(G.warp(ramp, depth, K, inv_K, shift))[0, :, :, 0],
                               np.broadcast_to(expect, (h, w)), atol=1e-5)
    torch_default = np.clip(np.arange(w) * w / (w - 1) - 0.5, 0, w - 1)
    np.testing.assert_allclose(np.asarray(G.warp(ramp, depth, K, inv_K, eye, align_corners=False))[0, :, :, 0],
                               np.broadcast_to(torch_default, (h, w)), atol=1e-5)


def test_border_padding_by_hand():
    img = np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1)  # [[0,1,2],[3,4,5]]
    pix = np.array([[[[-5.0, -5.0], [9.0, 0.5], [0.5, 0.5], [2.0, 1.0]]]], np.float32)  # (1,1,4,2)
    out = np.asarray(G.bilinear_sample(img, pix))[0, 0, :, 0]
    np.testing.assert_allclose(out, [0.0, 3.5, 2.0, 5.0], atol=1e-6)


def test_bilinear_sample_is_bitwise_the_same_on_1_2_4_devices():
    """Sampling is per example: its values and its gradient (w.r.t. the coordinates: depth and
    pose reach the loss through them) must not depend on how the batch is sharded; the train
    step's device-count invariance (tests/test_train_step.py) rests on it. Not every equivalent
    form does: four (B,h,w,C) products with broadcast weights, summed elementwise, gave coordinate
    gradients 5e-7 apart between 1 and 4 devices on XLA:CPU."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    assert len(jax.devices()) >= 4
    for seed, (b, h, w) in enumerate([(4, 32, 96), (8, 48, 160)]):
        rng = np.random.default_rng(seed)
        img = rng.random((b, h, w, 3), dtype=np.float32)
        pix = (rng.random((b, h, w, 2), dtype=np.float32) * 1.2 - 0.1) * np.float32([w - 1, h - 1])
        g = rng.standard_normal((b, h, w, 3)).astype(np.float32)

        def f(img, pix):
            out = G.bilinear_sample(img, pix)
            return jnp.sum(out * g), out

        step = jax.jit(jax.value_and_grad(f, argnums=1, has_aux=True))
        results = []
        for n in (1, 2, 4):
            sharding = NamedSharding(Mesh(np.array(jax.devices()[:n]), ("data",)), PartitionSpec("data"))
            (_, out), grad = step(jax.device_put(img, sharding), jax.device_put(pix, sharding))
            results.append((np.asarray(out), np.asarray(grad)))
        for out, grad in results[1:]:
            np.testing.assert_array_equal(out, results[0][0])
            np.testing.assert_array_equal(grad, results[0][1])


def test_upsample_bilinear(ref):
    np.testing.assert_allclose(G.upsample_bilinear(np.array([0.0, 1.0]).reshape(1, 1, 2, 1), (1, 4))[0, 0, :, 0],
                               [0.0, 0.25, 0.75, 1.0], atol=1e-7)
    # non-integer and down-scaling ratios take the general path: src = (i + 0.5) * in/out - 0.5
    row = np.arange(3.0).reshape(1, 1, 3, 1)
    np.testing.assert_allclose(G.upsample_bilinear(row, (1, 5))[0, 0, :, 0], [0.0, 0.4, 1.0, 1.6, 2.0], atol=1e-6)
    np.testing.assert_allclose(G.upsample_bilinear(np.arange(4.0).reshape(1, 4, 1, 1), (2, 1))[0, :, 0, 0],
                               [0.5, 2.5], atol=1e-6)
    # gradient of the 2x path (slices, no scatter) spreads each output back onto its two taps
    g = jax.grad(lambda x: jnp.sum(G.upsample_bilinear(x, (2, 4))))(jnp.ones((1, 1, 2, 1)))
    np.testing.assert_allclose(g[0, 0, :, 0], [4.0, 4.0], atol=1e-6)
    for s in range(4):
        up = G.upsample_bilinear(nhwc(ref[f"full_in_disp_s{s}"]), (64, 192))
        np.testing.assert_allclose(up, nhwc(ref[f"full_mid_disp_up_s{s}"]), atol=1e-6)


def test_upsample_forms_for_one_device_and_a_sharded_batch():
    """The integer-factor upsampling pads the resized axis by its edge values with jnp.pad for a
    batch on one device, by a concatenation along that axis otherwise (jnp.pad's edge mode
    slices every axis, and its gradient then moves rows between the devices of a sharded
    batch). The same values; gradients equal up to float32 rounding."""
    from xdistill_jax import platform_forms

    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 5, 7, 1)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(5).standard_normal((3, 40, 56, 1)), jnp.float32)
    loss = lambda x: jnp.sum(w * G.upsample_bilinear(x, (40, 56)) ** 2)  # noqa: E731
    out = {}
    for devices in (1, None):
        with platform_forms.target(None, devices=devices):
            out[devices] = (G.upsample_bilinear(x, (40, 56)), jax.grad(loss)(x))
    np.testing.assert_array_equal(out[1][0], out[None][0])
    np.testing.assert_allclose(out[1][1], out[None][1], rtol=1e-6, atol=1e-6)


def test_bad_inputs_name_the_argument(ref):
    depth = nhwc(ref["warp_depth"])
    src = nhwc(ref["warp_src"])
    with pytest.raises(ValueError, match=r"inv_K: expected shape \(2,4,4\).*got \(2, 3, 3\)"):
        G.backproject(depth, ref["warp_inv_K"][:, :3, :3])
    with pytest.raises(ValueError, match=r"depth: expected shape \(B,H,W,1\).*NCHW"):
        G.warp(src, ref["warp_depth"], ref["warp_K"], ref["warp_inv_K"], ref["warp_T_fwd"])
    with pytest.raises(ValueError, match=r"K: expected shape \(2,4,4\)"):
        G.warp(src, depth, ref["warp_K"][:1], ref["warp_inv_K"], ref["warp_T_fwd"])
    with pytest.raises(ValueError, match=r"axisangle: expected shape \(\?,3\)"):
        G.pose_from_axisangle(ref["warp_axisangle"], ref["warp_translation"][:, 0])
