"""`xdistill convert-weights`: PyTorch weights -> Flax msgpack variables.

    xdistill convert-weights --torchvision resnet18.pth --num-layers 18 [--num-input-images 2] --out enc.msgpack
    xdistill convert-weights --monodepth2 models/mono_640x192 --out converted/mono_640x192

The Monodepth2 form writes ``depth.msgpack`` (DepthNet variables), ``pose.msgpack`` (PoseNet
variables, when the folder has a pose network) and, last, ``meta.json`` with num_layers, height,
width, has_pose, kernel_layout (HWIO) and use_stereo when encoder.pth has it. `xdistill eval` and
`xdistill predict` take the folder as ``--monodepth2 OUT`` without torch
(`xdistill_jax.convert.load_converted_monodepth2`; `load_variables` reads one file).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--torchvision", metavar="FILE", help="torchvision ResNet state dict (.pth)")
    src.add_argument("--monodepth2", metavar="DIR",
                     help="Monodepth2 model folder (encoder.pth, depth.pth[, pose_encoder.pth, pose.pth])")
    parser.add_argument("--num-layers", type=int, choices=(18, 34, 50),
                        help="ResNet depth (required with --torchvision; inferred for --monodepth2)")
    parser.add_argument("--num-input-images", type=int, default=1,
                        help="frames stacked on channels (2 for a pose encoder; ImageNet conv1 is tiled / n)")
    parser.add_argument("--out", required=True,
                        help="output .msgpack file (--torchvision) or directory (--monodepth2)")


def _below_a_file(path: Path) -> Path | None:
    """The file among `path`'s ancestors that keeps it from being made, if any."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # the nearest existing ancestor
        parent = parent.parent
    return parent if parent.exists() and not parent.is_dir() else None


def run(args) -> int:
    from xdistill_jax import convert
    from xdistill_jax.eval_depth import _atomic_write

    out = Path(args.out)
    if args.torchvision and out.is_dir():
        print(f"xdistill convert-weights: --out {out} is a folder; --torchvision writes one .msgpack file",
              file=sys.stderr)
        return 2
    if args.monodepth2 and out.exists() and not out.is_dir():
        print(f"xdistill convert-weights: --out {out} exists and is not a folder", file=sys.stderr)
        return 2
    blocker = _below_a_file(out)  # before the weights are read, not after (a traceback, exit 1)
    if blocker is not None:
        print(f"xdistill convert-weights: --out {out}: cannot be made: {blocker} is a file", file=sys.stderr)
        return 2
    try:
        if args.torchvision:
            if args.num_layers is None:
                print("xdistill convert-weights: --num-layers is required with --torchvision", file=sys.stderr)
                return 2
            variables = convert.load_torchvision_resnet(args.torchvision, args.num_layers, args.num_input_images)
            try:
                convert.save_variables(args.out, variables)
            except OSError as e:  # the disk full, a quota: nothing is left under the name
                print(f"xdistill convert-weights: writing {args.out} failed: {e.strerror or e}; "
                      "nothing was written", file=sys.stderr)
                return 2
            print(f"wrote {args.out} (ResNet-{args.num_layers} encoder, {args.num_input_images} input image(s))")
            return 0
        if args.num_input_images != 1:
            print("xdistill convert-weights: --num-input-images applies only to --torchvision", file=sys.stderr)
            return 2
        loaded = convert.load_monodepth2(args.monodepth2, num_layers=args.num_layers)
    except ImportError as e:  # torch is an optional extra
        print(f"xdistill convert-weights: reading .pth files needs PyTorch ({e}); "
              "pip install torch (CPU is enough)", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"xdistill convert-weights: {e}", file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # checked above, but permissions (or the file system since) may refuse it
        print(f"xdistill convert-weights: --out {out}: cannot make the folder: {e.strerror or e}", file=sys.stderr)
        return 2
    # an earlier conversion here is no longer complete while this one writes (meta.json marks a
    # complete folder), and a pose.msgpack it left must not outlive a model without a pose net
    (out / convert.CONVERTED_META).unlink(missing_ok=True)
    if loaded["pose"] is None:
        (out / "pose.msgpack").unlink(missing_ok=True)
    meta = {k: loaded[k] for k in ("num_layers", "height", "width")}
    meta["has_pose"] = loaded["pose"] is not None
    meta["kernel_layout"] = "HWIO"  # flax's; the networks read them with kernel_layout="HWIO"
    if "use_stereo" in loaded:
        meta["use_stereo"] = loaded["use_stereo"]
    writing = out / "depth.msgpack"
    try:
        convert.save_variables(writing, loaded["depth"])
        if loaded["pose"] is not None:
            writing = out / "pose.msgpack"
            convert.save_variables(writing, loaded["pose"])
        writing = out / convert.CONVERTED_META
        _atomic_write(writing, json.dumps(meta, indent=2) + "\n")  # last: its presence marks a complete folder
    except OSError as e:  # the disk full, a quota: the folder is left without meta.json, which
        # `--monodepth2 OUT` names as an incomplete conversion
        print(f"xdistill convert-weights: writing {writing} failed: {e.strerror or e}; {out} holds no "
              f"complete conversion (no {convert.CONVERTED_META}): convert again once there is room",
              file=sys.stderr)
        return 2
    print(f"wrote {out}/depth.msgpack" + (", pose.msgpack" if meta["has_pose"] else "") + f", meta.json {meta}")
    return 0
