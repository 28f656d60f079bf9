"""The train state, optimiser and the jitted data-parallel train step.

One `jax.jit` over a `Mesh(("data",))`: the global batch is sharded on "data", the state is
replicated (DESIGN.md: jit + NamedSharding rather than pmap). BatchNorm statistics are therefore
global-batch statistics, so the result does not depend on how many devices ran the step.

    mesh = make_mesh(config)
    nets = Networks.from_config(config)
    tx = make_optimizer(config, steps_per_epoch)
    state = create_train_state(nets, tx, mesh, rng)                     # jitted init, no eager init
    step = make_train_step(config, nets, tx, mesh)                      # jitted, donates the state
    state, metrics = step(state, batch, rng)                            # per-step key fold_in(rng, step)

The training loop compiles the step on a background thread while the state is initialised
(`xdistill_jax.background_compile`).

The training loop (`train_and_evaluate`) lives in `xdistill_jax.training_loop`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xdistill_jax import config_defaults, objective, platform_forms, threefry_cpu
from xdistill_jax.config_defaults import STATE_LAYOUTS
from xdistill_jax.models.conv import hwio_tree_to
from xdistill_jax.objective import Networks

# Initialise the networks at this size: all parameters are shape-independent (fully
# convolutional), and a small init traces and compiles faster than the training resolution.
_INIT_HW = (64, 64)


@flax.struct.dataclass
class TrainState:
    params: Any
    batch_stats: Any
    opt_state: Any
    step: jax.Array  # int32 scalar: optimiser steps taken


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """A 1-D ("data",) mesh over `config.mesh.num_devices` devices (-1 = all, every process)."""
    devices = jax.devices()
    n = config.mesh.num_devices
    if n > 0:
        if n > len(devices):
            from xdistill_jax.config_utils import ConfigError

            raise ConfigError(f"config.mesh.num_devices={n} but only {len(devices)} devices exist")
        devices = devices[:n]
    return Mesh(np.asarray(devices), ("data",))


def lr_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Step decay: lr x lr_decay_factor at each boundary (optimiser steps).

    Boundaries are `optim.lr_drop_steps` when given, else `optim.lr_drop_epochs` x
    steps_per_epoch. Optimiser step k (0-based) uses schedule(k), so with drop epoch 14 the
    first step of epoch 14 (the 15th epoch) is the first at the lower rate, as the original code.
    """
    o = config.optim
    if o.lr_drop_steps:
        boundaries = list(o.lr_drop_steps)
    else:
        boundaries = [int(e) * steps_per_epoch for e in o.lr_drop_epochs]
    return optax.piecewise_constant_schedule(o.lr, {int(b): o.lr_decay_factor for b in boundaries})


def describe_lr_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> str:
    """The learning rate and its drops within the run, as the log's first lines say it; steps
    counted from 1, as the log counts them (a boundary b is the b+1-th step's rate)."""
    o = config.optim
    if o.lr_drop_steps:
        source, boundaries = f"optim.lr_drop_steps={tuple(o.lr_drop_steps)}", list(o.lr_drop_steps)
    else:
        source = f"optim.lr_drop_epochs={tuple(o.lr_drop_epochs)} x {steps_per_epoch} steps per epoch"
        boundaries = [int(e) * steps_per_epoch for e in o.lr_drop_epochs]
    total = total_steps(config, steps_per_epoch)
    inside = [b for b in boundaries if b < total]
    if not boundaries:
        return f"learning rate {o.lr:g}, constant"
    if not inside:
        return f"learning rate {o.lr:g}, no drop within the {total} steps ({source}: from step {boundaries[0] + 1})"
    return (f"learning rate {o.lr:g}, x{o.lr_decay_factor:g} from step " + ", ".join(str(b + 1) for b in inside)
            + f" of {total} ({source})")


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam (torch defaults: no weight decay, no clipping) with the step schedule, over all params."""
    o = config.optim
    return optax.adam(lr_schedule(config, steps_per_epoch), b1=o.b1, b2=o.b2, eps=o.eps)


def epoch_steps(config: ml_collections.ConfigDict, num_examples: int) -> int:
    """Steps per epoch of a split of `num_examples`: `optim.steps_per_epoch` where set, else the
    full batches in it."""
    o = config.optim
    return int(o.steps_per_epoch) if o.steps_per_epoch > 0 else num_examples // o.batch_size


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    o = config.optim
    return int(o.num_steps) if o.num_steps > 0 else int(o.epochs) * steps_per_epoch


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
    """`tree`'s leaves as jax.Arrays replicated on `mesh`, on one process or several (a TPU pod's
    hosts, each passing the same values): numpy arrays, arrays on one local device and PRNG keys
    (placed through their key data). Leaves already replicated on `mesh` are kept as they are.

    `jax.device_put(x, replicated(mesh))` does this on one process, and on several for numpy and
    uncommitted arrays only: a key or an array committed to a local device is refused there
    ("device_put's second argument must be ... addressable devices").
    """
    sharding = replicated(mesh)

    def one(x):
        if isinstance(x, jax.Array):
            if x.sharding.is_equivalent_to(sharding, x.ndim):
                return x
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                wrap = functools.partial(jax.random.wrap_key_data, impl=jax.random.key_impl(x))
                return jax.jit(wrap, out_shardings=sharding)(one(jax.random.key_data(x)))
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)


def mesh_platform(mesh: Mesh) -> str:
    """The platform of the mesh's devices ("cpu", "gpu", "tpu"; compile-only devices too)."""
    return mesh.devices.flat[0].platform


def gpu_channel_padding(config: ml_collections.ConfigDict) -> bool:
    """`model.gpu_channel_padding` (True where a config.json predates it): 16-bit convolutions
    on a GPU with their channels padded for the tensor cores (`models.conv`)."""
    return bool(config.model.get("gpu_channel_padding", True))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def _init_fn(nets: Networks, tx: optax.GradientTransformation, rng):
    params, batch_stats = nets.init(rng, *_INIT_HW)
    return TrainState(params=params, batch_stats=batch_stats, opt_state=tx.init(params),
                      step=jnp.zeros((), jnp.int32))


def abstract_train_state(nets: Networks, tx, mesh: Mesh):
    """(ShapeDtypeStruct tree of the TrainState with replicated shardings, the sharding tree)."""
    abstract = jax.eval_shape(functools.partial(_init_fn, nets, tx), jax.random.key(0))
    rep = replicated(mesh)
    shardings = jax.tree.map(lambda _: rep, abstract)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


_THREEFRY_KERNEL = "jax_threefry_gpu_kernel_lowering"


def _threefry_kernel_state():
    """JAX's own setting object for the option, whose call is a per-thread context (None where
    this jax has no such object)."""
    try:
        from jax._src import config as jax_config
    except ImportError:
        return None
    state = getattr(jax_config, "threefry_gpu_kernel_lowering", None)
    return state if callable(state) else None


@contextlib.contextmanager
def threefry_kernel_lowering():
    """Inside the block, threefry random bits lower on GPU to jaxlib's one ThreeFry2x32 kernel
    instead of JAX's default there, the 20-round hash unrolled into the HLO.

    The same hash (rotations, key schedule and injections as JAX's), so the same bits; only
    cuda/rocm lowering reads the option, other platforms are untouched. For the parameter init:
    unrolled, its 36 threefry calls (ResNet-18 config) made the optimised init program 7.7 MB,
    and XLA's GPU compiler took 19.5-25.9 s on it against 3.4-3.8 s with the kernel (H100
    target compiled on a 2-core CPU VM, benchmarks/RESULTS.md): most of the issue's 30 s
    cold-start budget. The train step keeps the default: its tie-break noise fuses into the
    kernels that use it, while the kernel would write the bits out (+0.4 GB per step in the
    same census).

    The setting is the calling thread's only (JAX's per-thread context for the option), so the
    step compiling meanwhile on another thread (`background_compile`) keeps the default. With a
    jax that has no such context the global option is set for the block and restored; with one
    that has no such option at all, a no-op.
    """
    state = _threefry_kernel_state()
    if state is not None:
        with state(True):
            yield
        return
    if not hasattr(jax.config, _THREEFRY_KERNEL):
        yield
        return
    before = getattr(jax.config, _THREEFRY_KERNEL)
    jax.config.update(_THREEFRY_KERNEL, True)
    try:
        yield
    finally:
        jax.config.update(_THREEFRY_KERNEL, before)


def init_program(nets: Networks, tx, mesh: Mesh):
    """The jitted init, rng -> TrainState replicated on the mesh (lower it inside
    `threefry_kernel_lowering`, as `lower_init` does)."""
    # one sharding for the whole state (a pytree prefix): no abstract trace of the init needed
    return jax.jit(functools.partial(_init_fn, nets, tx), out_shardings=replicated(mesh))


def lower_init(nets: Networks, tx, mesh: Mesh, rng) -> jax.stages.Lowered:
    """The init program lowered for `rng` (its draws with `threefry_kernel_lowering` on a GPU,
    and unrolled on the CPU for a threefry key, `threefry_cpu.for_key`: the same bits, the quick
    demo's init compiled in 7.2 s instead of 12.6 s). Its `out_info` is the state's abstract
    tree, which the step can compile from (`background_compile.AheadStep`) before the init has
    compiled or run."""
    with threefry_kernel_lowering(), threefry_cpu.for_key(rng):
        return init_program(nets, tx, mesh).lower(rng)


def create_train_state(nets: Networks, tx, mesh: Mesh, rng, encoder_init: dict | None = None, *,
                       lowered: jax.stages.Lowered | None = None) -> TrainState:
    """Fresh state, initialised by one jitted call whose outputs are replicated on the mesh
    (its random draws lowered with `threefry_kernel_lowering`).

    encoder_init: optional {"depth": encoder variables, "pose": encoder variables} (numpy
    trees with "params" and "batch_stats", see `load_pretrained_encoders`) that replace the
    scratch encoder weights; shapes are checked leaf by leaf.
    lowered: `lower_init(nets, tx, mesh, rng)` when the caller has it already.
    """
    if lowered is None:
        lowered = lower_init(nets, tx, mesh, rng)
    state = lowered.compile()(rng)
    if encoder_init:
        params = dict(state.params)
        batch_stats = dict(state.batch_stats)
        for net, variables in encoder_init.items():
            params[net] = dict(params[net], encoder=_checked_replace(
                params[net]["encoder"], variables["params"], f"{net} encoder params"))
            if "batch_stats" in variables:
                batch_stats[net] = dict(batch_stats[net], encoder=_checked_replace(
                    batch_stats[net]["encoder"], variables["batch_stats"], f"{net} encoder batch_stats"))
        params = replicate(params, mesh)  # the loaded encoders (numpy) placed, the rest kept
        batch_stats = replicate(batch_stats, mesh)
        # Adam's moments are zeros either way; re-init keeps the tree identical.
        opt_state = jax.jit(tx.init, out_shardings=replicated(mesh))(params)
        state = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)
    return state


def _check_same_tree(target, source, what: str) -> None:
    """ValueError unless `source` has exactly `target`'s tree and shapes (target: arrays or
    ShapeDtypeStructs)."""
    t_leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    s_leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(source)[0]}
    if set(t_leaves) != set(s_leaves):
        missing, extra = sorted(set(t_leaves) - set(s_leaves)), sorted(set(s_leaves) - set(t_leaves))
        raise ValueError(f"pretrained {what}: {len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(extra)} unexpected (e.g. {extra[:3]})")
    for k, x in t_leaves.items():
        if tuple(np.shape(s_leaves[k])) != tuple(x.shape):
            raise ValueError(f"pretrained {what}{k}: shape {np.shape(s_leaves[k])}, model expects {x.shape}")


def _checked_replace(target, source, what: str):
    """`source` as arrays, after checking it has exactly `target`'s tree and shapes."""
    _check_same_tree(target, source, what)
    return jax.tree.map(lambda t, s: np.asarray(s, dtype=t.dtype), target, source)


def check_pretrained_encoders(state, encoder_init: dict | None) -> None:
    """Raise the ValueError `create_train_state` would for `encoder_init` (see there) against
    `state`, a TrainState of arrays or its abstract tree (`lower_init(...).out_info`): the
    training loop checks before the step starts compiling."""
    for net, variables in (encoder_init or {}).items():
        _check_same_tree(state.params[net]["encoder"], variables["params"], f"{net} encoder params")
        if "batch_stats" in variables:
            _check_same_tree(state.batch_stats[net]["encoder"], variables["batch_stats"],
                             f"{net} encoder batch_stats")


def load_pretrained_encoders(config: ml_collections.ConfigDict, platform: str | None = None) -> dict | None:
    """ImageNet encoder weights for both networks from `config.model.init` (a convert-weights msgpack).

    The msgpack holds one-image encoder variables. The pose encoder takes two images: its first
    conv is the ImageNet conv1 repeated along the input channels and divided by 2 (Monodepth2's
    ResNetMultiImageInput). The pose encoder is only initialised from it when it has the same
    depth (`model.pose_num_layers == model.num_layers`); otherwise it starts from scratch. The
    file's kernels are HWIO (flax's); they are returned in `objective.kernel_layout(config,
    platform)`, the networks' layout.
    """
    if config.model.init == "scratch":
        return None
    if config.model.init == config_defaults.INIT_IMAGENET:
        n = config.model.num_layers
        raise ValueError(
            f"'{config_defaults.INIT_IMAGENET}': this config starts both encoders from ImageNet weights, as "
            f"Monodepth2's default and the paper's figures do: convert torchvision's ResNet-{n} weights once "
            f"(`xdistill convert-weights --torchvision resnet{n}.pth --num-layers {n} --out resnet{n}_imagenet.msgpack`) "
            f"and pass --config.model.init=resnet{n}_imagenet.msgpack, or --config.model.init=scratch to train "
            "from random weights")
    from xdistill_jax.convert import load_variables

    variables = load_variables(config.model.init)
    if "params" not in variables:
        raise ValueError(f"{config.model.init}: expected encoder variables with a 'params' entry, "
                         f"got keys {sorted(variables)}")
    out = {"depth": variables}
    if config.model.pose_num_layers == config.model.num_layers:
        params = jax.tree.map(np.asarray, variables["params"])
        conv1 = _find_first_conv(params)
        if conv1 is not None:
            parent, key = conv1
            kernel = parent[key]
            parent[key] = np.concatenate([kernel, kernel], axis=2) / 2.0
        out["pose"] = {"params": params, "batch_stats": variables.get("batch_stats", {})}
    else:  # Monodepth2 gives both encoders one depth, both from ImageNet: say that this run does not
        logging.getLogger(__name__).warning(
            "the pose encoder (ResNet-%d, model.pose_num_layers) starts from scratch: model.init holds "
            "ResNet-%d weights (model.num_layers); Monodepth2 initialises both from ImageNet",
            config.model.pose_num_layers, config.model.num_layers)
    # The file holds flax's HWIO kernels; the networks store theirs in model.kernel_layout.
    layout = objective.kernel_layout(config, platform)
    return {net: {**v, "params": hwio_tree_to(layout, v["params"])} for net, v in out.items()}


def _find_first_conv(params):
    """(dict, key) of the stem conv kernel: the only 4-D leaf with 3 input channels."""
    found = []

    def walk(node):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v)
            elif np.ndim(v) == 4 and np.shape(v)[2] == 3:
                found.append((node, k))

    walk(params)
    if len(found) != 1:
        raise ValueError(f"pretrained encoder: expected one 3-input-channel stem conv, found {len(found)}")
    return found[0]


def _with_schedule_counts(opt_state, advanced):
    """`opt_state` with each learning-rate schedule's state taken from `advanced`."""
    def is_schedule(x):
        return isinstance(x, optax.ScaleByScheduleState)

    return jax.tree.map(lambda kept, moved: moved if is_schedule(kept) else kept, opt_state, advanced,
                        is_leaf=is_schedule)


def make_train_step(config: ml_collections.ConfigDict, nets: Networks, tx, mesh: Mesh,
                    *, jit: bool = True, state_layout: str = "default") -> Callable:
    """`(state, batch, rng) -> (state, metrics)`; jitted over `mesh` with the state donated.

    Metrics are float32 scalars (replicated): the loss terms and grad_norm. With
    `config.run.on_nonfinite == "skip"`, a step whose loss or gradients are not finite leaves
    the state unchanged except `step` (metric "skipped" = 1).

    state_layout "auto" lets XLA choose the device layout of every state leaf (in and out,
    `Layout.AUTO`): on a GPU it stores convolution kernels and their Adam moments in cuDNN's
    filter order, so the update needs no transpose and no output copies (benchmarks/RESULTS.md).
    Such a step must be lowered and compiled ahead of time, and the state put into the
    compiled step's `input_formats[0][0]` before the first call:
    `background_compile.AheadStep(..., relayout=True)` does both (the training loop with
    `run.state_layout="auto"`; `xdistill bench --state-layout auto`).
    """
    if state_layout not in STATE_LAYOUTS:
        raise ValueError(f"state_layout must be one of {STATE_LAYOUTS}, got {state_layout!r}")
    skip_nonfinite = config.run.on_nonfinite == "skip"
    loss = functools.partial(objective.loss_fn, nets, config)
    platform = mesh_platform(mesh)
    channel_padding = gpu_channel_padding(config)

    def train_step(state: TrainState, batch, rng):
        # each piece's form for the mesh's platform and device count, chosen in Python
        with platform_forms.target(platform, mesh=mesh, channel_padding=channel_padding):
            return _train_step(state, batch, rng)

    def _train_step(state: TrainState, batch, rng):
        step_rng = jax.random.fold_in(rng, state.step)
        grad_fn = jax.value_and_grad(loss, has_aux=True)
        (total, (batch_stats, metrics)), grads = grad_fn(state.params, state.batch_stats, batch,
                                                         step_rng, True, state.step)
        with jax.named_scope("optimizer"):  # a label for profiles (profile_summary.py)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        out = {k: v for k, v in metrics.items() if jnp.ndim(v) == 0}
        out["grad_norm"] = grad_norm
        new = TrainState(params=params, batch_stats=batch_stats, opt_state=opt_state, step=state.step + 1)
        if skip_nonfinite:
            ok = jnp.isfinite(total) & jnp.isfinite(out["grad_norm"])
            new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state.replace(step=state.step + 1))
            # torch skips optimizer.step() (Adam's moments and bias-correction count stay), but
            # its LR scheduler follows the epochs: the schedule's count moves on, so the rate
            # still drops at its step (reverted with the rest, it lagged one step per skip)
            new = new.replace(opt_state=_with_schedule_counts(new.opt_state, opt_state))
            out["skipped"] = 1.0 - ok.astype(jnp.float32)
        return new, out

    if not jit:
        return train_step
    if state_layout == "auto":
        from jax.experimental.layout import Format, Layout

        _, state_shardings = abstract_train_state(nets, tx, mesh)
        state_shardings = jax.tree.map(lambda s: Format(Layout.AUTO, s), state_shardings)
    else:  # one sharding for the whole state (a pytree prefix): no abstract trace of the init
        state_shardings = replicated(mesh)
    return jax.jit(train_step,
                   in_shardings=(state_shardings, batch_sharding(mesh), replicated(mesh)),
                   out_shardings=(state_shardings, replicated(mesh)),
                   donate_argnums=(0,))


def make_eval_step(config: ml_collections.ConfigDict, nets: Networks, mesh: Mesh) -> Callable:
    """`(params, batch_stats, batch, rng) -> metrics` in eval mode (BN running stats).

    metrics holds the loss scalars plus "disp" (B,H,W,1) (and "translator_logits"), sharded
    on the batch.
    """
    platform = mesh_platform(mesh)
    channel_padding = gpu_channel_padding(config)

    def eval_step(params, batch_stats, batch, rng):
        with platform_forms.target(platform, mesh=mesh, channel_padding=channel_padding):
            _, (_, metrics) = objective.loss_fn(nets, config, params, batch_stats, batch, rng, train=False)
        return metrics

    return jax.jit(eval_step, in_shardings=(replicated(mesh), replicated(mesh), batch_sharding(mesh),
                                            replicated(mesh)))


def global_batch(batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch -> global jax.Arrays sharded on "data".

    Each process passes its own slice (global batch / process count rows); on one process this
    is a plain sharded device_put.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, **kwargs) -> int:
    """The training loop; see `xdistill_jax.training_loop.train_and_evaluate`."""
    from xdistill_jax import training_loop

    return training_loop.train_and_evaluate(config, workdir, **kwargs)
