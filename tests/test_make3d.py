"""Make3D reader on the synthetic Test134 copy and on a hand-made real-layout folder."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
from PIL import Image

from data_pipelines.make3d import reader
from synth_world_tiny import tiny_world


def test_synthetic_make3d_layout_and_grid():
    root = tiny_world() / "make3d"
    items, images, depths = reader.load_test_set(root)
    assert len(items) == 2
    assert [f"img-{i.name}.jpg" for i in items] == (root / "make3d_test_files.txt").read_text().split()
    for item, image, depth in zip(items, images, depths):
        assert image.shape == (96, 72, 3)  # portrait like the real 2272 x 1704 (rows x cols)
        assert depth.shape == (55, 305) and depth.dtype == np.float32
        assert 0 < depth.min() and depth.max() <= 81.92 + 1e-6
        grid = scipy.io.loadmat(item.depth_path)["Position3DGrid"]
        assert grid.shape == (55, 305, 4)
        # channel 3 is the range along the ray: |(X, Y, Z)| of channels 1, 0, 2
        np.testing.assert_allclose(np.linalg.norm(grid[:, :, :3], axis=-1), grid[:, :, 3], rtol=1e-9)
        # up is positive in channel 0: the top rows see higher points than the bottom rows
        assert grid[0, :, 0].mean() > grid[-1, :, 0].mean()
        assert (depth < 81.0).mean() > 0.3  # much of the view is geometry, not out-of-range sky


def test_real_layout_without_list_file_and_missing_depth(tmp_path):
    (tmp_path / "Test134").mkdir()
    (tmp_path / "Gridlaserdata").mkdir()
    for name in ("b-p-2t0", "a-p-1t0"):
        Image.fromarray(np.full((8, 6, 3), 100, np.uint8)).save(tmp_path / "Test134" / f"img-{name}.jpg")
    grid = np.zeros((55, 305, 4))
    grid[:, :, 3] = np.arange(305)[None, :]
    scipy.io.savemat(tmp_path / "Gridlaserdata" / "depth_sph_corr-a-p-1t0.mat", {"Position3DGrid": grid})
    with pytest.raises(FileNotFoundError, match="img-b-p-2t0.jpg.*depth_sph_corr-b-p-2t0.mat"):
        reader.list_test_set(tmp_path)
    scipy.io.savemat(tmp_path / "Gridlaserdata" / "depth_sph_corr-b-p-2t0.mat", {"Position3DGrid": grid * 2})
    items = reader.list_test_set(tmp_path)
    assert [i.name for i in items] == ["a-p-1t0", "b-p-2t0"]  # sorted when no list file
    np.testing.assert_array_equal(reader.load_depth(items[1].depth_path)[0, :3], [0, 2, 4])
    scipy.io.savemat(tmp_path / "Gridlaserdata" / "depth_sph_corr-a-p-1t0.mat", {"Other": grid})
    with pytest.raises(ValueError, match="depth_sph_corr-a-p-1t0.mat.*Position3DGrid"):
        reader.load_depth(items[0].depth_path)
    # a truncated or foreign file is named, whatever scipy or PIL raised
    good = items[1].depth_path.read_bytes()
    items[1].depth_path.write_bytes(good[:len(good) // 2])
    with pytest.raises(ValueError, match=r"depth_sph_corr-b-p-2t0\.mat: cannot read the Make3D depth file"):
        reader.load_depth(items[1].depth_path)
    items[1].depth_path.write_bytes(b"not a mat file at all" * 20)
    with pytest.raises(ValueError, match=r"depth_sph_corr-b-p-2t0\.mat: cannot read the Make3D depth file"):
        reader.load_depth(items[1].depth_path)
    # saved again as MATLAB v7.3 (HDF5; its 128-byte header says version 0x0200): scipy's
    # NotImplementedError was a traceback naming no file
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116) + bytes(8) + b"\x00\x02IM"
    items[1].depth_path.write_bytes(header.ljust(512, b"\x00") + b"\x89HDF\r\n\x1a\n" + bytes(64))
    with pytest.raises(ValueError, match=r"depth_sph_corr-b-p-2t0\.mat: a MATLAB v7\.3 \(HDF5\) file"):
        reader.load_depth(items[1].depth_path)
    items[1].image_path.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"img-b-p-2t0\.jpg: cannot read the Make3D image"):
        reader.load_image(items[1].image_path)


def _layout(root, grids):
    """A real-layout folder with one small image per laser grid; returns its items."""
    (root / "Test134").mkdir()
    (root / "Gridlaserdata").mkdir()
    for i, grid in enumerate(grids):
        Image.fromarray(np.full((80, 60, 3), 100, np.uint8)).save(root / "Test134" / f"img-{i}.jpg")
        scipy.io.savemat(root / "Gridlaserdata" / f"depth_sph_corr-{i}.mat", {"Position3DGrid": grid})
    return reader.list_test_set(root)


def test_a_grid_of_another_shape_is_named(tmp_path):
    """GRID_SHAPE is checked: a transposed (305, 55, 4) grid was cropped to 21 of its 305 rows and scored."""
    grid = np.random.default_rng(0).uniform(1.0, 60.0, reader.GRID_SHAPE)
    items = _layout(tmp_path, [grid, np.transpose(grid, (1, 0, 2)), grid[:50]])
    assert reader.load_depth(items[0].depth_path).shape == (55, 305)
    with pytest.raises(ValueError, match=r"depth_sph_corr-1\.mat: Position3DGrid has shape \(305, 55, 4\), "
                                         r"expected \(55, 305, 4\)"):
        reader.load_depth(items[1].depth_path)
    with pytest.raises(ValueError, match=r"depth_sph_corr-2\.mat: Position3DGrid has shape \(50, 305, 4\)"):
        reader.load_depth(items[2].depth_path)


def test_a_grid_without_scored_depth_is_named_before_inference(tmp_path):
    """No laser depth in (0, 70) m in the 21 scored rows: the authors' median scaling would give NaN;
    here a ValueError naming the file and its image, raised before the model is touched (None)."""
    from xdistill_jax import eval_depth

    grid = np.random.default_rng(0).uniform(1.0, 60.0, reader.GRID_SHAPE)
    far = grid.copy()
    far[17:38, :, 3] = 81.92  # every scored return saturated; the rows outside the crop do not count
    items = _layout(tmp_path, [grid, far])
    assert len(eval_depth.load_make3d_gts(items[:1])) == 1
    message = (r"depth_sph_corr-1\.mat: no laser depth in \(0, 70\.0\) m in rows \[17, 38\) of "
               r"Position3DGrid\[:, :, 3\] \(test image 1, img-1\.jpg\)")
    with pytest.raises(ValueError, match=message):
        eval_depth.load_make3d_gts(items)
    with pytest.raises(ValueError, match=message):
        eval_depth.evaluate_make3d(None, tmp_path, show_progress=False)
