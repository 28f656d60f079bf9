"""Flax networks: parameter counts pinned to the PyTorch originals, scratch init, jitted forward of
DepthNet and PoseNet at 64x192 (fp32 and bf16), BatchNorm statistics in train mode, bad input."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xdistill_jax.models.depth import DepthNet
from xdistill_jax.models.pose import PoseNet
from xdistill_jax.models.resnet import ResNetEncoder, encoder_channels

H, W, B = 64, 192, 2

# PyTorch counts (reference §3; torchvision resnet34/50 totals minus their 513,000 / 2,049,000 fc params)
PINNED = {
    "resnet18": 11_176_512,
    "resnet18_pose": 11_185_920,
    "resnet34": 21_284_672,
    "resnet50": 23_508_032,
    "depth_decoder": 3_152_724,
    "pose_decoder": 1_314_572,
}


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _abstract(model, channels):
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, channels)))


def _images(seed, channels=3):
    return jax.random.uniform(jax.random.key(seed), (B, H, W, channels), jnp.float32)


@pytest.fixture(scope="module")
def depth_vars():
    return jax.jit(DepthNet().init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


@pytest.fixture(scope="module")
def pose_vars():
    return jax.jit(PoseNet().init)(jax.random.key(1), jnp.zeros((1, 64, 64, 6)))


@pytest.fixture(scope="module")
def depth_fp32(depth_vars):
    return jax.jit(DepthNet().apply)(depth_vars, _images(5))


def test_param_counts_pinned():
    depth = _abstract(DepthNet(), 3)["params"]
    pose = _abstract(PoseNet(), 6)["params"]
    got = {
        "resnet18": _count(depth["encoder"]),
        "resnet18_pose": _count(pose["encoder"]),
        "resnet34": _count(_abstract(ResNetEncoder(34), 3)["params"]),
        "resnet50": _count(_abstract(ResNetEncoder(50), 3)["params"]),
        "depth_decoder": _count(depth["decoder"]),
        "pose_decoder": _count(pose["decoder"]),
    }
    assert got == PINNED
    # ResNet-50 depth net: decoder widths follow the 4x wider encoder features
    assert encoder_channels(50) == (64, 256, 512, 1024, 2048)
    assert _count(_abstract(DepthNet(50), 3)["params"]["decoder"]) > PINNED["depth_decoder"]


def test_param_counts_equal_torch_modules():
    torch = pytest.importorskip("torch")
    import torch_nets

    def n_params(module, skip="fc."):
        return sum(p.numel() for k, p in module.named_parameters() if not k.startswith(skip))

    assert n_params(torch_nets.ResNet(18)) == PINNED["resnet18"]
    assert n_params(torch_nets.ResNet(18, in_channels=6)) == PINNED["resnet18_pose"]
    assert n_params(torch_nets.ResNet(34)) == PINNED["resnet34"]
    r50 = torch_nets.ResNet(50)
    assert n_params(r50) == PINNED["resnet50"]
    assert n_params(r50, skip="-") == 25_557_032  # torchvision resnet50 with its fc
    assert n_params(torch_nets.DepthDecoder()) == PINNED["depth_decoder"]
    assert n_params(torch_nets.PoseDecoder()) == PINNED["pose_decoder"]
    del torch


def test_scratch_init_is_torchvision_and_torch_default(depth_vars):
    p = depth_vars["params"]
    # ResNet convs: kaiming normal, fan_out, relu gain: std sqrt(2 / (9 * 256)) for a 3x3 256->256 conv
    k = np.asarray(p["encoder"]["layer3_1"]["conv1"]["kernel"])
    assert k.shape == (256, 3, 3, 256)  # OHWI (models/conv.py)
    assert abs(k.std() / math.sqrt(2 / (9 * 256)) - 1) < 0.02
    assert np.abs(k).max() > 3.5 * k.std()  # untruncated (a 2-sigma truncation would cap it)
    assert "bias" not in p["encoder"]["layer3_1"]["conv1"]
    bn = p["encoder"]["layer3_1"]["bn1"]
    np.testing.assert_array_equal(bn["scale"], 1.0)
    np.testing.assert_array_equal(bn["bias"], 0.0)
    stats = depth_vars["batch_stats"]["encoder"]["layer3_1"]["bn1"]
    np.testing.assert_array_equal(stats["mean"], 0.0)
    np.testing.assert_array_equal(stats["var"], 1.0)
    # decoder convs: U(+-1/sqrt(fan_in)) for weight and bias, fan_in = 9 * 512 for upconv_4_0
    conv = p["decoder"]["upconv_4_0"]
    bound = 1 / math.sqrt(9 * 512)
    for leaf in (conv["kernel"], conv["bias"]):
        leaf = np.asarray(leaf)
        assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.9 * bound
    assert abs(np.asarray(conv["kernel"]).std() / (bound / math.sqrt(3)) - 1) < 0.02


def test_depthnet_forward(depth_fp32):
    assert sorted(depth_fp32) == [0, 1, 2, 3]
    for s, d in depth_fp32.items():
        assert d.shape == (B, H // 2**s, W // 2**s, 1)
        assert d.dtype == jnp.float32
        d = np.asarray(d)
        assert np.all(d > 0) and np.all(d < 1)
        assert d.std() > 0  # depends on the pixels


def test_depthnet_bf16_close_to_fp32(depth_vars, depth_fp32):
    model = DepthNet(dtype=jnp.bfloat16)
    # bf16 compute keeps fp32 params
    abstract = _abstract(model, 3)
    assert {x.dtype for x in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
    out = jax.jit(model.apply)(depth_vars, _images(5))
    for s in range(4):
        assert out[s].dtype == jnp.float32
        diff = np.abs(np.asarray(out[s]) - np.asarray(depth_fp32[s]))
        assert diff.max() < 2e-2, (s, diff.max())
        assert diff.mean() < 3e-3, (s, diff.mean())


def test_train_mode_updates_batch_stats(depth_vars):
    x = _images(6)
    out, updates = jax.jit(lambda v, x: DepthNet().apply(v, x, train=True, mutable=["batch_stats"]))(depth_vars, x)
    assert set(updates) == {"batch_stats"}
    old, new = depth_vars["batch_stats"]["encoder"], updates["batch_stats"]["encoder"]
    assert jax.tree.structure(old) == jax.tree.structure(new)
    for leaf_old, leaf_new in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
        assert not np.allclose(leaf_old, leaf_new)
    for s in range(4):  # batch statistics, so outputs differ from eval mode but stay valid
        assert np.all((np.asarray(out[s]) > 0) & (np.asarray(out[s]) < 1))


def test_batchnorm_update_is_torchs(depth_vars):
    """bn1's running stats after one train step, by hand: 0.9 * old + 0.1 * batch statistic, with
    torch's unbiased variance (x n/(n-1)). A tiny input keeps n = 2*4*4 small so the factor shows."""
    enc_vars = {c: depth_vars[c]["encoder"] for c in ("params", "batch_stats")}
    x = jax.random.uniform(jax.random.key(8), (2, 8, 8, 3))
    _, updates = jax.jit(lambda v, x: ResNetEncoder(18).apply(v, x, train=True, mutable=["batch_stats"]))(enc_vars, x)
    k = enc_vars["params"]["conv1"]["kernel"]
    y = jax.lax.conv_general_dilated((x - 0.45) / 0.225, k, (2, 2), ((3, 3), (3, 3)),
                                     dimension_numbers=("NHWC", "OHWI", "NHWC"))
    y = np.asarray(y, np.float64)
    n = y.size // y.shape[-1]
    assert n == 32
    new = updates["batch_stats"]["bn1"]
    np.testing.assert_allclose(new["mean"], 0.1 * y.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 + 0.1 * y.var(axis=(0, 1, 2)) * n / (n - 1), rtol=1e-4)


def test_batchnorm_moment_forms_and_the_form_each_platform_gets():
    """`resnet._batch_norm`: two-pass moments on the CPU, one pass shifted by the running mean on
    GPU/TPU. Against float64 on activations whose mean is 1e4 x their spread, the shifted pass is
    as exact as two-pass once the shift is near the mean (it is the running mean), and the unshifted
    one-pass form (K = 0, use_fast_variance) is not; outputs and gradients of the two production
    forms agree. The form each platform gets is read from the exported StableHLO, no device needed."""
    from exported_forms import stablehlo_by_platform
    from xdistill_jax.models import resnet

    rng = np.random.default_rng(13)
    x64 = 100.0 + 0.01 * rng.normal(size=(4, 6, 10, 3))
    x = jnp.asarray(x64, jnp.float32)
    x32 = np.asarray(x, np.float64)  # what float32 holds
    axes = (0, 1, 2)
    true_var = x32.var(axis=axes)
    near = jnp.asarray(x32.mean(axis=axes) + 0.004, jnp.float32)  # a running mean a bit off
    for moments, shift in ((resnet._moments_two_pass, near), (resnet._moments_shifted, near)):
        mean, var = jax.jit(moments, static_argnums=2)(x, shift, axes)
        np.testing.assert_allclose(mean, x32.mean(axis=axes), rtol=1e-6)
        np.testing.assert_allclose(var, true_var, rtol=2e-3)
    _, var0 = jax.jit(resnet._moments_shifted, static_argnums=2)(x, jnp.zeros(3), axes)
    assert np.max(np.abs(np.asarray(var0) / true_var - 1)) > 0.5  # catastrophic cancellation

    # the whole train-mode normalisation, value and gradients, on ordinary activations
    x = jnp.asarray(3.0 + rng.normal(size=(4, 6, 10, 3)), jnp.float32)
    shift = jnp.mean(x, axis=axes) + 0.1
    scale, bias = jnp.asarray([1.0, 2.0, 0.5]), jnp.asarray([0.0, 0.1, -0.2])
    w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    outs = []
    for moments in (resnet._moments_two_pass, resnet._moments_shifted):
        f = functools.partial(resnet._batch_norm_train, axes=axes, epsilon=1e-5, moments=moments)
        loss = lambda x, s, b: jnp.sum(w * f(x, shift, s, b)[0] ** 2)
        outs.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, scale, bias))
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)

    spec = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    vec = jax.ShapeDtypeStruct((3,), jnp.float32)
    bn = functools.partial(resnet._batch_norm, axes=axes, epsilon=1e-5)
    found = {p: len(re.findall(r"stablehlo\.maximum", text))
             for p, text in stablehlo_by_platform(bn, spec, vec, vec, vec).items()}
    assert found == {"cpu": 0, "cuda": 1, "tpu": 1}, found  # max(E[(x-K)^2] - E[x-K]^2, 0)


def test_a_bn_shift_collection_gives_the_one_pass_variance_its_shift(monkeypatch):
    """A call from zero running statistics (the pose net's one-device vmap, which needs the update
    terms alone) took the GPU/TPU form's one-pass variance unshifted, E[x^2] - E[x]^2: as
    inexact as `use_fast_variance` on activations whose mean is far beyond their spread, however
    well the running means had followed the batches (until 2026-12-07). A "bn_shift" collection
    now gives it the running means; `objective.predict_poses` passes them on one device."""
    from xdistill_jax import objective, platform_forms
    from xdistill_jax.models import resnet

    rng = np.random.default_rng(3)
    x = jnp.asarray(100.0 + 0.01 * rng.normal(size=(4, 6, 10, 3)), jnp.float32)
    x32 = np.asarray(x, np.float64)
    true_var = x32.var(axis=(0, 1, 2))
    bn = resnet.TorchBatchNorm()
    variables = bn.init(jax.random.key(0), x)
    zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
    near = {"mean": jnp.asarray(x32.mean(axis=(0, 1, 2)) + 0.004, jnp.float32)}

    def running_var(extra):
        @jax.jit
        def f(x):
            with platform_forms.target("gpu"):
                return bn.apply({"params": variables["params"], "batch_stats": zeros, **extra}, x,
                                mutable=["batch_stats"])[1]["batch_stats"]["var"]
        n = x.size // 3
        return np.asarray(f(x), np.float64) / (1 - bn.momentum) * (n - 1) / n  # the batch variance

    np.testing.assert_allclose(running_var({"bn_shift": near}), true_var, rtol=2e-3)
    assert np.max(np.abs(running_var({}) / true_var - 1)) > 0.5  # unshifted: catastrophic

    # predict_poses on one device gives each pose-net BatchNorm the running mean as its shift
    shifts = []
    moments = resnet._moments_shifted

    def spy(x, shift, axes):
        shifts.append(shift)
        return moments(x, shift, axes)

    monkeypatch.setattr(resnet, "_moments_shifted", spy)
    net = PoseNet()

    class Nets:
        pose = net

    pose = net.init(jax.random.key(0), jnp.zeros((2, 32, 64, 6)), train=False)
    stats = jax.tree.map(lambda a: jnp.full_like(a, 0.75), pose["batch_stats"])
    aug = jax.random.uniform(jax.random.key(1), (2, 3, 32, 64, 3))
    with platform_forms.target("gpu", devices=1):  # eagerly: the shifts are concrete arrays
        objective.predict_poses(Nets, pose["params"], stats, aug, True)
    assert len(shifts) == 20  # the ResNet-18 pose encoder's BatchNorms, once for both pairs
    for shift in shifts:
        np.testing.assert_array_equal(np.asarray(shift), 0.75)  # were 0


def test_posenet_forward(pose_vars):
    apply = jax.jit(PoseNet().apply)
    pair = _images(7, channels=6)
    axisangle, translation = apply(pose_vars, pair)
    assert axisangle.shape == translation.shape == (B, 3)
    assert axisangle.dtype == translation.dtype == jnp.float32
    assert np.all(np.isfinite(axisangle)) and np.all(np.isfinite(translation))
    swapped = jnp.concatenate([pair[..., 3:], pair[..., :3]], axis=-1)  # frame order matters
    assert not np.allclose(apply(pose_vars, swapped)[1], translation)
    a16, t16 = jax.jit(PoseNet(dtype=jnp.bfloat16).apply)(pose_vars, pair)
    assert a16.dtype == jnp.float32
    scale = float(np.abs(translation).max())
    np.testing.assert_allclose(t16, translation, atol=0.05 * scale)
    np.testing.assert_allclose(a16, axisangle, atol=0.05 * float(np.abs(axisangle).max()))


def test_bad_input_is_named(depth_vars):
    with pytest.raises(ValueError, match="divisible by 32"):
        DepthNet().apply(depth_vars, jnp.zeros((1, 48, 80, 3)))
    with pytest.raises(ValueError, match=r"expects images of shape \(B,H,W,6\)"):
        ResNetEncoder(18, num_input_images=2).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="num_layers=101"):
        ResNetEncoder(101).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="scales"):
        jax.eval_shape(DepthNet(scales=(0, 4)).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def assert_leaves_close(grads, grads_ref, rel: float):
    """Every leaf of `grads` within rel x (the largest |entry| of the `grads_ref` leaf)."""
    for path, g, r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads),
                          jax.tree.leaves(grads_ref)):
        scale = float(jnp.max(jnp.abs(r)))
        assert scale > 0, path[0]
        err = float(jnp.max(jnp.abs(g - r)))
        assert err <= rel * scale, (jax.tree_util.keystr(path[0]), err, scale)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 9, 11, 3), (2, 8, 10, 4)])
def test_stem_max_pool_value_and_gradient_are_nn_max_pools(dtype, shape):
    """The stem's custom-gradient max-pool against flax's (XLA select-and-scatter): bitwise, with
    ties (post-ReLU zeros and repeated values) that decide where the gradient goes."""
    from flax import linen as nn

    from xdistill_jax.models.resnet import max_pool_3x3_s2

    ref = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # noqa: E731
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(np.maximum(np.round(rng.normal(size=shape) * 4) / 4, 0.0), dtype)
    y_ref, vjp_ref = jax.vjp(ref, x)
    g = jnp.asarray(rng.normal(size=y_ref.shape), dtype)
    (d_ref,) = vjp_ref(g)
    # the windows hold ties: first-maximum routing matters here
    flat = np.asarray(x, np.float32)
    windows = [flat[:, i:i + 3, j:j + 3] for i in range(0, shape[1] - 2, 2) for j in range(0, shape[2] - 2, 2)]
    tied = sum(int(((w == w.max(axis=(1, 2), keepdims=True)).sum(axis=(1, 2)) > 1).sum()) for w in windows)
    assert tied > 10
    y, vjp = jax.vjp(max_pool_3x3_s2, x)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    np.testing.assert_array_equal(np.asarray(vjp(g)[0], np.float32), np.asarray(d_ref, np.float32))
    jitted = jax.jit(jax.vmap(lambda x, g: jax.vjp(max_pool_3x3_s2, x)[1](g)[0]))
    np.testing.assert_array_equal(np.asarray(jitted(x[None], g[None])[0], np.float32),
                                  np.asarray(d_ref, np.float32))


def test_stem_max_pool_gradient_inside_the_jitted_encoder(monkeypatch):
    """The encoder's parameter gradients (train mode) with the custom max-pool against the same
    encoder with `nn.max_pool`, both jitted: equal up to rounding. XLA fuses and re-rounds across
    the pool inside the encoder, which a standalone check of the pool does not see (a version that
    re-found the maximum in the backward pass passed alone and was off by 1.4x here)."""
    from flax import linen as nn

    from xdistill_jax.models import resnet

    images = jax.random.uniform(jax.random.key(3), (2, 64, 96, 3), jnp.float32)
    encoder = ResNetEncoder(18)
    variables = jax.jit(encoder.init)(jax.random.key(4), images)
    feature_weights = [jax.random.normal(jax.random.key(10 + i), f.shape)
                       for i, f in enumerate(jax.eval_shape(encoder.apply, variables, images))]

    # Images and weights are arguments, as in the train step. Closed over, they are constants of
    # the program, and with the rbg PRNG's values XLA:CPU (jax 0.10.2, a 2026-12-03 VM) computed
    # the custom-pool program's gradients up to 13 % off in every layer, the last ones included,
    # whose gradients do not pass through the pool; its forward values, the same program with
    # arguments, eager mode and the nn.max_pool program were right (not explained further).
    def loss(params, images, feature_weights):
        features, _ = encoder.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
        return sum(jnp.sum(f * w) for f, w in zip(features, feature_weights))

    grads = jax.jit(jax.grad(loss))(variables["params"], images, feature_weights)
    monkeypatch.setattr(resnet, "max_pool_3x3_s2",
                        lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))))
    grads_ref = jax.jit(jax.grad(loss))(variables["params"], images, feature_weights)
    assert_leaves_close(grads, grads_ref, 1e-4)


def _assert_bitwise_same_derivatives(fn, ref_fn, x, g):
    """fn and ref_fn: values, VJPs (cotangent g) and JVPs (tangent g) bitwise equal, eager and
    jitted."""
    def value_and_vjp(f, x, g):
        y, vjp = jax.vjp(f, x)
        return y, vjp(g)[0]

    for wrap in (lambda f: f, jax.jit):
        got = wrap(functools.partial(value_and_vjp, fn))(x, g)
        ref = wrap(functools.partial(value_and_vjp, ref_fn))(x, g)
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        t = wrap(lambda x, g: jax.jvp(fn, (x,), (g,))[1])(x, g)
        t_ref = wrap(lambda x, g: jax.jvp(ref_fn, (x,), (g,))[1])(x, g)
        np.testing.assert_array_equal(np.asarray(t, np.float32), np.asarray(t_ref, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_output_masked_relu_is_jax_nn_relu(dtype):
    """models.activations.relu (derivative from its output, so cuDNN can fuse it) against
    jax.nn.relu: values, reverse- and forward-mode derivatives bitwise, eager and jitted, with
    exact zeros, -0.0 and values that round to tiny magnitudes."""
    from xdistill_jax.models.activations import relu

    rng = np.random.default_rng(7)
    x = np.round(rng.normal(size=(4, 5, 6, 8)) * 4) / 4  # many exact zeros
    x[0, 0, 0, :4] = [-0.0, 0.0, 1e-30, -1e-30]
    x = jnp.asarray(x, dtype)
    g = jnp.asarray(rng.normal(size=x.shape), dtype)
    assert int(jnp.sum(x == 0)) > 50

    _assert_bitwise_same_derivatives(relu, jax.nn.relu, x, g)
    # the gradient is zero exactly where x <= 0
    d = jax.grad(lambda x: jnp.sum(relu(x).astype(jnp.float32)))(x)
    np.testing.assert_array_equal(np.asarray(d, np.float32), np.asarray(x > 0, np.float32))


def _jax_differentiates_expm1_from_its_output() -> bool:
    """JAX up to 0.11 differentiated expm1 as its output + 1; 0.12 as exp(x). At x = -20 the two
    differ in float32: expm1(-20) rounds to -1, so output + 1 is 0 and exp(-20) is not."""
    return float(jax.grad(jnp.expm1)(jnp.float32(-20.0))) == 0.0


def _elu_output_rule_reference(x):
    """jax.nn.elu's values with the derivative 1 where x > 0, else y + 1 (JAX <= 0.11's rule for
    expm1), written with stop_gradient instead of a custom JVP: the value is y (x - sg(x) is 0),
    the tangent t * sg(y + 1)."""
    y = jax.lax.stop_gradient(jax.nn.elu(x))
    one = jnp.ones((), jnp.result_type(x))
    return jnp.where(x > 0, x, y + (x - jax.lax.stop_gradient(x)) * (y + one))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_output_derived_elu_is_jax_nn_elu(dtype):
    """models.activations.elu (derivative from its output: 1 where y > 0, else y + 1) against
    jax.nn.elu: values, reverse- and forward-mode derivatives bitwise, eager and jitted, with
    exact zeros, -0.0, tiny and large negative values and NaN. From jax 0.12, whose jax.nn.elu
    derivative is exp(x), bitwise against the same rule written with stop_gradient, and within
    2 ulp of jax.nn.elu's."""
    from xdistill_jax.models.activations import elu

    rng = np.random.default_rng(8)
    x = np.round(rng.normal(size=(4, 5, 6, 8)) * 4) / 4
    x[0, 0, 0, :8] = [-0.0, 0.0, 1e-30, -1e-30, -100.0, -20.0, np.nan, 30.0]
    x = jnp.asarray(x, dtype)
    g = jnp.asarray(rng.normal(size=x.shape), dtype)

    if _jax_differentiates_expm1_from_its_output():
        _assert_bitwise_same_derivatives(elu, jax.nn.elu, x, g)
    else:  # jax >= 0.12: expm1's derivative is exp(x), within float rounding of y + 1
        _assert_bitwise_same_derivatives(elu, _elu_output_rule_reference, x, g)
        for wrap in (lambda f: f, jax.jit):
            got = wrap(jax.grad(lambda x: jnp.sum(elu(x) * g)))(x)
            want = wrap(jax.grad(lambda x: jnp.sum(jax.nn.elu(x) * g)))(x)
            ulp = float(jnp.finfo(dtype).eps)
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                       rtol=2 * ulp, atol=2 * ulp * float(jnp.max(jnp.abs(g))))
    # by hand: 1 for x > 0, exp(x) for x <= 0 (as y + 1 in float32: within its rounding near 1,
    # so exp(-20) comes out as 0, as it does from jax.nn.elu)
    d = np.asarray(jax.grad(lambda x: jnp.sum(elu(x)))(x.astype(jnp.float32)))
    xf = np.asarray(x, np.float32)
    np.testing.assert_allclose(d, np.where(xf > 0, 1.0, np.exp(np.minimum(xf, 0))), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stem_pool_before_or_after_relu_is_the_same(dtype):
    """`resnet.stem_relu_and_pool`'s two forms (ReLU then pool: the CPU's; pool then ReLU:
    elsewhere) give bitwise the same f0, pooled values and input gradients, eager and jitted,
    with ties, exact zeros and windows whose values are all <= 0."""
    from xdistill_jax.models import resnet

    rng = np.random.default_rng(22)
    x = np.round(rng.normal(size=(2, 9, 11, 4)) * 2) / 2  # many ties and zeros
    x[0, :3, :3, 0] = -1.0  # a window with nothing positive
    x[1, :3, :3, 1] = 0.0
    x = jnp.asarray(x, dtype)
    gs = (jnp.asarray(rng.normal(size=x.shape), dtype), jnp.asarray(rng.normal(size=(2, 5, 6, 4)), dtype))
    for wrap in (lambda f: f, jax.jit):
        results = []
        for form in (resnet._relu_then_pool, resnet._pool_then_relu):
            out, vjp = jax.vjp(wrap(form), x)
            results.append((*out, vjp(gs)[0]))
        for a, b in zip(*results):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    np.testing.assert_array_equal(results[0][1], resnet.max_pool_3x3_s2(jax.nn.relu(x)))
    assert float(results[0][1][0, 0, 0, 0]) == 0.0 and np.any(np.asarray(results[0][2]) != 0)


def test_stem_form_per_platform():
    """cpu applies the stem's ReLU before the pool only; cuda and tpu also to the pooled array
    (read from the exported StableHLO: the shapes `maximum` is applied at)."""
    from exported_forms import stablehlo_by_platform
    from xdistill_jax.models import resnet

    spec = jax.ShapeDtypeStruct((2, 8, 12, 3), jnp.float32)
    found = {p: sorted(set(re.findall(r"stablehlo.maximum %\S+, %\S+ : tensor<([0-9x]+)xf32>", text)))
             for p, text in stablehlo_by_platform(resnet.stem_relu_and_pool, spec).items()}
    assert found == {"cpu": ["2x8x12x3"], "cuda": ["2x4x6x3", "2x8x12x3"], "tpu": ["2x4x6x3", "2x8x12x3"]}, found


@pytest.mark.parametrize("copies", [1, 2])
def test_decoder_padded_elu_forms_against_float64(copies):
    """The depth decoder's padded activations (`depth.elu_reflect_padded`): ELU-then-pad per
    reader (the CPU's form) and one shared pad-then-ELU (elsewhere) give bitwise the same arrays,
    and gradients within float32 rounding of a float64 reference: ELU'(x) times the readers'
    cotangents summed and folded back from the reflected border by hand."""
    from xdistill_jax.models import depth

    rng = np.random.default_rng(21)
    x64 = rng.normal(size=(2, 5, 7, 3))
    x = jnp.asarray(x64, jnp.float32)
    gs = [rng.normal(size=(2, 7, 9, 3)) for _ in range(copies)]

    def src(n):  # padded index -> source index of a 1-pixel reflection pad
        return np.abs(np.arange(n + 2) - 1) - 2 * (np.arange(n + 2) == n + 1)

    xf = np.asarray(x, np.float64)
    fold = np.zeros_like(xf)
    rows, cols = src(5), src(7)
    for g in gs:
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                fold[:, r, c] += g[:, i, j]
    expected = np.where(xf > 0, 1.0, np.exp(np.minimum(xf, 0))) * fold
    outs, grads = [], []
    for form in (depth._elu_then_pad, depth._pad_then_elu):
        y, vjp = jax.vjp(lambda x: form(x, copies), x)
        outs.append(y)
        grads.append(np.asarray(vjp(tuple(jnp.asarray(g, jnp.float32) for g in gs))[0]))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(outs[0][0], jnp.pad(jax.nn.elu(x), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect"))
    for grad in grads:
        np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_decoder_padded_elu_form_per_platform():
    """cpu pads ELU(x) per reader; cuda and tpu take the ELU of one padded x (read from the
    exported StableHLO: the shape the expm1 is applied at)."""
    from exported_forms import stablehlo_by_platform
    from xdistill_jax.models import depth

    spec = jax.ShapeDtypeStruct((2, 6, 10, 3), jnp.float32)
    found = {}
    for p, text in stablehlo_by_platform(lambda x: depth.elu_reflect_padded(x, 2), spec).items():
        shapes = re.findall(r"exponential_minus_one %\S+ : tensor<([0-9x]+)xf32>", text)
        found[p] = sorted(set(shapes))
    assert found == {"cpu": ["2x6x10x3"], "cuda": ["2x8x12x3"], "tpu": ["2x8x12x3"]}, found


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 1, 3, 16), (2, 2, 1, 4)])
def test_decoder_tpu_forms_are_the_broadcast_and_the_pad(dtype, shape):
    """The TPU's forms of the decoder's upsampling and reflection padding (columns gathered by a
    0/1 matrix product) give bitwise the values of the broadcast and of jnp.pad (sizes of 1
    included, as jnp.pad reflects them), and their gradients the same sums: bitwise for the pad
    of maps of 2 or more pixels (at most two terms each), and within rounding where there are more
    terms, summed in another order (the upsampling's four; a size of 1 padded to 3)."""
    from xdistill_jax.models import depth

    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=shape), dtype)
    b, h, w, c = shape
    pairs = ((depth._reflect_pad1_by_pad, depth._reflect_pad1_columns_by_matmul, (b, h + 2, w + 2, c)),
             (depth._upsample_nearest2_by_broadcast, depth._upsample_nearest2_columns_by_matmul, (b, 2 * h, 2 * w, c)))
    for plain, tpu, out_shape in pairs:
        g = jnp.asarray(rng.normal(size=out_shape), dtype)
        y, vjp = jax.vjp(plain, x)
        y_tpu, vjp_tpu = jax.vjp(tpu, x)
        assert y_tpu.dtype == y.dtype and y_tpu.shape == out_shape
        np.testing.assert_array_equal(np.asarray(y_tpu, np.float32), np.asarray(y, np.float32))
        grad, grad_tpu = (np.asarray(f(g)[0], np.float64) for f in (vjp, vjp_tpu))
        tol = 8 * float(jnp.finfo(dtype).eps) * float(np.abs(np.asarray(g, np.float64)).max())
        if plain is depth._reflect_pad1_by_pad:
            if min(h, w) >= 2:
                np.testing.assert_array_equal(grad_tpu, grad)
            else:
                np.testing.assert_allclose(grad_tpu, grad, rtol=0, atol=tol)
        else:
            g64 = np.asarray(g, np.float64).reshape(b, h, 2, w, 2, c).sum(axis=(2, 4))
            for got in (grad, grad_tpu):
                np.testing.assert_allclose(got, g64, rtol=0, atol=tol)


def test_decoder_upsampling_and_padding_forms_per_platform():
    """The TPU gathers the decoder's upsampled and padded columns by a matrix product; the CPU and
    CUDA lower the broadcast and jnp.pad (no dot_general)."""
    from exported_forms import stablehlo_by_platform
    from xdistill_jax.models import depth

    spec = jax.ShapeDtypeStruct((2, 6, 10, 16), jnp.bfloat16)
    for fn in (depth.upsample_nearest2, depth.reflect_pad1):
        texts = stablehlo_by_platform(fn, spec)
        assert "stablehlo.dot_general" in texts["tpu"], fn.__name__
        assert all("dot_general" not in texts[p] for p in ("cpu", "cuda")), fn.__name__


def test_depthnet_gradients_with_the_output_masked_relu(monkeypatch):
    """DepthNet's parameter gradients (train mode, jitted) with models.activations.relu in the
    encoder against the same network with jax.nn.relu: the masks are the same, so the gradients
    agree to rounding (XLA may fuse the two programs differently)."""
    from xdistill_jax.models import resnet

    images = jax.random.uniform(jax.random.key(5), (2, 64, 96, 3), jnp.float32)
    net = DepthNet()
    variables = jax.jit(net.init)(jax.random.key(6), images)
    weights = {s: jax.random.normal(jax.random.key(20 + s), d.shape)
               for s, d in jax.eval_shape(net.apply, variables, images).items()}

    def loss(params, images, weights):
        disps, _ = net.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
        return sum(jnp.sum(disps[s] * w) for s, w in weights.items())

    grads = jax.jit(jax.grad(loss))(variables["params"], images, weights)
    monkeypatch.setattr(resnet, "relu", jax.nn.relu)
    grads_ref = jax.jit(jax.grad(loss))(variables["params"], images, weights)
    assert_leaves_close(grads, grads_ref, 1e-5)


def test_batchnorm_groups_are_calls_in_a_row():
    """`TorchBatchNorm(batch_groups=G)` on G batches interleaved example-major is G calls in a
    row: each group normalised with its own statistics, the running statistics updated once per
    group in order (the pose net's two pairs, objective.predict_poses)."""
    from xdistill_jax.models.resnet import TorchBatchNorm

    groups, b = 3, 4
    x = jax.random.normal(jax.random.key(0), (b * groups, 5, 7, 6)) * 2.0 + jnp.arange(6.0)
    x = x + jnp.tile(jnp.arange(groups, dtype=x.dtype), b)[:, None, None, None]  # group g: + g
    bn = TorchBatchNorm()
    variables = {"params": {"scale": jnp.linspace(0.5, 1.5, 6), "bias": jnp.linspace(-1.0, 1.0, 6)},
                 "batch_stats": {"mean": jnp.linspace(-0.3, 0.3, 6), "var": jnp.linspace(0.5, 2.0, 6)}}
    got, upd = TorchBatchNorm(batch_groups=groups).apply(variables, x, mutable=["batch_stats"])
    stats, want = variables["batch_stats"], []
    for g in range(groups):  # group g = rows g, g + G, g + 2G, ...
        y, u = bn.apply({"params": variables["params"], "batch_stats": stats}, x[g::groups], mutable=["batch_stats"])
        stats = u["batch_stats"]
        want.append(y)
    want = jnp.stack(want, axis=1).reshape(x.shape)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for k in ("mean", "var"):
        np.testing.assert_allclose(np.asarray(upd["batch_stats"][k]), np.asarray(stats[k]), rtol=1e-6, atol=1e-7)
    # the groups' statistics differ, so one 12-example batch would not pass the check above
    plain = bn.apply(variables, x, mutable=["batch_stats"])[0]
    assert float(jnp.max(jnp.abs(plain - want))) > 1e-2
    with pytest.raises(ValueError, match="batch_groups=3 must divide the batch"):
        TorchBatchNorm(batch_groups=groups).apply(variables, x[:10], mutable=["batch_stats"])
