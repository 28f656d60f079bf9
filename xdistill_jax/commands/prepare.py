"""`xdistill prepare`: a KITTI raw directory + a split file -> TFDS array_record triplets.

    xdistill prepare --raw kitti_raw --split-file splits/eigen_zhou/train_files.txt \\
        --out data/tfds --split train --height 192 --width 640 --format png --workers 2

Writes OUT/kitti_triplets/<split>/1.0.0/. Re-running with the same arguments leaves a
complete dataset alone. The fastest store to load: `--format raw --target-scales
--compression none` (largest on disk; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--raw", required=True,
                        help="KITTI raw root (dates at the top); for an odometry split (odom/, lines 'SEQ FRAME SIDE') the KITTI odometry root (sequences/ at the top)")
    parser.add_argument("--split-file", required=True, help="Monodepth2-format split file")
    parser.add_argument("--out", required=True, help="TFDS data directory to write into")
    parser.add_argument("--split", required=True, help="split name to store, e.g. train, val")
    parser.add_argument("--height", type=int, default=192, help="stored image height (px)")
    parser.add_argument("--width", type=int, default=640, help="stored image width (px)")
    parser.add_argument("--format", choices=("png", "jpeg", "raw"), default="png",
                        help="image encoding: png (lossless), jpeg (smallest), raw (uint8 pixels, "
                             "lossless, no decode: the fastest to load, ~1.6x png on disk)")
    parser.add_argument("--jpeg-quality", type=int, default=92, help="JPEG quality (1-100)")
    parser.add_argument(
        "--intrinsics",
        choices=("monodepth2", "calib"),
        default="monodepth2",
        help="monodepth2: its fixed normalised KITTI K; calib: per drive from calib_cam_to_cam.txt "
             "(P_rect's 1-based principal point made 0-based; mirrored on flipped examples)",
    )
    parser.add_argument("--target-scales", action="store_true",
                        help="also store the target frame's 1/2, 1/4, 1/8 LANCZOS images (raw, "
                             "from the lossless frame): the loader reads instead of computing them")
    parser.add_argument("--compression", choices=("zstd", "none"), default="zstd",
                        help="the shards' array_record compression: zstd (level 3, TFDS's) or none "
                             "(faster to read, larger; with --format raw ~2x faster shard reads)")
    parser.add_argument("--workers", type=int, default=1, help="image encoding processes")
    parser.add_argument("--shards", type=int, default=None, help="array_record files (default: by size)")


def run(args) -> int:
    from data_pipelines.kitti.prepare import prepare_split
    from xdistill_jax import log_setup

    log_setup.configure(logging.INFO, "%(message)s")
    try:
        path = prepare_split(
            args.raw,
            args.split_file,
            args.out,
            args.split,
            args.height,
            args.width,
            image_format=args.format,
            jpeg_quality=args.jpeg_quality,
            intrinsics=args.intrinsics,
            num_workers=args.workers,
            num_shards=args.shards,
            target_scales=args.target_scales,
            compression=args.compression,
        )
    except ValueError as e:
        print(f"xdistill prepare: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0
