"""`xdistill predict`: magma table, test_simple-style resizing, depth units, outputs and bad input."""

import errno
import json
import os
import pathlib
import re
import shutil
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageOps

from eval_workdir import TEST_DRIVE, trained
from xdistill_jax import cli, colormap, inference, predict


def test_magma_table():
    # matplotlib's magma: entries 0, 100, 128 and 255 of its 256-entry table
    np.testing.assert_array_equal(colormap.magma(0.0), [0.001462, 0.000466, 0.013866])
    np.testing.assert_array_equal(colormap.magma(100 / 256), [0.537755, 0.156894, 0.506551])
    np.testing.assert_array_equal(colormap.magma(0.5), [0.716387, 0.214982, 0.475290])
    np.testing.assert_array_equal(colormap.magma(np.nextafter(0.5, 0)), colormap.magma(127 / 256))
    for x in (1.0, 2.0, 255 / 256):  # 1 and beyond: the last entry, as matplotlib's over colour
        np.testing.assert_array_equal(colormap.magma(x), [0.987053, 0.991438, 0.749504])
    np.testing.assert_array_equal(colormap.magma(-0.5), colormap.magma(0.0))
    lum = colormap.magma(np.linspace(0, 1, 64)) @ np.array([0.2126, 0.7152, 0.0722])
    assert np.all(np.diff(lum) > 0)  # perceptually ordered: brighter for nearer


def test_colorize_is_test_simples_matplotlib_colouring_byte_for_byte():
    """tests/data/magma_test_simple.npz: a float64 disparity map (values at the minimum, at bin
    edges k/256 of the normalised range, beyond the 95th percentile) coloured by matplotlib
    3.11.2 exactly as test_simple.py does: Normalize(vmin=disp.min(), vmax=np.percentile(disp,
    95)), ScalarMappable(cmap="magma").to_rgba(disp)[:, :, :3] * 255 cast to uint8; and a flat
    map. The 17-sample interpolated table before 2026-12-07 was up to 4 levels off."""
    ref = np.load(pathlib.Path(__file__).parent / "data" / "magma_test_simple.npz")
    rgb = colormap.colorize_disparity(ref["disp"])
    assert rgb.shape == ref["rgb"].shape and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, ref["rgb"])
    np.testing.assert_array_equal(colormap.colorize_disparity(np.full((3, 4), 0.2))[0, 0], ref["rgb_flat"])
    disp = np.linspace(1.0, 2.0, 200).reshape(10, 20)
    top = disp >= np.percentile(disp, 95)
    assert top.sum() == 10 and np.all(colormap.colorize_disparity(disp)[top] == [251, 252, 191])  # saturated
    # the training's val_disp image and the demo report's tiles are the same colouring: an early
    # network's map, 0.50-0.54, spans the table (the home-made ramp from 0 before 2026-12-07 made it
    # ~30 near-yellow colours)
    from xdistill_jax import metric_writer

    narrow = np.linspace(0.50, 0.54, 4096).reshape(64, 64)
    np.testing.assert_array_equal(metric_writer.colormap(narrow), colormap.colorize_disparity(narrow))
    assert len(np.unique(metric_writer.colormap(narrow).reshape(-1, 3), axis=0)) == 256


def test_depth_at_size_units():
    disp = np.full((4, 6), 0.25)
    d, depth = predict.depth_at_size(disp, 8, 12)
    assert d.shape == depth.shape == (8, 12) and depth.dtype == np.float32
    np.testing.assert_allclose(depth, 4.0)  # relative depth = 1 / scaled disparity
    np.testing.assert_allclose(predict.depth_at_size(disp, 8, 12, scale=5.4)[1], 21.6, rtol=1e-6)


def test_predict_from_checkpoint(tmp_path, capsys):
    t = trained()
    frames = t.world / TEST_DRIVE / "image_02" / "data"
    odd = tmp_path / "in" / "odd size.jpg"  # not the training size, not the world's size
    odd.parent.mkdir()
    Image.open(frames / "0000000003.png").resize((70, 50)).save(odd)
    out = tmp_path / "out"
    assert cli.main(["predict", "--workdir", str(t.workdir), "--out", str(out), "--batch-size", "3",
                     "--no-progress", str(frames), str(odd)]) == 0
    assert "wrote 9 depth maps" in capsys.readouterr().out
    rel = np.load(out / "0000000003_depth.npy")
    assert rel.shape == (64, 192) and rel.dtype == np.float32 and np.all(rel > 0)
    png = np.asarray(Image.open(out / "0000000003_disp.png"))
    assert png.shape == (64, 192, 3)
    assert np.load(out / "odd size_depth.npy").shape == (50, 70)
    assert Image.open(out / "odd size_disp.png").size == (70, 50)

    # the same, in metres: scale / disparity = scale x relative depth; the PNG does not change.
    # Same inputs and batch size as above, so the network sees the same batches: its outputs at
    # another batch size agree only to rounding, which can move a pixel's colour by one level.
    model = inference.load_workdir_model(t.workdir)
    written = predict.predict_paths(model, [frames, odd], tmp_path / "metric", scale=5.4, batch_size=3,
                                    show_progress=False)
    assert tmp_path / "metric" / "0000000003_depth.npy" in written
    np.testing.assert_allclose(np.load(tmp_path / "metric" / "0000000003_depth.npy"), 5.4 * rel, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "metric" / "0000000003_disp.png")), png)
    # and what the network sees: the frame resized with LANCZOS, its disparity resized back
    image, size = inference.load_resized(frames / "0000000003.png", 32, 96)
    scaled = inference.DepthPredictor(model, 1).predict(image[None])[0]
    np.testing.assert_allclose(rel, 1.0 / predict.evaluation.resize_linear(scaled, *size), rtol=1e-5)


def test_a_bf16_trained_workdir_is_predicted_in_float32(tmp_path):
    """A run trained with model.dtype bfloat16 keeps float32 weights; eval and predict built its
    networks in bf16, so disparities came out of a bf16 logit (208 distinct values of 3,072
    pixels, steps of 3 %). The shared workdir's checkpoint with its config saying bfloat16 (the
    weights' shapes and dtypes are the same) is predicted as the float32 one."""
    t = trained()
    bf16 = tmp_path / "bf16_run"
    shutil.copytree(t.workdir, bf16)
    config = json.loads((bf16 / "config.json").read_text())
    assert config["model"]["dtype"] == "float32"
    config["model"]["dtype"] = "bfloat16"
    (bf16 / "config.json").write_text(json.dumps(config))
    images = np.stack([inference.load_resized(p, 32, 96)[0]
                       for p in sorted((t.world / TEST_DRIVE / "image_02" / "data").glob("*.png"))[:4]])
    want = inference.DepthPredictor(inference.load_workdir_model(t.workdir), 4).predict(images)
    model = inference.load_workdir_model(bf16)
    assert model.depth_net.dtype == jnp.float32
    got = inference.DepthPredictor(model, 4).predict(images)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 0.9 * got.size  # no bf16 quantisation


def test_bad_inputs_are_named(tmp_path, capsys):
    good = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    model = inference.DepthModel(None, {}, None, None, 32, 96, 0.1, 100.0, None, "unused")
    with pytest.raises(ValueError, match="broken.png"):
        predict.predict_paths(model, [good, bad], tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()  # nothing computed or written before the check
    with pytest.raises(ValueError, match="input not found: .*missing.png"):
        predict.collect_inputs([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        predict.collect_inputs([tmp_path / "empty"])
    with pytest.raises(ValueError, match="would both write 'a_depth.npy'"):
        predict.collect_inputs([good, good])
    t = trained()
    assert cli.main(["predict", "--workdir", str(t.workdir), "--out", str(tmp_path / "o"), str(bad)]) == 2
    assert "broken.png" in capsys.readouterr().err


def _prediction(folder, stem):
    """What predict writes for `stem`: the .npy, then the PNG."""
    np.save(folder / f"{stem}_depth.npy", np.ones((8, 8), np.float32))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / f"{stem}_disp.png")


def test_inputs_leave_out_the_outputs_hidden_files_and_refuse_bad_images_before_compute(tmp_path):
    """--out inside an input folder (Monodepth2's test_simple writes next to its inputs): the
    predictions are not inputs of the next run. A truncated JPEG passes PIL's verify() and was
    found only after the images before it were written; a 16-bit image was clipped to white; an
    EXIF block PIL cannot parse stopped predict after the batches before it were written."""
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(frames / f"{name}.jpg")
    (frames / "depth").mkdir()
    _prediction(frames / "depth", "a")  # --out frames/depth
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(frames / ".a_disp.tmp123.png")  # a killed write
    assert predict.collect_inputs([frames]) == [(frames / "a.jpg", "a"), (frames / "b.jpg", "b")]
    _prediction(frames, "a")  # --out frames
    assert predict.collect_inputs([frames]) == [(frames / "a.jpg", "a"), (frames / "b.jpg", "b")]
    (frames / "a_depth.npy").unlink()  # a user's image that merely ends in _disp.png stays an input
    assert [stem for _, stem in predict.collect_inputs([frames])] == ["a", "a_disp", "b"]

    model = inference.DepthModel(None, {}, None, None, 32, 96, 0.1, 100.0, None, "unused")
    whole = (frames / "b.jpg").read_bytes()
    (frames / "b.jpg").write_bytes(whole[:len(whole) // 2])
    with Image.open(frames / "b.jpg") as im:
        im.verify()  # what the check used: it passes
    with pytest.raises(ValueError, match=r"cannot read image .*b\.jpg: OSError"):
        predict.predict_paths(model, [frames], tmp_path / "out", show_progress=False)
    (frames / "b.jpg").write_bytes(whole)
    # pixels that decode behind an EXIF block PIL cannot parse: the orientation step of the reading
    # raised SyntaxError (a traceback naming no file) after the batches before it were written
    Image.open(frames / "b.jpg").save(frames / "b.jpg", exif=b"Exif\x00\x00garbage-bytes-here")
    with Image.open(frames / "b.jpg") as im:
        im.load()  # decodes
    with pytest.raises(ValueError, match=r"cannot read the EXIF orientation of image .*b\.jpg: SyntaxError"):
        predict.predict_paths(model, [frames], tmp_path / "out", show_progress=False)
    with pytest.raises(ValueError, match=r"cannot read the EXIF orientation of image .*b\.jpg"):
        inference.load_resized(frames / "b.jpg", 32, 96, exif_orientation=True)
    assert inference.load_resized(frames / "b.jpg", 32, 96)[1] == (64, 64)  # evaluation reads the pixels
    (frames / "b.jpg").write_bytes(whole)
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(frames / "c16.png")
    with pytest.raises(ValueError, match=r"image .*c16\.png has mode I;16 \(16-bit or float samples\)"):
        predict.predict_paths(model, [frames], tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()  # nothing computed or written before the checks
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"--out .*file exists and is not a folder"):
        predict.predict_paths(model, [frames / "a.jpg"], tmp_path / "file", show_progress=False)
    with pytest.raises(ValueError, match=r"--scale must be a finite number > 0, got inf"):
        predict.predict_paths(model, [frames / "a.jpg"], tmp_path / "out", scale=float("inf"), show_progress=False)


def test_out_where_this_user_may_not_write_is_refused_before_anything_runs():
    """An --out this user may not write in (or make) was found only when the folder was made or the
    first map written, after the model loaded and the first batch ran."""
    base = pathlib.Path(tempfile.mkdtemp(prefix="xdistill_test_"))  # under /tmp: any user reaches it
    locked = base / "locked"
    try:
        base.chmod(0o755)
        image = base / "a.png"
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
        image.chmod(0o644)
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        (base / "open").mkdir()
        (base / "open").chmod(0o777)
        as_nobody = os.geteuid() == 0  # root writes anywhere: check as the user 'nobody' (65534)
        if as_nobody:
            os.seteuid(65534)
        try:
            with pytest.raises(ValueError, match=rf"--out {re.escape(str(locked))}: cannot write in it"):
                predict.prepare([image], locked)
            with pytest.raises(ValueError, match=rf"--out .*locked/sub/deeper: cannot make the folder in "
                                                 rf"{re.escape(str(locked))} \(permission denied"):
                predict.prepare([image], locked / "sub" / "deeper")
            assert predict.prepare([image], base / "open" / "out").out_dir == base / "open" / "out"
        finally:
            if as_nobody:
                os.seteuid(0)
        assert not any(locked.iterdir()) and not any((base / "open").iterdir())  # nothing made
    finally:
        locked.chmod(0o755)
        shutil.rmtree(base)


def test_a_failed_write_names_the_file_and_leaves_no_part(tmp_path):
    def write_half_then_fail(p):
        p.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ValueError, match=r"cannot write .*a_depth\.npy: No space left on device"):
        predict._save_atomic(tmp_path / "a_depth.npy", write_half_then_fail)
    assert list(tmp_path.iterdir()) == []


def test_earlier_outputs_are_never_inputs_wherever_they_are(tmp_path, capsys):
    """Predicting a folder in place and then into another --out read the first run's PNGs as
    images ("wrote 4 depth maps" for 2 images, rgb_disp_depth.npy...): only outputs under the
    *current* --out were left out. An output is the pair predict writes, wherever it lies."""
    t = trained()
    frames = t.world / TEST_DRIVE / "image_02" / "data"
    mine = tmp_path / "my_images"
    mine.mkdir()
    for name in ("0000000001", "0000000002"):
        shutil.copy(frames / f"{name}.png", mine / f"{name}.png")
    run = ["predict", "--workdir", str(t.workdir), "--no-progress"]
    assert cli.main(run + ["--out", str(mine), str(mine)]) == 0  # in place, as test_simple
    assert "wrote 2 depth maps" in capsys.readouterr().out
    assert cli.main(run + ["--out", str(mine / "again"), str(mine)]) == 0  # an out folder inside
    out = capsys.readouterr().out
    assert "wrote 2 depth maps" in out and "left out 2 earlier outputs" in out
    assert cli.main(run + ["--out", str(tmp_path / "elsewhere"), str(mine)]) == 0
    assert "wrote 2 depth maps" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == [
        "0000000001_depth.npy", "0000000001_disp.png", "0000000002_depth.npy", "0000000002_disp.png"]
    # named explicitly, an output is refused (not silently dropped, not predicted)
    assert cli.main(run + ["--out", str(tmp_path / "o2"), str(mine / "0000000001_disp.png")]) == 2
    assert "is a disparity map this tool wrote" in capsys.readouterr().err
    # a user's x_disp.png next to x.png, predicted in place, would be overwritten: refused
    shutil.copy(frames / "0000000003.png", mine / "x.png")
    shutil.copy(frames / "0000000004.png", mine / "x_disp.png")
    with pytest.raises(ValueError, match=r"predicting .*x\.png would overwrite the input .*x_disp\.png"):
        predict.prepare([mine], mine)


def test_symlinked_folders_are_searched_and_loops_named(tmp_path):
    """Path.rglob (Python < 3.13) does not enter symlinked folders: a folder of links to drives
    gave no images, silently; the help says folders are searched recursively."""
    drive = tmp_path / "drive1"
    drive.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(drive / "f.png")
    links = tmp_path / "links"
    links.mkdir()
    (links / "d1").symlink_to(drive)
    (links / "d2").symlink_to(drive, target_is_directory=True)  # twice: both names predicted
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(links / "top.png")
    assert predict.collect_inputs([links]) == [
        (links / "d1" / "f.png", "d1/f"), (links / "d2" / "f.png", "d2/f"), (links / "top.png", "top")]
    (drive / "up").symlink_to(links)  # links/d1/up -> links: a loop
    with pytest.raises(ValueError, match=r"links/d1/up links back to .*links \(a symlink loop\)"):
        predict.collect_inputs([links])
    (drive / "up").unlink()
    # a link to nothing was skipped without a word (until 2026-12-07)
    (links / "notes.txt").symlink_to(tmp_path / "moved" / "notes.txt")  # no input either way: ignored
    assert len(predict.collect_inputs([links])) == 3
    (links / "gone.png").symlink_to(tmp_path / "moved" / "gone.png")
    with pytest.raises(ValueError, match=r"links/gone\.png links to .*moved/gone\.png, which does not exist"):
        predict.collect_inputs([links])


def test_exif_orientation_is_applied_for_predict_only(tmp_path):
    """A phone photo stored 100x40 with orientation 6 is shown 40 wide x 100 high: its depth map
    is too. Evaluation's loading (no exif_orientation) is unchanged."""
    t = trained()
    frames = t.world / TEST_DRIVE / "image_02" / "data"
    photo = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.open(frames / "0000000003.png").convert("RGB").resize((100, 40)).save(photo, exif=exif)
    stored, size = inference.load_resized(photo, 32, 96)
    assert size == (40, 100)  # as evaluation reads files: the stored pixels
    turned, size = inference.load_resized(photo, 32, 96, exif_orientation=True)
    assert size == (100, 40)
    upright = ImageOps.exif_transpose(Image.open(photo).convert("RGB"))
    np.testing.assert_array_equal(turned, np.asarray(upright.resize((96, 32), Image.Resampling.LANCZOS)))
    assert cli.main(["predict", "--workdir", str(t.workdir), "--no-progress", "--out", str(tmp_path / "o"),
                     str(photo)]) == 0
    assert np.load(tmp_path / "o" / "photo_depth.npy").shape == (100, 40)
    assert Image.open(tmp_path / "o" / "photo_disp.png").size == (40, 100)


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size must be an integer > 0, got 0"),
    (["--batch-size", "-4"], "--batch-size must be an integer > 0, got -4"),
    (["--out", "FILE/sub"], "--out .*FILE/sub: cannot make the folder: .*FILE is a file"),
    (["--monodepth2", "MD2", "--step", "5"], "--step applies to --workdir checkpoints"),
])
def test_bad_options_exit_2_before_the_model_loads(tmp_path, capsys, monkeypatch, extra, message):
    """--batch-size 0 was taken as 1; --out below a file was a NotADirectoryError traceback after
    the model loaded; --step with --monodepth2 was ignored (`xdistill eval` refuses it)."""
    def load(*args, **kwargs):
        raise AssertionError("model loaded")

    monkeypatch.setattr(inference, "load_workdir_model", load)
    monkeypatch.setattr(inference, "load_monodepth2_model", load)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    (tmp_path / "FILE").write_text("x")
    extra = [str(tmp_path / a) if a in ("FILE/sub", "MD2") else a for a in extra]
    args = ["predict", "--no-progress"] + ([] if "--monodepth2" in extra else ["--workdir", str(tmp_path)])
    args += extra + ([] if "--out" in extra else ["--out", str(tmp_path / "o")]) + [str(image)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
