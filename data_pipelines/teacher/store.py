"""The teacher logits store: grouped teacher logits, one record per example of a triplet split.

Why a separate store joined by example id (not a feature of the triplet TFDS dataset): the
teacher is a choice made after the data is prepared (our Flax checkpoint, an ONNX model, label
files; which grouping, which resolution), and the 40k-example triplet split should not be
rebuilt to change it. Record i belongs to example i of the split it was computed for and
carries that example's id, so the loader can check the join and fail on the first mismatch.

Layout of a store directory::

    teacher.json                          metadata (below); "complete": true only at the end
    logits-00000.array_record ...         shard k holds examples [k*shard_size, (k+1)*shard_size)

Record encoding (little endian): uint32 n, n bytes of the UTF-8 example id, then h*w*G float16
logits in (h,w,G) C order; array_record with group_size 1 (cheap random access) and zstd level 3
(5-10% smaller on logits; reading one record takes well under a millisecond).

Resumable: the writer saves teacher.json with "complete": false first; each shard is written to a
temporary name and renamed when whole, so a shard file that exists is complete and is not
recomputed on resume; the store is marked complete only after the last shard. Resuming with
different settings (grouping, size, split fingerprint, teacher) is an error naming the field.

Size: at most h*w*G*2 bytes of logits + the id + ~2.6 kB of array_record framing per example.
At the default resolution (a quarter of the 640x192 input in each dimension: 160x48) and 7
groups the logits are 107,520 bytes; measured on disk 102,236 bytes per example (noisy logits;
smooth real ones compress better), i.e. at most 4.3 GB (4.07 GB measured) for the 39,810
Eigen-Zhou training examples. Stride 8 (80x24): 26,880 bytes, ~1.1 GB; the ungrouped 19 classes
at stride 4: 291,840 bytes, ~11.6 GB.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from data_pipelines.damaged_store import PASS_THROUGH, damaged

METADATA_FILE = "teacher.json"
FORMAT = "xdistill-teacher-logits"
VERSION = 1


def shard_name(index: int) -> str:
    return f"logits-{index:05d}.array_record"


def encode_record(example_id: str, logits: np.ndarray) -> bytes:
    raw = example_id.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw + np.ascontiguousarray(logits, np.float16).tobytes()


def decode_record(record: bytes, shape: tuple[int, int, int]) -> tuple[str, np.ndarray]:
    (n,) = struct.unpack_from("<I", record, 0)
    example_id = record[4:4 + n].decode("utf-8")
    logits = np.frombuffer(record, np.float16, offset=4 + n).reshape(shape)
    return example_id, logits


def _identity(meta: dict, shard_sizes: Sequence[int] = ()) -> str:
    """A hash of what identifies a store's content, not where it lies or was made from: its
    teacher.json without the paths (`dataset_dir`, the teacher's `backend` spec) and its shards'
    sizes in bytes. Copies of one store on several hosts agree; a store of other settings, split
    or teacher step does not, nor (most likely) one of other logits."""
    import hashlib

    meta = json.loads(json.dumps(meta))
    meta.pop("dataset_dir", None)
    if isinstance(meta.get("teacher"), dict):
        meta["teacher"].pop("backend", None)
    key = {"meta": meta, "shard_sizes": [int(n) for n in shard_sizes]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _absolute_backend(meta: dict) -> dict:
    """`meta` with its teacher's ``KIND:PATH`` spec made absolute (against this process's working
    directory): a store resumed from another folder, or begun with a relative path by an older
    version, names the same teacher the same way."""
    teacher = meta.get("teacher")
    if isinstance(teacher, dict) and isinstance(teacher.get("backend"), str):
        kind, sep, path = teacher["backend"].partition(":")
        if sep and path:
            meta = {**meta, "teacher": {**teacher, "backend": f"{kind}:{os.path.abspath(path)}"}}
    return meta


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def bytes_per_example(height: int, width: int, num_groups: int, id_len: int = 48) -> int:
    """Upper bound of the stored bytes of one record before compression (logits, id, framing)."""
    return height * width * num_groups * 2 + id_len + 4 + 2600


class TeacherLogitsSource:
    """Random-access reader of a complete store (the contracts.md interface).

    ``len(src)``; ``src[i] -> (example_id: str, logits float16 (height, width, num_groups))``;
    attributes ``num_groups``, ``grouping``, ``group_names``, ``height``, ``width``, ``metadata``.
    Picklable (grain worker processes): shard readers open lazily in each process.
    """

    def __init__(self, path):
        self.path = Path(path)
        meta_path = self.path / METADATA_FILE
        if not meta_path.is_file():
            raise ValueError(f"{meta_path}: no teacher logits store here (missing {METADATA_FILE}; "
                             "write one with `xdistill teacher precompute`)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: not a teacher logits store (format {meta.get('format')!r})")
        if not meta.get("complete"):
            raise ValueError(f"{meta_path}: store is incomplete (an interrupted precompute); "
                             "rerun the same `xdistill teacher precompute` command to finish it")
        self.metadata = meta
        self.identity = _identity(meta, [p.stat().st_size for p in sorted(self.path.glob("logits-*.array_record"))])
        self.num_groups = int(meta["num_groups"])
        self.grouping = str(meta["grouping"])
        self.group_names = tuple(meta["group_names"])
        self.height = int(meta["height"])
        self.width = int(meta["width"])
        self.shard_size = int(meta["shard_size"])
        self._len = int(meta["num_examples"])
        self._readers: dict[int, object] = {}

    def __len__(self) -> int:
        return self._len

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = {}
        return state

    def _reader(self, shard: int):
        reader = self._readers.get(shard)
        if reader is None:
            from array_record.python import array_record_module

            file = self.path / shard_name(shard)
            if not file.is_file():
                raise ValueError(f"{file}: shard missing from a store marked complete")
            reader = array_record_module.ArrayRecordReader(str(file), "readahead_buffer_size:0")
            self._readers[shard] = reader
        return reader

    def __getitem__(self, index: int) -> tuple[str, np.ndarray]:
        index = int(index)
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"teacher store {self.path}: index {index} out of range 0..{self._len - 1}")
        shard, offset = divmod(index, self.shard_size)
        try:
            (record,) = self._reader(shard).read([offset])
            return decode_record(record, (self.height, self.width, self.num_groups))
        except PASS_THROUGH:
            raise
        except Exception as e:
            raise damaged(f"teacher store {self.path}: {self.path / shard_name(shard)}, record {offset} "
                          f"(example {index})", e,
                          "run `xdistill teacher precompute` again into a new --out, or copy it anew") from e


class TeacherLogitsWriter:
    """Writes a store shard by shard; see the module docstring for resume semantics.

    Args:
      path: store directory (created).
      num_examples: examples in the split (record i <-> example i).
      grouping / group_names: the grouping name and its G group names.
      height, width: stored logits resolution.
      shard_size: examples per shard.
      fingerprint: identifies the source split (e.g. its split-file hash); a resume must match.
      extra_metadata: JSON-able facts to keep (backend, dataset, split). Its "teacher" entry
        (the backend's description: which teacher, its options, a flax checkpoint's step) must
        match an existing store's, as the keys above: a rerun with another teacher would find a
        complete store and keep the old logits, and a resumed one would mix two teachers.
    """

    def __init__(self, path, num_examples: int, *, grouping: str, group_names: Sequence[str],
                 height: int, width: int, shard_size: int = 1000, fingerprint: str = "",
                 extra_metadata: dict | None = None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.path = Path(path)
        self.num_examples = int(num_examples)
        self.height, self.width = int(height), int(width)
        self.num_groups = len(group_names)
        self.shard_size = int(shard_size)
        n = self.num_examples
        self.num_shards = max(1, -(-n // self.shard_size))
        self.meta = {
            "format": FORMAT, "version": VERSION, "grouping": grouping,
            "group_names": list(group_names), "num_groups": self.num_groups,
            "height": self.height, "width": self.width, "dtype": "float16",
            "num_examples": n, "shard_size": self.shard_size, "num_shards": self.num_shards,
            "fingerprint": fingerprint,
            "bytes_per_example": bytes_per_example(self.height, self.width, self.num_groups),
            "complete": False, **(extra_metadata or {}),
        }
        self.path.mkdir(parents=True, exist_ok=True)
        meta_path = self.path / METADATA_FILE
        if meta_path.is_file():
            old = json.loads(meta_path.read_text())
            new = json.loads(json.dumps(self.meta))  # as stored: tuples are lists there
            old_abs, new_abs = _absolute_backend(old), _absolute_backend(new)
            for key in ("format", "grouping", "num_groups", "height", "width", "num_examples",
                        "shard_size", "fingerprint", "teacher"):
                if old_abs.get(key) != new_abs.get(key):
                    raise ValueError(
                        f"{meta_path}: existing store has {key}={old.get(key)!r}, this run has "
                        f"{self.meta.get(key)!r}; use another --out or delete the old store")
            if old.get("complete"):
                self.meta["complete"] = True
                return
        _write_json_atomic(meta_path, self.meta)

    @property
    def complete(self) -> bool:
        return bool(self.meta["complete"])

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_examples)

    def pending_shards(self) -> list[int]:
        """Shards whose file does not exist yet (a renamed shard file is complete)."""
        if self.complete:
            return []
        return [k for k in range(self.num_shards) if not (self.path / shard_name(k)).is_file()]

    def write_shard(self, shard: int, example_ids: Sequence[str], logits: np.ndarray) -> None:
        """Writes shard `shard` from its n example ids and (n,h,w,G) logits, atomically."""
        from array_record.python import array_record_module

        start, stop = self.shard_range(shard)
        want = (stop - start, self.height, self.width, self.num_groups)
        if tuple(logits.shape) != want:
            raise ValueError(f"shard {shard}: logits shape {tuple(logits.shape)}, expected {want}")
        if len(example_ids) != stop - start:
            raise ValueError(f"shard {shard}: {len(example_ids)} example ids for {stop - start} examples")
        if not np.isfinite(logits).all():
            bad = int(np.argmax(~np.isfinite(logits).reshape(len(logits), -1).all(axis=1)))
            raise ValueError(f"teacher logits of example {example_ids[bad]!r} are not "
                             "finite (after float16 conversion)")
        final = self.path / shard_name(shard)
        tmp = final.with_name(final.name + ".tmp")
        writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1,zstd:3")
        for i in range(stop - start):
            writer.write(encode_record(str(example_ids[i]), logits[i]))
        writer.close()
        os.replace(tmp, final)

    def finalize(self) -> None:
        missing = self.pending_shards()
        if missing:
            raise ValueError(f"{self.path}: cannot mark complete, shards {missing} not written")
        self.meta["complete"] = True
        _write_json_atomic(self.path / METADATA_FILE, self.meta)


def write_store(path, num_examples: int, batch_fn: Callable[[np.ndarray], tuple], *,
                grouping: str, group_names: Sequence[str], height: int, width: int,
                shard_size: int = 1000, batch_size: int = 16, fingerprint: str = "",
                extra_metadata: dict | None = None, progress: bool = True) -> Path:
    """Computes and writes every pending shard, then marks the store complete.

    `batch_fn(indices)` returns ``(example_ids, logits)`` for the examples at those split
    positions: their ids and (len(indices),height,width,G) grouped logits; it is called with at
    most `batch_size` indices. Returns the store path. Safe to rerun after an interruption
    (completed shards are kept, not recomputed).
    """
    writer = TeacherLogitsWriter(path, num_examples, grouping=grouping, group_names=group_names,
                                 height=height, width=width, shard_size=shard_size,
                                 fingerprint=fingerprint, extra_metadata=extra_metadata)
    pending = writer.pending_shards()
    total = sum(writer.shard_range(k)[1] - writer.shard_range(k)[0] for k in pending)
    bar = _progress(total, f"teacher logits -> {path}", progress)
    for shard in pending:
        start, stop = writer.shard_range(shard)
        ids, parts = [], []
        for b in range(start, stop, batch_size):
            idx = np.arange(b, min(b + batch_size, stop))
            batch_ids, out = batch_fn(idx)
            ids.extend(str(i) for i in batch_ids)
            with np.errstate(over="ignore"):  # overflow -> inf, reported by write_shard
                parts.append(np.asarray(out, np.float32).astype(np.float16))
            bar.update(len(idx))
        empty = np.zeros((0, height, width, len(group_names)), np.float16)
        writer.write_shard(shard, ids, np.concatenate(parts) if parts else empty)
    bar.close()
    if not writer.complete:
        writer.finalize()
    return Path(path)


class _progress:
    """A minimal stderr progress bar (tqdm is not a dependency)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        import sys
        import time

        self.total, self.done, self.enabled, self.desc = total, 0, enabled and total > 0, desc
        self._stream, self._time, self._t0 = sys.stderr, time.monotonic, time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        if self.enabled:
            rate = self.done / max(self._time() - self._t0, 1e-9)
            self._stream.write(f"\r{self.desc}: {self.done}/{self.total} ({rate:.1f} ex/s)")
            self._stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._stream.write("\n")
