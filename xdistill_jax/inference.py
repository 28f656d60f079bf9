"""Trained networks for inference: restore them, and run the depth / pose nets in jitted batches.

Where the networks come from:
- `load_workdir_model(workdir, step=None)`: a training workdir, from its `config.json` and orbax
  `checkpoints/<step>/` alone (no config flag). The train state is restored whole (its tree is
  built from the saved config) and the depth and pose variables are taken out of it.
- `load_monodepth2_model(folder)`: a released Monodepth2 PyTorch folder, via `convert.load_monodepth2`
  (train size from encoder.pth; Monodepth2's min/max depth 0.1 / 100).

How they run (`DepthPredictor`): images are uint8 (B,H,W,3) at the training size, divided by 255
in float32 (as the train step does), the depth net runs in eval mode (BatchNorm running stats)
on a batch sharded over the local devices, and the scale-0 sigmoid disparity is mapped to the
*scaled* disparity `disp_to_depth(disp, min_depth, max_depth)[0]`, which is what Monodepth2's
evaluation scores. Every call runs a full batch of `batch_size` images (the last one padded with
zeros and its padding dropped), so one compiled program serves a whole split and every image is
counted exactly once.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import functools
import pathlib
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xdistill_jax import geometry

MONODEPTH2_DEPTH_RANGE = (0.1, 100.0)


class ModelLoadError(ValueError):
    """A workdir or model folder cannot give the networks; the message says why and what exists."""


@dataclasses.dataclass
class DepthModel:
    """Networks and variables for inference, with the image size and depth range they were trained at."""

    depth_net: Any
    depth_variables: dict
    pose_net: Any | None
    pose_variables: dict | None
    height: int
    width: int
    min_depth: float
    max_depth: float
    step: int | None  # checkpoint step (None for converted weights)
    source: str       # workdir or model folder
    # Monodepth2 weights: encoder.pth's `use_stereo` (trained with stereo pairs, so metric depth
    # at x5.4); None where not known (this project's runs train on monocular triplets)
    use_stereo: bool | None = None


def protocol_warning(model: DepthModel, stereo: bool) -> str | None:
    """A warning where the evaluation protocol asked does not fit how Monodepth2 weights were
    trained (Monodepth2's evaluate_depth makes the user choose --eval_mono or --eval_stereo);
    None where it fits or is not known."""
    if model.use_stereo is None or model.use_stereo == stereo:
        return None
    if model.use_stereo:
        return (f"warning: {model.source} was trained with stereo pairs (encoder.pth: use_stereo=True), "
                "which Monodepth2 evaluates with --eval_stereo (here --stereo: depth x 5.4, no median "
                "scaling); evaluating with per-image median scaling as asked")
    return (f"warning: {model.source} was trained on monocular video (encoder.pth: use_stereo=False): its "
            "depth has no metric scale, so --stereo's fixed x 5.4 does not fit it (Monodepth2 evaluates "
            "such weights with --eval_mono, here the default)")


def checkpoint_steps(workdir) -> list[int]:
    """Steps with a complete checkpoint in `workdir/checkpoints` (orbax renames finished saves)."""
    from xdistill_jax.checkpoints import complete_steps

    return complete_steps(pathlib.Path(workdir) / "checkpoints")


def load_workdir_model(workdir, step: int | None = None) -> DepthModel:
    """Depth and pose networks of a training workdir at `step` (default: the latest checkpoint).

    The networks compute in float32 whatever `model.dtype` trained them: the checkpoint's weights
    are float32 (a bf16 run keeps float32 master weights), and in bf16 the disparity's logit
    would come out of a bf16 convolution, quantised (at a far pixel's logit of -4.6, steps of
    2^-5: 3 % of the disparity; 208 distinct disparities of 3,072 pixels where float32 gives
    3,056). Validation while training runs the training dtype.

    Raises ModelLoadError naming what is missing: no config.json, no checkpoints, or a step
    that does not exist (listing the ones that do).
    """
    from xdistill_jax import config_utils, train
    from xdistill_jax.checkpoints import Checkpointer
    from xdistill_jax.objective import Networks

    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise ModelLoadError(f"--workdir {workdir}: not a directory")
    try:
        config = config_utils.load_config(workdir)
    except config_utils.ConfigError as e:
        raise ModelLoadError(str(e)) from None
    steps = checkpoint_steps(workdir)
    if not steps:
        raise ModelLoadError(f"workdir {workdir} has no checkpoints (nothing under {workdir / 'checkpoints'}); "
                             "train first, or pass a workdir that holds a finished checkpoint")
    if step is not None and step not in steps:
        raise ModelLoadError(f"workdir {workdir} has no checkpoint at step {step}; "
                             f"available steps: {', '.join(map(str, steps))}")
    config = copy.deepcopy(config)
    config.model.dtype = "float32"  # the docstring: inference in the weights' own precision
    nets = Networks.from_config(config)
    # The optimiser only shapes the restore target (Adam moments, step count); its schedule is
    # irrelevant here, so steps_per_epoch=1.
    tx = train.make_optimizer(config, 1)
    mesh = Mesh(np.asarray(jax.local_devices()[:1]), ("data",))
    abstract, _ = train.abstract_train_state(nets, tx, mesh)
    ckpt = Checkpointer(workdir / "checkpoints", keep=max(len(steps), 1), async_save=False)
    try:
        # no step asked for: the latest that restores, as training resumes (a damaged latest
        # checkpoint is skipped with a warning naming it and the one used)
        state, _, restored_step = ckpt.restore(abstract, step=step)
    finally:
        ckpt.close()
    to_np = functools.partial(jax.tree.map, np.asarray)
    depth_vars = to_np({"params": state.params["depth"], "batch_stats": state.batch_stats["depth"]})
    pose_vars = to_np({"params": state.params["pose"], "batch_stats": state.batch_stats["pose"]})
    return DepthModel(nets.depth, depth_vars, nets.pose, pose_vars, int(config.data.height),
                      int(config.data.width), float(config.loss.min_depth), float(config.loss.max_depth),
                      int(restored_step), str(workdir))


def load_monodepth2_model(folder) -> DepthModel:
    """A Monodepth2 model folder (encoder.pth, depth.pth [, pose_encoder.pth, pose.pth]; needs torch)
    or one `xdistill convert-weights --monodepth2` wrote (meta.json, depth.msgpack [, pose.msgpack];
    no torch) as a DepthModel. A folder holding both forms is read from its .pth files."""
    from xdistill_jax.convert import CONVERTED_META, load_converted_monodepth2, load_monodepth2
    from xdistill_jax.models.depth import DepthNet
    from xdistill_jax.models.pose import PoseNet

    folder = pathlib.Path(folder)
    if (not (folder / CONVERTED_META).exists() and not (folder / "encoder.pth").exists()
            and (folder / "depth.msgpack").exists()):
        raise ValueError(f"{folder} holds depth.msgpack but no {CONVERTED_META}, which `xdistill "
                         "convert-weights --monodepth2` writes last: an incomplete conversion (stopped or "
                         "failed while writing); convert the Monodepth2 folder again")
    if (folder / CONVERTED_META).is_file() and not (folder / "encoder.pth").exists():
        loaded = load_converted_monodepth2(folder)
    else:
        loaded = load_monodepth2(folder)
    n = loaded["num_layers"]
    pose = loaded["pose"]
    # Converted weights hold flax's HWIO kernels: the networks are built to read them as they are.
    depth_net, pose_net = DepthNet(num_layers=n, kernel_layout="HWIO"), PoseNet(num_layers=n, kernel_layout="HWIO")
    return DepthModel(depth_net, loaded["depth"], pose_net if pose else None, pose,
                      int(loaded["height"]), int(loaded["width"]), *MONODEPTH2_DEPTH_RANGE, None, str(folder),
                      loaded.get("use_stereo"))


def _inference_mesh() -> Mesh:
    return Mesh(np.asarray(jax.local_devices()), ("data",))


def padded_batch_size(batch_size: int, mesh: Mesh) -> int:
    """`batch_size` rounded up to a multiple of the mesh size (each device gets equal rows)."""
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be > 0, got {batch_size}")
    n = mesh.size
    return -(-batch_size // n) * n


class DepthPredictor:
    """Jitted scaled-disparity prediction for batches of uint8 images at the model's size.

    `predict(images (n,H,W,3) uint8, n <= batch_size) -> (n,H,W) scaled disparity` (float32;
    float64 with `post_process`, Monodepth2's flip averaging). Padding to `batch_size` happens here.
    """

    def __init__(self, model: DepthModel, batch_size: int = 16, post_process: bool = False,
                 mesh: Mesh | None = None):
        self.model = model
        self.mesh = mesh or _inference_mesh()
        self.batch_size = padded_batch_size(batch_size, self.mesh)
        self.post_process = post_process
        rep = NamedSharding(self.mesh, P())
        self._batch_sharding = NamedSharding(self.mesh, P("data"))
        self._variables = jax.device_put(model.depth_variables, rep)
        net, lo, hi = model.depth_net, model.min_depth, model.max_depth

        def scaled_disparity(variables, images):
            x = images.astype(jnp.float32) / 255.0
            if post_process:  # the image and its mirror in one batch, as Monodepth2 runs them
                x = jnp.concatenate([x, x[:, :, ::-1]], axis=0)
            disp = net.apply(variables, x, train=False)[0].astype(jnp.float32)
            return geometry.disp_to_depth(disp[..., 0], lo, hi)[0]

        self._fn = jax.jit(scaled_disparity, in_shardings=(rep, self._batch_sharding))

    def predict(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        n = images.shape[0]
        want = (self.model.height, self.model.width, 3)
        if images.ndim != 4 or images.shape[1:] != want or images.dtype != np.uint8:
            raise ValueError(f"images: expected uint8 (n,{want[0]},{want[1]},3), got {images.dtype} {images.shape}")
        if not 0 < n <= self.batch_size:
            raise ValueError(f"images: expected 1..{self.batch_size} images, got {n}")
        if n < self.batch_size:  # pad the last batch; the padding rows are dropped below
            images = np.concatenate([images, np.zeros((self.batch_size - n,) + want, np.uint8)])
        out = np.asarray(self._fn(self._variables, jax.device_put(images, self._batch_sharding)))
        if not self.post_process:
            return out[:n]
        from xdistill_jax.evaluation import post_process_disparity

        b = self.batch_size
        return post_process_disparity(out[:n], out[b:b + n])


class PosePredictor:
    """Jitted relative pose for image pairs: `predict(first, second) -> (n,4,4)` float64.

    The pose net sees [I_a, I_b] (earlier frame first) and its first transform is used without
    inversion, as Monodepth2's evaluate_pose does: T maps points of frame a into frame b.
    """

    def __init__(self, model: DepthModel, batch_size: int = 16, mesh: Mesh | None = None):
        if model.pose_net is None or model.pose_variables is None:
            raise ModelLoadError(f"{model.source}: has no pose network (a stereo-only model?)")
        self.model = model
        self.mesh = mesh or _inference_mesh()
        self.batch_size = padded_batch_size(batch_size, self.mesh)
        rep = NamedSharding(self.mesh, P())
        self._batch_sharding = NamedSharding(self.mesh, P("data"))
        self._variables = jax.device_put(model.pose_variables, rep)
        net = model.pose_net

        def relative_pose(variables, pairs):
            axisangle, translation = net.apply(variables, pairs.astype(jnp.float32) / 255.0, train=False)
            return geometry.pose_from_axisangle(axisangle.astype(jnp.float32), translation.astype(jnp.float32))

        self._fn = jax.jit(relative_pose, in_shardings=(rep, self._batch_sharding))

    def predict(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        pairs = np.concatenate([np.asarray(first), np.asarray(second)], axis=-1)
        n = pairs.shape[0]
        want = (self.model.height, self.model.width, 6)
        if pairs.shape[1:] != want or pairs.dtype != np.uint8 or not 0 < n <= self.batch_size:
            raise ValueError(f"pairs: expected 1..{self.batch_size} uint8 (n,{want[0]},{want[1]},6), "
                             f"got {pairs.dtype} {pairs.shape}")
        if n < self.batch_size:
            pairs = np.concatenate([pairs, np.zeros((self.batch_size - n,) + want, np.uint8)])
        out = self._fn(self._variables, jax.device_put(pairs, self._batch_sharding))
        return np.asarray(out, np.float64)[:n]


def exif_oriented(image, path):
    """`image` turned as its EXIF orientation tag says (PIL's `ImageOps.exif_transpose`). An EXIF
    block PIL cannot parse (it raises SyntaxError, struct.error, ...) raises ValueError naming
    `path`: a photo whose pixels decode may still carry one."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(image)
    except Exception as e:  # noqa: BLE001 - PIL's EXIF parser raises several types
        raise ValueError(f"cannot read the EXIF orientation of image {path}: {type(e).__name__}: {e} "
                         "(its pixels decode; save it again without the EXIF block, e.g. with PIL's "
                         "Image.save, which writes none unless asked)") from e


def load_resized(path, height: int, width: int, *,
                 exif_orientation: bool = False) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 (height,width,3) PIL-LANCZOS-resized RGB, original (h, w)) of an image file.

    `exif_orientation`: first turn the image as its EXIF orientation tag says, as viewers show it
    (`predict`: a phone's portrait photo is stored landscape). Off for evaluation, which reads the
    pixels as Monodepth2 does (KITTI and Make3D carry no such tag). A missing or undecodable file
    raises ValueError naming it.
    """
    from data_pipelines.kitti.triplets import load_rgb, resize_lanczos

    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    image = load_rgb(path)  # ValueError naming the file when it cannot be decoded
    if exif_orientation:
        image = exif_oriented(image, path)  # convert("RGB") keeps the EXIF block it reads
    size = (image.height, image.width)
    return np.asarray(resize_lanczos(image, height, width), np.uint8), size


def progress(iterable: Iterable, total: int, desc: str, enabled: bool = True):
    """tqdm when installed (it comes with tensorflow-datasets), else a plain pass-through."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with tfds
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="batch", file=sys.stderr)


def batched(items: Sequence, batch_size: int, load: Callable[[Any], Any], *, desc: str = "",
            show_progress: bool = True, threads: int = 4) -> Iterator[tuple[list, list]]:
    """Yield (items, loaded) per batch of `batch_size`, reading the next batch while one computes.

    `load(item)` runs in a small thread pool (PIL decodes without the GIL). The last batch is
    shorter; callers pad it (DepthPredictor does). Errors from `load` propagate unchanged.
    """
    chunks = [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    if not chunks:
        return
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        pending = pool.map(load, chunks[0])
        for i in progress(range(len(chunks)), len(chunks), desc, show_progress):
            loaded = list(pending)
            if i + 1 < len(chunks):
                pending = pool.map(load, chunks[i + 1])
            yield chunks[i], loaded
