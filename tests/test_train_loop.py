"""train_and_evaluate end to end on a tiny in-memory split through the real grain loader:
checkpoint + resume, SIGTERM, non-finite loss, incompatible workdirs; and on a small synthetic
world prepared as TFDS splits: training lowers the val loss, a val GT of another split fails
through `xdistill train` before anything compiles."""

import dataclasses
import gc
import json
import logging
import os
import pathlib
import re
import signal
import threading

import jax
import numpy as np
import optax
import pytest

import kitti_tiny
from train_fixtures import FakeTeacher, abstract_state_of, records, tiny_config
from xdistill_jax import config_utils, input_pipeline, training_loop
from xdistill_jax.checkpoints import CheckpointError

H, W = 32, 96
RECS = records(8, H, W)


class _Wrapped:
    """A checkpointable iterator that calls `hook(batch_number, batch)` on each batch it yields."""

    def __init__(self, it, hook):
        self.it, self.hook, self.n = it, hook, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.n += 1
        return self.hook(self.n, batch)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def make_data(hook=None):
    teacher = FakeTeacher(RECS, H, W)

    def train_iter():
        it = input_pipeline.make_train_iterator(RECS, global_batch_size=4, seed=0, teacher=teacher)
        return _Wrapped(it, hook) if hook else it

    def val_iter():
        return input_pipeline.make_eval_iterator(RECS[:4], global_batch_size=4, teacher=FakeTeacher(RECS[:4], H, W))

    return training_loop.TrainingData(train_iter, val_iter, len(RECS), val_id=lambda i: RECS[i]["id"].decode())


def read_metrics(workdir, split="train"):
    lines = [json.loads(s) for s in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m["split"] == split]


def ckpt_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


HEAP_LOG = {}  # resumed_run's: the loop's log lines (heap freeze, compile) and what it did at the start


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(distill_weight=0.1)
    messages, logger = _Messages(), logging.getLogger(training_loop.__name__)
    level = logger.level
    logger.addHandler(messages)
    logger.setLevel(logging.INFO)
    from xdistill_jax import train

    real_init = train.create_train_state
    HEAP_LOG["compiling_at_init"] = []

    def init_spy(*args, **kwargs):  # is the step compiling on its thread when the init starts?
        HEAP_LOG["compiling_at_init"].append(any(t.name == "xdistill-step-compile" for t in threading.enumerate()))
        return real_init(*args, **kwargs)

    real_close = input_pipeline.DevicePrefetchIterator.close
    HEAP_LOG["loader_closed"] = 0

    def close_spy(self):  # the loop closes its loader (grain's worker processes) when it ends
        HEAP_LOG["loader_closed"] += 1
        real_close(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "create_train_state", init_spy)
        patch.setattr(input_pipeline.DevicePrefetchIterator, "close", close_spy)
        try:
            first = training_loop.train_and_evaluate(config, workdir, data=make_data())
            HEAP_LOG["freeze_count_after"] = [gc.get_freeze_count()]
            after_first = ckpt_steps(workdir)
            config.optim.num_steps = 4
            second = training_loop.train_and_evaluate(config, workdir, data=make_data())
            HEAP_LOG["freeze_count_after"].append(gc.get_freeze_count())
        finally:
            logger.removeHandler(messages)
            logger.setLevel(level)
    HEAP_LOG["lines"] = [m for m in messages.lines if "heap frozen" in m]
    HEAP_LOG["compile_lines"] = [m for m in messages.lines if "background thread" in m]
    return workdir, first, after_first, second


def test_smoke_run_checkpoints_and_resumes(resumed_run):
    workdir, first, after_first, second = resumed_run
    assert (first, second) == (training_loop.EXIT_OK, training_loop.EXIT_OK)
    assert after_first == [1, 2]
    assert ckpt_steps(workdir) == [2, 3, 4]  # keep=3
    train_steps = [m["step"] for m in read_metrics(workdir)]
    assert train_steps == [1, 2, 3, 4]  # continuous across the restart, no duplicates
    assert [m["step"] for m in read_metrics(workdir, "val")] == [1, 2, 3, 4]
    m = read_metrics(workdir)[-1]
    assert np.isfinite(m["loss"]) and m["loss"] == pytest.approx(m["photometric_loss"] + 0.1 * m["distill_loss"], rel=1e-5)
    saved = config_utils.load_config(workdir)
    assert saved.optim.num_steps == 4 and saved.distill.weight == 0.1
    assert saved.model.kernel_layout == "HWIO"  # "auto" on the CPU, saved resolved
    assert (workdir / "images" / "val_disp_step4.png").is_file()
    assert (workdir / "images" / "val_translator_step4.png").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (workdir / "tensorboard").iterdir())


def test_each_run_closes_its_loader(resumed_run):
    assert HEAP_LOG["loader_closed"] == 2


def test_the_heap_is_frozen_from_the_first_step_on_and_given_back(resumed_run):
    """Each run froze the garbage collector's heap once, right after its first step (step 1; the
    resumed run's first is step 3), and unfroze it on return."""
    lines = HEAP_LOG["lines"]
    assert [m.split(":")[0] for m in lines] == ["step 1", "step 3"], lines
    assert all(int(m.split("(")[1].split()[0]) > 10_000 for m in lines), lines
    assert HEAP_LOG["freeze_count_after"] == [0, 0]


def test_the_step_compiles_while_the_state_is_initialised(resumed_run):
    """The fresh run's init started while the step was compiling on its thread; the resumed run
    restored instead (no init). Each run's first step logged the compile's parts."""
    assert HEAP_LOG["compiling_at_init"] == [True]
    lines = HEAP_LOG["compile_lines"]
    assert [m.split(":")[0] for m in lines] == ["step 1", "step 3"], lines
    for m in lines:
        lower, compile_, start = (float(x) for x in re.findall(r"([0-9.]+) s", m))
        assert 0 < lower and 0 < compile_ and lower + compile_ < start, m


def test_pretrained_weights_that_do_not_fit_fail_before_the_step_compiles(tmp_path, monkeypatch, caplog):
    """config.model.init of a ResNet-18 for a ResNet-34 config: the loop names the parameters
    before the step's compile starts (a process that failed after it would wait for it). The
    ResNet-18 pose encoder, of another depth than the file's, starts from scratch: a warning
    says so (Monodepth2 initialises both encoders from ImageNet; silent until 2026-12-07)."""
    import logging

    import jax.numpy as jnp

    from xdistill_jax import background_compile
    from xdistill_jax.convert import save_variables
    from xdistill_jax.models.resnet import ResNetEncoder

    path = tmp_path / "resnet18.msgpack"
    save_variables(path, ResNetEncoder(18, 1, kernel_layout="HWIO").init(
        jax.random.key(5), jnp.zeros((1, 64, 64, 3)), train=False))
    started = []
    monkeypatch.setattr(background_compile, "AheadStep", lambda *a, **k: started.append(1))
    config = tiny_config(distill_weight=0.1, **{"model.init": str(path), "model.num_layers": 34})
    with pytest.raises(ValueError, match=r"pretrained depth encoder params: \d+ missing .*layer1_2"), \
            caplog.at_level(logging.WARNING, logger="xdistill_jax.train"):
        training_loop.train_and_evaluate(config, tmp_path / "run", data=make_data())
    assert not started
    assert ("the pose encoder (ResNet-18, model.pose_num_layers) starts from scratch: model.init holds "
            "ResNet-34 weights") in caplog.text


@pytest.mark.parametrize("kind", ["missing", "not_msgpack", "imagenet"])
def test_an_unreadable_encoder_file_fails_naming_the_key_before_the_workdir_is_made(kind, tmp_path):
    """config.model.init that does not exist or is not a weights file: a ConfigError (exit 2 from
    the CLI) naming the key and the file, read with the setup checks (in a multi-host run every
    process stops with it), before the workdir is made. Until 2026-12-06 a ValueError traceback
    after the workdir and its config.json were written. "imagenet" (the KITTI configs' value):
    the path is asked for (until 2026-12-07 those configs trained from scratch unless told)."""
    path = tmp_path / "resnet18.msgpack"
    if kind == "not_msgpack":
        path.write_bytes(b"not msgpack")
    config = tiny_config(distill_weight=0.1, **{"model.init": "imagenet" if kind == "imagenet" else str(path)})
    expected = {"missing": f"{re.escape(str(path))}: no such file", "not_msgpack": f"{re.escape(str(path))}: not a flax msgpack",
                "imagenet": r"'imagenet': this config starts both encoders from ImageNet weights.* pass "
                            r"--config\.model\.init=resnet18_imagenet\.msgpack, or --config\.model\.init=scratch"}[kind]
    with pytest.raises(config_utils.ConfigError, match=r"config\.model\.init: " + expected):
        training_loop.train_and_evaluate(config, tmp_path / "run", data=make_data())
    assert not (tmp_path / "run").exists()


def test_a_batch_larger_than_the_split_is_refused_with_steps_per_epoch_set(tmp_path):
    """The check looked at optim.steps_per_epoch when it was set (> 0): a batch larger than the
    split reached the loader, a traceback after config.json was written."""
    config = tiny_config(distill_weight=0.0, **{"optim.batch_size": 16, "optim.steps_per_epoch": 10})
    with pytest.raises(config_utils.ConfigError, match=r"config\.optim\.batch_size=16 exceeds the 8 training examples"):
        training_loop.train_and_evaluate(config, tmp_path / "run", data=make_data())
    assert not (tmp_path / "run").exists()


def test_a_workdir_that_is_a_file_is_refused_and_left_alone(tmp_path):
    """Until 2026-12-06 a FileExistsError traceback from the workdir's mkdir."""
    path = tmp_path / "run"
    path.write_text("notes\n")
    with pytest.raises(config_utils.ConfigError, match=rf"workdir {re.escape(str(path))}: exists and is not a directory"):
        training_loop.train_and_evaluate(tiny_config(distill_weight=0.1), path, data=make_data())
    assert path.read_text() == "notes\n"


def test_resume_continues_the_data_order(resumed_run):
    """The loader state saved at step 2 resumes at the third batch of an unbroken iterator."""
    from xdistill_jax.checkpoints import Checkpointer

    workdir = resumed_run[0]
    it = input_pipeline.make_train_iterator(RECS, global_batch_size=4, seed=0, teacher=FakeTeacher(RECS, H, W))
    unbroken = [next(it)["index"] for _ in range(4)]
    data_state = Checkpointer(workdir / "checkpoints").read_data_state(2)
    it2 = input_pipeline.make_train_iterator(RECS, global_batch_size=4, seed=0, teacher=FakeTeacher(RECS, H, W))
    it2.set_state(data_state["loader"])
    np.testing.assert_array_equal(next(it2)["index"], unbroken[2])


def test_incompatible_workdir_is_named(resumed_run):
    workdir = resumed_run[0]
    config = tiny_config(distill_weight=0.1, **{"model.num_layers": 34})
    with pytest.raises(CheckpointError, match=r"incompatible config.*model\.num_layers: 18 -> 34"):
        training_loop.train_and_evaluate(config, workdir, data=make_data())
    # without config.json the checkpoint itself is compared with the state the config builds
    (workdir / "config.json").rename(workdir / "config.json.bak")
    try:
        config = tiny_config(distill_weight=0.0)
        with pytest.raises(CheckpointError, match=r"does not match.*unexpected parameters.*params/translator"):
            training_loop.train_and_evaluate(config, workdir, data=make_data())
    finally:
        (workdir / "config.json.bak").rename(workdir / "config.json")


def test_a_loader_state_not_understood_names_the_checkpoint(resumed_run, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(resumed_run[0], workdir)
    meta = workdir / "checkpoints" / "4" / "data" / "metadata"
    data_state = json.loads(meta.read_text())
    assert data_state["loader"] == {"next_index": 4}
    meta.write_text(json.dumps(dict(data_state, loader={"position": 4})))
    config = tiny_config(distill_weight=0.1, **{"optim.num_steps": 5})
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoints/4: loader state .*position.* is not a "
                                              r"position in the batch sequence"):
        training_loop.train_and_evaluate(config, workdir, data=make_data())


def test_a_finished_run_keeps_its_config_when_rerun_with_other_settings(resumed_run, tmp_path):
    """Rerunning a finished run with a changed setting (here lambda 0.1 -> 0.05) trains nothing:
    config.json must keep the settings its checkpoints were trained with, or eval would label
    the run with the new ones."""
    import shutil

    workdir = tmp_path / "w"
    shutil.copytree(resumed_run[0], workdir)
    before = (workdir / "config.json").read_bytes()
    config = tiny_config(distill_weight=0.05, **{"optim.num_steps": 4})
    assert training_loop.train_and_evaluate(config, workdir, data=make_data()) == training_loop.EXIT_OK
    assert ckpt_steps(workdir) == [2, 3, 4]
    assert (workdir / "config.json").read_bytes() == before
    assert config_utils.load_config(workdir).distill.weight == 0.1


def test_batch_not_divisible_by_devices_fails_before_compiling(tmp_path):
    config = tiny_config(**{"optim.batch_size": 6})
    with pytest.raises(config_utils.ConfigError, match=r"optim\.batch_size.*4 devices"):
        training_loop.train_and_evaluate(config, tmp_path, data=make_data())
    assert not (tmp_path / "checkpoints").exists()


def test_sigterm_saves_and_exits_then_resumes(tmp_path):
    def hook(n, batch):
        if n == 2:  # delivered while the loop prefetches batch 2, i.e. during step 1
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    # one log line at step 3, the mean of steps 1-3: the stop's checkpoint carries the steps
    # logged since the last line, so the resumed run's line is the unbroken run's
    config = tiny_config(distill_weight=0.1, **{"optim.num_steps": 3, "run.ckpt_every": 100,
                                                 "run.val_every": 100, "run.log_every": 3})
    status = training_loop.train_and_evaluate(config, tmp_path / "w", data=make_data(hook))
    assert status == training_loop.EXIT_PREEMPTED
    stopped = ckpt_steps(tmp_path / "w")
    assert len(stopped) == 1 and 1 <= stopped[0] < 3
    assert training_loop.train_and_evaluate(config, tmp_path / "w", data=make_data()) == training_loop.EXIT_OK
    assert [m["step"] for m in read_metrics(tmp_path / "w")] == [3]
    assert ckpt_steps(tmp_path / "w")[-1] == 3
    assert training_loop.train_and_evaluate(config, tmp_path / "unbroken", data=make_data()) == training_loop.EXIT_OK
    (resumed,), (unbroken,) = read_metrics(tmp_path / "w"), read_metrics(tmp_path / "unbroken")
    for key in ("loss", "photometric_loss", "distill_loss", "grad_norm"):
        assert resumed[key] == unbroken[key], key


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    def hook(n, batch):
        if n == 3:
            batch = dict(batch, K=np.full_like(batch["K"], np.nan))
        return batch

    config = tiny_config(distill_weight=0.1, **{"optim.num_steps": 4, "run.val_every": 100})
    status = training_loop.train_and_evaluate(config, tmp_path, data=make_data(hook))
    assert status == training_loop.EXIT_NONFINITE
    assert "non-finite loss at step 3" in capsys.readouterr().err
    assert ckpt_steps(tmp_path) == [1, 2]


def test_validation_depth_metrics_with_ground_truth(tmp_path, caplog):
    """With config.data.val_gt_depth (export-gt format), validation adds the Eigen metrics, over
    every example of the split. Its losses are over full batches only: a val split smaller than a
    batch (3 examples, batch 4; `xdistill synth`'s val split of a small world) has none, which is
    said once at the start (each val line held the step alone, without a word, until 2026-12-07)."""
    r = np.random.default_rng(0)
    gt = {f"depth_{i:05d}": r.uniform(1.0, 50.0, (H, W)).astype(np.float32) for i in range(3)}
    gt["files"] = np.array([rec["id"].decode() for rec in RECS[:3]])
    np.savez_compressed(tmp_path / "gt_depths.npz", **gt)
    config = tiny_config(distill_weight=0.1, **{"optim.num_steps": 1, "data.val_gt_crop": "",
                                                 "data.val_gt_depth": str(tmp_path / "gt_depths.npz")})
    data = make_data()
    data = dataclasses.replace(data, num_val_examples=3, make_val_iterator=lambda: input_pipeline.make_eval_iterator(
        RECS[:3], global_batch_size=4, teacher=FakeTeacher(RECS[:3], H, W)))
    with caplog.at_level(logging.WARNING, logger="xdistill_jax.training_loop"):
        assert training_loop.train_and_evaluate(config, tmp_path / "w", data=data) == training_loop.EXIT_OK
    (val,) = read_metrics(tmp_path / "w", "val")
    assert val["num_images"] == 3
    assert 0 < val["abs_rel"] < 10 and 0 <= val["a1"] <= 1 and val["rmse"] > 0
    assert "loss" not in val
    warnings = [rec.getMessage() for rec in caplog.records if "fewer than a batch" in rec.getMessage()]
    assert warnings == [f"the val split {config.data.val_split!r} has 3 examples, fewer than a batch "
                        "(optim.batch_size=4): validation logs no loss, only the depth metrics (data.val_gt_depth)"]


def test_nonfinite_step_skipped_by_config_leaves_state_and_is_counted(tmp_path):
    """run.on_nonfinite="skip": the step with a NaN batch changes nothing but the step counter,
    training goes on, and metrics count the skipped steps."""
    import jax

    from xdistill_jax import train
    from xdistill_jax.checkpoints import Checkpointer
    from xdistill_jax.objective import Networks

    def hook(n, batch):
        return dict(batch, K=np.full_like(batch["K"], np.nan)) if n == 2 else batch

    config = tiny_config(distill_weight=0.1, **{"optim.num_steps": 3, "run.val_every": 100,
                                                 "run.on_nonfinite": "skip"})
    assert training_loop.train_and_evaluate(config, tmp_path, data=make_data(hook)) == training_loop.EXIT_OK
    m = read_metrics(tmp_path)
    assert [x["step"] for x in m] == [1, 2, 3]
    assert [x.get("skipped_steps", 0) for x in m] == [0, 1, 1]
    assert [x["skipped"] for x in m] == [0.0, 1.0, 0.0]
    assert np.isfinite(m[2]["loss"])

    nets = Networks.from_config(config)
    abstract = train.abstract_train_state(nets, train.make_optimizer(config, 2), train.make_mesh(config))[0]
    ckpt = Checkpointer(tmp_path / "checkpoints")
    states = {s: ckpt.restore(abstract, step=s)[0] for s in (1, 2, 3)}
    assert ckpt.read_data_state(3)["skipped"] == 1
    assert (int(states[1].step), int(states[2].step)) == (1, 2)

    assert isinstance(states[1].opt_state[1], optax.ScaleByScheduleState)

    def leaves(s):
        return [np.asarray(x) for x in jax.tree.leaves((s.params, s.batch_stats, s.opt_state[0]))]

    assert all(np.array_equal(a, b) for a, b in zip(leaves(states[1]), leaves(states[2])))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves(states[2]), leaves(states[3])))
    # Adam's count stays at the skip, the learning-rate schedule's moves on with the step (as
    # torch's epoch scheduler): it drops the rate at its step whatever was skipped
    assert [int(states[s].opt_state[0].count) for s in (1, 2, 3)] == [1, 1, 2]
    assert [int(states[s].opt_state[1].count) for s in (1, 2, 3)] == [1, 2, 3]

    # one log line for the three steps: its means are those of the two steps that trained (the
    # skipped step's NaN made them all NaN until 2026-12-07, a whole log_every window of curve)
    config.run.log_every = 3
    assert training_loop.train_and_evaluate(config, tmp_path / "one_line", data=make_data(hook)) == training_loop.EXIT_OK
    (line,) = read_metrics(tmp_path / "one_line")
    assert line["step"] == 3 and line["skipped_steps"] == 1 and line["skipped"] == pytest.approx(1 / 3)
    for key in ("loss", "photometric_loss", "grad_norm"):
        np.testing.assert_allclose(line[key], (m[0][key] + m[2][key]) / 2, rtol=1e-6, err_msg=key)


def test_the_time_spent_waiting_for_data_is_logged(resumed_run, tmp_path, capsys):
    """input_wait_frac: the share of the loop's time since the last log line spent in next(batch).
    A loader that sleeps 2 s per batch (in the loop's thread) makes it most of the time."""
    import time

    for m in read_metrics(resumed_run[0]):
        assert 0 <= m["input_wait_frac"] < 1
    log_every = 2  # the first window also holds the step's compile: the 2nd is the loader's

    def slow(n, batch):
        time.sleep(2.0)
        return batch

    config = tiny_config(**{"optim.num_steps": 2 * log_every, "run.val_every": 100, "run.ckpt_every": 100,
                            "run.log_every": log_every})
    assert training_loop.train_and_evaluate(config, tmp_path, data=make_data(slow)) == training_loop.EXIT_OK
    metrics = read_metrics(tmp_path)
    waits = [m["input_wait_frac"] for m in metrics]
    assert len(waits) == 2 and 0 < waits[1] < 1, waits
    # the 2nd window's rate: 2 steps of batch_size images in at least 2 x 2 s of loading (the
    # run's images_per_s counts from the start, the compile included)
    rate = metrics[1]["window_images_per_s"]
    assert 0 < rate <= config.optim.batch_size / 2.0, rate
    # the time waited in the 2nd window (its share x its length) is the loader's 2 sleeps of 2 s
    # (each next() loads one batch ahead), whatever the steps took: the share alone depends on
    # how fast the CPU runs the steps (0.38 with another test process on the 2 cores)
    window_s = log_every * config.optim.batch_size / rate
    assert waits[1] * window_s >= 2 * 2.0 - 1e-3, (waits[1], window_s)
    assert re.search(r"images/s \(waiting for data \d+%\)", capsys.readouterr().out)


def test_val_ground_truth_of_another_split_is_named(tmp_path):
    """The export-gt file is read by `load_gt_depths` (its `files` array is names, not a depth
    map) and each map's split line must be the val example's."""
    r = np.random.default_rng(0)
    gt = {f"depth_{i:05d}": r.uniform(1.0, 50.0, (H, W)).astype(np.float32) for i in range(3)}
    gt["files"] = np.array([RECS[i]["id"].decode() for i in (0, 1, 5)])
    np.savez_compressed(tmp_path / "gt.npz", **gt)
    val = training_loop.ValGroundTruth(str(tmp_path / "gt.npz"), lambda i: RECS[i]["id"].decode())
    assert len(val) == 3
    np.testing.assert_array_equal(val[1], gt["depth_00001"])
    with pytest.raises(ValueError, match=r"gt\.npz: depth map 2 is for '.*drive_0001_sync 5 l' but val "
                                         r"split example 2 is '.*drive_0001_sync 2 l'"):
        val[2]
    with pytest.raises(ValueError, match=r"gt\.npz: 3 depth maps, but the val split has an example 3"):
        val[3]


# ---------------------------------------------------------------- the synthetic world, through TFDS

WORLD_DRIVES, WORLD_FRAMES = 3, 8  # drives 1-2: 11 train lines (+1 val line we do not use); drive 3 held out
LEARN_STEPS = 20


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    """A small synthetic world (3 drives x 8 frames at 192x64) prepared at 32x96: the train split
    of drives 1-2, a val split of the 6 triplets of the held-out drive 3, and the GT of the test
    split (drive 3, frames 0..7: not the val split's lines). Then LEARN_STEPS training steps
    (ResNet-18, batch 2, one device, no distillation: the shared test workdir's compiled step)
    validated at step 0 (run.val_at_start, the untrained model) and at the end."""
    from data_pipelines.kitti.export_gt import export_gt_depths
    from data_pipelines.kitti.prepare import prepare_split
    from data_pipelines.synthetic_world.generate import generate_world
    from eval_workdir import REPO, TRAIN_OVERRIDES

    base = tmp_path_factory.mktemp("world")
    world = base / "world"
    generate_world(world, seed=3, drives=WORLD_DRIVES, frames=WORLD_FRAMES, width=192, height=64,
                   make3d_images=0, lidar_azimuths=16, velodyne="test", workers=1)
    splits = world / "splits"
    held_out = f"2021_01_01/2021_01_01_drive_{WORLD_DRIVES:04d}_sync"
    (splits / "heldout_files.txt").write_text(
        "".join(f"{held_out} {f} l\n" for f in range(1, WORLD_FRAMES - 1)))
    prepare_split(world, splits / "train_files.txt", base / "tfds", "train", H, W)
    prepare_split(world, splits / "heldout_files.txt", base / "tfds", "val", H, W)
    export_gt_depths(world, splits / "test_files.txt", base / "gt_test.npz")

    config = config_utils.load_config_file(str(REPO / "configs" / "synthetic_demo.py") + ":smoke")
    overrides = dict(TRAIN_OVERRIDES, **{
        "data.dataset_dir": base / "tfds", "optim.num_steps": LEARN_STEPS, "run.val_every": LEARN_STEPS,
        "run.ckpt_every": LEARN_STEPS, "run.log_every": LEARN_STEPS, "run.val_at_start": True})
    config = config_utils.apply_overrides(config, [f"--config.{k}={v}" for k, v in overrides.items()])
    workdir = base / "workdir"
    status = training_loop.train_and_evaluate(config, workdir)
    return base, workdir, status


def test_training_on_the_synthetic_world_lowers_the_val_loss(world_run):
    """Validation of the untrained model (step 0) against LEARN_STEPS Adam steps later, on the
    held-out drive. Measured over run.seed 0-4 (init and data order), after/before = 0.81, 0.76,
    0.75, 0.53, 0.85 (seed 0, this test's: 0.1003 -> 0.0812). With lr 1e-12 (only the BatchNorm
    running statistics move) seeds 0 and 1 stay at 0.1003 -> 0.1003 and 0.0943 -> 0.0945: the drop
    is the weights learning, not BN statistics settling."""
    _, workdir, status = world_run
    assert status == training_loop.EXIT_OK
    val = read_metrics(workdir, "val")
    assert [m["step"] for m in val] == [0, LEARN_STEPS]
    before, after = val[0]["loss"], val[1]["loss"]
    assert np.isfinite(before) and after < 0.9 * before, (before, after)


def test_cli_val_ground_truth_of_another_split_exits_2_before_compiling(world_run, monkeypatch, capsys):
    """`xdistill train` resuming the world run with the test split's GT as val GT: status 2,
    the message names the key, the file and both split lines; likewise a missing GT file and a
    val split never prepared; nothing is compiled and the workdir (config.json, checkpoints,
    metrics) is left as it was."""
    from xdistill_jax import cli, train

    base, workdir, _ = world_run
    compiled = []
    monkeypatch.setattr(train, "make_train_step", lambda *a, **k: compiled.append(1))
    monkeypatch.setattr(train, "create_train_state", lambda *a, **k: compiled.append(1))
    before = {p.relative_to(workdir): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    for arg, message in (
            (f"--config.data.val_gt_depth={base / 'gt_test.npz'}",
             r"config\.data\.val_gt_depth: .*gt_test\.npz: depth map 0 is for "
             r"'.*drive_0003_sync 0 l' but val split example 0 is '.*drive_0003_sync 1 l'"),
            (f"--config.data.val_gt_depth={base / 'missing.npz'}",
             r"config\.data\.val_gt_depth: .*not found: .*missing\.npz"),
            ("--config.data.val_split=nosuch",  # a split never prepared
             r"config\.data\.dataset_dir / config\.data\.val_split: no prepared split 'nosuch' under "
             r".*; run `xdistill prepare` first")):
        status = cli.main(["train", "--workdir", str(workdir), arg, f"--config.optim.num_steps={2 * LEARN_STEPS}"])
        err = capsys.readouterr().err
        assert status == 2, err[-2000:]
        assert re.search(message, err), err[-2000:]
        assert "Traceback" not in err
    assert not compiled
    after = {p.relative_to(workdir): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert after == before


def test_cli_rerun_of_a_finished_run_says_so(world_run, caplog):
    """`xdistill train` on a finished workdir trains nothing and says so in its log. Importing
    orbax had made absl configure logging before the command did, so none of its INFO lines
    (this one, the compile times, the loader) were printed until 2026-12-07. Nothing else is
    made louder: the root logger stays at WARNING (orbax logs INFO lines through absl)."""
    import logging

    from xdistill_jax import cli, log_setup

    _, workdir, _ = world_run
    before = {p.relative_to(workdir): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    levels = {name: logging.getLogger(name).level for name in log_setup.PROJECT_LOGGERS}
    try:
        status = cli.main(["train", "--workdir", str(workdir)])
        # fewer steps asked for: the message names the checkpoint's step, not the number asked
        # for ("complete at step 2" of a run at step LEARN_STEPS, until 2026-12-07)
        fewer = cli.main(["train", "--workdir", str(workdir), "--config.optim.num_steps=2"])
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    assert status == fewer == 0
    ckpt = workdir / "checkpoints" / str(LEARN_STEPS)
    for asked in (LEARN_STEPS, 2):
        assert (f"{workdir} is complete: its checkpoint {ckpt} is at or past the {asked} steps asked for; "
                "nothing to train") in caplog.messages
    assert logging.getLogger().level == logging.WARNING
    assert not [r for r in caplog.records if r.levelno < logging.WARNING and not r.name.startswith(
        log_setup.PROJECT_LOGGERS)], "another library's INFO lines were let through"
    after = {p.relative_to(workdir): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert after == before  # no empty TensorBoard event file either (one per rerun until 2026-12-07)


def test_cli_without_a_prepared_train_split_exits_2_naming_it(tmp_path, capsys):
    """`xdistill train` on a dataset_dir where nothing was prepared: status 2, the keys, the
    path it looked for and what to run named, no traceback, no workdir made."""
    from eval_workdir import REPO
    from xdistill_jax import cli

    status = cli.main(["train", "--config", f"{REPO / 'configs' / 'synthetic_demo.py'}:smoke", "--workdir", str(tmp_path / "w"),
                       f"--config.data.dataset_dir={tmp_path / 'nothing'}"])
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    assert re.search(r"config\.data\.dataset_dir / config\.data\.train_split: no prepared split 'train' under "
                     r".*nothing \(expected .*kitti_triplets/train/.*\); run `xdistill prepare` first", err), err
    assert "Traceback" not in err
    assert not (tmp_path / "w").exists()


def _world_overrides(base, **more):
    from eval_workdir import TRAIN_OVERRIDES

    return dict(TRAIN_OVERRIDES, **{"data.dataset_dir": base / "tfds"}, **more)


def _world_config(base, **more):
    from eval_workdir import REPO

    config = config_utils.load_config_file(str(REPO / "configs" / "synthetic_demo.py") + ":smoke")
    return config_utils.apply_overrides(config, [f"--config.{k}={v}" for k, v in _world_overrides(base, **more).items()])


def test_a_split_prepared_at_another_size_is_named_before_the_workdir_is_made(world_run, tmp_path):
    """The batches come at the split's stored size and the step compiles for them: a config of
    another size would train at the split's size while config.json (hence eval) said its own."""
    base, _, _ = world_run
    config = _world_config(base, **{"data.height": 2 * H, "data.width": 2 * W})
    with pytest.raises(config_utils.ConfigError,
                       match=rf"config\.data\.height/width: {2 * H}x{2 * W}, but split 'train' in "
                             rf".* was prepared at {H}x{W}; set --config\.data\.height={H} "
                             rf"--config\.data\.width={W}"):
        training_loop.train_and_evaluate(config, tmp_path / "workdir")
    assert not (tmp_path / "workdir").exists()
    # the val split is checked too (the train split at the config's size)
    config = _world_config(base, **{"data.val_split": "val"})
    assert training_loop.tfds_training_data(config).num_examples > 0


def test_a_teacher_store_of_another_grouping_is_named(world_run, tmp_path):
    """geometric and cityscapes_categories both have 7 groups: the shapes agree, so only the
    store's recorded grouping can tell that the run would distill the other one."""
    from data_pipelines.kitti.tfds_builder import open_split
    from data_pipelines.teacher import store
    from xdistill_jax import semantics

    base, _, _ = world_run
    n = len(open_split(base / "tfds", "train"))
    other = semantics.get_grouping("cityscapes_categories")
    path = store.write_store(tmp_path / "teacher", n, lambda idx: ([str(i) for i in idx],
                             np.zeros((len(idx), H // 4, W // 4, other.num_groups), np.float32)),
                             grouping=other.name, group_names=other.group_names,
                             height=H // 4, width=W // 4, progress=False)
    config = _world_config(base, **{"distill.weight": 0.1, "data.teacher_dir": path})
    assert config.distill.grouping == "geometric"
    with pytest.raises(config_utils.ConfigError,
                       match=r"config\.distill\.grouping: 'geometric', but the teacher store .*teacher "
                             r"\(config\.data\.teacher_dir\) holds 'cityscapes_categories' groups"):
        training_loop.tfds_training_data(config)
    config = _world_config(base, **{"distill.weight": 0.1, "data.teacher_dir": path,
                                    "distill.grouping": "cityscapes_categories"})
    assert training_loop.tfds_training_data(config).num_examples == n


def test_a_missing_or_incomplete_teacher_store_names_the_key(world_run, tmp_path):
    """Until 2026-12-06 a ValueError traceback (exit 1) from the store's reader."""
    base, _, _ = world_run
    config = _world_config(base, **{"distill.weight": 0.1, "data.teacher_dir": tmp_path / "nowhere"})
    with pytest.raises(config_utils.ConfigError, match=r"config\.data\.teacher_dir: .*nowhere/teacher\.json: "
                                                      r"no teacher logits store here"):
        training_loop.tfds_training_data(config)


def _final_state(workdir, step):
    from xdistill_jax.checkpoints import Checkpointer

    state, _, got = Checkpointer(workdir / "checkpoints").restore(abstract_state_of(workdir), step=step)
    assert got == step
    return {k: np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def test_state_layout_auto_trains_checkpoints_and_resumes_like_the_default(resumed_run, tmp_path,
                                                                          monkeypatch):
    """run.state_layout="auto": the loop compiles the step ahead (`AheadStep` with relayout), puts the
    fresh, then the restored, state into the formats XLA chose, trains, writes checkpoints
    (async), validates and resumes, and ends bitwise where `resumed_run` (same config and data,
    default layouts) does. This CPU's XLA resolves Layout.AUTO to row-major; moving a state into
    other layouts and back through a step is `test_background_compile.py::test_relayout_*`'s."""
    from xdistill_jax.background_compile import AheadStep

    steps = []
    call = AheadStep.__call__

    def spy(self, state, batch, rng):
        out = call(self, state, batch, rng)
        steps.append(self.state_formats is not None and
                     jax.tree.leaves(self.state_formats) == [x.format for x in jax.tree.leaves(out[0])])
        return out

    monkeypatch.setattr(AheadStep, "__call__", spy)
    workdir = tmp_path / "run"
    config = tiny_config(distill_weight=0.1, **{"run.state_layout": "auto", "run.async_checkpoints": True})
    assert training_loop.train_and_evaluate(config, workdir, data=make_data()) == training_loop.EXIT_OK
    config.optim.num_steps = 4
    assert training_loop.train_and_evaluate(config, workdir, data=make_data()) == training_loop.EXIT_OK

    assert steps == [True] * 4  # 2 steps, then 2 more after the resume, all through AheadStep
    assert ckpt_steps(workdir) == ckpt_steps(resumed_run[0]) == [2, 3, 4]
    ref, got = _final_state(resumed_run[0], 4), _final_state(workdir, 4)
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=jax.tree_util.keystr(k))
    for split in ("train", "val"):
        assert [m["loss"] for m in read_metrics(workdir, split)] == [m["loss"] for m in read_metrics(resumed_run[0], split)]


def test_a_damaged_shard_mid_run_exits_2_naming_it_and_resumes_once_repaired(world_run, tmp_path, capsys):
    """A record of the prepared split that cannot be read in the middle of a run (bytes of its
    shard overwritten, as a partial copy or a bad disk leaves them) ended `xdistill train` with
    array_record's traceback, naming neither the file nor the example. Now: status 2, the shard
    file, record and example named with the step it stopped after and the checkpoint to resume
    from, no traceback; with the shard repaired the same command resumes and finishes."""
    import shutil

    from eval_workdir import REPO
    from xdistill_jax import cli

    base, _, _ = world_run
    shutil.copytree(base / "tfds" / "kitti_triplets" / "train", tmp_path / "tfds" / "kitti_triplets" / "train")
    (shard,) = (tmp_path / "tfds").rglob("*.array_record-00000-of-00001")
    original = shard.read_bytes()
    steps = 4
    args = ["train", "--config", f"{REPO / 'configs' / 'synthetic_demo.py'}:smoke", "--workdir",
            str(tmp_path / "w")] + [f"--config.{k}={v}" for k, v in {
                **_world_overrides(tmp_path), "optim.num_steps": steps, "run.log_every": 1,
                "data.val_split": ""}.items()]
    config = _world_config(tmp_path, **{"optim.num_steps": steps, "data.val_split": ""})
    it = training_loop.tfds_training_data(config).make_train_iterator()
    order = [[int(i) for i in next(it)["index"]] for _ in range(steps)]
    it.close()
    first = {i for b in order[:3] for i in b}  # read before the first steps run (peek, prefetch)
    damaged = kitti_tiny.damage_shard(tmp_path / "tfds", lambda d, n: not d & first and len(d) < n - len(first))
    assert damaged & {i for b in order[3:] for i in b}, (damaged, order)

    status = cli.main(args)
    err = capsys.readouterr().err
    assert status == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    m = re.search(rf"xdistill train: prepared split 'train': .*{re.escape(shard.name)}, record (\d+) \(example "
                  r"(\d+), the split file's entry \d+\) cannot be read \(RuntimeError: Corrupted Riegeli.*\)\. The "
                  r"store is damaged .*\. Stopped after step (\d+); the last checkpoint is step (\d+): rerun the "
                  r"same command once the store is repaired to resume from it", err)
    assert m, err[-3000:]
    assert int(m.group(2)) in damaged and int(m.group(1)) == int(m.group(2))
    stopped = int(m.group(3))
    assert 1 <= stopped < steps and int(m.group(4)) == stopped and ckpt_steps(tmp_path / "w")[-1] == stopped

    shard.write_bytes(original)  # repaired
    assert cli.main(args) == 0, capsys.readouterr().err[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path / "w")] == list(range(1, steps + 1))
    assert ckpt_steps(tmp_path / "w")[-1] == steps


def test_a_workdir_in_use_by_another_run_is_refused_and_left_alone(tmp_path):
    """Two runs in one workdir (a requeued job started while the old one still runs) both trained:
    duplicated metrics lines, overlapping event files, orbax tracebacks. Now the second one stops
    with a ConfigError (exit 2 from the CLI) naming the workdir and the run that holds it."""
    import fcntl

    workdir = tmp_path / "run"
    workdir.mkdir()
    with open(workdir / training_loop.WORKDIR_LOCK, "a+") as held:  # another run, as lock_workdir holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242 otherhost\n")
        held.flush()
        with pytest.raises(config_utils.ConfigError, match=re.escape(
                f"workdir {workdir} is in use by another `xdistill train` (pid 4242 on otherhost, per "
                f"{workdir / training_loop.WORKDIR_LOCK})")):
            training_loop.train_and_evaluate(tiny_config(distill_weight=0.0), workdir, data=make_data())
        assert os.listdir(workdir) == [training_loop.WORKDIR_LOCK]  # nothing written
        assert (workdir / training_loop.WORKDIR_LOCK).read_text() == "4242 otherhost\n"
    lock = training_loop.lock_workdir(workdir)  # released with its file: the next run takes it
    assert (workdir / training_loop.WORKDIR_LOCK).read_text() == f"{os.getpid()} {__import__('socket').gethostname()}\n"
    lock.close()



def test_a_workdir_that_cannot_be_locked_trains_on_with_a_warning(tmp_path, monkeypatch, caplog):
    """A file system without flock (NFS without lockd: ENOLCK) was refused as "in use by another
    run (pid unknown)"; a read-only workdir (a finished run's rerun) a traceback making .lock."""
    import errno
    import fcntl

    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    with monkeypatch.context() as m:
        m.setattr(fcntl, "flock", no_flock)
        with caplog.at_level(logging.WARNING, logger="xdistill_jax.training_loop"):
            assert training_loop.lock_workdir(tmp_path / "nfs") is None
    assert "its file system does not lock (No locks available); going on without the lock" in caplog.text
    import shutil
    import tempfile

    base = pathlib.Path(tempfile.mkdtemp(prefix="xdistill_test_"))  # under /tmp: any user reaches it
    readonly = base / "ro"
    try:
        base.chmod(0o755)
        readonly.mkdir(mode=0o555)
        readonly.chmod(0o555)
        as_nobody = os.geteuid() == 0  # root writes anywhere: the user 'nobody' may not write here
        if as_nobody:
            os.seteuid(65534)
        try:
            with caplog.at_level(logging.WARNING, logger="xdistill_jax.training_loop"):
                assert training_loop.lock_workdir(readonly) is None
        finally:
            if as_nobody:
                os.seteuid(0)
        assert f"workdir {readonly}: cannot make .lock (Permission denied); going on without the lock" in caplog.text
        assert not any(readonly.iterdir())
    finally:
        readonly.chmod(0o755)
        shutil.rmtree(base)


def test_a_stop_signal_while_the_first_step_compiles_returns_75_with_no_checkpoint(tmp_path, monkeypatch,
                                                                                 capsys):
    """SIGTERM while the loop waited for the step's compile (on its background thread): the loop's
    handler only noted it, so the run waited out the compile (~90 s cold on a GPU, past a
    preemption's grace), trained a step and saved a checkpoint, where the docs promise "stopped
    while starting ... the checkpoints are as they were". Now the wait is before the loop."""
    import time

    from xdistill_jax import background_compile

    compile_step = background_compile.AheadStep._compile

    def compile_then_stop(self):
        compile_step(self)
        time.sleep(1.5)  # the main thread is waiting for this thread by now
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.0)

    monkeypatch.setattr(background_compile.AheadStep, "_compile", compile_then_stop)
    assert training_loop.train_and_evaluate(tiny_config(distill_weight=0.0), tmp_path / "run", data=make_data()) == 75
    assert "SIGTERM: stopped while starting, before any step was trained" in capsys.readouterr().out
    ckpts = tmp_path / "run" / "checkpoints"
    assert not ckpts.exists() or not [p for p in ckpts.iterdir() if p.name.isdigit()]


def test_a_stop_signal_during_the_setup_checks_returns_75(tmp_path, monkeypatch, capsys):
    """SIGTERM while the splits and stores were checked (before the run's own handlers): the
    process died of it (-15), SIGINT a KeyboardInterrupt traceback. Now 75, nothing written."""
    import time

    def stopped_while_checking(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        raise AssertionError("the signal did not stop the run")

    monkeypatch.setattr(training_loop, "open_val_ground_truth", stopped_while_checking)
    before = signal.getsignal(signal.SIGTERM)
    assert training_loop.train_and_evaluate(tiny_config(distill_weight=0.0), tmp_path / "run", data=make_data()) == 75
    assert "SIGTERM: stopped while starting, before any step was trained" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is before and not (tmp_path / "run").exists()
