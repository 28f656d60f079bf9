"""Loader throughput: TFDS array_record shards -> grain -> Monodepth2 augmentation -> batches.

    python benchmarks/loader_benchmark.py                       # 640x192, teacher 7x96x320
    python benchmarks/loader_benchmark.py --threads 2 --examples 96

Builds a KITTI-layout tree of textured native-size (1242x375) frames in a scratch directory,
prepares it with `prepare_split` (PNG, 640x192, as training uses), writes a teacher logits store
of random float16 logits with `data_pipelines.teacher.store.write_store` (unless --no-teacher),
then times `make_train_iterator` over whole epochs: decode 3 PNGs, flip, colour jitter, the
LANCZOS scale chain, K per scale, the teacher join and batching. With --threads 0 everything
runs in the calling thread, so the figure is examples/s per core; with N threads it is the
throughput of one process (PIL releases the GIL while decoding and resizing).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import numpy as np


def write_raw_tree(root: pathlib.Path, num_examples: int, height: int, width: int) -> pathlib.Path:
    """One drive of num_examples + 2 textured frames (image_02); returns the split file."""
    from PIL import Image

    date = "2011_09_26"
    drive = f"{date}/{date}_drive_0001_sync"
    folder = root / drive / "image_02" / "data"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([np.sin(x / 13) * np.cos(y / 7), np.cos(x / 29 + y / 17), np.sin((x + y) / 41)], -1)
    for f in range(num_examples + 2):
        # Smooth structure moving with the frame plus pixel noise: PNG sizes like real frames.
        img = 128 + 90 * np.roll(base, 4 * f, axis=1) + rng.normal(0, 8, base.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{f:010d}.png")
    split = root / "bench_files.txt"
    split.write_text("".join(f"{drive} {f} l\n" for f in range(1, num_examples + 1)))
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=48, help="examples in the split")
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--batch", type=int, default=12, help="batch size (Monodepth2: 12)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed")
    parser.add_argument("--threads", type=int, default=0, help="loader threads (0 = this thread)")
    parser.add_argument("--teacher-height", type=int, default=96)
    parser.add_argument("--teacher-width", type=int, default=320)
    parser.add_argument("--groups", type=int, default=7)
    parser.add_argument("--format", choices=("png", "jpeg"), default="png", help="stored encoding")
    parser.add_argument("--no-teacher", action="store_true")
    parser.add_argument("--workdir", default=None, help="keep the data here instead of a temp dir")
    args = parser.parse_args()

    from data_pipelines.kitti import prepare, tfds_builder
    from xdistill_jax import input_pipeline

    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        root = pathlib.Path(args.workdir or tmp)
        raw = root / "raw"
        split = raw / "bench_files.txt"
        t0 = time.perf_counter()
        if not split.is_file():
            split = write_raw_tree(raw, args.examples, 375, 1242)
        data_dir = root / f"tfds_{args.format}"
        prepare.prepare_split(raw, split, data_dir, "train", args.height, args.width,
                              image_format=args.format, num_workers=min(2, os.cpu_count() or 1))
        source = tfds_builder.open_split(data_dir, "train")
        print(f"prepared {len(source)} {args.format} triplets at {args.width}x{args.height} "
              f"in {time.perf_counter() - t0:.1f} s")

        teacher = None
        if not args.no_teacher and (root / "teacher" / "teacher.json").is_file():
            from data_pipelines.teacher import store

            teacher = store.TeacherLogitsSource(root / "teacher")  # from an earlier --workdir run
        elif not args.no_teacher:
            from data_pipelines.teacher import store

            ids = [source[i]["id"].decode() for i in range(len(source))]
            shape = (args.teacher_height, args.teacher_width, args.groups)
            rng = np.random.default_rng(1)
            path = store.write_store(
                root / "teacher", len(ids),
                lambda idx: ([ids[i] for i in idx], rng.normal(0, 3, (len(idx),) + shape)),
                grouping="benchmark", group_names=[f"g{i}" for i in range(args.groups)],
                height=shape[0], width=shape[1], progress=False,
            )
            teacher = store.TeacherLogitsSource(path)
            print(f"teacher store: {len(teacher)} records of {shape} float16")

        it = input_pipeline.make_train_iterator(
            source, global_batch_size=args.batch, seed=0, teacher=teacher,
            num_epochs=args.epochs + 1, num_threads=args.threads,
            process_index=0, process_count=1,
        )
        next(it)  # warm-up: opens shards, first decode
        steps = input_pipeline.steps_per_epoch(len(source), args.batch) * args.epochs - 1
        start = time.perf_counter()
        cpu_start = time.process_time()
        for _ in range(steps):
            batch = next(it)
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
        n = steps * args.batch
        mb = sum(v.nbytes for v in batch.values()) / 2**20
        print(f"batch {args.batch}: {', '.join(f'{k} {v.shape}' for k, v in batch.items())} ({mb:.1f} MiB)")
        print(f"{n} examples in {wall:.2f} s wall, {cpu:.2f} s CPU, threads={args.threads}, "
              f"{os.cpu_count()} CPU cores on this machine")
        print(f"throughput: {n / wall:.1f} examples/s; per core (examples per CPU-second): "
              f"{n / cpu:.1f} examples/s")


if __name__ == "__main__":
    main()
