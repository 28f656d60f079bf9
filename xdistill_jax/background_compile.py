"""The train step compiled ahead of time on a background thread, while the state is initialised.

    lowered_init = train.lower_init(nets, tx, mesh, rng)           # the init, traced (host)
    step = AheadStep(train.make_train_step(...), lowered_init.out_info, first_batch, rng)
    state = train.create_train_state(nets, tx, mesh, rng, lowered=lowered_init)  # meanwhile
    state, metrics = step(state, batch, rng)                       # waits for the compile once

A fresh start used to be init, then the step's compile: the init's compile and run (4-9 s on
an H200, benchmarks/RESULTS.md) waited for nothing but came before the step's compile (~90 s
cold, most of it autotuning convolutions on the GPU; ~5 s from a warm cache). XLA compiles,
reads the persistent cache and runs programs with Python's GIL released, so the step's compile
on a thread overlaps them; the two traces (Python) still take turns.

The trace's source locations differ from a trace in the caller's thread (the thread's frames):
with `jax_compilation_cache_include_metadata_in_key` (off by default; gpu.sh sets it) the cache
key differs too, so whatever compiles a step to share cache entries with this one compiles it
here (the bench's sequential start starts its AheadStep after the init and waits).

The step is lowered from abstract arguments (`jax.ShapeDtypeStruct`s: their shapes and dtypes
only, the jitted function's in_shardings place them), so it can start before the state
exists. Later calls must match them: the compiled executable raises a TypeError naming the
argument otherwise, never a silent second compile.

Per-thread JAX settings (`with jax.default_matmul_precision(...)` and the like, entered by the
caller) do not reach the compile thread, which sees the global ones (`jax.config.update`).
Nothing else that compiles convolutions should run while the step compiles on a GPU: XLA
times cuDNN's algorithms on the device, and a concurrent program would skew the timings. The
training loop therefore waits for the step before its first validation (whose eval step
compiles too).

The thread is not a daemon: a process that fails after the compile has started (the message
is printed at once) exits when the compile is done. A daemon thread would be stopped inside
XLA's C++ at interpreter exit, and that aborts the process (SIGABRT, "FATAL: exception not
rethrown" on this project's CPU VM) instead of leaving with the error's exit status. Checks of
the user's input belong before the compile starts (the training loop's are).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import jax


def abstract(tree):
    """The tree's leaves as bare `jax.ShapeDtypeStruct`s (shape, dtype and weak type; no
    sharding or layout: the jitted step's own in_shardings apply)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=getattr(x, "weak_type", False)),
                        tree)


class AheadStep:
    """`jitted(state, batch, rng)`, lowered and compiled on a background thread from the
    moment it is made; callable like `jitted`, the first call waits for the compile.

    state, batch, rng: arrays or `jax.ShapeDtypeStruct`s (any tree with .shape and .dtype) of
      the arguments the step will be called with.
    relayout: the step was made with state_layout="auto" (`train.make_train_step`): XLA
      chooses the state's device layouts, the state is moved into them once (`prepare`, done by
      the first call) and the steps return it in them. A compile whose returned state is laid
      out unlike the donated one is refused (a relayout every step).

    After `wait()`: `lowered`, `compiled`, `lower_s` and `compile_s` (the thread's own time
    for each), `state_formats` (the compiled step's state formats).
    """

    def __init__(self, jitted: Callable, state: Any, batch: Any, rng: Any, *, relayout: bool = False):
        self.jitted, self.relayout = jitted, relayout
        self.specs = (abstract(state), abstract(batch), abstract(rng))
        self.lowered = self.compiled = self.state_formats = None
        self.lower_s = self.compile_s = None
        self._error: BaseException | None = None
        self._prepared = False
        self._thread = threading.Thread(target=self._compile, name="xdistill-step-compile")
        self._thread.start()

    def _compile(self) -> None:
        try:
            t0 = time.perf_counter()
            lowered = self.jitted.lower(*self.specs)
            t1 = time.perf_counter()
            compiled = lowered.compile()
            t2 = time.perf_counter()
            formats = compiled.input_formats[0][0]
            if self.relayout and jax.tree.leaves(compiled.output_formats[0]) != jax.tree.leaves(formats):
                # the returned state would not fit the next call: every step would need a relayout
                raise RuntimeError("state_layout='auto': XLA chose other layouts for the returned "
                                   "state than for the donated one")
            self.lowered, self.compiled, self.state_formats = lowered, compiled, formats
            self.lower_s, self.compile_s = t1 - t0, t2 - t1
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by wait()
            self._error = e

    @property
    def done(self) -> bool:
        """Whether the compile has finished (or failed)."""
        return not self._thread.is_alive()

    def wait(self):
        """Block until compiled; returns the `jax.stages.Compiled`, or raises what the compile raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.compiled

    def prepare(self, state):
        """`state` in the compiled step's input formats (relayout), else `state` itself; waits."""
        self.wait()
        return jax.device_put(state, self.state_formats) if self.relayout else state

    def __call__(self, state, batch, rng):
        if not self._prepared:
            state = self.prepare(state)
            self._prepared = True
        return self.compiled(state, batch, rng)
