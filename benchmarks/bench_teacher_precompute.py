"""Teacher precompute throughput: our Flax segmentation teacher -> grouped logits -> store.

    python benchmarks/bench_teacher_precompute.py --variant resnet18_tiny --height 64 --width 192 \\
        --examples 64 --batch 8
    python benchmarks/bench_teacher_precompute.py --variant resnet50 --height 192 --width 640 \\
        --examples 512 --batch 32          # the real setting, on an accelerator

Builds an untrained teacher workdir (weights do not change the cost), an in-memory split of
random images, and runs `precompute` (network, grouping, resize, float16 store writes) twice:
the first run includes compilation, the second (into a fresh store) is the steady state.
Prints examples/s, the store's bytes per example and the projection for 39,810 examples.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import tempfile
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="resnet18_tiny", choices=("resnet18_tiny", "resnet50"))
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--stride", type=int, default=4)
    args = p.parse_args()

    import jax

    from data_pipelines.teacher import precompute, store, train_teacher as tt
    from xdistill_jax.checkpoints import Checkpointer

    root = pathlib.Path(tempfile.mkdtemp(prefix="xdistill-bench-teacher-"))
    cfg = tt.TeacherTrainConfig(variant=args.variant, height=args.height, width=args.width)
    (root / "work").mkdir()
    (root / "work" / tt.CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg)))
    model = tt._model(cfg)
    state = tt._init_state(cfg, model, tt._optimizer(cfg))
    ckpt = Checkpointer(root / "work" / "checkpoints", keep=1, async_save=False)
    ckpt.save(0, state)
    ckpt.close()

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.examples, args.height, args.width, 3), dtype=np.uint8)
    source = [{"id": f"bench/drive {i} l", "image_0": images[i]} for i in range(args.examples)]
    backend = tt.FlaxBackend(root / "work")
    print(f"device: {jax.devices()[0].device_kind}; teacher {args.variant} at "
          f"{args.width}x{args.height}, batch {args.batch}")
    for run in ("first (with compile)", "steady"):
        out = root / f"store-{run.split()[0]}"
        t0 = time.perf_counter()
        precompute.precompute(backend, source, out, stride=args.stride, batch_size=args.batch,
                              progress=False)
        dt = time.perf_counter() - t0
        print(f"{run}: {args.examples / dt:.1f} examples/s ({dt:.2f} s)")
    st = store.TeacherLogitsSource(out)
    size = sum(f.stat().st_size for f in out.glob("*.array_record")) / len(st)
    print(f"store: {st.width}x{st.height}x{st.num_groups} float16, {size:,.0f} bytes/example, "
          f"{size * 39810 / 1e9:.2f} GB for 39,810 examples")


if __name__ == "__main__":
    main()
