"""`xdistill teacher`: train our segmentation teacher, or precompute a teacher's grouped logits.

    xdistill teacher train --data cityscapes/ --layout cityscapes --workdir runs/teacher \\
        --variant resnet50 --height 512 --width 1024 --steps 40000 --batch-size 8
    xdistill teacher train --data synth/ --layout synthetic --workdir runs/teacher_synth
    xdistill teacher precompute --backend flax:runs/teacher --dataset data/tfds --split train \\
        --grouping geometric --out data/teacher/train
    xdistill teacher precompute --backend onnx:seg.onnx --input-size 512,1024 \\
        --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --class-order 0,1,...,18 ...
    xdistill teacher precompute --backend labels:synth/ ...     (the synthetic world's labels)
    xdistill teacher precompute --backend labels:DIR --labels-template \\
        "{folder}/segformer_{cam}/{frame:010d}" ...                 (files from another tool)

`--dataset` is the TFDS data directory `xdistill prepare --out` wrote. Re-running an interrupted
precompute with the same arguments resumes after the last complete shard.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="teacher_verb", metavar="{train,precompute}")
    sub.required = True
    from data_pipelines.teacher.train_teacher import TeacherTrainConfig

    tr = sub.add_parser("train", help="train the Flax segmentation teacher",
                        description="Train the Flax segmentation teacher (resumes from --workdir).")
    tr.add_argument("--data", required=True, help="Cityscapes root or synthetic world root")
    tr.add_argument("--workdir", required=True, help="output: config.json + checkpoints/")
    defaults = TeacherTrainConfig()
    tr.add_argument("--layout", choices=("cityscapes", "synthetic"), default=defaults.layout)
    tr.add_argument("--split", default=defaults.split, help="e.g. train (split file / folder name)")
    tr.add_argument("--variant", choices=("resnet50", "resnet18_tiny"), default=defaults.variant)
    for name in ("height", "width", "batch_size", "steps", "seed", "save_every"):
        tr.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    tr.add_argument("--lr", type=float, default=defaults.lr)
    tr.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    tr.add_argument("--pretrained", default="", help="torchvision ResNet .pth for the encoder")

    pc = sub.add_parser("precompute", help="write a teacher's grouped logits for a prepared split",
                        description="Run a teacher over image_0 of a prepared split into a logits store.")
    pc.add_argument("--backend", required=True, help="flax:WORKDIR | onnx:FILE | labels:DIR")
    pc.add_argument("--dataset", required=True, help="TFDS data dir written by `xdistill prepare`")
    pc.add_argument("--split", default="train")
    pc.add_argument("--grouping", default="geometric",
                    help="geometric | cityscapes_categories | none (19 classes)")
    pc.add_argument("--out", required=True, help="store directory")
    pc.add_argument("--stride", type=int, default=4, help="store resolution = image size / stride")
    pc.add_argument("--batch-size", type=int, default=8)
    pc.add_argument("--shard-size", type=int, default=1000)
    pc.add_argument("--no-progress", action="store_true")
    pc.add_argument("--input-size", help="onnx: H,W the model takes (default: its static size)")
    pc.add_argument("--mean", help="onnx: per-channel mean in [0,1] units (default ImageNet)")
    pc.add_argument("--std", help="onnx: per-channel std in [0,1] units (default ImageNet)")
    pc.add_argument("--layout", choices=("NCHW", "NHWC"), help="onnx: tensor layout (default NCHW)")
    pc.add_argument("--class-order", help="onnx: trainId of each output channel, -1 = drop")
    pc.add_argument("--labels-template", help="labels: path template under DIR without suffix")
    pc.add_argument("--labels-size", help="labels: exact H,W every label file must have")


def _backend_options(args) -> dict:
    from data_pipelines.teacher.precompute import parse_floats

    kind = args.backend.partition(":")[0]
    onnx_opts = {"--input-size": args.input_size, "--mean": args.mean, "--std": args.std,
                 "--layout": args.layout, "--class-order": args.class_order}
    label_opts = {"--labels-template": args.labels_template, "--labels-size": args.labels_size}
    stray = [k for k, v in {**onnx_opts, **label_opts}.items() if v is not None and not (
        (kind == "onnx" and k in onnx_opts) or (kind == "labels" and k in label_opts))]
    if stray:
        raise ValueError(f"{', '.join(stray)} do not apply to the {kind}: backend")
    opts = {}
    if args.input_size:
        opts["input_size"] = [int(v) for v in parse_floats(args.input_size, "--input-size", 2)]
    if args.mean:
        opts["mean"] = parse_floats(args.mean, "--mean", 3)
    if args.std:
        opts["std"] = parse_floats(args.std, "--std", 3)
    if args.layout:
        opts["layout"] = args.layout
    if args.class_order:
        opts["class_order"] = [int(v) for v in parse_floats(args.class_order, "--class-order")]
    if args.labels_template:
        opts["template"] = args.labels_template
    if args.labels_size:
        opts["expected_size"] = [int(v) for v in parse_floats(args.labels_size, "--labels-size", 2)]
    return opts


def run(args) -> int:
    from xdistill_jax.output_dirs import check_output_dir

    try:
        if args.teacher_verb == "train":
            from data_pipelines.teacher.train_teacher import TeacherTrainConfig, train_teacher

            # every config field has a flag of the same name (data_dir: --data), num_classes
            # excepted: the teacher predicts the 19 Cityscapes trainIds the groupings are made of
            fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TeacherTrainConfig)
                      if hasattr(args, f.name)}
            cfg = TeacherTrainConfig(**fields, data_dir=args.data)
            check_output_dir(args.workdir, "--workdir")
            metrics = train_teacher(cfg, args.workdir)
            print(f"teacher trained: {metrics}")
            return 0
        from data_pipelines.teacher.precompute import precompute_split

        check_output_dir(args.out, "--out")
        path = precompute_split(args.backend, args.dataset, args.split, args.out,
                                backend_options=_backend_options(args), grouping=args.grouping,
                                stride=args.stride, batch_size=args.batch_size,
                                shard_size=args.shard_size, progress=not args.no_progress)
    except ValueError as e:
        print(f"xdistill teacher {args.teacher_verb}: error: {e}", file=sys.stderr)
        return 1
    except ImportError as e:  # --pretrained .pth files: torch is an optional extra
        if e.name != "torch":
            raise
        print(f"xdistill teacher {args.teacher_verb}: error: --pretrained {args.pretrained}: reading a "
              f"torchvision .pth file needs PyTorch ({e}); pip install torch (CPU is enough)",
              file=sys.stderr)
        return 1
    print(path)
    return 0
