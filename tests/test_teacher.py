"""Teacher logits store, backends, precompute round trips, and their bad-input errors."""

import json
import re

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


def test_store_identity_names_the_content_not_the_place(tmp_path):
    """What a multi-host run compares across hosts' teacher stores: a copy elsewhere, or one whose
    teacher.json names other paths, agrees; another teacher step or source split does not."""
    import json
    import shutil

    ids = _ids(4)
    kw = dict(group_names=GROUPS7, height=3, width=5, batch_size=2, progress=False, fingerprint="split-a",
              extra_metadata={"teacher": {"backend": "flax:/a/teacher", "step": 200}})
    store.write_store(tmp_path / "a", 4, _fake_batch(ids), grouping="geometric", **kw)
    ident = store.TeacherLogitsSource(tmp_path / "a").identity
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    meta_path = tmp_path / "copy" / store.METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta["dataset_dir"], meta["teacher"]["backend"] = "/elsewhere/tfds", "flax:/b/teacher"
    meta_path.write_text(json.dumps(meta))
    assert store.TeacherLogitsSource(tmp_path / "copy").identity == ident
    store.write_store(tmp_path / "b", 4, _fake_batch(ids), grouping="geometric",
                      **{**kw, "extra_metadata": {"teacher": {"backend": "flax:/a/teacher", "step": 100}}})
    assert store.TeacherLogitsSource(tmp_path / "b").identity != ident
    store.write_store(tmp_path / "c", 4, _fake_batch(ids), grouping="geometric", **{**kw, "fingerprint": "split-b"})
    assert store.TeacherLogitsSource(tmp_path / "c").identity != ident


def test_a_store_resumed_from_another_folder_names_the_same_teacher(tmp_path, monkeypatch):
    """The teacher spec was stored as typed and compared as a string: a store begun with
    `flax:runs/teacher` was refused when resumed as `flax:$PWD/runs/teacher`. Paths are compared
    absolute now; another teacher is still refused."""
    ids = _ids(4)
    kw = dict(group_names=GROUPS7, height=3, width=5, batch_size=2, progress=False)
    monkeypatch.chdir(tmp_path)
    teacher = lambda spec: {"teacher": {"backend": spec, "step": 2}}  # noqa: E731
    store.write_store(tmp_path / "s", 4, _fake_batch(ids), grouping="geometric",
                      extra_metadata=teacher("flax:runs/teacher"), **kw)
    store.write_store(tmp_path / "s", 4, _fake_batch(ids), grouping="geometric",
                      extra_metadata=teacher(f"flax:{tmp_path}/runs/../runs/teacher"), **kw)
    with pytest.raises(ValueError, match=r"existing store has teacher=\{'backend': 'flax:runs/teacher'.*this run "
                                         r"has .*flax:.*/runs/other"):
        store.write_store(tmp_path / "s", 4, _fake_batch(ids), grouping="geometric",
                          extra_metadata=teacher(f"flax:{tmp_path}/runs/other"), **kw)


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


def test_store_of_another_teacher_is_refused_complete_or_not(tmp_path):
    """The teacher (the backend's description) is checked like the settings: a rerun with
    another teacher found the complete store and kept the old logits; a resumed interrupted one
    wrote the rest with the new teacher and labelled the whole store with it."""
    ids = _ids(6)
    kw = dict(grouping="geometric", group_names=GROUPS7, height=3, width=5, shard_size=3,
              batch_size=3, progress=False)
    # (a tuple in the description is a list once stored: A still resumes)
    a = {"teacher": {"backend": "onnx:A.onnx", "input_size": (4, 8)}}
    b = {"teacher": {"backend": "onnx:B.onnx", "input_size": (4, 8)}}

    def dies_in_shard_1(idx):
        if idx[0] >= 3:
            raise KeyboardInterrupt
        return _fake_batch(ids)(idx)

    with pytest.raises(KeyboardInterrupt):
        store.write_store(tmp_path / "s", 6, dies_in_shard_1, extra_metadata=a, **kw)
    message = (r"teacher\.json: existing store has teacher=\{'backend': 'onnx:A\.onnx', .*\}, this run "
               r"has \{'backend': 'onnx:B\.onnx', .*\}")
    with pytest.raises(ValueError, match=message):
        store.write_store(tmp_path / "s", 6, _fake_batch(ids), extra_metadata=b, **kw)
    assert len(list((tmp_path / "s").glob("logits-*.array_record"))) == 1  # nothing written by B
    store.write_store(tmp_path / "s", 6, _fake_batch(ids), extra_metadata=a, **kw)  # A resumes
    assert store.TeacherLogitsSource(tmp_path / "s").metadata["teacher"] == {"backend": "onnx:A.onnx",
                                                                             "input_size": [4, 8]}
    with pytest.raises(ValueError, match=message):  # and a complete store too
        store.write_store(tmp_path / "s", 6, _fake_batch(ids), extra_metadata=b, **kw)


def test_store_rejects_non_finite_logits(tmp_path):
    def inf_in_example_1(idx):
        out = _fake_logits(idx)
        if 1 in idx:
            out[list(idx).index(1), 0, 0, 0] = 1e6  # overflows float16
        return _ids(3)[idx[0]:idx[-1] + 1], out

    with pytest.raises(ValueError, match="example '.* 0000000001 l' are not finite"):
        store.write_store(tmp_path / "s", 3, inf_in_example_1, grouping="geometric",
                          group_names=GROUPS7, height=3, width=5, progress=False)


# ----------------------------------------------------------------------------- backends

from data_pipelines.teacher import backends, precompute  # noqa: E402
from xdistill_jax import semantics  # noqa: E402

H, W = 8, 12


def _source(n, h=H, w=W, seed=0):
    """A stand-in for a prepared split: source[i] -> {"id", "index", image frames, K}."""
    rng = np.random.default_rng(seed)
    ids = _ids(n)
    recs = []
    for i in range(n):
        frames = {k: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                  for k in ("image_m1", "image_0", "image_p1")}
        recs.append({"id": ids[i].encode(), "index": np.int64(i), "K": np.eye(4, dtype=np.float32),
                     **frames})
    return recs


def _grouped_numpy(class_logits, class_to_group):
    """Group logits = log(sum of exp of member logits), straight from the definition."""
    class_to_group = np.asarray(class_to_group)
    return np.stack([np.log(np.exp(class_logits[..., class_to_group == g].astype(np.float64)).sum(-1))
                     for g in range(class_to_group.max() + 1)], axis=-1)


def _onnx_1x1_conv(path, weight, bias, in_shape=None, out_shape=None, nhwc=False):
    """A 1x1-conv "segmentation net" (k classes); NCHW [N,3,H,W] -> [N,k,H,W] unless the
    declared shapes are given; nhwc: transposes around the conv (input and output NHWC)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k = weight.shape[0]
    if nhwc:
        nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
                 helper.make_node("Conv", ["xt", "w", "b"], ["lt"], kernel_shape=[1, 1]),
                 helper.make_node("Transpose", ["lt"], ["logits"], perm=[0, 2, 3, 1])]
    else:
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["logits"], kernel_shape=[1, 1])]
    graph = helper.make_graph(
        nodes,
        "tiny_seg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape or ["N", 3, H, W])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape or ["N", k, H, W])],
        [numpy_helper.from_array(weight.reshape(k, 3, 1, 1), "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_onnx_backend_matches_numpy(tmp_path):
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(19, 3)).astype(np.float32)
    bias = rng.normal(size=(19,)).astype(np.float32)
    _onnx_1x1_conv(tmp_path / "seg.onnx", weight, bias)
    src = _source(5)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    backend = backends.make_backend(f"onnx:{tmp_path / 'seg.onnx'}", mean=mean, std=std)
    assert backend.input_size == (H, W)  # read from the model's static input shape
    precompute.precompute(backend, src, tmp_path / "store", grouping="geometric", stride=1,
                          batch_size=2, shard_size=3, progress=False)
    st = store.TeacherLogitsSource(tmp_path / "store")
    for i in range(5):
        x = (src[i]["image_0"].astype(np.float64) / 255 - mean) / std
        expected = _grouped_numpy(x @ weight.T.astype(np.float64) + bias,
                                  semantics.GEOMETRIC.class_to_group)
        eid, logits = st[i]
        assert eid == _ids(5)[i]
        np.testing.assert_allclose(logits.astype(np.float64), expected, rtol=2e-3, atol=2e-3)


def test_onnx_class_order_and_class_count_errors(tmp_path):
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(2)
    weight = rng.normal(size=(21, 3)).astype(np.float32)
    bias = rng.normal(size=(21,)).astype(np.float32)
    _onnx_1x1_conv(tmp_path / "seg21.onnx", weight, bias)
    spec = f"onnx:{tmp_path / 'seg21.onnx'}"
    with pytest.raises(ValueError, match="outputs 21 classes but the grouping expects 19"):
        backends.make_backend(spec)
    # channel 0 is a background to drop, channels 1..19 are trainIds 18..0, channel 20 = car again
    order = [-1] + list(range(18, -1, -1)) + [13]
    b = backends.make_backend(spec, class_order=order, mean=(0, 0, 0), std=(1, 1, 1))
    img = _source(1)[0]["image_0"][None]
    out = b.class_logits(img, _ids(1))
    raw = img[0].astype(np.float64) / 255 @ weight.T.astype(np.float64) + bias
    np.testing.assert_allclose(out[0, ..., 0], raw[..., 19], rtol=1e-5, atol=1e-5)  # road
    np.testing.assert_allclose(out[0, ..., 13], np.logaddexp(raw[..., 6], raw[..., 20]),
                               rtol=1e-5, atol=1e-5)  # car: channels 6 and 20 merged
    with pytest.raises(ValueError, match=r"maps no model channel to teacher classes \[0\]"):
        backends.make_backend(spec, class_order=[-1, -1] + list(range(18, 0, -1)) + [13])
    twenty = semantics.Grouping("twenty", ("a", "b"), (0,) * 19 + (1,), tuple("abcdefghijklmnopqrst"))
    with pytest.raises(ValueError, match="teacher has 19 classes but grouping 'twenty' expects 20"):
        precompute.precompute(b, _source(1), tmp_path / "x", grouping=twenty)


def _write_label_pngs(root, ids, labels, template=backends.DEFAULT_TEMPLATE):
    from PIL import Image

    for eid, lab in zip(ids, labels):
        path = root / (template.format(**backends.parse_example_id(eid)) + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(lab.astype(np.uint8), mode="L").save(path)


def _loader_view(src, teacher, i, flip):
    from xdistill_jax import input_pipeline

    record, logits = input_pipeline.TripletSource(src, teacher)[i]
    return input_pipeline.make_example(record, input_pipeline.Augmentation(flip=flip), logits)


def test_labels_backend_round_trip_through_store_and_loader(tmp_path):
    src = _source(4)
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 19, (4, 2 * H, 2 * W))  # labels at twice the image size
    labels[:, 2, :7] = 255  # sampled by the nearest resize below (row 2 -> stored row 0)
    _write_label_pngs(tmp_path / "labels", _ids(4), labels)
    backend = backends.make_backend(f"labels:{tmp_path / 'labels'}")
    precompute.precompute(backend, src, tmp_path / "store", grouping="geometric", stride=2,
                          batch_size=3, progress=False)
    st = store.TeacherLogitsSource(tmp_path / "store")
    assert (st.height, st.width, st.num_groups) == (H // 2, W // 2, 7)
    from xdistill_jax.semantics import group_labels
    for i in range(4):
        # nearest from (2H,2W) to (H/2,W/2): pixel centres 4r+2, 4c+2
        want = group_labels(labels[i][2::4, 2::4].astype(np.uint8), "geometric")
        got = st[i][1]
        valid = want != 255
        assert (~valid).sum() == 2  # stored row 0, columns 0 and 1 (label columns 2 and 6)
        np.testing.assert_array_equal(got.argmax(-1)[valid], want[valid])
        assert (got[~valid] == 0).all()
    # loader: teacher logits come with the images, flipped together with them
    for flip in (False, True):
        ex = _loader_view(src, st, 2, flip)
        expect = st[2][1][:, ::-1] if flip else st[2][1]
        np.testing.assert_array_equal(ex["teacher"], expect)
        img = src[2]["image_0"][:, ::-1] if flip else src[2]["image_0"]
        np.testing.assert_array_equal(ex["color"][1], img)


def test_labels_of_several_sizes_in_one_batch_are_each_resized(tmp_path):
    """Raw KITTI frames differ in size by recording date (1242x375, 1226x370, ...), and the
    labels: backend refused a batch of label files of two sizes ("differ in size"), so a store of
    an external tool's KITTI-size labels could be written only at --batch-size 1. Now each size
    is resized on its own: the store equals the one written one example at a time."""
    src = _source(4)
    rng = np.random.default_rng(5)
    sizes = [(2 * H, 2 * W), (2 * H + 1, 2 * W + 1), (2 * H, 2 * W), (4 * H, 4 * W)]
    labels = [rng.integers(0, 19, s) for s in sizes]
    labels[1][2, :7] = 255  # sampled: stored row 0, columns 0 and 1 (label columns 2 and 6)
    _write_label_pngs(tmp_path / "labels", _ids(4), labels)
    backend = backends.make_backend(f"labels:{tmp_path / 'labels'}")
    assert isinstance(backend.class_logits(np.stack([r["image_0"] for r in src[:2]]), _ids(2)), list)
    for bs in (4, 1):
        precompute.precompute(backend, src, tmp_path / f"store{bs}", grouping="geometric",
                              stride=2, batch_size=bs, progress=False)
    together, alone = (store.TeacherLogitsSource(tmp_path / f"store{bs}") for bs in (4, 1))
    from xdistill_jax.semantics import group_labels
    for i in range(4):
        np.testing.assert_array_equal(together[i][1], alone[i][1])
        h0, w0 = sizes[i]  # nearest: the pixel whose centre is nearest the stored pixel's
        rows = np.floor((np.arange(H // 2) + 0.5) * h0 / (H // 2)).astype(int)
        cols = np.floor((np.arange(W // 2) + 0.5) * w0 / (W // 2)).astype(int)
        want = group_labels(labels[i][np.ix_(rows, cols)].astype(np.uint8), "geometric")
        valid = want != 255
        assert (~valid).sum() == (2 if i == 1 else 0)
        np.testing.assert_array_equal(together[i][1].argmax(-1)[valid], want[valid])
        assert (together[i][1][~valid] == 0).all()


def test_labels_backend_npy_logits_and_bad_files(tmp_path):
    root = tmp_path / "labels"
    ids = _ids(2)
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(H, W, 19)).astype(np.float32)
    p0 = root / (backends.parse_example_id(ids[0])["folder"]) / "semantic_02" / "data"
    p0.mkdir(parents=True)
    np.save(p0 / f"{0:010d}.npy", logits)
    b = backends.make_backend(f"labels:{root}")
    np.testing.assert_array_equal(b.load(ids[0], (H, W)), logits)
    with pytest.raises(ValueError, match=r"no teacher label file for example id '.* 0000000001 l'.*"
                                         r"semantic_02/data/0000000001.npy or .*0000000001.png"):
        b.load(ids[1], (H, W))
    _write_label_pngs(root, [ids[1]], [np.zeros((H, 2 * W))])  # wrong aspect ratio
    with pytest.raises(ValueError, match=r"0000000001.png is 8x24 \(HxW\), which does not have the "
                                         r"aspect ratio of the 8x12 image"):
        b.load(ids[1], (H, W))
    strict = backends.make_backend(f"labels:{root}", expected_size=(H, W))
    with pytest.raises(ValueError, match=r"0000000001.png is 8x24 \(HxW\), expected 8x12"):
        strict.load(ids[1], (H, W))
    np.save(p0 / f"{0:010d}.npy", logits[..., :7])
    with pytest.raises(ValueError, match="0000000000.npy has 7 classes, the grouping expects 19"):
        b.load(ids[0], (H, W))
    with pytest.raises(ValueError, match="unknown teacher backend kind 'torch'"):
        backends.make_backend("torch:/x")


# ----------------------------------------------------------------------------- flax teacher

def _cityscapes_dir(root, n=3, h=32, w=64):
    from PIL import Image

    rng = np.random.default_rng(5)
    for i in range(n):
        city = "aachen" if i < 2 else "bremen"
        stem = f"{city}_000000_{i:06d}"
        img_dir = root / "leftImg8bit" / "train" / city
        lab_dir = root / "gtFine" / "train" / city
        img_dir.mkdir(parents=True, exist_ok=True)
        lab_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            img_dir / f"{stem}_leftImg8bit.png")
        lab = rng.integers(0, 19, (h, w)).astype(np.uint8)
        lab[:4] = 255
        Image.fromarray(lab, mode="L").save(lab_dir / f"{stem}_gtFine_labelTrainIds.png")
    return root


def test_cityscapes_layout_pairs_and_missing_label(tmp_path):
    from data_pipelines.teacher import train_teacher as tt

    root = _cityscapes_dir(tmp_path / "cs")
    pairs = tt.cityscapes_pairs(root, "train")
    assert [p[0].name for p in pairs] == [f"{c}_000000_{i:06d}_leftImg8bit.png"
                                          for i, c in enumerate(("aachen", "aachen", "bremen"))]
    image, label = tt.load_pair(*pairs[2], 16, 32)
    assert image.shape == (16, 32, 3) and (label[:2] == 255).all() and label[2:].max() < 19
    # a label id that is no trainId (labelIds go to 33) is named, not trained as class 0
    from PIL import Image

    with Image.open(pairs[2][1]) as lb:
        ids = np.asarray(lb).copy()
    ids[5, 7], ids[6, 7] = 33, 200
    Image.fromarray(ids, mode="L").save(tmp_path / "labelIds.png")
    with pytest.raises(ValueError, match=r"label .*labelIds\.png: values \[33, 200\] are not trainIds "
                                         r"0\.\.18 or 255"):
        tt.load_pair(pairs[2][0], tmp_path / "labelIds.png", 16, 32)
    pairs[1][1].unlink()
    with pytest.raises(ValueError, match=r"label .*aachen_000000_000001_gtFine_labelTrainIds.png "
                                         r"missing for image"):
        tt.cityscapes_pairs(root, "train")
    with pytest.raises(ValueError, match="no images matching"):
        tt.cityscapes_pairs(root, "val")


@pytest.fixture(scope="session")
def flax_teacher(tmp_path_factory):
    """A tiny teacher trained for 2 steps by `xdistill teacher train` on the synthetic world."""
    import synth_world_tiny
    from xdistill_jax import cli

    work = tmp_path_factory.mktemp("teacher") / "work"
    argv = ["teacher", "train", "--data", str(synth_world_tiny.tiny_world()), "--layout", "synthetic",
            "--workdir", str(work), "--variant", "resnet18_tiny", "--height", "32", "--width", "64",
            "--batch-size", "2", "--steps", "2", "--save-every", "1"]
    assert cli.main(argv) == 0
    return work, argv


def test_flax_teacher_trains_saves_and_resumes(flax_teacher, capsys):
    from data_pipelines.teacher import train_teacher as tt
    from xdistill_jax import cli

    work, argv = flax_teacher
    cfg = tt.read_teacher_config(work)
    assert (cfg.variant, cfg.layout, cfg.steps) == ("resnet18_tiny", "synthetic", 2)
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    # rerunning the same command resumes from the last checkpoint: nothing left to train
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "'steps_run': 0" in capsys.readouterr().out
    model, variables, _, _ = tt.load_teacher(work)
    assert "encoder" in variables["params"] and "encoder" in variables["batch_stats"]
    # resuming under other settings is refused by name, and config.json is left as it was
    saved = (work / tt.CONFIG_FILE).read_bytes()
    other = [a if a != "32" else "64" for a in argv] + ["--lr", "0.5"]
    assert cli.main(other) == 1
    err = capsys.readouterr().err
    assert re.search(r"config\.json: the teacher checkpoint here was trained with other settings "
                     r"\(height: 32 -> 64; lr: 0\.001 -> 0\.5\)", err), err
    assert (work / tt.CONFIG_FILE).read_bytes() == saved


def test_an_unfinished_teacher_run_is_refused_and_resumes_without_its_pth(flax_teacher, tmp_path, capsys):
    """An interrupted `teacher train` (last checkpoint before its last step) was used by
    `precompute` as if finished, its store marked complete. And resuming a --pretrained run read
    the .pth again, though the checkpoint holds the weights: a moved file made the run impossible
    to resume. Both fixed; --workdir or --out that is a file is a one-line error, not a traceback."""
    import json
    import shutil

    from data_pipelines.teacher import train_teacher as tt
    from xdistill_jax import cli

    work, argv = flax_teacher
    part = tmp_path / "part"
    shutil.copytree(work, part)
    shutil.rmtree(part / "checkpoints" / "2")
    with pytest.raises(ValueError, match=r"flax teacher .*part: its last checkpoint is of step 1 of 2; "
                                         r"finish the run first"):
        backends.make_backend(f"flax:{part}")
    cfg = json.loads((part / tt.CONFIG_FILE).read_text())
    cfg["pretrained"] = str(tmp_path / "moved_away.pth")  # a --pretrained run whose file is gone
    (part / tt.CONFIG_FILE).write_text(json.dumps(cfg))
    resume = [a if a != str(work) else str(part) for a in argv] + ["--pretrained", cfg["pretrained"]]
    capsys.readouterr()
    assert cli.main(resume) == 0
    assert "'steps_run': 1" in capsys.readouterr().out
    assert tt.load_teacher(part)[3] == 2
    (tmp_path / "afile").write_text("x")
    assert cli.main([a if a != str(work) else str(tmp_path / "afile") for a in argv]) == 1
    assert capsys.readouterr().err.strip().endswith("--workdir " + str(tmp_path / "afile")
                                                    + " exists and is not a folder")


def test_flax_backend_round_trip_through_store_and_loader(flax_teacher, tmp_path):
    work = flax_teacher[0]
    src = _source(3, h=32, w=64)
    backend = backends.make_backend(f"flax:{work}")
    precompute.precompute(backend, src, tmp_path / "store", grouping="cityscapes_categories",
                          stride=4, batch_size=2, progress=False)
    st = store.TeacherLogitsSource(tmp_path / "store")
    assert (len(st), st.height, st.width, st.num_groups, st.grouping) == (
        3, 8, 16, 7, "cityscapes_categories")
    model, variables = backend.model, backend.variables
    images = np.stack([s["image_0"] for s in src]).astype(np.float32) / 255
    direct = model.apply(variables, images, train=False)  # stride 4: (3, 8, 16, 19)
    expected = np.asarray(semantics.group_logits(direct, "cityscapes_categories"))
    for i in range(3):
        np.testing.assert_allclose(st[i][1].astype(np.float32), expected[i], rtol=1e-2, atol=1e-2)
    ex = _loader_view(src, st, 1, True)
    np.testing.assert_array_equal(ex["teacher"], st[1][1][:, ::-1])
    # a flax teacher with the wrong class count for the grouping is named
    with pytest.raises(ValueError, match="flax teacher .* has 19 classes but the grouping expects 20"):
        backends.make_backend(f"flax:{work}", num_classes=20)


# ----------------------------------------------------------------------------- synthetic world

def test_synthetic_world_labels_through_prepare_precompute_cli_and_loader(tmp_path, capsys):
    import synth_world_tiny
    from data_pipelines.kitti import prepare, tfds_builder
    from data_pipelines.teacher import train_teacher as tt
    from xdistill_jax import cli
    from xdistill_jax.semantics import group_labels

    world = synth_world_tiny.tiny_world()
    prepare.prepare_split(world, world / "splits" / "train_files.txt", tmp_path / "tfds", "train",
                          32, 96)
    rc = cli.main(["teacher", "precompute", "--backend", f"labels:{world}", "--dataset",
                   str(tmp_path / "tfds"), "--split", "train", "--grouping", "geometric",
                   "--out", str(tmp_path / "store"), "--stride", "4", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    st = store.TeacherLogitsSource(tmp_path / "store")
    src = tfds_builder.open_split(tmp_path / "tfds", "train")
    pairs = tt.synthetic_pairs(world, "train")  # (image, label) paths in split order
    assert len(st) == len(src) == len(pairs) > 0
    from PIL import Image
    for i in range(len(st)):
        label = np.asarray(Image.open(pairs[i][1]))  # native 64x192 -> stored 8x24: centres 8r+4
        want = group_labels(label[4::8, 4::8], "geometric")
        eid, logits = st[i]
        assert eid == src[i]["id"].decode()
        valid = want != 255
        np.testing.assert_array_equal(logits.argmax(-1)[valid], want[valid])
        assert (logits[~valid] == 0).all()
    for flip in (False, True):
        ex = _loader_view(src, st, 1, flip)
        np.testing.assert_array_equal(ex["teacher"], st[1][1][:, ::-1] if flip else st[1][1])
    # the teacher trainer reads the same frames (synthetic layout)
    image, label = tt.load_pair(*pairs[0], 32, 64)
    assert image.shape == (32, 64, 3) and label.shape == (32, 64)
    # a store made for another split is refused by the loader, naming the mismatch
    from xdistill_jax import input_pipeline
    shuffled = [st[i] for i in range(len(st))][::-1]
    with pytest.raises(ValueError, match="teacher store record 0 has id"):
        input_pipeline.TripletSource(src, shuffled)[0]


def test_a_damaged_shard_names_the_file_record_and_example(tmp_path):
    """Bytes of a shard overwritten after the store was written (a partial copy, a bad disk):
    array_record's error ("Corrupted Riegeli/records file: ... hash mismatch") named neither the
    file nor the example. Now a DamagedStoreError names both, and the other shards still read."""
    from data_pipelines.damaged_store import DamagedStoreError

    ids = _ids(7)
    store.write_store(tmp_path / "s", 7, _fake_batch(ids), grouping="geometric", group_names=GROUPS7,
                      height=3, width=5, shard_size=3, batch_size=2, progress=False)
    shard = tmp_path / "s" / "logits-00001.array_record"  # examples 3, 4, 5
    data = bytearray(shard.read_bytes())
    for i in range(len(data) // 2 - 8, len(data) // 2 + 8):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    src = store.TeacherLogitsSource(tmp_path / "s")
    for i in (0, 2, 6):
        assert src[i][0] == ids[i]
    for i in (3, 5):
        with pytest.raises(DamagedStoreError) as e:
            src[i]
        assert re.search(rf"teacher store .*: .*logits-00001\.array_record, record {i - 3} \(example {i}\) "
                         r"cannot be read \(RuntimeError: Corrupted Riegeli.*\)\. The store is damaged .*"
                         r"`xdistill teacher precompute` again", str(e.value)), str(e.value)


# ------------------------------------------------------------ network teachers' faults

class _NetTeacher:
    """A network teacher's contract (`OnnxBackend` / `FlaxBackend`): resize "linear", NaN no
    "no opinion". class_logits gives random logits with `fill` at one value of example `bad`."""

    resize_method = "linear"
    nan_means_no_opinion = False
    num_classes = 19

    def __init__(self, fill, bad=1):
        self.fill, self.bad = fill, bad

    def describe(self):
        return {"backend": "onnx:/models/seg.onnx"}

    def class_logits(self, images, ids):
        out = np.random.default_rng(0).normal(size=images.shape[:3] + (19,)).astype(np.float32)
        for k, eid in enumerate(ids):
            if eid == _ids(9)[self.bad]:
                out[k, 3, 4, 5] = self.fill
        return out


@pytest.mark.parametrize("fill, kind", [(np.nan, "NaN"), (np.inf, r"\+inf"), (-np.inf, "-inf")])
def test_non_finite_logits_of_a_network_teacher_are_named_not_stored_as_ignored(tmp_path, fill, kind):
    """One NaN or inf at one pixel of a network teacher's logits: the antialiased resize spread
    it over the whole map, which was then stored as all-zero ("no opinion") logits: the example
    silently ignored (hard distillation loss 0). Now a ValueError naming the teacher (its
    backend spec) and the example, and the store is not completed."""
    with pytest.raises(ValueError, match=rf"teacher onnx:/models/seg\.onnx gave non-finite class "
                                         rf"logits \({kind}: 1 of {H * W * 19} values\) for example "
                                         r"'.* 0000000001 l' \(split index 1\)"):
        precompute.precompute(_NetTeacher(fill), _source(3), tmp_path / "s", stride=4,
                              batch_size=2, progress=False)
    with pytest.raises(ValueError, match="incomplete"):
        store.TeacherLogitsSource(tmp_path / "s")
    # the labels: backend's NaN is its label 255 ("no opinion": stored as all-zero logits, as
    # test_labels_backend_* check); an inf from it is an error all the same
    labels_like = _NetTeacher(np.inf)
    labels_like.nan_means_no_opinion, labels_like.resize_method = True, "nearest"
    with pytest.raises(ValueError, match=r"non-finite class logits \(\+inf: 1 of"):
        precompute.precompute(labels_like, _source(3), tmp_path / "s2", stride=4, progress=False)
    assert backends.LabelsBackend.nan_means_no_opinion and not backends.OnnxBackend.nan_means_no_opinion
    from data_pipelines.teacher.train_teacher import FlaxBackend
    assert not FlaxBackend.nan_means_no_opinion


def test_a_real_onnx_teacher_giving_inf_is_named(tmp_path):
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(19, 3)).astype(np.float32)
    bias = rng.normal(size=(19,)).astype(np.float32)
    bias[7] = np.inf
    _onnx_1x1_conv(tmp_path / "seg.onnx", weight, bias)
    backend = backends.make_backend(f"onnx:{tmp_path / 'seg.onnx'}")
    with pytest.raises(ValueError, match=rf"teacher onnx:{re.escape(str(tmp_path))}/seg\.onnx gave "
                                         r"non-finite class logits .* for example '.* 0000000000 l' "
                                         r"\(split index 0\)"):
        precompute.precompute(backend, _source(2), tmp_path / "s", stride=2, progress=False)


@pytest.mark.parametrize("static_batch, batch_size", [(1, 8), (2, 3), (4, 2)])
def test_onnx_model_of_a_static_batch_runs_with_any_batch_size(tmp_path, static_batch, batch_size):
    """The usual export has a static batch of 1 (input [1,3,H,W]): precompute's default
    --batch-size 8 crashed with onnxruntime's uncaught InvalidArgument. Now the backend runs
    chunks of the model's batch (the last one padded, its padding dropped)."""
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(19, 3)).astype(np.float32)
    bias = rng.normal(size=(19,)).astype(np.float32)
    _onnx_1x1_conv(tmp_path / "seg.onnx", weight, bias, in_shape=[static_batch, 3, H, W],
                   out_shape=[static_batch, 19, H, W])
    backend = backends.make_backend(f"onnx:{tmp_path / 'seg.onnx'}")
    assert backend.static_batch == static_batch and backend.input_size == (H, W)
    src = _source(5)
    precompute.precompute(backend, src, tmp_path / "store", stride=1, batch_size=batch_size,
                          shard_size=3, progress=False)
    st = store.TeacherLogitsSource(tmp_path / "store")
    for i in range(5):
        x = (src[i]["image_0"].astype(np.float64) / 255 - backends.IMAGENET_MEAN) / backends.IMAGENET_STD
        expected = _grouped_numpy(x @ weight.T.astype(np.float64) + bias, semantics.GEOMETRIC.class_to_group)
        assert st[i][0] == _ids(5)[i]
        np.testing.assert_allclose(st[i][1].astype(np.float64), expected, rtol=2e-3, atol=2e-3)


def test_onnx_errors_are_value_errors_naming_the_file(tmp_path):
    """A file that is not ONNX raised onnxruntime's InvalidProtobuf (a traceback from `xdistill
    teacher precompute`), a run onnxruntime refuses its InvalidArgument: now ValueErrors naming
    the .onnx file, on one line."""
    pytest.importorskip("onnxruntime")
    (tmp_path / "garbage.onnx").write_bytes(b"this is not an onnx model")
    with pytest.raises(ValueError, match=rf"onnx teacher model {re.escape(str(tmp_path))}/garbage\.onnx: "
                                         r"onnxruntime cannot load it \(InvalidProtobuf: .*\)$"):
        backends.make_backend(f"onnx:{tmp_path / 'garbage.onnx'}")
    rng = np.random.default_rng(1)
    _onnx_1x1_conv(tmp_path / "seg.onnx", rng.normal(size=(19, 3)).astype(np.float32),
                   rng.normal(size=(19,)).astype(np.float32))  # static H, W
    backend = backends.make_backend(f"onnx:{tmp_path / 'seg.onnx'}", input_size=(H + 2, W))
    with pytest.raises(ValueError, match=rf"onnx teacher model {re.escape(str(tmp_path))}/seg\.onnx: "
                                         rf"onnxruntime failed on a batch of input shape \(2, 3, {H + 2}, "
                                         rf"{W}\) \(InvalidArgument: [^\n]*\)$"):
        backend.class_logits(np.stack([s["image_0"] for s in _source(2)]), _ids(2))


def test_onnx_nhwc_model_with_the_default_layout_hints_at_the_layout(tmp_path):
    """An NHWC model run as NCHW (the default) was told "outputs 8 classes ... give a
    class_order" (8: its height). Now the message points at the layout option."""
    pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(19, 3)).astype(np.float32)
    bias = rng.normal(size=(19,)).astype(np.float32)
    path = tmp_path / "nhwc.onnx"
    _onnx_1x1_conv(path, weight, bias, in_shape=["N", H, W, 3], out_shape=["N", H, W, 19], nhwc=True)
    with pytest.raises(ValueError, match=r"input 'x' has shape \['N', 8, 12, 3\], not a NCHW batch of RGB "
                                         r"images \(3 channels\); its NHWC channel axis has 3: if the "
                                         r"model is NHWC, give layout='NHWC' \(--layout NHWC\)"):
        backends.make_backend(f"onnx:{path}")
    # an input of unknown sizes: the output's shape is the hint
    _onnx_1x1_conv(path, weight, bias, in_shape=["N", "h", "w", "c"], out_shape=["N", H, W, 19], nhwc=True)
    with pytest.raises(ValueError, match=r"outputs 8 classes but the grouping expects 19 teacher classes; "
                                         r"give a class_order; its NHWC channel axis has 19: if the model "
                                         r"is NHWC, give layout='NHWC' \(--layout NHWC\)"):
        backends.make_backend(f"onnx:{path}")
    with pytest.raises(ValueError, match=r"class_order has 19 entries but the model outputs 8 channels; "
                                         r"its NHWC channel axis has 19"):
        backends.make_backend(f"onnx:{path}", class_order=list(range(19)))
    # with layout NHWC it is the same net as an NCHW one
    out = backends.make_backend(f"onnx:{path}", layout="NHWC", input_size=(H, W)).class_logits(
        np.stack([s["image_0"] for s in _source(2)]), _ids(2))
    x = (np.stack([s["image_0"] for s in _source(2)]) / 255.0 - backends.IMAGENET_MEAN) / backends.IMAGENET_STD
    np.testing.assert_allclose(out, x @ weight.T + bias, rtol=1e-4, atol=1e-4)


# ------------------------------------------------ teacher stores checked against their splits

@pytest.fixture(scope="module")
def prepared_world(tmp_path_factory):
    """The tiny world's train (3 examples) and val (1) splits prepared at 32x96, and the train
    split's teacher store (labels: backend) written through `xdistill teacher precompute`."""
    import synth_world_tiny
    from data_pipelines.kitti import prepare
    from xdistill_jax import cli

    base = tmp_path_factory.mktemp("prepared")
    world = synth_world_tiny.tiny_world()
    for split in ("train", "val"):
        prepare.prepare_split(world, world / "splits" / f"{split}_files.txt", base / "tfds", split, 32, 96)
    rc = cli.main(["teacher", "precompute", "--backend", f"labels:{world}", "--dataset", str(base / "tfds"),
                   "--split", "train", "--out", str(base / "store_train"), "--no-progress"])
    assert rc == 0
    return base


def _store_config(base, **more):
    from xdistill_jax import config_defaults

    c = config_defaults.base_config()
    c.data.dataset_dir = str(base / "tfds")
    c.data.height, c.data.width = 32, 96
    c.distill.weight = 0.1
    c.optim.batch_size = 2
    c.data.teacher_dir = str(base / "store_train")
    for key, value in more.items():
        section, name = key.split(".")
        setattr(getattr(c, section), name, value)
    return c


def test_a_teacher_store_of_another_split_is_refused_at_setup_naming_it(prepared_world, tmp_path):
    """`data.val_teacher_dir` pointing at the train split's store passed setup; the loader's
    count check fired at the first validation (step run.val_every, 2000 by default), a
    ValueError naming neither the store nor the key. Now `tfds_training_data` (inside the setup
    checks, before anything compiles) raises a ConfigError naming the key, the store and the
    split; a store of another split file with the same count is caught by its recorded hash."""
    import shutil

    from xdistill_jax import config_utils, training_loop

    base = prepared_world
    train_store = base / "store_train"
    # the train split's store as the train split's passes
    assert training_loop.tfds_training_data(_store_config(base, **{"data.val_split": ""})).num_examples == 3
    with pytest.raises(config_utils.ConfigError,
                       match=rf"config\.data\.val_teacher_dir: the teacher store {re.escape(str(train_store))} "
                             rf"has 3 records but split 'val' in .*tfds has 1 examples: it was computed "
                             r"for another split \('train', its teacher\.json says\); precompute it for "
                             r"this one \(xdistill teacher precompute --split val\)"):
        training_loop.tfds_training_data(_store_config(base, **{"data.val_teacher_dir": str(train_store)}))
    # the train key, and a store of the right count whose split file is another one
    other = tmp_path / "store_other"
    shutil.copytree(train_store, other)
    meta = json.loads((other / "teacher.json").read_text())
    meta["fingerprint"] = "0" * 64
    (other / "teacher.json").write_text(json.dumps(meta))
    with pytest.raises(config_utils.ConfigError,
                       match=rf"config\.data\.teacher_dir: the teacher store {re.escape(str(other))} was "
                             r"computed from another split file than split 'train' in .* \(split_sha256 "
                             r"000000000000\.\.\. in its teacher\.json, [0-9a-f]{12}\.\.\. in the split's "
                             r"metadata\.json\), though both have 3 examples"):
        training_loop.tfds_training_data(_store_config(base, **{"data.teacher_dir": str(other),
                                                                "data.val_split": ""}))


def test_cli_train_with_a_val_store_of_another_split_exits_2_before_compiling(prepared_world, tmp_path,
                                                                                monkeypatch, capsys):
    from xdistill_jax import cli, train

    base = prepared_world
    compiled = []
    monkeypatch.setattr(train, "make_train_step", lambda *a, **k: compiled.append(1))
    monkeypatch.setattr(train, "create_train_state", lambda *a, **k: compiled.append(1))
    from eval_workdir import REPO

    workdir = tmp_path / "run"
    status = cli.main(["train", "--config", f"{REPO / 'configs' / 'synthetic_demo.py'}:smoke",
                       "--workdir", str(workdir), f"--config.data.dataset_dir={base / 'tfds'}",
                       "--config.optim.batch_size=2", "--config.mesh.num_devices=1",
                       "--config.distill.weight=0.1", f"--config.data.teacher_dir={base / 'store_train'}",
                       f"--config.data.val_teacher_dir={base / 'store_train'}"])
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    line = [x for x in err.splitlines() if x.startswith("xdistill train: ")]
    assert len(line) == 1 and re.search(r"config\.data\.val_teacher_dir: the teacher store .*store_train "
                                        r"has 3 records but split 'val'", line[0]), err[-2000:]
    assert "Traceback" not in err
    assert not compiled and not workdir.exists()


def test_loader_errors_name_the_teacher_store(tmp_path):
    """The loader's own checks (other callers than training's setup) name the store directory."""
    from xdistill_jax import input_pipeline

    write = lambda path, ids: store.write_store(path, len(ids), _fake_batch(ids), grouping="geometric",  # noqa: E731
                                                group_names=GROUPS7, height=3, width=5, progress=False)
    other_ids = [i.replace("drive_0001", "drive_0009") for i in _ids(4)]
    write(tmp_path / "short", other_ids[:3])
    write(tmp_path / "same_len", other_ids)
    src = _source(4)
    with pytest.raises(ValueError, match=rf"teacher store {re.escape(str(tmp_path / 'short'))} has 3 "
                                         r"records but the triplet split has 4 examples"):
        input_pipeline.TripletSource(src, store.TeacherLogitsSource(tmp_path / "short"))
    with pytest.raises(ValueError, match=rf"teacher store {re.escape(str(tmp_path / 'same_len'))} record 0 "
                                         r"has id '.*drive_0009.*' but triplet example 0 is"):
        input_pipeline.TripletSource(src, store.TeacherLogitsSource(tmp_path / "same_len"))[0]
