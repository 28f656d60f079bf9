"""`xdistill bench`: benchmark the train step (default) or the loader (`--loader`).

  xdistill bench --config configs/kitti_resnet18_640x192.py --json bench.json
  xdistill bench --config configs/synthetic_demo.py --steps 10 --warmup 2 --dtypes float32 \
      --distill on,off --config.optim.batch_size=2
  xdistill bench --loader --loader-format jpeg --loader-examples 48

Train step: prints a markdown table (device named) of median images/s over --steps steps after
--warmup, init, compile and start seconds (the step compiling while the init runs, as in
training; --start sequential for one after the other), GFLOP per step (XLA cost analysis), % of
the mesh's dense bf16 peak (for fp32 runs too), peak and XLA-estimated memory, for each dtype x
distillation variant; --json writes the figures (with the commit, host CPU and compilation cache).
The variants run in one process: the device's peak memory of a variant after the first is the
process's peak so far ("<=" in the table); one variant per call gives each its own (gpu.sh).
Loader: examples/s per core through prepared TFDS shards + grain + augmentation + teacher join.
"""

from __future__ import annotations

import sys

from xdistill_jax import config_defaults

ACCEPTS_EXTRA_ARGS = True

_ON_OFF = {"on": True, "off": False}


def add_arguments(parser):
    parser.add_argument("--config", default=None,
                        help="config file (configs/*.py[:arg]); default: the paper config's fields")
    parser.add_argument("--steps", type=int, default=50, help="timed steps (median over them)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after the first")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma list of float32,bfloat16")
    parser.add_argument("--distill", default="on,off", help="comma list of on,off")
    parser.add_argument("--teacher-stride", type=int, default=4,
                        help="synthetic teacher logits at (H/stride, W/stride); default 4, what "
                             "`xdistill teacher precompute` stores by default (2 until 2026-12-05)")
    parser.add_argument("--state-layout", choices=config_defaults.STATE_LAYOUTS, default="default",
                        help="auto: the train state's device layouts chosen by XLA (on a GPU, "
                             "convolution kernels in cuDNN's filter order); training: "
                             "--config.run.state_layout")
    parser.add_argument("--start", choices=("overlapped", "sequential"), default="overlapped",
                        help="overlapped: the step compiles on a background thread while the init "
                             "runs, as in training; sequential: after the init (A/B)")
    parser.add_argument("--json", default=None, help="write the results here (JSON)")
    parser.add_argument("--profile-dir", default=None,
                        help="trace 5 extra steps per variant with jax.profiler into DIR/<dtype>_distill_<0|1> "
                             "(e.g. DIR/bfloat16_distill_1) and print "
                             "where their device time goes (by named scope, kind of op, top ops)")
    parser.add_argument("--compilation-cache", default=None,
                        help="persistent compile cache dir ('off' to disable); default "
                             "$XDISTILL_COMPILATION_CACHE, $JAX_COMPILATION_CACHE_DIR or "
                             "~/.cache/xdistill_jax/jax_cache")
    g = parser.add_argument_group("loader benchmark (--loader)")
    g.add_argument("--loader", action="store_true", help="benchmark the input pipeline instead")
    g.add_argument("--loader-examples", type=int, default=48)
    g.add_argument("--loader-epochs", type=int, default=2)
    g.add_argument("--loader-threads", type=int, default=0, help="0 = calling thread (per-core figure)")
    g.add_argument("--loader-workers", type=int, default=0,
                   help="grain worker processes, as data.num_workers (-1: one per core less one, at "
                        "most 16); the CPU time counted includes theirs")
    g.add_argument("--loader-format", choices=("png", "jpeg", "raw"), default="png")
    g.add_argument("--loader-all-scales", action="store_true",
                   help="scales 1..3 of all three frames (what loss.v1_multiscale needs); default: "
                        "the target frame's only, what training without it loads")
    g.add_argument("--loader-stored-scales", action="store_true",
                   help="prepare with the target frame's scales stored (prepare --target-scales)")
    g.add_argument("--loader-compression", choices=("zstd", "none"), default="zstd",
                   help="the prepared shards' array_record compression")
    g.add_argument("--loader-no-teacher", action="store_true")
    g.add_argument("--loader-workdir", default=None, help="keep the prepared data here")
    parser.epilog = "Override config fields with --config.FIELD=VALUE (e.g. --config.optim.batch_size=12)."


def _parse_list(text: str, allowed, flag: str):
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if not items or bad:
        raise ValueError(f"{flag}: expected a comma list of {', '.join(allowed)}, got {text!r}")
    return items


def _run_loader(args) -> int:
    from xdistill_jax import loader_benchmark

    if args.extra_args:
        print(f"xdistill bench --loader: config overrides are not used: {' '.join(args.extra_args)}",
              file=sys.stderr)
        return 2
    try:
        result = loader_benchmark.run(
            examples=args.loader_examples, epochs=args.loader_epochs, threads=args.loader_threads,
            workers=args.loader_workers,
            image_format=args.loader_format, teacher=not args.loader_no_teacher, workdir=args.loader_workdir,
            source_scales=args.loader_all_scales, target_scales=args.loader_stored_scales,
            compression=args.loader_compression)
    except ValueError as e:
        print(f"xdistill bench --loader: {e}", file=sys.stderr)
        return 2
    if args.json:
        from xdistill_jax.benchmark import write_json
        write_json(args.json, [result], kind="loader")
    return 0


def run(args) -> int:
    from xdistill_jax import config_utils
    from xdistill_jax.compilation_cache import enable_compilation_cache

    try:
        enable_compilation_cache(args.compilation_cache)
    except ValueError as e:
        print(f"xdistill bench: {e}", file=sys.stderr)
        return 2
    from xdistill_jax.output_dirs import check_output_dir, check_output_file

    try:  # before anything is measured: the results must have a place
        if args.json:
            check_output_file(args.json, "--json")
        if args.profile_dir:
            check_output_dir(args.profile_dir, "--profile-dir")
    except ValueError as e:
        print(f"xdistill bench: {e}", file=sys.stderr)
        return 2
    if args.loader:
        return _run_loader(args)
    try:
        dtypes = _parse_list(args.dtypes, ("float32", "bfloat16"), "--dtypes")
        distill = [_ON_OFF[x] for x in _parse_list(args.distill, tuple(_ON_OFF), "--distill")]
        if args.steps < 1 or args.warmup < 0:
            raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
        if args.teacher_stride < 1:
            raise ValueError(f"--teacher-stride must be >= 1, got {args.teacher_stride}")
        if args.config:
            config = config_utils.load_config_file(args.config)
        else:
            from xdistill_jax.config_defaults import base_config
            config = base_config()
        config = config_utils.apply_overrides(config, args.extra_args)
        from xdistill_jax import train

        # the mesh's devices and the batch's split over them, as every variant will use them
        config_utils.validate(config, num_devices=train.make_mesh(config).size)
        if args.teacher_stride > min(config.data.height, config.data.width):
            raise ValueError(f"--teacher-stride {args.teacher_stride} leaves no teacher pixel at "
                             f"{config.data.height}x{config.data.width}")
    except ValueError as e:  # ConfigError is a ValueError
        print(f"xdistill bench: {e}", file=sys.stderr)
        return 2

    from xdistill_jax import benchmark

    results = []
    for v in benchmark.variants(dtypes, distill):
        r = benchmark.benchmark_step(benchmark.variant_config(config, v), steps=args.steps,
                                     warmup=args.warmup, teacher_stride=args.teacher_stride,
                                     progress=lambda m, v=v: print(f"{v.name}: {m}", flush=True),
                                     profile_dir=(None if not args.profile_dir else
                                                  f"{args.profile_dir}/{v.dtype}_distill_{int(v.distill)}"),
                                     state_layout=args.state_layout, start=args.start)
        results.append(r)
        print(f"{r['variant']}: {r['images_per_s_median']:.1f} images/s (median of {args.steps}), "
              f"init {r['init_s']:.2f} s, compile {r['compile_s']:.2f} s, start {r['cold_start_s']:.2f} s "
              f"({r['start']})", flush=True)
    benchmark.mark_process_peaks(results)  # the device's peak-memory counter is the process's, never reset
    print()
    print(benchmark.markdown_table(results))
    if len(results) > 1 and results[0]["peak_memory_bytes"] is not None:
        print("\npeak mem GB after the first row: the process's peak so far, an upper bound of that "
              "variant's (run one variant per call, as benchmarks/gpu.sh does, for its own)")
    if args.profile_dir:
        from xdistill_jax import profile_summary

        for r in results:
            print(f"\nWhere the time of {r['variant']} goes:\n")
            print(profile_summary.markdown(r["profile"]))
    if args.json:
        path = benchmark.write_json(args.json, results, kind="train_step", config=args.config,
                                    overrides=list(args.extra_args), command=" ".join(sys.argv))
        print(f"\nwrote {path}")
    return 0
