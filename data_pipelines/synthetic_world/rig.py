"""The sensor rig (cameras 00-03, velodyne, GPS/IMU) and its KITTI calibration and oxts texts.

Frames (KITTI conventions): vehicle/IMU/velodyne x forward, y left, z up; cameras x right, y
down, z forward. The rig copies KITTI's geometry: velodyne 1.73 m above the ground, IMU 0.81 m
behind / 0.32 m right of / 0.80 m below it, camera 0 0.27 m ahead of and 0.08 m below the
velodyne; rectified cameras offset along x: cam 2 0.06 m left of cam 0, cam 3 0.48 m right
(0.54 m stereo baseline), cam 1 0.54 m right. A small rectifying rotation R_rect_00 and a small
velodyne-to-camera misalignment keep every matrix in use.

Pixel convention: rendering uses 0-based pixel centres (pixel j at coordinate j) with
fx = 0.58 W, fy = 1.92 H, cx = W/2, cy = H/2, i.e. exactly Monodepth2's normalised K. The
K/P_rect written to calib_cam_to_cam.txt use KITTI's 1-based convention (principal point + 1),
which is what Monodepth2's `generate_depth_map` assumes with its `round() - 1`: a scan exported
with it lands on the pixel it was rendered at.

The calibration written to disk is the truth: `Rig.from_calib_dir` re-reads it and the renderer
uses those parsed numbers, so files and images agree to the printed precision.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from data_pipelines.kitti import raw

IMU_HEIGHT = 0.93  # metres above ground
ALT0 = 112.0  # oxts altitude of the ground plane (metres above sea level)
LAT0, LON0 = 49.011, 8.422  # world origin (degrees)
CAMERA_OFFSETS = {0: 0.0, 1: -0.54, 2: 0.06, 3: -0.48}  # T_0x[0]: x_camx = x_cam0 + T_0x


def _rot(axis: str, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _fmt(values) -> str:
    return " ".join(f"{v:.6e}" for v in np.asarray(values, np.float64).reshape(-1))


def intrinsics(width: int, height: int) -> tuple[float, float, float, float]:
    """Rendering intrinsics (0-based pixel centres): Monodepth2's normalised K times (W, H)."""
    return 0.58 * width, 1.92 * height, 0.5 * width, 0.5 * height


def calibration_texts(width: int, height: int) -> dict[str, str]:
    """The three KITTI calibration files (name -> text) for images of width x height."""
    fx, fy, cx, cy = intrinsics(width, height)
    k_file = np.array([[fx, 0, cx + 1.0], [0, fy, cy + 1.0], [0, 0, 1]])
    r_rect = _rot("y", math.radians(0.12)) @ _rot("x", math.radians(-0.2))
    lines = ["calib_time: 01-Jan-2021 12:00:00", "corner_dist: 9.950000e-02"]
    for cam in range(4):
        t = np.array([CAMERA_OFFSETS[cam], 0.0, 0.0])
        p_rect = k_file @ np.concatenate([np.eye(3), (r_rect @ t)[:, None]], 1)
        lines += [
            f"S_{cam:02d}: {_fmt([width, height])}",
            f"K_{cam:02d}: {_fmt(k_file)}",
            f"D_{cam:02d}: {_fmt(np.zeros(5))}",
            f"R_{cam:02d}: {_fmt(np.eye(3))}",
            f"T_{cam:02d}: {_fmt(t)}",
            f"S_rect_{cam:02d}: {_fmt([width, height])}",
            f"R_rect_{cam:02d}: {_fmt(r_rect)}",
            f"P_rect_{cam:02d}: {_fmt(p_rect)}",
        ]
    cam_to_cam = "\n".join(lines) + "\n"

    # velodyne -> camera 0: axis permutation plus a small misalignment; camera centre in velo frame.
    perm = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]], np.float64)
    r_velo = perm @ _rot("z", math.radians(0.3)) @ _rot("y", math.radians(-0.4))
    cam_centre_velo = np.array([0.27, -0.004, -0.076])
    t_velo = -r_velo @ cam_centre_velo
    velo_to_cam = "\n".join([
        "calib_time: 01-Jan-2021 12:00:00", f"R: {_fmt(r_velo)}", f"T: {_fmt(t_velo)}",
        f"delta_f: {_fmt([0, 0])}", f"delta_c: {_fmt([0, 0])}"]) + "\n"
    imu_to_velo = "\n".join([
        "calib_time: 01-Jan-2021 12:00:00", f"R: {_fmt(np.eye(3))}",
        f"T: {_fmt([-0.808, 0.319, -0.800])}"]) + "\n"
    return {"calib_cam_to_cam.txt": cam_to_cam, "calib_velo_to_cam.txt": velo_to_cam,
            "calib_imu_to_velo.txt": imu_to_velo}


class Rig:
    """Transforms between vehicle, IMU, velodyne and rectified cameras, read from calibration files."""

    def __init__(self, calib_dir):
        calib_dir = Path(calib_dir)
        path = calib_dir / "calib_cam_to_cam.txt"
        cam = raw.read_calib_file(path)
        self.width, self.height = (int(v) for v in raw.calib_matrix(cam, "S_rect_02", (2,), path))
        r_rect = np.eye(4)
        r_rect[:3, :3] = raw.calib_matrix(cam, "R_rect_00", (3, 3), path)
        self.p_rect = {k: raw.calib_matrix(cam, f"P_rect_0{k}", (3, 4), path) for k in range(4)}
        k_file = self.p_rect[0][:, :3]
        self.fx, self.fy = k_file[0, 0], k_file[1, 1]
        self.cx, self.cy = k_file[0, 2] - 1.0, k_file[1, 2] - 1.0  # back to 0-based
        cam0_from_velo = raw.velo_to_cam(calib_dir)
        velo_from_imu = raw.imu_to_velo(calib_dir)
        vehicle_from_imu = np.eye(4)
        vehicle_from_imu[2, 3] = IMU_HEIGHT
        self.vehicle_from_imu = vehicle_from_imu
        self.vehicle_from_velo = vehicle_from_imu @ np.linalg.inv(velo_from_imu)
        vehicle_from_rect0 = self.vehicle_from_velo @ np.linalg.inv(cam0_from_velo) @ np.linalg.inv(r_rect)
        self.vehicle_from_cam = {}
        for k in range(4):
            # x_rectk = x_rect0 + b with b = K^-1 P[:, 3] (P = K [I | b]).
            b = np.linalg.solve(k_file, self.p_rect[k][:, 3])
            rectk_from_rect0 = np.eye(4)
            rectk_from_rect0[:3, 3] = b
            self.vehicle_from_cam[k] = vehicle_from_rect0 @ np.linalg.inv(rectk_from_rect0)


def mercator_to_latlon(mx: np.ndarray, my: np.ndarray, scale: float):
    lon = mx * 180.0 / (scale * math.pi * raw.EARTH_RADIUS)
    lat = 360.0 / math.pi * np.arctan(np.exp(my / (scale * raw.EARTH_RADIUS))) - 90.0
    return lat, lon


def oxts_lines(imu_poses: np.ndarray, fps: float) -> list[str]:
    """KITTI oxts text lines (30 values) for IMU->world poses (F,4,4) on flat ground, yaw only.

    Velocities and accelerations come from finite differences of the poses (10 Hz); the
    inverse of the devkit's Mercator projection gives lat/lon, so `raw.oxts_pose` recovers the
    poses (up to the constant altitude ALT0).
    """
    scale = math.cos(math.radians(LAT0))
    mx0 = scale * LON0 * math.pi * raw.EARTH_RADIUS / 180.0
    my0 = scale * raw.EARTH_RADIUS * math.log(math.tan((90.0 + LAT0) * math.pi / 360.0))
    pos = imu_poses[:, :3, 3]
    yaw = np.unwrap(np.arctan2(imu_poses[:, 1, 0], imu_poses[:, 0, 0]))
    lat, lon = mercator_to_latlon(mx0 + pos[:, 0], my0 + pos[:, 1], scale)
    dt = 1.0 / fps
    vel = np.gradient(pos, dt, axis=0) if len(pos) > 1 else np.zeros_like(pos)
    acc = np.gradient(vel, dt, axis=0) if len(pos) > 1 else np.zeros_like(pos)
    wz = np.gradient(yaw, dt) if len(pos) > 1 else np.zeros(len(pos))
    out = []
    for i in range(len(pos)):
        c, s = math.cos(yaw[i]), math.sin(yaw[i])
        vf, vl = c * vel[i, 0] + s * vel[i, 1], -s * vel[i, 0] + c * vel[i, 1]
        af, al = c * acc[i, 0] + s * acc[i, 1], -s * acc[i, 0] + c * acc[i, 1]
        wrapped_yaw = math.atan2(s, c)
        values = [lat[i], lon[i], pos[i, 2] + ALT0, 0.0, 0.0, wrapped_yaw,
                  vel[i, 1], vel[i, 0], vf, vl, 0.0,
                  af, al, 9.81, af, al, 9.81,
                  0.0, 0.0, wz[i], 0.0, 0.0, wz[i],
                  0.05, 0.02, 4, 10, 4, 4, 0]
        out.append(" ".join(f"{v:.14g}" if isinstance(v, float) else str(v) for v in values))
    return out


OXTS_DATAFORMAT = """lat:   latitude of the oxts-unit (deg)
lon:   longitude of the oxts-unit (deg)
alt:   altitude of the oxts-unit (m)
roll:  roll angle (rad),    0 = level, positive = left side up,      range: -pi   .. +pi
pitch: pitch angle (rad),   0 = level, positive = front down,        range: -pi/2 .. +pi/2
yaw:   heading (rad),       0 = east,  positive = counter clockwise, range: -pi   .. +pi
vn:    velocity towards north (m/s)
ve:    velocity towards east (m/s)
vf:    forward velocity, i.e. parallel to earth-surface (m/s)
vl:    leftward velocity, i.e. parallel to earth-surface (m/s)
vu:    upward velocity, i.e. perpendicular to earth-surface (m/s)
ax:    acceleration in x, i.e. in direction of vehicle front (m/s^2)
ay:    acceleration in y, i.e. in direction of vehicle left (m/s^2)
az:    acceleration in z, i.e. in direction of vehicle top (m/s^2)
af:    forward acceleration (m/s^2)
al:    leftward acceleration (m/s^2)
au:    upward acceleration (m/s^2)
wx:    angular rate around x (rad/s)
wy:    angular rate around y (rad/s)
wz:    angular rate around z (rad/s)
wf:    angular rate around forward axis (rad/s)
wl:    angular rate around leftward axis (rad/s)
wu:    angular rate around upward axis (rad/s)
pos_accuracy:  velocity accuracy (north/east in m)
vel_accuracy:  velocity accuracy (north/east in m/s)
navstat:       navigation status (see navstat_to_string)
numsats:       number of satellites tracked by primary GPS receiver
posmode:       position mode of primary GPS receiver (see gps_mode_to_string)
velmode:       velocity mode of primary GPS receiver (see gps_mode_to_string)
orimode:       orientation mode of primary GPS receiver (see gps_mode_to_string)
"""
