"""`prepare_split` / `xdistill prepare`: KITTI raw tree -> TFDS array_record triplets, read back
with `tfds.data_source` (no TensorFlow), idempotent re-runs, and bad input that fails naming
the file or split line without leaving a complete-looking dataset."""

from __future__ import annotations

import logging
import pathlib
import re
import shutil
import sys

import numpy as np
import pytest

import kitti_tiny
from data_pipelines.kitti import prepare, tfds_builder, triplets

H, W = 16, 48


@pytest.fixture(scope="session")
def tree(tmp_path_factory):
    return kitti_tiny.make_tree(tmp_path_factory.mktemp("kitti"))


@pytest.fixture(scope="session")
def prepared(tree, tmp_path_factory):
    raw, split = tree
    out = tmp_path_factory.mktemp("tfds")
    path = prepare.prepare_split(raw, split, out, "train", H, W)
    return out, path


def _assert_nothing_complete(out, split="train"):
    target = tfds_builder.dataset_dir(out, split)
    assert not target.exists()
    assert not list(out.rglob("dataset_info.json"))
    assert not list(out.rglob("*.array_record*")), "shard files left behind"


def test_records_equal_resized_source_in_split_order(tree, prepared):
    raw, split = tree
    out, path = prepared
    assert path == out / "kitti_triplets" / "train" / "1.0.0"
    import tensorflow_datasets as tfds

    source = tfds.data_source("kitti_triplets/train", split="train", data_dir=str(out))
    lines = kitti_tiny.split_lines(split)
    assert len(source) == len(lines) == 6
    for i, line in enumerate(lines):
        record = source[i]
        assert record["id"].decode() == line
        assert int(record["index"]) == i
        assert record["K"].dtype == np.float32
        np.testing.assert_array_equal(record["K"], triplets.MONODEPTH2_K)
        for key, offset in zip(("image_m1", "image_0", "image_p1"), (-1, 0, 1)):
            assert record[key].shape == (H, W, 3) and record[key].dtype == np.uint8
            np.testing.assert_array_equal(
                record[key], kitti_tiny.resized_source(raw, line, offset, H, W), err_msg=f"{line} {key}"
            )
    assert "tensorflow" not in sys.modules


def test_a_tree_converted_to_jpeg_as_monodepth2_suggests(tree, tmp_path):
    """Monodepth2's README converts KITTI's PNGs to JPEG (its loader reads .jpg by default):
    such a tree prepares from its .jpg frames, and one missing a frame names both names."""
    from PIL import Image

    raw, split = tree
    converted = tmp_path / "raw_jpg"
    shutil.copytree(raw, converted)
    pngs = [p for p in converted.rglob("image_0[23]/data/*.png")]
    for png in pngs:
        with Image.open(png) as im:
            im.convert("RGB").save(png.with_suffix(".jpg"), quality=92)
        png.unlink()
    path = prepare.prepare_split(converted, split, tmp_path / "out", "train", H, W)
    source = tfds_builder.open_split(tmp_path / "out", "train")
    for i, line in enumerate(kitti_tiny.split_lines(split)):
        frame = converted / kitti_tiny.source_image(raw, line, 0).relative_to(raw)
        with Image.open(frame.with_suffix(".jpg")) as im:
            want = np.asarray(im.convert("RGB").resize((W, H), Image.LANCZOS))
        np.testing.assert_array_equal(source[i]["image_0"], want)
    assert path.is_dir()
    frame.with_suffix(".jpg").unlink()
    with pytest.raises(ValueError, match=rf"missing frame: .*{frame.stem}\.png \(nor {frame.stem}\.jpg\)"):
        prepare.prepare_split(converted, split, tmp_path / "out2", "train", H, W)
    # half converted: a triplet whose frame 0 is a PNG and a neighbour only a JPEG is refused
    # (until 2026-12-07 each frame took its own format, the PNG where both existed)
    line = kitti_tiny.split_lines(split)[1]
    shutil.copy(kitti_tiny.source_image(raw, line, 0), converted / kitti_tiny.source_image(raw, line, 0).relative_to(raw))
    neighbour = converted / kitti_tiny.source_image(raw, line, -1).relative_to(raw)
    with pytest.raises(ValueError, match=rf"{split}:2 .*frame 0 is .*\.png but frame -1 exists only as "
                                         rf"{neighbour.with_suffix('.jpg')}"):
        prepare.prepare_split(converted, split, tmp_path / "out3", "train", H, W)
    _assert_nothing_complete(tmp_path / "out3")


def test_an_odometry_split_prepares_from_the_odometry_layout(tree, prepared, tmp_path):
    """The shipped odom/train_files.txt (`8 4056 r`: a sequence number, no drive folder) was read as
    a raw drive folder "8" ("missing neighbour frame ... 8/image_03/data/..."): its lines now read
    the KITTI odometry layout, sequences/%02d/image_{2,3}/%06d.png, as Monodepth2's
    KITTIOdomDataset does. The tiny tree's frames copied into that layout give the same records."""
    raw_root, split = tree
    lines = kitti_tiny.split_lines(split)
    odom = tmp_path / "odometry"
    sequence_of = {}
    odom_lines = []
    for line in lines:
        folder, frame, side = line.split()
        seq = sequence_of.setdefault(folder, len(sequence_of) + 3)
        for offset in (-1, 0, 1):
            target = (odom / "sequences" / f"{seq:02d}" / f"image_{2 if side == 'l' else 3}"
                      / f"{int(frame) + offset:06d}.png")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(kitti_tiny.source_image(raw_root, line, offset), target)
        odom_lines.append(f"{seq} {frame} {side}")
    odom_split = tmp_path / "odom_train_files.txt"
    odom_split.write_text("\n".join(odom_lines) + "\n")
    prepare.prepare_split(odom, odom_split, tmp_path / "out", "train", H, W)
    got, want = tfds_builder.open_split(tmp_path / "out", "train"), tfds_builder.open_split(prepared[0], "train")
    assert len(got) == len(want) == len(lines)
    for i, text in enumerate(odom_lines):
        assert got[i]["id"].decode() == text
        for key in ("image_m1", "image_0", "image_p1", "K"):
            np.testing.assert_array_equal(got[i][key], want[i][key], err_msg=f"{text} {key}")
    # per-drive calibration is a raw drive's file: refused, naming the line, before any image is read
    with pytest.raises(ValueError, match=rf"{odom_split}:1 .*an odometry sequence's line; --intrinsics calib"):
        prepare.prepare_split(odom, odom_split, tmp_path / "out_calib", "train", H, W, intrinsics="calib")
    _assert_nothing_complete(tmp_path / "out_calib")


def test_rerun_is_idempotent_and_other_settings_are_refused(tree, prepared, tmp_path, caplog):
    raw, split = tree
    out, path = prepared
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.iterdir()}
    assert prepare.prepare_split(raw, split, out, "train", H, W) == path
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.iterdir()} == before
    with pytest.raises(ValueError, match="exists with settings"):
        prepare.prepare_split(raw, split, out, "train", H, W, image_format="jpeg")
    with pytest.raises(ValueError, match="exists with settings.*'compression': 'zstd'"):
        prepare.prepare_split(raw, split, out, "train", H, W, compression="none")
    other = tmp_path / "other_split.txt"
    other.write_text(kitti_tiny.split_lines(split)[0] + "\n")
    with pytest.raises(ValueError, match="different split file"):
        prepare.prepare_split(raw, other, out, "train", H, W)
    # the same split from another raw tree (moved, or other data): left alone, and said
    assert tfds_builder.read_metadata(out, "train")["raw_dir"] == str(pathlib.Path(raw).absolute())
    moved = tmp_path / "moved_raw"
    shutil.copytree(raw, moved)
    with caplog.at_level(logging.WARNING, logger=prepare.__name__):
        assert prepare.prepare_split(moved, split, out, "train", H, W) == path
    assert f"{path} was prepared from {pathlib.Path(raw).absolute()}, not {moved}" in caplog.text
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in path.iterdir()} == before


def test_jpeg_calib_intrinsics_worker_pool_and_shards(tree, tmp_path):
    raw, split = tree
    path = prepare.prepare_split(
        raw, split, tmp_path, "val", H, W, image_format="jpeg", jpeg_quality=95,
        intrinsics="calib", num_workers=2, num_shards=3,
    )
    assert len(list(path.glob("*.array_record-*-of-00003"))) == 3
    source = tfds_builder.open_split(tmp_path, "val")
    lines = kitti_tiny.split_lines(split)
    assert [source[i]["id"].decode() for i in range(len(source))] == lines
    for i, line in enumerate(lines):
        record = source[i]
        cam = 2 if line.endswith(" l") else 3
        # P_rect_0X intrinsics divided by the native 100x30 image size, worked out by hand; the
        # principal point from KITTI's 1-based pixel coordinates to 0-based.
        fx, cx, fy, cy = 721.5377 / 100, 608.5593 / 100, 721.5377 / 30, 171.854 / 30
        want = np.array([[fx, 0, cx, 0], [0, fy, cy, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)
        np.testing.assert_allclose(record["K"], want, rtol=1e-6)
        ref = kitti_tiny.resized_source(raw, line, 0, H, W).astype(np.float64)
        err = np.abs(record["image_0"].astype(np.float64) - ref).mean()
        assert 0 < err < 6, (line, cam, err)  # lossy but close
    assert (path / "metadata.json").is_file()
    assert tfds_builder.read_metadata(tmp_path, "val")["settings"]["image_format"] == "jpeg"


def test_cli_prepare_removes_what_a_killed_run_left(tree, tmp_path, capsys):
    from xdistill_jax import cli

    raw, split = tree
    stale = tfds_builder.dataset_dir(tmp_path, "train").parent / "incomplete.X1Y2Z3_1.0.0"
    stale.mkdir(parents=True)  # what a killed run leaves
    (stale / "kitti_triplets-train.array_record-00000-of-00001").write_bytes(b"partial")
    args = ["prepare", "--raw", str(raw), "--split-file", str(split), "--out", str(tmp_path),
            "--split", "train", "--height", str(H), "--width", str(W)]
    assert cli.main(args) == 0
    assert str(tfds_builder.dataset_dir(tmp_path, "train")) in capsys.readouterr().out
    assert not stale.exists()
    assert cli.main(args[:-4] + ["--height", "12", "--width", str(W)]) == 1
    assert "multiples of 8" in capsys.readouterr().err


def test_cli_raw_format_with_stored_target_scales(tree, prepared, tmp_path):
    """`--format raw --target-scales --compression none`: the same pixels as the PNG store,
    plus the target's chain, in shards that array_record wrote uncompressed."""
    from tensorflow_datasets.core import file_adapters, shuffle
    from xdistill_jax import cli

    raw, split = tree
    tfds_writer = file_adapters.ArrayRecordFileAdapter.__dict__["write_examples"]
    tfds_shuffler = shuffle.Shuffler
    args = ["prepare", "--raw", str(raw), "--split-file", str(split), "--out", str(tmp_path),
            "--split", "train", "--height", str(H), "--width", str(W), "--format", "raw", "--target-scales",
            "--compression", "none", "--shards", "2"]
    assert cli.main(args) == 0
    # every shard's own header says uncompressed; the default store is TFDS's zstd
    path = tfds_builder.dataset_dir(tmp_path, "train")
    assert list(tfds_builder.shard_compressions(path).values()) == ["none", "none"]
    assert set(tfds_builder.shard_compressions(prepared[1]).values()) == {"zstd"}
    assert tfds_builder.read_metadata(tmp_path, "train")["settings"]["compression"] == "none"
    # TFDS's own writer is back once prepare is done
    assert file_adapters.ArrayRecordFileAdapter.__dict__["write_examples"] is tfds_writer
    assert shuffle.Shuffler is tfds_shuffler
    got = tfds_builder.open_split(tmp_path, "train")
    want = tfds_builder.open_split(prepared[0], "train")
    assert len(got) == len(want) > 0
    for i in range(len(want)):
        for key in ("image_m1", "image_0", "image_p1"):
            np.testing.assert_array_equal(got[i][key], want[i][key])
        for s, key in enumerate(triplets.TARGET_SCALE_KEYS):
            assert got[i][key].shape == (H >> (s + 1), W >> (s + 1), 3)


def test_writer_hooks_of_two_threads_take_turns():
    """TFDS's writer is one class attribute: a second thread's hook waits for the first to end
    (otherwise one prepare would write with the other's options), and TFDS's own is restored."""
    import threading
    import time

    from tensorflow_datasets.core import file_adapters, shuffle

    tfds_writer = file_adapters.ArrayRecordFileAdapter.__dict__["write_examples"]
    tfds_shuffler = shuffle.Shuffler
    order, inside, release = [], threading.Event(), threading.Event()

    def hold(name, options, event=None):
        with tfds_builder.tfds_writer_hooks(options):
            order.append(f"{name} in")
            if event is not None:
                inside.set()
                event.wait(10)
            order.append(f"{name} out")

    first = threading.Thread(target=hold, args=("first", "group_size:1,uncompressed", release))
    first.start()
    assert inside.wait(10)
    second = threading.Thread(target=hold, args=("second", "group_size:1"))
    second.start()
    time.sleep(0.2)
    assert order == ["first in"]
    release.set()
    first.join(10), second.join(10)
    assert order == ["first in", "first out", "second in", "second out"]
    assert file_adapters.ArrayRecordFileAdapter.__dict__["write_examples"] is tfds_writer
    assert shuffle.Shuffler is tfds_shuffler


def test_a_split_past_tfds_memory_buffer_is_written_without_tensorflow(tree, prepared, tmp_path, monkeypatch):
    """TFDS keeps the serialized records in memory up to 1 GB, then spills them to bucket files
    through TensorFlow: every real KITTI training split failed with "No module named
    'tensorflow'" (and with TF would have been sorted in RAM whole). Here TFDS's buffer is cut
    to one byte so that its spill would start at the first record: the split is written through
    `record_spill` instead, the same records in split order, nothing left beside the shards."""
    from tensorflow_datasets.core import shuffle

    raw, split = tree
    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1)
    out = tmp_path / "out"
    path = prepare.prepare_split(raw, split, out, "train", H, W)
    assert "tensorflow" not in sys.modules
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith("kitti_triplets-")) == [
        "dataset_info.json", "features.json", "metadata.json"]
    assert not list(out.rglob("*.spill")) and not list(out.glob("kitti_triplets/train/incomplete*"))
    spilled, reference = tfds_builder.open_split(out, "train"), tfds_builder.open_split(prepared[0], "train")
    assert len(spilled) == len(reference) == 6
    for i in range(len(reference)):
        a, b = spilled[i], reference[i]
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"record {i} {key}")


def test_record_spill_gives_records_in_key_order_and_refuses_repeated_keys(tmp_path):
    from tensorflow_datasets.core import shuffle

    from data_pipelines.kitti import record_spill

    spill = record_spill.RecordSpill(tmp_path, "salt", disable_shuffling=True)
    for key in (2, 0, 3, 1):
        spill.add(key, b"record %d" % key * (key + 1))
    assert spill.num_examples == 4 and spill.bucket_lengths == [4]
    assert spill.size == sum(len(b"record %d" % k * (k + 1)) for k in range(4))
    assert spill.path.is_file()
    assert list(spill) == [(k, b"record %d" % k * (k + 1)) for k in range(4)]
    assert not spill.path.exists(), "the spill file outlived the read"
    with pytest.raises(AssertionError, match="after __iter__"):
        spill.add(4, b"late")

    repeated = record_spill.RecordSpill(tmp_path, "salt", disable_shuffling=True)
    for key, data in ((1, b"a"), (0, b"b"), (1, b"c")):
        repeated.add(key, data)
    with pytest.raises(shuffle.DuplicatedKeysError):
        list(repeated)
    assert not repeated.path.exists()

    first_kept = record_spill.RecordSpill(tmp_path, "salt", disable_shuffling=True, ignore_duplicates=True)
    for key, data in ((1, b"a"), (0, b"b"), (1, b"c")):
        first_kept.add(key, data)
    assert list(first_kept) == [(0, b"b"), (1, b"a")]
    with pytest.raises(ValueError, match="disable_shuffling=True"):
        record_spill.RecordSpill(tmp_path, "salt")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ bad input


def test_shards_tfds_wrote_otherwise_are_not_left_complete(tree, tmp_path, monkeypatch):
    """A TFDS that no longer writes through the hook (simulated: a hook doing nothing) would
    leave zstd shards under metadata saying "none": refused, and nothing complete is left."""
    import contextlib

    raw, split = tree
    monkeypatch.setattr(tfds_builder, "tfds_writer_hooks", lambda options: contextlib.nullcontext())
    with pytest.raises(ValueError, match=r"asked for compression 'none', the installed TFDS wrote "
                                         r"\{'kitti_triplets-train.array_record-00000-of-00001': 'zstd'\}"):
        prepare.prepare_split(raw, split, tmp_path, "train", H, W, compression="none")
    _assert_nothing_complete(tmp_path)
    with pytest.raises(ValueError, match="compression must be one of"):
        prepare.prepare_split(raw, split, tmp_path, "train", H, W, compression="lz4")


@pytest.fixture
def bad_tree(tree, tmp_path):
    """A private copy of the tree that a test may damage."""
    raw, split = tree
    shutil.copytree(raw, tmp_path / "raw")
    shutil.copy(split, tmp_path / "train_files.txt")
    return tmp_path / "raw", tmp_path / "train_files.txt", tmp_path / "out"


def test_malformed_split_line(bad_tree):
    raw, split, out = bad_tree
    lines = split.read_text().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0]  # drop the side
    split.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"{split}:3"):
        prepare.prepare_split(raw, split, out, "train", H, W)
    _assert_nothing_complete(out)


def test_missing_neighbour_frame(bad_tree):
    raw, split, out = bad_tree
    lines = kitti_tiny.split_lines(split)
    (kitti_tiny.source_image(raw, lines[4], -1)).unlink()
    # A blank line first: the message must still give the line's real number in the file.
    split.write_text("\n" + "\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{split}:6 .*neighbour frame -1.*{1:010d}\.png \(nor {1:010d}\.jpg\)"):
        prepare.prepare_split(raw, split, out, "train", H, W)
    _assert_nothing_complete(out)


def test_shards_and_out_that_cannot_be_are_named_before_any_image_is_read(bad_tree, capsys):
    """--shards above the split's lines failed in TFDS after every image was encoded (an
    AssertionError traceback; -1: 46 KB of record bytes; 0 was taken as the default), and an --out
    below a file was a NotADirectoryError traceback. Now one line naming the option, exit 1."""
    from xdistill_jax import cli

    raw, split, out = bad_tree
    n = len(kitti_tiny.split_lines(split))
    for shards in (0, -1, n + 1):
        with pytest.raises(ValueError, match=rf"--shards must be from 1 to the split's {n} lines, got {shards}"):
            prepare.prepare_split(raw, split, out, "train", H, W, num_shards=shards)
    out.write_text("x")
    argv = ["prepare", "--raw", str(raw), "--split-file", str(split), "--split", "train", "--height", str(H),
            "--width", str(W)]
    assert cli.main(argv + ["--out", str(out / "tfds")]) == 1
    err = capsys.readouterr().err
    assert f"--out {out / 'tfds'}: cannot make the folder: {out} is a file" in err and "Traceback" not in err, err


def test_a_neighbour_of_another_size_and_a_first_frame_are_named(bad_tree):
    """A neighbour frame of another size than the target (a foreign or damaged file) was
    resized into the triplet silently; the first frame of a drive (no frame -1) was refused
    without naming the split line."""
    from PIL import Image

    raw, split, out = bad_tree
    lines = kitti_tiny.split_lines(split)
    odd = kitti_tiny.source_image(raw, lines[2], +1)
    with Image.open(odd) as image:
        small = image.resize((image.width // 2, image.height))
    small.save(odd)
    with pytest.raises(ValueError, match=rf"{split}:3 .*frames differ in size: .* {odd} {small.width}x{small.height}"):
        prepare.prepare_split(raw, split, out, "train", H, W)
    _assert_nothing_complete(out)

    first = lines[0].rsplit(" ", 2)[0] + " 0 " + lines[0].rsplit(" ", 1)[1]
    split.write_text("\n".join([lines[1], first]) + "\n")
    with pytest.raises(ValueError, match=rf"{split}:2 .*frame 0-1 is negative"):
        prepare.prepare_split(raw, split, out, "train", H, W)
    _assert_nothing_complete(out)


def test_corrupt_image_found_while_building(bad_tree):
    raw, split, out = bad_tree
    lines = kitti_tiny.split_lines(split)
    bad = kitti_tiny.source_image(raw, lines[3], +1)
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated PNG: the header is fine, data is not
    with pytest.raises(ValueError, match=rf"{split}:4 .*cannot decode image {bad}"):
        prepare.prepare_split(raw, split, out, "train", H, W)
    _assert_nothing_complete(out)


def test_missing_calibration_file(bad_tree):
    raw, split, out = bad_tree
    calib = raw / kitti_tiny.DATE / "calib_cam_to_cam.txt"
    calib.unlink()
    with pytest.raises(ValueError, match=rf"{split}:1 .*missing calibration file {calib}"):
        prepare.prepare_split(raw, split, out, "train", H, W, intrinsics="calib")
    _assert_nothing_complete(out)


def test_missing_calibration_key(bad_tree):
    raw, split, out = bad_tree
    calib = raw / kitti_tiny.DATE / "calib_cam_to_cam.txt"
    calib.write_text(kitti_tiny.calib_text(cameras=(2,)))  # no P_rect_03 (side "r")
    with pytest.raises(ValueError, match=rf"{split}:1 .*{calib}.*P_rect_03"):
        prepare.prepare_split(raw, split, out, "train", H, W, intrinsics="calib")
    _assert_nothing_complete(out)


def test_dataset_of_another_version_is_named(prepared, tmp_path):
    out, path = prepared
    other = tmp_path / "kitti_triplets" / "train" / "0.9.0"
    shutil.copytree(path, other)
    with pytest.raises(ValueError, match=r"kitti_triplets/train holds dataset version\(s\) 0\.9\.0, not 1\.0\.0"):
        tfds_builder.open_split(tmp_path, "train")
    assert len(tfds_builder.open_split(out, "train")) == 6


def test_split_fingerprint_names_the_content_not_the_place(tree, prepared, tmp_path):
    """What a multi-host run compares across hosts: a copy of the store elsewhere, or the same
    split prepared from a raw tree at another path, has the same fingerprint; other settings or
    another split file do not."""
    raw, split = tree
    out, _ = prepared
    fp = tfds_builder.split_fingerprint(out, "train")
    shutil.copytree(out, tmp_path / "copy")
    assert tfds_builder.split_fingerprint(tmp_path / "copy", "train") == fp
    moved = tmp_path / "moved_raw"
    shutil.copytree(raw, moved)
    prepare.prepare_split(moved, split, tmp_path / "from_moved", "train", H, W)
    assert tfds_builder.read_metadata(tmp_path / "from_moved", "train")["raw_dir"] != str(raw)
    assert tfds_builder.split_fingerprint(tmp_path / "from_moved", "train") == fp
    prepare.prepare_split(raw, split, tmp_path / "jpeg", "train", H, W, image_format="jpeg")
    assert tfds_builder.split_fingerprint(tmp_path / "jpeg", "train") != fp
    shorter = tmp_path / "shorter.txt"
    shorter.write_text("\n".join(kitti_tiny.split_lines(split)[:3]) + "\n")
    prepare.prepare_split(raw, shorter, tmp_path / "shorter", "train", H, W)
    assert tfds_builder.split_fingerprint(tmp_path / "shorter", "train") != fp


def test_prepare_leaves_nothing_in_the_temp_directory(tree, tmp_path, monkeypatch):
    """TFDS's builder constructor made an empty /tmp/tmp*tfds directory per prepared split (its
    GCS metadata lookup, off by default) and never removed it."""
    import tempfile

    raw, split = tree
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    prepare.prepare_split(raw, split, tmp_path / "out", "train", H, W)
    assert (tmp_path / "out" / "kitti_triplets" / "train" / "1.0.0" / "dataset_info.json").is_file()
    assert sorted(p.name for p in scratch.iterdir()) == []


def test_a_damaged_shard_names_the_file_record_and_example(prepared, tmp_path):
    """Bytes of a prepared split's shard overwritten (a partial copy, a bad disk): array_record's
    error named neither the file nor the example. `open_split` now raises DamagedStoreError naming
    the shard file, the record in it and the example; the undamaged records read as before."""
    from data_pipelines.damaged_store import DamagedStoreError

    out, _ = prepared
    shutil.copytree(out, tmp_path / "out")
    source = tfds_builder.open_split(tmp_path / "out", "train")
    ids = [r["id"] for r in source]  # the undamaged copy: iterable, every record
    assert len(ids) == len(source) == 6
    with pytest.raises(IndexError, match="index 6 out of range 0..5"):
        source[6]
    assert source[-1]["id"] == ids[-1]
    (shard,) = (tmp_path / "out").rglob("*.array_record-00000-of-00001")
    damaged = kitti_tiny.damage_shard(tmp_path / "out", lambda d, n: len(d) < n)  # some records, not all
    assert 0 < len(damaged) < 6, damaged
    source = tfds_builder.open_split(tmp_path / "out", "train")
    for i in range(6):
        if i not in damaged:
            assert source[i]["id"] == ids[i]
            continue
        with pytest.raises(DamagedStoreError) as e:
            source[i]
        assert re.search(rf"prepared split 'train': .*{re.escape(shard.name)}, record {i} \(example {i}, "
                         rf"the split file's entry {i + 1}\) cannot be read \(RuntimeError: Corrupted "
                         r"Riegeli.*\)\. The store is damaged .*`xdistill prepare`", str(e.value)), str(e.value)
