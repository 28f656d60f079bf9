"""The synthetic world: KITTI raw layout, calibration round trip, oxts vs the true trajectory,
photometric consistency of frames under GT depth + GT pose, and determinism per seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from data_pipelines.kitti import raw
from data_pipelines.synthetic_world import kitti_writer, rig
from data_pipelines.synthetic_world.generate import generate_world
from data_pipelines.synthetic_world.scene import DriveScene
from synth_world_tiny import DATE, FRAMES, HEIGHT, SEED, WIDTH, drive_folder, tiny_world


def _png(path):
    return np.asarray(Image.open(path))


def test_layout_and_splits():
    root = tiny_world()
    for drive in (1, 2):
        folder = root / drive_folder(drive)
        for frame in range(FRAMES):
            name = f"{frame:010d}"
            for sub in ("image_02", "image_03", "depth_02", "depth_03", "semantic_02", "moving_02"):
                assert (folder / sub / "data" / f"{name}.png").is_file(), (sub, name)
            assert (folder / "oxts" / "data" / f"{name}.txt").is_file()
            assert raw.load_velodyne_points(folder / "velodyne_points" / "data" / f"{name}.bin").shape[0] > 1000
        for ts in ("image_02/timestamps.txt", "oxts/timestamps.txt", "velodyne_points/timestamps_start.txt"):
            assert len((folder / ts).read_text().splitlines()) == FRAMES
    img = _png(root / drive_folder(1) / "image_02" / "data" / "0000000000.png")
    assert img.shape == (HEIGHT, WIDTH, 3) and img.dtype == np.uint8
    sem = _png(root / drive_folder(1) / "semantic_02" / "data" / "0000000000.png")
    assert set(np.unique(sem)) <= set(range(19)) | {255}
    assert {0, 2, 10} <= set(np.unique(sem))  # road, building, sky are in view

    train = raw.read_split_file(root / "splits" / "train_files.txt")
    val = raw.read_split_file(root / "splits" / "val_files.txt")
    test = raw.read_split_file(root / "splits" / "test_files.txt")
    assert train and val and len(test) == FRAMES
    for line in train + val:
        assert line.folder == drive_folder(1)  # the test drive is held out
        for offset in (-1, 0, 1):
            assert raw.image_path(root, line, offset).is_file()
    assert {line.folder for line in test} == {drive_folder(2)}
    assert all(raw.velodyne_path(root, line).is_file() for line in test)


def test_calibration_parses_back_to_the_rig():
    root = tiny_world()
    cam = raw.read_calib_file(root / DATE / "calib_cam_to_cam.txt")
    assert cam["calib_time"].startswith("01-Jan-2021")
    fx, fy = 0.58 * WIDTH, 1.92 * HEIGHT
    for k, offset in ((0, 0.0), (1, -0.54), (2, 0.06), (3, -0.48)):
        for key in ("S", "K", "D", "R", "T", "S_rect", "R_rect", "P_rect"):
            assert f"{key}_0{k}" in cam
        p = cam[f"P_rect_0{k}"].reshape(3, 4)
        r_rect = cam["R_rect_00"].reshape(3, 3)
        expected_k = np.array([[fx, 0, WIDTH / 2 + 1], [0, fy, HEIGHT / 2 + 1], [0, 0, 1]])
        expected = expected_k @ np.c_[np.eye(3), r_rect @ [offset, 0, 0]]
        np.testing.assert_allclose(p, expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(cam[f"T_0{k}"], [offset, 0, 0], atol=1e-12)
    np.testing.assert_array_equal(cam["S_rect_02"], [WIDTH, HEIGHT])
    # Stereo baseline 0.54 m, like KITTI; normalised K = Monodepth2's fixed K (0-based centre).
    p2, p3 = cam["P_rect_02"].reshape(3, 4), cam["P_rect_03"].reshape(3, 4)
    b2, b3 = (np.linalg.solve(p[:, :3], p[:, 3]) for p in (p2, p3))  # P = K [I | b]
    assert abs(np.linalg.norm(b2 - b3) - 0.54) < 1e-6
    np.testing.assert_allclose([p2[0, 0] / WIDTH, p2[1, 1] / HEIGHT, (p2[0, 2] - 1) / WIDTH,
                                (p2[1, 2] - 1) / HEIGHT], [0.58, 1.92, 0.5, 0.5], rtol=1e-6)
    r_rect = cam["R_rect_00"].reshape(3, 3)
    np.testing.assert_allclose(r_rect @ r_rect.T, np.eye(3), atol=1e-6)
    assert not np.allclose(r_rect, np.eye(3))  # a real rectifying rotation, so it is exercised
    velo = raw.read_calib_file(root / DATE / "calib_velo_to_cam.txt")
    assert {"calib_time", "R", "T", "delta_f", "delta_c"} <= set(velo)
    v2c = raw.velo_to_cam(root / DATE)
    # The camera sits 0.27 m ahead of the velodyne and looks along its x axis.
    centre = -v2c[:3, :3].T @ v2c[:3, 3]
    np.testing.assert_allclose(centre, [0.27, -0.004, -0.076], atol=1e-6)
    np.testing.assert_allclose(v2c[:3, :3] @ [1, 0, 0], [0, 0, 1], atol=0.02)
    imu = raw.imu_to_velo(root / DATE)
    np.testing.assert_allclose(imu[:3, 3], [-0.808, 0.319, -0.8])


def _oxts_poses(root, drive):
    packets = [raw.read_oxts_packet(root / drive_folder(drive) / "oxts" / "data" / f"{i:010d}.txt")
               for i in range(FRAMES)]
    scale = math.cos(math.radians(packets[0][0]))
    return [raw.oxts_pose(p, scale) for p in packets]


def test_oxts_matches_true_trajectory():
    root = tiny_world()
    imu_world = _oxts_poses(root, 1)
    scene = DriveScene(kitti_writer.drive_rng(SEED, 1), FRAMES)
    the_rig = rig.Rig(root / DATE)
    truth = [scene.vehicle_pose(i / kitti_writer.FPS) @ the_rig.vehicle_from_imu for i in range(FRAMES)]
    travelled = 0.0
    for i in range(1, FRAMES):
        rel = np.linalg.inv(imu_world[0]) @ imu_world[i]
        rel_true = np.linalg.inv(truth[0]) @ truth[i]
        np.testing.assert_allclose(rel, rel_true, atol=2e-4)
        travelled = np.linalg.norm(rel_true[:3, 3])
    assert travelled > 2.0  # the car drives forward (7..10 m/s at 10 Hz)


def _warp_error(root, drive, frame, neighbour, use_pose=True):
    """Mean |target - warped neighbour| over static, mutually visible pixels, plus the moving-pixel error."""
    folder = root / drive_folder(drive)
    the_rig = rig.Rig(root / DATE)
    poses = _oxts_poses(root, drive)
    imu_from_cam2 = np.linalg.inv(the_rig.vehicle_from_imu) @ the_rig.vehicle_from_cam[2]
    cam_t = poses[frame] @ imu_from_cam2
    cam_n = poses[neighbour] @ imu_from_cam2
    t_n_from_t = np.linalg.inv(cam_n) @ cam_t if use_pose else np.eye(4)
    name = lambda i: f"{i:010d}.png"  # noqa: E731
    target = _png(folder / "image_02" / "data" / name(frame)).astype(np.float64) / 255
    source = _png(folder / "image_02" / "data" / name(neighbour)).astype(np.float64) / 255
    depth = _png(folder / "depth_02" / "data" / name(frame)).astype(np.float64) / 256
    depth_n = _png(folder / "depth_02" / "data" / name(neighbour)).astype(np.float64) / 256
    moving = _png(folder / "moving_02" / "data" / name(frame)) > 0
    fx, fy, cx, cy = 0.58 * WIDTH, 1.92 * HEIGHT, 0.5 * WIDTH, 0.5 * HEIGHT  # Monodepth2's K
    v, u = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    d = np.where(depth > 0, depth, 1.0)  # sky (0) is masked out below; keep the maths finite
    pts = np.stack([(u - cx) / fx * d, (v - cy) / fy * d, d, np.ones_like(d)], -1)
    q = pts @ t_n_from_t.T
    z = np.where(np.abs(q[..., 2]) > 1e-3, q[..., 2], 1e-3)
    un, vn = fx * q[..., 0] / z + cx, fy * q[..., 1] / z + cy
    valid = (depth > 0) & (z > 0.1) & (un >= 0) & (vn >= 0) & (un <= WIDTH - 1.001) & (vn <= HEIGHT - 1.001)
    u0 = np.clip(np.floor(un), 0, WIDTH - 2).astype(int)
    v0 = np.clip(np.floor(vn), 0, HEIGHT - 2).astype(int)
    a, b = (un - u0)[..., None], (vn - v0)[..., None]

    def sample(img):
        img = img if img.ndim == 3 else img[..., None]
        return (img[v0, u0] * (1 - a) * (1 - b) + img[v0, u0 + 1] * a * (1 - b)
                + img[v0 + 1, u0] * (1 - a) * b + img[v0 + 1, u0 + 1] * a * b)

    warped = sample(source)
    # Not occluded in the neighbour: its own depth there agrees with the transformed point.
    visible = np.abs(sample(depth_n)[..., 0] - z) < 0.05 * z
    err = np.abs(warped - target).mean(-1)
    static = valid & ~moving & (visible if use_pose else True)
    moving_err = err[valid & moving].mean() if (valid & moving).sum() > 20 else None
    return err[static].mean(), static.mean(), moving_err


def test_reprojection_with_gt_depth_and_pose_is_photometrically_consistent():
    root = tiny_world()
    for frame, neighbour in ((2, 3), (2, 1), (4, 5)):
        err, coverage, _ = _warp_error(root, 1, frame, neighbour)
        err_identity, _, _ = _warp_error(root, 1, frame, neighbour, use_pose=False)
        assert coverage > 0.4, (frame, neighbour, coverage)
        assert err < 0.012, (frame, neighbour, err)
        assert err < 0.25 * err_identity, (frame, neighbour, err, err_identity)


def test_moving_objects_break_photometric_consistency():
    root = tiny_world()
    found = False
    for drive in (1, 2):
        for frame in range(1, FRAMES - 1):
            err, _, moving_err = _warp_error(root, drive, frame, frame + 1)
            if moving_err is not None:
                found = True
                assert moving_err > 3 * err, (drive, frame, moving_err, err)
    assert found, "no moving object visible in the tiny world"


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    def drive_bytes(root, seed):
        kitti_writer.write_calibration(root / DATE, 64, 24)
        kitti_writer.write_drive(root, DATE, 1, seed, 3, lidar_azimuths=64)
        folder = root / DATE / f"{DATE}_drive_0001_sync"
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    a = drive_bytes(tmp_path / "a", 11)
    b = drive_bytes(tmp_path / "b", 11)
    c = drive_bytes(tmp_path / "c", 12)
    assert a.keys() == b.keys() == c.keys()
    assert a == b
    assert a["image_02/data/0000000000.png"] != c["image_02/data/0000000000.png"]
    assert a["velodyne_points/data/0000000001.bin"] != c["velodyne_points/data/0000000001.bin"]


def test_generate_world_refuses_bad_arguments_and_existing_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--drives"):
        generate_world(tmp_path / "w", drives=1, frames=3, width=32, height=16)
    with pytest.raises(ValueError, match="--frames"):
        generate_world(tmp_path / "w", drives=2, frames=2, width=32, height=16)
    # the minimums wrote a world with an empty train split (its one line went to val), exit 0
    with pytest.raises(ValueError, match=r"--drives 2 and --frames 3 give 1 training line\(s\), \(drives - 1\) x "
                                         r"\(frames - 2\); the train and val splits need at least 2"):
        generate_world(tmp_path / "w", drives=2, frames=3, width=32, height=16)
    # --out . : "PosixPath('.') has an empty name"; the world would replace this process's folder
    for cwd_spelling in (".", "./", str(tmp_path)):
        with pytest.raises(ValueError, match=r"is the current folder \(or a file system root\): name a folder"):
            generate_world(cwd_spelling, drives=2, frames=4, width=32, height=16)
    assert not list(tmp_path.iterdir())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(ValueError, match="not empty"):
        generate_world(tmp_path / "full", drives=2, frames=4, width=32, height=16)
    assert (tmp_path / "full" / "x").read_text() == "keep"
    # --overwrite replaced any folder, deleting what it held (--out ~ --overwrite: a home folder)
    with pytest.raises(ValueError, match=r"--out .*full holds no synthetic world \(no world\.json; found x\): "
                                         "--overwrite replaces only a world `xdistill synth` wrote"):
        generate_world(tmp_path / "full", drives=2, frames=4, width=32, height=16, overwrite=True)
    assert (tmp_path / "full" / "x").read_text() == "keep"
    for kwargs, message in (({"workers": 0}, "--workers must be >= 1, got 0"),  # was taken as 1
                            ({}, "exists and is not a folder"), ({"sub": True}, "cannot be made: .*x is a file")):
        out = tmp_path / "full" / "x" / "sub" if kwargs.pop("sub", False) else tmp_path / "full" / "x"
        with pytest.raises(ValueError, match=message):
            generate_world(out, drives=2, frames=4, width=32, height=16, **kwargs)
    assert not list(tmp_path.glob("**/*.partial"))


def test_synth_command_writes_a_world(tmp_path, capsys):
    from xdistill_jax import cli

    out = tmp_path / "w"
    assert cli.main(["synth", "--out", str(out), "--seed", "5", "--drives", "2", "--frames", "4",
                     "--width", "48", "--height", "16", "--make3d-images", "1", "--make3d-size", "16x12",
                     "--lidar-azimuths", "64", "--velodyne", "test", "--workers", "1"]) == 0
    assert '"test_drive"' in capsys.readouterr().out
    assert not (tmp_path / "w.partial").exists()
    assert _png(out / drive_folder(1) / "image_03" / "data" / "0000000002.png").shape == (16, 48, 3)
    assert not (out / drive_folder(1) / "velodyne_points").exists()  # --velodyne test
    assert (out / drive_folder(2) / "velodyne_points" / "data" / "0000000002.bin").is_file()
    assert (out / "make3d" / "Gridlaserdata" / "depth_sph_corr-synth5-p-000t000.mat").is_file()
    # bad arguments and an existing --out: exit 2 naming them, no traceback, the world kept
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    capsys.readouterr()
    assert cli.main(["synth", "--out", str(out), "--drives", "2", "--frames", "4", "--width", "48",
                     "--height", "16"]) == 2
    err = capsys.readouterr().err
    assert "xdistill synth: error: " in err and str(out) in err and "Traceback" not in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert cli.main(["synth", "--out", str(tmp_path / "w2"), "--drives", "1"]) == 2
    assert "xdistill synth: error: " in capsys.readouterr().err
    # a negative seed: named, and checked before the temporary w4.partial/ is made
    assert cli.main(["synth", "--out", str(tmp_path / "w4"), "--seed", "-1", "--drives", "2", "--frames", "4",
                     "--width", "48", "--height", "16", "--make3d-images", "0", "--workers", "1"]) == 2
    assert "xdistill synth: error: --seed must be >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "w4").exists() and not (tmp_path / "w4.partial").exists()
    with pytest.raises(SystemExit):
        cli.main(["synth", "--out", str(tmp_path / "w3"), "--make3d-size", "0x0"])
    assert "rows and cols must be positive, got '0x0'" in capsys.readouterr().err


def test_worker_processes_do_not_change_the_world(tmp_path):
    def world_bytes(out, workers):
        generate_world(out, seed=9, drives=2, frames=4, width=32, height=16, make3d_images=2,
                       make3d_size=(16, 12), lidar_azimuths=32, workers=workers)
        return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    one = world_bytes(tmp_path / "one", 1)
    two = world_bytes(tmp_path / "two", 2)
    assert one == two and len(one) > 50
