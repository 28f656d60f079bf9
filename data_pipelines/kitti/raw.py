"""Readers for the KITTI raw formats (real KITTI and the synthetic world written in its layout).

Layout: `ROOT/DATE/calib_{cam_to_cam,velo_to_cam,imu_to_velo}.txt` and
`ROOT/DATE/DATE_drive_XXXX_sync/{image_02,image_03,velodyne_points,oxts}/data/%010d.*`.
Split files (Monodepth2 format): one `FOLDER FRAME SIDE` per line, SIDE `l` = image_02,
`r` = image_03.

`generate_depth_map` ports the velodyne projection of Monodepth2's evaluation exactly (reference
section 6.3), quirks included: `round() - 1` (KITTI's 1-based pixel convention), the image size of
camera 02 for every camera, closest depth on duplicate pixels found with a `sub2ind` that uses
`W - 1`, and negatives set to 0.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

# A calibration value is numeric when every character is one of these (reference 6.3 step 1).
_NUMERIC_CHARS = set("0123456789.e+- ")

SIDE_TO_CAMERA = {"l": 2, "r": 3}


@dataclasses.dataclass(frozen=True)
class SplitLine:
    """One line of a Monodepth2 split file: `folder frame_index side`.

    `str(line)` is the normalised text `FOLDER FRAME SIDE` with the frame unpadded (the Eigen
    list's `0000000069` becomes `69`); example ids and GT `files` use this form.
    """

    folder: str
    frame_index: int
    side: str

    def __str__(self) -> str:
        return f"{self.folder} {self.frame_index} {self.side}"

    @property
    def camera(self) -> int:
        """KITTI camera number of this side (2 for `l`, 3 for `r`)."""
        return SIDE_TO_CAMERA[self.side]

    @property
    def is_odometry(self) -> bool:
        """A line of an odometry split (`odom/`): its folder is a sequence number (`8 4056 r`),
        its frames in the KITTI odometry layout (`image_path`), not a raw drive's."""
        return self.folder.isascii() and self.folder.isdigit()


class CalibFile(dict):
    """`read_calib_file`'s result: {key: float64 array or string}, and `lines[key]`, the line
    the key was read from (for `calib_matrix`'s errors)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lines: dict[str, int] = {}


def read_calib_file(path, required: tuple[str, ...] = ()) -> CalibFile:
    """Parse a KITTI `key: values` calibration file.

    Values made only of `0123456789.e+- ` become float64 1-D arrays (as the reference does);
    others (e.g. `calib_time`) stay strings. `required` keys that are absent raise ValueError
    naming the file and the key. A missing file raises FileNotFoundError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path}")
    data = CalibFile()
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            key, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"{path}:{lineno}: expected 'key: values', got {line.strip()!r}")
            key, value = key.strip(), value.strip()
            data.lines[key] = lineno
            tokens = value.split()  # spaces or tabs
            if tokens and all(set(t) <= _NUMERIC_CHARS for t in tokens):
                try:
                    data[key] = np.array([float(x) for x in tokens])
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: bad number in {key!r}: {value!r}") from None
            else:
                data[key] = value
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{path}: missing calibration key(s) {', '.join(missing)}")
    return data


def calib_matrix(calib: dict, key: str, shape: tuple[int, ...], path="calibration") -> np.ndarray:
    """`calib[key]` reshaped to `shape`, with an error naming the file and key if absent or mis-sized."""
    if key not in calib:
        raise ValueError(f"{path}: missing calibration key {key}")
    lineno = getattr(calib, "lines", {}).get(key)
    where = f"{path}:{lineno}" if lineno else str(path)
    if isinstance(calib[key], str):
        raise ValueError(f"{where}: key {key} is not a list of numbers: {calib[key]!r}")
    value = np.asarray(calib[key])
    if value.dtype.kind not in "fi" or value.size != math.prod(shape):
        raise ValueError(f"{where}: key {key} has {value.size} values, expected {math.prod(shape)}")
    return value.reshape(shape)


def read_split_file(path) -> list[SplitLine]:
    """Read a Monodepth2 split file. A malformed line raises ValueError naming file and line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    lines = []
    with open(path) as f:
        for lineno, raw in enumerate(f, 1):
            text = raw.strip()
            if not text:
                continue
            parts = text.split()
            if len(parts) != 3:
                raise ValueError(
                    f"{path}:{lineno}: expected 'FOLDER FRAME SIDE' (3 fields), got {text!r}"
                )
            folder, frame, side = parts
            if not (frame.isascii() and frame.isdigit()):  # str.isdigit() also takes '²'
                raise ValueError(f"{path}:{lineno}: frame index {frame!r} is not a non-negative integer")
            if side not in SIDE_TO_CAMERA:
                raise ValueError(f"{path}:{lineno}: side {side!r} must be 'l' or 'r'")
            lines.append(SplitLine(folder, int(frame), side))
    return lines


IMAGE_EXTS = (".png", ".jpg")  # KITTI as downloaded; converted as Monodepth2's README suggests


def image_format(stem: Path) -> str:
    """The suffix a frame `stem` is stored with: .png if that file exists, else .jpg if that does
    (a tree converted to JPEG, as Monodepth2's README suggests), else .png (what a missing-frame
    error names)."""
    for candidate in IMAGE_EXTS:
        if stem.with_suffix(candidate).is_file():
            return candidate
    return IMAGE_EXTS[0]


def image_path(root, line: SplitLine, frame_offset: int = 0, ext: str | None = None) -> Path:
    """`ROOT/FOLDER/image_0{2,3}/data/%010d.EXT` of `line`'s frame plus `frame_offset`; for an
    odometry split's line (`SplitLine.is_odometry`) `ROOT/sequences/%02d/image_{2,3}/%06d.EXT`, the
    KITTI odometry layout, as Monodepth2's KITTIOdomDataset reads it (ROOT the odometry dataset's
    folder holding `sequences/`).

    ext None: the frame's .png if it exists, else its .jpg if that exists (a KITTI tree converted
    to JPEG, as Monodepth2's README suggests and its loader reads by default), else the .png path
    (what a missing-frame error names, with `IMAGE_EXTS`).
    """
    index = line.frame_index + frame_offset
    if index < 0:
        raise ValueError(f"split line {line}: frame {line.frame_index}{frame_offset:+d} is negative")
    if line.is_odometry:
        stem = Path(root) / "sequences" / f"{int(line.folder):02d}" / f"image_{line.camera}" / f"{index:06d}"
    else:
        stem = Path(root) / line.folder / f"image_0{line.camera}" / "data" / f"{index:010d}"
    return stem.with_suffix(ext if ext is not None else image_format(stem))


def triplet_paths(root, line: SplitLine, offsets=(-1, 0, 1)) -> dict[int, Path]:
    """{offset: image path} of `line`'s frames, all in frame 0's format (its .png, else its .jpg).

    A neighbour that exists only in the other format (a tree half-converted to JPEG) raises
    ValueError naming both files: a photometric loss between a JPEG and a PNG frame is not the one
    Monodepth2 trains with. A frame in neither format gets its path in frame 0's, or every frame
    its own where frame 0 is missing (the caller's missing-frame error names it).
    """
    frame0 = image_path(root, line, 0)
    if not frame0.is_file():  # each frame in its own format: the caller names what is missing
        return {offset: image_path(root, line, offset) for offset in offsets}
    ext = frame0.suffix
    out = {}
    for offset in offsets:
        path = image_path(root, line, offset, ext)
        other = path.with_suffix(IMAGE_EXTS[1] if ext == IMAGE_EXTS[0] else IMAGE_EXTS[0])
        if not path.is_file() and other.is_file():
            raise ValueError(f"split line {line}: frame 0 is {frame0.name} but frame "
                             f"{offset:+d} exists only as {other} (a tree half-converted to JPEG?): "
                             "a triplet's frames must share one format")
        out[offset] = path
    return out


def velodyne_path(root, line: SplitLine) -> Path:
    """`ROOT/FOLDER/velodyne_points/data/%010d.bin` of `line`'s frame."""
    return Path(root) / line.folder / "velodyne_points" / "data" / f"{line.frame_index:010d}.bin"


def calib_dir(root, line: SplitLine) -> Path:
    """The date folder holding the calibration files of `line`'s drive (`ROOT/DATE`)."""
    return Path(root) / line.folder.split("/")[0]


def load_velodyne_points(path) -> np.ndarray:
    """(N,4) float32 x, y, z, reflectance (velodyne frame, metres) from a KITTI .bin scan."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"velodyne scan not found: {path}")
    size = path.stat().st_size
    if size % 16:
        raise ValueError(f"{path}: {size} bytes is not a multiple of 16 (4 float32 per point): truncated scan")
    return np.fromfile(path, dtype=np.float32).reshape(-1, 4)


def _rigid_transform(path: Path) -> np.ndarray:
    """4x4 [R T; 0 1] from a KITTI calibration file holding keys R (3x3) and T (3)."""
    calib = read_calib_file(path, required=("R", "T"))
    out = np.eye(4)
    out[:3, :3] = calib_matrix(calib, "R", (3, 3), path)
    out[:3, 3] = calib_matrix(calib, "T", (3,), path)
    return out


def velo_to_cam(calib_dir_path) -> np.ndarray:
    """4x4 transform velodyne -> unrectified camera 0 from `calib_velo_to_cam.txt` (R, T)."""
    return _rigid_transform(Path(calib_dir_path) / "calib_velo_to_cam.txt")


def imu_to_velo(calib_dir_path) -> np.ndarray:
    """4x4 transform IMU/GPS -> velodyne from `calib_imu_to_velo.txt` (R, T)."""
    return _rigid_transform(Path(calib_dir_path) / "calib_imu_to_velo.txt")


def _sub2ind(shape, rows, cols):
    # Deliberately the reference's buggy linear index (W - 1 instead of W): (v, W-1) and
    # (v+1, 0) share an index, so such pairs are merged as "duplicates" as Monodepth2 does.
    _, n_cols = shape
    return rows * (n_cols - 1) + cols - 1


def generate_depth_map(calib_dir, velo_path, cam: int = 2, vel_depth: bool = False) -> np.ndarray:
    """Project a velodyne scan into rectified camera `cam`: (H,W) float32 depth in metres, 0 = none.

    H, W come from `S_rect_02` whatever `cam` is. Depth is the projected z, or the velodyne
    forward coordinate x when `vel_depth` (what Monodepth2's Eigen GT export uses).
    """
    calib_dir = Path(calib_dir)
    cam_path = calib_dir / "calib_cam_to_cam.txt"
    cam2cam = read_calib_file(cam_path, required=("S_rect_02", "R_rect_00", f"P_rect_0{cam}"))
    velo2cam = velo_to_cam(calib_dir)

    im_shape = calib_matrix(cam2cam, "S_rect_02", (2,), cam_path)[::-1].astype(np.int32)
    r_cam2rect = np.eye(4)
    r_cam2rect[:3, :3] = calib_matrix(cam2cam, "R_rect_00", (3, 3), cam_path)
    p_rect = calib_matrix(cam2cam, f"P_rect_0{cam}", (3, 4), cam_path)
    p_velo2im = p_rect @ r_cam2rect @ velo2cam

    velo = load_velodyne_points(velo_path)
    velo = velo[velo[:, 0] >= 0, :].copy()
    velo[:, 3] = 1.0

    # float64 from here (P is float64), as in the reference.
    velo_pts_im = (p_velo2im @ velo.T).T
    velo_pts_im[:, :2] = velo_pts_im[:, :2] / velo_pts_im[:, 2][..., None]
    if vel_depth:
        velo_pts_im[:, 2] = velo[:, 0]

    # np.round is round-half-to-even; "- 1" converts KITTI's 1-based pixel coordinates.
    velo_pts_im[:, 0] = np.round(velo_pts_im[:, 0]) - 1
    velo_pts_im[:, 1] = np.round(velo_pts_im[:, 1]) - 1
    val_inds = (velo_pts_im[:, 0] >= 0) & (velo_pts_im[:, 1] >= 0)
    val_inds = val_inds & (velo_pts_im[:, 0] < im_shape[1]) & (velo_pts_im[:, 1] < im_shape[0])
    velo_pts_im = velo_pts_im[val_inds, :]

    depth = np.zeros(tuple(im_shape), dtype=np.float64)
    cols = velo_pts_im[:, 0].astype(int)
    rows = velo_pts_im[:, 1].astype(int)
    depth[rows, cols] = velo_pts_im[:, 2]  # last write wins, then duplicates take the closest

    inds = _sub2ind(depth.shape, rows, cols)
    unique, counts = np.unique(inds, return_counts=True)
    for dd in unique[counts > 1]:
        pts = np.where(inds == dd)[0]
        x_loc = cols[pts[0]]
        y_loc = rows[pts[0]]
        depth[y_loc, x_loc] = velo_pts_im[pts, 2].min()
    depth[depth < 0] = 0
    return depth.astype(np.float32)


# --- oxts (GPS/IMU) packets ----------------------------------------------------------------

OXTS_FIELDS = (
    "lat lon alt roll pitch yaw vn ve vf vl vu ax ay az af al au wx wy wz wf wl wu "
    "pos_accuracy vel_accuracy navstat numsats posmode velmode orimode"
).split()
EARTH_RADIUS = 6378137.0  # metres, as the KITTI devkit


def read_oxts_packet(path) -> np.ndarray:
    """The 30 values of one `oxts/data/%010d.txt` file as float64 (order of OXTS_FIELDS)."""
    path = Path(path)
    values = path.read_text().split()
    if len(values) != len(OXTS_FIELDS):
        raise ValueError(f"{path}: {len(values)} oxts values, expected {len(OXTS_FIELDS)}")
    return np.array([float(v) for v in values])


def oxts_pose(packet: np.ndarray, scale: float) -> np.ndarray:
    """4x4 IMU->world pose from an oxts packet (KITTI devkit `convertOxtsToPose`).

    World: Mercator metres (x east, y north, z up) with `scale = cos(lat0)` of the drive's first
    packet; rotation Rz(yaw) Ry(pitch) Rx(roll).
    """
    lat, lon, alt, roll, pitch, yaw = packet[:6]
    tx = scale * lon * math.pi * EARTH_RADIUS / 180.0
    ty = scale * EARTH_RADIUS * math.log(math.tan((90.0 + lat) * math.pi / 360.0))
    cx, sx = math.cos(roll), math.sin(roll)
    cy, sy = math.cos(pitch), math.sin(pitch)
    cz, sz = math.cos(yaw), math.sin(yaw)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    pose = np.eye(4)
    pose[:3, :3] = rz @ ry @ rx
    pose[:3, 3] = (tx, ty, alt)
    return pose
