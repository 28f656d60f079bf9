"""Weights used in a low precision, their gradients summed across devices in float32.

A bf16 train step keeps float32 master weights and casts them to bf16 for each convolution
(`models.conv.Conv`); the weight gradient is computed in bf16 (cuDNN's backward-filter kernel,
the TPU's convolution) and cast back. With the batch sharded over N devices, each device's
weight gradient is a partial sum, and XLA's partitioner adds the partials where it likes. It
added them in bf16: without this module the compiled 4 x H200 and TPU v5e 2x2 train steps
all-reduce 26.85 M bf16 weight-gradient elements (benchmarks/gpu_aot.py, benchmarks/tpu_aot.py;
benchmarks/RESULTS.md, 2026-12-05), so every addition of two devices' partials is rounded
to bf16 again, N - 1 more roundings than one device's step, growing with the pod. (PyTorch's
DistributedDataParallel under autocast all-reduces the float32 `.grad`: one bf16 rounding per
device.)

`apply_summing_grads_in_float32` computes each device's own weight gradient explicitly
(`jax.shard_map` over the mesh), rounds it to the compute dtype once, as the one-device step
does, and sums the devices' gradients in float32 (`lax.psum`). The all-reduce then carries
float32, twice the bytes (about 54 MB more per ResNet-18 X-Distill step). The function, its
gradient for the activations and a one-device step are unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def apply_summing_grads_in_float32(fn: Callable, mesh: jax.sharding.Mesh, x: jax.Array,
                                   params: Any) -> jax.Array:
    """`fn(x, params cast to x.dtype)`; its gradient for `params` is summed over devices in float32.

    `x`'s leading (batch) axis is sharded over all of `mesh`'s axes, and `fn` must compute each
    example from that example alone (a convolution, a bias), so a device's examples give its
    share of the output. The gradient for `params` (a pytree of float32 arrays; None leaves
    allowed) is then sum over the devices of (each device's gradient of fn at its own examples,
    in x.dtype), the sum taken in float32. The gradient for `x` is fn's own.
    """
    axes = tuple(mesh.axis_names)
    batch = P(axes)

    def cast(tree):
        return jax.tree.map(lambda a: a.astype(x.dtype), tree)

    @jax.custom_vjp
    def apply(x, params):
        return fn(x, cast(params))

    def forward(x, params):
        low = cast(params)
        return fn(x, low), (x, low)

    def backward(saved, g):
        x, low = saved
        (dx,) = jax.vjp(lambda x: fn(x, low), x)[1](g)

        def own_gradient(x, g, low):
            # The weights as each device's own value (varying), so the vjp below is this
            # device's gradient alone: differentiating the replicated weights would have
            # shard_map sum it across devices already, in x.dtype.
            low = jax.tree.map(lambda a: jax.lax.pcast(a, axes, to="varying"), low)
            (d,) = jax.vjp(lambda p: fn(x, p), low)[1](g)
            return jax.tree.map(lambda a: jax.lax.psum(a.astype(jnp.float32), axes), d)

        dparams = jax.shard_map(own_gradient, mesh=mesh, in_specs=(batch, batch, P()),
                                out_specs=P())(x, g, low)
        return dx, dparams

    apply.defvjp(forward, backward)
    return apply(x, params)
