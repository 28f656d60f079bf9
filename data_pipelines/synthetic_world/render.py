"""Shading of ray-cast hits: Lambertian albedo textures, semantic trainIds, moving masks.

`render_view(grid, prims, road, pixel_angle)` -> dict with `rgb` (R,C,3) uint8, `t` (R,C) float64
hit distance (inf = sky), `semantic` (R,C) uint8 trainIds, `moving` (R,C) bool, `reflectance`
(R,C) float32 in [0,1] (lidar intensity), `prim` (R,C) int32.

Lighting is view-independent: colour = albedo * (0.45 + 0.55 max(0, n . sun)), so a surface point
has the same colour in every frame (no specular, no shadows) - photometric constancy holds exactly
up to resampling. The sky is a function of the ray direction only (at infinity).
"""

from __future__ import annotations


import numpy as np

from . import scene as S
from .raycast import GROUND, NOTHING, cast
from .textures import band, fbm, mix, periodic_band, soft_step

SUN = np.array([0.35, -0.45, 0.82])
SUN = SUN / np.linalg.norm(SUN)
GROUND_SEED = 77


def _local_coords(p, center, yaw):
    """Points p (N,3) in the frame of a box at center (N,3) or (3,) with yaw (N,) or scalar."""
    c, s = np.cos(yaw), np.sin(yaw)
    rel = p - center
    return np.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1], rel[:, 2]], -1)


def _ground_albedo(p, fp, road: S.RoadPath):
    """Albedo and trainId of ground points p (N,3) from their road coordinates."""
    s, off = road.road_coords(p[:, :2])
    a = np.abs(off)
    beyond = (s < 0.0) | (s > road.s[-1])
    cls = np.where(a < S.ROAD_HALF_WIDTH, S.ROAD, np.where(a < S.SIDEWALK_OUTER, S.SIDEWALK, S.TERRAIN))
    cls = np.where(beyond, S.TERRAIN, cls).astype(np.uint8)
    n = fbm(p, fp, GROUND_SEED, coarsest=6.0, finest=0.01)
    alb = np.empty((len(p), 3), np.float32)

    m = cls == S.ROAD
    if m.any():
        f, o, sm = fp[m], off[m], s[m]
        base = np.array([0.33, 0.33, 0.35], np.float32) * (1.0 + 0.55 * n[m])[:, None]
        centre = band(o, -0.07, 0.07, f) * periodic_band(sm, 9.0, 0.0, 3.0, f)
        edge = band(np.abs(o), 3.38, 3.52, f)
        stop = band(np.abs(o), 5.3, 5.5, f) * 0.5  # gutter: darker strip at the curb
        mark = np.clip(centre + edge, 0, 1)
        col = mix(base, np.array([0.92, 0.92, 0.88], np.float32), mark * 0.9)
        alb[m] = col * (1.0 - stop)[:, None]
    m = cls == S.SIDEWALK
    if m.any():
        f, o, sm = fp[m], np.abs(off[m]), s[m]
        base = np.array([0.62, 0.6, 0.57], np.float32) * (1.0 + 0.4 * n[m])[:, None]
        joints = np.maximum(periodic_band(sm, 0.6, 0.0, 0.03, f), periodic_band(o, 0.6, 0.0, 0.03, f))
        curb = band(o, 5.5, 5.75, f)
        col = base * (1.0 - 0.45 * joints)[:, None]
        alb[m] = mix(col, np.array([0.75, 0.74, 0.72], np.float32), curb)
    m = cls == S.TERRAIN
    if m.any():
        n2 = fbm(p[m] * np.array([1.0, 1.0, 0.0]) + 31.0, fp[m], GROUND_SEED + 5, coarsest=10.0, finest=0.01)
        col = mix(np.array([0.3, 0.42, 0.16], np.float32), np.array([0.45, 0.38, 0.24], np.float32),
                  np.clip(0.5 + 0.8 * n2, 0, 1))
        alb[m] = col * (1.0 + 0.5 * n[m])[:, None]
    return alb, cls


def _object_albedo(material, q, p, normal_local, fp, color, seed):
    """Albedo (N,3) of object points of one material: q local object coords, p world points,
    normal_local (N,3), fp (N,) footprints, color (N,3) base albedo, seed (N,) texture seeds."""
    n = fbm(q, fp, seed, coarsest=4.0, finest=0.01)
    col = np.broadcast_to(color, (len(q), 3)).astype(np.float32)
    if material == S.M_FACADE:
        side = np.abs(normal_local[:, 0]) > 0.5  # face normal along x: texture runs along y
        u = np.where(side, q[:, 1], q[:, 0])
        z = p[:, 2]
        top = normal_local[:, 2] > 0.5
        win = periodic_band(u, 3.2, 1.0, 2.4, fp) * periodic_band(z, 3.0, 0.9, 2.3, fp)
        win = win * soft_step(z - 2.6, fp)
        frame = periodic_band(u, 3.2, 0.9, 2.5, fp) * periodic_band(z, 3.0, 0.8, 2.4, fp) * soft_step(z - 2.6, fp)
        brick = periodic_band(z, 0.25, 0.0, 0.02, fp) * 0.25
        out = col * (1.0 + 0.45 * n - brick)[:, None]
        out = mix(out, np.array([0.9, 0.88, 0.85], np.float32), np.clip(frame - win, 0, 1))
        glass = np.array([0.16, 0.2, 0.26], np.float32) * (1.0 + 0.5 * n)[:, None]
        out = mix(out, glass, win)
        return np.where(top[:, None], np.array([0.25, 0.24, 0.24], np.float32) * (1.0 + 0.3 * n)[:, None], out)
    if material == S.M_WALL:
        u = np.where(np.abs(normal_local[:, 0]) > 0.5, q[:, 1], q[:, 0])
        panels = periodic_band(u, 2.0, 0.0, 0.04, fp)
        return col * (1.0 + 0.45 * n - 0.35 * panels)[:, None]
    if material == S.M_FENCE:
        u = np.where(np.abs(normal_local[:, 0]) > 0.5, q[:, 1], q[:, 0])
        slats = periodic_band(u, 0.16, 0.0, 0.04, fp)
        return col * (1.0 + 0.4 * n - 0.5 * slats)[:, None]
    if material == S.M_SIGN:
        face = np.abs(normal_local[:, 0]) > 0.5
        r = np.hypot(q[:, 1], q[:, 2])
        ring = band(r, 0.18, 0.3, fp)
        front = mix(np.array([0.92, 0.92, 0.9], np.float32) * np.ones((len(q), 1), np.float32), col, ring)
        back = np.array([0.5, 0.5, 0.52], np.float32) * (1.0 + 0.2 * n)[:, None]
        return np.where(face[:, None], front, back)
    if material == S.M_LIGHT:
        lamps = np.zeros(len(q), np.float32)
        lamp_cols = np.zeros((len(q), 3), np.float32)
        for zc, lc in ((0.28, (0.9, 0.1, 0.1)), (0.0, (0.9, 0.7, 0.1)), (-0.28, (0.1, 0.8, 0.2))):
            disk = band(np.hypot(q[:, 1], q[:, 2] - zc), -1.0, 0.1, fp) * (np.abs(normal_local[:, 0]) > 0.5)
            lamp_cols += disk[:, None] * np.array(lc, np.float32)
            lamps += disk
        return mix(col * (1.0 + 0.2 * n)[:, None], lamp_cols / np.maximum(lamps, 1e-6)[:, None], np.clip(lamps, 0, 1))
    if material == S.M_BARK:
        stripes = periodic_band(q[:, 2] + 0.3 * n, 0.12, 0.0, 0.04, fp)
        return col * (1.0 + 0.3 * n - 0.3 * stripes)[:, None]
    if material == S.M_LEAVES:
        n2 = fbm(q * 3.0, fp * 3.0, seed + 3, coarsest=2.0, finest=0.02)
        return col * np.clip(1.0 + 0.45 * n + 0.35 * n2, 0.2, 2.0)[:, None]
    if material == S.M_CARBODY:
        wheel = band(q[:, 2], -1.0, -0.2, fp) * (np.abs(normal_local[:, 1]) > 0.5) * \
            np.maximum(band(q[:, 0], 0.9, 1.6, fp), band(q[:, 0], -1.6, -0.9, fp))
        out = col * (1.0 + 0.2 * n)[:, None]
        lights = band(q[:, 2], 0.05, 0.22, fp) * (np.abs(normal_local[:, 0]) > 0.5) * band(np.abs(q[:, 1]), 0.55, 0.8, fp)
        out = mix(out, np.array([0.9, 0.85, 0.7], np.float32), lights)
        return mix(out, np.array([0.06, 0.06, 0.06], np.float32), wheel)
    if material == S.M_GLASS:
        roof = normal_local[:, 2] > 0.5
        pillar = band(np.abs(q[:, 0]), 1.0, 1.2, fp) * (np.abs(normal_local[:, 1]) > 0.5)
        glass = np.array([0.12, 0.14, 0.18], np.float32) * (1.0 + 0.3 * n)[:, None]
        glass = mix(glass, col, pillar)
        return np.where(roof[:, None], col * (1.0 + 0.08 * n)[:, None], glass)
    if material == S.M_CLOTH:
        return col * (1.0 + 0.5 * n)[:, None]
    if material == S.M_SKIN:
        hair = soft_step(q[:, 2] - 0.04, fp)
        return mix(col * (1.0 + 0.1 * n)[:, None], np.array([0.15, 0.1, 0.07], np.float32), hair)
    return col * (1.0 + 0.4 * n)[:, None]  # M_METAL and anything plain


def sky_color(d: np.ndarray, pixel_angle: float) -> np.ndarray:
    """Sky radiance (N,3) as a function of world direction only: gradient plus clouds at infinity."""
    dn = d / np.linalg.norm(d, axis=-1, keepdims=True)
    up = np.clip(dn[:, 2], 0.02, 1.0)
    q = np.stack([dn[:, 0] / up, dn[:, 1] / up, np.zeros(len(dn))], -1) * 40.0
    fp = np.full(len(dn), 40.0 * pixel_angle) / (up * up)
    clouds = np.clip(fbm(q, fp, 4242, coarsest=40.0, finest=0.3) * 1.3 + 0.1, 0.0, 1.0)
    base = mix(np.array([0.78, 0.84, 0.9], np.float32), np.array([0.35, 0.55, 0.85], np.float32),
               np.clip(dn[:, 2] * 2.5, 0, 1).astype(np.float32))
    return mix(base, np.array([0.95, 0.95, 0.96], np.float32), clouds * np.clip(dn[:, 2] * 8.0, 0, 1))


def render_view(grid, prims: S.Primitives, road: S.RoadPath, pixel_angle: float, shade: bool = True):
    """Cast and shade one view. `pixel_angle` is radians per pixel (texture band-limiting)."""
    t, prim, face = cast(grid, prims)
    rows, cols = t.shape
    d = grid.dirs.reshape(-1, 3)
    t_flat, prim_flat, face_flat = t.reshape(-1), prim.reshape(-1), face.reshape(-1)
    hit = prim_flat != NOTHING
    semantic = np.full(rows * cols, S.SKY, np.uint8)
    moving = np.zeros(rows * cols, bool)
    reflectance = np.zeros(rows * cols, np.float32)
    rgb = np.zeros((rows * cols, 3), np.float32)

    idx = np.nonzero(hit)[0]
    p = grid.origin + t_flat[idx, None] * d[idx]
    dn = d[idx] / np.linalg.norm(d[idx], axis=-1, keepdims=True)
    dist = np.linalg.norm(p - grid.origin, axis=-1)
    normals = np.zeros((len(idx), 3))
    albedo = np.zeros((len(idx), 3), np.float32)

    g = prim_flat[idx] == GROUND
    normals[g] = (0.0, 0.0, 1.0)
    fp_g = dist[g] * pixel_angle / np.maximum(np.abs(dn[g, 2]), 0.05)
    if g.any():
        albedo[g], semantic[idx[g]] = _ground_albedo(p[g], fp_g, road) if shade else (0.3, S.ROAD)
    # Objects: local frames per pixel (spheres have yaw 0, so theirs is p - centre), then one
    # texture call per material over all its pixels.
    obj = np.nonzero(~g)[0]
    if len(obj):
        pid = prim_flat[idx[obj]]
        po = p[obj]
        yaw = prims.yaw[pid]
        q = _local_coords(po, prims.center[pid], yaw)
        box = prims.kind[pid] == 0
        nl = q / np.linalg.norm(q, axis=-1, keepdims=True)
        axis = np.clip(face_flat[idx[obj]].astype(np.int64), 0, 2)
        rows_b = np.nonzero(box)[0]
        nl[rows_b] = 0.0
        nl[rows_b, axis[rows_b]] = np.sign(q[rows_b, axis[rows_b]])
        c, s = np.cos(yaw), np.sin(yaw)
        nw = np.stack([c * nl[:, 0] - s * nl[:, 1], s * nl[:, 0] + c * nl[:, 1], nl[:, 2]], -1)
        normals[obj] = nw
        cosang = np.maximum(np.abs(np.einsum("ij,ij->i", nw, dn[obj])), 0.1)
        fp = dist[obj] * pixel_angle / cosang
        material = prims.material[pid]
        if shade:
            for m in np.unique(material):
                sel = np.nonzero(material == m)[0]
                albedo[obj[sel]] = _object_albedo(int(m), q[sel], po[sel], nl[sel], fp[sel],
                                                  prims.color[pid[sel]], prims.seed[pid[sel]])
        else:
            albedo[obj] = prims.color[pid]
        semantic[idx[obj]] = prims.cls[pid]
        moving[idx[obj]] = prims.moving[pid]

    albedo = np.clip(albedo, 0.0, 1.0)
    lambert = 0.45 + 0.55 * np.clip(normals @ SUN, 0.0, 1.0)
    rgb[idx] = albedo * lambert[:, None].astype(np.float32)
    reflectance[idx] = np.clip(albedo.mean(-1) * 1.2, 0.0, 1.0)
    if shade:
        sky = ~hit
        rgb[sky] = sky_color(d[sky], pixel_angle)
    return {
        "rgb": np.round(np.clip(rgb, 0, 1) * 255.0).astype(np.uint8).reshape(rows, cols, 3),
        "t": t,
        "semantic": semantic.reshape(rows, cols),
        "moving": moving.reshape(rows, cols),
        "reflectance": reflectance.reshape(rows, cols),
        "prim": prim,
    }
