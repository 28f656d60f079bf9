"""Checkpoint save time of the train state: `checkpoints.Checkpointer` (each array written whole
by its first replica) against orbax's standard handler (replica-parallel writes on CPU and TPU).

    python benchmarks/checkpoint_save.py                       # 4 CPU devices, ResNet-18
    python benchmarks/checkpoint_save.py --devices 1 --saves 5

The state is the training loop's (depth and pose networks, Adam), initialised from scratch and
replicated over a mesh of --devices devices (on a CPU, fake ones:
`--xla_force_host_platform_device_count`, set here before jax is imported). Each handler gets
a fresh process-level start: the replica-parallel writes compile their `jit(slice)`s on the
first save of a process, so the handler measured second would find them compiled; run each
handler in its own process (--handler) for a first-save figure, as the default does.
Saves are synchronous (timed to the end of the write); the folder is a temporary one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def run_one(args) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
    import pathlib
    import tempfile
    import time

    import jax

    from xdistill_jax import train
    from xdistill_jax.checkpoints import Checkpointer
    from xdistill_jax.config_defaults import base_config
    from xdistill_jax.objective import Networks

    config = base_config()
    config.model.num_layers = args.layers
    config.mesh.num_devices = args.devices
    nets = Networks.from_config(config)
    tx = train.make_optimizer(config, steps_per_epoch=100)
    mesh = train.make_mesh(config)
    state = jax.block_until_ready(train.create_train_state(nets, tx, mesh, jax.random.key(0)))
    size = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        directory = pathlib.Path(tmp) / "checkpoints"
        if args.handler == "xdistill":
            ckpt = Checkpointer(directory, keep=2, async_save=False)
            save, close = (lambda s: ckpt.save(s, state, {})), ckpt.close
        else:
            import orbax.checkpoint as ocp

            manager = ocp.CheckpointManager(
                directory, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                                                enable_async_checkpointing=False),
                item_handlers={"state": ocp.StandardCheckpointHandler()})
            save = lambda s: manager.save(s, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))  # noqa: E731
            close = manager.close
        times = []
        for s in range(1, args.saves + 1):
            t = time.perf_counter()
            save(s)
            times.append(time.perf_counter() - t)
        close()
    later = sorted(times[1:])
    print(f"| {args.handler} | {jax.devices()[0].platform} x{args.devices} | {size:.0f} MiB | {times[0]:.2f} | "
          f"{later[len(later) // 2]:.2f} | {min(later):.2f}-{max(later):.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--layers", type=int, default=18, choices=(18, 34, 50))
    parser.add_argument("--saves", type=int, default=4, help="saves per handler (at least 2)")
    parser.add_argument("--handler", choices=("xdistill", "orbax-standard"),
                        help="measure this one in this process (default: each in its own process)")
    args = parser.parse_args()
    if args.saves < 2:
        parser.error("--saves must be at least 2 (the first save and the later ones are reported apart)")
    if args.handler:
        return run_one(args)
    print("| handler | devices | state | first save s | later saves s (median) | later (range) |")
    print("|---|---|---|---|---|---|", flush=True)
    for handler in ("orbax-standard", "xdistill"):
        cmd = [sys.executable, __file__, "--handler", handler, "--devices", str(args.devices),
               "--layers", str(args.layers), "--saves", str(args.saves)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed with exit status {done.returncode}")
        print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
