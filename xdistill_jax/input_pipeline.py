"""Training and evaluation input: grain over the TFDS triplet shards, Monodepth2 augmentation.

    source = data_pipelines.kitti.tfds_builder.open_split("data/tfds", "train")
    it = make_train_iterator(source, global_batch_size=12, seed=0)       # numpy batches
    batches = DevicePrefetchIterator(it, mesh)                           # global jax.Arrays
    state = batches.get_state(); ...; batches.set_state(state)           # resume exactly

Batches (host-local numpy; the contract in the project's contracts):
  color       uint8 (B,3,H,W,3)        frames (-1, 0, +1), scale 0, not colour-augmented
  color_aug   uint8 (B,3,H,W,3)        the same frames colour-jittered (what the networks see)
  color_s1..3 uint8 (B,3,H/2^s,W/2^s,3) scale s made from scale s-1 with PIL LANCZOS;
                                       (B,1,...) frame 0 only with source_scales=False
  K, inv_K    float32 (B,4,4,4)        [:, s] = normalised K, row 0 x W//2^s, row 1 x H//2^s
  index       int32 (B,)               position of the example in its split
  teacher     float16 (B,h,w,G)        only with a teacher store; flipped with the images
Eval batches add `mask` bool (B,): False on the padding of the last batch.

Augmentation: `xdistill_jax.augmentation` (Monodepth2's colour jitter and flip, drawn once
per example from a generator seeded by (seed, epoch, example index), so data order and
augmentation are reproducible and do not depend on the number of hosts or loader threads).
"""

from __future__ import annotations

import atexit
import collections
import copy
import functools
from typing import Any, Iterator, Sequence

import jax
import numpy as np

# The record's keys: frames -1, 0, +1, and frame 0's stored scales 1..3 (prepare target_scales).
from data_pipelines.kitti.triplets import IMAGE_KEYS, TARGET_SCALE_KEYS
# The augmentation's names stay importable from here (tools and tests use them).
from xdistill_jax.augmentation import (  # noqa: F401
    JITTER_OPS,
    NUM_SCALES,
    Augmentation,
    _adjust_hue,
    _adjust_hue_reference,
    _hue_shift,
    _hue_tables,
    _jitter_pil,
    _scale_chain,
    color_jitter,
    example_rng,
    lanczos_half,
    sample_augmentation,
)

_SHUFFLE_TAG = 0x5348  # separates the shuffle seed's stream from the per-example streams


# ------------------------------------------------------------------------- examples


def intrinsics_per_scale(K_norm: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(4,4,4) K and inv_K for scales 0..3 from a normalised K (Monodepth2's per-scale K)."""
    Ks, inv_Ks = [], []
    for s in range(NUM_SCALES):
        K = np.array(K_norm, dtype=np.float32, copy=True)
        K[0, :] *= width // 2**s
        K[1, :] *= height // 2**s
        Ks.append(K)
        inv_Ks.append(np.linalg.pinv(K))  # float32 in, float32 out, as in Monodepth2
    return np.stack(Ks), np.stack(inv_Ks).astype(np.float32)


@functools.lru_cache(maxsize=256)
def _intrinsics_cached(K_bytes: bytes, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    # A split has one K (Monodepth2's) or one per drive (calib): the four pinvs per example
    # were 0.3 ms of the loader's ~10 ms budget. Read-only, so a caller cannot alter the cache.
    K, inv_K = intrinsics_per_scale(np.frombuffer(K_bytes, np.float32).reshape(4, 4), height, width)
    K.flags.writeable = inv_K.flags.writeable = False
    return K, inv_K


def make_example(record: dict[str, Any], aug: Augmentation, teacher_logits=None, *,
                 source_scales: bool = True) -> dict:
    """One training example (the batch contract without the batch axis) from a stored record.

    source_scales=False: `color_s1..3` hold frame 0 only, shape (1,h,w,3) instead of (3,h,w,3).
    That is all a step without `loss.v1_multiscale` reads at scales 1..3 (the edge-aware
    smoothness term of scale s uses the target image at scale s; every photometric term is
    computed at scale 0), and it saves 6 of the 9 LANCZOS halvings per example.
    A record holding `image_0_s1..3` (prepared with target_scales) gives frame 0's chain
    (flipped with the example); it is then not computed.
    """
    from PIL import Image

    # One PIL image per frame feeds the flip, the jitter and the scale chain (PIL's flip is
    # an exact pixel reordering, like numpy's, and ~2.5x cheaper than a reversed-stride copy).
    images = [Image.fromarray(np.asarray(record[k])) for k in IMAGE_KEYS]
    if aug.flip:
        images = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]
    height, width = images[0].height, images[0].width
    color = np.stack([np.asarray(im) for im in images])
    out = {
        "color": color,
        "color_aug": np.stack([np.asarray(_jitter_pil(im, aug)) for im in images]) if aug.jitter else color.copy(),
    }
    stored = None
    if TARGET_SCALE_KEYS[0] in record:  # prepared with target_scales: frame 0's chain is stored
        stored = [np.asarray(record[k]) for k in TARGET_SCALE_KEYS]
        if aug.flip:  # a PIL LANCZOS halving commutes with a horizontal flip (its taps are
            # mirror-symmetric; test_input_pipeline checks it at 640x192), so this is the chain
            # of the flipped frame
            stored = [np.asarray(Image.fromarray(a).transpose(Image.Transpose.FLIP_LEFT_RIGHT)) for a in stored]
    chains = [stored if f == 1 and stored is not None else _scale_chain(images[f])
              for f in ((0, 1, 2) if source_scales else (1,))]
    for s in range(1, NUM_SCALES):
        out[f"color_s{s}"] = np.stack([chain[s - 1] for chain in chains])
    K_norm = np.ascontiguousarray(record["K"], dtype=np.float32)
    if aug.flip:
        # A mirrored image's principal point is mirrored too: cx -> 1 - cx (normalised), which
        # leaves Monodepth2's fixed K (cx 0.5, which it never mirrors) bit for bit and moves a
        # calibrated one (`--intrinsics calib`, KITTI's cx ~0.49: 11.8 px at 640 wide). In 0-based
        # pixels the mirror is W - 1 - cx, 1 px less: the 1 px Monodepth2's unmirrored 0.5 is off
        # by on a flipped image too; 1 - cx keeps the two consistent.
        K_norm = K_norm.copy()
        K_norm[0, 2] = np.float32(1.0) - K_norm[0, 2]
    out["K"], out["inv_K"] = _intrinsics_cached(K_norm.tobytes(), height, width)
    out["index"] = np.int32(record["index"])
    if teacher_logits is not None:
        logits = np.asarray(teacher_logits, np.float16)
        out["teacher"] = np.ascontiguousarray(logits[:, ::-1]) if aug.flip else logits
    return out


# ------------------------------------------------------------------------------- sources


def _as_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _store_path(teacher) -> str:
    """' DIR' for a teacher store that knows its directory (`TeacherLogitsSource.path`), else ''."""
    path = getattr(teacher, "path", None)
    return f" {path}" if path is not None else ""


class TripletSource:
    """Random access to stored triplets joined with an optional teacher logits store.

    `source` is a prepared split (`tfds_builder.open_split`): record i is split line i.
    `teacher` is any object with `__len__` and `__getitem__(i) -> (id, logits (h,w,G))`
    whose record i belongs to split line i; `self[i]` checks the ids agree and raises a
    ValueError naming the first mismatch it meets (and the store's directory, where the teacher
    has a `path`: a `TeacherLogitsSource`). Training checks the record count before it starts
    (`training_loop.tfds_training_data`); the count check here is for other callers.
    """

    def __init__(self, source, teacher=None):
        self.source = source
        self.teacher = teacher
        if teacher is not None and len(teacher) != len(source):
            raise ValueError(
                f"teacher store{_store_path(teacher)} has {len(teacher)} records but the triplet "
                f"split has {len(source)} examples; it was computed for another split"
            )

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[dict[str, Any], Any]:
        record = self.source[i]
        if self.teacher is None:
            return record, None
        teacher_id, logits = self.teacher[int(record["index"])]
        example_id = _as_str(record["id"])
        if _as_str(teacher_id) != example_id:
            raise ValueError(
                f"teacher store{_store_path(self.teacher)} record {int(record['index'])} has id "
                f"{_as_str(teacher_id)!r} but triplet example {int(record['index'])} is "
                f"{example_id!r}: the store belongs to another split or order"
            )
        return record, logits


def _host_slice(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    p = jax.process_index() if process_index is None else int(process_index)
    n = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= p < n:
        raise ValueError(f"process_index {p} is not in [0, {n})")
    return p, n


def _per_host_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of the "
            f"{process_count} processes"
        )
    return global_batch_size // process_count


# -------------------------------------------------------------------------------- training


def make_train_dataset(
    source,
    *,
    global_batch_size: int,
    seed: int,
    teacher=None,
    augment: bool = True,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    source_scales: bool = True,
):
    """grain `MapDataset` of host-local training batches.

    Each epoch is a new permutation of the whole split (seeded by `seed` and the epoch), cut
    into global batches of `global_batch_size`, the last partial one dropped (Monodepth2's
    shuffle with drop_last: a different remainder left out each epoch); host p takes the p-th
    `global_batch_size / process_count` examples of every global batch, so which examples
    share a batch, and which are left out, changes from epoch to epoch whatever the number of
    hosts. Every host reads the whole split (the data is at the same path on every host) and
    loads only its own examples. On one host the batches are those of the releases before
    2026-12-07; on several they were not: each host took every `process_count`-th example once
    for all (examples 2k and 2k+1 shared a global batch in every epoch on two hosts, and the
    split's last `len % process_count` examples were never trained on). `num_epochs=None`
    repeats forever. `source_scales=False` leaves frames -1 and +1 out of `color_s1..3` (see
    `make_example`: what a step without loss.v1_multiscale needs).
    """
    import grain

    p, n_proc = _host_slice(process_index, process_count)
    batch = _per_host_batch(global_batch_size, n_proc)
    triplets = TripletSource(source, teacher)
    steps = steps_per_epoch(len(triplets), global_batch_size, n_proc)
    if steps < 1:
        raise ValueError(
            f"split has {len(triplets)} examples: fewer than one global batch of {global_batch_size}"
            + (f" ({batch} per host on {n_proc} hosts)" if n_proc > 1 else "")
        )
    shuffle_seed = int(np.random.SeedSequence([int(seed), _SHUFFLE_TAG]).generate_state(1)[0])
    # permutation[e * N + g] = the split index at position g of epoch e's permutation (grain
    # re-seeds its shuffle each epoch: seed + epoch), read lazily.
    permutation = grain.MapDataset.range(len(triplets)).shuffle(seed=shuffle_seed)
    per_epoch = steps * batch  # this host's examples per epoch

    def load(position: int, _) -> dict:
        epoch, j = divmod(position, per_epoch)
        step, k = divmod(j, batch)
        g = step * global_batch_size + p * batch + k  # position in the epoch's global order
        record, logits = triplets[int(permutation[epoch * len(triplets) + g]) % len(triplets)]
        if augment:
            aug = sample_augmentation(example_rng(seed, epoch, int(record["index"])))
        else:
            aug = Augmentation()
        return make_example(record, aug, logits, source_scales=source_scales)

    ds = grain.MapDataset.range(per_epoch).repeat(num_epochs).map_with_index(load)
    return ds.batch(batch, drop_remainder=True)


def make_train_iterator(
    source,
    *,
    global_batch_size: int,
    seed: int,
    teacher=None,
    augment: bool = True,
    num_epochs: int | None = None,
    num_threads: int | None = None,
    num_workers: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    source_scales: bool = True,
):
    """Checkpointable iterator of host-local numpy batches (a `PositionedIterator`).

    `it.get_state()` is a small JSON-able dict; `it.set_state(state)` on a fresh iterator of
    the same pipeline resumes with exactly the batches an unbroken iterator would give, whatever
    the threads and worker processes of either (the state is the position in the batch
    sequence). `num_threads` batches are prepared concurrently in this process (PIL releases the
    GIL while decoding and resizing), or in each of `num_workers > 0` grain worker processes;
    None: 2 in this process, 1 in each worker process (the workers are the parallelism, one per
    core under `num_workers=-1`).
    """
    import grain

    ds = make_train_dataset(
        source,
        global_batch_size=global_batch_size,
        seed=seed,
        teacher=teacher,
        augment=augment,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        source_scales=source_scales,
    )
    if num_threads is None:
        num_threads = 1 if num_workers > 0 else 2
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(1, 2 * num_threads))
    return PositionedIterator(ds, read, num_workers)


def _next_index(state: dict) -> int:
    """The position a loader state resumes at. Besides this module's {"next_index": k} (also
    what grain's own single-process iterator saved, as checkpoints before 2026-12-05 hold), reads
    the state grain's worker processes saved then: the workers take the batches in turn, so
    the position is the sum of theirs."""
    if isinstance(state, dict) and isinstance(state.get("next_index"), int) and state["next_index"] >= 0:
        return state["next_index"]
    try:
        workers = [int(w["next_index"]) for w in state["iterators_in_use_states"]]
        if int(state["next_index_in_cycle"]) == sum(workers) % len(workers):
            return sum(workers)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        pass
    raise ValueError(f"loader state {str(state)[:200]!r} is not a position in the batch sequence "
                     "({'next_index': k}) nor grain's worker-process state")


class PositionedIterator:
    """Batches of a grain `MapDataset` from a position on, in this process's threads or in grain
    worker processes. Its state is that position, {"next_index": k}, so a run saved with one
    number of workers resumes with another (grain's own multi-process state is per worker and
    does not restore into another worker count). The grain iterator starts at the first
    `next()` after construction or `set_state`."""

    def __init__(self, ds, read_options, num_workers: int = 0):
        self._ds, self._read, self._workers = ds, read_options, int(num_workers)
        self._next, self._it = 0, None

    def _open(self):
        import grain

        iter_ds = self._ds[self._next:].to_iter_dataset(self._read)
        if self._workers > 0:
            from absl import flags

            # grain's worker processes read absl flags (defaults are fine); outside an absl app
            # nothing has parsed them, and reading them would raise UnparsedFlagAccessError.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
            # closed at the interpreter's exit at the latest, while the modules grain's clean-up
            # needs are still there (not closed, the batches its workers made ahead are freed
            # during the teardown: tracebacks, and resource_tracker's "leaked shared_memory")
            atexit.register(self.close)
        self._it = iter(iter_ds)

    def __iter__(self) -> "PositionedIterator":
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._open()
        batch = next(self._it)
        self._next += 1
        return batch

    def get_state(self) -> dict:
        return {"next_index": self._next}

    def set_state(self, state: dict) -> None:
        position = _next_index(state)
        self.close()
        self._next = position

    def close(self) -> None:
        """Stops the grain iterator (its threads and worker processes); `next()` restarts it."""
        atexit.unregister(self.close)
        if self._it is not None:
            close = getattr(self._it, "close", None)
            self._it = None
            if close is not None:
                close()


AUTO_MAX_WORKERS = 16  # `num_workers=-1`: at most this many worker processes
CGROUP_ROOT = "/sys/fs/cgroup"  # where a container sees its own cgroup (cgroup namespaces)


def cgroup_cpu_limit() -> float | None:
    """The CPUs this process's cgroup may use, its CFS quota over its period (a container's CPU
    limit, e.g. a Kubernetes pod's), from cgroup v2's `cpu.max` or v1's `cpu/cpu.cfs_quota_us`
    and `cpu.cfs_period_us` under CGROUP_ROOT; None where there is no limit or no such file. The
    CPUs a process may be scheduled on (its affinity) can be many more than its quota: a pod
    limited to 8 CPUs on a 96-core node sees 96."""
    import pathlib

    base = pathlib.Path(CGROUP_ROOT)
    try:
        fields = (base / "cpu.max").read_text().split()  # "QUOTA PERIOD" or "max PERIOD"
        if fields[0] == "max":
            return None
        quota, period = int(fields[0]), int(fields[1])
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((base / "cpu" / "cpu.cfs_quota_us").read_text())  # -1: no limit
        period = int((base / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cores() -> int:
    """The CPU cores this process may use: its affinity, or its container's CPU quota where that
    is fewer (`cgroup_cpu_limit`, whole CPUs of it, at least 1)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return cores if limit is None else min(cores, max(1, int(limit)))


def resolve_num_workers(num_workers: int) -> int:
    """`config.data.num_workers` as a count of grain worker processes: n >= 0 as given; -1
    ("auto") one per CPU core this process may run on (its affinity, or its container's CPU
    quota where that is fewer: `cgroup_cpu_limit`) less one for the training loop, at most
    AUTO_MAX_WORKERS, and 0 (this process's two threads) where that is fewer than
    two. Measured on the project's 2-core VM (raw store, 640x192): this process's threads
    185-192 examples/s, one worker 166-172, two workers 183-188. A GPU step of ~700 images/s
    needs ~7 cores at the fastest store's ~100 examples per CPU-second (benchmarks/RESULTS.md),
    which one process's threads cannot give."""
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < -1:
        raise ValueError(f"num_workers must be an integer >= -1 (-1: auto), got {num_workers!r}")
    if num_workers >= 0:
        return num_workers
    workers = min(available_cores() - 1, AUTO_MAX_WORKERS)
    return workers if workers >= 2 else 0


def steps_per_epoch(num_examples: int, global_batch_size: int, process_count: int = 1) -> int:
    """Training steps in one epoch of `make_train_dataset` (all hosts run the same number)."""
    _per_host_batch(global_batch_size, process_count)  # checks the batch divides over the hosts
    return num_examples // global_batch_size


# ------------------------------------------------------------------------------ evaluation


class _EvalSource:
    """Host-local positions of the padded, in-order evaluation stream (see make_eval_dataset)."""

    def __init__(self, triplets: TripletSource, batch: int, p: int, n_proc: int, source_scales: bool):
        self.triplets, self.batch, self.p, self.n_proc = triplets, batch, p, n_proc
        self.source_scales = source_scales
        global_batch = batch * n_proc
        self.num_batches = -(-len(triplets) // global_batch)

    def __len__(self) -> int:
        return self.num_batches * self.batch

    def __getitem__(self, j: int) -> dict:
        b, k = divmod(j, self.batch)
        # Global batch b holds examples [b*GB, (b+1)*GB); host p holds its p-th slice, so the
        # global array assembled from the hosts' slices lists the examples in split order.
        i = (b * self.n_proc + self.p) * self.batch + k
        valid = i < len(self.triplets)
        record, logits = self.triplets[i if valid else 0]
        example = make_example(record, Augmentation(), logits, source_scales=self.source_scales)
        if not valid:
            example = {key: np.zeros_like(v) for key, v in example.items()}
            example["index"] = np.int32(-1)
        example["mask"] = np.bool_(valid)
        return example


def make_eval_dataset(
    source,
    *,
    global_batch_size: int,
    teacher=None,
    process_index: int | None = None,
    process_count: int | None = None,
    source_scales: bool = True,
):
    """grain `MapDataset` of host-local eval batches: every example exactly once, in order.

    No augmentation. The last global batch is padded with zero examples whose `mask` is False
    and `index` is -1 (big_vision's make_for_inference), so metrics count each example once.
    """
    import grain

    p, n_proc = _host_slice(process_index, process_count)
    batch = _per_host_batch(global_batch_size, n_proc)
    return grain.MapDataset.source(
        _EvalSource(TripletSource(source, teacher), batch, p, n_proc, source_scales)
    ).batch(batch, drop_remainder=True)


def make_eval_iterator(source, *, global_batch_size: int, teacher=None, num_threads: int = 2,
                       process_index: int | None = None, process_count: int | None = None,
                       source_scales: bool = True):
    """Iterator over `make_eval_dataset`'s batches (one pass)."""
    import grain

    ds = make_eval_dataset(source, global_batch_size=global_batch_size, teacher=teacher,
                           process_index=process_index, process_count=process_count,
                           source_scales=source_scales)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(1, 2 * num_threads))
    return iter(ds.to_iter_dataset(read))


# ----------------------------------------------------------------------- device placement


def to_global_arrays(batch: dict[str, np.ndarray], mesh, axis: str = "data") -> dict[str, jax.Array]:
    """Host-local numpy batch -> global `jax.Array`s sharded on `axis` of `mesh` (dim 0).

    Each process passes its own slice; the global batch is the processes' slices in process
    order (`jax.make_array_from_process_local_data`).
    """
    from jax.sharding import NamedSharding, PartitionSpec as P

    sharding = NamedSharding(mesh, P(axis))
    local_devices = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
    # On the CPU a device array aliases the numpy memory it is made from, and jax keeps that
    # alive past the array: a batch of grain's shared-memory arrays (worker processes) would
    # outlive the loader and be freed in the interpreter's teardown (a traceback per array and
    # resource_tracker's "leaked shared_memory"). Copied out of it there; a GPU or TPU copies
    # to its own memory anyway.
    copy_out = mesh.devices.flat[0].platform == "cpu"
    local = {}
    for key, value in batch.items():
        if value.shape[0] % max(local_devices, 1):
            raise ValueError(
                f"batch[{key!r}] has {value.shape[0]} examples on this host, not divisible by "
                f"its {local_devices} devices of mesh axis {axis!r}"
            )
        if copy_out and type(value) is not np.ndarray and isinstance(value, np.ndarray):
            value = np.array(value)
        local[key] = value
    # An explicit placement, also inside the training loop's jax.transfer_guard("disallow"):
    # with several processes jax makes the arrays through make_array_from_callback, whose
    # transfers the guard takes for implicit ones (on one process it is a device_put).
    with jax.transfer_guard_host_to_device("allow"):
        return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in local.items()}


class DevicePrefetchIterator:
    """Places host batches on the mesh `size` batches ahead, keeping the iterator checkpointable.

    `get_state()` is the host iterator's state *before* the next batch this iterator will
    return (not before the ones already prefetched), so saving it and calling `set_state`
    later resumes at exactly the next batch.
    """

    def __init__(self, host_iterator, mesh, size: int = 2, axis: str = "data"):
        self._it, self._mesh, self._size, self._axis = host_iterator, mesh, size, axis
        self._queue: collections.deque = collections.deque()

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self

    def _fill(self, size: int | None = None) -> None:
        while len(self._queue) < (self._size if size is None else size):
            state = copy.deepcopy(self._it.get_state())
            try:
                batch = next(self._it)
            except StopIteration:
                return
            self._queue.append((state, to_global_arrays(batch, self._mesh, self._axis)))

    def __next__(self) -> dict[str, jax.Array]:
        self._fill()
        if not self._queue:
            raise StopIteration
        _, batch = self._queue.popleft()
        self._fill()  # start the transfers of the next batches before the caller computes
        return batch

    def peek(self) -> dict[str, jax.Array] | None:
        """The batch the next `next()` returns, without taking it (None when there is none):
        its shapes are what the train step compiles for (`background_compile`)."""
        self._fill(1)
        return self._queue[0][1] if self._queue else None

    def get_state(self) -> dict:
        if self._queue:
            return copy.deepcopy(self._queue[0][0])
        return copy.deepcopy(self._it.get_state())

    def set_state(self, state: dict) -> None:
        self._queue.clear()
        self._it.set_state(copy.deepcopy(state))

    def close(self) -> None:
        """Drops the batches placed ahead and closes the host iterator where it can be (grain's
        worker processes, and the shared memory of the batches they made ahead: left to the
        interpreter's exit, they end it with tracebacks and a resource_tracker warning)."""
        self._queue.clear()
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def stack_examples(examples: Sequence[dict]) -> dict[str, np.ndarray]:
    """Stacks examples into a batch (what grain's batch does), for tools and tests."""
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
