"""`platform_forms`: the form for a platform picked in Python inside `target`, at lowering time
elsewhere; the train and eval steps are traced with their mesh's platform."""

import jax
import jax.numpy as jnp

from exported_forms import stablehlo_by_platform
from train_fixtures import make_batch, tiny_config
from xdistill_jax import platform_forms, train
from xdistill_jax.objective import Networks


def _plus_or_times(x):
    return platform_forms.choose(x, cpu=lambda v: v + 1.0, default=lambda v: v * 3.0)


def _for(platform):
    """jit of _plus_or_times traced with `platform`'s form, as the steps set it: inside the body."""
    def fn(x):
        with platform_forms.target(platform):
            return _plus_or_times(x)
    return jax.jit(fn)


def test_choose_at_lowering_outside_target_and_in_python_inside():
    x = jnp.float32(2.0)
    assert float(jax.jit(_plus_or_times)(x)) == 3.0  # lowered for this CPU
    texts = stablehlo_by_platform(_plus_or_times, jax.ShapeDtypeStruct((), jnp.float32))
    assert "stablehlo.add" in texts["cpu"] and "stablehlo.multiply" not in texts["cpu"]  # picked at lowering
    assert all("stablehlo.multiply" in texts[p] and "stablehlo.add" not in texts[p] for p in ("cuda", "tpu"))

    assert float(_for("gpu")(x)) == 6.0  # the GPU's form, run here on the CPU
    text = _for("gpu").lower(x).as_text()
    assert "multiply" in text and "add" not in text and "case" not in text
    for platform in ("tpu", "cuda", "rocm"):
        assert float(_for(platform)(x)) == 6.0
    assert float(_for("cpu")(x)) == 3.0 and float(_for(None)(x)) == 3.0
    with platform_forms.target("gpu"):
        assert float(_plus_or_times(x)) == 6.0
        with platform_forms.target("cpu"):
            assert float(_plus_or_times(x)) == 3.0
        assert float(_plus_or_times(x)) == 6.0
    assert float(_plus_or_times(x)) == 3.0  # the block left nothing behind


def test_train_and_eval_steps_trace_one_form_per_piece():
    """Traced with the mesh's platform: no `platform_index` (the `cond` that
    `jax.lax.platform_dependent` leaves for lowering, with both forms inside) in the train
    step or the eval step, while the same loss traced outside a step has them."""
    from xdistill_jax import objective

    config = tiny_config()
    nets = Networks.from_config(config)
    tx = train.make_optimizer(config, steps_per_epoch=100)
    mesh = train.make_mesh(config)
    state, _ = train.abstract_train_state(nets, tx, mesh)
    batch = {k: jnp.asarray(v) for k, v in make_batch(4, 32, 96).items()}
    key = jax.random.key(0)
    assert train.mesh_platform(mesh) == "cpu"

    step_jaxpr = jax.make_jaxpr(train.make_train_step(config, nets, tx, mesh, jit=False))(state, batch, key)
    assert "platform_index" not in str(step_jaxpr)  # the printed jaxpr includes every sub-jaxpr
    eval_jaxpr = train.make_eval_step(config, nets, mesh).trace(state.params, state.batch_stats, batch, key).jaxpr
    assert "platform_index" not in str(eval_jaxpr)
    loss_jaxpr = jax.make_jaxpr(lambda p, s, b, r: objective.loss_fn(nets, config, p, s, b, r, True))(
        state.params, state.batch_stats, batch, key)
    assert "platform_index" in str(loss_jaxpr)


def _three_forms(x):
    return platform_forms.choose(x, cpu=lambda v: v + 1.0, default=lambda v: v * 3.0, gpu=lambda v: v - 5.0)


def test_choose_a_gpu_form():
    """`gpu=`: CUDA's and ROCm's form, at lowering and inside `target`; the TPU keeps `default`."""
    x = jnp.float32(2.0)
    texts = stablehlo_by_platform(_three_forms, jax.ShapeDtypeStruct((), jnp.float32))
    assert "stablehlo.add" in texts["cpu"] and "stablehlo.subtract" not in texts["cpu"]
    assert "stablehlo.subtract" in texts["cuda"] and "stablehlo.multiply" not in texts["cuda"]
    assert "stablehlo.multiply" in texts["tpu"] and "stablehlo.subtract" not in texts["tpu"]
    for platform, want in (("gpu", -3.0), ("cuda", -3.0), ("rocm", -3.0), ("tpu", 6.0), ("cpu", 3.0)):
        with platform_forms.target(platform):
            assert float(_three_forms(x)) == want, platform
    assert float(jax.jit(_three_forms)(x)) == 3.0


def _four_forms(x):
    return platform_forms.choose(x, cpu=lambda v: v + 1.0, default=lambda v: v * 3.0, gpu=lambda v: v - 5.0,
                                 tpu=lambda v: v / 4.0)


def test_choose_a_tpu_form():
    """`tpu=`: the TPU's form, at lowering and inside `target`; CUDA and ROCm keep theirs (or
    `default` without `gpu=`)."""
    x = jnp.float32(2.0)
    texts = stablehlo_by_platform(_four_forms, jax.ShapeDtypeStruct((), jnp.float32))
    assert "stablehlo.divide" in texts["tpu"] and "stablehlo.multiply" not in texts["tpu"]
    assert "stablehlo.subtract" in texts["cuda"] and "stablehlo.divide" not in texts["cuda"]
    assert "stablehlo.add" in texts["cpu"] and "stablehlo.divide" not in texts["cpu"]
    for platform, want in (("tpu", 0.5), ("gpu", -3.0), ("cuda", -3.0), ("rocm", -3.0), ("cpu", 3.0)):
        with platform_forms.target(platform):
            assert float(_four_forms(x)) == want, platform
    without_gpu = lambda v: platform_forms.choose(v, cpu=lambda v: v + 1.0, default=lambda v: v * 3.0,  # noqa: E731
                                                  tpu=lambda v: v / 4.0)
    for platform, want in (("tpu", 0.5), ("cuda", 6.0), ("cpu", 3.0)):
        with platform_forms.target(platform):
            assert float(without_gpu(x)) == want, platform
    texts = stablehlo_by_platform(without_gpu, jax.ShapeDtypeStruct((), jnp.float32))
    assert "stablehlo.multiply" in texts["cuda"] and "stablehlo.divide" not in texts["cuda"]
    assert float(jax.jit(_four_forms)(x)) == 3.0


def test_target_carries_channel_padding():
    assert platform_forms.channel_padding() is True
    with platform_forms.target("gpu", channel_padding=False):
        assert platform_forms.channel_padding() is False
        with platform_forms.target("gpu"):
            assert platform_forms.channel_padding() is True
        assert platform_forms.channel_padding() is False
    assert platform_forms.channel_padding() is True
