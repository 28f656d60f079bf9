"""The X-Distill training objective: Monodepth2's photometric loss + lambda x distillation.

    total = monodepth2_loss(...) + distill.weight * distillation_loss(translator(disp), teacher)

With `distill.weight == 0` this is exactly Monodepth2: the translator is neither built nor run
and the batch needs no `teacher` entry.

Optional warm-up (`distill.depth_grad_start` / `depth_grad_ramp`, both 0 = the paper): the
translator always learns from the full distillation loss, but the part of its gradient that
flows back into the depth net is scaled by `depth_grad_factor(step)` (0, then a linear ramp to
1). The loss values are unchanged; only where the gradient goes. It exists for runs that start
from scratch (the CPU demo), where distillation from step 0 pulls the young depth net into
disparity bands before the photometric loss has shaped it (configs/demo.py has the numbers).

Networks and their inputs follow the original code (reference §1, §3.3):
- the depth net runs once, on the colour-augmented target frame `color_aug[:, 1]`;
- the pose net runs once PER SOURCE PAIR, batch B each, frames in temporal order:
  (I-1, I0) for f = -1 (its transform is inverted: the net predicts -1 -> 0, we need 0 -> -1)
  and (I0, I+1) for f = +1. Both calls are one call on the 2B pairs (`predict_poses`, a form
  for one device and one for a sharded batch): each pair still gets its own BatchNorm
  statistics over its B examples (one plain 2B batch would change them), and the running
  statistics are updated as by two calls in a row, as in torch.
- all losses use the un-augmented `color` frames; uint8 is divided by 255 in float32.

Parameter and state layout (dicts, so optax and orbax see plain pytrees):
  params      = {"depth": ..., "pose": ..., ["translator": ...]}
  batch_stats = {"depth": ..., "pose": ...}
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from xdistill_jax import distillation, geometry, losses, platform_forms, semantics
from xdistill_jax.models.resnet import BN_MOMENTUM

FRAMES = (-1, 0, 1)  # order of the frame axis in batch["color"] / ["color_aug"]
SCALES = (0, 1, 2, 3)


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def kernel_layout(config: ml_collections.ConfigDict, platform: str | None = None) -> str:
    """The layout the networks store their conv kernels in: `model.kernel_layout`, "auto" read for
    `platform` (default: JAX's default backend's; `train.mesh_platform` of the mesh they run on,
    for a compile-only mesh of another platform; `config_defaults.kernel_layout_for`)."""
    from xdistill_jax import config_defaults

    return config_defaults.kernel_layout_for(config.model.kernel_layout, platform or jax.default_backend())


@dataclasses.dataclass(frozen=True)
class Networks:
    """The Flax modules a config describes (translator None when distillation is off)."""

    depth: nn.Module
    pose: nn.Module
    translator: nn.Module | None

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, platform: str | None = None) -> "Networks":
        """The config's networks, their conv kernels in `kernel_layout(config, platform)`."""
        from xdistill_jax.models.depth import DepthNet
        from xdistill_jax.models.pose import PoseNet
        from xdistill_jax.models.translator import Translator

        dtype = _dtype(config.model.dtype)
        layout = kernel_layout(config, platform)
        translator = None
        if config.distill.weight > 0:
            num_groups = semantics.get_grouping(config.distill.grouping).num_groups
            translator = Translator(num_groups=num_groups, input_scale=config.distill.scale,
                                    dtype=dtype, kernel_layout=layout, **config.distill.translator.to_dict())
        return cls(depth=DepthNet(num_layers=config.model.num_layers, dtype=dtype, kernel_layout=layout),
                   pose=PoseNet(num_layers=config.model.pose_num_layers, dtype=dtype, kernel_layout=layout),
                   translator=translator)

    def init(self, rng, height: int, width: int, batch: int = 1):
        """Fresh (params, batch_stats) for images of (height, width). Trace with eval_shape/jit."""
        k_depth, k_pose, k_tr = jax.random.split(rng, 3)
        image = jnp.zeros((batch, height, width, 3), jnp.float32)
        depth_vars = self.depth.init(k_depth, image, train=False)
        pose_vars = self.pose.init(k_pose, jnp.zeros((batch, height, width, 6), jnp.float32), train=False)
        params = {"depth": depth_vars["params"], "pose": pose_vars["params"]}
        batch_stats = {"depth": depth_vars.get("batch_stats", {}), "pose": pose_vars.get("batch_stats", {})}
        if self.translator is not None:
            disps = self.depth.apply(depth_vars, image, train=False)
            params["translator"] = self.translator.init(k_tr, disps)["params"]
        return params, batch_stats


def _to_unit(x):
    """uint8 images -> float32 in [0,1] (torchvision ToTensor); floats pass through as float32."""
    if jnp.issubdtype(x.dtype, jnp.integer):
        return x.astype(jnp.float32) / 255.0
    return x.astype(jnp.float32)


def sharding_invariant_key(rng):
    """A threefry key derived from `rng` (any PRNG impl) for per-pixel random draws.

    The "rbg" PRNG (cheap on CPU/TPU) draws different numbers for the same key when the output
    is sharded differently, which would make the tie-break noise - and through the auto-mask
    minimum, the gradients - depend on the device count. Threefry draws are invariant to
    sharding (`jax_threefry_partitionable`, the default since jax 0.5).
    """
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(rng)
        if "threefry" in str(impl):
            return rng
        data = jax.random.key_data(rng).reshape(-1)
    else:  # a raw uint32 key array
        data = jnp.asarray(rng).reshape(-1)
    key = jax.random.key(0, impl="threefry2x32")
    for i in range(data.shape[0]):
        key = jax.random.fold_in(key, data[i])
    return key


def _apply_bn(module, params, batch_stats, x, train: bool):
    """Apply a BatchNorm-carrying module; returns (output, new batch_stats)."""
    variables = {"params": params, "batch_stats": batch_stats}
    if train:
        out, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
        return out, updates["batch_stats"]
    return module.apply(variables, x, train=False), batch_stats


def predict_poses(nets: Networks, params, batch_stats, color_aug, train: bool):
    """cam_T_cam {-1, +1} (B,4,4), from the pose net on both source pairs.

    color_aug: (B,3,H,W,3) float32 in [0,1], frames (-1, 0, +1).
    Returns (cam_T_cam, new pose batch_stats, {frame: (axisangle, translation)}).

    The two pairs go through one call (one set of convolutions over 2B images, traced and
    compiled once) with the values of two separate calls: BatchNorm takes its mean and variance
    over one pair's B examples, and the running statistics are updated once per pair in order,
    r1 = m r0 + (1-m) s1, then r2 = m r1 + (1-m) s2, as torch's two calls in a row. Two forms:
    - the batch on one device (`platform_forms.batch_devices() == 1`): a `vmap` over a leading
      pair axis. Each pair's call starts from zero running statistics and returns its own
      term (1-m) s_i; r2 is assembled from them in that order. The running means are passed
      apart ("bn_shift", `TorchBatchNorm`) as the GPU/TPU form's variance shift.
    - otherwise (a batch sharded over devices, or unknown): the pairs interleaved example-major,
      row 2b + i = example b's pair i, and the pose net's BatchNorms take `batch_groups=2`
      (`TorchBatchNorm`). Each device then runs the pose net on its own examples. The vmap's
      convolutions merge the pair axis in front of the sharded batch axis, which XLA's
      partitioner could only do by gathering the whole batch onto every device: every device
      ran the pose net on the global batch (until 2026-12-05). On one device the vmap is kept:
      its BatchNorm reductions are XLA:GPU's plain ones, where statistics per interleaved pair
      move 0.8 GB more per 12 images in the bf16 step on the H200 target (benchmarks/RESULTS.md),
      and the CPU's step stays the one the demo's figures were measured with.
    """
    b = color_aug.shape[0]
    if platform_forms.batch_devices() == 1:
        prev, cur, nxt = color_aug[:, 0], color_aug[:, 1], color_aug[:, 2]
        pairs = jnp.stack([jnp.concatenate((prev, cur), axis=-1), jnp.concatenate((cur, nxt), axis=-1)])
        if train:
            zeros = jax.tree.map(jnp.zeros_like, batch_stats)

            def one_pair(x):
                # from zero running statistics, so that the update returns (1-m) s_i alone; the
                # one-pass variance of the GPU/TPU form still takes the running mean as its shift
                # ("bn_shift"): shifted by 0 it cancels catastrophically where an activation's
                # mean is far larger than its spread (until 2026-12-07)
                out, updates = nets.pose.apply({"params": params, "batch_stats": zeros, "bn_shift": batch_stats},
                                               x, train=True, mutable=["batch_stats"])
                return out, updates["batch_stats"]

            (axisangles, translations), terms = jax.vmap(one_pair)(pairs)
            m = BN_MOMENTUM
            stats = jax.tree.map(lambda r0, t: m * (m * r0 + t[0]) + t[1], batch_stats, terms)
        else:
            axisangles, translations = jax.vmap(
                lambda x: nets.pose.apply({"params": params, "batch_stats": batch_stats}, x, train=False))(pairs)
            stats = batch_stats
        by_pair = [(axisangles[i], translations[i]) for i in range(2)]
    else:
        # (B, 2, H, W, 6): pair 0 = frames (-1, 0), pair 1 = frames (0, +1), earlier frame first
        pairs = jnp.concatenate((color_aug[:, :2], color_aug[:, 1:]), axis=-1)
        pairs = pairs.reshape((2 * b,) + pairs.shape[2:])
        pose = nets.pose.clone(batch_groups=2)
        variables = {"params": params, "batch_stats": batch_stats}
        if train:
            (axisangles, translations), updates = pose.apply(variables, pairs, train=True, mutable=["batch_stats"])
            stats = updates["batch_stats"]
        else:
            axisangles, translations = pose.apply(variables, pairs, train=False)
            stats = batch_stats
        axisangles, translations = axisangles.reshape(b, 2, -1), translations.reshape(b, 2, -1)
        by_pair = [(axisangles[:, i], translations[:, i]) for i in range(2)]
    cam_T_cam, raw = {}, {}
    for (axisangle, translation), f in zip(by_pair, (-1, 1)):
        axisangle, translation = axisangle.astype(jnp.float32), translation.astype(jnp.float32)
        raw[f] = (axisangle, translation)
        cam_T_cam[f] = geometry.pose_from_axisangle(axisangle, translation, invert=(f < 0))
    return cam_T_cam, stats, raw


def depth_grad_factor(distill: ml_collections.ConfigDict, step):
    """Fraction of the distillation gradient that reaches the depth net at `step` (float32).

    0 before `distill.depth_grad_start`, then linear to 1 over `distill.depth_grad_ramp` steps
    (1 at once when the ramp is 0). The step is the state's step before the update (0-based).
    """
    start, ramp = distill.depth_grad_start, distill.depth_grad_ramp
    step = jnp.asarray(step, jnp.float32)
    if ramp == 0:
        return (step >= start).astype(jnp.float32)
    return jnp.clip((step - start + 1.0) / ramp, 0.0, 1.0)


def _scale_gradient(x, factor):
    """`x` in the forward pass; `factor * dL/dx` in the backward pass."""
    frozen = jax.lax.stop_gradient(x)
    return frozen + factor * (x - frozen)


def loss_fn(nets: Networks, config: ml_collections.ConfigDict, params, batch_stats, batch, rng,
            train: bool = True, step=None):
    """The X-Distill loss for one global batch.

    Args:
      nets: `Networks.from_config(config)`.
      params / batch_stats: see the module docstring.
      batch: the loader's dict (contracts.md): `color`, `color_aug` (B,3,H,W,3) uint8,
        `color_s1..3` (B,3,h,w,3) or target frame only (B,1,h,w,3), `K`, `inv_K`
        (B,4,4,4), and `teacher` (B,h,w,G) when distill.weight > 0.
      rng: key for the tie-break noise of the auto-mask minimum (drawn with a threefry key
        derived from it, see `sharding_invariant_key`).
      train: BatchNorm in training mode (batch statistics, running stats updated).
      step: the training step (int or traced int32) for the distillation warm-up
        (`depth_grad_factor`); None (evaluation) or a config without warm-up = full gradient.
    Returns:
      (loss, (new_batch_stats, metrics)): float32 scalar; metrics is a dict of float32 scalars
      plus "disp" (the scale-0 disparity, for images) and, with distillation, "translator_logits".
    """
    lo, ds = config.loss, config.distill
    color = _to_unit(batch["color"])
    color_aug = _to_unit(batch["color_aug"])
    if color.ndim != 5 or color.shape[1] != 3:
        raise ValueError(f"batch['color'] must be (B,3,H,W,3), got {color.shape}")

    # The named scopes label the ops of each part in profiles (profile_summary.py); no effect on values.
    with jax.named_scope("depth_net"):
        disps, depth_stats = _apply_bn(nets.depth, params["depth"], batch_stats["depth"], color_aug[:, 1], train)
        disps = {s: d.astype(jnp.float32) for s, d in disps.items()}
    with jax.named_scope("pose_net"):
        cam_T_cam, pose_stats, raw_poses = predict_poses(nets, params["pose"], batch_stats["pose"], color_aug, train)

    colors = {f: {0: color[:, i]} for i, f in enumerate(FRAMES)}
    for s in SCALES[1:]:
        # (B,3,h,w,3) all frames, or (B,1,h,w,3) the target frame only (the loader's
        # source_scales=False: all the loss reads unless loss.v1_multiscale is on)
        scaled = _to_unit(batch[f"color_s{s}"])
        frames = FRAMES if scaled.shape[1] == len(FRAMES) else (0,)
        if scaled.shape[1] != len(frames):
            raise ValueError(f"batch['color_s{s}'] must be (B,3,h,w,3) or (B,1,h,w,3), got {scaled.shape}")
        for i, f in enumerate(frames):
            colors[f][s] = scaled[:, i]
    K = batch["K"].astype(jnp.float32)
    inv_K = batch["inv_K"].astype(jnp.float32)
    Ks = {s: K[:, s] for s in SCALES}
    inv_Ks = {s: inv_K[:, s] for s in SCALES}

    with jax.named_scope("photometric"):
        photometric, aux = losses.monodepth2_loss(
            colors, disps, cam_T_cam, Ks, inv_Ks, rng=sharding_invariant_key(rng), automask=lo.automask,
            avg_reprojection=lo.avg_reprojection, v1_multiscale=lo.v1_multiscale, no_ssim=lo.no_ssim,
            smoothness_weight=lo.smoothness_weight, min_depth=lo.min_depth, max_depth=lo.max_depth,
            align_corners=lo.align_corners)

    metrics: dict[str, Any] = {"photometric_loss": photometric}
    for key, value in aux.items():
        if jnp.ndim(value) == 0:
            metrics[f"photometric/{key}"] = jnp.asarray(value, jnp.float32)
    metrics["translation_norm"] = jnp.mean(jnp.linalg.norm(raw_poses[1][1], axis=-1))
    metrics["disp_mean"] = jnp.mean(disps[0])
    metrics["disp"] = disps[0]
    total = photometric
    # Validation without a val teacher store (config.data.val_teacher_dir ""): the photometric
    # loss alone, as config_defaults documents. Training always needs the teacher.
    if nets.translator is not None and ("teacher" in batch or train):
        if "teacher" not in batch:
            raise ValueError("distill.weight > 0 but the training batch has no 'teacher' logits "
                             "(set config.data.teacher_dir, or --config.distill.weight=0)")
        from xdistill_jax.models.translator import translate

        translator_in = disps
        if step is not None and (ds.depth_grad_start > 0 or ds.depth_grad_ramp > 0):
            factor = depth_grad_factor(ds, step)
            translator_in = {s: _scale_gradient(d, factor) for s, d in disps.items()}
            metrics["distill/depth_grad_factor"] = factor
        with jax.named_scope("translator"):
            logits = translate(params["translator"], translator_in, stop_depth_grad=ds.stop_gradient,
                               module=nets.translator)
        with jax.named_scope("distill"):
            distill = distillation.distillation_loss(logits, batch["teacher"], mode=ds.mode,
                                                     temperature=ds.temperature)
        total = total + jnp.float32(ds.weight) * distill
        metrics["distill_loss"] = distill
        metrics["translator_logits"] = logits
    metrics["loss"] = total
    return total, ({"depth": depth_stats, "pose": pose_stats}, metrics)
