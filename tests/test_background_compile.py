"""`background_compile.AheadStep`: the train step compiled on a thread from abstract arguments
while the caller goes on; its errors, its strictness about later arguments, the state layouts
it chooses (`relayout`), and the init's threefry option staying on the init's thread."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xdistill_jax import train
from xdistill_jax.background_compile import AheadStep, abstract


def _waiting_step(release: threading.Event, traced_on: list):
    """A (state, batch, rng) step whose trace waits for `release` (at most 30 s) and notes its thread."""

    def step(state, batch, rng):
        traced_on.append(threading.current_thread().name)
        if not release.wait(30):
            raise TimeoutError("the caller never released the trace")
        return {"w": state["w"] + batch}, {"sum": jnp.sum(batch)}

    return jax.jit(step, donate_argnums=(0,))


def test_the_step_compiles_on_a_thread_while_the_caller_goes_on():
    """The trace blocks until the caller, after making the AheadStep, releases it: had the
    compile run in the caller's thread, it would have waited out the 30 s and failed. The
    compiled step then runs with the concrete arguments."""
    release, traced_on = threading.Event(), []
    spec = ({"w": jax.ShapeDtypeStruct((3,), jnp.float32)}, jax.ShapeDtypeStruct((3,), jnp.float32), None)
    step = AheadStep(_waiting_step(release, traced_on), *spec)
    assert not step.done  # still in the trace, waiting for us
    release.set()
    state, metrics = step({"w": jnp.ones(3)}, jnp.arange(3.0), None)
    assert step.done and traced_on == ["xdistill-step-compile"]
    np.testing.assert_array_equal(np.asarray(state["w"]), [1.0, 2.0, 3.0])
    assert float(metrics["sum"]) == 3.0
    assert step.lower_s > 0 and step.compile_s > 0
    state, _ = step(state, jnp.ones(3), None)  # later calls run the same executable
    np.testing.assert_array_equal(np.asarray(state["w"]), [2.0, 3.0, 4.0])
    assert traced_on == ["xdistill-step-compile"]


def test_a_failed_compile_raises_in_the_caller():
    def broken(state, batch, rng):
        raise ValueError("no such loss term: 'smoothnes'")

    step = AheadStep(jax.jit(broken), jnp.zeros(2), jnp.zeros(2), None)
    with pytest.raises(ValueError, match="no such loss term: 'smoothnes'"):
        step(jnp.zeros(2), jnp.zeros(2), None)
    with pytest.raises(ValueError, match="smoothnes"):  # and again: it does not pass as compiled
        step.wait()


def test_arguments_unlike_the_compiled_ones_are_refused_not_recompiled():
    """A batch of another shape than the one compiled for raises (a silent second compile
    would cost a GPU tens of seconds); the function is traced once."""
    traces = []

    def step(state, batch, rng):
        traces.append(batch.shape)
        return state + jnp.sum(batch), {}

    ahead = AheadStep(jax.jit(step), jnp.zeros(()), jnp.zeros((4, 2)), None)
    ahead(jnp.zeros(()), jnp.ones((4, 2)), None)
    with pytest.raises(TypeError, match=r"float32\[3,2\]"):
        ahead(jnp.zeros(()), jnp.ones((3, 2)), None)
    assert traces == [(4, 2)]


def test_abstract_keeps_shapes_dtypes_and_weak_types_only():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    x = jax.device_put(jnp.ones((2, 3), jnp.bfloat16), train.replicated(mesh))
    tree = abstract({"x": x, "w": jnp.asarray(1.0), "key": jax.random.key(0), "none": None})
    assert tree["x"] == jax.ShapeDtypeStruct((2, 3), jnp.bfloat16) and tree["x"].sharding is None
    assert tree["w"].weak_type and tree["key"].dtype == jax.random.key(0).dtype and tree["none"] is None


def _toy_step(state_format, out_format):
    """A donated-state step in the train step's shape, (state, batch, rng) -> (state, metrics)."""
    return jax.jit(lambda s, b, r: ({"w": s["w"] - 0.5 * b, "n": s["n"] + 1}, {"sum": jnp.sum(s["w"])}),
                   in_shardings=({"w": state_format, "n": None}, None, None),
                   out_shardings=({"w": out_format, "n": None}, None), donate_argnums=(0,))


def test_relayout_puts_the_state_into_the_chosen_layout_once():
    """relayout (state_layout="auto"): the first call moves the default-layout state it is given
    into the compiled step's format (here column-major, as a GPU stores some kernels), and the
    steps return it in that format, so later calls pass it through; values are unchanged."""
    from jax.experimental.layout import Format, Layout

    w = jnp.arange(12.0).reshape(3, 4)
    col = Format(Layout((1, 0)), w.sharding)
    state = {"w": w, "n": jnp.int32(0)}
    b = jnp.ones((3, 4))
    step = AheadStep(_toy_step(col, col), state, b, None, relayout=True)
    assert state["w"].format.layout.major_to_minor == (0, 1)
    for i in range(3):
        state, metrics = step(state, b, None)
        assert state["w"].format.layout.major_to_minor == (1, 0)
        np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(12.0).reshape(3, 4) - 0.5 * (i + 1))
        assert int(state["n"]) == i + 1
    assert float(metrics["sum"]) == float(np.sum(np.arange(12.0) - 1.0))
    assert step.state_formats["w"].layout.major_to_minor == (1, 0)


def test_relayout_refuses_a_step_returning_other_layouts():
    """A step whose returned state is laid out differently from the donated one would need a
    relayout every step: the compile says so, in the caller's thread, at the first call."""
    from jax.experimental.layout import Format, Layout

    w = jnp.arange(12.0).reshape(3, 4)
    state = {"w": w, "n": jnp.int32(0)}
    step = AheadStep(_toy_step(Format(Layout((1, 0)), w.sharding), Format(Layout((0, 1)), w.sharding)),
                     state, jnp.ones((3, 4)), None, relayout=True)
    with pytest.raises(RuntimeError, match="other layouts for the returned state"):
        step(state, jnp.ones((3, 4)), None)


def test_the_inits_threefry_option_stays_on_its_thread():
    """The init lowers inside `train.threefry_kernel_lowering`; a step tracing meanwhile on
    the compile thread sees JAX's default, as it would had it been traced alone (the kernel
    would write the step's random bits out: +0.4 GB per step on a GPU)."""
    release, seen = threading.Event(), []

    def step(state, batch, rng):
        release.wait(30)
        seen.append(jax.config.jax_threefry_gpu_kernel_lowering)
        return state, {}

    with train.threefry_kernel_lowering():
        ahead = AheadStep(jax.jit(step), jnp.zeros(()), jnp.zeros(()), None)
        assert jax.config.jax_threefry_gpu_kernel_lowering
        release.set()
        ahead.wait()
    assert seen == [False]


def test_a_process_failing_meanwhile_exits_with_its_status_once_the_compile_is_done(tmp_path):
    """The main thread raises while the step compiles: the process exits with Python's status
    for the error (1) after the compile has finished, which the compile's last act (a file)
    shows. A daemon thread would be cut off at exit instead, inside XLA's C++ when the compile
    is long, and that aborts the process (SIGABRT)."""
    import subprocess
    import sys
    import textwrap

    marker = tmp_path / "compiled"
    script = textwrap.dedent(f"""
        import pathlib, time
        import jax, jax.numpy as jnp
        from xdistill_jax.background_compile import AheadStep

        def step(state, batch, rng):
            time.sleep(1.0)  # a compile that outlives the main thread
            return state + batch, {{}}

        class Marked(AheadStep):
            def _compile(self):
                super()._compile()
                pathlib.Path({str(marker)!r}).write_text("done")

        Marked(jax.jit(step), jnp.zeros(3), jnp.zeros(3), None)
        raise ValueError("config.model.init: bad file")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "ValueError: config.model.init: bad file" in run.stderr
    assert marker.read_text() == "done"
