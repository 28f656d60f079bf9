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
