"""threefry_cpu: the init's threefry bits lowered unrolled on the CPU, the same bits."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np

from train_fixtures import tiny_config
from xdistill_jax import threefry_cpu, train
from xdistill_jax.objective import Networks


def _draws(key):
    """Draws as a parameter init makes them: a key fold-in, then normal and uniform bits."""
    k = jax.random.fold_in(key, 12345)
    return jax.random.normal(k, (6, 7)), jax.random.uniform(jax.random.fold_in(k, 2), (300,)), jnp.float32(1)


def _lowered(enabled: bool):
    with threefry_cpu.unrolled(enabled):
        return jax.jit(_draws).lower(jax.random.key(3, impl="threefry2x32"))


def test_unrolled_bits_are_the_rolled_bits():
    assert threefry_cpu.installed()
    rolled, unrolled = _lowered(False), _lowered(True)
    assert "while" in rolled.as_text()  # JAX's CPU form: a loop per threefry call
    assert "while" not in unrolled.as_text()
    key = jax.random.key(3, impl="threefry2x32")
    for a, b in zip(rolled.compile()(key), unrolled.compile()(key)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and both are JAX's own bits, as an eager call outside any block computes them
    for a, b in zip(jax.jit(_draws)(key), unrolled.compile()(key)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_only_the_calling_thread_lowers_unrolled():
    """A program lowered on another thread meanwhile (the step, `background_compile`) keeps
    JAX's form."""
    seen = {}

    def other():
        seen["text"] = jax.jit(_draws).lower(jax.random.key(4, impl="threefry2x32")).as_text()

    with threefry_cpu.unrolled():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        here = jax.jit(_draws).lower(jax.random.key(5, impl="threefry2x32")).as_text()
    assert "while" in seen["text"] and "while" not in here
    assert "while" in jax.jit(_draws).lower(jax.random.key(6, impl="threefry2x32")).as_text()  # after


def test_lower_init_unrolls_threefry_keys_only():
    """The init lowered for a threefry key has no loop left; for an rbg key (its few threefry
    calls compiled 10 % slower unrolled) JAX's form; the train step keeps JAX's form either way."""
    config = tiny_config()
    nets = Networks.from_config(config)
    tx = train.make_optimizer(config, steps_per_epoch=100)
    mesh = train.make_mesh(config)
    threefry = train.lower_init(nets, tx, mesh, jax.random.key(0, impl="threefry2x32")).as_text()
    assert "threefry" in threefry.lower() or "xor" in threefry  # the hash is there, unrolled
    assert "while" not in threefry
    rbg_key = jax.random.key(0, impl="rbg")
    with threefry_cpu.unrolled(False):
        rbg_rolled = train.init_program(nets, tx, mesh).lower(rbg_key).as_text()
    assert train.lower_init(nets, tx, mesh, rbg_key).as_text() == rbg_rolled
    assert "while" in rbg_rolled
