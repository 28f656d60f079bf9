"""The distillation warm-up (`distill.depth_grad_start` / `depth_grad_ramp`, objective.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.train_fixtures import make_batch, tiny_config
from xdistill_jax import config_utils, objective
from xdistill_jax.objective import Networks

B, H, W = 2, 32, 96


def test_factor_schedule_by_hand():
    ds = tiny_config(**{"distill.depth_grad_start": 3, "distill.depth_grad_ramp": 4}).distill
    got = [float(objective.depth_grad_factor(ds, s)) for s in range(8)]
    # steps 0-2: none; step 3 is the ramp's first step (1/4), step 6 its last (4/4)
    assert got == [0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    ds = tiny_config(**{"distill.depth_grad_start": 2}).distill
    assert [float(objective.depth_grad_factor(ds, s)) for s in range(4)] == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("key", ["depth_grad_start", "depth_grad_ramp"])
def test_negative_warmup_names_the_key(key):
    config = tiny_config()
    config.distill[key] = -1
    with pytest.raises(config_utils.ConfigError, match=rf"config\.distill\.{key}: must be an integer >= 0"):
        config_utils.validate(config)


@pytest.fixture(scope="module")
def grads():
    """Loss and gradients of the plain objective and of the warm-up one at factors 0, 1/2, 1."""
    plain = tiny_config()
    warm = tiny_config(**{"distill.depth_grad_start": 10, "distill.depth_grad_ramp": 2})
    nets = Networks.from_config(plain)
    params, batch_stats = jax.jit(lambda r: nets.init(r, H, W))(jax.random.key(3))
    batch = {k: jnp.asarray(v) for k, v in make_batch(B, H, W, seed=11).items()}

    def value_and_grad(config):
        def f(p, step):
            return objective.loss_fn(nets, config, p, batch_stats, batch, jax.random.key(0),
                                     train=True, step=step)[0]
        return jax.jit(jax.value_and_grad(f))

    out = {"plain": value_and_grad(plain)(params, jnp.int32(0))}
    warm_fn = value_and_grad(warm)
    for name, step in (("f0", 9), ("f_half", 10), ("f1", 11)):
        out[name] = warm_fn(params, jnp.int32(step))
    return out


def test_loss_value_does_not_depend_on_the_factor(grads):
    values = {k: float(v[0]) for k, v in grads.items()}
    assert values["f0"] == values["f_half"] == values["f1"] == values["plain"]


def _close(a, b, rel):
    """Each array within rel x its largest magnitude (two compiled graphs round differently)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert np.max(np.abs(x - y)) <= rel * np.max(np.abs(y)), (x.shape, np.max(np.abs(x - y)))


def test_translator_gradient_is_full_and_depth_gradient_is_scaled(grads):
    g = {k: v[1] for k, v in grads.items()}
    # translator: always the full distillation gradient
    for name in ("f0", "f_half", "f1"):
        _close(g[name]["translator"], g["plain"]["translator"], 1e-5)
    # factor 1 is the paper's gradient; the pose net never sees the translator
    _close(g["f1"]["depth"], g["plain"]["depth"], 1e-4)
    _close(g["f0"]["pose"], g["plain"]["pose"], 1e-4)
    d0, dh, d1 = g["f0"]["depth"], g["f_half"]["depth"], g["f1"]["depth"]
    # factor 0 takes the distillation gradient out of the depth net (by much more than rounding)
    head = lambda t: np.asarray(t["decoder"]["dispconv_0"]["kernel"])
    assert np.max(np.abs(head(d0) - head(d1))) > 0.05 * np.max(np.abs(head(d1)))
    # linear in the factor: g(1/2) = (g(0) + g(1)) / 2
    _close(dh, jax.tree.map(lambda a, c: (a + c) / 2, d0, d1), 1e-4)
