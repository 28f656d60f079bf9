"""Pose evaluation: 5-frame snippet ATE as Monodepth2's evaluate_pose.py (reference §6.5).

For a sequence of N frames with camera-to-world poses G_0..G_{N-1}:
- the GT relative transform of pair i is T_i = inv(inv(G_i) G_{i+1}) (maps points of frame i into
  frame i+1); the prediction for pair i is the pose net on [I_i, I_{i+1}], not inverted;
- snippet i (i = 0..N-2) takes T_i..T_{i+3} (fewer near the end), chains them from the identity
  by right-multiplication and keeps the translation column of each partial product (so up to 5
  positions, the first at the origin) -- SfMLearner's convention, reproduced as the reference;
- ATE(snippet) = sqrt(sum |s * p_pred - p_gt|^2) / n_positions after aligning the first positions
  and s = sum(p_gt . p_pred) / sum(p_pred^2); reported as mean and std over snippets.

Sequences come from
- KITTI odometry (`--split odom_09|odom_10`): `DATA/sequences/NN/image_2/%06d.png` (or `.jpg`, as
  Monodepth2 reads by default; one format per sequence, frame 0's; `image_3` for side `r`, as
  Monodepth2's side map) and `DATA/poses/NN.txt` (12 numbers per line, 3x4 camera-0-to-world),
  frames from the shipped `splits/odom/test_files_NN.txt` (one `NN FRAME SIDE` line per pair, one
  side throughout; the last line's frame + 1 ends the sequence);
- the KITTI raw layout (real or the synthetic world, `--pose --split-file`): consecutive frames of
  one drive; GT from `oxts/data/*.txt` (devkit's convertOxtsToPose) and the calibration chain
  IMU -> velodyne -> camera 0 -> rectified camera 2/3.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

import numpy as np

from xdistill_jax.inference import DepthModel, PosePredictor, batched, load_resized

TRACK_LENGTH = 5
ODOM_SEQUENCES = {"odom_09": 9, "odom_10": 10}
ODOM_SIDES = {"l": 2, "2": 2, "r": 3, "3": 3}  # split-file side -> image_N folder (Monodepth2's side map)


@dataclasses.dataclass
class PoseSequence:
    """N image paths and their (N,4,4) camera-to-world GT poses."""

    images: list[pathlib.Path]
    poses: np.ndarray
    name: str


def relative_transforms(poses: np.ndarray) -> np.ndarray:
    """(N,4,4) camera-to-world -> (N-1,4,4) T_i = inv(inv(G_i) G_{i+1}) (frame i -> frame i+1 points)."""
    poses = np.asarray(poses, np.float64)
    return np.stack([np.linalg.inv(np.linalg.inv(poses[i]) @ poses[i + 1]) for i in range(len(poses) - 1)])


def chain_positions(transforms: np.ndarray) -> np.ndarray:
    """(n,4,4) -> (n+1,3): translations of I, T_0, T_0 T_1, ... (right-multiplied, from the identity)."""
    acc = np.eye(4)
    out = [acc[:3, 3].copy()]
    for t in transforms:
        acc = acc @ t
        out.append(acc[:3, 3].copy())
    return np.stack(out)


def compute_ate(gt_xyz: np.ndarray, pred_xyz: np.ndarray) -> float:
    """Monodepth2/SfMLearner ATE: align first positions, least-squares scale, sqrt(sum err^2) / N."""
    gt_xyz = np.asarray(gt_xyz, np.float64)
    pred_xyz = np.asarray(pred_xyz, np.float64)
    if gt_xyz.shape != pred_xyz.shape or gt_xyz.ndim != 2 or gt_xyz.shape[1] != 3:
        raise ValueError(f"gt_xyz/pred_xyz: expected two (N,3) arrays, got {gt_xyz.shape} and {pred_xyz.shape}")
    pred = pred_xyz + (gt_xyz[0] - pred_xyz[0])[None]
    denom = np.sum(pred**2)
    scale = np.sum(gt_xyz * pred) / denom if denom > 0 else 0.0
    return float(np.sqrt(np.sum((pred * scale - gt_xyz) ** 2)) / gt_xyz.shape[0])


def snippet_ates(gt_transforms: np.ndarray, pred_transforms: np.ndarray, track_length: int = TRACK_LENGTH) -> np.ndarray:
    """ATE of every snippet i = 0..n-1 over transforms [i, i + track_length - 1)."""
    if len(gt_transforms) != len(pred_transforms):
        raise ValueError(f"{len(pred_transforms)} predicted transforms for {len(gt_transforms)} GT ones")
    k = track_length - 1
    return np.array([compute_ate(chain_positions(gt_transforms[i:i + k]), chain_positions(pred_transforms[i:i + k]))
                     for i in range(len(gt_transforms))])


# ----------------------------------------------------------------------------------- sequences


def read_odometry_poses(path) -> np.ndarray:
    """KITTI odometry `poses/NN.txt`: (N,4,4) float64; a bad line raises naming file and line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"odometry poses not found: {path}")
    out = []
    for lineno, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            values = [float(v) for v in text.split()]
        except ValueError:
            raise ValueError(f"{path}:{lineno}: not numbers: {text[:60]!r}") from None
        if len(values) != 12:
            raise ValueError(f"{path}:{lineno}: {len(values)} values, expected 12 (a 3x4 matrix)")
        pose = np.eye(4)
        pose[:3] = np.reshape(values, (3, 4))
        out.append(pose)
    if not out:
        raise ValueError(f"{path}: no poses (expected one line of 12 numbers per frame)")
    return np.stack(out)


def odometry_sequence(data_dir, split: str, split_file=None) -> PoseSequence:
    """Frames and GT of KITTI odometry sequence 09 or 10 (see the module docstring)."""
    from xdistill_jax.eval_depth import splits_dir

    if split not in ODOM_SEQUENCES:
        raise ValueError(f"--split: expected one of {sorted(ODOM_SEQUENCES)}, got {split!r}")
    seq = ODOM_SEQUENCES[split]
    split_file = pathlib.Path(split_file or splits_dir() / "odom" / f"test_files_{seq:02d}.txt")
    frames, camera, first_line = [], None, None
    for lineno, text in enumerate(split_file.read_text().splitlines(), 1):
        parts = text.split()
        if not parts:
            continue
        if (len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) != seq or not parts[1].isdigit()
                or parts[2] not in ODOM_SIDES):
            raise ValueError(f"{split_file}:{lineno}: expected '{seq} FRAME SIDE' (SIDE l or r), got {text!r}")
        if camera is None:
            camera, first_line = ODOM_SIDES[parts[2]], lineno
        elif ODOM_SIDES[parts[2]] != camera:
            raise ValueError(f"{split_file}:{lineno}: camera image_{ODOM_SIDES[parts[2]]} (side {parts[2]}), "
                             f"line {first_line} image_{camera}: pose evaluation takes one camera")
        frames.append(int(parts[1]))
    if not frames:
        raise ValueError(f"{split_file}: split file has no lines (expected one '{seq} FRAME l' line per frame pair)")
    frames.append(frames[-1] + 1)
    _check_consecutive(frames, split_file)
    poses = read_odometry_poses(pathlib.Path(data_dir) / "poses" / f"{seq:02d}.txt")
    if len(poses) <= frames[-1]:
        raise ValueError(f"{data_dir}/poses/{seq:02d}.txt has {len(poses)} poses; frame {frames[-1]} needs more")
    folder = pathlib.Path(data_dir) / "sequences" / f"{seq:02d}" / f"image_{camera}"
    return PoseSequence(_one_format([folder / f"{f:06d}" for f in frames]), poses[frames], f"sequence {seq:02d}")


def _one_format(stems: Sequence[pathlib.Path]) -> list[pathlib.Path]:
    """The frames' paths in frame 0's format (`raw.image_format`: .png, else .jpg, as the raw
    layout's frames). A frame only in the other format (a sequence half-converted to JPEG) raises
    ValueError naming both."""
    from data_pipelines.kitti import raw

    ext = raw.image_format(stems[0])
    other = raw.IMAGE_EXTS[1] if ext == raw.IMAGE_EXTS[0] else raw.IMAGE_EXTS[0]
    for stem in stems:
        if not stem.with_suffix(ext).is_file() and stem.with_suffix(other).is_file():
            raise ValueError(f"{stems[0].with_suffix(ext)} is {ext} but {stem.with_suffix(other)} exists only as "
                             f"{other} (a sequence half-converted to JPEG?): a sequence's frames must share one format")
    return [stem.with_suffix(ext) for stem in stems]


def _check_consecutive(frames: Sequence[int], source) -> None:
    for i in range(1, len(frames)):
        if frames[i] != frames[i - 1] + 1:
            raise ValueError(f"{source}: line {i + 1} has frame {frames[i]} after {frames[i - 1]}; "
                             "pose evaluation needs consecutive frames")


def raw_camera_poses(drive_dir, frames: Sequence[int], camera: int = 2) -> np.ndarray:
    """(N,4,4) rectified-camera-to-world poses of a KITTI raw drive from its oxts packets + calibration."""
    from data_pipelines.kitti import raw

    drive_dir = pathlib.Path(drive_dir)
    calib = drive_dir.parent
    cam_path = calib / "calib_cam_to_cam.txt"
    cam = raw.read_calib_file(cam_path, required=("R_rect_00", f"P_rect_0{camera}"))
    rect0_from_cam0 = np.eye(4)
    rect0_from_cam0[:3, :3] = raw.calib_matrix(cam, "R_rect_00", (3, 3), cam_path)
    p = raw.calib_matrix(cam, f"P_rect_0{camera}", (3, 4), cam_path)
    rectk_from_rect0 = np.eye(4)
    rectk_from_rect0[:3, 3] = np.linalg.solve(p[:, :3], p[:, 3])  # P = K [I | b]
    imu_from_cam = (np.linalg.inv(raw.imu_to_velo(calib)) @ np.linalg.inv(raw.velo_to_cam(calib))
                    @ np.linalg.inv(rect0_from_cam0) @ np.linalg.inv(rectk_from_rect0))
    packets = [raw.read_oxts_packet(drive_dir / "oxts" / "data" / f"{f:010d}.txt") for f in frames]
    scale = np.cos(np.radians(packets[0][0]))  # the devkit: Mercator scale of the first packet
    return np.stack([raw.oxts_pose(pk, scale) @ imu_from_cam for pk in packets])


def raw_sequence(data_dir, split_file) -> PoseSequence:
    """Consecutive frames of one raw-layout drive listed in `split_file` (e.g. the synthetic test split)."""
    from data_pipelines.kitti import raw

    lines = raw.read_split_file(split_file)
    if len(lines) < 2:
        raise ValueError(f"{split_file}: pose evaluation needs at least 2 consecutive frames")
    for i, line in enumerate(lines):
        if line.folder != lines[0].folder or line.side != lines[0].side:
            raise ValueError(f"{split_file}: line {i + 1} '{line}' is not from '{lines[0].folder}' side "
                             f"{lines[0].side}; pose evaluation takes one drive and camera")
    frames = [line.frame_index for line in lines]
    _check_consecutive(frames, split_file)
    # one format, as prepare's triplets (a drive half-converted to JPEG mixed them until 2026-12-07)
    images = _one_format([raw.image_path(data_dir, line, ext="") for line in lines])
    drive = pathlib.Path(data_dir) / lines[0].folder
    poses = raw_camera_poses(drive, frames, lines[0].camera)
    return PoseSequence(images, poses, lines[0].folder)


# ---------------------------------------------------------------------------------- evaluation


def predict_transforms(model: DepthModel, images: Sequence, *, batch_size: int = 16,
                       show_progress: bool = True) -> np.ndarray:
    """(N-1,4,4) predicted transforms for consecutive image pairs (each image read once)."""
    predictor = PosePredictor(model, batch_size)
    frames = {}
    out = []
    pairs = list(range(len(images) - 1))

    def load(i):
        return load_resized(images[i], model.height, model.width)[0]

    for chunk, loaded in batched(list(range(len(images))), predictor.batch_size, load, desc="pose",
                                 show_progress=show_progress):
        frames.update(zip(chunk, loaded))
        ready = [i for i in pairs[len(out):] if i + 1 in frames]
        for s in range(0, len(ready), predictor.batch_size):
            part = ready[s:s + predictor.batch_size]
            out.extend(predictor.predict(np.stack([frames[i] for i in part]), np.stack([frames[i + 1] for i in part])))
        for i in [k for k in frames if k < chunk[-1]]:
            del frames[i]  # keep only the frame the next pair still needs
    return np.stack(out)


def evaluate_pose(model: DepthModel, sequence: PoseSequence, *, batch_size: int = 16,
                  show_progress: bool = True) -> dict:
    """{"ate_mean", "ate_std", "num_snippets", "num_frames"} for one sequence; also per-snippet ATEs."""
    missing = [p for p in sequence.images if not pathlib.Path(p).is_file()]
    if missing:
        raise ValueError(f"{sequence.name}: {len(missing)} images missing, first {missing[0]}")
    pred = predict_transforms(model, sequence.images, batch_size=batch_size, show_progress=show_progress)
    ates = snippet_ates(relative_transforms(sequence.poses), pred)
    return {"ate_mean": float(np.mean(ates)), "ate_std": float(np.std(ates)), "num_snippets": int(len(ates)),
            "num_frames": len(sequence.images), "ates": ates}
