"""KITTI raw readers: calibration, split files, velodyne scans, and `generate_depth_map` checked by
hand on a few points (rounding, closest-on-duplicates, the W-1 sub2ind collision, negatives)."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipelines.kitti import raw
from data_pipelines.kitti.splits import available_splits, split_file

W, H, F, C = 10, 6, 10.0, 4.0  # tiny camera: fx = fy = 10, principal point (4, 4) in 1-based P


def _write_calib(folder, p_tz=0.0, velo_t=(0.0, 0.0, 0.0), s_rect_03=(W, H)):
    folder.mkdir(parents=True, exist_ok=True)
    p = np.array([[F, 0, C, 0], [0, F, C, 0], [0, 0, 1, p_tz]])

    def fmt(a):
        return " ".join(f"{v:.6e}" for v in np.ravel(a))

    (folder / "calib_cam_to_cam.txt").write_text(
        f"calib_time: 09-Jan-2012 13:57:47\nS_rect_02: {fmt([W, H])}\nS_rect_03: {fmt(s_rect_03)}\n"
        f"R_rect_00: {fmt(np.eye(3))}\nP_rect_02: {fmt(p)}\nP_rect_03: {fmt(p)}\n")
    # velodyne x forward, y left, z up -> camera x right, y down, z forward
    perm = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]])
    (folder / "calib_velo_to_cam.txt").write_text(
        f"calib_time: 15-Mar-2012 11:37:16\nR: {fmt(perm)}\nT: {fmt(velo_t)}\n"
        f"delta_f: 0.000000e+00 0.000000e+00\ndelta_c: 0.000000e+00 0.000000e+00\n")
    return folder


def _velo_point(u, v, z, t=(0.0, 0.0, 0.0)):
    """Velodyne point projecting to 1-based (u, v) at camera depth z (camera = velo permuted + t)."""
    xc, yc = (u - C) * z / F, (v - C) * z / F
    xc, yc, zc = xc - t[0], yc - t[1], z - t[2]
    return [zc, -xc, -yc, 0.5]


def _write_scan(path, points):
    np.asarray(points, np.float32).tofile(path)
    return path


def test_read_calib_file_values_and_missing_key(tmp_path):
    folder = _write_calib(tmp_path / "d")
    calib = raw.read_calib_file(folder / "calib_cam_to_cam.txt")
    assert calib["calib_time"] == "09-Jan-2012 13:57:47"  # non-numeric values stay strings
    np.testing.assert_array_equal(calib["S_rect_02"], [W, H])
    assert calib["P_rect_02"].shape == (12,)
    with pytest.raises(ValueError, match=r"calib_cam_to_cam\.txt.*P_rect_01"):
        raw.read_calib_file(folder / "calib_cam_to_cam.txt", required=("P_rect_01",))
    with pytest.raises(FileNotFoundError, match="calib_imu_to_velo.txt"):
        raw.imu_to_velo(folder)
    # tab-separated values read as numbers; a key whose values are not numbers is named with its line
    text = (folder / "calib_cam_to_cam.txt").read_text().splitlines()
    row = next(i for i, t in enumerate(text) if t.startswith("P_rect_02:"))
    tabbed = folder / "tabbed.txt"
    tabbed.write_text("\n".join(t.replace(" ", "\t").replace(":\t", ": ", 1) for t in text) + "\n")
    np.testing.assert_array_equal(raw.read_calib_file(tabbed)["P_rect_02"], calib["P_rect_02"])
    text[row] = text[row].replace("e+0", "e+O", 1)  # a letter O for a zero
    bad = folder / "bad.txt"
    bad.write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=rf"bad\.txt:{row + 1}: key P_rect_02 is not a list of numbers: '.*e\+O"):
        raw.calib_matrix(raw.read_calib_file(bad), "P_rect_02", (3, 4), bad)
    # generate_depth_map names the file and the key it needs
    (folder / "calib_velo_to_cam.txt").write_text("calib_time: x\nR: 1 0 0 0 1 0 0 0 1\n")
    scan = _write_scan(tmp_path / "s.bin", [_velo_point(5, 3, 8.0)])
    with pytest.raises(ValueError, match=r"calib_velo_to_cam\.txt.*\bT\b"):
        raw.generate_depth_map(folder, scan)


def test_read_split_file_and_malformed_lines(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("2011_09_26/2011_09_26_drive_0002_sync 0000000069 l\n\nDATE/d 5 r\n")
    lines = raw.read_split_file(good)
    assert lines == [raw.SplitLine("2011_09_26/2011_09_26_drive_0002_sync", 69, "l"), raw.SplitLine("DATE/d", 5, "r")]
    assert raw.image_path("/R", lines[1], -1) == raw.Path("/R/DATE/d/image_03/data/0000000004.png")
    assert raw.image_path("/R", lines[0], 0, ".jpg").name == "0000000069.jpg"
    for bad, what in (("a 1 l\nb 2\n", "3 fields"), ("a 1 l\nb x l\n", "frame index"), ("a 1 l\nb 2 q\n", "side"),
                      ("a 1 l\nb \u00b2 l\n", "frame index")):  # str.isdigit() is True for '²'
        path = tmp_path / "bad.txt"
        path.write_text(bad)
        with pytest.raises(ValueError, match=rf"bad\.txt:2: .*{what}"):
            raw.read_split_file(path)


def test_shipped_splits():
    assert "eigen/test_files" in available_splits() and "eigen_zhou/train_files" in available_splits()
    eigen = raw.read_split_file(split_file("eigen"))
    assert len(eigen) == 697 and eigen[0].side == "l"
    assert len(raw.read_split_file(split_file("eigen_benchmark", "test"))) == 652
    assert len(raw.read_split_file(split_file("eigen_zhou/train"))) == 39810
    assert split_file("odom/test_files_09").is_file()
    with pytest.raises(ValueError, match="unknown split"):
        split_file("nope")


def test_truncated_velodyne_scan_names_file(tmp_path):
    path = tmp_path / "0000000000.bin"
    np.zeros(10, np.float32).tofile(path)  # 40 bytes, not a multiple of 16
    with pytest.raises(ValueError, match="0000000000.bin.*multiple of 16"):
        raw.load_velodyne_points(path)
    np.arange(8, dtype=np.float32).tofile(path)
    np.testing.assert_array_equal(raw.load_velodyne_points(path), np.arange(8, dtype=np.float32).reshape(2, 4))


def test_generate_depth_map_by_hand(tmp_path):
    folder = _write_calib(tmp_path / "d")
    points = [
        _velo_point(2.5, 2.0, 4.0),   # round(2.5) = 2 (half to even) -> col 1, row 1
        _velo_point(3.5, 2.0, 5.0),   # round(3.5) = 4 -> col 3, row 1
        _velo_point(6.0, 3.0, 9.0),   # duplicates at col 5, row 2: far first ...
        _velo_point(6.2, 3.1, 6.0),   # ... then near ...
        _velo_point(5.9, 2.8, 8.0),   # ... then middle (last write); closest (6.0) must win
        _velo_point(1.0, 5.0, 9.0),   # (row 4, col 0), listed first: its sub2ind equals ...
        _velo_point(10.0, 4.0, 7.0),  # ... (row 3, col W-1) -> the pair merges onto (4, 0) with min = 7
        _velo_point(11.0, 2.0, 3.0),  # u = 11 -> col 10 >= W: dropped
        _velo_point(5.0, 1.0, 2.0)[:3] + [0.1],  # (row 0, col 4)
        [-3.0, 0.0, 0.0, 0.2],        # behind the sensor: dropped
    ]
    scan = _write_scan(tmp_path / "s.bin", points)
    depth = raw.generate_depth_map(folder, scan, cam=2)
    expected = np.zeros((H, W), np.float32)
    expected[1, 1], expected[1, 3], expected[2, 5] = 4.0, 5.0, 6.0
    expected[4, 0], expected[3, W - 1] = 7.0, 7.0
    expected[0, 4] = 2.0
    assert depth.dtype == np.float32 and depth.shape == (H, W)
    np.testing.assert_allclose(depth, expected, atol=1e-5)

    # vel_depth: the velodyne forward coordinate instead of the projected z (camera 0.5 m ahead)
    folder2 = _write_calib(tmp_path / "e", velo_t=(0.0, 0.0, -0.5))
    scan2 = _write_scan(tmp_path / "s2.bin", [_velo_point(5.0, 3.0, 4.0, t=(0.0, 0.0, -0.5))])
    z = raw.generate_depth_map(folder2, scan2)
    x = raw.generate_depth_map(folder2, scan2, vel_depth=True)
    assert z[2, 4] == pytest.approx(4.0, abs=1e-5) and x[2, 4] == pytest.approx(4.5, abs=1e-5)


def test_generate_depth_map_negative_depth_and_cam2_shape(tmp_path):
    # P's third row [0 0 1 -1] makes the projected depth z - 1: a point at z = 0.5 gets -0.5 -> 0.
    folder = _write_calib(tmp_path / "d", p_tz=-1.0, s_rect_03=(20, 12))

    def point(u, v, w):  # camera point whose projection is (u, v) with projected depth w = z - 1
        zc = w + 1.0
        xc, yc = (u * w - C * zc) / F, (v * w - C * zc) / F
        return [zc, -xc, -yc, 1.0]

    scan = _write_scan(tmp_path / "s.bin", [point(4.0, 3.0, -0.5), point(7.0, 5.0, 10.0)])
    depth = raw.generate_depth_map(folder, scan, cam=3)
    assert depth.shape == (H, W)  # always camera 02's size
    assert depth[2, 3] == 0.0 and depth.min() == 0.0
    # the same point does land on (2, 3): with vel_depth its (positive) forward x shows there
    assert raw.generate_depth_map(folder, scan, cam=3, vel_depth=True)[2, 3] == pytest.approx(0.5)
    assert depth[4, 6] == pytest.approx(10.0, abs=1e-5)  # z - 1
