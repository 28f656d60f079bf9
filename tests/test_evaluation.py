"""Depth metrics and the Eigen protocol against Monodepth2's evaluate_depth.py numbers and by hand."""


import numpy as np
import pytest

from xdistill_jax import evaluation as E



def test_compute_depth_errors_matches_monodepth2(ref):
    errors = E.compute_depth_errors(ref["err_gt"], ref["err_pred"])
    assert tuple(errors) == E.METRIC_KEYS and all(isinstance(v, float) for v in errors.values())
    np.testing.assert_allclose(E.errors_as_array(errors), ref["err_out"], rtol=1e-12)
    # the training-time torch twin counts the deltas in float32: 1e-8 apart
    np.testing.assert_allclose(E.errors_as_array(errors), ref["err_out_torch_layers"], rtol=1e-6)


def test_compute_depth_errors_by_hand():
    gt = np.array([1.0, 2.0, 4.0, 10.0])
    e = E.compute_depth_errors(gt, 1.1 * gt)  # every prediction 10% too far
    np.testing.assert_allclose(e["abs_rel"], 0.1)
    np.testing.assert_allclose(e["sq_rel"], np.mean(0.01 * gt))
    np.testing.assert_allclose(e["rmse"], 0.1 * np.sqrt(np.mean(gt**2)))
    np.testing.assert_allclose(e["rmse_log"], np.log(1.1))
    assert (e["a1"], e["a2"], e["a3"]) == (1.0, 1.0, 1.0)
    e = E.compute_depth_errors(gt, np.array([1.0, 2.6, 4.0 / 1.6, 10.0 * 2.0]))  # ratios 1, 1.3, 1.6, 2
    assert (e["a1"], e["a2"], e["a3"]) == (0.25, 0.5, 0.75)
    with pytest.raises(ValueError, match="gt/pred"):
        E.compute_depth_errors(gt, gt[:3])


def test_garg_crop(ref):
    h, w = ref["evalpipe_gt_depth"].shape
    assert E.garg_crop_bounds(h, w) == tuple(ref["evalpipe_crop"])
    assert E.garg_crop_bounds(375, 1242) == (153, 371, 44, 1197)  # reference §6.1
    gt = ref["evalpipe_gt_depth"]
    mask = (gt > 1e-3) & (gt < 80) & E.garg_crop_mask(h, w)
    np.testing.assert_array_equal(mask, ref["evalpipe_mask"])


def test_eigen_pipeline_mono_and_stereo(ref):
    gt, disp = ref["evalpipe_gt_depth"], ref["evalpipe_pred_disp"]
    errors, ratio = E.eval_eigen_image(gt, disp)
    # monodepth2 ran this in float32, we in float64
    np.testing.assert_allclose(ratio, ref["evalpipe_ratio"], rtol=1e-6)
    np.testing.assert_allclose(E.errors_as_array(errors), ref["evalpipe_errors"], rtol=1e-6)
    errors, ratio = E.eval_eigen_image(gt, disp, stereo=True)
    assert ratio is None
    np.testing.assert_allclose(E.errors_as_array(errors), ref["evalpipe_errors_stereo"], rtol=1e-6)


def test_eigen_pipeline_by_hand():
    """A prediction off by a constant factor is exact after median scaling; the ratio is that factor."""
    gt = np.zeros((10, 20))
    gt[6:9, 2:18] = np.linspace(5.0, 60.0, 48).reshape(3, 16)
    disp = np.where(gt > 0, 1.0 / np.maximum(gt, 1e-9) * 4.0, 1.0)  # depth = gt / 4
    errors, ratio = E.eval_eigen_image(gt, disp)
    np.testing.assert_allclose(ratio, 4.0)
    assert errors["abs_rel"] < 1e-12 and errors["a1"] == 1.0
    # half-resolution prediction of a constant disparity is resized, not rejected
    errors, ratio = E.eval_eigen_image(gt, np.full((5, 10), 0.1), median_scaling=False)
    assert ratio is None
    np.testing.assert_allclose(errors["rmse"], np.sqrt(np.mean((gt[gt > 0] - 10.0) ** 2)))


def test_resize_linear_by_hand():
    np.testing.assert_allclose(E.resize_linear(np.array([[0.0, 1.0]]), 1, 4), [[0.0, 0.25, 0.75, 1.0]])
    # downscale by 2 without antialias: each output sits between two inputs
    np.testing.assert_allclose(E.resize_linear(np.arange(8.0)[None], 1, 4), [[0.5, 2.5, 4.5, 6.5]])


def test_aggregate_by_hand():
    a = ({k: 1.0 for k in E.METRIC_KEYS}, 2.0)
    b = ({k: 3.0 for k in E.METRIC_KEYS}, 4.0)
    c = ({k: 5.0 for k in E.METRIC_KEYS}, 6.0)
    out = E.aggregate([a, b, c])
    assert out["abs_rel"] == 3.0 and out["a3"] == 3.0 and out["num_images"] == 3
    assert out["ratio_median"] == 4.0
    np.testing.assert_allclose(out["ratio_std"], np.std([0.5, 1.0, 1.5]))
    assert "ratio_median" not in E.aggregate([(a[0], None)])


def test_post_process_disparity_by_hand():
    h, w = 2, 41
    plain = np.ones((1, h, w))
    flipped = np.full((1, h, w), 2.0)  # constant, so flipping it back changes nothing
    out = E.post_process_disparity(plain, flipped)
    assert out[0, 0, 0] == 2.0 and out[0, 0, -1] == 1.0  # left edge from the flipped run, right from plain
    np.testing.assert_allclose(out[0, :, 10:31], 1.5)  # the middle is the mean
    ramp = np.broadcast_to(np.arange(w, dtype=float), (1, h, w))
    # the flipped image's prediction of a ramp, flipped back, is the ramp itself
    np.testing.assert_allclose(E.post_process_disparity(ramp[..., None], ramp[..., ::-1, None]), ramp[..., None])


def test_make3d_log10_metrics_by_hand():
    """Make3D's "log10" column is the RMS of the log10 differences (the authors' script, reference
    §6.6); `log10_abs` is the classic mean |log10 difference|; rmse_log stays the natural log."""
    gt = np.array([1.0, 10.0, 100.0])
    pred = np.full(3, 10.0)  # log10 differences -1, 0, +1
    e = E.make3d_log10_errors(gt, pred)
    assert tuple(e) == ("log10", "log10_abs") and E.MAKE3D_METRIC_KEYS == E.METRIC_KEYS + tuple(e)
    np.testing.assert_allclose(e["log10"], np.sqrt((1.0 + 0.0 + 1.0) / 3.0))  # 0.8165
    np.testing.assert_allclose(e["log10_abs"], (1.0 + 0.0 + 1.0) / 3.0)  # 0.6667
    np.testing.assert_allclose(E.compute_depth_errors(gt, pred)["rmse_log"], np.log(10.0) * np.sqrt(2.0 / 3.0))
    # every prediction 10x too far: both log10 errors are exactly 1
    assert E.make3d_log10_errors(gt, 10.0 * gt) == pytest.approx({"log10": 1.0, "log10_abs": 1.0})
    with pytest.raises(ValueError, match="depths must be > 0"):
        E.make3d_log10_errors(gt, np.zeros(3))
