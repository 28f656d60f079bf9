"""`xdistill export-gt`: velodyne (or depth-benchmark) ground truth for every line of a test split."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--raw", required=True, help="KITTI raw root (DATE/DATE_drive_XXXX_sync/...)")
    parser.add_argument("--split-file", required=True,
                        help="split list (FOLDER FRAME SIDE per line), e.g. the shipped eigen/test_files.txt")
    parser.add_argument("--split", choices=("eigen", "eigen_benchmark"), default="eigen",
                        help="eigen: project velodyne (vel_depth=True); eigen_benchmark: proj_depth PNGs / 256")
    parser.add_argument("--out", required=True, help="output .npz (keys depth_00000..., files; no pickle)")


def run(args) -> int:
    from data_pipelines.kitti.export_gt import export_gt_depths

    try:
        n = export_gt_depths(args.raw, args.split_file, args.out, split=args.split)
    except (ValueError, OSError) as e:  # a missing split file or raw tree, a bad line: named, exit 2
        print(f"xdistill export-gt: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} ground-truth depth maps to {args.out}")
    return 0
