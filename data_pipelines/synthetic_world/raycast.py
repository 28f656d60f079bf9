"""Vectorised ray casting of a grid of rays from one origin against the ground, boxes and spheres.

A `RayGrid` is R x C rays sharing one origin (a pinhole camera or a spinning lidar). Each
primitive is tested only against the rectangle(s) of the grid its bounds can cover (`cover`),
so the cost per primitive is proportional to its footprint, not to the image size.

Hit buffer: `t` (R,C) distance along the (unnormalised) ray directions (for a pinhole camera the
directions have camera z = 1, so t is the z-depth), `prim` (R,C) int32 = primitive index,
GROUND or NOTHING, `face` (R,C) int8 = box face axis (0,1,2) in the box frame, -1 otherwise.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .scene import Primitives

GROUND = -1
NOTHING = -2
# Corner pairs of the 12 edges of a box whose corners are ordered as in `_box_corners`
# (index = 4 i + 2 j + k for signs (i, j, k)); edges join corners differing in one sign.
_EDGES = np.array([(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1])


@dataclasses.dataclass
class RayGrid:
    """origin (3,) world metres; dirs (R,C,3) world directions; `cover(center, corners, radius)`
    returns the list of (r0, r1, c0, c1) slices of the grid a primitive can hit ([] = none)."""

    origin: np.ndarray
    dirs: np.ndarray
    cover: callable
    t_max: float


def pinhole_grid(cam_to_world: np.ndarray, fx, fy, cx, cy, width, height, t_max=1000.0) -> RayGrid:
    """Rays through pixel centres (u, v) = (col, row) of a camera with x right, y down, z forward.

    Directions have camera-frame z = 1, so a hit distance t is the z-depth in metres.
    """
    u = np.arange(width, dtype=np.float64)
    v = np.arange(height, dtype=np.float64)
    uu, vv = np.meshgrid(u, v)
    d_cam = np.stack([(uu - cx) / fx, (vv - cy) / fy, np.ones_like(uu)], -1)
    rot, origin = cam_to_world[:3, :3], cam_to_world[:3, 3]
    dirs = d_cam @ rot.T
    world_to_cam = np.linalg.inv(cam_to_world)
    near = 0.05

    def cover(center, corners, radius):
        pc = corners @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
        z = pc[:, 2]
        if z.max() < near:
            return []
        if z.min() < near:
            # Straddles the near plane: the visible part's vertices are the corners in front
            # plus the points where the 12 box edges cross the plane.
            a, b = pc[_EDGES[:, 0]], pc[_EDGES[:, 1]]
            cross = (a[:, 2] - near) * (b[:, 2] - near) < 0
            w = (near - a[cross, 2]) / (b[cross, 2] - a[cross, 2])
            pc = np.concatenate([pc[z >= near], a[cross] + w[:, None] * (b[cross] - a[cross])])
            z = pc[:, 2]
        us = fx * pc[:, 0] / z + cx
        vs = fy * pc[:, 1] / z + cy
        c0, c1 = max(int(math.floor(us.min())) - 1, 0), min(int(math.ceil(us.max())) + 2, width)
        r0, r1 = max(int(math.floor(vs.min())) - 1, 0), min(int(math.ceil(vs.max())) + 2, height)
        return [(r0, r1, c0, c1)] if (c1 > c0 and r1 > r0) else []

    return RayGrid(origin=origin, dirs=dirs, cover=cover, t_max=t_max)


def spherical_grid(sensor_to_world: np.ndarray, elevations_deg: np.ndarray, num_azimuths: int,
                   t_max=120.0) -> RayGrid:
    """Unit rays of a spinning lidar: row i at elevation `elevations_deg[i]` (descending), column j
    at azimuth 360 j / num_azimuths degrees, counter-clockwise from the sensor's x (forward) axis."""
    el = np.radians(np.asarray(elevations_deg, np.float64))
    az = np.arange(num_azimuths) * (2 * math.pi / num_azimuths)
    ee, aa = np.meshgrid(el, az, indexing="ij")
    d_sensor = np.stack([np.cos(ee) * np.cos(aa), np.cos(ee) * np.sin(aa), np.sin(ee)], -1)
    rot, origin = sensor_to_world[:3, :3], sensor_to_world[:3, 3]
    dirs = d_sensor @ rot.T
    world_to_sensor = np.linalg.inv(sensor_to_world)
    el_ascending = el[::-1]
    rows = len(el)
    step = 2 * math.pi / num_azimuths

    def cover(center, corners, radius):
        c = world_to_sensor[:3, :3] @ center + world_to_sensor[:3, 3]
        dh = math.hypot(c[0], c[1])
        if dh - radius > t_max:
            return []
        r_lo, r_hi = max(dh - radius, 1e-3), dh + radius
        z_lo, z_hi = c[2] - radius, c[2] + radius
        e_lo = min(math.atan2(z_lo, r_lo), math.atan2(z_lo, r_hi))
        e_hi = max(math.atan2(z_hi, r_lo), math.atan2(z_hi, r_hi))
        # rows hold descending elevations
        a = np.searchsorted(el_ascending, e_lo, "left")
        b = np.searchsorted(el_ascending, e_hi, "right")
        r0, r1 = max(rows - b - 1, 0), min(rows - a + 1, rows)
        if r1 <= r0:
            return []
        if dh <= radius + 0.05:
            return [(r0, r1, 0, num_azimuths)]
        half = math.asin(min(1.0, radius / dh))
        centre = math.atan2(c[1], c[0])
        j0 = int(math.floor((centre - half) / step)) - 1
        j1 = int(math.ceil((centre + half) / step)) + 2
        if j1 - j0 >= num_azimuths:
            return [(r0, r1, 0, num_azimuths)]
        j0m, j1m = j0 % num_azimuths, j1 % num_azimuths
        if j0m < j1m:
            return [(r0, r1, j0m, j1m)]
        return [(r0, r1, j0m, num_azimuths), (r0, r1, 0, j1m)]

    return RayGrid(origin=origin, dirs=dirs, cover=cover, t_max=t_max)


def _box_hits(o_world, d, center, half, yaw):
    """Entry distance t and face axis of rays (N,3) against one oriented box; t = inf on a miss."""
    c, s = math.cos(yaw), math.sin(yaw)
    rel = o_world - center
    o = np.array([c * rel[0] + s * rel[1], -s * rel[0] + c * rel[1], rel[2]])
    dl = np.empty_like(d)
    dl[:, 0] = c * d[:, 0] + s * d[:, 1]
    dl[:, 1] = -s * d[:, 0] + c * d[:, 1]
    dl[:, 2] = d[:, 2]
    dl[np.abs(dl) < 1e-12] = 1e-12
    inv = 1.0 / dl
    t1 = (-half - o) * inv
    t2 = (half - o) * inv
    tmin = np.minimum(t1, t2)
    tnear = tmin.max(axis=1)
    tfar = np.maximum(t1, t2).min(axis=1)
    hit = (tnear <= tfar) & (tnear > 1e-4)
    t = np.where(hit, tnear, np.inf)
    return t, tmin.argmax(axis=1).astype(np.int8)


def _sphere_hits(o_world, d, center, radius):
    oc = o_world - center
    a = np.einsum("ij,ij->i", d, d)
    b = d @ oc
    disc = b * b - a * (oc @ oc - radius * radius)
    root = np.sqrt(np.maximum(disc, 0.0))
    t = (-b - root) / a
    return np.where((disc > 0) & (t > 1e-4), t, np.inf)


def _box_corners(center, half, yaw):
    c, s = math.cos(yaw), math.sin(yaw)
    signs = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)], np.float64)
    local = signs * half
    world = np.stack([c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1], local[:, 2]], -1)
    return world + center


def cast(grid: RayGrid, prims: Primitives):
    """Closest hit per ray: (t (R,C) float64, prim (R,C) int32, face (R,C) int8)."""
    d = grid.dirs
    o = grid.origin
    rows, cols, _ = d.shape
    dz = d[..., 2]
    with np.errstate(divide="ignore"):
        t_ground = np.where(dz < -1e-9, -o[2] / dz, np.inf)
    t_ground[t_ground > grid.t_max] = np.inf
    t = t_ground
    prim = np.where(np.isfinite(t), GROUND, NOTHING).astype(np.int32)
    face = np.full((rows, cols), -1, np.int8)
    for i in range(len(prims)):
        center, half = prims.center[i], prims.size[i]
        if prims.kind[i] == 0:
            radius = float(np.linalg.norm(half))
            corners = _box_corners(center, half, float(prims.yaw[i]))
        else:
            radius = float(half[0])
            corners = center + np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * radius
        if np.linalg.norm(center - o) - radius > grid.t_max:
            continue
        for r0, r1, c0, c1 in grid.cover(center, corners, radius):
            sub = d[r0:r1, c0:c1].reshape(-1, 3)
            if prims.kind[i] == 0:
                th, fh = _box_hits(o, sub, center, half, float(prims.yaw[i]))
            else:
                th = _sphere_hits(o, sub, center, radius)
                fh = np.full(th.shape, -1, np.int8)
            th = th.reshape(r1 - r0, c1 - c0)
            closer = th < t[r0:r1, c0:c1]
            if not closer.any():
                continue
            t[r0:r1, c0:c1][closer] = th[closer]
            prim[r0:r1, c0:c1][closer] = i
            face[r0:r1, c0:c1][closer] = fh.reshape(r1 - r0, c1 - c0)[closer]
    return t, prim, face
