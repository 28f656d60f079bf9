"""Teacher logits store, backends, precompute round trips, and their bad-input errors."""

import json

import numpy as np
import pytest

from data_pipelines.teacher import store

GROUPS7 = ("a", "b", "c", "d", "e", "f", "g")


def _ids(n):
    return [f"2011_09_26/2011_09_26_drive_0001_sync {i:010d} l" for i in range(n)]


def _fake_logits(idx, h=3, w=5, g=7):
    idx = np.asarray(idx, np.float32)
    base = np.arange(h * w * g, dtype=np.float32).reshape(h, w, g) / 10.0
    return base[None] + idx[:, None, None, None]


def _fake_batch(ids):
    return lambda idx: ([ids[i] for i in idx], _fake_logits(idx))


def test_store_round_trip(tmp_path):
    ids = _ids(7)
    store.write_store(tmp_path / "s", 7, _fake_batch(ids), grouping="geometric", group_names=GROUPS7,
                      height=3, width=5, shard_size=3, batch_size=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "logits-00000.array_record", "logits-00001.array_record", "logits-00002.array_record",
        "teacher.json"]
    src = store.TeacherLogitsSource(tmp_path / "s")
    assert (len(src), src.num_groups, src.grouping, src.height, src.width) == (7, 7, "geometric", 3, 5)
    for i in (0, 3, 6, -1):
        eid, logits = src[i]
        assert eid == ids[i] and logits.dtype == np.float16 and logits.shape == (3, 5, 7)
        np.testing.assert_array_equal(logits, _fake_logits([i % 7])[0].astype(np.float16))
    with pytest.raises(IndexError, match="index 7 out of range 0..6"):
        src[7]
    import pickle
    assert pickle.loads(pickle.dumps(src))[2][0] == ids[2]


def test_store_resume_after_interruption(tmp_path):
    ids = _ids(8)
    calls = []

    def dies_in_shard_2(idx):
        if idx[0] >= 6:
            raise KeyboardInterrupt
        calls.append(list(idx))
        return _fake_batch(ids)(idx)

    kw = dict(grouping="geometric", group_names=GROUPS7, height=3, width=5, shard_size=3,
              batch_size=3, progress=False)
    with pytest.raises(KeyboardInterrupt):
        store.write_store(tmp_path / "s", 8, dies_in_shard_2, **kw)
    assert not json.loads((tmp_path / "s" / "teacher.json").read_text())["complete"]
    with pytest.raises(ValueError, match="store is incomplete"):
        store.TeacherLogitsSource(tmp_path / "s")
    calls.clear()

    def counting(idx):
        calls.append(list(idx))
        return _fake_batch(ids)(idx)

    store.write_store(tmp_path / "s", 8, counting, **kw)
    assert calls == [[6, 7]]  # shards 0 and 1 were kept, only shard 2 computed
    src = store.TeacherLogitsSource(tmp_path / "s")
    for i in range(8):
        np.testing.assert_array_equal(src[i][1], _fake_logits([i])[0].astype(np.float16))
    # a complete store is not recomputed; resuming with other settings is refused by name
    calls.clear()
    store.write_store(tmp_path / "s", 8, counting, **kw)
    assert calls == []
    with pytest.raises(ValueError, match="existing store has height=3, this run has 4"):
        store.write_store(tmp_path / "s", 8, counting, **{**kw, "height": 4})
    with pytest.raises(ValueError, match="existing store has fingerprint='', this run has 'abc'"):
        store.write_store(tmp_path / "s", 8, counting, **{**kw, "fingerprint": "abc"})


def test_store_rejects_non_finite_logits(tmp_path):
    def inf_in_example_1(idx):
        out = _fake_logits(idx)
        if 1 in idx:
            out[list(idx).index(1), 0, 0, 0] = 1e6  # overflows float16
        return _ids(3)[idx[0]:idx[-1] + 1], out

    with pytest.raises(ValueError, match="example '.* 0000000001 l' are not finite"):
        store.write_store(tmp_path / "s", 3, inf_in_example_1, grouping="geometric",
                          group_names=GROUPS7, height=3, width=5, progress=False)
