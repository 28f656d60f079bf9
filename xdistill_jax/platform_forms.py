"""One computation in two forms: the CPU's, and the one for GPU/TPU.

Several pieces of the train step have a form that rounds like the code the demo's and the tests'
figures were measured with, kept on the CPU, and a form that moves less memory on a GPU or TPU
(benchmarks/RESULTS.md). `choose(*args, cpu=f, default=g)` applies one of them (`gpu=h`: a
third form for CUDA and ROCm alone, the TPU keeping `default`: the 16-bit convolutions'
tensor-core channel padding, `models.conv`, which `target`'s `channel_padding` turns off;
`tpu=t`: a form for the TPU alone, the GPUs keeping `default`: the depth decoder's upsampling
and reflection pads, `models.depth`):

- while `target(platform)` is active, the form for that platform alone, picked in Python. The
  train step is traced inside it, with its mesh's platform (`train.make_train_step`);
- elsewhere, `jax.lax.platform_dependent(*args, cpu=f, default=g)`, which picks the form when
  the program is lowered, for whatever platform that is (export for several platforms at
  once, functions called outside a step).

Both give the same program for a platform (the H100 target's optimised HLO is the same up to
names; the CPU's train steps are bitwise the same), but `platform_dependent` traces both forms
and carries them through autodiff and vmap as a `cond` on the platform: that was about half of
the train step's tracing, time every cold start pays (ResNet-18, 640x192, idle 2-core VM:
traced and lowered for its CPU in 4.0 -> 2.2 s, for an H100 target 4.6 -> 2.6 s;
benchmarks/RESULTS.md).

`target` also carries the number of devices the step's batch is sharded over
(`batch_devices`), for a piece whose one-device form a partitioned batch cannot keep without
gathering it onto every device: the pose net's two source pairs (`objective.predict_poses`),
the translator's sub-grids (`models.conv.conv_nhwc`), the upsampling's edge padding
(`geometry.upsample_bilinear`). Their sharded forms compute the same; the one-device forms
are kept for the programs the figures were measured with. With the step's `mesh`, `data_mesh`
gives it to pieces that compute each device's share explicitly: the convolutions' weight
gradients of a low-precision step, summed across devices in float32 (`models.grad_sum`).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("xdistill_target_platform", default=None)
_DEVICES: contextvars.ContextVar[int | None] = contextvars.ContextVar("xdistill_batch_devices", default=None)
_MESH: contextvars.ContextVar = contextvars.ContextVar("xdistill_batch_mesh", default=None)
_CHANNEL_PADDING: contextvars.ContextVar[bool] = contextvars.ContextVar("xdistill_channel_padding", default=True)

GPU_PLATFORMS = ("gpu", "cuda", "rocm")


@contextlib.contextmanager
def target(platform: str | None, devices: int | None = None, mesh=None, channel_padding: bool = True):
    """Within the block, `choose` applies the form for `platform` ("cpu", "gpu", "cuda", "rocm",
    "tpu", ...: the CPU's form for "cpu", the other one for anything else); None: decided at
    lowering again. Per thread (a context variable), so a trace elsewhere is not affected.

    JAX's trace caches do not see it: a function jitted once and traced outside the block
    keeps that trace inside it. Enter the block inside the function that is traced, as the
    train and eval steps do (their bodies are fresh closures per step built).

    `devices`: how many devices the batch is sharded over (`batch_devices`); None: unknown.
    `mesh`: the step's `jax.sharding.Mesh`, the batch sharded over all its axes (the train step's
    1-D "data" mesh); it gives `devices` (its size) and `data_mesh`.
    `channel_padding`: whether 16-bit convolutions on a GPU get their channels padded for the
    tensor cores (`channel_padding()`; the config's `model.gpu_channel_padding`)."""
    if mesh is not None:
        if devices not in (None, mesh.size):
            raise ValueError(f"target: devices={devices} but the mesh has {mesh.size}")
        devices = mesh.size
    variables = (_TARGET, _DEVICES, _MESH, _CHANNEL_PADDING)
    tokens = [var.set(value) for var, value in zip(variables, (platform, devices, mesh, bool(channel_padding)))]
    try:
        yield
    finally:
        for var, token in zip(variables[::-1], tokens[::-1]):
            var.reset(token)


def batch_devices() -> int | None:
    """The number of devices the batch of the step being traced is sharded over (`target`'s
    `devices`); None outside a `target` block or where it was not given."""
    return _DEVICES.get()


def data_mesh():
    """The mesh of the step being traced (`target`'s `mesh`) when it has more than one device,
    else None (one device, or no mesh given): for a piece that computes each device's share of
    the batch explicitly (`jax.shard_map` over all the mesh's axes)."""
    mesh = _MESH.get()
    return mesh if mesh is not None and mesh.size > 1 else None


def channel_padding() -> bool:
    """`target`'s `channel_padding` (True outside a `target` block): whether `models.conv.Conv`
    pads a 16-bit convolution's channels for a GPU's tensor cores (its GPU form)."""
    return _CHANNEL_PADDING.get()


def choose(*args, cpu: Callable, default: Callable, gpu: Callable | None = None,
           tpu: Callable | None = None):
    """cpu(*args), gpu(*args) (CUDA or ROCm; `default` where not given), tpu(*args) (`default`
    where not given) or default(*args), for the platform of `target`, else at lowering time."""
    platform = _TARGET.get()
    if platform is None:
        per_platform = {} if gpu is None else {"cuda": gpu, "rocm": gpu}
        if tpu is not None:
            per_platform["tpu"] = tpu
        return jax.lax.platform_dependent(*args, cpu=cpu, default=default, **per_platform)
    if platform == "cpu":
        return cpu(*args)
    if gpu is not None and platform in GPU_PLATFORMS:
        return gpu(*args)
    if tpu is not None and platform == "tpu":
        return tpu(*args)
    return default(*args)
