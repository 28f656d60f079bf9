"""ReLU and ELU whose derivatives are read from their outputs (ReLU: so that XLA can fuse it into a
cuDNN convolution; ELU: so that the backward pass does not keep the pre-activation).

`jax.nn.relu`'s derivative is ``x > 0`` of its *input*. When that input is a convolution's result,
the convolution then has two users (the maximum and the backward's comparison) and XLA's GPU
rewriter (cudnn-fused-convolution-rewriter, FuseRelu) leaves the ReLU as a separate kernel that
re-reads and re-writes the full activation. Here the tangent is masked with ``y != 0`` of the
*output* y = max(x, 0), which the next layer reads anyway; the convolution keeps one user and
cuDNN applies the ReLU in its epilogue. (``y > 0`` would not do: XLA's simplifier rewrites
``max(x, 0) > 0`` back to ``x > 0``.)

The derivative is the same as jax.nn.relu's for every non-NaN x: y != 0 exactly when x > 0
(x = 0 gives 0, as jax.nn.relu's does). For x = NaN the forward is NaN either way and the tangent
passes through instead of being zeroed. tests/test_models.py checks values and gradients against
jax.nn.relu bitwise; benchmarks/RESULTS.md has the bytes it saves on an H100 target.

`elu` (the depth decoder's activation) is `jax.nn.elu` with the derivative 1 where y > 0 and y + 1
elsewhere, which is bitwise what JAX's own rule gave up to jax 0.11 (it differentiated expm1 as its
output + 1, and y > 0 exactly when x > 0, NaN included). jax 0.12 differentiates expm1 as exp(x)
instead, which differs from y + 1 by float rounding (within 2 ulp, tested); this rule stays, so the
depth net's gradients do not move with the JAX version. With the derivative taken from x, the
backward pass kept each decoder convolution's output and XLA computed the activation twice (into
the next layer's padded input, and again beside it); from y, the activation is computed once and
the backward reads it. On an H100 target that alone saved 0.23 GB of memory traffic per bf16 step
and 0.12 GB of XLA memory, but cost 0.28 GB in fp32, where XLA had recomputed the activation inside
the padding; with the decoder's padded activation shared as well (`depth.elu_reflect_padded`) both
dtypes gain (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _max0(x):
    return jnp.maximum(x, jnp.zeros((), jnp.result_type(x)))


@jax.custom_jvp
def relu(x):
    """max(x, 0), with the derivative taken from the output (see the module docstring)."""
    return _max0(x)


@relu.defjvp
def _relu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    y = _max0(x)
    return y, jnp.where(y != 0, t, jnp.zeros_like(t))


@jax.custom_jvp
def elu(x):
    """`jax.nn.elu(x)` (alpha 1), with the derivative taken from the output y: 1 where y > 0,
    else y + 1 (= exp(x), as JAX up to 0.11 differentiated expm1). The backward pass then needs
    only y, which the next layer reads anyway, and not the pre-activation x."""
    return jax.nn.elu(x)


@elu.defjvp
def _elu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    y = jax.nn.elu(x)
    return y, jnp.where(y > 0, t, t * (y + jnp.ones((), jnp.result_type(y))))
