"""`xdistill demo`: the whole pipeline on a small synthetic world, X-Distill vs Monodepth2.

    run_demo("runs/demo")               # default (target: <= 15 min on an idle 2-core CPU)
    run_demo("runs/demo", quick=True)   # quick (target: <= 3 min, not met on every VM: below)

Stages (each prints a banner with the elapsed time, and is skipped when its output is complete,
so re-running the same command resumes; every output is written under a temporary name or by a
library that resumes by itself, so a killed stage restarts cleanly):

  1 world       `generate_world` -> W/world (KITTI raw layout + Make3D copy; renamed when done)
  2 prepare     `prepare_split` train -> W/tfds (TFDS array_record triplets at the training size)
                then the baseline starts training in a second process (`xdistill train`,
                distill.weight=0 -> W/runs/baseline, output prefixed [baseline] and kept in
                W/runs/baseline/train.log): it needs no teacher, and two processes use the two
                cores better than one (small train steps and XLA compiles are mostly one thread)
  3 teacher     `train_teacher` (resnet18_tiny on the world's trainId labels) -> W/teacher
  4 logits      `precompute_split` (flax teacher, grouped, stride 4) -> W/teacher_logits/train
  5 gt          `export_gt_depths` (velodyne, Eigen style) of the test split -> W/gt/test_gt.npz
  6 xdistill    `train_and_evaluate` (same seed, same steps as the baseline) -> W/runs/xdistill
  7 baseline    waits for the baseline's process (SIGTERMed, i.e. checkpointed, if the demo stops)
  8 eval        both runs and a constant-depth predictor: Eigen protocol on the test split and
                the Make3D protocol on W/world/make3d -> W/runs/<run>/eval/*.json, W/eval/*.json
  9 report      W/report.md, W/figures/*.png, the side-by-side table (printed too)

The training settings are `configs/demo.py` (variant "quick" for --quick), so both runs can be
repeated with `xdistill train`; the world, teacher and evaluation sizes are `SIZES` below.
A workdir remembers its size (W/demo.json): a quick workdir cannot be resumed as a default one,
and a run trained under other settings is an error, not skipped.

Timings and figures: the README's "Demo results" (the latest) and docs/demo_history.md (every
earlier run). The quick demo's stages, first measured on the project's 2-core machine (idle,
2026-11-26, cold compilation cache, `/usr/bin/time xdistill demo --quick`, 2 min 51 s wall, 323
CPU-s; the two cores are busy throughout): world 4 s, teacher 36 s, logits 4 s, X-Distill 110 s
(the baseline trains alongside, 150 s in its process), eval 8 s, report 6 s. A resumed demo whose
stages are all complete takes ~5 s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import time
from typing import Callable

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.py"
RUNS = ("baseline", "xdistill")
RUN_TITLES = {"constant": "constant depth (median-scaled)", "baseline": "Monodepth2 (baseline)",
              "xdistill": "X-Distill"}
EIGEN_SPLIT = "synthetic_eigen"
MAKE3D_SPLIT = "make3d"


@dataclasses.dataclass(frozen=True)
class DemoSize:
    """Everything the demo's size decides except the training runs (those are configs/demo.py).

    World: `drives` x `frames` at world_width x world_height (the last drive is the test split,
    every frame of it), `lidar_azimuths` lidar columns, `make3d_images` Make3D-layout images of
    make3d_size (rows, cols). Teacher: resnet18_tiny trained `teacher_steps` steps of
    `teacher_batch` images at the training resolution.
    """

    name: str
    config_variant: str
    drives: int
    frames: int
    world_width: int
    world_height: int
    lidar_azimuths: int
    make3d_images: int
    make3d_size: tuple[int, int]
    teacher_steps: int
    teacher_batch: int
    teacher_variant: str = "resnet18_tiny"
    grouping: str = "geometric"
    seed: int = 0


SIZES = {
    "default": DemoSize("default", "", drives=3, frames=60, world_width=416, world_height=128,
                        lidar_azimuths=1024, make3d_images=12, make3d_size=(256, 192),
                        teacher_steps=300, teacher_batch=8),
    "quick": DemoSize("quick", "quick", drives=2, frames=40, world_width=192, world_height=64,
                      lidar_azimuths=512, make3d_images=6, make3d_size=(128, 96),
                      teacher_steps=60, teacher_batch=8),
}


class Stages:
    """Prints stage banners with the elapsed wall time; records each stage's seconds."""

    def __init__(self, total: int, printer: Callable[[str], None] = print):
        self.t0 = time.time()
        self.total = total
        self.index = 0
        self.print = printer
        self.seconds: dict[str, float] = {}
        self.skipped: list[str] = []

    def elapsed(self) -> str:
        s = int(time.time() - self.t0)
        return f"{s // 60:02d}:{s % 60:02d}"

    def run(self, name: str, what: str, done: Callable[[], bool], fn: Callable[[], object]):
        self.index += 1
        head = f"[demo {self.elapsed()}] stage {self.index}/{self.total} {name}"
        if done():
            self.print(f"{head}: already complete, skipped ({what})")
            self.skipped.append(name)
            return None
        self.print(f"{head}: {what}")
        t = time.time()
        out = fn()
        self.seconds[name] = time.time() - t
        self.print(f"[demo {self.elapsed()}] stage {name} done in {self.seconds[name]:.1f} s")
        return out


def write_json_atomic(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def demo_config_args(size: DemoSize, workdir: pathlib.Path, run: str) -> tuple[str, list[str]]:
    """(config spec, overrides) of one demo run (`run` in RUNS), as `xdistill train` takes them."""
    overrides = [f"--config.data.dataset_dir={workdir / 'tfds'}", f"--config.distill.grouping={size.grouping}"]
    if run == "baseline":
        overrides.append("--config.distill.weight=0")
    else:
        overrides.append(f"--config.data.teacher_dir={workdir / 'teacher_logits' / 'train'}")
    spec = f"{DEMO_CONFIG}:{size.config_variant}" if size.config_variant else str(DEMO_CONFIG)
    return spec, overrides


def demo_config(size: DemoSize, workdir: pathlib.Path, run: str):
    """The resolved training config of one demo run (`run` in RUNS)."""
    from xdistill_jax import config_utils

    return config_utils.config_from_args(*demo_config_args(size, workdir, run))


class BackgroundRun:
    """`xdistill train` of one demo run in a child process, its output forwarded line by line.

    The baseline needs no teacher, so it trains while this process trains the teacher, stores
    its logits and trains X-Distill: on a 2-core machine two processes use the cores better than
    one (the small train steps and the XLA compiles are largely single-threaded). The child is a
    plain `xdistill train`, so it resumes from its own checkpoints like any run; its output is
    also kept in `log`. Used as a context manager: leaving it SIGTERMs a child still running
    (the loop saves a checkpoint and exits 75).
    """

    def __init__(self, name: str, spec: str, overrides: list[str], run_dir: pathlib.Path,
                 printer: Callable[[str], None]):
        import subprocess
        import sys
        import threading

        import jax

        run_dir.mkdir(parents=True, exist_ok=True)
        self.name, self.log = name, run_dir / "train.log"
        cmd = [sys.executable, "-m", "xdistill_jax", "train", "--config", spec, "--workdir", str(run_dir),
               *overrides]
        cache = jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache else None
        cmd += ["--compilation-cache", cache or "off"]
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1)
        self._thread = threading.Thread(target=self._forward, args=(printer,), daemon=True)
        self._thread.start()

    def _forward(self, printer):
        with open(self.log, "a") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                printer(f"  [{self.name}] {line.rstrip()}")
        self.t_end = time.time()  # the child closed its output: it has finished

    def wait(self) -> float:
        """Waits for the child; returns its own wall seconds (start to exit); raises naming the log
        if it failed."""
        status = self.proc.wait()
        self._thread.join()
        if status == 75:  # the child was stopped (a signal to the process group) and saved
            raise DemoStopped(f"the {self.name} run's process was stopped (exit 75; its checkpoint and output: "
                              f"{self.log.parent})")
        if status != 0:
            raise RuntimeError(f"training {self.name} stopped with exit status {status}; its output: {self.log}")
        return self.t_end - self.t0

    def __enter__(self) -> "BackgroundRun":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=120)
            except Exception:  # noqa: BLE001 - a child that does not stop is killed
                self.proc.kill()


def _check_workdir(workdir: pathlib.Path, size: DemoSize) -> None:
    marker = workdir / "demo.json"
    want = dataclasses.asdict(size)
    want["make3d_size"] = list(size.make3d_size)
    if marker.is_file():
        have = json.loads(marker.read_text())
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise ValueError(f"{marker}: this workdir holds a demo of another size ({', '.join(diff)} "
                             f"differ, e.g. name {have.get('name')!r} vs {size.name!r}); use another --workdir")
    else:
        write_json_atomic(marker, want)


def _check_run_config(run_dir: pathlib.Path, config) -> None:
    """A run directory trained under other settings (e.g. an older configs/demo.py) is an error,
    not something to skip or silently resume."""
    from xdistill_jax import config_utils

    if not (run_dir / config_utils.CONFIG_JSON).is_file():
        return
    diffs = list(config_utils.differences(config_utils.load_config(run_dir), config))
    if diffs:
        raise ValueError(f"{run_dir} was trained with other settings ({'; '.join(diffs[:4])}); "
                         f"delete {run_dir} to retrain it")


def _latest_step(run_dir: pathlib.Path) -> int | None:
    from xdistill_jax.checkpoints import Checkpointer

    if not (run_dir / "checkpoints").is_dir():
        return None
    ckpt = Checkpointer(run_dir / "checkpoints", keep=1, async_save=False)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


class DemoStopped(BaseException):
    """SIGTERM/SIGINT stopped the demo; what finished is kept, and a rerun resumes. A
    BaseException: raised wherever the main thread is, it must pass the `except Exception` of
    the code it interrupts (which would name it a damaged store or a failed checkpoint write)."""


def run_demo(workdir, *, quick: bool = False, printer: Callable[[str], None] = print) -> dict:
    """Runs (or resumes) the demo in `workdir`; returns {"table": str, "results": {...}, ...}.
    SIGTERM/SIGINT raise DemoStopped once the background run (if any) has stopped and saved."""
    # a stop raises wherever the demo is, so that its background run is SIGTERMed (and
    # checkpoints) on the way out, as on any failure; the in-process training's own handlers take
    # over while it trains (it saves and returns 75)
    from xdistill_jax import stop_signals

    with stop_signals.raise_on_stop(DemoStopped):
        return _run_demo(workdir, quick=quick, printer=printer)


def _run_demo(workdir, *, quick: bool = False, printer: Callable[[str], None] = print) -> dict:
    import jax

    from xdistill_jax import config_utils, demo_eval, demo_report

    size = SIZES["quick" if quick else "default"]
    if not DEMO_CONFIG.is_file():  # before anything is written
        raise ValueError(f"{DEMO_CONFIG}: the demo's config is missing; configs/ comes with the source "
                         "checkout, not with a built wheel: install a clone with `pip install -e .` "
                         "(the README's command)")
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    _check_workdir(workdir, size)
    # the kernel layout ("auto") a run trained with, or will train with here (as `xdistill train`)
    configs = {run: config_utils.resolve_kernel_layout(demo_config(size, workdir, run), jax.default_backend(),
                                                       workdir / "runs" / run) for run in RUNS}
    steps = configs["baseline"].optim.num_steps
    if configs["xdistill"].optim.num_steps != steps or configs["xdistill"].run.seed != configs["baseline"].run.seed:
        raise AssertionError("the demo's two runs must share seed and number of steps")
    height, width = configs["baseline"].data.height, configs["baseline"].data.width
    world = workdir / "world"
    tfds_dir = workdir / "tfds"
    stages = Stages(total=9, printer=printer)
    printer(f"xdistill demo ({size.name}) in {workdir}: {size.drives} drives x {size.frames} frames, "
            f"training {height}x{width} (HxW), {steps} steps x batch {configs['baseline'].optim.batch_size} per run")

    def make_world():
        from data_pipelines.synthetic_world.generate import generate_world

        summary = generate_world(world, seed=size.seed, drives=size.drives, frames=size.frames,
                                 width=size.world_width, height=size.world_height,
                                 make3d_images=size.make3d_images, make3d_size=size.make3d_size,
                                 lidar_azimuths=size.lidar_azimuths, velodyne="test",
                                 overwrite=True)
        printer(f"  splits: {summary['split_sizes']}")

    stages.run("world", f"render {size.drives} drives x {size.frames} frames at "
               f"{size.world_width}x{size.world_height} (WxH) + {size.make3d_images} Make3D images",
               lambda: (world / "world.json").is_file(), make_world)

    def prepare():
        from data_pipelines.kitti.prepare import prepare_split

        prepare_split(world, world / "splits" / "train_files.txt", tfds_dir, "train", height, width)

    def prepared():
        from data_pipelines.kitti.tfds_builder import dataset_dir

        return dataset_dir(tfds_dir, "train").is_dir()  # built under a temporary name, renamed

    stages.run("prepare", f"train split -> TFDS triplets at {height}x{width} (HxW)", prepared, prepare)

    for run in RUNS:
        _check_run_config(workdir / "runs" / run, configs[run])
    baseline_dir = workdir / "runs" / "baseline"
    background = None
    if _latest_step(baseline_dir) != steps:
        printer(f"[demo {stages.elapsed()}] baseline: training in a second process while the teacher "
                f"and X-Distill train here (output prefixed [baseline], also in {baseline_dir / 'train.log'})")
        background = BackgroundRun("baseline", *demo_config_args(size, workdir, "baseline"), baseline_dir, printer)
    teacher_dir = workdir / "teacher"
    logits_dir = workdir / "teacher_logits" / "train"
    gt_path = workdir / "gt" / "test_gt.npz"
    with background or contextlib.nullcontext():  # the child is SIGTERMed if anything here fails
        def train_teacher():
            from data_pipelines.teacher.train_teacher import TeacherTrainConfig, train_teacher

            cfg = TeacherTrainConfig(data_dir=str(world), layout="synthetic", split="train",
                                     variant=size.teacher_variant, height=height, width=width,
                                     batch_size=size.teacher_batch, steps=size.teacher_steps,
                                     seed=size.seed, save_every=size.teacher_steps)
            train_teacher(cfg, teacher_dir, log_every=max(size.teacher_steps // 5, 1))

        stages.run("teacher", f"segmentation teacher {size.teacher_variant}, {size.teacher_steps} steps "
                   f"on the world's labels", lambda: _latest_step(teacher_dir) == size.teacher_steps,
                   train_teacher)

        def logits():
            from data_pipelines.teacher.precompute import precompute_split

            precompute_split(f"flax:{teacher_dir}", tfds_dir, "train", logits_dir, grouping=size.grouping,
                             stride=4, batch_size=8, progress=False)

        def logits_done():
            meta = logits_dir / "teacher.json"
            return meta.is_file() and bool(json.loads(meta.read_text()).get("complete"))

        stages.run("logits", f"teacher logits, {size.grouping} grouping -> store", logits_done, logits)

        def export_gt():
            from data_pipelines.kitti.export_gt import export_gt_depths

            n = export_gt_depths(world, world / "splits" / "test_files.txt", gt_path, split="eigen")
            printer(f"  {n} velodyne depth maps")

        stages.run("gt", "velodyne ground truth of the test split (export-gt)", gt_path.is_file, export_gt)

        xdistill_dir = workdir / "runs" / "xdistill"

        def train_xdistill():
            from xdistill_jax import training_loop

            status = training_loop.train_and_evaluate(configs["xdistill"], xdistill_dir)
            if status == training_loop.EXIT_PREEMPTED:  # SIGTERM/SIGINT while it trained: it saved
                raise DemoStopped(f"a stop signal while X-Distill trained (its checkpoint is in {xdistill_dir})")
            if status != training_loop.EXIT_OK:
                raise RuntimeError(f"training xdistill in {xdistill_dir} stopped with exit status {status}")

        stages.run("xdistill", f"train {RUN_TITLES['xdistill']}, {steps} steps",
                   lambda: _latest_step(xdistill_dir) == steps, train_xdistill)

        def wait_for_baseline():
            printer(f"  waiting for the baseline's process (started at {background.t0 - stages.t0:.0f} s)")
            stages.seconds["baseline (its own process)"] = background.wait()

        # already complete when this invocation started, or done once its process has finished
        stages.run("baseline", f"train {RUN_TITLES['baseline']}, {steps} steps", lambda: background is None,
                   wait_for_baseline)

    eval_paths = demo_eval.result_paths(workdir, steps)
    report = workdir / "report.md"

    def evaluate():
        report.unlink(missing_ok=True)  # derived from the results: redrawn after a re-evaluation
        demo_eval.evaluate_all(workdir, configs, gt_path, world, printer=printer)

    stages.run("eval", "Eigen protocol on the test split, Make3D protocol; constant-depth sanity row",
               lambda: all(p.is_file() for p in eval_paths.values()), evaluate)
    results = demo_eval.load_results(eval_paths)
    table = demo_report.results_table(results)
    stages.run("report", "report.md and figures", lambda: report.is_file() and (
        workdir / "figures" / "curves.png").is_file(),
        lambda: demo_report.write_report(workdir, size, configs, results, table, stages))
    printer("")
    printer(table)
    printer(f"\n[demo {stages.elapsed()}] finished; report: {report}")
    return {"table": table, "results": results, "seconds": stages.seconds, "skipped": stages.skipped,
            "report": str(report)}
