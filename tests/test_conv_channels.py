"""16-bit convolutions on a GPU with their channels padded for the tensor cores
(`models.conv.tensor_core_channels`, `conv_padded_channels`): XLA:GPU's rule for f16, the same
function, and only in the GPU's form of the train step unless `model.gpu_channel_padding` is off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train_fixtures import make_batch, tiny_config
from xdistill_jax import config_utils, platform_forms, train
from xdistill_jax.models.conv import conv_nhwc, conv_padded_channels, tensor_core_channels
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


def _conv_channels(jaxpr):
    """(input channels, output channels) of every convolution in `jaxpr` and its sub-jaxprs."""
    from jax.extend.core import jaxprs_in_params

    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            out.append((eqn.invars[0].aval.shape[-1], eqn.outvars[0].aval.shape[-1]))
        for sub in jaxprs_in_params(eqn.params):
            out.extend(_conv_channels(sub))
    return out


def _step_convs(config, platform, monkeypatch):
    """The convolutions of the train step (not jitted) as traced for `platform`'s mesh."""
    nets = Networks.from_config(config)
    tx = train.make_optimizer(config, steps_per_epoch=100)
    mesh = train.make_mesh(config)
    state, _ = train.abstract_train_state(nets, tx, mesh)
    batch = {k: jnp.asarray(v) for k, v in make_batch(2, 32, 96).items()}
    monkeypatch.setattr(train, "mesh_platform", lambda mesh: platform)
    step = train.make_train_step(config, nets, tx, mesh, jit=False)
    return _conv_channels(jax.make_jaxpr(step)(state, batch, jax.random.key(0)).jaxpr)


def test_train_step_pads_16_bit_convolutions_on_a_gpu_only(monkeypatch):
    """The bf16 step traced for a GPU runs the stems (3 and 6 input channels), the pose decoder's
    12 outputs and the translator head's 7 with 4, 8, 16 and 8; traced for the CPU, in float32,
    or with `model.gpu_channel_padding=False`, every convolution has the networks' own channels."""
    config = tiny_config(**{"model.dtype": "bfloat16", "optim.batch_size": 2, "mesh.num_devices": 1})
    gpu = _step_convs(config, "gpu", monkeypatch)
    cpu = _step_convs(config, "cpu", monkeypatch)
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
    """The depth and pose nets in bf16, their GPU form (padded stems) run here on the CPU: the
    same disparities bitwise, the same poses to bf16 rounding."""
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

    (gpu_disps, gpu_poses), (cpu_disps, cpu_poses) = run("gpu"), run("cpu")
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
