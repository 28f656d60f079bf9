"""Target-frame-only scale images (the loader's source_scales=False) give the same loss."""

import jax
import jax.numpy as jnp
import pytest

from tests.train_fixtures import make_batch, tiny_config
from xdistill_jax import objective
from xdistill_jax.objective import Networks

B, H, W = 2, 32, 96


def test_target_only_scales_give_the_same_loss_and_gradient():
    config = tiny_config(distill_weight=0.0)
    nets = Networks.from_config(config)
    params, batch_stats = jax.jit(lambda r: nets.init(r, H, W))(jax.random.key(1))
    full = {k: jnp.asarray(v) for k, v in make_batch(B, H, W, seed=2).items() if k != "teacher"}
    target = dict(full)
    for s in (1, 2, 3):
        target[f"color_s{s}"] = full[f"color_s{s}"][:, 1:2]  # frame axis order (-1, 0, +1)

    def loss(p, batch):
        return objective.loss_fn(nets, config, p, batch_stats, batch, jax.random.key(0), train=True)[0]

    f = jax.jit(jax.value_and_grad(loss))
    (v_full, g_full), (v_target, g_target) = f(params, full), f(params, target)
    assert float(v_full) == float(v_target)
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_target)))

    bad = dict(full, color_s2=full["color_s2"][:, :2])
    with pytest.raises(ValueError, match=r"batch\['color_s2'\] must be \(B,3,h,w,3\) or \(B,1,h,w,3\)"):
        loss(params, bad)
