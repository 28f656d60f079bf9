"""Translator: pinned parameter counts, shapes, and the distillation gradient path."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xdistill_jax.distillation import distillation_loss
from xdistill_jax.models.translator import Translator, translate


def _count(params):
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def _disps(b=2, h=16, w=32, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {s: jax.nn.sigmoid(jax.random.normal(k[s], (b, h >> s, w >> s, 1))) for s in range(4)}


@pytest.mark.parametrize("kwargs,count,out_hw", [
    ({}, 37543, (4, 8)),  # the default: output_stride 4
    ({"output_stride": 1}, 19047, (16, 32)),
    ({"output_stride": 1, "multi_scale": True}, 19911, (16, 32)),
    ({"multi_scale": True}, 38407, (4, 8)),
    ({"output_stride": 1, "input_scale": 1}, 19047, (8, 16)),
    ({"input_scale": 1}, 37543, (2, 4)),
])
def test_param_count_and_output_shape(kwargs, count, out_hw):
    m = Translator(**kwargs)
    d = _disps()
    params = m.init(jax.random.PRNGKey(0), d)["params"]
    assert _count(params) == count
    out = m.apply({"params": params}, d)
    assert out.shape == (2, *out_hw, 7) and out.dtype == jnp.float32


def test_bf16_compute_keeps_fp32_params_and_output():
    m = Translator(dtype=jnp.bfloat16, num_groups=19)
    d = _disps()
    params = m.init(jax.random.PRNGKey(0), d)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    assert m.apply({"params": params}, d).dtype == jnp.float32


def test_bad_config_named():
    with pytest.raises(ValueError, match="output_stride must be a power of 2, got 3"):
        Translator(output_stride=3).init(jax.random.PRNGKey(0), _disps())
    with pytest.raises(ValueError, match="input_scale 5 not among"):
        Translator(input_scale=5).init(jax.random.PRNGKey(0), _disps())


def test_gradient_reaches_disparity_and_stops_with_switch():
    m = Translator()
    d = _disps()
    params = m.init(jax.random.PRNGKey(1), d)["params"]
    labels = jax.random.randint(jax.random.PRNGKey(2), (2, 8, 16), 0, 7)  # teacher at half res

    def loss(disps, p, stop):
        return distillation_loss(translate(p, disps, stop, module=m), labels)

    @jax.jit
    def grads(d, p):  # one compile for both settings
        return jax.grad(loss)(d, p, False), jax.grad(loss, argnums=(0, 1))(d, p, True)

    g, (g_stop, gp) = grads(d, params)
    assert float(jnp.abs(g[0]).sum()) > 0
    assert all(float(jnp.abs(g[s]).sum()) == 0 for s in (1, 2, 3))  # only scale 0 is used
    assert all(float(jnp.abs(g_stop[s]).sum()) == 0 for s in range(4))
    # the translator itself still learns when the depth gradient is stopped
    assert float(sum(jnp.abs(x).sum() for x in jax.tree_util.tree_leaves(gp))) > 0


@pytest.mark.skipif(importlib.util.find_spec("xdistill_jax.models.depth") is None,
                    reason="DepthNet not available")
def test_gradient_reaches_depth_decoder_params_and_stops():
    from xdistill_jax.models.depth import DepthNet

    net = DepthNet(num_layers=18)
    images = jax.random.uniform(jax.random.PRNGKey(3), (1, 32, 64, 3))
    variables = net.init(jax.random.PRNGKey(4), images, train=False)
    tr = Translator()
    tparams = tr.init(jax.random.PRNGKey(5), net.apply(variables, images, train=False))["params"]
    labels = jax.random.randint(jax.random.PRNGKey(6), (1, 32, 64), 0, 7)

    def loss(depth_params, stop):
        disps = net.apply({**variables, "params": depth_params}, images, train=False)
        return distillation_loss(translate(tparams, disps, stop, module=tr), labels)

    @jax.jit
    def grads(p):  # one compile for both settings
        return jax.grad(loss)(p, False), jax.grad(loss)(p, True)

    g, g_stop = grads(variables["params"])
    dec = jax.tree_util.tree_leaves(g["decoder"])
    assert float(sum(jnp.abs(x).sum() for x in dec)) > 0
    assert float(sum(jnp.abs(x).sum() for x in jax.tree_util.tree_leaves(g_stop))) == 0


# (H, W, dilation, kernel, padding, kernel layout): odd sizes, per-axis dilation, strings,
# asymmetric and negative padding
DILATED_CASES = [(48, 160, 4, 3, ((4, 4), (4, 4)), "OHWI"),
                 (13, 17, 2, 3, ((2, 2), (2, 2)), "HWIO"), (11, 9, 3, 3, "SAME", "OHWI"),
                 (12, 10, (2, 3), 3, "VALID", "OHWI"),
                 (9, 14, 2, 5, ((1, 3), (0, 4)), "HWIO"), (10, 10, 4, 3, ((-1, 2), (4, 4)), "OHWI")]


@pytest.mark.parametrize("devices", [1, None], ids=["sub-grid-major", "example-major"])
@pytest.mark.parametrize("h,w,d,k,pad,layout", DILATED_CASES)
def test_dilated_conv_as_space_to_batch_is_lax_dilated_conv(h, w, d, k, pad, layout, devices):
    """conv_nhwc's batched form computes lax's rhs_dilation convolution, values and gradients,
    with the sub-grids stacked sub-grid-major (a batch on one device) or example-major (a batch
    sharded over devices, or of unknown sharding: each device keeps its examples' sub-grids)."""
    from xdistill_jax import platform_forms
    from xdistill_jax.models.conv import conv_nhwc

    dil = d if isinstance(d, tuple) else (d, d)
    rng = np.random.default_rng(h * w + k)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, h, w, 3)))
        kern = jnp.asarray(rng.standard_normal((k, k, 3, 5)))
        if layout == "OHWI":
            kern = kern.transpose(3, 0, 1, 2)
        ref = lambda x, kern: jax.lax.conv_general_dilated(  # noqa: E731
            x, kern, (1, 1), pad, rhs_dilation=dil, dimension_numbers=("NHWC", layout, "NHWC"))
        ours = lambda x, kern: conv_nhwc(x, kern, layout, (1, 1), pad, dil)  # noqa: E731
        want, vjp_want = jax.vjp(ref, x, kern)
        with platform_forms.target(None, devices=devices):
            got, vjp_got = jax.vjp(ours, x, kern)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        g = jnp.asarray(rng.standard_normal(want.shape))
        for a, b in zip(vjp_got(g), vjp_want(g)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-10)


def _convs(jaxpr):
    from jax.extend.core import jaxprs_in_params

    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            yield eqn
        for sub in jaxprs_in_params(eqn.params):
            yield from _convs(sub)


def test_translator_has_no_dilated_convolution():
    """The default translator (dilations 1, 2, 4) is built of undilated convolutions only: XLA:GPU
    runs a dilated convolution's weight gradient as a forward convolution whose window is the
    whole feature map (1.5 ms per layer on an H200 at 640x192, benchmarks/RESULTS.md)."""
    module = Translator()
    disp = jnp.full((2, 32, 64, 1), 0.5, jnp.float32)
    params = module.init(jax.random.PRNGKey(0), disp)["params"]
    jaxpr = jax.make_jaxpr(lambda p, d: translate(p, d, module=module))(params, disp).jaxpr
    convs = list(_convs(jaxpr))
    assert len(convs) == 6  # 2 stride-2, 3 dilated 3x3 (1, 2, 4), the 1x1 head
    assert [tuple(e.params["rhs_dilation"]) for e in convs] == [(1, 1)] * 6
    # the dilated ones ran on the batch of d*d sub-grids: 4 and 16 times the batch
    assert sorted(e.invars[0].aval.shape[0] for e in convs) == [2] * 4 + [8, 32]
