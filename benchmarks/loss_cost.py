"""XLA cost analysis and CPU time of the Monodepth2 loss, forward + gradient (disparities, pose).

    python benchmarks/loss_cost.py --batch 4 --height 64 --width 192
    # another version of the code (e.g. an older commit exported with `git archive`):
    PYTHONPATH=/tmp/old python benchmarks/loss_cost.py --batch 2 --height 192 --width 640

Prints the loss value (must not change between versions), GFLOP and GB accessed per call from
`jit(...).lower(...).compile().cost_analysis()` (the memory traffic is what the loss work is
bound by on a GPU), the compile time, and the median wall and process-CPU time per call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def make_inputs(batch: int, height: int, width: int, seed: int = 0):
    """Random colours/disparities, small poses, Monodepth2's K per scale (pixels)."""
    rng = np.random.default_rng(seed)
    k_norm = np.array([[0.58, 0, 0.5, 0], [0, 1.92, 0.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32)
    colors, disps, Ks, inv_Ks = {f: {} for f in (0, -1, 1)}, {}, {}, {}
    for s in range(4):
        h, w = height // 2**s, width // 2**s
        for f in colors:
            colors[f][s] = jnp.asarray(rng.uniform(0, 1, (batch, h, w, 3)), jnp.float32)
        disps[s] = jnp.asarray(rng.uniform(0.01, 0.3, (batch, h, w, 1)), jnp.float32)
        k = k_norm.copy()
        k[0] *= w
        k[1] *= h
        Ks[s] = jnp.asarray(np.broadcast_to(k, (batch, 4, 4)))
        inv_Ks[s] = jnp.asarray(np.broadcast_to(np.linalg.pinv(k), (batch, 4, 4)))
    pose = {f: (jnp.asarray(rng.normal(0, 0.01, (batch, 3)), jnp.float32),
                jnp.asarray(rng.normal(0, 0.05, (batch, 3)), jnp.float32)) for f in (-1, 1)}
    return colors, disps, pose, Ks, inv_Ks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--iters", type=int, default=7)
    args = p.parse_args()

    import xdistill_jax
    from xdistill_jax import geometry, losses

    colors, disps, pose, Ks, inv_Ks = make_inputs(args.batch, args.height, args.width)

    def objective(disps, pose, colors, key):
        cam_T_cam = {f: geometry.pose_from_axisangle(*pose[f], invert=f < 0) for f in (-1, 1)}
        return losses.monodepth2_loss(colors, disps, cam_T_cam, Ks, inv_Ks, rng=key)[0]

    key = jax.random.key(0)
    t0, c0 = time.perf_counter(), time.process_time()
    compiled = jax.jit(jax.value_and_grad(objective, argnums=(0, 1))).lower(disps, pose, colors, key).compile()
    compile_s, compile_cpu = time.perf_counter() - t0, time.process_time() - c0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out = jax.block_until_ready(compiled(disps, pose, colors, key))
    wall, cpu = [], []
    for _ in range(args.iters):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(disps, pose, colors, key))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(f"{xdistill_jax.__file__} on {jax.devices()[0].device_kind}, batch {args.batch} "
          f"{args.height}x{args.width}: loss {float(out[0]):.6f}, {cost['flops'] / 1e9:.2f} GFLOP, "
          f"{cost['bytes accessed'] / 1e9:.2f} GB accessed, compile {compile_s:.1f} s ({compile_cpu:.1f} s CPU), "
          f"median {1e3 * statistics.median(wall):.0f} ms wall, {1e3 * statistics.median(cpu):.0f} ms CPU per call")


if __name__ == "__main__":
    main()
