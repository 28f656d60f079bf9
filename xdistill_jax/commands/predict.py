"""`xdistill predict --workdir W --out DIR INPUTS...`: depth maps and colour-mapped PNGs for images.

INPUTS are image files and folders (searched recursively; a video: extract its frames into a
folder first, e.g. `ffmpeg -i clip.mp4 frames/%06d.png`). Writes `DIR/NAME_depth.npy` (float32
depth at the image's size: metres = SCALE / disparity with --scale, else relative depth) and
`DIR/NAME_disp.png` (magma). See `xdistill_jax.predict` for the details.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir (config.json + checkpoints/)")
    src.add_argument("--monodepth2", metavar="MODEL_DIR", help="a released Monodepth2 folder, via the converter")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--scale", type=float, default=None,
                        help="metres per unit of 1/disparity (5.4 for stereo-trained models); "
                             "without it the .npy holds relative depth")
    parser.add_argument("--batch-size", type=int, default=8, help="images per jitted batch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")


def run(args) -> int:
    from xdistill_jax import inference, predict
    from xdistill_jax.checkpoints import CheckpointError

    try:
        if args.workdir:
            model = inference.load_workdir_model(args.workdir, args.step)
        else:
            model = inference.load_monodepth2_model(args.monodepth2)
        written = predict.predict_paths(model, args.inputs, args.out, scale=args.scale,
                                        batch_size=args.batch_size, show_progress=not args.no_progress)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"xdistill predict: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # --monodepth2 reads .pth files: torch is an optional extra
        print(f"xdistill predict: reading Monodepth2's .pth files needs PyTorch ({e}); pip install "
              "torch (CPU is enough)", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} depth maps (+ _disp.png) to {args.out}")
    return 0
