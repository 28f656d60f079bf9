"""The error of a record that a prepared store holds but cannot give back.

A prepared split (`kitti/tfds_builder.open_split`) or a teacher logits store
(`teacher/store.TeacherLogitsSource`) whose shard was damaged after it was written (a truncated
or partial copy to a host's disk, a bad disk) fails when a record of it is read, in the middle
of a run: array_record's own error ("Corrupted Riegeli/records file: chunk data hash mismatch
... at byte N") names neither the file nor the example. The readers raise this instead, naming
the store, the shard file, the record and the example, and what to do:

    try:
        record = reader.read(...)
    except PASS_THROUGH:
        raise
    except Exception as e:
        raise damaged(f"teacher store {path}: {file}, record {r} (example {i})", e, remedy) from e
"""

from __future__ import annotations


class DamagedStoreError(ValueError):
    """A record of a prepared store that cannot be read (the store is damaged)."""


# errors of the process, not of the store (and one already named), left as they are
PASS_THROUGH = (MemoryError, DamagedStoreError)


def damaged(where: str, error: Exception, remedy: str) -> DamagedStoreError:
    """The error for the record at `where` (store, shard file, record, example) that `error`
    kept from being read; `remedy` says how to mend the store."""
    return DamagedStoreError(f"{where} cannot be read ({type(error).__name__}: {error}). The store is "
                             f"damaged (a partial copy, a bad disk): {remedy}")
