"""Loader throughput: TFDS array_record shards -> grain -> Monodepth2 augmentation -> batches.

`run()` builds a KITTI-layout tree of textured native-size (1242x375) frames in a scratch
directory, prepares it with `prepare_split` (PNG or JPEG at the training size), writes a teacher
logits store of random float16 logits with `data_pipelines.teacher.store.write_store` (unless
teacher=False), then times `make_train_iterator` over whole epochs: decode 3 images, flip,
colour jitter, the LANCZOS scale chain (of all three frames, or with source_scales=False
of frame 0 only), K per scale, the teacher join and batching. With
threads=0 everything runs in the calling thread, so the figure is examples/s per core; with N
threads it is the throughput of one process (PIL releases the GIL while decoding and resizing);
with worker processes (workers=N, or -1 as `data.num_workers`) the throughput of the training
loop's loader, and the CPU time counted includes the workers'.

Used by `benchmarks/loader_benchmark.py` and `xdistill bench --loader`. Needs TFDS, grain and
PIL (imported here, not by the train-step benchmark).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import time

import numpy as np


def write_raw_tree(root: pathlib.Path, num_examples: int, height: int, width: int) -> pathlib.Path:
    """One drive of num_examples + 2 textured frames (image_02); returns the split file, written
    last: a tree without it (a run interrupted while writing frames) is written again."""
    from PIL import Image

    date = "2011_09_26"
    drive = f"{date}/{date}_drive_0001_sync"
    folder = root / drive / "image_02" / "data"
    folder.mkdir(parents=True, exist_ok=True)
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


def prepare_data(root: pathlib.Path, *, examples: int = 48, height: int = 192, width: int = 640,
                 teacher_height: int | None = None, teacher_width: int | None = None, groups: int = 7,
                 image_format: str = "png", teacher: bool = True, target_scales: bool = False,
                 compression: str = "zstd", prepare_workers: int | None = None,
                 grouping: str | None = None, say=print) -> dict:
    """The benchmark's data under `root` (reused where already there): a raw tree of
    `examples` triplets, their TFDS store and a teacher logits store of random float16 logits
    (`groups` groups named "benchmark", or a grouping of `xdistill_jax.semantics` by name, as
    training checks). Returns {"source", "data_dir", "teacher" (a TeacherLogitsSource or None),
    "teacher_dir"}."""
    from data_pipelines.kitti import prepare, tfds_builder

    raw = root / "raw"
    split = raw / "bench_files.txt"
    t0 = time.perf_counter()
    if not split.is_file():
        split = write_raw_tree(raw, examples, 375, 1242)
    else:
        have = len(split.read_text().splitlines())
        if have != examples:  # the timing would cover the examples there, not those asked for
            raise ValueError(f"{root} holds the benchmark data of {have} examples ({split}), not the "
                             f"{examples} asked for: ask for {have}, or give another folder (or remove this one)")
    data_dir = root / (f"tfds_{image_format}{'_scales' if target_scales else ''}"
                       f"{'' if compression == 'zstd' else '_' + compression}_{width}x{height}")
    workers = min(2, os.cpu_count() or 1) if prepare_workers is None else prepare_workers
    prepare.prepare_split(raw, split, data_dir, "train", height, width, image_format=image_format,
                          num_workers=workers, target_scales=target_scales, compression=compression)
    source = tfds_builder.open_split(data_dir, "train")
    say(f"prepared {len(source)} {image_format} triplets ({compression}) at {width}x{height} "
        f"in {time.perf_counter() - t0:.1f} s")

    store_obj = path = None
    if teacher:
        from data_pipelines.teacher import store

        names = [f"g{i}" for i in range(groups)]
        if grouping is not None:
            from xdistill_jax import semantics

            named = semantics.get_grouping(grouping)
            grouping, names, groups = named.name, list(named.group_names), len(named.group_names)
        teacher_height = height // 4 if teacher_height is None else teacher_height
        teacher_width = width // 4 if teacher_width is None else teacher_width
        shape = (teacher_height, teacher_width, groups)
        path = root / f"teacher_{grouping or 'benchmark'}_{teacher_width}x{teacher_height}x{groups}"
        if not (path / "teacher.json").is_file():
            ids = [source[i]["id"].decode() for i in range(len(source))]
            rng = np.random.default_rng(1)
            store.write_store(
                path, len(ids),
                lambda idx: ([ids[i] for i in idx], rng.normal(0, 3, (len(idx),) + shape)),
                grouping=grouping or "benchmark", group_names=names,
                height=shape[0], width=shape[1], progress=False,
            )
        store_obj = store.TeacherLogitsSource(path)
        say(f"teacher store: {len(store_obj)} records of {shape} float16")
    return {"source": source, "data_dir": data_dir, "teacher": store_obj, "teacher_dir": path}


def _children_cpu_s() -> float:
    """CPU seconds of this process's live child processes (grain's workers), user + system."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run(*, examples: int = 48, height: int = 192, width: int = 640, batch: int = 12, epochs: int = 2,
        threads: int | None = 0, workers: int = 0, teacher_height: int | None = None,
        teacher_width: int | None = None, groups: int = 7,
        image_format: str = "png", teacher: bool = True, workdir: str | None = None,
        verbose: bool = True, profile: str | None = None, source_scales: bool = True,
        target_scales: bool = False, compression: str = "zstd", grouping: str | None = None) -> dict:
    """Prepare (or reuse, in `workdir`) the benchmark data and time the loader; returns figures.

    threads: loader threads per process (None: `make_train_iterator`'s default, 2 in this
      process and 1 per worker process).
    workers: grain worker processes (`data.num_workers`: -1 = one per core less one, at most
      16). The CPU time counted is this process's and its workers', so examples per
      CPU-second stays the per-core figure.
    teacher_height / teacher_width: the teacher logits' size; default a quarter of the image's,
      what `xdistill teacher precompute` stores by default (--stride 4: 48x160 at 640x192; until
      2026-12-05 this benchmark read 96x320 logits, 4x the bytes).
    image_format: stored encoding, "png", "jpeg" or "raw" (see data_pipelines.kitti.triplets).
    source_scales: False = scales 1..3 of frame 0 only (what a step without
      loss.v1_multiscale reads; `input_pipeline.make_example`).
    target_scales: prepare with frame 0's scales 1..3 stored (png/raw), read instead of computed.
    compression: the shards' array_record compression, "zstd" or "none" (prepare_split).
    grouping: the teacher store's grouping by name (`prepare_data`; default `groups` random ones).
    profile: write a cProfile of the timed loop (only) to this path.
    """
    from xdistill_jax import input_pipeline

    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ValueError(f"examples must be an integer >= 1, got {examples!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    timed = input_pipeline.steps_per_epoch(examples, batch) * epochs - 1  # the first batch warms up
    if timed < 1:
        raise ValueError(f"{examples} examples x {epochs} epochs at batch {batch} give "
                         f"{timed + 1} batch(es): the first warms up, none would be timed; "
                         "give more examples or epochs")
    say = print if verbose else (lambda *a, **k: None)
    num_workers = input_pipeline.resolve_num_workers(workers)
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        data = prepare_data(pathlib.Path(workdir or tmp), examples=examples, height=height, width=width,
                            teacher_height=teacher_height, teacher_width=teacher_width, groups=groups,
                            image_format=image_format, teacher=teacher, target_scales=target_scales,
                            compression=compression, grouping=grouping, say=say)
        source = data["source"]
        it = input_pipeline.make_train_iterator(
            source, global_batch_size=batch, seed=0, teacher=data["teacher"],
            num_epochs=epochs + 1, num_threads=threads, num_workers=num_workers, process_index=0,
            process_count=1, source_scales=source_scales,
        )
        def cpu_now() -> float:  # this process's CPU time and its worker processes'
            return time.process_time() + (_children_cpu_s() if num_workers else 0.0)

        try:
            next(it)  # warm-up: opens shards, first decode, starts the worker processes
            steps = input_pipeline.steps_per_epoch(len(source), batch) * epochs - 1
            if steps < 1:  # a reused workdir's split of fewer examples
                raise ValueError(f"the prepared split holds {len(source)} examples: at batch {batch} x {epochs} "
                                 "epochs no batch would be timed after the warm-up")
            profiler = None
            if profile:
                import cProfile
                profiler = cProfile.Profile()
                profiler.enable()
            start = time.perf_counter()
            cpu_start = cpu_now()
            for _ in range(steps):
                out = next(it)
            wall = time.perf_counter() - start
            cpu = cpu_now() - cpu_start
        finally:
            it.close()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        n = steps * batch
        mb = sum(v.nbytes for v in out.values()) / 2**20
        say(f"batch {batch}: {', '.join(f'{k} {v.shape}' for k, v in out.items())} ({mb:.1f} MiB)")
        say(f"{n} examples in {wall:.2f} s wall, {cpu:.2f} s CPU, threads={threads}, "
            f"worker processes={num_workers}, {os.cpu_count()} CPU cores on this machine")
        say(f"throughput: {n / wall:.1f} examples/s; per core (examples per CPU-second): {n / cpu:.1f} examples/s")
        return {"format": image_format, "height": height, "width": width, "batch": batch,
                "threads": threads, "workers": num_workers, "teacher": teacher,
                "source_scales": source_scales, "target_scales": target_scales,
                "compression": compression, "examples_timed": n, "wall_s": wall, "cpu_s": cpu,
                "examples_per_s": n / wall, "examples_per_cpu_s": n / cpu}
