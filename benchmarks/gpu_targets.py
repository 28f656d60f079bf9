"""Issue #8's targets read off one `benchmarks/gpu.sh` run: each figure, its target, met or not.

    python benchmarks/gpu_targets.py OUTDIR      # OUTDIR of gpu.sh (its *.json); prints markdown

gpu.sh appends this table to OUTDIR/summary.md, so a single GPU run says which targets it
showed met or missed. A second table gives each run's slowest timed step against its median,
with Python's garbage collector's time in that step (`slowest_steps`). Reads only the bench
JSONs (`xdistill bench --json`), imports nothing else from the project, and never invents a figure: a run that is missing or did not measure a
quantity (e.g. peak memory on a CPU dry run) gives "not measured". The targets are for
ResNet-18, 640x192, batch 12 on one H100 (SXM, 80 GB HBM3); runs at another shape are said to be.

On an H200 (the GPU this project's sessions may be lent) the verdicts are translated, not copied.
The H200 is the H100's GH100 chip with the same SMs, clocks and power, and more memory bandwidth
(4.8 against 3.35 TB/s). A step cannot be faster on the H100, and is at most 4.8 / 3.35 = 1.43x
slower there (if all of it were memory-bound). So H200 images/s below 1,000 miss the target on an
H100 too, images/s at or above 1,433 meet it there too, and figures in between decide nothing.
(The bound neglects two things: XLA compiles slightly different programs for the two targets,
17.00 against 17.22 GB moved per bf16 step by the deviceless census, RESULTS.md; and the host,
which launches the kernels, is assumed equally fast.)
The other verdicts are the H200's own, marked so. On any other device no verdict is given.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

TARGET_SHAPE = {"height": 192, "width": 640, "batch": 12, "num_layers": 18, "devices": 1}
# the runs of the targets' step itself (not its experiments: another translator, layout, padding,
# autotuning): the peak-memory target is read over these
TARGET_RUNS = ("bf16_distill_cold", "bf16_distill_warm", "bf16_nodistill_cold", "fp32_distill_cold",
               "fp32_nodistill_cold")
TARGET_KIND = "NVIDIA H100 80GB HBM3"  # jax's device_kind of the H100 SXM the targets were set on
# device_kind: how much faster its memory is than the H100's (same chip, SMs, clocks and power)
SAME_CHIP = {"NVIDIA H200": 4.8e12 / 3.35e12}


def load_runs(outdir: pathlib.Path) -> dict[str, dict]:
    """{run name: its single result dict} for every gpu.sh run JSON in `outdir`."""
    runs = {}
    for path in sorted(outdir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
        if not isinstance(data, dict) or data.get("kind") != "train_step" or not data.get("results"):
            continue  # another JSON (e.g. a loader benchmark), not a train-step run
        results = data["results"]
        if len(results) != 1:
            raise ValueError(f"{path}: expected one result per gpu.sh run, found {len(results)}")
        runs[path.stem] = {**results[0], "device": data.get("device", "?"),
                           "device_kind": data.get("device_kind", data.get("device", "?"))}
    return runs


# (row label, distillation-on run, distillation-off run, target in % or None = reported only)
OVERHEADS = (("bf16 (median step, on vs off)", "bf16_distill_cold", "bf16_nodistill_cold", 10.0),
             ("fp32", "fp32_distill_cold", "fp32_nodistill_cold", None),
             ("bf16, full-resolution translator", "bf16_distill_stride1_cold", "bf16_nodistill_cold", None))


def _verdict(value, limit, higher_is_better: bool) -> str:
    if value is None:
        return "not measured"
    return "met" if (value >= limit if higher_is_better else value <= limit) else "MISSED"


def _get(runs, name, key):
    run = runs.get(name)
    return None if run is None else run.get(key)


def _overhead(runs, on, off):
    a, b = _get(runs, on, "step_ms_median"), _get(runs, off, "step_ms_median")
    # rounded past float noise: 11 ms against 10 ms is +10 %, which meets "<= +10 %"
    return None if a is None or b is None else round(100.0 * (a / b - 1.0), 9)


def _images_verdict(ips, kind: str) -> str:
    """images/s against >= 1,000 on the H100; on a same-chip device with faster memory, bounded."""
    if ips is None or kind not in SAME_CHIP:
        return _verdict(ips, 1000, True)
    if ips < 1000:
        return "MISSED (an H100 is not faster)"
    if ips >= 1000 * SAME_CHIP[kind]:
        return f"met (an H100 is at most {SAME_CHIP[kind]:.2f}x slower)"
    return f"undecided (an H100 may be up to {SAME_CHIP[kind]:.2f}x slower)"


def target_rows(runs: dict[str, dict], kind: str = TARGET_KIND) -> list[tuple[str, str, str, str]]:
    """(what, measured, target, verdict) rows, from gpu.sh's run names, for runs on `kind`."""
    rows = []

    def fmt(value, unit, digits=1):
        return "not measured" if value is None else f"{value:,.{digits}f}{unit}"

    def reported(what, run, key, unit):  # one run's figure, no target
        rows.append((what, fmt(_get(runs, run, key), unit), "(reported)", "-"))

    def reported_vs_run1(what, run):  # one run's median step against run 1's, no target
        over = _overhead(runs, run, "bf16_distill_cold")
        rows.append((what, "not measured" if over is None else f"{over:+.1f} %", "(reported)", "-"))

    # the warm run times the same program as the cold one; take it when present (no compile noise)
    bf16 = "bf16_distill_warm" if "bf16_distill_warm" in runs else "bf16_distill_cold"
    ips = _get(runs, bf16, "images_per_s_median")
    rows.append((f"images/s, bf16, distillation on ({bf16})", fmt(ips, ""), ">= 1,000", _images_verdict(ips, kind)))
    # the same steps dispatched back to back, one block at the end: what the training loop sees
    reported(f"images/s, bf16, distillation on, steps back to back ({bf16})", bf16, "images_per_s_pipelined", "")
    reported("images/s, fp32, distillation on", "fp32_distill_cold", "images_per_s_median", "")
    for what, on, off, limit in OVERHEADS:
        over = _overhead(runs, on, off)
        rows.append((f"distillation's step time, {what}", "not measured" if over is None else f"{over:+.1f} %",
                     "(reported)" if limit is None else f"<= +{limit:g} %",
                     "-" if limit is None else _verdict(over, limit, False)))
    peaks = [runs[n].get("peak_memory_bytes") for n in TARGET_RUNS
             if n in runs and runs[n].get("peak_memory_bytes") is not None]
    peak = max(peaks) / 1e9 if peaks else None
    rows.append(("peak device memory, largest of the target runs (bf16/fp32, distillation on/off)",
                 fmt(peak, " GB", 2), "<= 6.6 GB", _verdict(peak, 6.6, False)))
    cold = _get(runs, "bf16_distill_cold", "cold_start_s")
    rows.append(("cold start (init + compile), empty cache", fmt(cold, " s"), "<= 30 s", _verdict(cold, 30.0, False)))
    warm = _get(runs, "bf16_distill_warm", "cold_start_s")
    rows.append(("start (init + compile), warm cache", fmt(warm, " s"), "<= 10 s", _verdict(warm, 10.0, False)))    # gpu.sh run 2b: run 2's warm start with the init, then the compile (the A/B of the overlap)
    reported("start, warm cache, init then compile (bf16_distill_warm_sequential)",
             "bf16_distill_warm_sequential", "cold_start_s", " s")
    # gpu.sh run 8: run 1's step without command buffers (CUDA graphs), profiled
    reported_vs_run1("step time without command buffers (bf16_distill_nocmdbuf) vs run 1", "bf16_distill_nocmdbuf")
    # gpu.sh run 3b: run 1's step without the tensor-core channel padding (models/conv.py)
    reported_vs_run1("step time without channel padding (bf16_distill_nopad_cold) vs run 1", "bf16_distill_nopad_cold")
    # gpu.sh run 12: run 1's step with the conv kernels stored HWIO (flax's order, the default before
    # 2026-12-04): the step time OHWI kernels save, as its median step against run 1's
    reported_vs_run1("step time with HWIO kernels (bf16_distill_hwio_cold) vs run 1", "bf16_distill_hwio_cold")
    # gpu.sh run 6: run 1's step compiled without autotuning (reported: the targets are the default's)
    reported("cold start, no autotuning (bf16_distill_noautotune_cold)",
             "bf16_distill_noautotune_cold", "cold_start_s", " s")
    reported("images/s, bf16, distillation on, no autotuning", "bf16_distill_noautotune_cold",
             "images_per_s_median", "")
    # gpu.sh run 11: run 6 with XLA's LLVM modules compiled in parallel, against run 6's compile
    reported("compile, no autotuning (bf16_distill_noautotune_cold)", "bf16_distill_noautotune_cold",
             "compile_s", " s")
    reported("compile, no autotuning, parallel LLVM modules (bf16_distill_noautotune_parallel_cold)",
             "bf16_distill_noautotune_parallel_cold", "compile_s", " s")
    # gpu.sh run 10: autotuning at level 1 (no buffer init / re-init / cross-check), empty cache
    reported("cold start, autotuning level 1 (bf16_distill_autotune1_cold)",
             "bf16_distill_autotune1_cold", "cold_start_s", " s")
    reported("images/s, bf16, distillation on, autotuning level 1", "bf16_distill_autotune1_cold",
             "images_per_s_median", "")
    return rows


def slowest_steps(runs: dict[str, dict]) -> list[str]:
    """Markdown table: each run's slowest timed step against its median, with the garbage
    collector's time in that step and its collections over the run's timed and back-to-back
    steps (bench JSON `step_ms_all`, `gc_ms_all`, `gc_collections`; runs without them are left
    out, gc columns say "not recorded" for JSONs older than the recording)."""
    lines = []
    for name, r in runs.items():
        times = r.get("step_ms_all")
        if not times:
            continue
        i = max(range(len(times)), key=times.__getitem__)
        gc_ms, counts = r.get("gc_ms_all"), r.get("gc_collections")
        lines.append(f"| {name} | {r['step_ms_median']:.1f} | {times[i]:.1f} (step {i + 1} of {len(times)}) | "
                     + ("not recorded" if not gc_ms else f"{gc_ms[i]:.1f}") + " | "
                     + ("not recorded" if not counts else
                        f"{counts.get('0', 0)} / {counts.get('1', 0)} / {counts.get('2', 0)}, "
                        f"{r.get('gc_ms_total', 0.0):.1f} ms") + " |")
    if not lines:
        return []
    return ["", "## Slowest timed step of each run", "",
            "| run | median step ms | slowest step ms | garbage collection in it, ms | "
            "collections gen 0 / 1 / 2 (timed + back to back), time |", "|---|---|---|---|---|", *lines]


def render(runs: dict[str, dict]) -> str:
    if not runs:
        return "## Targets (issue #8)\n\nNo train-step results found: no target measured.\n"
    any_run = next(iter(runs.values()))
    lines = ["## Targets (issue #8)", "", f"Device: {any_run['device']}."]
    kinds = sorted({r["device_kind"] for r in runs.values()})
    kind = kinds[0] if len(kinds) == 1 else None
    if kind is None:
        lines.append(f"Runs from several devices ({', '.join(kinds)}): no verdicts.")
    elif kind in SAME_CHIP:
        lines.append(f"The targets are an H100's ({TARGET_KIND}); this {kind} is its chip with "
                     f"{SAME_CHIP[kind]:.2f}x its memory bandwidth. images/s: an H100 is not faster and at most "
                     f"{SAME_CHIP[kind]:.2f}x slower, so the verdict is the H100's where that bound decides it; "
                     f"the other verdicts are this {kind}'s own.")
    elif kind != TARGET_KIND:
        lines.append(f"The targets are an H100's ({TARGET_KIND}), not a {kind}'s: no verdicts.")
    # "devices" absent (a JSON from before it was recorded): one device, as every gpu.sh run
    off_shape = sorted({f"{r.get('height')}x{r.get('width')} batch {r.get('batch')} ResNet-{r.get('num_layers')}"
                        f" on {r.get('devices', 1)} device(s)"
                        for r in runs.values()
                        if any(r.get(k, 1 if k == "devices" else None) != v for k, v in TARGET_SHAPE.items())})
    if off_shape:
        lines.append(f"Not the targets' setting (640x192, batch 12, ResNet-18, one device): {', '.join(off_shape)}; "
                     "no verdicts.")
    lines += ["", "| figure | measured | target | verdict |", "|---|---|---|---|"]
    own = kind in SAME_CHIP
    for what, value, target, verdict in target_rows(runs, kind or "?"):
        if off_shape and verdict != "-":
            verdict = "does not apply (setting)"
        elif verdict != "-" and kind != TARGET_KIND and not own:
            verdict = "does not apply (device)"
        elif own and verdict in ("met", "MISSED"):
            verdict = f"{verdict} on the {kind.removeprefix('NVIDIA ')}"
        lines.append(f"| {what} | {value} | {target} | {verdict} |")
    lines += slowest_steps(runs)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=pathlib.Path)
    args = parser.parse_args(argv)
    if not args.outdir.is_dir():
        print(f"gpu_targets: {args.outdir} is not a directory", file=sys.stderr)
        return 2
    try:
        print(render(load_runs(args.outdir)), end="")
    except ValueError as e:
        print(f"gpu_targets: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
