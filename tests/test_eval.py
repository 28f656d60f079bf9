"""`xdistill eval`: metrics by hand and vs Monodepth2's numbers, the padded jitted pipeline, Make3D
(synthetic world and a fake real-layout folder), pose ATE, checkpoints vs training-time validation,
and the bad-input messages."""

import json
import pathlib
import re

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from eval_workdir import trained
from xdistill_jax import cli, eval_depth, eval_pose, evaluation, inference

DATE = "2011_09_26"
FOLDER = f"{DATE}/{DATE}_drive_0001_sync"


class FixedDisparity(nn.Module):
    """A stand-in depth net: returns its (H,W) parameter as the sigmoid disparity of every image."""

    height: int
    width: int

    @nn.compact
    def __call__(self, x, train=False):
        disp = self.param("disp", nn.initializers.zeros, (self.height, self.width))
        return {0: jnp.broadcast_to(disp[None, :, :, None], x.shape[:3] + (1,))}


def fixed_model(scaled_disp: np.ndarray, min_depth=0.1, max_depth=100.0) -> inference.DepthModel:
    """A DepthModel whose scaled disparity (disp_to_depth(., min, max)[0]) is `scaled_disp`."""
    h, w = scaled_disp.shape
    sigmoid = (scaled_disp - 1.0 / max_depth) / (1.0 / min_depth - 1.0 / max_depth)
    return inference.DepthModel(FixedDisparity(h, w), {"params": {"disp": np.float32(sigmoid)}}, None, None,
                                h, w, min_depth, max_depth, None, "fixed")


def write_kitti_like(root: pathlib.Path, n: int, h: int, w: int, gt: np.ndarray):
    """n split lines of one drive with h x w PNGs and an export-gt style GT file; returns (split, gt)."""
    from PIL import Image

    folder = root / FOLDER / "image_02" / "data"
    folder.mkdir(parents=True)
    lines = []
    for i in range(n):
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(folder / f"{i:010d}.png")
        lines.append(f"{FOLDER} {i} l")
    split = root / "split.txt"
    split.write_text("\n".join(lines) + "\n")
    arrays = {f"depth_{i:05d}": gt for i in range(n)}
    np.savez_compressed(root / "gt.npz", files=np.array(lines), **arrays)
    return split, root / "gt.npz"


# --------------------------------------------------------------------------- metrics by hand


def test_constant_prediction_by_hand():
    gt = np.array([2.0, 4.0, 8.0])
    e = evaluation.compute_depth_errors(gt, np.full(3, 4.0))
    np.testing.assert_allclose([e["abs_rel"], e["sq_rel"], e["rmse"]], [0.5, 4.0 / 3.0, np.sqrt(20.0 / 3.0)])
    np.testing.assert_allclose(e["rmse_log"], np.log(2.0) * np.sqrt(2.0 / 3.0))
    assert (e["a1"], e["a2"], e["a3"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    # a constant disparity, median-scaled, becomes the median GT everywhere
    gt_map = np.zeros((4, 6))
    gt_map[1:3, 1:4] = [[2.0, 4.0, 8.0], [4.0, 2.0, 8.0]]
    e, ratio = eval_depth.score_kitti_image(gt_map, np.full((2, 3), 0.5), "eigen", crop=None)
    assert ratio == pytest.approx(4.0 / 2.0)  # median gt 4, predicted depth 1 / 0.5
    assert e["abs_rel"] == pytest.approx(0.5)


def test_benchmark_protocol_by_hand():
    """eigen_benchmark: every gt > 0 counts (85 m too), the prediction is clamped to 80 m."""
    gt = np.array([[0.0, 10.0, 85.0], [20.0, 0.0, 40.0]])
    e, ratio = eval_depth.score_kitti_image(gt, 3.0 / (gt + (gt == 0)), "eigen_benchmark")
    assert ratio == pytest.approx(3.0)  # depth = gt / 3, median-scaled back exactly ...
    expected_pred = np.array([10.0, 80.0, 20.0, 40.0])  # ... then 85 clamped to 80
    want = evaluation.compute_depth_errors(np.array([10.0, 85.0, 20.0, 40.0]), expected_pred)
    assert e == pytest.approx(want)
    e, ratio = eval_depth.score_kitti_image(gt, np.full((2, 3), 0.5), "eigen_benchmark", stereo=True)
    assert ratio is None and e["rmse"] == pytest.approx(np.sqrt(np.mean((np.array([10, 85, 20, 40]) - 10.8) ** 2)))


def test_make3d_scoring_by_hand():
    gt = np.linspace(5.0, 60.0, 55 * 305).reshape(55, 305)
    gt[20, :10] = 81.92  # scanner saturation: beyond the 70 m cap, not counted
    crop = eval_depth.make3d_gt_crop(gt)
    assert crop.shape == (21, 305) and crop[0, 0] == gt[17, 0] and crop[-1, -1] == gt[37, -1]
    e, ratio = eval_depth.score_make3d_image(crop, 3.0 / crop)  # depth = crop / 3 everywhere
    assert ratio == pytest.approx(3.0, rel=1e-6)
    assert e["abs_rel"] < 1e-9 and e["log10"] < 1e-9 and e["log10_abs"] < 1e-9 and e["a1"] == 1.0
    e, _ = eval_depth.score_make3d_image(crop, np.full((7, 50), 0.2))
    valid = crop[crop < 70]
    log_diff = np.log10(valid) - np.log10(np.median(valid))
    np.testing.assert_allclose(e["log10"], np.sqrt(np.mean(log_diff**2)))  # the authors' (Monodepth2's column)
    np.testing.assert_allclose(e["log10_abs"], np.mean(np.abs(log_diff)))  # the classic one
    # by hand: median 10 m both, no scaling; log10 differences -1, 0, +1 (cap raised for the 100 m)
    e, ratio = eval_depth.score_make3d_image(np.array([[1.0, 10.0, 100.0]]), np.full((1, 3), 0.1), max_depth=200.0)
    assert ratio == pytest.approx(1.0)
    assert (e["log10"], e["log10_abs"]) == pytest.approx((np.sqrt(2.0 / 3.0), 2.0 / 3.0))
    assert e["rmse_log"] == pytest.approx(np.log(10.0) * np.sqrt(2.0 / 3.0))  # natural log, as on KITTI
    assert eval_depth.make3d_crop_rows(2272, 1704) == (710, 1562)  # 852 central rows: 2:1



def test_shipped_test_lists():
    from data_pipelines.kitti import raw

    assert len(raw.read_split_file(eval_depth.shipped_split_file("eigen"))) == 697
    assert len(raw.read_split_file(eval_depth.shipped_split_file("eigen_benchmark"))) == 652
    with pytest.raises(FileNotFoundError, match="poses/09.txt"):  # the odom_09 list parses up to the poses
        eval_pose.odometry_sequence(pathlib.Path("/nonexistent"), "odom_09")


def test_pipeline_matches_monodepth2_fixture(ref, tmp_path):
    """The whole padded, jitted pipeline on a model that predicts the fixture's disparity."""
    gt, disp = ref["evalpipe_gt_depth"], ref["evalpipe_pred_disp"]
    split, gt_file = write_kitti_like(tmp_path, 3, *gt.shape, gt)
    model = fixed_model(disp.astype(np.float64))
    for stereo, key in ((False, "evalpipe_errors"), (True, "evalpipe_errors_stereo")):
        res = eval_depth.evaluate_kitti(model, tmp_path, split, gt_file, stereo=stereo, batch_size=2,
                                        show_progress=False)  # 3 images: one full batch, one padded
        assert res.summary["num_images"] == 3 and [r["index"] for r in res.rows] == [0, 1, 2]
        np.testing.assert_allclose(evaluation.errors_as_array(res.summary), ref[key], rtol=1e-5)
    res = eval_depth.evaluate_kitti(model, tmp_path, split, gt_file, batch_size=4, show_progress=False)
    np.testing.assert_allclose(res.summary["ratio_median"], ref["evalpipe_ratio"], rtol=1e-5)
    e = evaluation.compute_depth_errors(ref["err_gt"], ref["err_pred"])
    np.testing.assert_allclose(evaluation.errors_as_array(e), ref["err_out"], rtol=1e-12)



def test_post_process_in_the_pipeline(tmp_path):
    """--post-process runs the mirrored image too and blends the two as Monodepth2 does. The stand-in
    net ignores its input, so its "mirrored" prediction is the same map, flipped back by the blend."""
    gt = np.zeros((20, 40), np.float32)
    gt[10:19, 2:38] = np.linspace(3.0, 70.0, 9 * 36).reshape(9, 36)
    split, gt_file = write_kitti_like(tmp_path, 2, 20, 40, gt)
    disp = np.tile(np.linspace(0.05, 0.5, 40), (20, 1))  # asymmetric left-right
    model = fixed_model(disp)
    res = eval_depth.evaluate_kitti(model, tmp_path, split, gt_file, post_process=True, show_progress=False)
    blended = evaluation.post_process_disparity(disp, disp)
    assert not np.allclose(blended, disp)
    want, _ = evaluation.eval_eigen_image(gt, blended)
    np.testing.assert_allclose(evaluation.errors_as_array(res.summary), evaluation.errors_as_array(want), rtol=1e-5)


def test_fake_real_make3d_layout(tmp_path):
    """Real sizes (2272 x 1704 JPEGs, 55 x 305 x 4 grids): a constant prediction scores as worked out."""
    import scipy.io
    from PIL import Image

    (tmp_path / "Test134").mkdir()
    (tmp_path / "Gridlaserdata").mkdir()
    rng = np.random.default_rng(0)
    crops = []
    for name in ("op1-p-108t000", "op2-p-169t000"):
        Image.fromarray(np.zeros((2272, 1704, 3), np.uint8)).save(tmp_path / "Test134" / f"img-{name}.jpg")
        grid = rng.uniform(2.0, 90.0, (55, 305, 4))
        scipy.io.savemat(tmp_path / "Gridlaserdata" / f"depth_sph_corr-{name}.mat", {"Position3DGrid": grid})
        crops.append(grid[17:38, :, 3])
    res = eval_depth.evaluate_make3d(fixed_model(np.full((64, 128), 0.25)), tmp_path, batch_size=4,
                                     show_progress=False)
    assert res.summary["num_images"] == 2 and res.metric_keys == evaluation.MAKE3D_METRIC_KEYS
    per = []
    for c in crops:
        g = c[(c > 0) & (c < 70)]
        per.append(np.mean(np.abs(g - np.median(g)) / g))
    np.testing.assert_allclose(res.summary["abs_rel"], np.mean(per), rtol=1e-6)  # GT read as float32


# ------------------------------------------------------------------------------------ pose


def test_ate_by_hand():
    gt = np.array([[0.0, 0, 0], [1.0, 0, 0]])
    assert eval_pose.compute_ate(gt, np.array([[5.0, 5, 5], [5.0, 6, 5]])) == pytest.approx(0.5)  # scale 0
    assert eval_pose.compute_ate(gt, np.array([[0.0, 0, 0], [3.0, 0, 0]])) == pytest.approx(0.0)  # scale 1/3
    track = np.cumsum(np.random.default_rng(0).normal(size=(7, 3)), 0)
    poses = np.tile(np.eye(4), (7, 1, 1))
    poses[:, :3, 3] = track
    rel = eval_pose.relative_transforms(poses)
    # frame i -> frame i+1 maps the origin of frame i to minus the motion
    np.testing.assert_allclose(rel[0][:3, 3], track[0] - track[1])
    scaled = rel.copy()
    scaled[:, :3, 3] *= 2.5  # monocular scale ambiguity: aligned away
    ates = eval_pose.snippet_ates(rel, scaled)
    assert len(ates) == 6 and np.max(ates) < 1e-12
    wrong = rel.copy()
    wrong[:, :3, 3] = 0.0
    ates = eval_pose.snippet_ates(rel, wrong)  # zero motion: scale 0, the error is the GT track
    pos = eval_pose.chain_positions(rel[:4])
    assert ates[0] == pytest.approx(np.sqrt(np.sum(pos**2)) / 5)


def test_pose_gt_from_synthetic_oxts_and_odometry_layout(tmp_path):
    """Camera poses from oxts + calibration move ~0.7-1 m forward per frame (the world drives 7-10 m/s at
    10 Hz); the same frames in the KITTI odometry layout evaluate to the same ATE as from the raw layout."""
    t = trained()
    seq = eval_pose.raw_sequence(t.world, t.splits / "test_files.txt")
    rel = eval_pose.relative_transforms(seq.poses)
    step = rel[:, :3, 3]
    assert np.all((np.linalg.norm(step, axis=1) > 0.6) & (np.linalg.norm(step, axis=1) < 1.1))
    assert np.all(step[:, 2] < -0.9 * np.linalg.norm(step, axis=1))  # a static point comes closer (z)
    model = inference.load_workdir_model(t.workdir)
    raw_res = eval_pose.evaluate_pose(model, seq, batch_size=3, show_progress=False)
    assert raw_res["num_snippets"] == 7 and raw_res["ate_mean"] > 0

    import shutil
    (tmp_path / "sequences" / "09" / "image_2").mkdir(parents=True)
    (tmp_path / "poses").mkdir()
    lines = []
    for i, p in enumerate(seq.images):
        shutil.copy(p, tmp_path / "sequences" / "09" / "image_2" / f"{i:06d}.png")
        if i < len(seq.images) - 1:
            lines.append(f"9 {i} l")
    (tmp_path / "poses" / "09.txt").write_text(
        "\n".join(" ".join(f"{v:.12e}" for v in p[:3].ravel()) for p in seq.poses) + "\n")
    (tmp_path / "test_files_09.txt").write_text("\n".join(lines) + "\n")
    odom = eval_pose.odometry_sequence(tmp_path, "odom_09", tmp_path / "test_files_09.txt")
    res = eval_pose.evaluate_pose(model, odom, batch_size=3, show_progress=False)
    np.testing.assert_allclose([res["ate_mean"], res["ate_std"]], [raw_res["ate_mean"], raw_res["ate_std"]],
                               rtol=1e-6)
    # side r reads image_3 (Monodepth2's side map; was image_2 whatever the side), a JPEG tree its
    # .jpg frames (was: "images missing"); the same frames (PNG bytes under .jpg names) give the same ATE
    (tmp_path / "sequences" / "09" / "image_2").rename(tmp_path / "sequences" / "09" / "image_3")
    for png in (tmp_path / "sequences" / "09" / "image_3").glob("*.png"):
        png.rename(png.with_suffix(".jpg"))
    (tmp_path / "test_files_09.txt").write_text("\n".join(line[:-1] + "r" for line in lines) + "\n")
    odom = eval_pose.odometry_sequence(tmp_path, "odom_09", tmp_path / "test_files_09.txt")
    assert odom.images[0] == tmp_path / "sequences" / "09" / "image_3" / "000000.jpg"
    res = eval_pose.evaluate_pose(model, odom, batch_size=3, show_progress=False)
    np.testing.assert_allclose([res["ate_mean"], res["ate_std"]], [raw_res["ate_mean"], raw_res["ate_std"]],
                               rtol=1e-6)


# ------------------------------------------------------------------------- from checkpoints


def test_checkpoint_eval_equals_training_validation():
    t = trained()
    val = [json.loads(s) for s in (t.workdir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["split"] == "val" and r["step"] == 2]
    assert len(val) == 1 and "abs_rel" in val[0]
    model = inference.load_workdir_model(t.workdir, step=2)
    assert (model.step, model.height, model.width) == (2, 32, 96)
    res = eval_depth.evaluate_kitti(model, t.world, t.splits / "val_files.txt", t.gt_val, batch_size=4,
                                    show_progress=False)
    assert res.summary["num_images"] == val[0]["num_images"]
    for k in evaluation.METRIC_KEYS + ("ratio_median",):
        np.testing.assert_allclose(res.summary[k], val[0][k], rtol=1e-5, err_msg=k)


def test_cli_eval_kitti_make3d_and_pose(capsys):
    t = trained()
    test_split = t.splits / "test_files.txt"
    assert cli.main(["eval", "--workdir", str(t.workdir), "--split", "eigen", "--data", str(t.world),
                     "--split-file", str(test_split), "--gt", str(t.gt_test), "--batch-size", "3",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Scaling ratios | med:" in out and "abs_rel" in out and "(8 images)" in out
    summary = json.loads((t.workdir / "eval" / "eigen-test_files-step2.json").read_text())
    assert set(evaluation.METRIC_KEYS) | {"num_images"} <= set(summary) and summary["num_images"] == 8
    rows = (t.workdir / "eval" / "eigen-test_files-step2.csv").read_text().splitlines()
    ids = [r.split(",")[1] for r in rows[1:]]
    assert rows[0].startswith("index,id,abs_rel") and len(ids) == 8 == len(set(ids))  # each image once
    np.testing.assert_allclose(np.mean([float(r.split(",")[2]) for r in rows[1:]]), summary["abs_rel"])
    # other settings write their own files (they replaced the plain results until 2026-12-07)
    assert cli.main(["eval", "--workdir", str(t.workdir), "--split", "eigen", "--data", str(t.world),
                     "--split-file", str(test_split), "--gt", str(t.gt_test), "--batch-size", "3",
                     "--no-progress", "--stereo", "--post-process", "--crop", "none"]) == 0
    assert "wrote " + str(t.workdir / "eval" / "eigen-test_files-step2-stereo-pp-nocrop.json") in capsys.readouterr().out
    other = json.loads((t.workdir / "eval" / "eigen-test_files-step2-stereo-pp-nocrop.json").read_text())
    assert other["settings"]["stereo"] and other["settings"]["post_process"] and other["settings"]["crop"] is None
    assert json.loads((t.workdir / "eval" / "eigen-test_files-step2.json").read_text()) == summary

    assert cli.main(["eval", "--workdir", str(t.workdir), "--split", "make3d", "--data", str(t.world / "make3d"),
                     "--no-progress"]) == 0
    summary = json.loads((t.workdir / "eval" / "make3d-step2.json").read_text())
    assert summary["num_images"] == 2 and summary["log10"] > 0 and summary["log10_abs"] > 0
    assert "log10" in capsys.readouterr().out.splitlines()[2]

    assert cli.main(["eval", "--workdir", str(t.workdir), "--pose", "--data", str(t.world), "--split-file",
                     str(test_split), "--batch-size", "3", "--no-progress"]) == 0
    summary = json.loads((t.workdir / "eval" / "pose-test_files-step2.json").read_text())
    assert summary["num_snippets"] == 7 and summary["ate_mean"] > 0


# ----------------------------------------------------------------------------------- bad input


def test_bad_checkpoint_steps_and_workdirs(tmp_path, capsys):
    t = trained()
    with pytest.raises(inference.ModelLoadError, match=r"no checkpoint at step 7; available steps: 1, 2"):
        inference.load_workdir_model(t.workdir, step=7)
    assert cli.main(["eval", "--workdir", str(t.workdir), "--step", "7", "--data", str(t.world), "--gt",
                     str(t.gt_test)]) == 2
    assert "available steps: 1, 2" in capsys.readouterr().err
    empty = tmp_path / "run"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json does not exist"):
        inference.load_workdir_model(empty)
    (empty / "config.json").write_text((t.workdir / "config.json").read_text())
    with pytest.raises(inference.ModelLoadError, match="has no checkpoints"):
        inference.load_workdir_model(empty)
    assert not (empty / "checkpoints").exists()  # looking did not create anything


def test_a_damaged_latest_checkpoint_falls_back_unless_its_step_is_asked_for(tmp_path, caplog):
    """As training resumes: without --step the latest checkpoint that restores, with a warning
    naming the damaged one; --step of the damaged one says it is damaged (not that it "does not
    match the config")."""
    import logging
    import shutil

    from xdistill_jax.checkpoints import CheckpointError

    t = trained()
    work = tmp_path / "run"
    shutil.copytree(t.workdir, work)
    latest = work / "checkpoints" / "2"
    for d in {p.parent for p in (latest / "state").rglob("*") if p.is_file() and p.parent.name == "d"}:
        shutil.rmtree(d)
    with caplog.at_level(logging.WARNING, logger="xdistill_jax.checkpoints"):
        model = inference.load_workdir_model(work)
    assert model.step == 1
    assert f"restored checkpoint {work / 'checkpoints' / '1'} instead of the damaged {latest}" in caplog.text
    with pytest.raises(CheckpointError, match=rf"checkpoint {re.escape(str(latest))} cannot be read: "
                                              r"damaged or incomplete"):
        inference.load_workdir_model(work, step=2)


def test_gt_not_matching_split_and_unreadable_image(tmp_path):
    gt = np.ones((6, 8), np.float32)
    split, gt_file = write_kitti_like(tmp_path, 3, 6, 8, gt)
    lines = split.read_text().splitlines()
    swapped = tmp_path / "swapped.txt"
    swapped.write_text("\n".join([lines[0], lines[2], lines[1]]) + "\n")
    model = fixed_model(np.full((6, 8), 0.1))
    with pytest.raises(ValueError, match=rf"entry 1 is '{FOLDER} 1 l' but split line 2 is '{FOLDER} 2 l'"):
        eval_depth.evaluate_kitti(model, tmp_path, swapped, gt_file, show_progress=False)
    longer = tmp_path / "longer.txt"
    longer.write_text(split.read_text() + f"{FOLDER} 9 l\n")
    with pytest.raises(ValueError, match=r"3 depth maps for a split of 4 lines; first unmatched split line 4"):
        eval_depth.evaluate_kitti(model, tmp_path, longer, gt_file, show_progress=False)
    bad = tmp_path / FOLDER / "image_02" / "data" / "0000000001.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="0000000001.png"):
        eval_depth.evaluate_kitti(model, tmp_path, split, gt_file, show_progress=False)
    bad.unlink()
    with pytest.raises(ValueError, match=r"image of split line .* 1 l' not found"):
        eval_depth.evaluate_kitti(model, tmp_path, split, gt_file, show_progress=False)


def test_bad_gt_files_and_entries_exit_2_before_inference(tmp_path, capsys, monkeypatch):
    """`xdistill eval` with a --gt that is no .npz, or has an entry that is no (H,W) map or has no
    pixel its protocol scores (Monodepth2: NaN for every mean): exit 2, one line naming the file,
    the entry and its split line; the model never runs."""
    good = np.zeros((15, 40), np.float32)
    good[8:14, 2:38] = 5.0
    split, gt_file = write_kitti_like(tmp_path, 3, 15, 40, good)
    lines = split.read_text().splitlines()
    model = fixed_model(np.full((8, 24), 0.1, np.float32))
    monkeypatch.setattr(inference, "load_workdir_model", lambda workdir, step=None: model)

    def no_inference(*args, **kwargs):
        raise AssertionError("the model ran before the GT was checked")

    np.save(tmp_path / "gt.npy", np.stack([good] * 3))
    (tmp_path / "trunc.npz").write_bytes(gt_file.read_bytes()[:200])
    cases = [("eigen", tmp_path / "gt.npy", "is a single .npy array, not an .npz archive"),
             ("eigen", tmp_path / "trunc.npz", "cannot be read as an .npz archive")]
    for name, protocol, entries, message in [
            ("hw1.npz", "eigen_benchmark", [good, good[..., None], good],
             f"entry 1 (split line 2: '{lines[1]}') has shape (15, 40, 1), expected a 2-D (H,W) depth map"),
            ("zero_eigen.npz", "eigen", [good, good, np.zeros_like(good)],
             f"entry 2 (split line 3: '{lines[2]}') has no pixel with 0.001 < gt < 80.0 m inside the Garg crop"),
            ("zero_bench.npz", "eigen_benchmark", [good, np.zeros_like(good), good],
             f"entry 1 (split line 2: '{lines[1]}') has no pixel with 0 < gt (eigen_benchmark)")]:
        np.savez_compressed(tmp_path / name, files=np.array(lines), **{f"depth_{i:05d}": g for i, g in enumerate(entries)})
        cases.append((protocol, tmp_path / name, message))
    out = tmp_path / "out"
    for protocol, path, message in cases:
        with monkeypatch.context() as m:
            m.setattr(eval_depth, "DepthPredictor", no_inference)
            with pytest.raises(ValueError, match=re.escape(message)):
                eval_depth.evaluate_kitti(model, tmp_path, split, path, protocol=protocol, show_progress=False)
            assert cli.main(["eval", "--workdir", str(tmp_path), "--split", protocol, "--data", str(tmp_path),
                             "--gt", str(path), "--split-file", str(split), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("xdistill eval: ") and str(path) in err and message in err, err
        assert "Traceback" not in err and len(err.splitlines()) == 1 and not out.exists()
    # the good file through the same command (the GT maps are all 5 m: exact after median scaling)
    assert cli.main(["eval", "--workdir", str(tmp_path), "--split", "eigen", "--data", str(tmp_path), "--gt",
                     str(gt_file), "--split-file", str(split), "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "eigen-split-stepNone.json").read_text())["abs_rel"] == pytest.approx(0.0, abs=1e-6)


def test_a_results_folder_that_cannot_be_written_exits_2_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """--out a file, --out below a file, or WORKDIR/eval a file (no --out): the model loaded and
    scored every image, then a FileExistsError / NotADirectoryError traceback (exit 1)."""
    def load(*args, **kwargs):
        raise AssertionError("model loaded")

    monkeypatch.setattr(inference, "load_workdir_model", load)
    monkeypatch.setattr(inference, "load_monodepth2_model", load)
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "eval").write_text("x")
    base = ["eval", "--split", "make3d", "--data", str(tmp_path), "--no-progress"]
    for args, message in [
            (["--workdir", str(tmp_path), "--out", str(tmp_path / "FILE")], f"--out {tmp_path / 'FILE'} exists and is not a folder"),
            (["--monodepth2", str(tmp_path), "--out", str(tmp_path / "FILE" / "r")],
             f"--out {tmp_path / 'FILE' / 'r'}: cannot make the folder: {tmp_path / 'FILE'} is a file"),
            (["--workdir", str(tmp_path / "w")], f"results folder (no --out) {tmp_path / 'w' / 'eval'} exists and is not a folder")]:
        assert cli.main(base + args) == 2
        err = capsys.readouterr().err
        assert err == f"xdistill eval: {message}\n", err


def test_only_a_missing_torch_is_blamed_on_pth_files(tmp_path, monkeypatch):
    """`eval` said "reading Monodepth2's .pth files needs PyTorch" for any missing module."""
    def missing_scipy(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'scipy'", name="scipy")

    monkeypatch.setattr(inference, "load_workdir_model", missing_scipy)
    with pytest.raises(ModuleNotFoundError, match="scipy"):
        cli.main(["eval", "--workdir", str(tmp_path), "--split", "make3d", "--data", str(tmp_path),
                  "--out", str(tmp_path / "o"), "--no-progress"])


def test_an_empty_odometry_split_or_poses_file_is_named(tmp_path):
    empty = tmp_path / "test_files_09.txt"
    empty.write_text("\n")  # was an IndexError traceback
    with pytest.raises(ValueError, match=re.escape(f"{empty}: split file has no lines")):
        eval_pose.odometry_sequence(tmp_path, "odom_09", empty)
    (tmp_path / "poses").mkdir()
    (tmp_path / "poses" / "09.txt").write_text("")
    empty.write_text("9 0 l\n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'poses' / '09.txt'}: no poses")):
        eval_pose.odometry_sequence(tmp_path, "odom_09", empty)


def test_odometry_split_sides_and_image_formats_are_checked(tmp_path):
    """An odometry split's side column was never read (any word passed, `r` read image_2); a
    sequence half-converted to JPEG is refused naming both formats."""
    split = tmp_path / "test_files_09.txt"
    (tmp_path / "poses").mkdir()
    (tmp_path / "poses" / "09.txt").write_text("1 0 0 0 0 1 0 0 0 0 1 0\n" * 4)
    for text, message in [("9 0 banana\n", r":1: expected '9 FRAME SIDE' \(SIDE l or r\), got '9 0 banana'"),
                          ("x 0 l\n", r":1: expected '9 FRAME SIDE'"),
                          ("9 0 l\n9 1 l\n9 2 r\n", r":3: camera image_3 \(side r\), line 1 image_2: "
                                                     "pose evaluation takes one camera")]:
        split.write_text(text)
        with pytest.raises(ValueError, match=re.escape(str(split)) + message):
            eval_pose.odometry_sequence(tmp_path, "odom_09", split)
    split.write_text("9 0 3\n9 1 r\n")  # Monodepth2's side map: 3 and r are image_3
    image_3 = tmp_path / "sequences" / "09" / "image_3"
    assert eval_pose.odometry_sequence(tmp_path, "odom_09", split).images == [
        image_3 / f"00000{i}.png" for i in range(3)]  # none exist: the missing-image error names .png
    image_3.mkdir(parents=True)
    for i, ext in enumerate([".jpg", ".jpg", ".png"]):
        (image_3 / f"00000{i}{ext}").write_bytes(b"x")
    with pytest.raises(ValueError, match=re.escape(f"{image_3 / '000000.jpg'} is .jpg but {image_3 / '000002.png'} "
                                                   "exists only as .png")):
        eval_pose.odometry_sequence(tmp_path, "odom_09", split)
    # the same in the raw layout (`--pose --split-file`): a drive half-converted to JPEG was
    # evaluated with its frames in both formats, without a word
    frames = tmp_path / "2011_09_26" / "2011_09_26_drive_0001_sync" / "image_02" / "data"
    frames.mkdir(parents=True)
    for i, ext in enumerate([".png", ".jpg", ".png"]):
        (frames / f"{i:010d}{ext}").write_bytes(b"x")
    raw_split = tmp_path / "pose_files.txt"
    raw_split.write_text("".join(f"2011_09_26/2011_09_26_drive_0001_sync {i} l\n" for i in range(3)))
    with pytest.raises(ValueError, match=re.escape(f"{frames / '0000000000.png'} is .png but "
                                                   f"{frames / '0000000001.jpg'} exists only as .jpg")):
        eval_pose.raw_sequence(tmp_path, raw_split)


def test_monodepth2_weights_match_torch_evaluation(tmp_path):
    """`eval --monodepth2`: converted weights give the numbers of the torch model on the same inputs."""
    torch = pytest.importorskip("torch")
    import torch_nets

    t = trained()
    torch.manual_seed(0)
    enc, dec = torch_nets.Encoder(18), torch_nets.DepthDecoder()
    torch_nets.randomise_batchnorm(enc, torch.rand(2, 3, 64, 192), torch.Generator().manual_seed(1))
    enc.eval(), dec.eval()
    folder = tmp_path / "mono_192x64"  # torch cannot reflect-pad the 1-row bottleneck of 32-row inputs
    folder.mkdir()
    torch.save(dict(enc.state_dict(), height=64, width=192, use_stereo=False), folder / "encoder.pth")
    torch.save(dec.state_dict(), folder / "depth.pth")
    split = t.splits / "test_files.txt"
    assert cli.main(["eval", "--monodepth2", str(folder), "--split", "eigen", "--data", str(t.world), "--split-file",
                     str(split), "--gt", str(t.gt_test), "--out", str(tmp_path / "res"), "--no-progress"]) == 0
    got = json.loads((tmp_path / "res" / "eigen-test_files-monodepth2.json").read_text())

    from data_pipelines.kitti import raw
    from data_pipelines.kitti.export_gt import load_gt_depths
    images = np.stack([inference.load_resized(raw.image_path(t.world, line), 64, 192)[0]
                       for line in raw.read_split_file(split)])
    with torch.no_grad():
        disp = dec(enc(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0))[0][:, 0].numpy()
    scaled = 0.01 + (10.0 - 0.01) * disp.astype(np.float64)  # disp_to_depth(., 0.1, 100)
    gts, _ = load_gt_depths(t.gt_test)
    want = evaluation.aggregate(evaluation.eval_eigen_image(g, d) for g, d in zip(gts, scaled))
    assert got["num_images"] == 8 and want["abs_rel"] > 0
    for k in evaluation.METRIC_KEYS:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-4, err_msg=k)


def test_a_protocol_that_does_not_fit_how_monodepth2_weights_were_trained_is_warned():
    """Monodepth2's evaluate_depth makes the user choose --eval_mono or --eval_stereo; encoder.pth's
    use_stereo says which fits, and was read and saved but used by nothing (a stereo model was
    median-scaled without a word)."""
    def model(use_stereo):
        return inference.DepthModel(None, {}, None, None, 32, 96, 0.1, 100.0, None, "md2", use_stereo)

    assert "trained with stereo pairs" in inference.protocol_warning(model(True), stereo=False)
    assert "--eval_stereo (here --stereo" in inference.protocol_warning(model(True), stereo=False)
    assert "has no metric scale" in inference.protocol_warning(model(False), stereo=True)
    for use_stereo, stereo in ((True, True), (False, False), (None, True), (None, False)):
        assert inference.protocol_warning(model(use_stereo), stereo=stereo) is None
