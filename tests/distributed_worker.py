"""One process of the two-process bf16 test (tests/test_train_step.py); not a test itself.

usage: python distributed_worker.py OUT.npz PROCESS_ID NUM_PROCESSES PORT [DTYPE]
Each process has one CPU device, joins `jax.distributed`, feeds ITS half of the same global
batches with `make_array_from_process_local_data`, runs 3 train steps and saves the replicated
parameters and losses. NUM_PROCESSES=1 with 2 local devices gives the single-process reference.
DTYPE: the model's compute dtype (`model.dtype`, default float32).
"""

import os
import sys

out, pid, nproc, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
dtype = sys.argv[5] if len(sys.argv) > 5 else "float32"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_DEFAULT_PRNG_IMPL"] = "rbg"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={2 if nproc == 1 else 1}"

import jax  # noqa: E402
import numpy as np  # noqa: E402

if nproc > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                               process_id=pid, initialization_timeout=120)

sys.path.insert(0, os.path.dirname(__file__))
from train_fixtures import make_batch, tiny_config  # noqa: E402
from xdistill_jax import train  # noqa: E402
from xdistill_jax.objective import Networks  # noqa: E402

config = tiny_config(distill_weight=0.1, **{"model.dtype": dtype})
nets = Networks.from_config(config)
tx = train.make_optimizer(config, steps_per_epoch=100)
mesh = train.make_mesh(config)
assert mesh.size == 2, mesh
state = train.create_train_state(nets, tx, mesh, jax.random.key(0))
step = train.make_train_step(config, nets, tx, mesh)
rng = jax.random.key(1)
losses = []
per_process = 4 // nproc


def local_batch(i):
    full = make_batch(4, 32, 96, seed=i)
    return train.global_batch({k: v[pid * per_process:(pid + 1) * per_process] for k, v in full.items()}, mesh)


# Compile before the first collective and wait for the other process: on a loaded machine one
# process can finish compiling much later, and gloo's context set-up times out after 30 s.
step = step.lower(state, local_batch(0), rng).compile()
if nproc > 1:  # the coordination service's barrier (not a gloo collective, no 30 s limit)
    from jax._src import distributed
    distributed.global_state.client.wait_at_barrier("compiled", timeout_in_ms=600_000)
for i in range(3):
    state, metrics = step(state, local_batch(i), rng)
    losses.append(float(metrics["loss"]))
flat = {jax.tree_util.keystr(p): np.asarray(x.addressable_data(0))
        for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
if pid == 0:
    np.savez(out, losses=np.asarray(losses), **flat)
print("done", pid, losses, flush=True)
