"""Evaluation inference throughput: the jitted, padded DepthPredictor used by `xdistill eval/predict`.

    python benchmarks/bench_eval.py                          # ResNet-18, 640x192, batch 16
    python benchmarks/bench_eval.py --post-process --batches 4

Scratch-initialised weights (speed does not depend on them), random uint8 images already at the
network size (image decoding and resizing are not timed). Prints the first-call (compile) time
and images/s over the timed batches; on Eigen (697 images, batch 16) that is 44 calls.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--layers", type=int, default=18, choices=(18, 34, 50))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=8, help="timed batches after the compile")
    parser.add_argument("--post-process", action="store_true", help="also run the mirrored images")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from xdistill_jax.inference import DepthModel, DepthPredictor
    from xdistill_jax.models.depth import DepthNet

    net = DepthNet(num_layers=args.layers, dtype=jnp.dtype(args.dtype))
    variables = jax.jit(net.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    model = DepthModel(net, variables, None, None, args.height, args.width, 0.1, 100.0, None, "scratch")
    predictor = DepthPredictor(model, args.batch, args.post_process)
    images = np.random.default_rng(0).integers(0, 256, (predictor.batch_size, args.height, args.width, 3),
                                                dtype=np.uint8)
    t0 = time.perf_counter()
    predictor.predict(images)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.batches):
        predictor.predict(images)
    dt = time.perf_counter() - t0
    n = args.batches * predictor.batch_size
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.local_devices())}; ResNet-{args.layers} "
          f"{args.width}x{args.height} {args.dtype}, batch {predictor.batch_size}"
          f"{', post-process' if args.post_process else ''}")
    print(f"first call (trace + compile + run): {compile_s:.2f} s")
    print(f"{n / dt:.1f} images/s ({dt / args.batches * 1000:.1f} ms per batch of {predictor.batch_size}, "
          "host->device copy and fetch included)")


if __name__ == "__main__":
    main()
