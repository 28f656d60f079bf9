"""The error of a record that a prepared store holds but cannot give back.

A prepared split (`kitti/tfds_builder.open_split`) or a teacher logits store
(`teacher/store.TeacherLogitsSource`) whose shard was damaged after it was written (a truncated
or partial copy to a host's disk, a bad disk) fails when a record of it is read, in the middle
of a run: array_record's own error ("Corrupted Riegeli/records file: chunk data hash mismatch
... at byte N") names neither the file nor the example. The readers raise this instead, naming
the store, the shard file, the record and the example, and what to do.
"""

from __future__ import annotations


class DamagedStoreError(ValueError):
    """A record of a prepared store that cannot be read (the store is damaged)."""


def is_damage(error: BaseException) -> bool:
    """Whether an error raised while reading a stored record is the store's, not the process's
    (out of memory, interrupted): those are left as they are."""
    return isinstance(error, Exception) and not isinstance(error, (MemoryError, DamagedStoreError))
