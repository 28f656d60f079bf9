"""`xdistill train` in two `jax.distributed` processes, end to end through the command line: a
TPU pod's hosts, here two CPU processes on loopback with one device each
(`--config.distributed.*`). Each process reads its own slice of the data; only process 0 writes
the metrics and config.json; both write and resume the checkpoints; validation gathers every
example's depth for its metrics; and the run is the run of one process with two devices fed the
same global batches (the processes' slices in process order): the same losses, the same weights.

Until 2026-12-06 this path failed before its first step: the step's key was placed with
`jax.device_put` (refused for a key on a local device when the mesh spans processes), then each
prefetched batch tripped the loop's `jax.transfer_guard("disallow")` (with several processes jax
places it through `make_array_from_callback`, which the guard takes for an implicit transfer).
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import kitti_tiny
from train_fixtures import multiprocess_env, restored_state
from xdistill_jax import config_utils, hosts, input_pipeline, training_loop

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/synthetic_demo.py:smoke"
FIRST, STEPS = 2, 4  # the first run stops at FIRST (a checkpoint), the second resumes to STEPS
# A learning rate 100x below the default: where float32 rounding (the two programs' threads
# split the convolutions' sums differently) flips the sign of a near-zero gradient, Adam moves
# that weight by up to 2 x lr per step, and BatchNorm's running statistics follow. At 1e-4 that
# put the weights 4e-4 and the running variances 4.7e-3 apart after 4 steps on this data (its
# static drive gives the pose net near-zero gradients), as close as a lost optimiser state.
LR = 1e-6


def _overrides(dataset, steps):
    return [f"--config.data.dataset_dir={dataset}", "--config.data.val_split=train",
            "--config.distill.weight=0", "--config.optim.batch_size=2", f"--config.optim.num_steps={steps}",
            "--config.run.ckpt_every=2", "--config.run.val_every=2", "--config.run.keep=2",
            "--config.data.num_workers=0", f"--config.optim.lr={LR}",
            f"--config.model.init={dataset / 'resnet18.msgpack'}",
            f"--config.data.val_gt_depth={dataset / 'gt_depths.npz'}", "--config.data.val_gt_crop=",
            "--config.data.val_batches=-1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The prepared split, and beside it an "ImageNet" ResNet-18 encoder file for
    `model.init` (the paper's setting): the processes place its weights on the mesh."""
    import jax.numpy as jnp

    from data_pipelines.kitti import prepare
    from xdistill_jax.convert import save_variables
    from xdistill_jax.models.resnet import ResNetEncoder

    base = tmp_path_factory.mktemp("multiprocess_data")
    raw, split = kitti_tiny.make_tree(base / "kitti")
    prepare.prepare_split(raw, split, base / "tfds", "train", 32, 96)
    enc = ResNetEncoder(18, 1, kernel_layout="HWIO").init(jax.random.key(5), jnp.zeros((1, 64, 64, 3)), train=False)
    save_variables(base / "tfds" / "resnet18.msgpack", jax.tree.map(lambda x: np.asarray(x) * 0.9, enc))
    _write_gt(base / "tfds")
    return base / "tfds"


def _write_gt(tfds_dir):
    """Depth ground truth for the validation split (`xdistill export-gt`'s format, by example id)."""
    from data_pipelines.kitti.tfds_builder import open_split

    ids = [ex["id"].decode() for ex in open_split(tfds_dir, "train")]
    r = np.random.default_rng(0)
    gt = {f"depth_{i:05d}": r.uniform(1.0, 50.0, (30, 100)).astype(np.float32) for i in range(len(ids))}
    np.savez_compressed(tfds_dir / "gt_depths.npz", files=np.array(ids), **gt)


def _two_processes(dataset, workdir, steps, *, datasets=None, workdirs=None, end_others=True, timeout=600,
                   extra=(), faults=(None, None)):
    """Both processes of one `xdistill train` command; [(exit status, output)] by process.
    `datasets` / `workdirs`: each process's own (as if each host's disk held a different one).
    `faults`: each process's XDISTILL_TEST_FAULT (training_loop's test hook), or None.
    With `end_others`, one that fails ends the other (which would wait for it at its next
    collective); without, both are left to end by themselves within `timeout` seconds."""
    datasets = datasets or [dataset, dataset]
    workdirs = workdirs or [workdir, workdir]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, logs = [], []
    for i in range(2):
        env = multiprocess_env(dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                                    XDISTILL_TEST_BATCH_LOG=str(workdir.parent / f"batches_{i}.txt")))
        env.pop("XDISTILL_TEST_FAULT", None)
        if faults[i]:
            env["XDISTILL_TEST_FAULT"] = faults[i]
        cmd = [sys.executable, "-m", "xdistill_jax", "train", "--config", CONFIG, "--workdir", str(workdirs[i]),
               *_overrides(datasets[i], steps), *extra, "--config.distributed.enabled=True",
               f"--config.distributed.coordinator_address=127.0.0.1:{port}",
               "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"]
        logs.append(workdir.parent / f"train_{steps}_{i}.log")
        with open(logs[-1], "w") as out:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if end_others and any(p.returncode not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    return [(p.returncode, log.read_text()) for p, log in zip(procs, logs)]


class _Hosts:
    """One process's stand-in for the hosts' loaders: their batches concatenated in process
    order, as `make_array_from_process_local_data` assembles the global batch."""

    def __init__(self, iterators):
        self.its = iterators

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(it) for it in self.its]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):
        return {"hosts": [it.get_state() for it in self.its]}

    def set_state(self, state):
        for it, s in zip(self.its, state["hosts"]):
            it.set_state(s)

    def close(self):
        for it in self.its:
            getattr(it, "close", lambda: None)()


def _one_process_of_two_devices(dataset, workdir):
    from data_pipelines.kitti.tfds_builder import open_split

    config = config_utils.apply_overrides(config_utils.load_config_file(CONFIG),
                                          _overrides(dataset, STEPS) + ["--config.mesh.num_devices=2"])
    source = open_split(dataset, "train")
    kw = dict(source_scales=False)  # as training reads it without loss.v1_multiscale

    def train_iter():
        return _Hosts([input_pipeline.make_train_iterator(
            source, global_batch_size=config.optim.batch_size, seed=config.run.seed, augment=config.data.augment,
            process_index=p, process_count=2, **kw) for p in range(2)])

    def val_iter():
        return _Hosts([input_pipeline.make_eval_iterator(
            source, global_batch_size=config.optim.batch_size, process_index=p, process_count=2, **kw)
            for p in range(2)])

    data = training_loop.TrainingData(train_iter, val_iter, len(source), lambda i: source[i]["id"].decode(),
                                      len(source))
    assert training_loop.train_and_evaluate(config, workdir, data=data) == 0


def test_replicate_places_host_values_and_keeps_replicated_arrays():
    """`train.replicate` (the key of the step and loaded encoder weights, on one process or
    several): numpy arrays, an array committed to one device and a PRNG key come back replicated
    on the mesh with their values; an array already replicated there is returned as it is."""
    from xdistill_jax import train

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    sharding = train.replicated(mesh)
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    placed = jax.device_put(host, sharding)
    committed = jax.device_put(np.float32(2.5), jax.devices()[1])
    key = jax.random.key(7)
    out = train.replicate({"host": host, "placed": placed, "committed": committed, "key": key}, mesh)
    assert out["placed"] is placed
    for name, value in out.items():
        assert value.sharding.is_equivalent_to(sharding, value.ndim), name
    np.testing.assert_array_equal(out["host"], host)
    assert float(out["committed"]) == 2.5
    assert jax.random.key_impl(out["key"]) == jax.random.key_impl(key)
    np.testing.assert_array_equal(jax.random.key_data(out["key"]), jax.random.key_data(key))


def _metrics(workdir):
    return [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]


def _batch_lines(path):
    return [tuple(int(i) for i in line.split()[1].split(",")) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("multiprocess_runs")
    workdir = base / "two_processes"
    first = _two_processes(dataset, workdir, FIRST)
    for rc, out in first:
        assert rc == 0, out[-3000:]
    after_first = [_batch_lines(base / f"batches_{i}.txt") for i in range(2)]
    second = _two_processes(dataset, workdir, STEPS)
    for rc, out in second:
        assert rc == 0, out[-3000:]
    ref = base / "one_process"
    _one_process_of_two_devices(dataset, ref)
    return dict(workdir=workdir, ref=ref, first=first, second=second, after_first=after_first, dataset=dataset,
                batches=[_batch_lines(base / f"batches_{i}.txt") for i in range(2)])


def test_process_0_writes_the_run_and_both_resume_it(runs):
    workdir = runs["workdir"]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    metrics = _metrics(workdir)
    assert [m["step"] for m in metrics if m["split"] == "train"] == [1, 2, 3, 4]  # each once: not per process
    assert [m["step"] for m in metrics if m["split"] == "val"] == [2, 4]
    saved = json.loads((workdir / "config.json").read_text())["distributed"]
    assert saved["num_processes"] == 2
    assert saved["process_id"] == -1  # not process 0's: each process gives its own at launch
    assert not list(workdir.glob(".xdistill_shared_probe*"))  # the shared-workdir check's probe: removed
    (_, out0), (_, out1) = runs["second"]
    assert f"resuming from {workdir / 'checkpoints' / '2'} at step 2" in out0
    assert "step 4/4" in out0 and "step 4/4" not in out1  # progress lines from process 0 only
    # the launch settings (this process's id, the coordinator's port) are not the run's settings
    for out in (out0, out1):
        changed = [line for line in out.splitlines() if "with changed settings" in line]
        assert changed and all("distributed." not in line and "optim.num_steps: 2 -> 4" in line for line in changed)


def test_each_process_reads_its_own_slice_and_resumes_its_order(runs):
    """Process p trains on the p-th example of each global batch (one example per step: the
    global batch of 2 over 2 processes), which is what one process's loader gives for that
    global batch; after the resume each continues with the batches the first run had fetched
    ahead for steps 3 and 4 (the loader's position in the checkpoint)."""
    from data_pipelines.kitti.tfds_builder import open_split

    config = config_utils.load_config(runs["workdir"])
    one = input_pipeline.make_train_dataset(open_split(runs["dataset"], "train"), global_batch_size=2,
                                            seed=config.run.seed, augment=False, num_epochs=None)
    for p in range(2):
        lines, first = runs["batches"][p], runs["after_first"][p]
        assert all(len(b) == 1 for b in lines), (p, lines)
        steps = [int(line.split()[0]) for line in (runs["workdir"].parent / f"batches_{p}.txt").read_text().splitlines()]
        assert [b[0] for b in lines] == [int(one[step - 1]["index"][p]) for step in steps], (p, lines)
        ahead = first[FIRST:]  # fetched ahead by the first run, not trained
        assert len(ahead) >= STEPS - FIRST
        assert lines[len(first):len(first) + STEPS - FIRST] == ahead[:STEPS - FIRST], (p, lines)
    # the two processes' examples of a step are two different examples (one's batch of that step)
    assert all(a != b for a, b in zip(runs["batches"][0], runs["batches"][1]))


def test_two_processes_train_as_one_process_of_two_devices(runs):
    """The same global batches through one process with two devices: the same losses, weights,
    running statistics and Adam state after the resumed run's 4 steps, to what float32 rounding
    makes of them (the two programs split the convolutions' sums over threads differently).
    Measured 2026-12-06 (AMD EPYC VM): losses 4.3e-8 apart, weights 3.5e-6 (a near-zero
    gradient whose sign rounding flips moves a weight by up to 2 x lr per step), running
    statistics 2.6e-6, Adam's moments 1.1e-3 of their leaf's largest. A state not restored at
    the resume (weights re-initialised, statistics or moments reset) is far beyond these bounds.
    Since the hosts share each global batch (2026-12-07) the batches differ from those of that
    measurement: losses and weights as close, one near-zero first-moment leaf 1.4e-2 of its
    largest (2.2e-8 apart). On an AVX2-only AMD EPYC VM (2026-12-07, later) the pose encoder's
    layer1_1 conv2 first moment was 1.8e-2 of its largest (1.6e-6 apart; largest 8.8e-5, the
    largest first moment 1.5e-2), past the 1e-2 bound then: 5e-2 now, still far below what a
    moment reset or a re-initialised weight gives (all of the leaf)."""
    got, want = _metrics(runs["workdir"]), _metrics(runs["ref"])
    assert [(m["step"], m["split"]) for m in got] == [(m["step"], m["split"]) for m in want]
    np.testing.assert_allclose([m["loss"] for m in got], [m["loss"] for m in want], rtol=0, atol=1e-6)
    # validation's depth metrics: every example's prediction gathered from both processes
    vals = [(m, w) for m, w in zip(got, want) if m["split"] == "val"]
    assert vals and all(m["num_images"] == w["num_images"] == 6 for m, w in vals)
    np.testing.assert_allclose([m["abs_rel"] for m, _ in vals], [w["abs_rel"] for _, w in vals], rtol=1e-5)
    a, b = restored_state(runs["workdir"], STEPS), restored_state(runs["ref"], STEPS)
    assert a.keys() == b.keys()
    # params and batch_stats: absolute; Adam's moments: relative to each leaf's largest, or to
    # 1e-3 of the largest of that moment's leaves where a leaf's gradients are all near zero (its
    # rounding differences are then a large fraction of it: 1.4e-2 of a first moment whose
    # largest entry is 1.6e-6, 2.2e-8 apart, 2026-12-07)
    def kind(k):
        return ".mu[" if ".mu[" in k else ".nu[" if ".nu[" in k else "other"

    largest = {}
    for k in b:
        largest[kind(k)] = max(largest.get(kind(k), 0.0), float(np.max(np.abs(b[k]))))
    for part, bound, scale in (("[0]", 2 * LR * STEPS, None), ("[1]", 1e-4, None), ("[2]", 5e-2, "leaf")):
        keys = [k for k in a if k.startswith(part)]
        assert keys
        worst = max((float(np.max(np.abs(a[k] - b[k])) / (
            max(float(np.max(np.abs(b[k]))), 1e-3 * largest[kind(k)]) + 1e-30 if scale else 1)), k) for k in keys)
        k = worst[1]
        assert worst[0] <= bound, (worst, bound, float(np.max(np.abs(a[k] - b[k]))), float(np.max(np.abs(b[k]))),
                                   largest[kind(k)])
    # both started from the encoder file (its weights x 0.9 stay within lr x steps of the init)
    from xdistill_jax.convert import load_variables

    enc = load_variables(pathlib.Path(config_utils.load_config(runs["workdir"]).model.init))
    conv1 = "[0]['depth']['encoder']['conv1']['kernel']"
    np.testing.assert_allclose(a[conv1], enc["params"]["conv1"]["kernel"], rtol=0, atol=2 * LR * STEPS)
    counts = [k for k in a if k.endswith(".count")]
    assert counts and all(int(a[k]) == int(b[k]) == STEPS for k in counts)  # Adam's steps, resumed


def test_a_process_whose_data_is_missing_stops_every_process(dataset, tmp_path):
    """Host 1 lacks the prepared split (the data is read from each host's own path): every process
    exits 2 before any compilation or write, process 1 naming the config key and process 0
    naming process 1. Until 2026-12-06 process 1 exited 2 alone and process 0 waited at its next
    collective until Gloo's timeout ended it with a DEADLINE_EXCEEDED traceback (30 s later on the
    CPU; on GPUs or a pod, until the collective's own timeout)."""
    workdir = tmp_path / "run"
    results = _two_processes(dataset, workdir, 2, datasets=[dataset, tmp_path / "not_prepared"],
                             end_others=False, timeout=120)
    (rc0, out0), (rc1, out1) = results
    assert (rc0, rc1) == (2, 2), (out0[-2000:], out1[-2000:])
    assert "config.data.dataset_dir" in out1 and "no prepared split" in out1
    assert "process 1 of 2 failed its setup checks" in out0
    assert "Traceback" not in out0 + out1
    assert not workdir.exists()


@pytest.mark.parametrize("stopped", [0, 1])
def test_a_stop_signal_on_one_host_while_starting_ends_every_process_with_75(dataset, tmp_path, stopped):
    """SIGTERM to one process after the setup checks, before the first step (the test hook's
    "start" point): every process exits 75 (rerun the same command), the stopped one saying so
    and the other naming it, without a traceback or an abort, and nothing is written. Until
    2026-12-07 the stopped process printed its exit-75 message and then aborted in JAX's shutdown
    barrier (-6, after ~100 s when it was process 0), and the other exited 2, "failed"."""
    workdir = tmp_path / "run"
    faults = [None, None]
    faults[stopped] = "term@start:0"
    results = _two_processes(dataset, workdir, 2, end_others=False, timeout=240, faults=faults)
    (rc0, out0), (rc1, out1) = results
    assert (rc0, rc1) == (75, 75), (out0[-2000:], out1[-2000:])
    outs = [out0, out1]
    assert "stopped while starting, before any step was trained" in outs[stopped]
    assert f"process {stopped} of 2 was stopped (_StoppedWhileStarting: SIGTERM)" in outs[1 - stopped]
    assert "rerun the same command" in outs[1 - stopped]
    assert "Traceback" not in out0 + out1 and "Terminating process" not in out0 + out1
    checkpoints = workdir / "checkpoints"
    assert not checkpoints.exists() or not [p for p in checkpoints.iterdir() if p.name.isdigit()]


def test_a_workdir_not_every_host_sees_stops_every_process(dataset, tmp_path):
    """Each host's own disk as the workdir (here: two directories): process 1 does not see the
    probe process 0 wrote, every process exits 2 naming the workdir, and the probe is gone.
    Without the check, process 1's resume would read its own disk's checkpoints (none) while
    process 0 restored its own."""
    a, b = tmp_path / "host0" / "run", tmp_path / "host1" / "run"
    a.parent.mkdir()  # each host's disk: a new run's probe goes into the workdir's existing parent
    b.parent.mkdir()
    results = _two_processes(dataset, tmp_path / "run", 2, workdirs=[a, b], end_others=False, timeout=120)
    (rc0, out0), (rc1, out1) = results
    assert (rc0, rc1) == (2, 2), (out0[-2000:], out1[-2000:])
    for out in (out0, out1):
        assert "the workdir must be one directory every host sees (process 1 of 2 does not)" in out
        assert "Traceback" not in out
    assert f"process 1 ({socket.gethostname()}) does not see the workdir {b}: not the probe process 0 wrote" in out1
    # the probe gone, nothing made: the logs alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host0", "host1", "train_2_0.log", "train_2_1.log"]
    assert list(a.parent.iterdir()) == list(b.parent.iterdir()) == []


def test_hosts_reading_different_data_stop_every_process(dataset, tmp_path):
    """Host 1's copy of the data is another preparation (4 of the 6 split lines): every process
    exits 2 before training, naming the example counts by process and that the data differs.
    Until 2026-12-06 each process took its own count for the epoch's steps, and the run went on
    with processes that disagreed about the data (here 3 and 2 steps per epoch)."""
    import shutil

    from data_pipelines.kitti import prepare
    from data_pipelines.kitti.tfds_builder import read_metadata

    meta = read_metadata(dataset, "train")
    lines = pathlib.Path(meta["split_file"]).read_text().splitlines()
    shorter = tmp_path / "shorter.txt"
    shorter.write_text("\n".join(lines[:4]) + "\n")
    other = tmp_path / "host1_tfds"
    prepare.prepare_split(meta["raw_dir"], shorter, other, "train", 32, 96)
    shutil.copy(dataset / "resnet18.msgpack", other)
    _write_gt(other)
    workdir = tmp_path / "run"
    (rc0, out0), (rc1, out1) = _two_processes(dataset, workdir, 2, datasets=[dataset, other],
                                              end_others=False, timeout=120)
    assert (rc0, rc1) == (2, 2), (out0[-2000:], out1[-2000:])
    for out in (out0, out1):
        assert ("the processes disagree (training examples: process 0 6, process 1 4; validation examples: "
                "process 0 6, process 1 4; data fingerprint: differs on process 1 from process 0's): "
                "the data must be the same on every host") in out, out[-2000:]
        assert "Traceback" not in out
    assert not workdir.exists()


@pytest.mark.parametrize("host", [1, 0])
def test_a_damaged_record_on_one_host_ends_every_process_at_once(dataset, tmp_path, host):
    """One host's copy of the split has a damaged record in its slice (16 bytes overwritten, the
    shard's size unchanged: the hosts' fingerprints agree). That process exits 2 naming the
    shard file and record; the other exits 2 at once naming the failed process and its error
    (`hosts.StopTogether`), with no traceback. Until 2026-12-06 the failing one printed its
    error and both waited out JAX's shutdown barrier, then aborted (SIGABRT) after 5 minutes.
    Host 1 damaged: process 0's collective breaks when process 1 ends (Gloo on the CPU) and the
    report says why; host 0 damaged: process 0, which hosts the coordination service, reports
    and waits until process 1's watcher has seen it."""
    import shutil

    damaged_copy = tmp_path / "damaged_tfds"
    shutil.copytree(dataset, damaged_copy)
    # records of this host's slice (indices host, host + 2, ...) only, and not record 0: the
    # setup checks read it (its stored size), and stop every process then
    damaged = kitti_tiny.damage_shard(damaged_copy, lambda d, n: 0 not in d and all(i % 2 == host for i in d))
    datasets = [damaged_copy if p == host else dataset for p in range(2)]
    t0 = time.monotonic()
    # no validation split: its ground truth check would read the damaged record before training
    # (every process stops there together, as for any setup check)
    results = _two_processes(dataset, tmp_path / "run", 4, datasets=datasets, end_others=False, timeout=240,
                             extra=["--config.data.val_split=", "--config.data.val_gt_depth="])
    elapsed = time.monotonic() - t0
    out_failed, out_other = results[host][1], results[1 - host][1]
    assert [rc for rc, _ in results] == [2, 2], (results[0][1][-2000:], results[1][1][-2000:], elapsed)
    m = re.search(r"xdistill train: prepared split 'train': .*damaged_tfds.*array_record-00000-of-00001, "
                  r"record (\d+) \(example \d+, the split file's entry \d+\) cannot be read", out_failed)
    assert m and int(m.group(1)) in damaged, out_failed[-2000:]
    assert re.search(rf"xdistill train: process {host} of 2 failed during training \(DamagedStoreError: "
                     rf"prepared split 'train': .*record {m.group(1)} .*\); process {1 - host} \(.*\) stops with it",
                     out_other), out_other[-2000:]
    assert "Traceback" not in out_failed + out_other
    assert elapsed < 200, elapsed


def test_a_resume_from_config_json_without_a_process_id_is_a_config_error(tmp_path):
    """config.json saves distributed.process_id as -1; resumed with `--workdir` alone where JAX
    cannot detect the id, jax.distributed.initialize's ValueError becomes exit 2 naming
    config.distributed (was a traceback, exit 1)."""
    config = config_utils.load_config_file(CONFIG)
    config = config_utils.apply_overrides(config, [
        "--config.distributed.enabled=True", "--config.distributed.coordinator_address=127.0.0.1:1",
        "--config.distributed.num_processes=2", "--config.distributed.process_id=1"])
    config_utils.save_config(config, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_", "CLOUD_TPU"))}
    out = subprocess.run([sys.executable, "-m", "xdistill_jax", "train", "--workdir", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "xdistill train: config.distributed:" in out.stderr and "--config.distributed.process_id" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_coordinator_address_that_is_not_host_port_or_whose_port_is_taken_is_a_config_error(tmp_path):
    """`--config.distributed.coordinator_address=localhost` (no port) was an IndexError traceback
    from inside jax.distributed, exit 1 (until 2026-12-07); a port in use on process 0's host a
    JaxRuntimeError traceback or SIGSEGV (both seen): now both exit 2 naming the key, the port
    found taken by a probe before JAX starts its service."""
    def train(address):
        return subprocess.run(
            [sys.executable, "-m", "xdistill_jax", "train", "--config", CONFIG, "--workdir", str(tmp_path / "w"),
             "--config.distributed.enabled=True", f"--config.distributed.coordinator_address={address}",
             "--config.distributed.num_processes=1", "--config.distributed.process_id=0"],
            cwd=REPO, capture_output=True, text=True, timeout=300)

    out = train("localhost")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "config.distributed.coordinator_address='localhost': expected HOST:PORT" in out.stderr
    assert "Traceback" not in out.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        out = train(address)
    assert out.returncode == 2, out.stderr[-2000:]
    assert (f"config.distributed.coordinator_address={address}: process 0 starts the coordination service "
            f"there, and port {address.split(':')[1]} is in use on this host") in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "w").exists()


def test_the_coordinator_port_probe(monkeypatch):
    """`hosts.coordinator_port_in_use`: a port another socket listens on (IPv4 loopback) is taken
    for JAX's all-address bind; the same port once closed is free; a bind address of the user's
    (JAX_COORDINATOR_BIND_ADDRESS) is what is probed. A listener on IPv6 alone leaves IPv4's
    wildcard, where gRPC's service starts: free (the first probe, dual-stack only, said taken)."""
    monkeypatch.delenv("JAX_COORDINATOR_BIND_ADDRESS", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert hosts.coordinator_port_in_use(f"10.0.0.2:{port}") == f"port {port} is in use on this host ([::]:{port})"
        monkeypatch.setenv("JAX_COORDINATOR_BIND_ADDRESS", f"127.0.0.2:{port}")
        assert hosts.coordinator_port_in_use(f"10.0.0.2:{port}") is None
        monkeypatch.setenv("JAX_COORDINATOR_BIND_ADDRESS", f"127.0.0.1:{port}")
        assert hosts.coordinator_port_in_use(f"10.0.0.2:{port}") == (
            f"port {port} is in use on this host (127.0.0.1:{port})")
    monkeypatch.delenv("JAX_COORDINATOR_BIND_ADDRESS")
    assert hosts.coordinator_port_in_use(f"10.0.0.2:{port}") is None
    try:
        v6 = socket.socket(socket.AF_INET6)
    except OSError:
        return  # no IPv6 on this host
    with v6:
        v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        v6.bind(("::", 0))
        v6.listen()
        port = v6.getsockname()[1]
        assert hosts.coordinator_port_in_use(f"10.0.0.2:{port}") is None


@pytest.mark.parametrize("value", [0, 5, 2**31 - 1, 2**31, 2**40 + 5, 2**62 - 1])
def test_check_same_sends_values_beyond_int32(value):
    """With jax's 64-bit mode off an int64 crosses processes as int32: `check_same` sends two
    31-bit halves (one process: the encoding round trip, as the allgather returns it)."""
    assert hosts._from_halves(hosts._to_halves([value, 7])).tolist() == [value, 7]


def test_a_probe_write_cut_short_is_removed(tmp_path, monkeypatch):
    """Process 0's probe write fails part way (the disk full): SetupError naming the probe, and
    the half-written probe removed (it was left in the workdir's parent until 2026-12-07). One
    process standing in for process 0 of 2: the collectives return what two processes would."""
    import errno

    from jax.experimental import multihost_utils

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: x)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x: np.stack([np.asarray(x), np.zeros_like(np.asarray(x))]))

    def write_then_fail(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[:2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", write_then_fail)
    with pytest.raises(hosts.SetupError, match=r"process 0 \(.*\) cannot write .*xdistill_shared_probe.*No space left"):
        hosts.check_shared_directory(tmp_path / "new_run")
    assert list(tmp_path.iterdir()) == []
