"""`xdistill synth`: generate the synthetic driving world (KITTI raw layout + Make3D test set)."""

from __future__ import annotations

import argparse
import json
import sys


def _size(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS, e.g. 568x426, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"rows and cols must be positive, got {text!r}")
    return rows, cols


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from data_pipelines.synthetic_world.generate import DEMO

    parser.add_argument("--out", required=True, help="output folder (empty or absent; with --overwrite, a world written before)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (output is a function of it)")
    parser.add_argument("--drives", type=int, default=DEMO["drives"], help="drives; the last is the test drive")
    parser.add_argument("--frames", type=int, default=DEMO["frames"], help="frames per drive (10 Hz)")
    parser.add_argument("--width", type=int, default=1242, help="image width (KITTI-native 1242)")
    parser.add_argument("--height", type=int, default=375, help="image height (KITTI-native 375)")
    parser.add_argument("--make3d-images", type=int, default=DEMO["make3d_images"],
                        help="Make3D-layout test images (the real Test134 has 134)")
    parser.add_argument("--make3d-size", type=_size, default=None,
                        help="Make3D image ROWSxCOLS (real: 2272x1704; default a quarter of that, "
                             "an eighth with --demo)")
    parser.add_argument("--lidar-azimuths", type=int, default=1024, help="lidar columns per 360 degrees")
    parser.add_argument("--velodyne", choices=("all", "test"), default=None,
                        help="scans for all drives (as KITTI; default) or only the held-out test drive "
                             "(the --demo default: scans are most of the bytes)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: min(work chunks, CPUs); the world is rendered in chunks "
                             "of 20 frames and 5 Make3D images)")
    parser.add_argument("--overwrite", action="store_true", help="replace a world `xdistill synth` wrote at --out (a folder without its world.json is refused)")
    parser.add_argument("--demo", action="store_true",
                        help="the demo world: 3 drives x 100 frames at 416x128, scans for the test drive only "
                             "(overrides --drives/--frames/--width/--height)")


def run(args) -> int:
    from data_pipelines.synthetic_world.generate import DEMO, MAKE3D_SIZE, generate_world

    width, height, drives, frames = args.width, args.height, args.drives, args.frames
    velodyne = args.velodyne or "all"
    make3d_size = args.make3d_size or MAKE3D_SIZE
    if args.demo:
        make3d_size = args.make3d_size or DEMO["make3d_size"]
        width, height, drives, frames = DEMO["width"], DEMO["height"], DEMO["drives"], DEMO["frames"]
        velodyne = args.velodyne or DEMO["velodyne"]
    try:
        summary = generate_world(
            args.out, seed=args.seed, drives=drives, frames=frames, width=width, height=height,
            make3d_images=args.make3d_images, make3d_size=make3d_size,
            lidar_azimuths=args.lidar_azimuths, velodyne=velodyne, workers=args.workers, overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # bad arguments, an existing --out: named, exit 2
        print(f"xdistill synth: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
