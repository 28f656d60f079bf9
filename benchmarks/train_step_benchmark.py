"""Train-step benchmark: the full X-Distill step on device-resident synthetic batches.

    python benchmarks/train_step_benchmark.py --config configs/kitti_resnet18_640x192.py --json out.json
    python benchmarks/train_step_benchmark.py --config configs/synthetic_demo.py --steps 10 --warmup 2 \
        --dtypes float32 --distill on,off --config.optim.batch_size=2

The same as `xdistill bench` (all its flags; see `xdistill bench --help`); the work is
`xdistill_jax.benchmark`. For the GPU matrix run `bash benchmarks/gpu.sh`.
"""

import sys

from xdistill_jax import cli

if __name__ == "__main__":
    sys.exit(cli.main(["bench", *sys.argv[1:]]))
