"""The convolutions' platform forms (`models.conv`).

16-bit convolutions on a GPU with their channels padded for the tensor cores
(`tensor_core_channels`, `conv_padded_channels`): XLA:GPU's rule for f16, the same function, and
only in the GPU's form of the train step unless `model.gpu_channel_padding` is off. On the CPU,
convolutions over maps 1 pixel wide as one matrix product (`degenerate_on_cpu`, `conv_taps`):
the same function, in the CPU's form only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train_fixtures import make_batch, tiny_config
from xdistill_jax import config_utils, platform_forms, train
from xdistill_jax.models.conv import (conv_nhwc, conv_padded_channels, conv_taps, degenerate_on_cpu,
                                      hwio_to, tensor_core_channels)
from xdistill_jax.objective import Networks


@pytest.mark.parametrize("cin, cout, want", [
    (3, 64, (4, 64)),     # an image into a ResNet stem: 4 input channels, XLA's special case
    (3, 32, (4, 32)),
    (3, 16, None),        # 3 -> 8 inputs and 16 outputs: the input x 2.67 (> 1.35)
    (6, 64, (8, 64)),     # the pose stem's two images: x 1.33 input and kernel
    (256, 12, (256, 16)),  # the pose decoder's 6 x 2 outputs: x 1.33 output and kernel
    (32, 7, (32, 8)),     # the translator head, 7 classes: x 1.14
    (12, 256, (16, 256)),
    (6, 7, None),         # each x 1.33 and x 1.14, but the kernel x 64/42 = 1.52
    (1, 32, None),        # the translator's disparity input: x 8
    (16, 1, None),        # a disparity head: output x 8
    (64, 64, None),       # nothing to pad
])
def test_tensor_core_channels_follow_xla_f16_rule(cin, cout, want):
    assert tensor_core_channels(cin, cout) == want


def _dims(layout, cin, cout, k):
    return tuple({"O": cout, "I": cin, "H": k, "W": k}[d] for d in layout)


@pytest.mark.parametrize("cin, cout, k, stride, dilation, layout, bias", [
    (3, 64, 7, 2, 1, "OHWI", False),   # the depth stem
    (6, 64, 7, 2, 1, "HWIO", False),   # the pose stem, flax's layout
    (256, 12, 1, 1, 1, "OHWI", True),  # the pose decoder's last
    (32, 7, 3, 1, 2, "OHWI", True),    # a dilated one (sub-grid form) with a bias
])
def test_padded_convolution_is_the_convolution(cin, cout, k, stride, dilation, layout, bias):
    """Values and both gradients (input, kernel, bias) as the unpadded convolution's, float64."""
    pin, pout = tensor_core_channels(cin, cout) or (-(-cin // 8) * 8, -(-cout // 8) * 8)
    rng = np.random.default_rng(cin * cout + k)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, 19, 23, cin)))
        kern = jnp.asarray(rng.standard_normal(_dims(layout, cin, cout, k)))
        b = jnp.asarray(rng.standard_normal(cout)) if bias else None

        def conv(x, kern):
            return conv_nhwc(x, kern, layout, (stride, stride), "SAME", (dilation, dilation))

        def plain(x, kern, b):
            y = conv(x, kern)
            return y if b is None else y + b

        want, vjp_want = jax.vjp(plain, x, kern, b)
        got, vjp_got = jax.vjp(lambda x, kern, b: conv_padded_channels(conv, x, kern, b, layout, pin, pout),
                               x, kern, b)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        g = jnp.asarray(rng.standard_normal(want.shape))
        for a, w in zip(vjp_got(g), vjp_want(g)):
            if w is None:
                assert a is None
            else:
                assert a.shape == w.shape
                np.testing.assert_allclose(a, w, rtol=1e-12, atol=1e-10)


def _conv_channels(jaxpr, shapes=False):
    """(input channels, output channels) of every convolution in `jaxpr` and its sub-jaxprs;
    with `shapes`, (input shape, kernel shape, output shape, forward?) instead: forward = NHWC
    in and out with an HWIO kernel (the gradients' convolutions number their axes otherwise)."""
    from jax.extend.core import jaxprs_in_params

    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            if shapes:
                dn = eqn.params["dimension_numbers"]
                forward = (dn.lhs_spec, dn.rhs_spec, dn.out_spec) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
                out.append((*(tuple(v.aval.shape) for v in (*eqn.invars[:2], eqn.outvars[0])), forward))
            else:
                out.append((eqn.invars[0].aval.shape[-1], eqn.outvars[0].aval.shape[-1]))
        for sub in jaxprs_in_params(eqn.params):
            out.extend(_conv_channels(sub, shapes))
    return out


def _step_convs(config, platform, monkeypatch, shapes=False):
    """The convolutions of the train step (not jitted) as traced for `platform`'s mesh."""
    nets = Networks.from_config(config)
    tx = train.make_optimizer(config, steps_per_epoch=100)
    mesh = train.make_mesh(config)
    state, _ = train.abstract_train_state(nets, tx, mesh)
    batch = {k: jnp.asarray(v) for k, v in make_batch(2, 32, 96).items()}
    monkeypatch.setattr(train, "mesh_platform", lambda mesh: platform)
    step = train.make_train_step(config, nets, tx, mesh, jit=False)
    return _conv_channels(jax.make_jaxpr(step)(state, batch, jax.random.key(0)).jaxpr, shapes)


def test_train_step_pads_16_bit_convolutions_on_a_gpu_only(monkeypatch):
    """The bf16 step traced for a GPU runs the stems (3 and 6 input channels), the pose decoder's
    12 outputs and the translator head's 7 with 4, 8, 16 and 8; traced for a TPU, in float32,
    or with `model.gpu_channel_padding=False`, every convolution has the networks' own channels."""
    config = tiny_config(**{"model.dtype": "bfloat16", "optim.batch_size": 2, "mesh.num_devices": 1})
    gpu = _step_convs(config, "gpu", monkeypatch)
    cpu = _step_convs(config, "tpu", monkeypatch)  # the default form: neither padded nor as taps
    assert len(gpu) == len(cpu)
    padded = sorted({(a, b) for a, b in set(gpu) - set(cpu)})
    # forward convolutions, and the kernel gradients' (input, cotangent) pairs, padded alike
    assert (4, 64) in gpu and (8, 64) in gpu and (256, 16) in gpu and (32, 8) in gpu, padded
    assert not {(3, 64), (6, 64), (256, 12), (32, 7)} & set(gpu)
    assert {(3, 64), (6, 64), (256, 12), (32, 7)} <= set(cpu)
    assert all(c % 8 == 0 or c in (1, 4) for pair in gpu for c in pair), gpu  # 1: disparity in/out

    off = config_utils.apply_overrides(config, ["--config.model.gpu_channel_padding=False"])
    assert sorted(_step_convs(off, "gpu", monkeypatch)) == sorted(cpu)
    fp32 = config_utils.apply_overrides(config, ["--config.model.dtype=float32"])
    assert sorted(_step_convs(fp32, "gpu", monkeypatch)) == sorted(cpu)


def test_gpu_form_computes_the_networks_outputs():
    """The depth and pose nets in bf16, their GPU form (padded stems) run here on the CPU against
    the default form (a TPU's): the same disparities bitwise, the same poses to bf16 rounding."""
    config = tiny_config(**{"model.dtype": "bfloat16"})
    nets = Networks.from_config(config)
    params, batch_stats = jax.jit(nets.init, static_argnums=(1, 2))(jax.random.key(0), 32, 96)
    images = jnp.asarray(make_batch(2, 32, 96)["color"][:, 0], jnp.float32) / 255.0

    def run(platform):
        def fn(params, images):
            with platform_forms.target(platform):
                depth = nets.depth.apply({"params": params["depth"], "batch_stats": batch_stats["depth"]},
                                         images, train=False)
                pose = nets.pose.apply({"params": params["pose"], "batch_stats": batch_stats["pose"]},
                                       jnp.concatenate([images, images[::-1]], -1), train=False)
            return depth, pose
        return jax.jit(fn)(params, images)

    (gpu_disps, gpu_poses), (cpu_disps, cpu_poses) = run("gpu"), run("tpu")  # the default form
    for a, b in zip(jax.tree.leaves(gpu_disps), jax.tree.leaves(cpu_disps)):
        np.testing.assert_array_equal(a, b)  # the padded stem's sums: exact zeros added
    for a, b in zip(jax.tree.leaves(gpu_poses), jax.tree.leaves(cpu_poses)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        # the padded pose decoder's bf16 output rounds apart (2^-8 relative), nothing more
        np.testing.assert_allclose(a, b, rtol=0, atol=2 ** -8 * np.abs(b).max())


def test_config_key_checked_and_defaulted():
    config = tiny_config()
    assert config.model.gpu_channel_padding is True and train.gpu_channel_padding(config) is True
    del config.model["gpu_channel_padding"]  # a config.json written before the key
    assert train.gpu_channel_padding(config) is True
    config_utils.validate(config)
    config.model.gpu_channel_padding = "yes"
    with pytest.raises(config_utils.ConfigError, match="model.gpu_channel_padding"):
        config_utils.validate(config)


@pytest.mark.parametrize("hw, k, strides, padding, layout", [
    ((1, 3), (3, 3), (1, 1), "SAME", "HWIO"),              # ResNet's last stage at 32x96
    ((2, 6), (3, 3), (2, 2), ((1, 1), (1, 1)), "OHWI"),    # its first conv, onto a 1x3 map
    ((3, 1), (3, 3), (1, 1), ((1, 1), (1, 1)), "HWIO"),
    ((1, 5), (3, 3), (2, 1), ((1, 2), (0, 1)), "OHWI"),    # asymmetric padding, per-axis stride
    ((2, 7), (3, 2), (2, 2), "SAME", "HWIO"),              # a non-square kernel
    ((4, 4), (3, 3), (1, 1), ((-1, 2), (1, 0)), "HWIO"),   # negative padding crops
    ((5, 6), (1, 1), (2, 2), "VALID", "OHWI"),
])
def test_conv_taps_is_the_convolution_with_its_gradients(hw, k, strides, padding, layout):
    """`conv_taps` against lax's convolution in float64: values and both gradients to rounding."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, *hw, 5)))
        kern = jnp.asarray(hwio_to(layout, rng.standard_normal((*k, 5, 4))))
        want, vjp_want = jax.vjp(lambda x, w: jax.lax.conv_general_dilated(
            x, w, strides, padding, dimension_numbers=("NHWC", layout, "NHWC")), x, kern)
        got, vjp_got = jax.vjp(lambda x, w: conv_taps(x, w, layout, strides, padding), x, kern)
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
        g = jnp.asarray(rng.standard_normal(want.shape))
        for a, w in zip(vjp_got(g), vjp_want(g)):
            np.testing.assert_allclose(a, w, rtol=0, atol=1e-13)


def test_conv_taps_rounds_16_bit_products_once():
    """bf16 inputs: the products accumulated in float32 and rounded once, as a convolution's;
    within one bf16 rounding of the float32 convolution of the same numbers."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 1, 3, 512)), jnp.bfloat16)
    kern = jnp.asarray(rng.standard_normal((3, 3, 512, 512)) * 0.05, jnp.bfloat16)
    got = conv_taps(x, kern, "HWIO", (1, 1), "SAME")
    assert got.dtype == jnp.bfloat16
    exact = jax.lax.conv_general_dilated(x.astype(jnp.float32), kern.astype(jnp.float32), (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    err = np.abs(np.asarray(got, np.float32) - np.asarray(exact))
    assert np.all(err <= 2 ** -8 * np.abs(np.asarray(exact)) + 1e-6), err.max()


@pytest.mark.parametrize("hw, k, strides, padding, dilation, want", [
    ((1, 3), (3, 3), (1, 1), "SAME", (1, 1), True),
    ((3, 1), (3, 3), (1, 1), "SAME", (1, 1), True),
    ((2, 6), (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), True),   # its output is 1x3
    ((2, 6), (1, 1), (2, 2), "VALID", (1, 1), False),            # a 1x1 window
    ((1, 3), (1, 3), (1, 1), "SAME", (1, 1), False),             # window 1 along the 1-pixel axis
    ((2, 6), (3, 3), (1, 1), "SAME", (1, 1), False),
    ((1, 3), (3, 3), (1, 1), "SAME", (2, 2), False),             # dilated: conv_nhwc's sub-grids
])
def test_degenerate_on_cpu(hw, k, strides, padding, dilation, want):
    assert degenerate_on_cpu(hw, k, strides, padding, dilation) is want


def test_cpu_step_runs_one_pixel_wide_convolutions_as_taps(monkeypatch):
    """The float32 step at 32x96 traced for the CPU has no convolution over a map 1 pixel wide
    (ResNet's last stage, the decoders' first layers: `conv_taps` instead); traced for a GPU or
    a TPU it keeps them all."""
    config = tiny_config(**{"optim.batch_size": 2, "mesh.num_devices": 1})

    def wide(convs):  # forward ones with a window wider than 1 along an axis 1 pixel wide in or out
        return [c for c in convs if c[3] and any(c[1][i - 1] > 1 and (c[0][i] == 1 or c[2][i] == 1) for i in (1, 2))]

    cpu = _step_convs(config, "cpu", monkeypatch, shapes=True)
    gpu = _step_convs(config, "gpu", monkeypatch, shapes=True)
    tpu = _step_convs(config, "tpu", monkeypatch, shapes=True)
    assert sorted(gpu) == sorted(tpu)  # float32: nothing padded either
    assert len(wide(tpu)) == 11  # 4 + 4 in the encoders' last stages, 1 + 2 in the decoders
    assert wide(cpu) == []
    assert len(tpu) - len(cpu) == 3 * 11  # each with its 2 gradients' convolutions
