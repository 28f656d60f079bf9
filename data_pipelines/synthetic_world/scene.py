"""Scene layout of one synthetic drive: a road that goes straight and turns, what lines it, what moves.

World frame: metres, x east, y north, z up, ground plane z = 0 (the oxts/ENU convention).
The road is a polyline centreline sampled every 0.2 m (straights and circular arcs). Everything
is placed in road coordinates (arc length s, signed lateral offset, positive = left of travel):

    road |off| < 5.5 (lanes centred at +-1.75, parking strip 3.5..5.5), sidewalk 5.5..8.5,
    lots from 9 m out: building facades, walls, fences, parks; terrain where nothing stands.

Primitives are oriented boxes (yaw about z) and spheres. Movers (cars in both lanes, walking
people) are functions of time; `primitives_at(t)` returns every primitive at time t (seconds).
Units: metres, radians, seconds. Cityscapes trainIds for classes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# Cityscapes trainIds.
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN = 0, 1, 2, 3, 4, 5, 6, 7
VEGETATION, TERRAIN, SKY, PERSON, CAR = 8, 9, 10, 11, 13
IGNORE = 255

# Materials (how a surface is textured; see render.py).
M_FACADE, M_WALL, M_FENCE, M_METAL, M_SIGN, M_LIGHT, M_BARK, M_LEAVES = range(8)
M_CARBODY, M_GLASS, M_CLOTH, M_SKIN = range(8, 12)

ROAD_HALF_WIDTH = 5.5
SIDEWALK_OUTER = 8.5
LANE_OFFSET = 1.75
CAMERA_START_S = 30.0


@dataclasses.dataclass
class RoadPath:
    """Centreline samples: s (M,) arc length, xy (M,2), heading (M,) radians (0 = east, CCW)."""

    s: np.ndarray
    xy: np.ndarray
    heading: np.ndarray

    def at(self, s):
        """(xy (...,2), heading (...)) at arc length s (linear interpolation, clamped)."""
        s = np.asarray(s, np.float64)
        x = np.interp(s, self.s, self.xy[:, 0])
        y = np.interp(s, self.s, self.xy[:, 1])
        h = np.interp(s, self.s, np.unwrap(self.heading))
        return np.stack([x, y], -1), h

    def place(self, s, offset):
        """World xy of road coordinates (s, offset) and the road heading there."""
        xy, h = self.at(s)
        normal = np.stack([-np.sin(h), np.cos(h)], -1)  # left of travel
        return xy + np.asarray(offset)[..., None] * normal, h

    def road_coords(self, xy: np.ndarray):
        """(s, offset) of world points xy (N,2), offset +inf where farther than ~60 m from the road.

        A 1 m raster holds the nearest centreline sample of each cell (built once); two
        refinement steps on the interpolated centreline make the result continuous and exact to
        well under a millimetre near the road.
        """
        if not hasattr(self, "_raster"):
            self._build_raster()
        origin, cell, raster = self._raster
        ij = np.floor((xy - origin) / cell).astype(np.int64)
        inside = (ij[:, 0] >= 0) & (ij[:, 1] >= 0) & (ij[:, 0] < raster.shape[0]) & (ij[:, 1] < raster.shape[1])
        ij = np.where(inside[:, None], ij, 0)
        idx = raster[ij[:, 0], ij[:, 1]]
        s = self.s[idx] + _along(xy - self.xy[idx], self.heading[idx])
        for _ in range(2):
            centre, h = self.at(s)
            d = xy - centre
            s = s + _along(d, h)
        centre, h = self.at(s)
        d = xy - centre
        offset = -d[:, 0] * np.sin(h) + d[:, 1] * np.cos(h)
        return s, np.where(inside, offset, np.inf)

    def _build_raster(self, margin: float = 60.0, cell: float = 1.0):
        from scipy.spatial import cKDTree  # lazily: scipy only where the world is rendered

        origin = self.xy.min(0) - margin
        shape = np.ceil((self.xy.max(0) + margin - origin) / cell).astype(int)
        gx, gy = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
        centres = origin + (np.stack([gx, gy], -1).reshape(-1, 2) + 0.5) * cell
        _, idx = cKDTree(self.xy).query(centres)
        self._raster = (origin, cell, idx.reshape(shape))


def _along(d, heading):
    return d[:, 0] * np.cos(heading) + d[:, 1] * np.sin(heading)


def make_road(rng: np.random.Generator, length: float) -> RoadPath:
    """Straights and arcs (radius 25..45 m, 35..90 degrees, either way) until `length` metres.

    The first turn starts 8..30 m after the camera's start, so every drive turns early.
    """
    ds = 0.2
    pieces = [("straight", CAMERA_START_S + rng.uniform(8.0, 30.0))]
    total = pieces[0][1]
    while total < length:
        angle = math.radians(rng.uniform(35.0, 90.0)) * rng.choice([-1.0, 1.0])
        radius = rng.uniform(25.0, 45.0)
        pieces.append(("arc", radius, angle))
        total += radius * abs(angle)
        straight = rng.uniform(25.0, 70.0)
        pieces.append(("straight", straight))
        total += straight
    curvature = []
    for piece in pieces:
        if piece[0] == "straight":
            curvature.append(np.zeros(int(round(piece[1] / ds))))
        else:
            _, radius, angle = piece
            curvature.append(np.full(int(round(radius * abs(angle) / ds)), math.copysign(1.0 / radius, angle)))
    k = np.concatenate(curvature)
    heading0 = rng.uniform(-math.pi, math.pi)
    heading = heading0 + np.concatenate([[0.0], np.cumsum(k * ds)])
    mid = 0.5 * (heading[1:] + heading[:-1])
    steps = np.stack([np.cos(mid), np.sin(mid)], -1) * ds
    xy = np.concatenate([[[0.0, 0.0]], np.cumsum(steps, 0)])
    s = np.arange(len(xy)) * ds
    # Put the world origin at the camera's start so coordinates stay small.
    start = np.array([np.interp(CAMERA_START_S, s, xy[:, 0]), np.interp(CAMERA_START_S, s, xy[:, 1])])
    return RoadPath(s=s, xy=xy - start, heading=heading)


@dataclasses.dataclass
class Primitives:
    """Boxes (kind 0) and spheres (kind 1), one row each, all arrays of length N.

    center (N,3); size (N,3) = box half extents in its local frame (x along yaw, y left, z up),
    sphere radius in size[:,0]; yaw (N,); material, cls (trainId), seed (N,) int; color (N,3)
    base albedo in [0,1]; moving (N,) bool.
    """

    kind: np.ndarray
    center: np.ndarray
    size: np.ndarray
    yaw: np.ndarray
    material: np.ndarray
    cls: np.ndarray
    color: np.ndarray
    seed: np.ndarray
    moving: np.ndarray

    def __len__(self):
        return len(self.kind)


class _Builder:
    """Accumulates primitive rows."""

    def __init__(self):
        self.rows = []

    def box(self, center, half, yaw, material, cls, color, seed, moving=False):
        self.rows.append((0, center, half, yaw, material, cls, color, seed, moving))

    def sphere(self, center, radius, material, cls, color, seed, moving=False):
        self.rows.append((1, center, (radius, radius, radius), 0.0, material, cls, color, seed, moving))

    def build(self) -> Primitives:
        if not self.rows:
            z = np.zeros((0, 3))
            return Primitives(np.zeros(0, int), z, z, np.zeros(0), np.zeros(0, int), np.zeros(0, int),
                              z, np.zeros(0, int), np.zeros(0, bool))
        cols = list(zip(*self.rows))
        return Primitives(
            kind=np.array(cols[0], np.int32), center=np.array(cols[1], np.float64),
            size=np.array(cols[2], np.float64), yaw=np.array(cols[3], np.float64),
            material=np.array(cols[4], np.int32), cls=np.array(cols[5], np.int32),
            color=np.array(cols[6], np.float32), seed=np.array(cols[7], np.int64),
            moving=np.array(cols[8], bool))


def _car(b: _Builder, xy, yaw, color, seed, moving, rng_len=4.2):
    """A car: body box and a glass cabin box (metres)."""
    c, s = math.cos(yaw), math.sin(yaw)
    b.box((xy[0], xy[1], 0.72), (rng_len / 2, 0.9, 0.42), yaw, M_CARBODY, CAR, color, seed, moving)
    back = -0.25
    b.box((xy[0] + back * c, xy[1] + back * s, 1.42), (1.15, 0.78, 0.3), yaw, M_GLASS, CAR, color, seed + 1, moving)


def _person(b: _Builder, xy, yaw, shirt, pants, seed, moving):
    b.box((xy[0], xy[1], 0.44), (0.14, 0.2, 0.44), yaw, M_CLOTH, PERSON, pants, seed, moving)
    b.box((xy[0], xy[1], 1.18), (0.15, 0.24, 0.3), yaw, M_CLOTH, PERSON, shirt, seed + 1, moving)
    b.sphere((xy[0], xy[1], 1.62), 0.13, M_SKIN, PERSON, (0.78, 0.6, 0.48), seed + 2, moving)


@dataclasses.dataclass
class Mover:
    """Something that moves along the road: s(t) = s0 + v t at lateral `offset`."""

    kind: str  # "car" | "person"
    s0: float
    speed: float
    offset: float
    color: tuple
    color2: tuple
    seed: int


class DriveScene:
    """The static layout and movers of one drive, plus the camera trajectory along the road."""

    def __init__(self, rng: np.random.Generator, num_frames: int, fps: float = 10.0):
        self.fps = fps
        self.num_frames = num_frames
        self.mean_speed = rng.uniform(7.0, 10.0)
        self.speed_wobble = (rng.uniform(0.0, 1.5), rng.uniform(0.2, 0.6), rng.uniform(0, 2 * math.pi))
        drive_length = self.camera_s(num_frames / fps) - CAMERA_START_S
        self.road = make_road(rng, CAMERA_START_S + drive_length + 160.0)
        self.length = float(self.road.s[-1])
        self.static = self._layout(rng)
        self.movers = self._movers(rng)

    # --- camera trajectory -------------------------------------------------------------
    def camera_s(self, t):
        """Arc length of the camera at time t: mean speed plus a slow speed wobble."""
        amp, freq, phase = self.speed_wobble
        t = np.asarray(t, np.float64)
        return CAMERA_START_S + self.mean_speed * t + amp / freq * (np.sin(freq * t + phase) - math.sin(phase)) * 0.5

    def vehicle_pose(self, t) -> np.ndarray:
        """4x4 vehicle (x forward, y left, z up, origin on the ground under the IMU) -> world."""
        xy, h = self.road.place(self.camera_s(t), -LANE_OFFSET)
        pose = np.eye(4)
        c, s = math.cos(float(h)), math.sin(float(h))
        pose[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
        pose[:2, 3] = xy
        return pose

    # --- static layout -------------------------------------------------------------------
    def _layout(self, rng) -> Primitives:
        b = _Builder()
        seed = [1000]

        def next_seed():
            seed[0] += 7
            return seed[0]

        road = self.road
        for side in (-1.0, 1.0):
            s = rng.uniform(0.0, 6.0)
            while s < self.length - 5.0:
                kind = rng.choice(["building", "building", "building", "building", "wall", "fence", "park"])
                lot = rng.uniform(8.0, 22.0) if kind == "building" else rng.uniform(6.0, 16.0)
                sc = s + lot / 2
                if kind == "building":
                    front = rng.uniform(9.0, 11.5)
                    depth = rng.uniform(8.0, 14.0)
                    height = rng.uniform(6.0, 18.0)
                    xy, h = road.place(sc, side * (front + depth / 2))
                    color = rng.uniform([0.45, 0.38, 0.3], [0.85, 0.8, 0.72])
                    b.box((xy[0], xy[1], height / 2), (lot / 2, depth / 2, height / 2), float(h),
                          M_FACADE, BUILDING, color, next_seed())
                elif kind in ("wall", "fence"):
                    height = rng.uniform(1.2, 2.4)
                    thick = 0.3 if kind == "wall" else 0.06
                    xy, h = road.place(sc, side * 9.2)
                    color = rng.uniform([0.55, 0.5, 0.45], [0.8, 0.78, 0.72]) if kind == "wall" else \
                        rng.uniform([0.35, 0.22, 0.12], [0.55, 0.4, 0.25])
                    b.box((xy[0], xy[1], height / 2), (lot / 2, thick / 2, height / 2), float(h),
                          M_WALL if kind == "wall" else M_FENCE, WALL if kind == "wall" else FENCE,
                          color, next_seed())
                else:  # park: trees on terrain
                    for _ in range(rng.integers(2, 5)):
                        self._tree(b, rng, s + rng.uniform(0, lot), side * rng.uniform(10.0, 16.0), next_seed())
                s += lot + rng.uniform(0.0, 3.0)
            # Street furniture on the sidewalk edge and parked cars in the parking strip.
            s = rng.uniform(2.0, 12.0)
            while s < self.length - 2.0:
                choice = rng.random()
                if choice < 0.45:
                    self._pole(b, rng, s, side * 6.0, next_seed)
                else:
                    self._tree(b, rng, s, side * 7.2, next_seed())
                s += rng.uniform(9.0, 22.0)
            s = rng.uniform(0.0, 10.0)
            while s < self.length - 3.0:
                if rng.random() < 0.6:
                    xy, h = road.place(s, side * 4.4)
                    yaw = float(h) + (0.0 if side < 0 else math.pi)
                    _car(b, xy, yaw, tuple(rng.uniform(0.1, 0.9, 3)), next_seed(), False)
                s += rng.uniform(5.5, 9.0)
        return b.build()

    def _pole(self, b, rng, s, offset, next_seed):
        xy, h = self.road.place(s, offset)
        height = rng.uniform(3.5, 7.0)
        b.box((xy[0], xy[1], height / 2), (0.08, 0.08, height / 2), float(h), M_METAL, POLE,
              (0.5, 0.52, 0.55), next_seed())
        top = rng.random()
        if top < 0.5:  # a sign plate facing the traffic (thin along the road direction)
            b.box((xy[0], xy[1], height - 0.4), (0.03, 0.35, 0.35), float(h), M_SIGN, TRAFFIC_SIGN,
                  rng.choice([(0.8, 0.1, 0.1), (0.1, 0.25, 0.75), (0.95, 0.8, 0.1)]), next_seed())
        elif top < 0.75:
            b.box((xy[0], xy[1], height - 0.5), (0.15, 0.15, 0.45), float(h), M_LIGHT, TRAFFIC_LIGHT,
                  (0.12, 0.12, 0.12), next_seed())

    def _tree(self, b, rng, s, offset, seed):
        xy, _ = self.road.place(s, offset)
        trunk = rng.uniform(2.2, 3.8)
        b.box((xy[0], xy[1], trunk / 2), (0.15, 0.15, trunk / 2), rng.uniform(0, math.pi), M_BARK,
              VEGETATION, (0.35, 0.25, 0.17), seed)
        radius = rng.uniform(1.4, 2.8)
        b.sphere((xy[0], xy[1], trunk + radius * 0.7), radius, M_LEAVES, VEGETATION,
                 rng.uniform([0.15, 0.35, 0.08], [0.35, 0.55, 0.2]), seed + 1)

    # --- movers --------------------------------------------------------------------------
    def _movers(self, rng) -> list[Mover]:
        movers = []
        duration = self.num_frames / self.fps
        seed = 900000
        # Leading cars in the camera's lane drive faster than the camera ever does.
        for _ in range(rng.integers(1, 3)):
            movers.append(Mover("car", CAMERA_START_S + rng.uniform(14.0, 40.0),
                                self.mean_speed + self.speed_wobble[0] + rng.uniform(1.0, 4.0),
                                -LANE_OFFSET, tuple(rng.uniform(0.1, 0.9, 3)), (0, 0, 0), seed))
            seed += 11
        # Oncoming cars, spread so some meet the camera during the drive.
        end = float(self.camera_s(duration))
        for _ in range(rng.integers(2, 5)):
            speed = rng.uniform(6.0, 12.0)
            meet = rng.uniform(CAMERA_START_S + 10.0, end + 60.0)
            movers.append(Mover("car", meet + speed * rng.uniform(0.0, duration), -speed, LANE_OFFSET,
                                tuple(rng.uniform(0.1, 0.9, 3)), (0, 0, 0), seed))
            seed += 11
        # Pedestrians walking on both sidewalks, either way.
        for _ in range(rng.integers(4, 9)):
            side = rng.choice([-1.0, 1.0])
            movers.append(Mover("person", rng.uniform(CAMERA_START_S, end + 40.0),
                                rng.uniform(0.9, 1.7) * rng.choice([-1.0, 1.0]), side * rng.uniform(6.6, 8.0),
                                tuple(rng.uniform(0.1, 0.9, 3)), tuple(rng.uniform(0.05, 0.5, 3)), seed))
            seed += 11
        return movers

    def primitives_at(self, t: float) -> Primitives:
        """Static primitives plus every mover at time t (seconds), movers flagged `moving`."""
        b = _Builder()
        for m in self.movers:
            s = m.s0 + m.speed * t
            if not 0.0 < s < self.length:
                continue
            xy, h = self.road.place(s, m.offset)
            yaw = float(h) + (0.0 if m.speed > 0 else math.pi)
            if m.kind == "car":
                _car(b, xy, yaw, m.color, m.seed, True)
            else:
                _person(b, xy, yaw, m.color, m.color2, m.seed, True)
        moving = b.build()
        return concat(self.static, moving)


def concat(a: Primitives, b: Primitives) -> Primitives:
    return Primitives(*[np.concatenate([getattr(a, f.name), getattr(b, f.name)])
                        for f in dataclasses.fields(Primitives)])
