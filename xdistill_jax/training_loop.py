"""`train_and_evaluate(config, workdir)`: the training loop around the jitted step.

Init order: the workdir's latest checkpoint > `config.model.init` (ImageNet encoder msgpack)
> scratch. Per step: next host-local batch -> global sharded arrays -> step. Device values are
fetched only on log, checkpoint and validation steps. Process 0 alone writes metrics, images
and config.json; every process takes part in checkpoint saves (orbax coordinates them).

Exit statuses (returned, and used by `xdistill train`):
  EXIT_OK (0)         finished: final checkpoint at the last step.
  EXIT_NONFINITE (3)  a non-finite loss: stopped naming the step range; no checkpoint written
                      after the last finite check, so the last good checkpoint stays the latest.
  EXIT_PREEMPTED (75) SIGTERM (or SIGINT) received: a checkpoint at the current step was saved;
                      rerun the same command to continue (75 = EX_TEMPFAIL, "try again").

Workdir: config.json, checkpoints/<step>/, metrics.jsonl, tensorboard/, images/*.png.

Start: the step compiles on a background thread from the state's abstract tree and the first
batch's shapes while the state is initialised or restored (`background_compile`); the first
step waits for it, and the log says how long each part took.

Python's garbage collector: after the first step (the step has been traced and compiled) the
heap is frozen for the rest of the loop (`gc_pauses.frozen_heap`), so that a full collection
does not walk the hundreds of thousands of objects tracing left behind (92-333 ms each on this
project's CPU VM with a compiled step in memory: many steps of a GPU).

Validation: every run.val_every steps, at the last step, and with run.val_at_start also at
step 0 (the untrained model, the baseline of the val curve). The data splits and the val GT
(config.data.val_gt_depth, checked against the val split's lines) are opened before the workdir
is written or anything compiles, so a wrong path or a GT of another split fails at once.

Resume is exact: the state, the loader position and the per-step keys come from the checkpoint,
metrics.jsonl loses the lines past the restored step (they are redone), and a validation due at
the restored step whose line is missing (killed during validation) is run again first.

Test-only fault hooks (tests/test_reliability.py; unset in normal use, no effect then):
  XDISTILL_TEST_FAULT="ACTION@POINT:STEP" with ACTION kill (SIGKILL) | term (SIGTERM) and POINT
    step (just after step STEP is dispatched, i.e. while it computes), ckpt (just after the save
    at STEP has started: with async checkpoints, mid-write) or val (after the first batch of the
    validation at STEP, once pending checkpoint saves are on disk) or start (once the checkpoint of
    STEP, 0 for none, is restored: the run is starting).
  XDISTILL_TEST_BATCH_LOG=PATH appends "STEP i,j,..." (the batch's split indices) per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import re
import signal
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines.damaged_store import DamagedStoreError
from xdistill_jax import config_utils, gc_pauses, hosts, local_paths, stop_signals, train
from xdistill_jax.checkpoints import Checkpointer, CheckpointError
from xdistill_jax.metric_writer import MetricWriter, colormap, label_image
from xdistill_jax.objective import Networks
from xdistill_jax.val_ground_truth import ValGroundTruth, open_val_ground_truth  # noqa: F401

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_NONFINITE = 3
EXIT_PREEMPTED = hosts.EXIT_STOPPED  # 75


class NonFiniteLossError(FloatingPointError):
    pass


@dataclasses.dataclass
class TrainingData:
    """Where batches come from. Iterators yield host-local numpy batches (contracts.md).

    make_train_iterator(): a fresh, infinite, checkpointable iterator (`get_state()` a JSON-able
      dict, `set_state(state)`).
    make_val_iterator(): one pass over the validation split with a `mask` entry (padding), or None.
    num_examples: training examples in the split (for steps per epoch).
    val_id: optional, the split line (`id`) of val example i, to check config.data.val_gt_depth.
    num_val_examples: optional, examples in the validation split (None: unknown, then the GT
      check covers the maps in the GT file).
    fingerprint: optional, a hash of the splits' and teacher stores' identity
      (`tfds_builder.split_fingerprint`, `TeacherLogitsSource.identity`): every process of a
      multi-host run must read the same data.
    """

    make_train_iterator: Callable[[], Any]
    make_val_iterator: Callable[[], Iterator[dict]] | None
    num_examples: int
    val_id: Callable[[int], str] | None = None  # split line of val example i (GT id check)
    num_val_examples: int | None = None
    fingerprint: str = ""  # what identifies the data's content (compared across hosts); "" unknown


def tfds_training_data(config: ml_collections.ConfigDict) -> TrainingData:
    """TrainingData over the TFDS splits in `config.data.dataset_dir` (+ teacher stores).

    Opens and checks everything it can without compiling (a ConfigError naming the config key):
    the splits (present, at the config's size) and the teacher stores (present, complete, of
    `distill.grouping`, and of their split: the record count, and the split file's hash where the
    store recorded one).
    """
    from data_pipelines.kitti.tfds_builder import open_split
    from xdistill_jax import input_pipeline

    d = config.data
    if not d.dataset_dir:
        raise config_utils.ConfigError("config.data.dataset_dir: not set (a directory written by "
                                       "`xdistill prepare`)")
    use_teacher = config.distill.weight > 0
    # scales 1..3 of the source frames are read only by loss.v1_multiscale: otherwise the loader
    # makes them for the target frame alone (same loss, less loader work; objective.loss_fn)
    source_scales = bool(config.loss.v1_multiscale)

    def teacher(path, key):
        if not use_teacher:
            return None
        if not path:
            raise config_utils.ConfigError(f"config.{key}: distill.weight > 0 needs a teacher store "
                                           "(or set --config.distill.weight=0)")
        from data_pipelines.teacher.store import TeacherLogitsSource
        from xdistill_jax import semantics

        try:
            source = TeacherLogitsSource(path)
        except ValueError as e:  # no store, another format, an interrupted precompute
            raise config_utils.ConfigError(f"config.{key}: {e}") from e
        # two groupings can have the same number of groups (geometric and cityscapes_categories
        # both 7): the shapes would agree and the run would distill the other grouping
        wanted = semantics.get_grouping(config.distill.grouping).name
        if source.grouping != wanted:
            raise config_utils.ConfigError(
                f"config.distill.grouping: {config.distill.grouping!r}, but the teacher store "
                f"{path} (config.{key}) holds {source.grouping!r} groups (its teacher.json); "
                f"set --config.distill.grouping={source.grouping} or precompute the store again "
                f"with --grouping {wanted}")
        return source

    def check_store_split(store, key, source, name):
        # A store of another split fails here, before anything compiles, naming the store and
        # the key: the loader's own checks (count, then each record's id) would fire only when
        # its iterator is first built, for the val store at the first validation
        # (run.val_every steps in), with neither named.
        if store is None:
            return
        where = f"config.{key}: the teacher store {store.path}"
        if len(store) != len(source):
            made_for = store.metadata.get("split")
            raise config_utils.ConfigError(
                f"{where} has {len(store)} records but split {name!r} in {d.dataset_dir} has "
                f"{len(source)} examples: it was computed for another split"
                + (f" ({made_for!r}, its teacher.json says)" if made_for else "")
                + f"; precompute it for this one (xdistill teacher precompute --split {name})")
        # the ids without reading a record: the store keeps the split file's hash it was made
        # from (`precompute_split`); a store written without one is checked id by id when read
        from data_pipelines.kitti.tfds_builder import read_metadata

        theirs = store.metadata.get("fingerprint") or ""
        try:
            ours = read_metadata(d.dataset_dir, name).get("split_sha256") or ""
        except (OSError, ValueError):  # an unreadable metadata.json is named by split_fingerprint below
            ours = ""
        if theirs and ours and theirs != ours:
            raise config_utils.ConfigError(
                f"{where} was computed from another split file than split {name!r} in "
                f"{d.dataset_dir} (split_sha256 {theirs[:12]}... in its teacher.json, "
                f"{ours[:12]}... in the split's metadata.json), though both have {len(source)} "
                f"examples; precompute it for this split (xdistill teacher precompute --split {name})")

    def split(name, key):
        try:
            source = open_split(d.dataset_dir, name)
        except ValueError as e:  # no prepared split of that name, or another format version
            raise config_utils.ConfigError(f"config.data.dataset_dir / config.data.{key}: {e}") from e
        # the batches come at the size the split was prepared at, and the step compiles for the
        # first batch's shapes: without this check a mismatch would train at the split's size
        # while config.json (hence eval and predict) says the config's
        if len(source):
            h, w = np.shape(source[0]["image_0"])[:2]
            if (h, w) != (d.height, d.width):
                raise config_utils.ConfigError(
                    f"config.data.height/width: {d.height}x{d.width}, but split {name!r} in "
                    f"{d.dataset_dir} was prepared at {h}x{w}; set --config.data.height={h} "
                    f"--config.data.width={w} or prepare the split again at the config's size "
                    "(xdistill prepare --height --width)")
        return source

    train_source = split(d.train_split, "train_split")
    train_teacher = teacher(d.teacher_dir, "data.teacher_dir")
    check_store_split(train_teacher, "data.teacher_dir", train_source, d.train_split)

    num_workers = input_pipeline.resolve_num_workers(d.num_workers)
    log.info("loader: %s", f"{num_workers} grain worker processes" if num_workers else "this process's threads")

    def make_train_iterator():
        return input_pipeline.make_train_iterator(
            train_source, global_batch_size=config.optim.batch_size, seed=config.run.seed,
            teacher=train_teacher, augment=d.augment, num_workers=num_workers,
            source_scales=source_scales)

    make_val = val_id = num_val = val_teacher = None
    if d.val_split:
        val_source = split(d.val_split, "val_split")
        val_teacher = teacher(d.val_teacher_dir, "data.val_teacher_dir") if d.val_teacher_dir else None
        check_store_split(val_teacher, "data.val_teacher_dir", val_source, d.val_split)

        def make_val():
            return input_pipeline.make_eval_iterator(
                val_source, global_batch_size=config.optim.batch_size, teacher=val_teacher,
                source_scales=source_scales)

        def val_id(i):
            return val_source[i]["id"].decode()

        num_val = len(val_source)

    from data_pipelines.kitti.tfds_builder import split_fingerprint

    try:
        splits = [split_fingerprint(d.dataset_dir, name) for name in (d.train_split, d.val_split) if name]
    except (OSError, ValueError) as e:  # a prepared split without a readable metadata.json
        raise config_utils.ConfigError(f"config.data.dataset_dir: {d.dataset_dir}: {e}") from e
    fingerprint = "/".join(splits + [t.identity for t in (train_teacher, val_teacher) if t is not None])
    return TrainingData(make_train_iterator, make_val, len(train_source), val_id, num_val, fingerprint)


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """jax.distributed.initialize from config.distributed (before any device is touched)."""
    d = config.distributed
    if not d.enabled:
        return
    kwargs = {}
    if d.coordinator_address:
        match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d{1,5})", d.coordinator_address)
        if match is None or not 0 < int(match.group(2)) < 65536:
            raise config_utils.ConfigError(
                f"config.distributed.coordinator_address={d.coordinator_address!r}: expected HOST:PORT "
                "(process 0's host name or address and a free port, e.g. 10.0.0.2:1234 or [::1]:1234)")
        kwargs["coordinator_address"] = d.coordinator_address
    if d.num_processes > 0:
        kwargs["num_processes"] = d.num_processes
    if d.process_id >= 0:
        kwargs["process_id"] = d.process_id
    if not jax.distributed.is_initialized():
        if d.coordinator_address and d.process_id == 0:  # this process starts the service
            taken = hosts.coordinator_port_in_use(d.coordinator_address)
            if taken:
                raise config_utils.ConfigError(
                    f"config.distributed.coordinator_address={d.coordinator_address}: process 0 starts the "
                    f"coordination service there, and {taken}: give a free port")
        try:
            jax.distributed.initialize(**kwargs)
        except ValueError as e:  # e.g. no process id given nor detected (a resume from config.json)
            raise config_utils.ConfigError(
                f"config.distributed: {e} (give --config.distributed.coordinator_address, "
                "--config.distributed.num_processes and this host's --config.distributed.process_id "
                "where JAX cannot detect them)") from e
        except RuntimeError as e:  # JaxRuntimeError: e.g. the coordinator not reached
            where = d.coordinator_address or "the detected coordinator"
            raise config_utils.ConfigError(
                f"config.distributed.coordinator_address={where}: the coordination service could not be "
                f"started or reached ({str(e).splitlines()[0][:300]}): is its port free on process 0's host, "
                "and that host reachable from this one?") from e


def check_workdir_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """A workdir's saved config.json must describe the same networks as `config`."""
    if not (workdir / config_utils.CONFIG_JSON).is_file():
        return
    saved = config_utils.load_config(workdir)
    diffs = config_utils.structural_differences(saved, config)
    if diffs:
        raise CheckpointError(
            f"workdir {workdir} holds a run of an incompatible config ({'; '.join(diffs)}); "
            "use a new --workdir, or the same model settings to resume")
    other = list(config_utils.differences(saved, config))
    if other:
        log.warning("resuming %s with changed settings: %s", workdir, "; ".join(other))


class _FaultHook:
    """The XDISTILL_TEST_FAULT hook (module docstring); `at(point, step)` fires it once."""

    def __init__(self, spec: str | None):
        self.action = self.point = self.step = None
        self.settle = None  # called before firing at "val": pending checkpoint saves land first
        if spec:
            try:
                self.action, rest = spec.split("@")
                self.point, step = rest.split(":")
                self.step = int(step)
            except ValueError:
                raise ValueError(f"XDISTILL_TEST_FAULT={spec!r}: expected ACTION@POINT:STEP") from None
            if self.action not in ("kill", "term") or self.point not in ("step", "ckpt", "val", "start"):
                raise ValueError(f"XDISTILL_TEST_FAULT={spec!r}: ACTION kill|term, POINT step|ckpt|val|start")

    def at(self, point: str, step: int) -> None:
        if (point, step) == (self.point, self.step):
            self.point = None  # once
            if point == "val" and self.settle is not None:
                self.settle()
            print(f"test fault: {self.action} at {point} {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL if self.action == "kill" else signal.SIGTERM)


_fault = _FaultHook(None)


class _BatchLog:
    """XDISTILL_TEST_BATCH_LOG: the host iterator, logging each batch's indices under its step."""

    def __init__(self, it, path: str, first_step: int):
        self.it, self.path, self.step = it, path, first_step

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.step += 1
        with open(self.path, "a") as f:
            f.write(f"{self.step} {','.join(str(int(i)) for i in batch['index'])}\n")
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)

    def close(self):
        self.it.close()


class _StoppedWhileStarting(BaseException):
    """SIGTERM/SIGINT before the step loop (restoring, compiling, the redone validation)."""


class _StopSignal:
    """Records SIGTERM/SIGINT; the loop checks it between steps."""

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under some test runners)
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _progress_line(step, total, t_start, step_start, batch_size, scalars):
    elapsed = time.time() - t_start
    done = step - step_start
    ips = done * batch_size / max(elapsed, 1e-9)
    eta = (total - step) * elapsed / max(done, 1)
    keys = [k for k in ("loss", "photometric_loss", "distill_loss") if k in scalars]
    vals = " ".join(f"{k}={scalars[k]:.4f}" for k in keys)
    wait = f" (waiting for data {100.0 * scalars['input_wait_frac']:.0f}%)" if "input_wait_frac" in scalars else ""
    return (f"step {step}/{total} ({100.0 * step / total:.1f}%) {vals} | {ips:.1f} images/s{wait} "
            f"| ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")


def _to_host(x) -> np.ndarray:
    """A (possibly multi-host) global array, or a host-local numpy slice, as the full numpy array."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    if isinstance(x, jax.Array) and x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def validate(config, eval_step, mesh, state, make_val_iterator, writer, step, rng, gt=None) -> dict:
    """Eval-mode losses and sample images over `config.data.val_batches` batches; depth metrics
    where `gt` (per-example depth maps, by split index) is given. `eval_step`: the run's
    `train.make_eval_step` (built once per run: one trace for all its validations).

    Loss means are over full batches only (a padded last batch would count its zero padding);
    depth metrics use every real example (`mask`) of the batches seen. Without a teacher store
    for the val split, the val loss is the photometric loss.
    """
    from xdistill_jax import evaluation, geometry

    sums, count, per_image, first = {}, 0, [], None
    for i, batch in enumerate(make_val_iterator()):
        if config.data.val_batches > 0 and i >= config.data.val_batches:
            break
        mask = np.asarray(batch.pop("mask", np.ones(len(batch["index"]), bool)))
        metrics = eval_step(state.params, state.batch_stats, train.global_batch(batch, mesh), rng)
        if i == 0:
            _fault.at("val", step)
        if not hosts.any_process(not mask.all()):  # a full batch on every host
            for k, v in metrics.items():
                if jnp.ndim(v) == 0:
                    sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
        if gt is not None or first is None:  # every process joins the gathers
            disp = _to_host(metrics["disp"])[..., 0]
            if first is None:
                logits = metrics.get("translator_logits")
                first = (disp[0], None if logits is None else np.argmax(_to_host(logits)[0], -1))
            if gt is not None:
                scaled, _ = geometry.disp_to_depth(disp, config.loss.min_depth, config.loss.max_depth)
                scaled = np.asarray(scaled)
                mask, index = _to_host(mask), _to_host(np.asarray(batch["index"]))
                for j, idx in enumerate(index):
                    if not mask[j]:
                        continue
                    per_image.append(evaluation.eval_eigen_image(gt[int(idx)], scaled[j],
                                                                 crop=config.data.val_gt_crop or None))
    out = {k: v / max(count, 1) for k, v in sums.items()}
    if per_image:
        out.update({k: v for k, v in evaluation.aggregate(per_image).items() if k != "num_images"})
        out["num_images"] = len(per_image)
    writer.write_scalars(step, out, split="val")
    if first is not None and config.run.image_every > 0 and step % config.run.image_every == 0:
        writer.write_image(step, "val_disp", colormap(first[0]))
        if first[1] is not None:
            from xdistill_jax import semantics
            g = semantics.get_grouping(config.distill.grouping).num_groups
            writer.write_image(step, "val_translator", label_image(first[1], g))
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *, data=None) -> int:
    """Train `config` in `workdir` (resuming from its checkpoint); returns an EXIT_* status.

    data: optional `TrainingData` replacing the TFDS splits named by config.data (tests,
    benchmarks); by default `tfds_training_data(config)`.

    SIGTERM/SIGINT before the first step (setup checks, restore, compile, a redone validation)
    return EXIT_PREEMPTED at once, nothing saved (the checkpoints are the state); in the loop
    they save a checkpoint first.
    """
    try:
        # until the loop's `_StopSignal` takes over (and after it) a stop ends the run at once:
        # the checkpoint on disk is the state, nothing to save
        with stop_signals.raise_on_stop(_StoppedWhileStarting):
            return _train_and_evaluate(config, workdir, data=data)
    except _StoppedWhileStarting as e:  # exit 75 as a stop in the loop (was -15, or a KeyboardInterrupt traceback)
        print(f"{e}: stopped while starting, before any step was trained; the checkpoints are as they were: "
              "rerun the same command to continue", flush=True)
        # several processes: the others were told (hosts.StopTogether) and end with 75 too; this one
        # ends now, not in JAX's shutdown barrier (which aborts it once the others are gone)
        hosts.end_if_reported(e, EXIT_PREEMPTED)
        return EXIT_PREEMPTED


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir, *, data=None) -> int:
    global _fault
    t_call = time.time()
    _fault = _FaultHook(os.environ.get("XDISTILL_TEST_FAULT"))
    if isinstance(workdir, str):
        local_paths.require_local(workdir, "workdir", config_utils.ConfigError)
    maybe_initialize_distributed(config)
    workdir = pathlib.Path(workdir)
    mesh = train.make_mesh(config)
    # Bad settings, data or ground truth fail here, on every process together (one that failed
    # alone would leave the others waiting at a collective), before the workdir is touched and
    # before any compilation.
    with hosts.agree("its setup checks"):
        if workdir.exists() and not workdir.is_dir():
            raise config_utils.ConfigError(f"workdir {workdir}: exists and is not a directory")
        config_utils.validate(config, num_devices=mesh.size)
        # "auto" kernel layout: the run's own if it resumes, else the platform's; saved resolved
        config = config_utils.resolve_kernel_layout(config, train.mesh_platform(mesh), workdir)
        config = config_utils.keep_run_init(config, workdir)  # a resume keeps how its run started
        check_workdir_config(config, workdir)
        if data is None:
            data = tfds_training_data(config)
        gt = open_val_ground_truth(config, data)
        num_examples = data.num_examples
        steps_per_epoch = train.epoch_steps(config, num_examples)
        if num_examples // config.optim.batch_size <= 0:  # whatever optim.steps_per_epoch says
            raise config_utils.ConfigError(
                f"config.optim.batch_size={config.optim.batch_size} exceeds the {num_examples} training examples")
        if data.num_val_examples is not None and data.num_val_examples < config.optim.batch_size:
            # `validate` takes its loss means over full batches: there is none (said here, once;
            # each val line held the step alone, without a word, until 2026-12-07)
            log.warning("the val split %r has %d examples, fewer than a batch (optim.batch_size=%d): "
                        "validation logs no loss, only %s", config.data.val_split, data.num_val_examples,
                        config.optim.batch_size,
                        "the depth metrics (data.val_gt_depth)" if gt is not None else
                        "its images (give data.val_gt_depth for depth metrics over every example)")
        from xdistill_jax.inference import checkpoint_steps

        # the encoder file of a run that starts (a missing or unreadable one fails here, on every
        # process together); a resumed run does not read it
        try:
            encoder_init = None if checkpoint_steps(workdir) else train.load_pretrained_encoders(config)
        except ValueError as e:  # no such file, not a msgpack of variables
            raise config_utils.ConfigError(f"config.model.init: {e}") from e
    hosts.check_same({"training examples": num_examples, "validation examples": data.num_val_examples or 0,
                      "data fingerprint": hosts.fingerprint_int(data.fingerprint)},
                     "the data must be the same on every host (the same prepared splits at config.data.dataset_dir "
                     "and teacher stores)")
    hosts.check_shared_directory(workdir)
    # From here on a failure is this process's own (a record of its copy of the data that cannot
    # be read, a disk error), where the others would wait in the step's collectives: with
    # several processes every one ends when one fails (hosts.StopTogether).
    with hosts.StopTogether():
        return _train(config, workdir, data, mesh, gt, steps_per_epoch, encoder_init, t_call)


WORKDIR_LOCK = ".lock"


def lock_workdir(workdir: pathlib.Path):
    """Hold an exclusive lock on `workdir/.lock` (made with the workdir) for as long as the returned
    file stays open, holding this process's pid and host; the kernel drops it when the process
    ends, however it ends. Another run holding it: ConfigError naming the workdir and that run.
    None, with a warning, where the lock cannot be had: a read-only workdir, a file system
    without flock."""
    import errno
    import fcntl
    import socket

    try:
        workdir.mkdir(parents=True, exist_ok=True)
        f = open(workdir / WORKDIR_LOCK, "a+")
    except OSError as e:  # a read-only workdir: a finished run's rerun writes nothing, anything else fails later
        log.warning("workdir %s: cannot make %s (%s); going on without the lock", workdir, WORKDIR_LOCK,
                    e.strerror or e)
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no flock here (NFS without
            log.warning("workdir %s: its file system does not lock (%s); going on without the lock "  # lockd)
                        "(two runs in it would write the same files)", workdir, e.strerror or e)
            f.close()
            return None
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        pid, _, host = holder.partition(" ")
        raise config_utils.ConfigError(
            f"workdir {workdir} is in use by another `xdistill train` (pid {pid} on {host or 'unknown host'}, "
            f"per {workdir / WORKDIR_LOCK}): two runs would write the same checkpoints and metrics; wait for it "
            "to end or stop it") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()} {socket.gethostname()}\n")
    f.flush()
    return f


def _train(config, workdir: pathlib.Path, data: TrainingData, mesh, gt, steps_per_epoch: int, encoder_init,
           t_call: float) -> int:
    """`train_and_evaluate` once every process has passed the setup checks, the workdir locked by
    process 0 (all processes share it) for the run."""
    lock = lock_workdir(workdir) if jax.process_index() == 0 else None
    try:
        return _train_locked(config, workdir, data, mesh, gt, steps_per_epoch, encoder_init, t_call)
    finally:
        if lock is not None:
            lock.close()


def _train_locked(config, workdir: pathlib.Path, data: TrainingData, mesh, gt, steps_per_epoch: int, encoder_init,
                  t_call: float) -> int:
    is_main = jax.process_index() == 0
    num_steps = train.total_steps(config, steps_per_epoch)
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        from xdistill_jax.inference import checkpoint_steps

        finished = max(checkpoint_steps(workdir), default=-1) >= num_steps
        # a finished run (said below, once a checkpoint restored) keeps the config.json its
        # checkpoints were trained with: a changed setting would label the run with it
        if not (finished and (workdir / config_utils.CONFIG_JSON).is_file()):
            config_utils.save_config(config, workdir)

    nets = Networks.from_config(config)
    tx = train.make_optimizer(config, steps_per_epoch)
    log.info("%s", train.describe_lr_schedule(config, steps_per_epoch))
    ckpt = Checkpointer(workdir / "checkpoints", keep=config.run.keep, async_save=config.run.async_checkpoints)
    _fault.settle = ckpt.wait

    # the state's abstract tree (a trace of the whole init) only when there is a checkpoint to read
    abstract_state = train.abstract_train_state(nets, tx, mesh)[0] if ckpt.all_steps() else None
    state, data_state, step = ckpt.restore(abstract_state)
    # the run's keys from the PRNG implementation it started with (saved with each checkpoint): a
    # resume under another JAX_DEFAULT_PRNG_IMPL trained on with other keys until 2026-12-07
    prng_impl = (data_state or {}).get("prng_impl") or str(jax.config.jax_default_prng_impl)
    if prng_impl != str(jax.config.jax_default_prng_impl):
        log.warning("resuming with the PRNG implementation the run started with (%s), not this process's "
                    "default (%s)", prng_impl, jax.config.jax_default_prng_impl)
    base_rng = jax.random.key(config.run.seed, impl=prng_impl)
    init_rng, step_rng, val_rng = jax.random.split(base_rng, 3)
    _fault.at("start", step or 0)
    if ckpt.damaged_steps:
        # those steps are trained again and saved under the same numbers, which orbax refuses
        # while their folders exist: they are kept aside, renamed, not deleted
        if is_main:
            moved = ckpt.set_aside(ckpt.damaged_steps)
            log.warning("set the damaged checkpoints aside: %s", ", ".join(str(m) for m in moved))
            print(f"set the damaged checkpoints aside: {', '.join(str(m) for m in moved)}", flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("xdistill: damaged checkpoints set aside")
        ckpt.reload()
    lowered_init = None
    if state is None:
        if encoder_init is None:  # checkpoint directories, none complete: read it now
            encoder_init = train.load_pretrained_encoders(config)
        lowered_init = train.lower_init(nets, tx, mesh, init_rng)
        abstract_state = lowered_init.out_info  # the state's tree, without another trace
        # a weights file that does not fit fails here, before the step starts compiling
        try:
            train.check_pretrained_encoders(abstract_state, encoder_init)
        except ValueError as e:
            raise config_utils.ConfigError(f"config.model.init={config.model.init}: {e}") from e
        data_state, step = {}, 0
    elif step >= num_steps:
        log.info("%s is complete: its checkpoint %s is at or past the %d steps asked for; nothing to train",
                 workdir, ckpt.directory / str(step), num_steps)
        if is_main:
            print(f"{workdir} is complete: checkpoint {ckpt.directory / str(step)} is at or past the "
                  f"{num_steps} steps asked for; nothing to train", flush=True)
    else:
        log.info("resuming from %s at step %d", ckpt.directory / str(step), step)
        if is_main:
            print(f"resuming from {ckpt.directory / str(step)} at step {step}", flush=True)
    from xdistill_jax.background_compile import AheadStep
    from xdistill_jax.input_pipeline import DevicePrefetchIterator

    host_iter = data.make_train_iterator()
    if data_state.get("loader") is not None:
        try:
            host_iter.set_state(data_state["loader"])
        except ValueError as e:
            raise CheckpointError(f"checkpoint {ckpt.directory / str(step)}: {e}") from e
    if os.environ.get("XDISTILL_TEST_BATCH_LOG"):
        host_iter = _BatchLog(host_iter, os.environ["XDISTILL_TEST_BATCH_LOG"], step)
    train_iter = DevicePrefetchIterator(host_iter, mesh)
    skipped = int(data_state.get("skipped", 0))
    # the train scalars since the last log line: saved with each checkpoint, so a run resumed
    # from one between log steps logs the same means as an unbroken run
    window = list(data_state.get("log_window", []))
    step_rng = train.replicate(step_rng, mesh)

    # The step compiles on a background thread from the state's abstract tree and the first
    # batch's shapes, while the state is initialised (background_compile).
    state_layout = config.run.get("state_layout", "default")  # .get: an older config.json
    train_step = None
    if step < num_steps:
        first = train_iter.peek()
        if first is None:
            raise ValueError(f"config.data.train_split={config.data.train_split!r}: the training data "
                             f"gave no batch of config.optim.batch_size={config.optim.batch_size}")
        train_step = AheadStep(train.make_train_step(config, nets, tx, mesh, state_layout=state_layout),
                               abstract_state, first, step_rng, relayout=state_layout == "auto")
    if lowered_init is not None:
        state = train.create_train_state(nets, tx, mesh, init_rng, encoder_init, lowered=lowered_init)
        log.info("starting from %s", config.model.init)

    writer = MetricWriter(workdir, enabled=is_main)
    kept = writer.truncate_after(step)

    def save(at_step):
        ckpt.save(at_step, state, {"loader": train_iter.get_state(), "skipped": skipped, "log_window": window,
                                   "prng_impl": prng_impl})
        _fault.at("ckpt", at_step)

    # Due at the restored step: the previous run was stopped during this validation, redo it
    # (same params, same key). At step 0 with run.val_at_start: the untrained model's val line.
    if step > 0:
        val_due = step % config.run.val_every == 0 or step == num_steps
    else:  # .get: a config.json saved before the field existed
        val_due = bool(config.run.get("val_at_start", False))
    eval_step = train.make_eval_step(config, nets, mesh) if data.make_val_iterator is not None else None
    if val_due and data.make_val_iterator is not None and hosts.any_process(is_main and (step, "val") not in kept):
        if train_step is not None:
            train_step.wait()  # the eval step compiles next, not while the step autotunes (GPU)
        validate(config, eval_step, mesh, state, data.make_val_iterator, writer, step, val_rng, gt)

    if train_step is not None:
        # the first step's compile is waited for here, where a stop still ends the run at once
        # (a cold GPU compile is ~90 s; the loop's handler below would train a step, then save)
        train_step.wait()
    pending, checked_step = [], step
    t_start, step_start = time.time(), step
    # time spent waiting for the next batch since the last log line (the loader's share of the loop)
    input_wait, t_window, window_start = 0.0, time.perf_counter(), step
    status = EXIT_OK
    with _StopSignal() as stop, contextlib.ExitStack() as heap:
        frozen = None  # objects frozen after the first step
        try:
            while step < num_steps:
                # The hot path: batches arrive by explicit device_put (prefetched); an implicit
                # host<->device transfer here would be a hidden sync, so it raises instead.
                with jax.transfer_guard("disallow"):
                    t_next = time.perf_counter()
                    batch = next(train_iter)
                    input_wait += time.perf_counter() - t_next
                    state, metrics = train_step(state, batch, step_rng)
                    del batch
                step += 1
                if frozen is None:  # the step has compiled: what tracing left is frozen (gc_pauses)
                    log.info("step %d: the step was lowered in %.2f s and compiled in %.2f s on a background "
                             "thread; %.2f s from the call to the first step", step, train_step.lower_s,
                             train_step.compile_s, time.time() - t_call)
                    frozen = heap.enter_context(gc_pauses.frozen_heap())
                    log.info("step %d: heap frozen for the loop (%d objects)", step, frozen)
                _fault.at("step", step)
                pending.append(metrics)
                boundary = step == num_steps
                do_ckpt = step % config.run.ckpt_every == 0 or boundary
                do_val = step % config.run.val_every == 0 or boundary
                stop_now = hosts.any_process(stop.received is not None) if (
                    jax.process_count() == 1 or step % config.run.log_every == 0) else False
                if step % config.run.log_every == 0 or do_ckpt or do_val or stop_now or boundary:
                    # one fetch of the scalars accumulated since the last check
                    fetched = jax.device_get(pending)
                    pending = []
                    window += [{k: float(v) for k, v in m.items()} for m in fetched]
                    losses = np.asarray([m["loss"] for m in fetched])
                    if config.run.on_nonfinite == "skip":
                        skipped += int(sum(m["skipped"] for m in fetched))
                    elif not np.all(np.isfinite(losses)):
                        bad = checked_step + 1 + int(np.argmin(np.isfinite(losses)))
                        raise NonFiniteLossError(
                            f"non-finite loss at step {bad} (in steps {checked_step + 1}..{step}); "
                            f"stopping. The last good checkpoint is {ckpt.latest_step()}")
                    checked_step = step
                    if step % config.run.log_every == 0 or boundary:
                        # a skipped step's NaN metrics would make the whole window's means NaN:
                        # they average the steps that trained ("skipped" itself all of them)
                        trained = [m for m in window if not m.get("skipped")] or window
                        scalars = {k: float(np.mean([m[k] for m in (window if k == "skipped" else trained)]))
                                   for k in window[-1]}
                        window = []
                        scalars["lr"] = float(train.lr_schedule(config, steps_per_epoch)(step - 1))
                        scalars["images_per_s"] = (step - step_start) * config.optim.batch_size / max(
                            time.time() - t_start, 1e-9)
                        now = time.perf_counter()
                        # near 1: the loop waits for data (more data.num_workers, a faster store)
                        scalars["input_wait_frac"] = input_wait / max(now - t_window, 1e-9)
                        # the loop's rate since the last log line (images_per_s is since the loop
                        # started, after the first step's compile); validation and saving count in both
                        scalars["window_images_per_s"] = (step - window_start) * config.optim.batch_size / max(
                            now - t_window, 1e-9)
                        input_wait, t_window, window_start = 0.0, now, step
                        if skipped:
                            scalars["skipped_steps"] = skipped
                        writer.write_scalars(step, scalars)
                        if is_main:
                            print(_progress_line(step, num_steps, t_start, step_start,
                                                 config.optim.batch_size, scalars), flush=True)
                if do_ckpt or stop_now:
                    save(step)
                if stop_now:
                    log.warning("%s received: saved checkpoint at step %d; exiting", stop.received, step)
                    if is_main:
                        print(f"{stop.received}: checkpoint saved at step {step}; rerun the same "
                              f"command to continue", flush=True)
                    status = EXIT_PREEMPTED
                    break
                if do_val and data.make_val_iterator is not None:
                    validate(config, eval_step, mesh, state, data.make_val_iterator, writer, step, val_rng, gt)
        except NonFiniteLossError as e:
            print(str(e), file=sys.stderr, flush=True)
            status = EXIT_NONFINITE
        except DamagedStoreError as e:  # a record of the split or teacher store, mid-run
            last = ckpt.latest_step()
            raise DamagedStoreError(
                f"{e}. Stopped after step {step}; " + (
                    f"the last checkpoint is step {last}: rerun the same command once the store is "
                    "repaired to resume from it" if last is not None else "no checkpoint was saved yet")
            ) from e
        finally:
            train_iter.close()  # the loader's worker processes and their batches ahead
            ckpt.close()
            writer.close()
    return status
