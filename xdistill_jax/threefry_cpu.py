"""Threefry random bits lowered unrolled on the CPU, inside a block, for the calling thread.

JAX lowers its threefry hash on the CPU as a rolled loop (one `while` per call: 5 passes of 4
rounds), elsewhere unrolled. The train state's init calls it for every parameter (a key
fold-in and the draw itself): for the quick demo's networks with JAX's default PRNG the
optimised init program held 165 while loops, and XLA:CPU compiled it in 12.6 s wall, 21.5
CPU-s; unrolled, 7.2 s and 10.5 CPU-s, with the same train state bit for bit (the same hash;
benchmarks/RESULTS.md). `train.lower_init` and the segmentation teacher's init (5.4 -> 1.6 s)
lower inside `for_key(rng)`: unrolled for a threefry key only (with rbg keys the init's few
threefry calls, key derivations, compiled 10 % slower unrolled). Every other program, the train
step included, lowers as JAX lowers it (the quick demo's step unrolled did not finish compiling
in 9 minutes, against 16 s rolled).

The CPU rule installed dispatches per call: JAX's own CPU rule unless the calling thread is in
`unrolled()` (a step lowered meanwhile on another thread, `background_compile`, is untouched).
The block's setting is a JAX config option of this module's (per thread, in JAX's jit keys), so a
function lowered both inside and outside a block gets both forms, never the cached other one.
Where this JAX lacks the internals used (`jax._src.random.threefry2x32`'s two lowering rules,
`jax._src.interpreters.mlir.register_lowering`) nothing is installed and the block changes
nothing.
"""

from __future__ import annotations

import contextlib
import logging

log = logging.getLogger(__name__)

_state = None  # the option, a JAX config state: per thread, and part of JAX's jit keys
_installed: bool | None = None

OPTION = "xdistill_threefry_cpu_unrolled"


def _install() -> bool:
    """Define the option and register the dispatching CPU rule, once; False where JAX's
    internals are not as expected."""
    global _installed, _state
    if _installed is not None:
        return _installed
    try:
        from jax._src import config as jax_config
        from jax._src.interpreters import mlir
        from jax._src.random import threefry2x32 as tf

        rolled = tf._threefry2x32_cpu_lowering_rule  # JAX's CPU rule
        unrolled_rule = tf._threefry2x32_lowering_rule  # JAX's rule for other platforms
        primitive = tf.threefry2x32_p
        # in the jit key and the trace context, as JAX's own lowering options: a program lowered
        # inside the block is cached apart from the same program lowered outside it
        state = jax_config.bool_state(
            name=OPTION, default=False, include_in_jit_key=True, include_in_trace_context=True,
            help="xdistill_jax: lower threefry unrolled on the CPU (xdistill_jax.threefry_cpu)")
    except (ImportError, AttributeError, TypeError) as e:
        log.info("threefry on the CPU lowers as JAX lowers it (%s)", e)
        _installed = False
        return False

    def rule(ctx, *args, **kwargs):
        return (unrolled_rule if state.value else rolled)(ctx, *args, **kwargs)

    mlir.register_lowering(primitive, rule, platform="cpu")
    _state, _installed = state, True
    return True


def threefry_key(rng) -> bool:
    """Whether `rng` draws with threefry (its own implementation; a raw uint32 key: JAX's
    default), the keys `unrolled()` is worth it for."""
    import jax

    try:
        name = str(jax.random.key_impl(rng))
    except (TypeError, ValueError):
        name = str(jax.config.jax_default_prng_impl)
    return name == "threefry2x32"


def for_key(rng):
    """`unrolled()` where `rng` is a threefry key, else a block that changes nothing."""
    return unrolled(threefry_key(rng))


def installed() -> bool:
    """Whether the dispatching rule is in place (installs it on first call)."""
    return _install()


@contextlib.contextmanager
def unrolled(enabled: bool = True):
    """Inside the block, threefry lowers unrolled on the CPU in this thread (see the module);
    with `enabled` False, as JAX lowers it (for a caller that decides per call)."""
    if not _install():
        yield
        return
    with _state(bool(enabled)):
        yield
