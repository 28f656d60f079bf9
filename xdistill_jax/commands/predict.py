"""`xdistill predict --workdir W --out DIR INPUTS...`: depth maps and colour-mapped PNGs for images.

INPUTS are image files and folders (searched recursively, following symlinked folders; a video:
extract its frames into a folder first, e.g. `ffmpeg -i clip.mp4 frames/%06d.png`). Writes
`DIR/NAME_depth.npy` (float32 depth at the image's size, EXIF orientation applied: metres = SCALE /
disparity with --scale, else relative depth) and `DIR/NAME_disp.png` (magma). A `NAME_disp.png`
with `NAME_depth.npy` beside it is an earlier output, never an input. Options, inputs and --out
are checked before the model loads; nothing is written before. See `xdistill_jax.predict`.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir (config.json + checkpoints/)")
    src.add_argument("--monodepth2", metavar="MODEL_DIR",
                     help="a released Monodepth2 folder (.pth files; needs torch) or one `xdistill convert-weights "
                          "--monodepth2` wrote (no torch)")
    parser.add_argument("--step", type=int, default=None,
                        help="checkpoint step of --workdir (default: the latest)")
    parser.add_argument("--out", required=True, help="output folder (may be an input folder)")
    parser.add_argument("--scale", type=float, default=None,
                        help="metres per unit of 1/disparity (5.4 for stereo-trained models); "
                             "without it the .npy holds relative depth")
    parser.add_argument("--batch-size", type=int, default=8, help="images per jitted batch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image files or folders of images (searched recursively, following symlinked "
                             "folders; hidden files and this tool's outputs, NAME_disp.png beside "
                             "NAME_depth.npy, left out); EXIF orientation is applied, as photo viewers do")


def run(args) -> int:
    from xdistill_jax import inference, predict
    from xdistill_jax.checkpoints import CheckpointError

    try:
        if args.monodepth2 and args.step is not None:  # as `xdistill eval`: not silently ignored
            raise ValueError("--step applies to --workdir checkpoints, not to --monodepth2 weights")
        # options, inputs, images and --out before the model loads (seconds), nothing written yet
        job = predict.prepare(args.inputs, args.out, scale=args.scale, batch_size=args.batch_size)
        if args.workdir:
            model = inference.load_workdir_model(args.workdir, args.step)
        else:
            model = inference.load_monodepth2_model(args.monodepth2)
        if model.use_stereo and args.scale is None:
            print(f"note: {model.source} was trained with stereo pairs (encoder.pth: use_stereo=True): "
                  "--scale 5.4 writes its depth in metres (Monodepth2's STEREO_SCALE_FACTOR)", file=sys.stderr)
        written = predict.predict_prepared(model, job, show_progress=not args.no_progress)
    except (ValueError, OSError, CheckpointError) as e:  # OSError: --out, a folder that cannot be read
        print(f"xdistill predict: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # --monodepth2 reads .pth files: torch is an optional extra
        if e.name != "torch":  # another missing module is no matter of .pth files: its own error
            raise
        from xdistill_jax.convert import torch_missing_message

        print(f"xdistill predict: {torch_missing_message(e)}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} depth maps (+ _disp.png) to {args.out}")
    if job.left_out:  # said, not silent: these were in the input folders
        print(f"left out {len(job.left_out)} earlier outputs of predict in the input folders "
              "(NAME_disp.png beside NAME_depth.npy)")
    return 0
