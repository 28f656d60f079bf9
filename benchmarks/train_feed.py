"""Does the loader feed the train step? `xdistill train` end to end on a prepared store.

    python benchmarks/train_feed.py --out DIR                      # 640x192, bf16, workers -1 then 0
    python benchmarks/train_feed.py --out DIR --workers -1,4,0 --steps 400

`xdistill train --config configs/kitti_resnet18_640x192.py` (X-Distill, ResNet-18, batch 12) runs
in a process of its own for each `data.num_workers` asked for, on the fastest store the
project writes (`prepare --format raw --target-scales --compression none` of `loader_benchmark`'s
textured 1242x375 frames, `--examples` triplets, read over as many epochs as the steps need) and
a teacher store of random geometric logits. Each run logs every `--log-every` steps; the
figures are the medians over its log windows after the first (the compile) and before the last
(the final checkpoint): `window_images_per_s` (the loop's rate, loading included) and
`input_wait_frac` (the share of the loop's time spent waiting for the next batch), with the
loader alone (`loader_benchmark.run`, the same workers, no train step) beside them. Where the
loader keeps up, input_wait_frac is near 0 and the rate is the step's (`xdistill bench`); where
it does not, the rate is the loader's.

On a GPU host: `benchmarks/gpu_feed.sh` (installs the loader's packages from carried wheels
first). On a CPU the step is the bottleneck, so the figures say little about the loader; run it
small (`--height 64 --width 192 --steps 12 --log-every 4 --dtype float32`) to check the script.

Writes DIR/train_feed.json and DIR/train_feed.md; each run's workdir is DIR/run_workers_N
(removed first: a fresh run, not a resume), the data DIR/data (kept and reused).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _windows(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        raise RuntimeError(f"{path}: no metrics written (did the run fail? see its log)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == "train" and "window_images_per_s" in r]


def summarise(windows: list[dict]) -> dict:
    """Medians over the windows after the first (it holds the compile) and before the last (it
    holds the final checkpoint's save); all windows where there are fewer than three."""
    inner = windows[1:-1] if len(windows) >= 3 else windows
    if not inner:
        raise RuntimeError("the run logged no window (raise --steps or lower --log-every)")
    return {
        "windows": len(inner),
        "images_per_s": statistics.median(w["window_images_per_s"] for w in inner),
        "input_wait_frac": statistics.median(w["input_wait_frac"] for w in inner),
        "images_per_s_each": [round(w["window_images_per_s"], 1) for w in windows],
        "input_wait_frac_each": [round(w["input_wait_frac"], 3) for w in windows],
    }


def device_kind() -> str:
    """The first JAX device's kind, asked in a process of its own (this one must not hold the GPU
    while the training runs do)."""
    cmd = [sys.executable, "-c", "import jax; print(jax.devices()[0].device_kind)"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else "?"


def write_results(out: pathlib.Path, meta: dict, results: list[dict]) -> None:
    """DIR/train_feed.json and DIR/train_feed.md (the device named in meta)."""
    (out / "train_feed.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    lines = [f"Loader feeding the train step: {meta['device']}, {meta['cpu_cores']} CPU cores, "
             f"{meta['width']}x{meta['height']}, {meta['dtype']}, {meta['steps']} steps per run ({meta['date']})", "",
             "| data.num_workers | processes | loop images/s | waiting for data | loader alone examples/s |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['num_workers']} | {r['worker_processes']} | {r['images_per_s']:.1f} | "
                     f"{100 * r['input_wait_frac']:.0f} % | {r['loader_alone_examples_per_s']:.1f} |")
    (out / "train_feed.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="data, run workdirs and the results go here")
    parser.add_argument("--workers", default="-1,0", help="comma list of data.num_workers, one run each")
    parser.add_argument("--examples", type=int, default=240, help="triplets in the store")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--dtype", default="bfloat16", help="model.dtype")
    parser.add_argument("--config", default=str(ROOT / "configs" / "kitti_resnet18_640x192.py"))
    parser.add_argument("--loader-epochs", type=int, default=3, help="epochs the loader alone is timed over")
    parser.add_argument("--run-timeout", type=float, default=None, help="seconds each training run may take")
    args = parser.parse_args()
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError:
        parser.error(f"--workers: expected a comma list of integers, got {args.workers!r}")
    if not workers:
        parser.error("--workers: no value given")

    from xdistill_jax import loader_benchmark

    out = pathlib.Path(args.out).resolve()
    cores = len(os.sched_getaffinity(0))
    data = loader_benchmark.prepare_data(
        out / "data", examples=args.examples, height=args.height, width=args.width, image_format="raw",
        target_scales=True, compression="none", grouping="geometric", prepare_workers=min(16, cores))
    meta = {"device": device_kind(), "cpu_cores": cores, "height": args.height, "width": args.width, "dtype": args.dtype,
            "steps": args.steps, "log_every": args.log_every, "examples": args.examples, "config": args.config,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    results = []
    for w in workers:
        # the loader alone, on the store and teacher logits the run reads
        loader = loader_benchmark.run(
            examples=args.examples, height=args.height, width=args.width, epochs=args.loader_epochs,
            threads=None, workers=w, workdir=str(out / "data"), image_format="raw", target_scales=True,
            compression="none", source_scales=False, grouping="geometric", verbose=False)
        resolved = loader["workers"]
        workdir = out / f"run_workers_{w}"
        if workdir.exists():
            shutil.rmtree(workdir)
        cmd = [sys.executable, "-m", "xdistill_jax", "train", "--config", args.config, "--workdir", str(workdir),
               f"--config.data.dataset_dir={data['data_dir']}", f"--config.data.teacher_dir={data['teacher_dir']}",
               "--config.data.val_split=", f"--config.data.num_workers={w}", "--config.model.init=scratch",
               f"--config.data.height={args.height}", f"--config.data.width={args.width}",
               f"--config.model.dtype={args.dtype}", f"--config.optim.num_steps={args.steps}",
               f"--config.run.log_every={args.log_every}", f"--config.run.ckpt_every={args.steps}",
               f"--config.run.val_every={args.steps}"]
        workdir.mkdir(parents=True)
        t0 = time.perf_counter()
        with open(workdir.parent / f"run_workers_{w}.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=args.run_timeout,
                                cwd=ROOT).returncode
        wall = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"run with data.num_workers={w} exited with status {rc}; see "
                               f"{workdir.parent / f'run_workers_{w}.log'}")
        row = {"num_workers": w, "worker_processes": resolved, "run_wall_s": wall,
               "loader_alone_examples_per_s": loader["examples_per_s"],
               "loader_alone_examples_per_cpu_s": loader["examples_per_cpu_s"], **summarise(_windows(workdir))}
        results.append(row)
        print(f"data.num_workers={w} ({resolved} processes): loop {row['images_per_s']:.1f} images/s, "
              f"waiting for data {100 * row['input_wait_frac']:.0f}% (median of {row['windows']} windows); "
              f"loader alone {loader['examples_per_s']:.1f} examples/s", flush=True)
        # after each run, so that a caller's time limit keeps the runs already done
        write_results(out, meta, results)
    print((out / "train_feed.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
