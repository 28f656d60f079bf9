"""GT export (`xdistill export-gt`): the tiny world's test split, checked against a direct
projection of the scans and against the rendered dense depth; the npz format and its reader."""

from __future__ import annotations

import re

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
    with pytest.raises(ValueError, match=r"Only if you trust the file: `xdistill eval --allow-pickle` \(allow_pickle=True in Python\)"):
        load_gt_depths(path)
    depths, files = load_gt_depths(path, allow_pickle=True)
    assert [d.shape for d in depths] == [(3, 4), (2, 5)] and files == ["", ""]
    # same-size maps: np.array stacks them into a plain (N,H,W) float array, stored without pickle
    same = tmp_path / "gt_same.npz"
    np.savez_compressed(same, data=np.array([np.ones((3, 4), np.float32), np.full((3, 4), 2.0, np.float32)]))
    depths, files = load_gt_depths(same)
    assert [float(d[0, 0]) for d in depths] == [1.0, 2.0] and depths[0].shape == (3, 4) and files == ["", ""]
    ragged[1] = np.zeros((2, 5, 1), np.float32)
    np.savez_compressed(path, data=ragged)
    with pytest.raises(ValueError, match=re.escape(f"{path}: entry 1 has shape (2, 5, 1), expected a 2-D (H,W)")):
        load_gt_depths(path, allow_pickle=True)


def test_malformed_gt_files_are_named(tmp_path):
    """Whatever is wrong with a --gt file, a ValueError naming it and what was expected (the CLI's
    exit 2), never numpy's or zipfile's own exception: a .npy, a truncated archive, an empty file,
    a text file (numpy took it for a pickle and did not name it), a damaged member."""
    maps = [np.full((3, 4), 2.0, np.float32), np.full((3, 4), 3.0, np.float32)]
    good = tmp_path / "good.npz"
    np.savez_compressed(good, depth_00000=maps[0], depth_00001=maps[1], files=np.array(["a 1 l", "a 2 l"]))
    assert load_gt_depths(good)[1] == ["a 1 l", "a 2 l"]
    expected = "expected an .npz archive written by `xdistill export-gt`"
    cases = {
        "gt.npy": (lambda f: np.save(f, np.stack(maps)), "is a single .npy array, not an .npz archive"),
        "trunc.npz": (lambda f: f.write_bytes(good.read_bytes()[:200]), "cannot be read as an .npz archive"),
        "half.npz": (lambda f: f.write_bytes(good.read_bytes()[:good.stat().st_size // 2]),
                     "cannot be read as an .npz archive"),
        "empty.npz": (lambda f: f.write_bytes(b""), "is empty"),
        "text.npz": (lambda f: f.write_text("not a numpy file\n"), "is neither an .npz archive nor a numpy array"),
    }
    for name, (write, what) in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(ValueError, match=re.escape(f"{path}: {what}") + ".*" + re.escape(expected)):
            load_gt_depths(path)
    # the archive's index intact, a member's compressed bytes overwritten: CRC or deflate error
    damaged = tmp_path / "damaged.npz"
    raw_bytes = bytearray(good.read_bytes())
    start = raw_bytes.index(b"depth_00001.npy") + len(b"depth_00001.npy")
    raw_bytes[start + 8:start + 40] = b"\xff" * 32
    damaged.write_bytes(bytes(raw_bytes))
    with pytest.raises(ValueError, match=re.escape(f"{damaged}: array 'depth_00001' cannot be read")):
        load_gt_depths(damaged)


def test_bad_gt_entries_are_named_with_their_split_line(tmp_path):
    """Entries that are no (H,W) map, stray or missing arrays: named by file, entry and split line."""
    good = np.full((3, 4), 2.0, np.float32)
    files = np.array(["d 0 l", "d 1 l"])

    def check(arrays, message):
        path = tmp_path / "gt.npz"
        np.savez_compressed(path, **arrays)
        with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
            load_gt_depths(path)

    check(dict(depth_00000=good, depth_00001=good[..., None], files=files),
          "entry 1 (split line 2: 'd 1 l') has shape (3, 4, 1), expected a 2-D (H,W) depth map")
    check(dict(depth_00000=good.ravel(), depth_00001=good, files=files),
          "entry 0 (split line 1: 'd 0 l') has shape (12,), expected a 2-D (H,W) depth map")
    check(dict(depth_00000=good, depth_00001=np.array([["a", "b"]]), files=files),
          "entry 1 (split line 2: 'd 1 l') is of type <U1, expected a depth map of numbers")
    inf = good.copy()
    inf[2, 1] = np.inf
    check(dict(depth_00000=good, depth_00001=inf, files=files),
          "entry 1 (split line 2: 'd 1 l') holds an infinite depth (first at row 2, column 1)")
    check(dict(depth_00000=good, depth_00001=good, depth_extra=good, files=files),
          "unexpected arrays ['depth_extra']")  # was int('extra'): "invalid literal for int()"
    check(dict(depth_00000=good, depth_00002=good, files=files), "depth_00001 is missing")
    check(dict(depth_0=good, depth_00000=good, files=files[:1]), "arrays depth_0 and depth_00000 are both entry 0")
    check(dict(depth_00000=good, depth_00001=good), "has depth_* arrays but no 'files' array")
    check(dict(data=np.stack([good, good]), files=files), "unexpected arrays ['files'] beside Monodepth2's 'data'")
    check(dict(data=good), "'data' has shape (3, 4), expected (N,H,W) depth maps")
    check(dict(other=good), "neither depth_NNNNN arrays nor Monodepth2's 'data' array inside")
