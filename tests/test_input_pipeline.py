"""The grain loader over prepared triplets: batch contract, Monodepth2 augmentation (shared by
the frames, flip with the teacher logits), K per scale, determinism, exact resume, per-host
sharding, the padded in-order eval stream, and global arrays on a 2-device mesh."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
from PIL import Image

import kitti_tiny
from data_pipelines.kitti import prepare, tfds_builder, triplets
from xdistill_jax import input_pipeline as ip

H, W = 16, 48
DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    raw, split = kitti_tiny.make_tree(root)
    prepare.prepare_split(raw, split, root / "tfds", "train", H, W)
    return root / "tfds"


@pytest.fixture(scope="session")
def source(store):
    return tfds_builder.open_split(store, "train")


class FakeTeacher:
    """The teacher store interface; logits (H/2, W/2, 2) derived from frame 0 of each example,
    so whether a batch's logits were flipped with its images can be checked."""

    def __init__(self, source, bad_at: int | None = None):
        self.source, self.bad_at = source, bad_at

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        record = self.source[i]
        example_id = record["id"].decode()
        if i == self.bad_at:
            example_id += " (other)"
        return example_id, teacher_logits_of(record["image_0"])


def teacher_logits_of(image0: np.ndarray) -> np.ndarray:
    return (image0[::2, ::2, :2].astype(np.float16) - 128) / 16


def all_batches(it, n=None):
    out = []
    for b in it:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


# ------------------------------------------------------------------------ augmentation ops


def test_jitter_ops_follow_torchvision_pil_definitions():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    x = img.astype(np.float64)
    grey = np.asarray(Image.fromarray(img).convert("L")).astype(np.float64)[..., None]

    def only(op, **factor):
        return ip.color_jitter(img, ip.Augmentation(jitter=True, order=(op,), **factor)).astype(np.float64)

    # brightness: blend with black; contrast: with the rounded mean grey; saturation: with grey.
    assert np.abs(only(0, brightness=1.13) - np.clip(1.13 * x, 0, 255)).max() <= 1
    mean = int(grey.mean() + 0.5)
    assert np.abs(only(1, contrast=0.85) - np.clip(mean + 0.85 * (x - mean), 0, 255)).max() <= 1
    assert np.abs(only(2, saturation=1.2) - np.clip(grey + 1.2 * (x - grey), 0, 255)).max() <= 1
    # hue: the PIL HSV hue channel moves by uint8(hue * 255) = 25 (mod 256); -0.1 -> -25.
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 200
    for hue, want in ((0.1, 25), (-0.1, 256 - 25)):
        out = ip.color_jitter(red, ip.Augmentation(jitter=True, order=(3,), hue=hue))
        got = int(np.asarray(Image.fromarray(out).convert("HSV"))[0, 0, 0])
        assert min((got - want) % 256, (want - got) % 256) <= 1  # +-1: back through RGB uint8
    # order matters (quantisation between ops), so it is part of the parameters
    a = ip.Augmentation(jitter=True, order=(0, 1, 2, 3), brightness=1.19, contrast=0.81, saturation=1.1, hue=0.07)
    b = ip.Augmentation(jitter=True, order=(3, 2, 1, 0), brightness=1.19, contrast=0.81, saturation=1.1, hue=0.07)
    assert not np.array_equal(ip.color_jitter(img, a), ip.color_jitter(img, b))


def test_sampled_parameters_in_monodepth2_ranges():
    augs = [ip.sample_augmentation(ip.example_rng(0, 0, i)) for i in range(400)]
    jit = [a for a in augs if a.jitter]
    assert 150 < len(jit) < 250 and 150 < sum(a.flip for a in augs) < 250
    for a in jit:
        assert sorted(a.order) == [0, 1, 2, 3]
        assert all(0.8 <= v <= 1.2 for v in (a.brightness, a.contrast, a.saturation))
        assert -0.1 <= a.hue <= 0.1
    assert len({a.order for a in jit}) > 10


def test_K_per_scale_matches_monodepth2_fixture():
    ref = np.load(DATA / "monodepth2_K_64x192.npz")
    K, inv_K = ip.intrinsics_per_scale(triplets.MONODEPTH2_K, 64, 192)
    assert K.dtype == inv_K.dtype == np.float32 and K.shape == (4, 4, 4)
    for s in range(4):
        np.testing.assert_allclose(K[s], ref[f"full_in_K_s{s}"], rtol=1e-7)
        np.testing.assert_allclose(inv_K[s], ref[f"full_in_inv_K_s{s}"], rtol=1e-6, atol=1e-7)
    K, _ = ip.intrinsics_per_scale(triplets.MONODEPTH2_K, 192, 640)
    # the reference's worked example: fx 371.2, fy 368.64, cx 320, cy 96 at 640x192
    np.testing.assert_allclose(K[0][[0, 1, 0, 1], [0, 1, 2, 2]], [371.2, 368.64, 320, 96], rtol=1e-6)
    np.testing.assert_allclose(K[3][[0, 1, 0, 1], [0, 1, 2, 2]], [46.4, 46.08, 40, 12], rtol=1e-6)


# ---------------------------------------------------------------------------- the loader


def test_batches_follow_the_contract_and_augmentation_is_shared(source):
    teacher = FakeTeacher(source)
    ds = ip.make_train_dataset(source, global_batch_size=2, seed=7, teacher=teacher, num_epochs=4)
    assert len(ds) == 4 * 3
    static_ids = {i for i in range(len(source)) if kitti_tiny.DRIVES["static"] in source[i]["id"].decode()}
    seen_flip = seen_jitter = 0
    for step in range(len(ds)):
        batch = ds[step]
        want = {"color": ((2, 3, H, W, 3), np.uint8), "color_aug": ((2, 3, H, W, 3), np.uint8),
                "K": ((2, 4, 4, 4), np.float32), "inv_K": ((2, 4, 4, 4), np.float32),
                "index": ((2,), np.int32), "teacher": ((2, H // 2, W // 2, 2), np.float16)}
        want.update({f"color_s{s}": ((2, 3, H >> s, W >> s, 3), np.uint8) for s in (1, 2, 3)})
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == want
        for j, idx in enumerate(batch["index"]):
            record = source[int(idx)]
            stored = np.stack([record[k] for k in ip.IMAGE_KEYS])
            color = batch["color"][j]
            flipped = np.array_equal(color, stored[:, :, ::-1])
            assert flipped or np.array_equal(color, stored)  # all three frames, same choice
            # the teacher logits went with the images
            logits = teacher_logits_of(record["image_0"])
            np.testing.assert_array_equal(batch["teacher"][j], logits[:, ::-1] if flipped else logits)
            aug = ip.sample_augmentation(ip.example_rng(7, step // 3, int(idx)))
            assert flipped == aug.flip
            for f in range(3):  # one set of parameters and order for all frames
                np.testing.assert_array_equal(batch["color_aug"][j, f], ip.color_jitter(color[f], aug))
            if int(idx) in static_ids:  # equal frames stay equal after augmentation
                assert (batch["color_aug"][j] == batch["color_aug"][j, :1]).all()
            assert aug.jitter == (not np.array_equal(batch["color_aug"][j], color))
            seen_flip += aug.flip
            seen_jitter += aug.jitter
            # the LANCZOS chain, each scale from the previous one, never augmented
            prev = color
            for s in (1, 2, 3):
                chain = np.stack([np.asarray(Image.fromarray(p).resize((p.shape[1] // 2, p.shape[0] // 2), Image.LANCZOS)) for p in prev])
                np.testing.assert_array_equal(batch[f"color_s{s}"][j], chain)
                prev = chain
            np.testing.assert_allclose(batch["K"][j, 0, 0, 0], 0.58 * W, rtol=1e-6)  # K unchanged on flip
    assert 0 < seen_flip < 24 and 0 < seen_jitter < 24


def test_epochs_are_reshuffled_permutations_and_hosts_are_disjoint(source):
    n = len(source)
    ds = ip.make_train_dataset(source, global_batch_size=3, seed=1, num_epochs=3, augment=False)
    epochs = [np.concatenate([ds[e * 2 + k]["index"] for k in range(2)]) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(n))
    assert len({tuple(o) for o in epochs}) > 1
    hosts = [
        ip.make_train_dataset(source, global_batch_size=2, seed=1, num_epochs=1, augment=False,
                              process_index=p, process_count=2)
        for p in range(2)
    ]
    shares = [set(np.concatenate([h[i]["index"] for i in range(len(h))]).tolist()) for h in hosts]
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == set(range(n))
    assert len(hosts[0]) == len(hosts[1]) == ip.steps_per_epoch(n, 2, process_count=2) == 3


class _NumberedSource:
    """N tiny records whose pixels are their index (no files): for data-order tests."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = np.full((8, 16, 3), i, np.uint8)
        return {"id": f"r{i}".encode(), "index": i, "image_m1": image, "image_0": image,
                "image_p1": image, "K": np.eye(4, dtype=np.float32)}


@pytest.mark.parametrize("n, global_batch, hosts", [(7, 2, 2), (13, 4, 2), (14, 6, 3)])
def test_hosts_together_take_the_one_host_batches(n, global_batch, hosts):
    """On several hosts each global batch is the one a single host would load (host p its p-th
    share): the data order does not depend on the number of hosts. Until 2026-12-07 each host
    took every `hosts`-th example once for all: on two hosts examples 2k and 2k+1 shared a
    batch in every epoch, and the split's last n % hosts examples were never trained on."""
    epochs = 6
    one = ip.make_train_dataset(_NumberedSource(n), global_batch_size=global_batch, seed=3,
                                num_epochs=epochs, augment=False)
    shares = [ip.make_train_dataset(_NumberedSource(n), global_batch_size=global_batch, seed=3,
                                    num_epochs=epochs, augment=False, process_index=p, process_count=hosts)
              for p in range(hosts)]
    steps = ip.steps_per_epoch(n, global_batch, process_count=hosts)
    assert steps == n // global_batch and len(one) == steps * epochs
    assert all(len(share) == len(one) for share in shares)
    together = [np.concatenate([share[b]["index"] for share in shares]) for b in range(len(one))]
    for b in range(len(one)):
        np.testing.assert_array_equal(together[b], one[b]["index"])
        np.testing.assert_array_equal(np.concatenate([share[b]["color"] for share in shares]), one[b]["color"])
    left_out = [set(range(n)) - set(np.concatenate(together[e * steps:(e + 1) * steps]).tolist())
                for e in range(epochs)]
    assert all(len(x) == n - steps * global_batch for x in left_out)
    assert set().union(*left_out) != left_out[0], "the same examples were left out in every epoch"
    first_pairs = {tuple(sorted(b[:2].tolist())) for b in together[:steps]}
    later_pairs = {tuple(sorted(b[:2].tolist())) for b in together[steps:]}
    assert not first_pairs <= later_pairs or len(later_pairs) > len(first_pairs), "batches repeat their pairs"


def test_determinism_and_exact_resume(source):
    def run(seed, n=None):
        return all_batches(ip.make_train_iterator(source, global_batch_size=2, seed=seed, num_epochs=3), n)

    a, b, c = run(5), run(5), run(6)
    assert len(a) == 9
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert any(not np.array_equal(x["color_aug"], y["color_aug"]) for x, y in zip(a, c))

    it = ip.make_train_iterator(source, global_batch_size=2, seed=5, num_epochs=3)
    head = all_batches(it, 4)  # crosses into epoch 2
    state = it.get_state()
    import json

    state = json.loads(json.dumps(state))  # what a checkpoint stores
    resumed = ip.make_train_iterator(source, global_batch_size=2, seed=5, num_epochs=3, num_threads=0)
    resumed.set_state(state)
    tail = all_batches(resumed)
    assert len(head) + len(tail) == len(a)
    for x, y in zip(head + tail, a):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_teacher_id_mismatch_names_the_record(source):
    ds = ip.make_train_dataset(source, global_batch_size=6, seed=0, num_epochs=1,
                               teacher=FakeTeacher(source, bad_at=3))
    with pytest.raises(ValueError, match="teacher store record 3 has id .*triplet example 3 is"):
        ds[0]
    with pytest.raises(ValueError, match="teacher store has 5 records"):
        ip.TripletSource(source, type("T", (), {"__len__": lambda self: 5})())


def test_eval_visits_each_example_once_in_order_with_padding(source):
    n = len(source)
    batches = all_batches(ip.make_eval_iterator(source, global_batch_size=4))
    index = np.concatenate([b["index"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert index.tolist() == list(range(n)) + [-1, -1] and mask.tolist() == [True] * n + [False] * 2
    assert (batches[-1]["color"][2:] == 0).all()
    for i in range(n):  # no augmentation
        b, j = divmod(i, 4)
        np.testing.assert_array_equal(batches[b]["color_aug"][j], batches[b]["color"][j])
        np.testing.assert_array_equal(batches[b]["color"][j, 1], source[i]["image_0"])
    # two hosts: concatenating their slices of each global batch gives the same order
    per_host = [all_batches(ip.make_eval_iterator(source, global_batch_size=4, process_index=p, process_count=2))
                for p in range(2)]
    glued = np.concatenate([np.concatenate([h0["index"], h1["index"]]) for h0, h1 in zip(*per_host)])
    assert glued.tolist() == index.tolist()


def test_global_arrays_on_two_devices_and_prefetch_resume(source):
    import jax
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    host = ip.make_train_iterator(source, global_batch_size=2, seed=3, num_epochs=2)
    reference = all_batches(ip.make_train_iterator(source, global_batch_size=2, seed=3, num_epochs=2))
    it = ip.DevicePrefetchIterator(host, mesh, size=2)
    first = next(it)
    for key, value in first.items():
        assert isinstance(value, jax.Array) and value.sharding.spec == P("data")
        assert len(value.addressable_shards) == 2
        assert [s.data.shape[0] for s in value.addressable_shards] == [1, 1]
        np.testing.assert_array_equal(np.asarray(value), reference[0][key])
    next(it)
    state = it.get_state()  # two more batches are already prefetched at this point
    rest = [np.asarray(b["index"]) for b in it]
    again = ip.DevicePrefetchIterator(
        ip.make_train_iterator(source, global_batch_size=2, seed=3, num_epochs=2), mesh)
    again.set_state(state)
    assert [np.asarray(b["index"]).tolist() for b in again] == [r.tolist() for r in rest]
    assert [r.tolist() for r in rest] == [b["index"].tolist() for b in reference[2:]]


def test_worker_processes_give_the_same_batches(source):
    serial = all_batches(ip.make_train_iterator(source, global_batch_size=2, seed=4, num_epochs=1))
    it = ip.make_train_iterator(source, global_batch_size=2, seed=4, num_epochs=1, num_workers=2)
    try:
        parallel = all_batches(it)
    finally:
        it.close()
    assert len(parallel) == len(serial) == 3
    for x, y in zip(parallel, serial):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


EXIT_WITHOUT_CLOSE = """
import sys
from data_pipelines.kitti import tfds_builder
from xdistill_jax import input_pipeline as ip

if __name__ == "__main__":  # grain starts its workers by spawning: a file, guarded
    it = ip.make_train_iterator(tfds_builder.open_split(sys.argv[1], "train"), global_batch_size=2,
                                seed=4, num_epochs=None, num_workers=2)
    next(it), next(it)
    print("read two batches", flush=True)  # and exit, the workers' batches ahead not read
"""


def test_worker_processes_closed_at_exit_without_tracebacks(store, tmp_path):
    """A program that exits without closing a loader with worker processes: the loader is closed
    at exit, before the interpreter's teardown frees the shared memory of the workers' batches
    ahead (which printed a traceback per batch and resource_tracker's "leaked shared_memory")."""
    import subprocess
    import sys

    script = tmp_path / "exit_without_close.py"
    script.write_text(EXIT_WITHOUT_CLOSE)
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), str(store)], capture_output=True, text=True,
                          timeout=600, cwd=root, env=env)
    assert done.returncode == 0 and "read two batches" in done.stdout, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "leaked" not in done.stderr, done.stderr[-3000:]


def test_shared_memory_batches_are_copied_out_on_the_cpu():
    """A CPU device array made from numpy aliases its memory, and jax keeps that alive past the
    array: a batch of grain's shared-memory arrays is copied out first, so nothing holds it once
    the loader lets it go (its memory is freed while the interpreter runs, not in its teardown)."""
    import sys

    import jax
    from grain.multiprocessing import SharedMemoryArray

    mesh = jax.sharding.Mesh(np.asarray(jax.devices("cpu")[:1]), ("data",))
    shared = SharedMemoryArray((4, 8, 8, 3), np.uint8)
    shared.unlink_on_del()
    shared[:] = np.arange(shared.size, dtype=np.uint8).reshape(shared.shape)
    refs = sys.getrefcount(shared)
    out = ip.to_global_arrays({"color": shared}, mesh)["color"]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(shared))
    assert out.unsafe_buffer_pointer() != shared.ctypes.data
    del out
    assert sys.getrefcount(shared) == refs


def test_device_prefetch_close_closes_the_host_iterator():
    class Host:
        closed = 0

        def close(self):
            self.closed += 1

    host = Host()
    ip.DevicePrefetchIterator(host, mesh=None).close()
    assert host.closed == 1
    ip.DevicePrefetchIterator(iter([]), mesh=None).close()  # nothing to close: nothing done


def test_resume_with_another_number_of_worker_processes(source):
    """The loader state is the position in the batch sequence: a run saved with worker processes
    resumes in one process and the other way round (grain's own multi-process state held one
    position per worker and did not restore into another worker count: KeyError)."""
    reference = all_batches(ip.make_train_iterator(source, global_batch_size=2, seed=7, num_epochs=2))
    assert len(reference) == 6
    for before, after in ((2, 0), (0, 2)):
        it = ip.make_train_iterator(source, global_batch_size=2, seed=7, num_epochs=2, num_workers=before)
        try:
            head = all_batches(it, 2)
            state = it.get_state()
        finally:
            it.close()
        assert state == {"next_index": 2}
        resumed = ip.make_train_iterator(source, global_batch_size=2, seed=7, num_epochs=2, num_workers=after)
        try:
            resumed.set_state(state)
            tail = all_batches(resumed)
        finally:
            resumed.close()
        assert len(head) + len(tail) == len(reference), (before, after)
        for x, y in zip(head + tail, reference):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{before} -> {after} workers: {k}")


def test_loader_states_saved_before_are_read_and_others_refused(source):
    """Checkpoints before 2026-12-05 hold grain's states: {"next_index": k} from one process (the
    same form), or, from worker processes, each worker's position with the workers taking the
    batches in turn: 3 workers at 2, 1, 1 with the next batch the 2nd worker's = position 4."""
    grain_workers = {"next_index_in_cycle": 1, "next_index_in_datasets": 3, "iterators_in_use_indices": [0, 1, 2],
                     "iterators_in_use_states": [{"next_index": 2}, {"next_index": 1}, {"next_index": 1}],
                     "exhausted": [0, 0, 0], "future_states": {}}
    assert ip._next_index(grain_workers) == 4
    assert ip._next_index({"next_index": 3}) == 3
    reference = all_batches(ip.make_train_iterator(source, global_batch_size=2, seed=1, num_epochs=2))
    it = ip.make_train_iterator(source, global_batch_size=2, seed=1, num_epochs=2)
    it.set_state(grain_workers)
    tail = all_batches(it)
    assert [b["index"].tolist() for b in tail] == [b["index"].tolist() for b in reference[4:]]
    inconsistent = dict(grain_workers, next_index_in_cycle=0)  # not the worker whose turn it is
    for bad in ({"next_index": -1}, {"position": 3}, inconsistent, [3]):
        with pytest.raises(ValueError, match="is not a position in the batch sequence"):
            it.set_state(bad)


def test_auto_worker_count_follows_the_cores(monkeypatch, tmp_path):
    import os

    monkeypatch.setattr(ip, "CGROUP_ROOT", str(tmp_path / "no_cgroup"))  # no CPU quota
    for cores, want in ((1, 0), (2, 0), (3, 2), (8, 7), (64, ip.AUTO_MAX_WORKERS)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert ip.resolve_num_workers(-1) == want, cores
    assert ip.resolve_num_workers(0) == 0 and ip.resolve_num_workers(5) == 5

    # a container's CPU quota below the cores it may run on: 64 cores, 8.5 CPUs of quota -> 8 - 1
    v2 = tmp_path / "v2"
    v2.mkdir()
    monkeypatch.setattr(ip, "CGROUP_ROOT", str(v2))
    for text, limit, want in (("850000 100000\n", 8.5, 7), ("max 100000\n", None, ip.AUTO_MAX_WORKERS),
                              ("150000 100000\n", 1.5, 0)):
        (v2 / "cpu.max").write_text(text)
        assert ip.cgroup_cpu_limit() == limit and ip.resolve_num_workers(-1) == want, text
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    monkeypatch.setattr(ip, "CGROUP_ROOT", str(v1))
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    for quota, limit, want in (("400000\n", 4.0, 3), ("-1\n", None, ip.AUTO_MAX_WORKERS)):
        (v1 / "cpu" / "cpu.cfs_quota_us").write_text(quota)
        assert ip.cgroup_cpu_limit() == limit and ip.resolve_num_workers(-1) == want, quota
    for bad in (-2, 1.5, "4", True):
        with pytest.raises(ValueError, match="num_workers must be an integer >= -1"):
            ip.resolve_num_workers(bad)


def test_synthetic_world_through_prepare_and_the_loader(tmp_path):
    import synth_world_tiny
    from data_pipelines.kitti import raw

    world = synth_world_tiny.tiny_world()
    split = world / "splits" / "train_files.txt"
    prepare.prepare_split(world, split, tmp_path, "train", 32, 96, intrinsics="calib")
    src = tfds_builder.open_split(tmp_path, "train")
    lines = raw.read_split_file(split)
    assert len(src) == len(lines) >= 3
    batches = all_batches(ip.make_train_iterator(src, global_batch_size=3, seed=0, num_epochs=1))
    assert len(batches) == len(lines) // 3
    for batch in batches:
        for j, idx in enumerate(batch["index"]):
            line = lines[int(idx)]
            calib = raw.read_calib_file(world / line.folder.split("/")[0] / "calib_cam_to_cam.txt")
            P = calib[f"P_rect_0{line.camera}"].reshape(3, 4)
            # P_rect's principal point is 1-based (KITTI's convention, which the world follows):
            # 0-based it is the world's true (W/2, H/2), Monodepth2's normalised K exactly
            fx, cx = P[0, 0] / synth_world_tiny.WIDTH, (P[0, 2] - 1) / synth_world_tiny.WIDTH
            fy, cy = P[1, 1] / synth_world_tiny.HEIGHT, (P[1, 2] - 1) / synth_world_tiny.HEIGHT
            assert (cx, cy) == (0.5, 0.5)
            np.testing.assert_allclose(batch["K"][j, 0, [0, 1, 0, 1], [0, 1, 2, 2]],
                                       [fx * 96, fy * 32, cx * 96, cy * 32], rtol=1e-5)
            aug = ip.sample_augmentation(ip.example_rng(0, 0, int(idx)))
            for f, offset in enumerate((-1, 0, 1)):
                with Image.open(raw.image_path(world, line, offset)) as im:
                    want = np.asarray(im.convert("RGB").resize((96, 32), Image.LANCZOS))
                np.testing.assert_array_equal(batch["color"][j, f], want[:, ::-1] if aug.flip else want)
                np.testing.assert_array_equal(batch["color_aug"][j, f], ip.color_jitter(batch["color"][j, f], aug))


def test_a_flip_mirrors_an_off_centre_principal_point_and_leaves_monodepth2s_k():
    """KITTI's calibrated cx (~0.49 of the width) belongs to the unflipped image: a flipped
    example's is 1 - cx. Monodepth2's fixed K (cx 0.5) is the same either way, bit for bit."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 96, 3), np.uint8)
    record = {k: image for k in ip.IMAGE_KEYS}
    record["index"] = 0
    for cx, flipped_cx in ((0.4908, 1 - np.float32(0.4908)), (0.5, 0.5)):
        K = np.array([[0.58, 0, cx, 0], [0, 1.92, 0.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)
        out = {flip: ip.make_example(dict(record, K=K), ip.Augmentation(flip=flip))
               for flip in (False, True)}
        assert out[False]["K"][0, 0, 2] == np.float32(cx) * 96
        assert out[True]["K"][0, 0, 2] == np.float32(flipped_cx) * 96
        for s in range(4):  # every scale from the mirrored normalised K
            assert out[True]["K"][s, 0, 2] == np.float32(flipped_cx) * (96 // 2**s)
        np.testing.assert_array_equal(out[True]["inv_K"][0], np.linalg.pinv(out[True]["K"][0]))
        np.testing.assert_array_equal(out[True]["color"][1], image[:, ::-1])
    # cx 0.5: the flipped example's K and inv_K are the unflipped one's, bit for bit
    np.testing.assert_array_equal(out[True]["K"], out[False]["K"])
    np.testing.assert_array_equal(out[True]["inv_K"], out[False]["inv_K"])


# ------------------------------------------------------------- fast paths, exact to the PIL ops


def test_hue_lookup_equals_pil_on_every_colour_and_shift():
    # _adjust_hue looks PIL's HSV conversions up in tables; it must be torchvision's PIL
    # adjust_hue bit for bit. Every one of the 2^24 colours, at the extreme shifts and 0:
    every = Image.frombytes("RGB", (4096, 4096), np.arange(1 << 24, dtype=np.uint32), "raw", "RGBX")
    for hue in (0.1, -0.1, 0.0):
        fast = np.asarray(ip._adjust_hue(every, hue))
        np.testing.assert_array_equal(fast, np.asarray(ip._adjust_hue_reference(every, hue)), err_msg=str(hue))
    assert not np.array_equal(fast, np.asarray(ip._adjust_hue(every, 0.05)))
    del every, fast
    # every shift Monodepth2 can draw (uint8(hue * 255) for hue in [-0.1, 0.1]), random pixels
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    shifts = set()
    for hue in np.linspace(-0.1, 0.1, 401):
        shifts.add(ip._hue_shift(hue))
        np.testing.assert_array_equal(np.asarray(ip._adjust_hue(img, hue)),
                                      np.asarray(ip._adjust_hue_reference(img, hue)), err_msg=str(hue))
    assert len(shifts) == 51  # -25..25 mod 256


def test_jitter_chain_equals_the_torchvision_pil_chain():
    from PIL import ImageEnhance

    rng = np.random.default_rng(4)
    img = np.clip(128 + 60 * rng.standard_normal((32, 48, 3)), 0, 255).astype(np.uint8)
    for i in range(40):
        aug = ip.sample_augmentation(ip.example_rng(11, 0, i))
        want = Image.fromarray(img)
        if aug.jitter:
            for op in aug.order:  # torchvision's functional_pil ops, in the drawn order
                if op == 0:
                    want = ImageEnhance.Brightness(want).enhance(aug.brightness)
                elif op == 1:
                    want = ImageEnhance.Contrast(want).enhance(aug.contrast)
                elif op == 2:
                    want = ImageEnhance.Color(want).enhance(aug.saturation)
                else:
                    want = ip._adjust_hue_reference(want, aug.hue)
        np.testing.assert_array_equal(ip.color_jitter(img, aug), np.asarray(want))


def test_target_only_scales_and_cached_K(source):
    full = ip.make_train_dataset(source, global_batch_size=2, seed=9, num_epochs=1)
    lean = ip.make_train_dataset(source, global_batch_size=2, seed=9, num_epochs=1, source_scales=False)
    for step in range(len(full)):
        a, b = full[step], lean[step]
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith("color_s"):
                s = int(key[-1])
                assert b[key].shape == (2, 1, H >> s, W >> s, 3)
                np.testing.assert_array_equal(b[key][:, 0], a[key][:, 1])  # frame 0 of the full chain
            else:
                np.testing.assert_array_equal(a[key], b[key])
    record = source[0]
    ex = ip.make_example(record, ip.Augmentation())
    want_K, want_inv = ip.intrinsics_per_scale(record["K"], H, W)
    np.testing.assert_array_equal(ex["K"], want_K)
    np.testing.assert_array_equal(ex["inv_K"], want_inv)
    with pytest.raises(ValueError):  # the cache is shared: examples get read-only views of it
        ex["K"][0, 0, 0] = 1.0
    ev = all_batches(ip.make_eval_iterator(source, global_batch_size=4, source_scales=False))
    assert ev[0]["color_s1"].shape == (4, 1, H // 2, W // 2, 3)


def test_raw_store_gives_the_png_store_batches(source, tmp_path):
    # "raw" stores the uint8 pixels (no decode): lossless like PNG, so the same batches.
    raw, split = kitti_tiny.make_tree(tmp_path)
    prepare.prepare_split(raw, split, tmp_path / "tfds", "train", H, W, image_format="raw")
    raw_source = tfds_builder.open_split(tmp_path / "tfds", "train")
    assert tfds_builder.read_metadata(tmp_path / "tfds", "train")["settings"]["image_format"] == "raw"
    for i in range(len(source)):
        for key in ip.IMAGE_KEYS:
            assert raw_source[i][key].dtype == np.uint8 and raw_source[i][key].shape == (H, W, 3)
            np.testing.assert_array_equal(raw_source[i][key], source[i][key])
    a = all_batches(ip.make_train_iterator(source, global_batch_size=2, seed=2, num_epochs=1))
    b = all_batches(ip.make_train_iterator(raw_source, global_batch_size=2, seed=2, num_epochs=1))
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_lanczos_halving_commutes_with_a_flip():
    # What a stored chain relies on: the chain of a flipped frame is the flipped chain. PIL's
    # LANCZOS taps of a halving are mirror-symmetric; checked here at the paper's size.
    rng = np.random.default_rng(5)
    flip = Image.Transpose.FLIP_LEFT_RIGHT
    for _ in range(4):
        img = Image.fromarray(rng.integers(0, 256, (192, 640, 3), dtype=np.uint8))
        for a, b in zip(ip._scale_chain(img.transpose(flip)), ip._scale_chain(img)):
            np.testing.assert_array_equal(a, np.asarray(Image.fromarray(b).transpose(flip)))


@pytest.mark.parametrize("image_format", ["raw", "png", "jpeg"])
def test_stored_target_scales_give_the_computed_batches(source, tmp_path, image_format):
    raw, split = kitti_tiny.make_tree(tmp_path)
    prepare.prepare_split(raw, split, tmp_path / "tfds", "train", H, W, image_format=image_format,
                          target_scales=True)
    stored = tfds_builder.open_split(tmp_path / "tfds", "train")
    for i in range(len(stored)):
        # the chain of the lossless stored-size frame (`source` is a PNG store), whatever the format
        chain = ip._scale_chain(Image.fromarray(source[i]["image_0"]))
        for s, key in enumerate(triplets.TARGET_SCALE_KEYS):
            assert stored[i][key].shape == (H >> (s + 1), W >> (s + 1), 3)
            np.testing.assert_array_equal(stored[i][key], chain[s])
    for source_scales in (True, False):
        kw = dict(global_batch_size=2, seed=8, num_epochs=2, source_scales=source_scales)
        a, b = all_batches(ip.make_train_iterator(source, **kw)), all_batches(ip.make_train_iterator(stored, **kw))
        assert len(a) == len(b) == 6
        assert 0 < sum(ip.sample_augmentation(ip.example_rng(8, e // 3, int(i))).flip
                       for e, x in enumerate(a) for i in x["index"]) < 12  # flipped and not
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for key in x:
                if image_format == "jpeg" and key.startswith("color"):
                    if key.startswith("color_s"):  # frame 0's chain is read, so exact
                        f = 1 if source_scales else 0
                        np.testing.assert_array_equal(x[key][:, f], y[key][:, f], err_msg=key)
                    assert np.abs(x[key].astype(float) - y[key]).mean() < 8, key  # JPEG frames: close
                else:
                    np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_a_store_written_before_target_scales_existed_is_still_accepted(tmp_path):
    import json

    raw, split = kitti_tiny.make_tree(tmp_path)
    path = prepare.prepare_split(raw, split, tmp_path / "tfds", "train", H, W)
    meta = json.loads((path / "metadata.json").read_text())
    del meta["settings"]["target_scales"]  # what the older prepare wrote
    (path / "metadata.json").write_text(json.dumps(meta))
    assert prepare.prepare_split(raw, split, tmp_path / "tfds", "train", H, W) == path
    with pytest.raises(ValueError, match="exists with settings"):
        prepare.prepare_split(raw, split, tmp_path / "tfds", "train", H, W, target_scales=True)
