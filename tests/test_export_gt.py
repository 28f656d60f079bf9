"""GT export (`xdistill export-gt`): the tiny world's test split, checked against a direct
projection of the scans and against the rendered dense depth; the npz format and its reader."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from data_pipelines.kitti import raw
from data_pipelines.kitti.export_gt import export_gt_depths, load_gt_depths
from synth_world_tiny import DATE, HEIGHT, WIDTH, tiny_world
from xdistill_jax import cli


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tiny_world()
    out = tmp_path_factory.mktemp("gt") / "gt_depths.npz"
    assert cli.main(["export-gt", "--raw", str(root), "--split-file", str(root / "splits" / "test_files.txt"),
                     "--out", str(out)]) == 0
    return root, out


def test_cli_bad_input_exits_2_naming_it(tmp_path, capsys):
    root = tiny_world()
    assert cli.main(["export-gt", "--raw", str(root), "--split-file", str(tmp_path / "missing.txt"),
                     "--out", str(tmp_path / "gt.npz")]) == 2
    err = capsys.readouterr().err
    assert "xdistill export-gt: error: " in err and "missing.txt" in err and "Traceback" not in err
    assert not (tmp_path / "gt.npz").exists()


def _direct_projection(root, line):
    """Independent projection of the scan: (rows, cols, velodyne x, camera z) of points in view."""
    cam = raw.read_calib_file(root / DATE / "calib_cam_to_cam.txt")
    p = cam["P_rect_02"].reshape(3, 4)
    r = np.eye(4)
    r[:3, :3] = cam["R_rect_00"].reshape(3, 3)
    pts = raw.load_velodyne_points(raw.velodyne_path(root, line)).astype(np.float64)
    pts = pts[pts[:, 0] >= 0]
    hom = np.c_[pts[:, :3], np.ones(len(pts))]
    q = (p @ r @ raw.velo_to_cam(root / DATE) @ hom.T).T
    # P_rect is 1-based (KITTI's convention); pixel centres of our images are 0-based.
    cols = np.round(q[:, 0] / q[:, 2]).astype(int) - 1
    rows = np.round(q[:, 1] / q[:, 2]).astype(int) - 1
    keep = (cols >= 0) & (rows >= 0) & (cols < WIDTH) & (rows < HEIGHT)
    return rows[keep], cols[keep], pts[keep, 0], q[keep, 2]


def test_export_matches_direct_projection_of_the_scan(exported):
    root, out = exported
    depths, files = load_gt_depths(out)
    lines = raw.read_split_file(root / "splits" / "test_files.txt")
    assert files == [str(line) for line in lines] and len(depths) == len(lines)
    for line, depth in zip(lines, depths):
        assert depth.shape == (HEIGHT, WIDTH) and depth.dtype == np.float32
        rows, cols, x, _ = _direct_projection(root, line)
        closest = np.full((HEIGHT, WIDTH), np.inf)
        np.minimum.at(closest, (rows, cols), x)
        hit = np.isfinite(closest)
        assert hit.sum() > 500
        # Every pixel the scan reaches has a depth; each is the closest point there, except the
        # few pixels the reference's W-1 sub2ind merges with a neighbouring row.
        assert np.array_equal(depth > 0, hit)
        agree = np.isclose(depth[hit], closest[hit], rtol=1e-6)
        assert agree.mean() > 0.97
        assert np.all(depth[hit][~agree] <= closest[hit][~agree] + 1e-5)


def test_export_agrees_with_dense_depth_where_lidar_hits(exported):
    root, _ = exported
    for line in raw.read_split_file(root / "splits" / "test_files.txt")[::2]:
        z = raw.generate_depth_map(raw.calib_dir(root, line), raw.velodyne_path(root, line), cam=2)
        dense = np.asarray(Image.open(root / line.folder / "depth_02" / "data" / f"{line.frame_index:010d}.png"))
        dense = dense.astype(np.float64) / 256.0
        m = (z > 0) & (dense > 0)
        rel = np.abs(z[m] - dense[m]) / dense[m]
        # Rounding a point to its pixel centre moves it by <= half a pixel: on the ground at this
        # tiny resolution that is a few % of depth; occlusion edges (velodyne vs camera) add outliers.
        assert np.median(rel) < 0.01 and np.mean(rel < 0.05) > 0.9, (line, np.median(rel))


def test_eigen_benchmark_reads_proj_depth_pngs(tmp_path):
    root = tiny_world()
    lines = raw.read_split_file(root / "splits" / "test_files.txt")[:2]
    split = tmp_path / "bench.txt"
    split.write_text("".join(f"{line}\n" for line in lines))
    expected = []
    for i, line in enumerate(lines):
        png = (np.arange(HEIGHT * WIDTH, dtype=np.uint16).reshape(HEIGHT, WIDTH) * (i + 3)) % 20000
        target = tmp_path / "raw" / line.folder / "proj_depth" / "groundtruth" / "image_02" / f"{line.frame_index:010d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(png).save(target)
        expected.append(png.astype(np.float32) / 256.0)
    out = tmp_path / "bench.npz"
    export_gt_depths(tmp_path / "raw", split, out, split="eigen_benchmark")
    depths, files = load_gt_depths(out)
    for d, e in zip(depths, expected):
        np.testing.assert_array_equal(d, e)
    # a missing PNG names the split line and the path
    split.write_text(f"{lines[0].folder} 99 l\n")
    with pytest.raises(FileNotFoundError, match="0000000099.png"):
        export_gt_depths(tmp_path / "raw", split, tmp_path / "x.npz", split="eigen_benchmark")


def test_failed_export_leaves_no_file(tmp_path):
    root = tiny_world()
    split = tmp_path / "split.txt"
    line = raw.read_split_file(root / "splits" / "test_files.txt")[0]
    split.write_text(f"{line}\n{line.folder} 4242 l\n")  # no scan for frame 4242
    out = tmp_path / "gt.npz"
    with pytest.raises(FileNotFoundError, match="0000004242.bin"):
        export_gt_depths(root, split, out)
    assert list(tmp_path.iterdir()) == [split]


def test_monodepth2_pickled_format_needs_explicit_opt_in(tmp_path):
    path = tmp_path / "gt_depths.npz"
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.ones((3, 4), np.float32), np.zeros((2, 5), np.float32)
    np.savez_compressed(path, data=ragged)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_gt_depths(path)
    depths, files = load_gt_depths(path, allow_pickle=True)
    assert [d.shape for d in depths] == [(3, 4), (2, 5)] and files == ["", ""]
