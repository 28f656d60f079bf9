"""The `xdistill` command line: one verb per job, each implemented in `xdistill_jax.commands.<verb>`.

This is the only place that parses arguments. Each command module exposes
`add_arguments(parser: argparse.ArgumentParser) -> None` and `run(args) -> int`, and calls
importable library functions. A verb whose module is not written yet says so (naming the issue
that brings it) and exits with status 2: no verb pretends to work.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> (module under xdistill_jax.commands, one-line help, issue that brings it)
VERBS: dict[str, tuple[str, str, int]] = {
    "synth": ("synth", "generate the synthetic driving world (KITTI raw + Make3D layout)", 3),
    "prepare": ("prepare", "convert a KITTI raw directory + split file into TFDS shards", 3),
    "export-gt": ("export_gt", "export velodyne ground-truth depth for a test split", 3),
    "teacher": ("teacher", "train a segmentation teacher / precompute its grouped logits", 4),
    "train": ("train", "train Monodepth2 / X-Distill from a config", 5),
    "eval": ("evaluate", "evaluate a checkpoint (KITTI Eigen, Make3D, pose)", 6),
    "predict": ("predict", "predict depth for images, folders or video frames", 6),
    "demo": ("demo", "run the whole pipeline on the synthetic world and compare", 7),
    "bench": ("bench", "benchmark the train step and the loader", 8),
    "convert-weights": ("convert_weights", "convert PyTorch ResNet / Monodepth2 weights to Flax", 2),
}


def _load(verb: str):
    module_name, _, _ = VERBS[verb]
    full = f"xdistill_jax.commands.{module_name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as e:
        if e.name == full:
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xdistill",
        description="X-Distill / Monodepth2 self-supervised monocular depth in JAX.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for verb, (_, help_text, issue) in VERBS.items():
        module = _load(verb)
        if module is None:
            help_text = f"(not implemented yet: issue #{issue}) {help_text}"
        p = sub.add_parser(verb, help=help_text, description=help_text)
        if module is not None:
            module.add_arguments(p)
        p.set_defaults(_module=module, _issue=issue)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Config overrides look like `--config.optim.lr=1e-3`; argparse must not treat them as
    # abbreviations of `--config`, so commands that take them use parse_known_args themselves.
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    module = args._module
    if module is None:
        print(f"xdistill {args.verb}: not implemented yet (issue #{args._issue}).", file=sys.stderr)
        return 2
    if extra and not getattr(module, "ACCEPTS_EXTRA_ARGS", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    from xdistill_jax import local_paths

    urls = local_paths.find_url_arguments(args)
    for flag, value in urls:
        print(f"xdistill {args.verb}: {local_paths.url_error(flag, value)}", file=sys.stderr)
    if urls:
        return 2
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
