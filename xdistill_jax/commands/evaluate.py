"""`xdistill eval`: evaluate a checkpoint (or released Monodepth2 weights) on KITTI, Make3D or poses.

    xdistill eval --workdir runs/xd --split eigen --data KITTI_RAW --gt gt_eigen.npz [--step N]
    xdistill eval --workdir runs/xd --split eigen_benchmark --data KITTI_RAW --gt gt_benchmark.npz
    xdistill eval --workdir runs/xd --split make3d --data MAKE3D_DIR
    xdistill eval --workdir runs/xd --split odom_09 --data KITTI_ODOMETRY
    xdistill eval --workdir runs/xd --pose --data WORLD --split-file WORLD/splits/test_files.txt
    xdistill eval --monodepth2 mono_640x192 --split eigen --data KITTI_RAW --gt gt_eigen.npz --out results/

The model is rebuilt from W/config.json and W/checkpoints/<step> alone. Results go to
`W/eval/<name>.json` (metrics, num_images, settings) and `<name>.csv` (per image), name =
`<split>-step<N>` (`<split>-<split-file stem>-step<N>` with --split-file; `-monodepth2` instead of
`-step<N>` for converted weights), then `-stereo`, `-pp` (--post-process) and `-nocrop` (--crop none)
for those settings, so that evaluations of one checkpoint under other settings do not replace
each other. Exit status 2 on bad input, with the reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

SPLITS = ("eigen", "eigen_benchmark", "make3d", "odom_09", "odom_10")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir (config.json + checkpoints/)")
    src.add_argument("--monodepth2", metavar="MODEL_DIR",
                     help="a released Monodepth2 folder (encoder.pth, depth.pth[, pose*.pth]; needs torch) or "
                          "one `xdistill convert-weights --monodepth2` wrote (no torch)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--split", choices=SPLITS, default="eigen",
                        help="eigen (Garg crop, 80 m cap), eigen_benchmark (gt > 0), make3d, odom_09/odom_10 (pose)")
    parser.add_argument("--data", required=True,
                        help="KITTI raw root (eigen*, --pose), Make3D folder (Test134/, Gridlaserdata/) or "
                             "KITTI odometry root (sequences/, poses/)")
    parser.add_argument("--gt", help="ground truth from `xdistill export-gt` for the split (KITTI depth)")
    parser.add_argument("--split-file", help="a custom split list instead of the shipped one "
                                             "(e.g. a synthetic world's splits/test_files.txt)")
    parser.add_argument("--pose", action="store_true",
                        help="pose ATE on consecutive raw-layout frames of --split-file (GT from oxts)")
    parser.add_argument("--stereo", action="store_true", help="stereo model: x5.4, no median scaling")
    parser.add_argument("--post-process", action="store_true", help="average with the flipped image's prediction")
    parser.add_argument("--batch-size", type=int, default=16, help="images per jitted batch")
    parser.add_argument("--crop", choices=("garg", "none"), default="garg",
                        help="eigen only: the Garg crop (default) or none (e.g. a synthetic validation split)")
    parser.add_argument("--out", help="results folder (default: WORKDIR/eval; required with --monodepth2)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read Monodepth2's own pickled gt_depths.npz (only for files you trust)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _print_depth(result, keys, stereo: bool) -> None:
    from xdistill_jax.eval_depth import format_table

    s = result.summary
    if stereo:
        print("Stereo evaluation: predictions x 5.4, no median scaling")
    elif "ratio_median" in s:
        print("Mono evaluation: per-image median scaling")
        print(f"Scaling ratios | med: {s['ratio_median']:.3f} | std: {s['ratio_std']:.3f}")
    print(format_table(s, keys))
    print(f"({s['num_images']} images)")


def run(args) -> int:
    from xdistill_jax import eval_depth, eval_pose, inference
    from xdistill_jax.checkpoints import CheckpointError

    from xdistill_jax.output_dirs import check_output_dir

    show = not args.no_progress
    try:
        if args.workdir:
            out_dir = pathlib.Path(args.out or pathlib.Path(args.workdir) / "eval")
            # before the model loads and every image is scored: the results must have a place
            check_output_dir(out_dir, "--out" if args.out else "results folder (no --out)")
            model = inference.load_workdir_model(args.workdir, args.step)
            suffix = f"step{model.step}"
        else:
            if not args.out:
                raise ValueError("--out is required with --monodepth2 (results are not written into the model folder)")
            if args.step is not None:
                raise ValueError("--step applies to --workdir checkpoints, not to --monodepth2 weights")
            check_output_dir(args.out, "--out")
            model = inference.load_monodepth2_model(args.monodepth2)
            out_dir, suffix = pathlib.Path(args.out), "monodepth2"
        tag = args.split
        if args.split_file:
            tag = f"{'pose' if args.pose else args.split}-{pathlib.Path(args.split_file).stem}"
        pose = args.pose or args.split.startswith("odom")
        warning = None if pose or args.split == "make3d" else inference.protocol_warning(model, args.stereo)
        if warning:
            print(warning, file=sys.stderr)
        # a depth eval's settings other than the defaults name their own file: a second eval of
        # the same checkpoint with --stereo or --post-process replaced the first one's results
        variant = "" if pose else "".join(part for on, part in (
            (args.stereo, "-stereo"), (args.post_process, "-pp"),
            (args.crop == "none" and args.split == "eigen", "-nocrop")) if on)
        name = f"{tag}-{suffix}{variant}"
        settings = {"split": args.split, "split_file": args.split_file, "data": args.data, "gt": args.gt,
                    "stereo": args.stereo, "post_process": args.post_process, "source": model.source,
                    "step": model.step, "height": model.height, "width": model.width}

        if pose:
            if args.pose:
                if not args.split_file:
                    raise ValueError("--pose needs --split-file (consecutive frames of one raw-layout drive)")
                seq = eval_pose.raw_sequence(args.data, args.split_file)
            else:
                seq = eval_pose.odometry_sequence(args.data, args.split, args.split_file)
            res = eval_pose.evaluate_pose(model, seq, batch_size=args.batch_size, show_progress=show)
            summary = {k: v for k, v in res.items() if k != "ates"}
            summary["settings"] = settings
            print(f"Trajectory error ({seq.name}, {res['num_snippets']} snippets of {eval_pose.TRACK_LENGTH} frames): "
                  f"{res['ate_mean']:.4f}, std {res['ate_std']:.4f}")
            path = out_dir / f"{name}.json"
            eval_depth._atomic_write(path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
            print(f"wrote {path}")
            return 0

        if args.split == "make3d":
            if args.stereo:
                raise ValueError("--stereo: the Make3D protocol always median-scales")
            result = eval_depth.evaluate_make3d(model, args.data, batch_size=args.batch_size,
                                                post_process=args.post_process, show_progress=show)
            # the definitions travel with the figures: `log10` meant the mean-abs one until 2026-12-07
            settings["protocol"] = ("make3d: 2:1 centre crop, GT rows 17:38, 0 < gt < 70 m, median scaling; "
                                    "log10 = RMS of log10 differences (Monodepth2's column), "
                                    "log10_abs = mean |log10 difference|")
        else:
            if not args.gt:
                raise ValueError(f"--gt is required for --split {args.split} (write it with `xdistill export-gt`)")
            split_file = args.split_file or eval_depth.shipped_split_file(args.split)
            crop = None if args.crop == "none" else "garg"
            result = eval_depth.evaluate_kitti(
                model, args.data, split_file, args.gt, protocol=args.split, stereo=args.stereo,
                post_process=args.post_process, batch_size=args.batch_size, crop=crop,
                allow_pickle=args.allow_pickle, show_progress=show)
            settings["crop"] = crop if args.split == "eigen" else None
        _print_depth(result, result.metric_keys, args.stereo)
        json_path, csv_path = eval_depth.write_result(out_dir, name, result, settings)
        print(f"wrote {json_path} and {csv_path}")
        return 0
    except (ValueError, OSError, CheckpointError) as e:  # OSError: the results folder changed since its check
        print(f"xdistill eval: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # --monodepth2 .pth files: torch is an optional extra
        if e.name != "torch":  # another missing module is no matter of .pth files: its own error
            raise
        from xdistill_jax.convert import torch_missing_message

        print(f"xdistill eval: {torch_missing_message(e)}", file=sys.stderr)
        return 2
