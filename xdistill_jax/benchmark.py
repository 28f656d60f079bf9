"""Train-step benchmark: the full X-Distill step on synthetic device-resident batches.

    config = config_utils.config_from_args("configs/kitti_resnet18_640x192.py")
    results = run_matrix(config, variants(("bfloat16", "float32"), (True, False)), steps=50)
    print(markdown_table(results))

What one measurement (`benchmark_step`) does, timed separately:
  start    as the training loop starts: the init lowered (`train.lower_init`), the step
           lowered and compiled from the state's abstract tree on a background thread
           (`background_compile.AheadStep`, the persistent compilation cache, when enabled,
           turning the compile into a read) while the init compiles and runs (one jitted call,
           outputs replicated on the mesh). Reported: init (until the state is on the
           device), compile (the thread's lower + compile) and the start itself (until both
           are done, `cold_start_s`). start="sequential" compiles after the init instead;
  steps    `warmup` steps, then `steps` steps each timed to completion (`block_until_ready`)
           under `jax.transfer_guard("disallow")`: an implicit host<->device transfer inside the
           loop raises instead of silently costing a sync.
No data loading: the batch (the loader's contract, random uint8 frames, Monodepth2's K per
scale, float16 teacher logits at 1/teacher_stride of the image, a quarter by default) is placed
on the mesh once.

Then the same number of steps back to back with one block at the end ("pipelined": the host
dispatches step n+1 while the device runs step n, as in the training loop).
For the warm-up, timed and back-to-back steps, Python's heap is frozen as in the training loop
after its first step (`gc_pauses.frozen_heap`), and the garbage collector's pauses are recorded:
its time in each timed step, its collections over the timed and back-to-back steps.

Reported per variant: median, mean and pipelined images/s, median step time, init, compile and start seconds,
FLOPs per step from XLA's cost analysis of the traced (whole-mesh) step (`_cost`; bytes
accessed from the compiled per-device program x devices), the fraction of the mesh's peak FLOP/s
(`PEAK_FLOPS` per device x devices, dense bf16 tensor-core peak whatever the run's dtype; n/a where
unknown, e.g. CPU), the device's peak memory in use (`device.memory_stats()`, n/a on CPU: the
process's peak so far, so for a variant after the first in one process an upper bound,
`peak_memory_scope`) and XLA's own memory estimate of the step (arguments + outputs - aliased +
temporaries).

Imports only jax, flax, optax, numpy and ml_collections: runs on accelerator images without
TFDS or grain.
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import json
import os
import pathlib
import statistics
import time
from typing import Any, Iterable, Sequence

import jax
import ml_collections
import numpy as np

from xdistill_jax import gc_pauses

# Peak dense bf16 FLOP/s by device kind substring, the first that matches (vendor data sheets;
# the NVL and PCIe parts before the SXM ones their names contain). The fraction of peak is always
# against the bf16 tensor-core peak, also for fp32 runs (which use TF32/fp32 units: about half).
PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
}
PEAK_DTYPE = "bfloat16"  # the dtype of PEAK_FLOPS' figures

# Monodepth2's fixed normalised intrinsics (KITTI), as the loader uses by default.
MONODEPTH2_K = np.array([[0.58, 0, 0.5, 0], [0, 1.92, 0.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)

STARTS = ("overlapped", "sequential")

COLUMNS = ("variant", "batch", "HxW", "images/s (median)", "images/s (pipelined)", "step ms (median)", "init s",
           "compile s", "start s", "GFLOP/step", "% of bf16 peak", "peak mem GB", "XLA mem GB", "GB accessed/step")


@dataclasses.dataclass(frozen=True)
class Variant:
    dtype: str          # "float32" | "bfloat16": config.model.dtype
    distill: bool       # distillation on (translator + teacher logits) or off (Monodepth2)
    state_layout: str = "default"  # train.make_train_step's: "auto" = the state's layouts left to XLA

    @property
    def name(self) -> str:
        layout = "" if self.state_layout == "default" else f" state={self.state_layout}"
        return f"{'bf16' if self.dtype == 'bfloat16' else 'fp32'} distill={'on' if self.distill else 'off'}{layout}"


def variants(dtypes: Iterable[str] = ("bfloat16", "float32"), distill: Iterable[bool] = (True, False)):
    return [Variant(d, x) for d in dtypes for x in distill]


def peak_flops(device) -> float | None:
    """Peak dense bf16 FLOP/s of `device` from PEAK_FLOPS (None: unknown, e.g. CPU)."""
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    for key, value in PEAK_FLOPS.items():
        if key in kind:
            return value
    return None


def device_description(device=None, num_devices: int | None = None) -> str:
    """"N x <device kind> (<platform>)" (N: num_devices, default all devices), + CPU cores on CPU."""
    device = device or jax.devices()[0]
    n = jax.device_count() if num_devices is None else num_devices
    desc = f"{n} x {device.device_kind} ({device.platform})"
    if device.platform == "cpu":
        desc += f", {os.cpu_count()} host CPU cores"
    return desc


def synthetic_batch(batch_size: int, height: int, width: int, *, num_groups: int | None = None,
                    teacher_stride: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """A host-local batch with the loader's contract (random frames), numpy.

    `teacher` (B, H/teacher_stride, W/teacher_stride, num_groups) float16 only when num_groups.
    """
    from xdistill_jax.input_pipeline import intrinsics_per_scale

    rng = np.random.default_rng(seed)
    frames = lambda h, w: rng.integers(0, 256, (batch_size, 3, h, w, 3), dtype=np.uint8)  # noqa: E731
    batch = {"color": frames(height, width), "color_aug": frames(height, width)}
    for s in (1, 2, 3):
        batch[f"color_s{s}"] = frames(height // 2**s, width // 2**s)
    K, inv_K = intrinsics_per_scale(MONODEPTH2_K, height, width)
    batch["K"] = np.broadcast_to(K, (batch_size, 4, 4, 4)).copy()
    batch["inv_K"] = np.broadcast_to(inv_K, (batch_size, 4, 4, 4)).copy()
    batch["index"] = np.arange(batch_size, dtype=np.int32)
    if num_groups:
        shape = (batch_size, height // teacher_stride, width // teacher_stride, num_groups)
        batch["teacher"] = rng.normal(0.0, 3.0, shape).astype(np.float16)
    return batch


def variant_config(config: ml_collections.ConfigDict, variant: Variant) -> ml_collections.ConfigDict:
    """`config` with the variant's compute dtype and distillation switch (weight 0.1 if it was 0)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.dtype = variant.dtype
    if not variant.distill:
        config.distill.weight = 0.0
    elif config.distill.weight <= 0:
        config.distill.weight = 0.1
    return config


def _block(tree) -> None:
    jax.block_until_ready(tree)


def _cost(stage) -> tuple[float | None, float | None]:
    """(FLOPs, bytes accessed) from XLA's cost analysis of a Lowered or Compiled (None: unknown)."""
    cost = stage.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    cost = cost or {}
    get = lambda key: float(cost[key]) if key in cost else None  # noqa: E731
    return get("flops"), get("bytes accessed")


def _xla_memory_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)


def _peak_memory_bytes(mesh) -> int | None:
    peaks = []
    for d in mesh.devices.flat:
        stats = d.memory_stats()
        if not stats or "peak_bytes_in_use" not in stats:
            return None
        peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks)


def config_batch(config: ml_collections.ConfigDict, seed: int = 0, teacher_stride: int = 4) -> dict[str, np.ndarray]:
    """`synthetic_batch` of the config's batch size and resolution, with teacher logits of its
    grouping when distillation is on."""
    from xdistill_jax import semantics

    groups = semantics.get_grouping(config.distill.grouping).num_groups if config.distill.weight > 0 else None
    return synthetic_batch(config.optim.batch_size, config.data.height, config.data.width,
                           num_groups=groups, teacher_stride=teacher_stride, seed=seed)


def _abstract_key(mesh, seed: int):
    """The step/init key of `seed` (default PRNG) as a replicated ShapeDtypeStruct on `mesh`."""
    from xdistill_jax import train

    key = jax.eval_shape(jax.random.key, seed)
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=train.replicated(mesh))


def compile_step(config: ml_collections.ConfigDict, mesh, seed: int = 0, teacher_stride: int = 4,
                 state_layout: str = "default"):
    """(lowered, compiled, lower s, compile s) of the config's train step on `mesh`, lowered from
    abstract state, batch and key: nothing is initialised or allocated, so `mesh` may be of
    compile-only devices (a GPU target without the GPU, benchmarks/gpu_aot.py). state_layout:
    `train.make_train_step`'s."""
    from xdistill_jax import train
    from xdistill_jax.objective import Networks

    nets = Networks.from_config(config, train.mesh_platform(mesh))
    tx = train.make_optimizer(config, steps_per_epoch=1000)
    state, _ = train.abstract_train_state(nets, tx, mesh)
    sharded = train.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharded)
             for k, v in config_batch(config, seed, teacher_stride).items()}
    rng = _abstract_key(mesh, seed)
    t0 = time.perf_counter()
    lowered = train.make_train_step(config, nets, tx, mesh, state_layout=state_layout).lower(state, batch, rng)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    return lowered, compiled, lower_s, time.perf_counter() - t0


def compile_init(config: ml_collections.ConfigDict, mesh, seed: int = 0):
    """(lower s, compile s, compiled) of the config's train-state init as `create_train_state`
    lowers it (`train.lower_init`), from an abstract key: nothing runs, so `mesh`
    may be of compile-only devices (benchmarks/gpu_aot.py)."""
    from xdistill_jax import train
    from xdistill_jax.objective import Networks

    nets = Networks.from_config(config, train.mesh_platform(mesh))
    tx = train.make_optimizer(config, steps_per_epoch=1000)
    rng = _abstract_key(mesh, seed)
    t0 = time.perf_counter()
    lowered = train.lower_init(nets, tx, mesh, rng)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    return lower_s, time.perf_counter() - t0, compiled


def device_inputs(host_batch: dict, mesh, seed: int = 0):
    """(global batch, replicated step key) on the mesh, as the benchmarks feed the step."""
    from xdistill_jax import train

    return (train.global_batch(host_batch, mesh),
            jax.device_put(jax.random.key(seed + 1), train.replicated(mesh)))


def benchmark_step(config: ml_collections.ConfigDict, *, steps: int = 50, warmup: int = 5,
                   seed: int = 0, teacher_stride: int = 4, progress=None,
                   profile_dir: str | None = None, profile_steps: int = 5,
                   state_layout: str = "default", start: str = "overlapped") -> dict[str, Any]:
    """Measures one config's train step (see the module docstring); returns a JSON-able dict.

    start: "overlapped" (the training loop's start) compiles the step on a background thread
      while the init compiles and runs (`background_compile.AheadStep`); "sequential" compiles
      it after the init, as before (A/B).

    state_layout: "auto" compiles the step with the state's device layouts left to XLA
      (`train.make_train_step`) and puts the initialised state into the compiled step's input
      formats before the first step (`AheadStep.prepare`, inside the start time: a relayout
      once, as after init or a restore);
      the variant's name then ends in "state=auto".

    progress: optional callable(str) told when init and compile finish (for long runs' logs).
    profile_dir: if given, `profile_steps` more steps (after the timed ones, not counted) are
      traced with `jax.profiler.trace` into it (view with TensorBoard's profile plugin/Perfetto);
      their summary (`profile_summary`: device time by named scope, kind of op, top ops) is
      returned under "profile" and written to summary.md there, with the optimised HLO
      (optimized_hlo.txt.gz) to look the named ops up in.
    """
    say = progress or (lambda message: None)
    from xdistill_jax import config_utils, train
    from xdistill_jax.background_compile import AheadStep
    from xdistill_jax.objective import Networks

    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    mesh = train.make_mesh(config)

    config_utils.validate(config, num_devices=mesh.size)
    config = config_utils.resolve_kernel_layout(config, train.mesh_platform(mesh))
    b, h, w = config.optim.batch_size, config.data.height, config.data.width
    distill = config.distill.weight > 0
    host_batch = config_batch(config, seed, teacher_stride)

    # The batch and key on the mesh first: the start below is init + compile, as in the loop.
    batch, rng = device_inputs(host_batch, mesh, seed)
    _block((batch, rng))
    init_rng = jax.random.key(seed)

    # With a profile, op metadata goes into the persistent cache's key: by default the key leaves
    # it out, so a program compiled before a named scope was added (same math) would be read back
    # with its old op names and the profile attributed to stale scopes. (gpu.sh sets it for every
    # run, so that its profiled warm run still reads the cold run's entries.)
    with_metadata = jax.config.jax_compilation_cache_include_metadata_in_key
    try:
        if profile_dir:
            jax.config.update("jax_compilation_cache_include_metadata_in_key", True)
        t0 = time.perf_counter()
        nets = Networks.from_config(config)
        tx = train.make_optimizer(config, steps_per_epoch=1000)
        lowered_init = train.lower_init(nets, tx, mesh, init_rng)
        step_fn = train.make_train_step(config, nets, tx, mesh, state_layout=state_layout)
        start_step = lambda: AheadStep(  # noqa: E731
            step_fn, lowered_init.out_info, batch, rng, relayout=state_layout != "default")
        if start == "overlapped":  # as the training loop: the step compiles while the init runs
            ahead = start_step()
        state = train.create_train_state(nets, tx, mesh, init_rng, lowered=lowered_init)
        _block(state)
        init_s = time.perf_counter() - t0
        say(f"init {init_s:.2f} s")
        if start == "sequential":  # on the thread too (the same trace, so the same cache key), after
            ahead = start_step()
            ahead.wait()
        # "auto" layouts: the state moved into the chosen formats once, inside the start time
        state = ahead.prepare(state)
        _block(state)
        start_s = time.perf_counter() - t0
    finally:
        jax.config.update("jax_compilation_cache_include_metadata_in_key", with_metadata)
    lowered, compiled = ahead.lowered, ahead.compiled
    compile_s = ahead.lower_s + ahead.compile_s
    say(f"compile {compile_s:.2f} s; start {start_s:.2f} s ({start})")
    # FLOPs from the program as traced (whole mesh, before partitioning and optimisation): the
    # compiled program's count leaves out what runs as library calls, e.g. every cuDNN convolution
    # on a GPU (23 of the bf16 step's 1,228 GFLOP on an H200, benchmarks/RESULTS.md). Bytes from
    # the compiled, per device program (its fusions are what moves memory).
    flops, _ = _cost(lowered)
    _, bytes_device = _cost(compiled)

    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    _block(metrics)
    first_step_s = time.perf_counter() - t0
    # As the training loop does after its first step: the heap that tracing and compiling left
    # frozen (gc_pauses), and every collection during the steps recorded.
    with gc_pauses.frozen_heap() as frozen, gc_pauses.Recorder() as gc_record:
        for _ in range(warmup):
            state, metrics = compiled(state, batch, rng)
        _block((state, metrics))

        times, gc_ms, first_pause = [], [], len(gc_record.pauses)
        with jax.transfer_guard("disallow"):
            loop_start = time.perf_counter()
            for _ in range(steps):
                n = len(gc_record.pauses)
                t = time.perf_counter()
                state, metrics = compiled(state, batch, rng)
                _block(metrics)
                times.append(time.perf_counter() - t)
                gc_ms.append(gc_record.tally(n)[1])
            _block(state)
            loop_s = time.perf_counter() - loop_start
        # The same steps back to back, blocking once at the end: what the training loop sees (the
        # host dispatches step n+1 while the device runs step n), against the per-step timing above.
        with jax.transfer_guard("disallow"):
            t = time.perf_counter()
            for _ in range(steps):
                state, metrics = compiled(state, batch, rng)
            _block((state, metrics))
            pipelined_s = time.perf_counter() - t
        gc_loops_count, gc_loops_ms = gc_record.tally(first_pause)
    profile = None
    if profile_dir:
        with jax.profiler.trace(str(profile_dir)):
            for _ in range(profile_steps):
                state, metrics = compiled(state, batch, rng)
            _block((state, metrics))
        from xdistill_jax import profile_summary

        hlo_text = compiled.as_text()
        # the optimised HLO, to look up any op the summary names (its fusion, shapes, op_name)
        with gzip.open(pathlib.Path(profile_dir) / "optimized_hlo.txt.gz", "wt") as f:
            f.write(hlo_text)
        try:
            profile = profile_summary.summarize_trace(profile_dir, hlo_text, profile_steps,
                                                      wall_ms_per_step=1e3 * statistics.median(times))
        except Exception as e:  # noqa: BLE001 - e.g. a GPU image without CUPTI: no device events
            # the timings above stand; say why there is no breakdown instead of losing them
            profile = {"error": f"{type(e).__name__}: {e}"}
        (pathlib.Path(profile_dir) / "summary.md").write_text(profile_summary.markdown(profile) + "\n")
    loss = float(jax.device_get(metrics["loss"]))
    if not np.isfinite(loss):
        raise FloatingPointError(f"benchmark step produced a non-finite loss {loss}")

    median = statistics.median(times)
    device = mesh.devices.flat[0]
    peak = peak_flops(device)
    achieved = None if flops is None else flops / median
    return {
        "variant": Variant(config.model.dtype, distill, state_layout).name,
        "state_layout": state_layout,
        "kernel_layout": config.model.kernel_layout,
        "dtype": config.model.dtype,
        "distill": distill,
        "batch": b, "height": h, "width": w,
        "num_layers": config.model.num_layers,
        "devices": mesh.size,
        "steps": steps, "warmup": warmup,
        "images_per_s_median": b / median,
        "images_per_s_mean": b * steps / loop_s,
        "images_per_s_pipelined": b * steps / pipelined_s,
        "step_ms_median": 1e3 * median,
        "step_ms_min": 1e3 * min(times),
        "step_ms_max": 1e3 * max(times),
        # every timed step, in order: where an outlier falls (on an H200, one bf16 step with
        # distillation on took ~10x the median in every such run; RESULTS.md, 2026-12-04)
        "step_ms_all": [round(1e3 * t, 3) for t in times],
        # Python's garbage collector (gc_pauses): objects frozen after the first step; its time
        # in each timed step; collections by generation and their time over the timed and the
        # back-to-back steps
        "gc_frozen_objects": frozen,
        "gc_ms_all": [round(ms, 3) for ms in gc_ms],
        "gc_collections": {str(g): n for g, n in gc_loops_count.items()},
        "gc_ms_total": round(gc_loops_ms, 3),
        # the start (init + the step's compile, overlapped or one after the other, `start`): init
        # from the start until the state is on the device, compile the step's own lower + compile
        "start": start,
        "init_s": init_s,
        "compile_s": compile_s,
        "cold_start_s": start_s,
        "first_step_s": first_step_s,
        "flops_per_step": flops,
        "bytes_accessed_per_step": None if bytes_device is None else bytes_device * mesh.size,
        "achieved_flops_per_s": achieved,
        # the mesh's peak: the FLOPs are the whole mesh's (until 2026-12-07 one device's peak, so
        # N devices read N times their fraction)
        "peak_flops_per_s": None if peak is None else peak * mesh.size,
        "peak_flops_dtype": PEAK_DTYPE,
        "fraction_of_peak": None if (peak is None or achieved is None) else achieved / (peak * mesh.size),
        "teacher_stride": teacher_stride if distill else None,
        "peak_memory_bytes": _peak_memory_bytes(mesh),
        "peak_memory_scope": "process",
        "xla_memory_bytes": _xla_memory_bytes(compiled),
        "final_loss": loss,
        "profile": profile,
    }


def mark_process_peaks(results: list[dict]) -> list[dict]:
    """Mark the peak memory of every result after the first of one process as the process's peak
    so far (the device's counter is never reset: an upper bound of that variant's own peak)."""
    for r in results[1:]:
        r["peak_memory_scope"] = "process peak so far (an upper bound: run one variant per process)"
    return results


def run_matrix(config: ml_collections.ConfigDict, variant_list: Sequence[Variant], **kwargs) -> list[dict]:
    """benchmark_step for each variant of `config` (same process: peak memory is the process's
    peak so far, marked so; run one variant per process for per-variant peaks)."""
    return mark_process_peaks([benchmark_step(variant_config(config, v), **kwargs) for v in variant_list])


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def markdown_table(results: Sequence[dict], device: str | None = None) -> str:
    """The results as a markdown table, headed by the device they ran on."""
    if device is None:
        counts = {r["devices"] for r in results}
        device = device_description(num_devices=counts.pop() if len(counts) == 1 else None)
    flags = os.environ.get("XLA_FLAGS", "").strip()
    lines = [f"Train step benchmark on {device}" + (f" (XLA_FLAGS={flags})" if flags else ""), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        cells = [r["variant"], str(r["batch"]), f"{r['height']}x{r['width']}",
                 _fmt(r["images_per_s_median"], ".1f"), _fmt(r["images_per_s_pipelined"], ".1f"),
                 _fmt(r["step_ms_median"], ".1f"),
                 _fmt(r["init_s"], ".2f"), _fmt(r["compile_s"], ".2f"), _fmt(r.get("cold_start_s"), ".2f"),
                 _fmt(r["flops_per_step"], ".1f", 1e-9), _fmt(r["fraction_of_peak"], ".2f", 100.0),
                 ("<= " if r.get("peak_memory_scope", "process") != "process" and r["peak_memory_bytes"] is not None
                  else "") + _fmt(r["peak_memory_bytes"], ".2f", 1e-9), _fmt(r["xla_memory_bytes"], ".2f", 1e-9),
                 _fmt(r.get("bytes_accessed_per_step"), ".2f", 1e-9)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def code_version() -> str | None:
    """The project's git commit (12 hex digits, "+dirty" with uncommitted changes), None outside
    the project's own git checkout (e.g. a copy of the tree on a device machine, or an install
    into a venv inside another repository)."""
    import subprocess

    here = pathlib.Path(__file__).resolve().parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        # the package's own checkout only: installed into a venv inside another repository, git
        # would answer with that repository's commit
        if top.returncode != 0 or pathlib.Path(top.stdout.strip()).resolve() != here.parent:
            return None
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() + ("+dirty" if dirty else "")


def host_cpu() -> dict:
    """The host CPU's model (from /proc/cpuinfo where there is one) and the cores this process may use."""
    model = None
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "cores_usable": cores, "cores_total": os.cpu_count()}


def write_json(path: str | os.PathLike, results: Sequence[dict], **meta) -> pathlib.Path:
    """Write {"device", "jax_version", "xla_flags", "date", "code_version", "host_cpu",
    "compilation_cache_dir", ..., "results"} atomically (temp name, rename); xla_flags: the
    XLA_FLAGS the programs were compiled under ("" when unset)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = {r.get("devices") for r in results}
    n = counts.pop() if len(counts) == 1 and None not in counts else None
    doc = {"device": device_description(num_devices=n), "device_kind": jax.devices()[0].device_kind,
           "platform": jax.devices()[0].platform, "jax_version": jax.__version__,
           "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "code_version": code_version(), "host_cpu": host_cpu(),
           "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
           **meta, "results": list(results)}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path
