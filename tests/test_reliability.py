"""Issue #9: `xdistill train` subprocesses killed (SIGKILL mid-step, mid-checkpoint-write, during
validation) or preempted (SIGTERM) and rerun with the same command end bitwise where an
uninterrupted run ends, with continuous metrics and the same data order; damaged latest
checkpoints fall back to the previous one with a warning naming both.

One tiny prepared dataset (6 triplets at 32x96), batch 2 on one CPU device, 6 steps (2 epochs),
checkpoint and validation every 2 steps. The kills use the test-only XDISTILL_TEST_FAULT hook of
`xdistill_jax.training_loop`; every subprocess shares the session's compile cache.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import kitti_tiny
from train_fixtures import abstract_state_of, restored_state
from xdistill_jax.checkpoints import Checkpointer, CheckpointError

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from data_pipelines.kitti import prepare

    base = tmp_path_factory.mktemp("reliability_data")
    raw, split = kitti_tiny.make_tree(base / "kitti")
    prepare.prepare_split(raw, split, base / "tfds", "train", 32, 96)
    return base / "tfds"


def _train(dataset, workdir, fault=None, batch_log=None, prng_impl=None):
    """`python -m xdistill_jax train ...` -- the same command every time; only the hook differs."""
    cmd = [sys.executable, "-m", "xdistill_jax", "train", "--config", "configs/synthetic_demo.py:smoke",
           "--workdir", str(workdir), f"--config.data.dataset_dir={dataset}",
           "--config.data.val_split=train", "--config.distill.weight=0", "--config.optim.batch_size=2",
           f"--config.optim.num_steps={STEPS}", "--config.run.ckpt_every=2", "--config.run.val_every=2",
           "--config.run.keep=2"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop("XDISTILL_TEST_FAULT", None)
    if fault:
        env["XDISTILL_TEST_FAULT"] = fault
    if batch_log:
        env["XDISTILL_TEST_BATCH_LOG"] = str(batch_log)
    if prng_impl:
        env["JAX_DEFAULT_PRNG_IMPL"] = prng_impl
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout + p.stderr


def _ckpts(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _metrics(workdir):
    return [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]


def _batches(path):
    """{step: indices} keeping the last line per step (a resumed run redoes lost steps)."""
    out = {}
    for line in path.read_text().splitlines():
        step, idx = line.split()
        out[int(step)] = idx
    return out


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("reliability_runs")
    ref, run = base / "ref", base / "killed"
    ref_rc, ref_log = _train(dataset, ref, batch_log=base / "ref_batches.txt")
    assert ref_rc == 0, ref_log[-3000:]
    log = base / "killed_batches.txt"
    seen = []
    # 1. SIGKILL while the checkpoint of step 4 is being written (async save started)
    rc, out = _train(dataset, run, "kill@ckpt:4", log)
    seen.append(("ckpt", rc, _ckpts(run), sorted(p.name for p in (run / "checkpoints").iterdir()), out))
    # 2. rerun: resumes at 2; SIGKILL while step 3 computes
    rc, out = _train(dataset, run, "kill@step:3", log)
    seen.append(("step", rc, _ckpts(run), None, out))
    # 3. rerun: resumes at 2; SIGKILL during the validation at step 4 (checkpoint 4 on disk)
    rc, out = _train(dataset, run, "kill@val:4", log)
    seen.append(("val", rc, _ckpts(run), [m["split"] for m in _metrics(run) if m["step"] == 4], out))
    # 4. rerun: resumes at 4 (redoing its validation); SIGTERM during step 5 -> save, exit 75
    rc, out = _train(dataset, run, "term@step:5", log)
    seen.append(("term", rc, _ckpts(run), None, out))
    # 5. rerun: finishes
    rc, out = _train(dataset, run, None, log)
    seen.append(("final", rc, _ckpts(run), None, out))
    return dict(ref=ref, run=run, seen=seen, ref_batches=base / "ref_batches.txt", batches=log)


def test_each_fault_stops_where_intended(runs):
    (_, rc1, c1, names1, out1), (_, rc2, c2, _, out2), (_, rc3, c3, splits3, out3), \
        (_, rc4, c4, _, out4), (_, rc5, c5, _, out5) = runs["seen"]
    assert rc1 == -9 and "test fault: kill at ckpt 4" in out1, out1[-3000:]
    assert c1 == [2], names1  # the half-written step 4 is not a checkpoint
    assert rc2 == -9 and "checkpoints/2 at step 2" in out2 and "test fault: kill at step 3" in out2, out2[-3000:]
    assert c2 == [2]
    assert "checkpoints/2 at step 2" in out3 and "checkpoints/4 at step 4" in out4
    assert rc3 == -9 and "test fault: kill at val 4" in out3, out3[-3000:]
    assert c3 == [2, 4] and splits3 == ["train"]  # killed before the val line of step 4
    assert rc4 == 75 and "SIGTERM: checkpoint saved at step 5" in out4, out4[-3000:]
    assert c4 == [4, 5]
    assert rc5 == 0, out5[-3000:]
    assert c5 == [5, 6]


def test_resumed_run_equals_uninterrupted_run(runs):
    ref, got = restored_state(runs["ref"], STEPS), restored_state(runs["run"], STEPS)
    assert ref.keys() == got.keys()
    # bitwise on CPU: the same compiled step, restored state, loader position and per-step keys
    worst = max(float(np.max(np.abs(ref[k].astype(np.float64) - got[k]))) for k in ref)
    assert worst == 0.0, worst


def test_metrics_have_each_step_once_with_the_same_values(runs):
    ref, got = _metrics(runs["ref"]), _metrics(runs["run"])
    for split, steps in (("train", list(range(1, STEPS + 1))), ("val", [2, 4, 6])):
        r = [m for m in ref if m["split"] == split]
        g = [m for m in got if m["split"] == split]
        assert [m["step"] for m in r] == [m["step"] for m in g] == steps
        for a, b in zip(r, g):
            assert a["loss"] == b["loss"], (split, a["step"])


def test_data_order_after_resume_equals_uninterrupted(runs):
    ref, got = _batches(runs["ref_batches"]), _batches(runs["batches"])
    # the loader prefetches 2 batches past the last step; every trained step saw the reference's batch
    assert sorted(ref) == list(range(1, STEPS + 3))
    ref = {s: ref[s] for s in range(1, STEPS + 1)}
    assert {s: got[s] for s in ref} == ref
    epoch1 = sorted(int(i) for s in (1, 2, 3) for i in ref[s].split(","))
    assert epoch1 == list(range(6))  # each example once per epoch


def _copy_ckpts(runs, tmp_path):
    dst = tmp_path / "w"
    shutil.copytree(runs["ref"], dst)
    assert _ckpts(dst) == [4, 6]
    return dst


def _data_files(step_dir):
    return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 0)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_latest_checkpoint_falls_back_with_warning(runs, dataset, tmp_path, caplog, monkeypatch, damage):
    unraisable = []  # what Python would print as "Exception ignored" tracebacks
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    w = _copy_ckpts(runs, tmp_path)
    latest = w / "checkpoints" / "6"
    files = _data_files(latest)
    if damage == "truncate":  # every array file cut to half its size (a write cut short)
        for f in files:
            if "ocdbt.process" in str(f) or f.parent.name == "d":
                f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:  # the array data directory gone (a partly deleted checkpoint)
        for d in {f.parent for f in files if f.parent.name == "d"}:
            shutil.rmtree(d)
    with caplog.at_level(logging.WARNING, logger="xdistill_jax.checkpoints"):
        state, data_state, step = Checkpointer(w / "checkpoints").restore(abstract_state_of(w))
    assert step == 4
    text = caplog.text
    assert f"restored checkpoint {w / 'checkpoints' / '4'} instead of the damaged {latest}" in text
    # the damaged checkpoint's reads that finished after orbax closed their event loop: dropped
    # (1,029 "Event loop is closed" tracebacks in one run before), nothing else
    time.sleep(0.5)
    assert [str(u.exc_value) for u in unraisable] == []
    want = restored_state(runs["ref"], 4)
    got = {jax.tree_util.keystr(k): np.asarray(v)
           for k, v in jax.tree_util.tree_flatten_with_path((state.params, state.batch_stats, state.opt_state))[0]}
    assert all(np.array_equal(want[k], got[k]) for k in want)
    assert data_state["loader"]
    if damage == "truncate":
        # the same command trains steps 5-6 again and ends where the unbroken run ended: the
        # damaged folder is set aside (renamed; was left in place, and saving step 6 again failed
        # with orbax's StepAlreadyExistsError on every rerun)
        rc, out = _train(dataset, w)
        assert rc == 0 and f"set the damaged checkpoints aside: {latest}.damaged" in out, out[-3000:]
        assert _ckpts(w) == [4, 6] and (w / "checkpoints" / "6.damaged").is_dir()
        ref, again = restored_state(runs["ref"], STEPS), restored_state(w, STEPS)
        assert all(np.array_equal(ref[k], again[k]) for k in ref)
        assert [(m["step"], m["split"]) for m in _metrics(w)] == [(m["step"], m["split"]) for m in _metrics(runs["ref"])]


def test_no_restorable_checkpoint_is_an_error_naming_each(runs, tmp_path):
    w = _copy_ckpts(runs, tmp_path)
    for s in (4, 6):
        for d in {f.parent for f in _data_files(w / "checkpoints" / str(s)) if f.parent.name == "d"}:
            shutil.rmtree(d)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* could be restored: step 6: .*step 4: "):
        Checkpointer(w / "checkpoints").restore(abstract_state_of(w))


def test_only_closed_loop_callback_errors_are_dropped(monkeypatch):
    import asyncio
    import types

    from xdistill_jax.checkpoints import _closed_loop_callback, quiet_closed_loop_callbacks

    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed") as closed:
        loop.call_soon_threadsafe(print)  # what a read finishing after its loop closed does
    assert _closed_loop_callback(closed.value)
    assert not _closed_loop_callback(RuntimeError("Event loop is closed"))  # not raised by asyncio
    assert not _closed_loop_callback(ValueError("Event loop is closed"))
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    quiet_closed_loop_callbacks()
    hook = sys.unraisablehook
    quiet_closed_loop_callbacks()
    assert sys.unraisablehook is hook  # wrapped once
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"), exc_type=RuntimeError,
                                  exc_traceback=None, err_msg=None, object=None)
    sys.unraisablehook(types.SimpleNamespace(exc_value=closed.value, exc_type=RuntimeError,
                                             exc_traceback=closed.value.__traceback__, err_msg=None, object=None))
    sys.unraisablehook(other)
    assert seen == [other]


def test_a_failed_checkpoint_write_is_one_error_naming_the_step_and_the_last_complete_one(tmp_path):
    """A write that fails (the disk full; here the file size limit) was orbax's traceback followed by
    ~1,000 "Event loop is closed" and ~400 shutdown tracebacks, exit 1: now one CheckpointError
    (exit 2 from `xdistill train`) naming the step, the OS's reason and the checkpoint to resume
    from; the half-written step is no checkpoint."""
    import resource
    import signal

    import jax.numpy as jnp

    ckpt = Checkpointer(tmp_path / "c", keep=3, async_save=True)
    state = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(512, 1024)).astype(np.float32))}
    ckpt.save(1, state, {"at": 1})
    ckpt.wait()
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limit[1]))
    try:
        ckpt.save(2, state, {"at": 2})
        with pytest.raises(CheckpointError, match=(
                rf"writing checkpoint {re.escape(str(tmp_path / 'c' / '2'))} failed \(.*File too large.*\); the last "
                rf"complete checkpoint is {re.escape(str(tmp_path / 'c' / '1'))}: rerun the same command")):
            ckpt.wait()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    ckpt.close()
    assert Checkpointer(tmp_path / "c").all_steps() == [1]  # the half-written step 2 is none


def _replicated_state(shapes, seed=0):
    """{name: float32 array} replicated over the 4 test devices, with `shapes` of its own (so
    that no earlier test compiled anything for them), and its abstract tree (to restore it)."""
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
    r = np.random.default_rng(seed)
    state = {f"a{i}": jax.device_put(r.normal(size=s).astype(np.float32), NamedSharding(mesh, PartitionSpec()))
             for i, s in enumerate(shapes)}
    return state, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_a_save_of_a_replicated_state_compiles_nothing(tmp_path):
    """Each array is written whole by its first replica (`checkpoints.state_item_handler`):
    orbax's replica-parallel default cut each replicated array into one slice per device, each an
    eagerly compiled `jit(slice)`, here 3 arrays x 4 slices; for the train state 140 compiles,
    9.2 s for a process's first save against 1.2 s written whole (benchmarks/checkpoint_save.py)."""
    state, abstract = _replicated_state([(12, 40, 3), (36, 5), (20, 1, 9)])
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    ckpt = Checkpointer(tmp_path / "c", keep=3, async_save=False)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        ckpt.save(1, state, {"at": 1})
        ckpt.wait()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    ckpt.close()
    assert compiles == []
    got, data, step = Checkpointer(tmp_path / "c").restore(abstract)
    assert (step, data) == (1, {"at": 1})
    for k in state:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(state[k]))
        assert got[k].sharding == state[k].sharding


def test_a_checkpoint_written_by_orbaxs_standard_handler_restores(tmp_path):
    """Checkpoints of earlier versions (written with `ocp.StandardCheckpointHandler`, before
    2026-12-07) hold the same PyTree format: they restore, and this version's restore under it."""
    import orbax.checkpoint as ocp

    state, abstract = _replicated_state([(6, 10), (3, 7, 2)], seed=1)
    manager = ocp.CheckpointManager(tmp_path / "c", options=ocp.CheckpointManagerOptions(create=True),
                                    item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                   "data": ocp.JsonCheckpointHandler()})
    manager.save(4, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"at": 4})))
    manager.wait_until_finished()
    manager.close()
    got, data, step = Checkpointer(tmp_path / "c").restore(abstract)
    assert (step, data) == (4, {"at": 4})
    for k in state:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(state[k]))

    ckpt = Checkpointer(tmp_path / "d", async_save=False)
    ckpt.save(5, state, {"at": 5})
    ckpt.close()
    manager = ocp.CheckpointManager(tmp_path / "d", item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                                  "data": ocp.JsonCheckpointHandler()})
    back = manager.restore(5, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    manager.close()
    for k in state:
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(state[k]))


def test_a_resume_under_another_default_prng_keeps_the_runs_keys(runs, dataset, tmp_path):
    """Resumed under another JAX_DEFAULT_PRNG_IMPL, a run trained on with other keys (548 of 550
    leaves differed at the end, no word said): the implementation it started with is saved with
    each checkpoint and used again, with a warning; the run ends bitwise where it would have."""
    w = _copy_ckpts(runs, tmp_path)
    started = jax.config.jax_default_prng_impl  # the runs' (the tests' default, rbg)
    other = "threefry2x32" if started != "threefry2x32" else "rbg"
    shutil.rmtree(w / "checkpoints" / "6")  # resume at 4
    rc, out = _train(dataset, w, prng_impl=other)
    assert rc == 0 and (f"resuming with the PRNG implementation the run started with ({started}), not this "
                        f"process's default ({other})") in out, out[-3000:]
    ref, again = restored_state(runs["ref"], STEPS), restored_state(w, STEPS)
    assert all(np.array_equal(ref[k], again[k]) for k in ref)


def test_a_stop_while_starting_exits_75_and_changes_nothing(runs, dataset, tmp_path):
    """SIGTERM while a resumed run starts (restoring, compiling, redoing the validation): the
    process died of the signal (-15; SIGINT: a KeyboardInterrupt traceback) where a requeue
    wrapper waits for 75. Now 75, saying so; the checkpoints are as they were."""
    w = _copy_ckpts(runs, tmp_path)
    shutil.rmtree(w / "checkpoints" / "6")
    rc, out = _train(dataset, w, fault="term@start:4")
    assert rc == 75 and ("SIGTERM: stopped while starting, before any step was trained; the checkpoints are as "
                         "they were: rerun the same command to continue") in out, out[-3000:]
    assert "Traceback" not in out and _ckpts(w) == [4]
