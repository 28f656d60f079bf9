"""`xdistill demo [--workdir W] [--quick]`: the whole pipeline on a synthetic world, X-Distill vs
Monodepth2. Targets: <= 15 minutes (--quick: <= 3) on an idle 2-core CPU; the measured times
are in `xdistill_jax.demo`'s docstring and the README. Re-running resumes.

See `xdistill_jax.demo` for the stages and what each writes under W.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="xdistill_demo",
                        help="output folder (world, datasets, runs, report.md); default ./xdistill_demo")
    parser.add_argument("--quick", action="store_true", help="the small version (fewer frames, teacher and training steps)")
    parser.add_argument("--compilation-cache", default=None,
                        help="persistent XLA compilation cache dir ('off' to disable); default: "
                             "$XDISTILL_COMPILATION_CACHE, $JAX_COMPILATION_CACHE_DIR or "
                             "~/.cache/xdistill_jax/jax_cache")


def run(args) -> int:
    import logging

    from xdistill_jax import log_setup

    log_setup.configure(logging.WARNING, "%(levelname)s %(name)s: %(message)s")
    try:
        from xdistill_jax.compilation_cache import enable_compilation_cache
    except ImportError:  # the cache module is optional
        enable_compilation_cache = None
    try:
        if enable_compilation_cache is not None:
            enable_compilation_cache(args.compilation_cache)
        from xdistill_jax.demo import DemoStopped, run_demo

        try:
            run_demo(args.workdir, quick=args.quick, printer=lambda s: print(s, flush=True))
        except DemoStopped as e:  # exit 75, as `xdistill train` stopped by a signal
            print(f"xdistill demo: stopped ({e}); the finished stages and the runs' checkpoints are kept: "
                  "rerun the same command to continue", file=sys.stderr)
            return 75
    except ValueError as e:  # bad input (e.g. a workdir of another demo size): exit 2, as the other verbs
        print(f"xdistill demo: error: {e}", file=sys.stderr)
        return 2
    return 0
