"""Throughput of the Monodepth2 loss (forward + gradient wrt disparities and pose), jitted.

Prints milliseconds per call and images per second for the loss work alone (no networks), i.e.
the part of a training step that the loss costs.

  python benchmarks/bench_losses.py                      # 640x192, batch 12 (the training setting)
  python benchmarks/bench_losses.py --height 64 --width 192 --batch 2 --iters 5   # CPU smoke
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import jax
import jax.numpy as jnp

from xdistill_jax import geometry, losses


def make_inputs(batch: int, height: int, width: int, seed: int = 0):
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--height", type=int, default=192)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--bf16", action="store_true", help="pass colours as bfloat16 (the loss stays float32)")
    args = p.parse_args()

    colors, disps, pose, Ks, inv_Ks = make_inputs(args.batch, args.height, args.width)
    if args.bf16:
        colors = jax.tree.map(lambda x: x.astype(jnp.bfloat16), colors)

    def objective(disps, pose, colors, key):
        cam_T_cam = {f: geometry.pose_from_axisangle(*pose[f], invert=f < 0) for f in (-1, 1)}
        loss, _ = losses.monodepth2_loss(colors, disps, cam_T_cam, Ks, inv_Ks, rng=key)
        return loss

    step = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
    key = jax.random.key(0)
    t0 = time.perf_counter()
    loss, grads = step(disps, pose, colors, key)
    jax.block_until_ready(grads)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.iters):
        loss, grads = step(disps, pose, colors, jax.random.fold_in(key, i))
    jax.block_until_ready(grads)
    dt = (time.perf_counter() - t0) / args.iters
    print(f"device={jax.devices()[0].device_kind} batch={args.batch} {args.height}x{args.width} "
          f"colors={'bf16' if args.bf16 else 'fp32'} loss={float(loss):.6f}")
    print(f"first call (compile+run) {compile_s:.2f} s; loss fwd+bwd {dt * 1e3:.2f} ms/step; "
          f"{args.batch / dt:.0f} images/s")


if __name__ == "__main__":
    main()
