"""TFDS builder for KITTI triplets, stored as array_record shards, and its reader.

No TensorFlow is needed to write or read these datasets. What TFDS 4.9 does without TF
(checked in its sources and by `tests/test_prepare.py`):
- `tfds.features.Image` stores given *encoded bytes* (or a PIL image, or a file path) as they
  are; only numpy image arrays need TF (`tf.image.encode_png`). So `triplets.make_example`
  encodes with PIL and the builder yields bytes.
- `tfds.features.Tensor` (float32 K, shape (4,4)), `Scalar` (int64 index) and `Text` (id)
  serialise with numpy and TFDS's own copy of the tf.Example protos.
- Format "raw" stores each image as `tfds.features.Tensor(uint8, encoding="bytes")`: its
  bytes as one bytes_list entry (no encoding=NONE: that would write an int64 varint per
  pixel), read back with `np.frombuffer` (a read-only view, no decode).
- Reading: `builder.as_data_source(split)` (or `tfds.data_source`) returns a random-access
  `ArrayRecordDataSource`; it decodes images with PIL (OpenCV when installed) into uint8
  (H,W,3) arrays, K into float32 (4,4), index into an int, and Text into *bytes*.
- TFDS sorts the examples by key when `disable_shuffling=True`, so record i of a split is
  split line i (the teacher logits store relies on that). Without it TFDS would store them
  in hashed-key order.
- TFDS 4.9 writes array_record shards with fixed options ("group_size:1": zstd level 3);
  `tfds_writer_hooks` makes it write them uncompressed instead (settings.compression
  "none"), and `shard_compressions` reads back what each shard holds.
- TFDS 4.9 keeps the serialized records in memory up to 1 GB, then spills them through
  `tf.io.gfile` (TensorFlow); `tfds_writer_hooks` also replaces that with `record_spill`'s
  file on the output's disk, so a split of any size is written without TF or its size in RAM.
- TFDS writes into `incomplete.*` and renames the version directory at the end; a failure
  removes the temporary directory. So a half-built dataset never looks complete.

Layout: `OUT/kitti_triplets/<split>/1.0.0/` (one builder config per split name, so train and
val are prepared independently into the same OUT), holding
`kitti_triplets-<split>.array_record-0000X-of-0000N`, `dataset_info.json`, `features.json`
and `metadata.json` (the storage settings and the split file's SHA-256).
"""

from __future__ import annotations

import collections.abc
import contextlib
import multiprocessing
import operator
import os
import pathlib
import threading
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.damaged_store import PASS_THROUGH, damaged
from data_pipelines.kitti import triplets

DATASET_NAME = "kitti_triplets"
VERSION = "1.0.0"


def dataset_dir(out_dir: str | pathlib.Path, split_name: str) -> pathlib.Path:
    """Directory of a prepared split: OUT/kitti_triplets/<split>/1.0.0."""
    return pathlib.Path(out_dir) / DATASET_NAME / split_name / VERSION


def _make_example_job(job: tuple) -> tuple[int, dict[str, Any]]:
    raw_dir, line, index, settings, where = job
    return index, triplets.make_example(raw_dir, line, index, settings, where)


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """A DatasetInfo that never looks for pre-computed metadata in TFDS's GCS bucket.

    TFDS's builder constructor calls `initialize_from_bucket` for a dataset not yet prepared;
    with GCS access off (TFDS's default) that finds nothing but first makes an empty
    /tmp/tmp*tfds directory it never removes: one left behind per `xdistill prepare` (TFDS
    4.9.10). A split prepared here has no metadata on GCS to find.
    """

    def initialize_from_bucket(self) -> None:
        return None


class KittiTriplets(tfds.core.GeneratorBasedBuilder):
    """KITTI raw (or the synthetic world in its layout) + a split file -> triplet examples."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {"1.0.0": "Triplets (-1, 0, +1), resized and encoded, normalised K."}

    def __init__(
        self,
        *,
        out_dir: str | pathlib.Path,
        split_name: str,
        raw_dir: str | pathlib.Path | None = None,
        lines: list | None = None,
        split_file: str | pathlib.Path | None = None,
        locations: list[str] | None = None,
        split_sha256: str = "",
        settings: triplets.TripletSettings | None = None,
        num_workers: int = 1,
    ):
        self._raw_dir = raw_dir
        self._lines = lines
        self._split_file = split_file
        self._locations = locations
        self._split_sha256 = split_sha256
        self._settings = settings or triplets.TripletSettings()
        self._num_workers = num_workers
        self._split_name = split_name
        super().__init__(
            data_dir=str(out_dir),
            config=tfds.core.BuilderConfig(name=split_name, description=f"split {split_name}"),
            file_format="array_record",
        )

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS 4.9.10 looks for a checksums file next to the builder's source and, on the way,
        # imports `importlib_resources`, a dependency it declares only for Python < 3.9
        # (tensorflow/datasets#11212): without that package `download_and_prepare` fails.
        # Nothing is downloaded here, so there are no checksums to find.
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        s = self._settings
        def image(scale: int = 0, image_format: str = s.image_format):
            shape = (s.height >> scale, s.width >> scale, 3)
            if image_format == "raw":
                return tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding="bytes")
            return tfds.features.Image(shape=shape, dtype=np.uint8, encoding_format=image_format)

        # frame 0's stored scale chain is raw whatever the frames' format (triplets.py)
        scales = ({k: image(i + 1, "raw") for i, k in enumerate(triplets.TARGET_SCALE_KEYS)}
                  if s.target_scales else {})
        return _LocalDatasetInfo(
            builder=self,
            description=(
                "KITTI raw triplets (frames -1, 0, +1 of one camera) for self-supervised depth."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image_m1": image(),
                    "image_0": image(),
                    "image_p1": image(),
                    **scales,
                    "K": tfds.features.Tensor(shape=(4, 4), dtype=np.float32),
                    "index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(
                settings=s.as_dict(),
                split_file=str(self._split_file or ""),
                split_sha256=self._split_sha256,
                num_lines=len(self._lines or []),
                raw_dir=str(pathlib.Path(self._raw_dir).absolute()) if self._raw_dir else "",
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        if self._lines is None or self._raw_dir is None:
            raise ValueError("KittiTriplets needs raw_dir and lines to generate a dataset")
        return {self._split_name: self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[int, dict[str, Any]]]:
        locations = self._locations or [
            f"{self._split_file}:{i + 1}" for i in range(len(self._lines))
        ]
        jobs = [
            (str(self._raw_dir), line, i, self._settings, where)
            for i, (line, where) in enumerate(zip(self._lines, locations, strict=True))
        ]
        if self._num_workers <= 1:
            for job in jobs:
                yield _make_example_job(job)
            return
        # "spawn": the caller may have started JAX threads, which fork() would copy unsafely.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(self._num_workers) as pool:
            # imap keeps the split order; an error in a worker is re-raised here.
            yield from pool.imap(_make_example_job, jobs, chunksize=4)


# array_record writer options per `TripletSettings.compression`: "group_size:1" is what TFDS
# itself writes (array_record's default compression, zstd level 3).
ARRAY_RECORD_OPTIONS = {"zstd": "group_size:1", "none": "group_size:1,uncompressed"}
# TFDS's writer and shuffler are module globals: prepares in threads of one process take turns.
_WRITER_LOCK = threading.Lock()


@contextlib.contextmanager
def tfds_writer_hooks(options: str):
    """While the block runs, TFDS (this process; it writes the shards in the process that calls
    `download_and_prepare`) writes array_record shards with `options` instead of its fixed
    "group_size:1", and keeps the records on their way to the shards in a
    `record_spill.RecordSpill` instead of its shuffler (which needs TensorFlow past 1 GB).
    Another thread's block waits for this one to end. `prepare_split` checks the written
    shards with `shard_compressions`, so a TFDS that stops calling the writer hook cannot go
    unnoticed; one that stops using `shuffle.Shuffler` writes as before up to 1 GB."""
    from array_record.python import array_record_module
    from tensorflow_datasets.core import file_adapters, shuffle

    from data_pipelines.kitti import record_spill

    adapter = file_adapters.ArrayRecordFileAdapter

    def write_examples(cls, path, iterator):
        del cls
        writer = array_record_module.ArrayRecordWriter(os.fspath(path), options)
        try:
            for _, serialized_example in iterator:
                writer.write(serialized_example)
        finally:
            writer.close()
        return None  # as TFDS's: no record positions

    with _WRITER_LOCK:
        saved_writer, saved_shuffler = adapter.__dict__["write_examples"], shuffle.Shuffler
        adapter.write_examples = classmethod(write_examples)
        shuffle.Shuffler = record_spill.RecordSpill
        try:
            yield
        finally:
            adapter.write_examples = saved_writer
            shuffle.Shuffler = saved_shuffler


def shard_compressions(path: str | pathlib.Path) -> dict[str, str]:
    """{shard file name: "zstd" | "none" | the writer options} of a prepared split's directory,
    read from each shard's own header (array_record records the options it was written with)."""
    from array_record.python import array_record_module

    out = {}
    for shard in sorted(pathlib.Path(path).glob(f"{DATASET_NAME}-*.array_record-*")):
        reader = array_record_module.ArrayRecordReader(str(shard))
        try:
            options = reader.writer_options_string()
        finally:
            reader.close()
        fields = options.split(",")
        out[shard.name] = ("none" if "uncompressed" in fields
                           else "zstd" if any(f.startswith("zstd") for f in fields) else options)
    return out


def open_split(out_dir: str | pathlib.Path, split_name: str) -> "PreparedSplit":
    """Random-access source of a prepared split (TFDS's `ArrayRecordDataSource` in a
    `PreparedSplit`, which names the shard and example of a record that cannot be read).

    `source[i]` is a dict: id (bytes), image_m1 / image_0 / image_p1 uint8 (H,W,3),
    K float32 (4,4), index (int), and image_0_s1..3 (H/2^s,W/2^s,3) when prepared with
    target_scales. Reads the files only; no builder code runs.
    """
    path = dataset_dir(out_dir, split_name)
    others = sorted(p.name for p in path.parent.glob("*") if p.is_dir() and p.name != VERSION
                    and not p.name.startswith("incomplete.")) if path.parent.is_dir() else []
    if not (path / "dataset_info.json").is_file() and others:
        raise ValueError(
            f"{path.parent} holds dataset version(s) {', '.join(others)}, not {VERSION} (this "
            "xdistill's format); run `xdistill prepare` again into a new --out"
        )
    if not (path / "dataset_info.json").is_file():
        raise ValueError(
            f"no prepared split {split_name!r} under {out_dir} (expected {path}); "
            "run `xdistill prepare` first"
        )
    builder = tfds.builder_from_directory(str(path))
    return PreparedSplit(builder.as_data_source(split=split_name), path, split_name)


class PreparedSplit(collections.abc.Sequence):
    """A prepared split's records by index (`open_split`): TFDS's `ArrayRecordDataSource`, with
    a record that cannot be read (a damaged shard) raised as `DamagedStoreError` naming the
    split, the shard file, the record in it and the example, instead of array_record's error,
    which names none of them. `tfds_source` is the TFDS source."""

    def __init__(self, tfds_source, path: pathlib.Path, split_name: str):
        self.tfds_source = tfds_source
        self.path = pathlib.Path(path)
        self.split_name = split_name
        try:  # [(first index, number of records, shard file)]
            info = tfds_source.dataset_info.splits[split_name]
            starts = np.cumsum([0, *info.shard_lengths[:-1]]).tolist()
            self._shards = [(int(a), int(n), str(f)) for a, n, f in
                            zip(starts, info.shard_lengths, info.filepaths, strict=True)]
        except (AttributeError, KeyError, TypeError, ValueError):  # another TFDS: the directory only
            self._shards = []

    def __len__(self) -> int:
        return len(self.tfds_source)

    def __getitem__(self, index):
        n = len(self.tfds_source)
        i = operator.index(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"prepared split {self.split_name!r} ({self.path}): index {index} "
                             f"out of range 0..{n - 1}")
        try:
            return self.tfds_source[i]
        except PASS_THROUGH:
            raise
        except Exception as e:
            raise damaged(f"prepared split {self.split_name!r}: {self._where(i)}", e,
                          "prepare the split again (`xdistill prepare`) or copy it anew") from e

    def _where(self, i: int) -> str:
        for start, count, file in self._shards:
            if start <= i < start + count:
                return f"{file}, record {i - start} (example {i}, the split file's entry {i + 1})"
        return f"{self.path}, example {i} (the split file's entry {i + 1})"


def read_metadata(out_dir: str | pathlib.Path, split_name: str) -> dict[str, Any]:
    """The metadata stored with a prepared split (settings, split file hash, line count)."""
    import json

    path = dataset_dir(out_dir, split_name) / "metadata.json"
    return json.loads(path.read_text())


def split_fingerprint(out_dir: str | pathlib.Path, split_name: str) -> str:
    """A hash of what identifies a prepared split's content, not where it lies: its settings, the
    split file's hash and line count, and the shards' example counts and sizes (the paths it was
    prepared from left out, so copies of one store, or stores prepared alike on several hosts,
    agree). Used to check that every host of a multi-host run reads the same data."""
    import hashlib
    import json

    path = dataset_dir(out_dir, split_name)
    meta = read_metadata(out_dir, split_name)
    info = json.loads((path / "dataset_info.json").read_text())
    key = {"settings": meta.get("settings"), "split_sha256": meta.get("split_sha256"),
           "num_lines": meta.get("num_lines"),
           "splits": [(s.get("name"), s.get("numBytes"), s.get("shardLengths")) for s in info.get("splits", [])]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
