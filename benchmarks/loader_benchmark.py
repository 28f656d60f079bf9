"""Loader throughput: TFDS array_record shards -> grain -> Monodepth2 augmentation -> batches.

    python benchmarks/loader_benchmark.py                       # 640x192, teacher 7x48x160
    python benchmarks/loader_benchmark.py --threads 2 --examples 96 --format jpeg
    python benchmarks/loader_benchmark.py --format raw --compression none --target-scales-only --stored-scales  # fastest
    python benchmarks/loader_benchmark.py ... --workers -1   # as training loads: a worker per core less one

The work of `xdistill bench --loader` (`xdistill_jax.loader_benchmark.run`; see its docstring
for what is timed), with one default the other way round: this script makes scales 1..3 of all
three frames (what `loss.v1_multiscale` reads) unless --target-scales-only, the CLI those of
frame 0 alone (what training loads) unless --loader-all-scales. With --threads 0 the figure is
examples/s per core.
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=48, help="examples in the split")
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--batch", type=int, default=12, help="batch size (Monodepth2: 12)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed")
    parser.add_argument("--threads", type=int, default=0, help="loader threads (0 = this thread)")
    parser.add_argument("--workers", type=int, default=0,
                        help="grain worker processes (-1: one per core less one, at most 16; each runs "
                             "--threads threads); the CPU time counted includes theirs")
    parser.add_argument("--teacher-height", type=int, default=None,
                        help="teacher logits height (default: height / 4, the store's default)")
    parser.add_argument("--teacher-width", type=int, default=None, help="default: width / 4")
    parser.add_argument("--groups", type=int, default=7)
    parser.add_argument("--format", choices=("png", "jpeg", "raw"), default="png", help="stored encoding")
    parser.add_argument("--compression", choices=("zstd", "none"), default="zstd",
                        help="the shards' array_record compression (xdistill prepare --compression)")
    parser.add_argument("--no-teacher", action="store_true")
    parser.add_argument("--target-scales-only", action="store_true",
                        help="scales 1..3 of frame 0 only (what a step without loss.v1_multiscale reads)")
    parser.add_argument("--stored-scales", action="store_true",
                        help="prepare with frame 0's scales 1..3 stored (png/raw): read, not computed")
    parser.add_argument("--workdir", default=None, help="keep the data here instead of a temp dir")
    parser.add_argument("--profile", default=None, help="write a cProfile of the timed loop (only) here")
    args = parser.parse_args()

    from xdistill_jax import loader_benchmark

    kwargs = dict(examples=args.examples, height=args.height, width=args.width, batch=args.batch,
                  epochs=args.epochs, threads=args.threads, workers=args.workers, teacher_height=args.teacher_height,
                  teacher_width=args.teacher_width, groups=args.groups, image_format=args.format,
                  teacher=not args.no_teacher, workdir=args.workdir, profile=args.profile,
                  source_scales=not args.target_scales_only, target_scales=args.stored_scales,
                  compression=args.compression)
    loader_benchmark.run(**kwargs)


if __name__ == "__main__":
    main()
