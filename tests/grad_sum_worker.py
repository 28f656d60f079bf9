"""The measurement behind tests/test_grad_sum.py, in its own process; not a test itself.

usage: python grad_sum_worker.py     (prints one JSON line)

Runs with `--xla_allow_excess_precision=false`: by default XLA:CPU computes a bf16 convolution
in float32 and drops the bf16 rounding of its result, so a CPU weight gradient would not be
the bf16 value a GPU's cuDNN or a TPU gives, and a sum in bf16 could not be told from one in
float32. The flag is process-wide, hence this process. For each convolution form conv_nhwc has
(plain, strided, dilated), a bf16 `Conv`'s parameter gradients with a batch of 8 sharded over
4 CPU devices (`platform_forms.target(mesh=...)`) are compared with the float64 sum of the 4
one-device gradients (each device's 2 examples).
"""

import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_allow_excess_precision=false"
os.environ["JAX_DEFAULT_PRNG_IMPL"] = "rbg"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from xdistill_jax import platform_forms  # noqa: E402
from xdistill_jax.models.conv import Conv  # noqa: E402

DEVICES, BATCH = 4, 8
LAYERS = {
    "3x3": dict(features=8, kernel_size=3, padding=((1, 1), (1, 1))),
    "7x7/2": dict(features=8, kernel_size=7, strides=2, padding=((3, 3), (3, 3)), use_bias=False),
    "3x3 dilated 2": dict(features=8, kernel_size=3, kernel_dilation=2, padding=((2, 2), (2, 2))),
}


def measure(name: str) -> dict:
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:DEVICES]), ("data",))
    conv = Conv(dtype=jnp.bfloat16, **LAYERS[name])
    kx, kp, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (BATCH, 12, 20, 5), jnp.float32).astype(jnp.bfloat16)
    params = conv.init(kp, x[:1])["params"]
    cot = jax.random.normal(kc, conv.apply({"params": params}, x).shape, jnp.float32)

    def loss(params, x, cot):  # a linear read-out of the bf16 output, in float32
        return jnp.sum(conv.apply({"params": params}, x).astype(jnp.float32) * cot)

    def sharded(params, x, cot):
        with platform_forms.target(None, mesh=mesh):
            return jax.grad(loss)(params, x, cot)

    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    got = jax.jit(sharded)(params, jax.device_put(x, batch), jax.device_put(cot, batch))
    one = jax.jit(jax.grad(loss))
    per_device = [one(params, x[i:i + 2], cot[i:i + 2]) for i in range(0, BATCH, 2)]
    out = {}
    for key in params:
        parts = [np.asarray(g[key], np.float64) for g in per_device]
        want = sum(parts)
        scale = float(np.max(np.abs(want)))
        bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)  # noqa: E731
        out[key] = {
            # each one-device gradient is bf16-valued (the reference is what a GPU computes)
            "parts_bf16_valued": all(bool(np.array_equal(p, bf16(p))) for p in parts),
            "error": float(np.max(np.abs(np.asarray(got[key], np.float64) - want))) / scale,
            # how far the same sum rounded to bf16 would be
            "bf16_rounding": float(np.max(np.abs(bf16(want) - want))) / scale,
            "dtype": str(got[key].dtype),
        }
    return out


if __name__ == "__main__":
    assert len(jax.devices()) == DEVICES, jax.devices()
    print(json.dumps({name: measure(name) for name in LAYERS}))
