"""A bf16 convolution's weight gradients on a sharded batch: each device's own, summed in float32.

models/grad_sum.py: XLA's partitioner would add the devices' partial weight gradients in bf16.
tests/grad_sum_worker.py builds the expectation from four one-device gradients (each device's
two examples, bf16-valued as on a GPU), added in float64, in a process where XLA:CPU keeps
bf16 roundings (`--xla_allow_excess_precision=false`). The sharded gradient must match it to
float32 rounding; a sum taken in bf16, or rounded to bf16, is off by about 2^-9 (measured
2026-12-05 with the plain partitioned gradient: 2.3e-3 to 3.6e-3 of the largest element).
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xdistill_jax import platform_forms
from xdistill_jax.models.conv import Conv


@pytest.fixture(scope="module")
def measured():
    worker = pathlib.Path(__file__).with_name("grad_sum_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layer", ["3x3", "7x7/2", "3x3 dilated 2"])
def test_sharded_bf16_weight_gradients_are_each_devices_own_summed_in_float32(measured, layer):
    got = measured[layer]
    assert set(got) == ({"kernel"} if layer == "7x7/2" else {"kernel", "bias"})
    for key, m in got.items():
        assert m["parts_bf16_valued"], (layer, key)  # the reference is a bf16 device's
        assert m["dtype"] == "float32"
        assert m["bf16_rounding"] > 1e-4, (layer, key, m)  # bf16 could not hold the sum
        assert m["error"] < 1e-6, (layer, key, m)


def _mesh(n):
    if len(jax.devices()) < n:
        pytest.skip(f"needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
    return jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ("data",))


def _gradient_jaxpr(dtype, mesh) -> str:
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 3), jnp.float32)
    conv = Conv(features=4, kernel_size=3, dtype=dtype)
    params = conv.init(jax.random.key(2), x[:1])["params"]

    def grad(p):
        with platform_forms.target(None, mesh=mesh):
            return jax.grad(lambda p: jnp.sum(conv.apply({"params": p}, x).astype(jnp.float32) ** 2))(p)
    return str(jax.make_jaxpr(grad)(params))


def test_only_a_cast_down_layer_on_several_devices_takes_the_summing_path():
    """A float32 layer, or a bf16 one on one device, is plain autodiff (the programs the
    figures were measured with); a bf16 layer on 4 devices sums per-device gradients."""
    assert "shard_map" not in _gradient_jaxpr(jnp.float32, _mesh(4))
    assert "shard_map" not in _gradient_jaxpr(jnp.bfloat16, _mesh(1))
    assert "shard_map" in _gradient_jaxpr(jnp.bfloat16, _mesh(4))


def test_target_refuses_a_device_count_that_is_not_the_meshs():
    with pytest.raises(ValueError, match="devices=2 but the mesh has 4"):
        with platform_forms.target(None, devices=2, mesh=_mesh(4)):
            pass
