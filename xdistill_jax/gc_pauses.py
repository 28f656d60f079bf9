"""Python's garbage collector in the hot loop: freeze the heap, and see the pauses.

    with gc_pauses.frozen_heap() as frozen:   # after the step compiled: init, tracing and
        ...                                   # compiling have left ~350,000 objects or more
    with gc_pauses.Recorder() as rec:
        ...
        rec.total_ms, rec.count                # collection time and count so far

A full (generation 2) collection walks every tracked object. After the train step is traced and
compiled the process holds hundreds of thousands of them (jaxprs, lowering caches, flax module
trees): one full collection then takes 92-333 ms on this project's CPU VM (benchmarks/RESULTS.md),
several GPU steps, and CPython starts one whenever enough objects have survived younger
collections, at a time nobody chose. `frozen_heap` runs one collection and then moves every
object still alive into the permanent generation (`gc.freeze`), which later collections skip;
objects created afterwards are collected as usual. (A frozen object whose last reference goes
is still freed at once; only reference cycles among frozen objects wait.) Leaving the block
unfreezes, so such cycles that became garbage meanwhile are collected again.
"""

from __future__ import annotations

import contextlib
import gc
import time


@contextlib.contextmanager
def frozen_heap():
    """One full collection, then `gc.freeze()` for the block; yields the number of objects
    frozen. On exit `gc.unfreeze()` (frozen objects return to the oldest generation), unless the
    heap was already frozen on entry (by the caller's process: then it stays frozen)."""
    already = gc.get_freeze_count() > 0
    gc.collect()
    gc.freeze()
    try:
        yield gc.get_freeze_count()
    finally:
        if not already:
            gc.unfreeze()


class Recorder:
    """Records the garbage collector's pauses while the block runs (`gc.callbacks`).

    `pauses`: (generation, ms) of each collection, in order; `tally(start)`: the collections by
    generation and their milliseconds from `pauses[start]` on; `count`, `total_ms`: the whole
    tally so far.
    """

    def __init__(self):
        self.pauses: list[tuple[int, float]] = []
        self._start: float | None = None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.pauses.append((int(info["generation"]), 1e3 * (time.perf_counter() - self._start)))
            self._start = None

    def tally(self, start: int = 0) -> tuple[dict[int, int], float]:
        counts = {0: 0, 1: 0, 2: 0}
        for generation, _ in self.pauses[start:]:
            counts[generation] += 1
        return counts, sum(ms for _, ms in self.pauses[start:])

    @property
    def total_ms(self) -> float:
        return self.tally()[1]

    @property
    def count(self) -> dict[int, int]:
        return self.tally()[0]

    def __enter__(self) -> "Recorder":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)
