"""gc_pauses: the heap frozen for a block and given back, and collections recorded."""

import gc

from xdistill_jax import gc_pauses


class _Cycle:
    def __init__(self):
        self.me = self


def test_frozen_heap_freezes_what_lives_and_unfreezes_after():
    before = gc.get_freeze_count()
    assert before == 0
    keep = [_Cycle() for _ in range(1000)]
    with gc_pauses.frozen_heap() as frozen:
        assert frozen >= before + 1000 and gc.get_freeze_count() >= before + 1000  # the live cycles among them
        # a cycle made inside the block is still collected
        _Cycle()
        assert gc.collect() >= 1
    assert gc.get_freeze_count() == 0
    # frozen objects that died inside the block are collected once it is left
    with gc_pauses.frozen_heap():
        del keep[:]
        assert gc.collect() == 0  # frozen: not looked at
    assert gc.collect() >= 1000


def test_recorder_sees_each_collection_by_generation():
    with gc_pauses.Recorder() as rec:
        gc.collect(0)
        gc.collect(2)
        gc.collect(1)
    assert [g for g, _ in rec.pauses] == [0, 2, 1]
    assert rec.count == {0: 1, 1: 1, 2: 1}
    assert rec.total_ms == sum(ms for _, ms in rec.pauses) and all(ms >= 0 for _, ms in rec.pauses)
    gc.collect()
    assert len(rec.pauses) == 3  # left: no longer listening
    assert rec._callback not in gc.callbacks


def test_a_heap_frozen_before_stays_frozen():
    gc.freeze()
    try:
        n = gc.get_freeze_count()
        with gc_pauses.frozen_heap() as frozen:
            assert frozen >= n
        # still frozen (frozen objects that died meanwhile have left the count; unfrozen: 0)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
