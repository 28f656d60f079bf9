"""The serialized records of a split on their way to the shards: on disk, in key order, no TF.

TFDS 4.9's writer hands every serialized example to its `shuffle.Shuffler`, which keeps them in
memory up to 1 GB (`shuffle.MAX_MEM_BUFFER_SIZE`) and past that spills them to 1,000 bucket
files through `tf.io.gfile`: TensorFlow, which this project does not install. A KITTI training
split passes 1 GB in every stored format (eigen_zhou's 39,810 triplets: about 44 GB raw at
640x192, several GB as PNG), so `xdistill prepare` failed on it with "No module named
'tensorflow'". With TF installed it would have gone no better: under `disable_shuffling` the
keys are the split's line numbers, which all fall in bucket 0, and TFDS sorts a bucket in
memory, so the whole split would have been read back into RAM.

`RecordSpill` stands in for that shuffler while `tfds_builder.tfds_writer_hooks` is active
(`prepare_split`): each record is appended to one file in the directory TFDS writes the split
to (its `incomplete.*` directory: the same disk as the shards, removed by TFDS if the build
fails), with its key, offset and size kept in memory (a few dozen bytes a record). Reading sorts
the keys and reads each record back (sequentially when the keys came in order, as the builder
yields them), then deletes the file. Only `disable_shuffling=True` is supported: the triplet
builder always sets it (record i is split line i).
"""

from __future__ import annotations

import os
import pathlib
import uuid
from typing import Iterator


class RecordSpill:
    """TFDS `shuffle.Shuffler`'s interface (add, size, bucket_lengths, num_examples, iteration
    in key order, DuplicatedKeysError on a repeated key) over one append-only file."""

    def __init__(self, dirpath, hash_salt, disable_shuffling: bool = False, ignore_duplicates: bool = False):
        del hash_salt  # keys are stored as given: no hashing without shuffling
        if not disable_shuffling:
            raise ValueError("RecordSpill keeps records in key order: it needs disable_shuffling=True "
                             "(the triplet builder sets it)")
        self._ignore_duplicates = ignore_duplicates
        self._path = pathlib.Path(dirpath) / f"xdistill-records-{uuid.uuid4().hex}.spill"
        self._file = None
        self._index: list[tuple[int, int, int]] = []  # (key, offset, size)
        self._seen: set[int] = set()
        self._offset = 0
        self._read_only = False

    @property
    def path(self) -> pathlib.Path:
        return self._path

    @property
    def size(self) -> int:
        """Bytes of the records (not keys), as TFDS's shuffler reports."""
        return self._offset

    @property
    def bucket_lengths(self) -> list[int]:
        return [len(self._index)]  # one "bucket", as TFDS's in-memory path

    @property
    def num_examples(self) -> int:
        return len(self._index)

    def add(self, key, data: bytes) -> None:
        if self._read_only:
            raise AssertionError("add() cannot be called after __iter__.")
        if not isinstance(data, bytes):
            raise AssertionError(f"Only bytes (not {type(data)}) can be stored in the record spill")
        key = int(key)
        if self._ignore_duplicates:
            if key in self._seen:
                return
            self._seen.add(key)
        if self._file is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self._path, "wb")
        self._file.write(data)
        self._index.append((key, self._offset, len(data)))
        self._offset += len(data)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        from tensorflow_datasets.core import shuffle

        self._read_only = True
        if self._file is not None:
            self._file.close()
        order = sorted(self._index)
        try:
            if not order:
                return
            with open(self._path, "rb") as f:
                previous_key, previous = None, None
                for key, offset, size in order:
                    if f.tell() != offset:
                        f.seek(offset)
                    data = f.read(size)
                    if len(data) != size:
                        raise OSError(f"{self._path}: record of key {key} cut short "
                                      f"({len(data)} of {size} bytes at byte {offset})")
                    if key == previous_key:
                        raise shuffle.DuplicatedKeysError(data, previous)
                    previous_key, previous = key, data
                    yield key, data
        finally:
            self.discard()

    def discard(self) -> None:
        """Closes and deletes the spill file (also when a build stops half-way)."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        try:
            os.remove(self._path)
        except FileNotFoundError:
            pass
