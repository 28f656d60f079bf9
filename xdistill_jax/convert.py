"""PyTorch -> Flax weight conversion (torchvision ResNets, Monodepth2 model folders) and msgpack I/O.

Layouts: torch conv weights are OIHW, the converted kernels HWIO (flax's; the networks are
built with ``kernel_layout="HWIO"`` to read them as they are, and `models.conv.hwio_tree_to`
puts them into a network that stores OHWI, the training layout on a GPU or TPU); BatchNorm ``weight``/``bias``/
``running_mean``/``running_var`` become params ``scale``/``bias`` and batch_stats ``mean``/``var``.
The expected torch names and shapes are derived from the Flax modules themselves
(`jax.eval_shape` of their init), so a converted tree has exactly the structure the modules
create. Every name and shape is checked; one ValueError lists all missing keys, unexpected keys
and shape mismatches, naming the file.

Monodepth2 folder (as released, and as its trainer saves): ``encoder.pth`` (``encoder.<torchvision
name>`` + ``height``, ``width`` and optionally ``use_stereo``), ``depth.pth`` (``decoder.<k>.conv.conv.*``
for the ten ConvBlocks, upconv (4,0), (4,1), (3,0) ... (0,1), then ``decoder.<10+n>.conv.*`` for the
disparity convs of scales 0..3), and optionally ``pose_encoder.pth`` (``encoder.*``, 6-channel conv1)
and ``pose.pth`` (``net.0`` squeeze, ``net.1``/``net.2`` 3x3 convs, ``net.3`` 1x1 to 12).
The ``fc.*`` classifier and ``num_batches_tracked`` entries are ignored.

torch is imported only inside the functions that read ``.pth`` files.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from xdistill_jax.models.depth import DepthNet
from xdistill_jax.models.pose import PoseNet
from xdistill_jax.models.resnet import LAYOUTS, Bottleneck, ResNetEncoder

# Entries of a Monodepth2 encoder.pth that are not weights (the trainer stores the training size).
MONODEPTH2_META_KEYS = ("height", "width", "use_stereo")
_DECODER_UPCONVS = [(i, j) for i in range(4, -1, -1) for j in (0, 1)]  # Monodepth2's ModuleList order


# ----------------------------------------------------------------------------------------------
# name mapping Flax path -> torch key


def _resnet_torch_key(path: tuple[str, ...]) -> str:
    """("params", "layer2_0", "downsample_conv", "kernel") -> "layer2.0.downsample.0.weight"."""
    collection, *modules, leaf = path
    parts = []
    for m in modules:
        if m.startswith("layer") and "_" in m:
            parts.append(m.replace("_", "."))
        elif m == "downsample_conv":
            parts.append("downsample.0")
        elif m == "downsample_bn":
            parts.append("downsample.1")
        else:
            parts.append(m)
    leaf_name = {
        ("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
        ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var",
    }[(collection, leaf)]
    return ".".join(parts + [leaf_name])


def _depth_decoder_torch_key(path: tuple[str, ...], scales=(0, 1, 2, 3)) -> str:
    """("params", "upconv_3_1", "kernel") -> "decoder.3.conv.conv.weight"; dispconv_s -> decoder.<10+n>.conv.*."""
    _, module, leaf = path
    leaf_name = {"kernel": "weight", "bias": "bias"}[leaf]
    kind, *idx = module.split("_")
    if kind == "upconv":
        k = _DECODER_UPCONVS.index((int(idx[0]), int(idx[1])))
        return f"decoder.{k}.conv.conv.{leaf_name}"
    k = len(_DECODER_UPCONVS) + list(scales).index(int(idx[0]))
    return f"decoder.{k}.conv.{leaf_name}"


def _pose_decoder_torch_key(path: tuple[str, ...]) -> str:
    """("params", "pose_1", "bias") -> "net.2.bias"."""
    _, module, leaf = path
    k = {"squeeze": 0, "pose_0": 1, "pose_1": 2, "pose_2": 3}[module]
    leaf_name = {"kernel": "weight", "bias": "bias"}[leaf]
    return f"net.{k}.{leaf_name}"


# ----------------------------------------------------------------------------------------------
# generic checked conversion


def _leaves(tree: Mapping, prefix: tuple[str, ...] = ()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    # HWIO kernel -> OIHW weight; vectors unchanged
    if len(flax_shape) == 4:
        h, w, i, o = flax_shape
        return (o, i, h, w)
    return tuple(flax_shape)


def _is_ignored(key: str) -> bool:
    return key.endswith("num_batches_tracked") or key.startswith("fc.") or key in MONODEPTH2_META_KEYS


class _Problems:
    """Collects every naming/shape problem of one or more files, raised together."""

    def __init__(self):
        self.lines: list[str] = []

    def add(self, source: str, missing, unexpected, mismatched):
        if missing:
            self.lines.append(f"{source}: missing keys: {', '.join(sorted(missing))}")
        if unexpected:
            self.lines.append(f"{source}: unexpected keys: {', '.join(sorted(unexpected))}")
        for key, got, want in mismatched:
            self.lines.append(f"{source}: shape mismatch for {key}: file has {got}, expected {want}")

    def raise_if_any(self, header: str = "cannot convert PyTorch weights"):
        if self.lines:
            raise ValueError(f"{header}:\n  " + "\n  ".join(self.lines))


def _convert(state: Mapping[str, Any], abstract_vars: Mapping, key_fn, *, source: str, prefix: str = "",
             problems: _Problems, adapt=None) -> dict:
    """Map `state` (torch key -> array) onto the structure of `abstract_vars` (Flax ShapeDtypeStructs).

    `prefix` is prepended to every expected torch key ("encoder." in Monodepth2 files);
    `adapt(key, array, torch_shape)` may rewrite an array before its shape is checked.
    """
    expected = {}
    for path, leaf in _leaves(abstract_vars):
        expected[prefix + key_fn(path)] = (path, tuple(leaf.shape))
    present = {k for k in state if not _is_ignored(k[len(prefix):] if k.startswith(prefix) else k)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in present if k not in expected]
    mismatched = []
    out: dict = {}
    for key, (path, flax_shape) in expected.items():
        if key not in state:
            continue
        array = np.asarray(state[key], dtype=np.float32)
        want = _torch_shape(flax_shape)
        if adapt is not None:
            array = adapt(key, array, want)
        if array.shape != want:
            mismatched.append((key, tuple(array.shape), want))
            continue
        if array.ndim == 4:
            array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        _set(out, path, np.ascontiguousarray(array))
    problems.add(source, missing, unexpected, mismatched)
    return out


def _abstract_encoder(num_layers: int, num_input_images: int) -> dict:
    model = ResNetEncoder(num_layers, num_input_images, kernel_layout="HWIO")
    x = jax.ShapeDtypeStruct((1, 64, 64, 3 * num_input_images), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)


def _abstract_net(model, channels: int) -> dict:
    x = jax.ShapeDtypeStruct((1, 64, 64, channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)


def _torch_load(path: Path) -> dict[str, Any]:
    """torch.load a state dict safely (weights_only) on CPU; tensors become numpy arrays."""
    import torch  # lazy: only conversion needs torch

    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise ValueError(f"{path}: cannot read as a PyTorch state dict ({e})") from e
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return {k: (v.detach().cpu().float().numpy() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def _encoder_variables_from_state(state, num_layers, num_input_images, source, problems, prefix="",
                                  imagenet_conv1=False):
    abstract = _abstract_encoder(num_layers, num_input_images)

    def adapt(key, array, want):
        # ImageNet conv1 (64,3,7,7) for an n-image encoder: cat([w]*n, in-dim) / n (reference §3.3),
        # so the response to n identical frames equals the single-image response.
        if (imagenet_conv1 and key == prefix + "conv1.weight" and num_input_images > 1
                and array.shape == (want[0], 3) + want[2:]):
            return np.concatenate([array] * num_input_images, axis=1) / num_input_images
        return array

    return _convert(state, abstract, _resnet_torch_key, source=source, prefix=prefix, problems=problems,
                    adapt=adapt)


def infer_resnet_depth(state: Mapping[str, Any], prefix: str = "") -> int:
    """18, 34 or 50 from a torchvision-named state dict (block counts and Bottleneck conv3)."""
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state
    blocks = []
    for i in range(1, 5):
        stage = f"{prefix}layer{i}."
        blocks.append(len({k[len(stage):].split(".")[0] for k in state if k.startswith(stage)}))
    blocks = tuple(blocks)
    for n, (sizes, block) in LAYOUTS.items():
        if sizes == blocks and (block is Bottleneck) == bottleneck:
            return n
    raise ValueError(f"state dict has ResNet blocks per stage {blocks} (bottleneck={bottleneck}); "
                     f"not one of ResNet-{sorted(LAYOUTS)}")


# ----------------------------------------------------------------------------------------------
# public API


def load_torchvision_resnet(path_or_state_dict, num_layers: int, num_input_images: int = 1) -> dict:
    """torchvision resnet18/34/50 state dict (file or mapping) -> ResNetEncoder variables.

    Returns {"params": ..., "batch_stats": ...} of numpy float32 arrays for
    ``ResNetEncoder(num_layers, num_input_images, kernel_layout="HWIO")``. ``fc.*`` and
    ``num_batches_tracked`` are ignored. With ``num_input_images > 1`` a 3-channel conv1 is tiled
    and divided by n.
    """
    if num_layers not in LAYOUTS:
        raise ValueError(f"num_layers={num_layers}: supported ResNet depths are {sorted(LAYOUTS)}")
    if num_input_images < 1:
        raise ValueError(f"num_input_images must be >= 1, got {num_input_images}")
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        source = str(path_or_state_dict)
        state = _torch_load(Path(path_or_state_dict))
    else:
        source = "<state dict>"
        state = {k: (np.asarray(v.detach().cpu().float().numpy()) if hasattr(v, "detach") else v)
                 for k, v in path_or_state_dict.items()}
    _check_torchvision_kind(state, num_layers, source)
    problems = _Problems()
    variables = _encoder_variables_from_state(state, num_layers, num_input_images, source, problems,
                                              imagenet_conv1=True)
    problems.raise_if_any()
    return variables


def _check_torchvision_kind(state: Mapping[str, Any], num_layers: int, source: str) -> None:
    """A Monodepth2 file, or a ResNet of another depth than asked, named as such (instead of
    every key missing and unexpected)."""
    keys = [k for k in state if k not in MONODEPTH2_META_KEYS]
    if any(k.startswith("encoder.") for k in keys):
        raise ValueError(f"{source}: its keys start with 'encoder.': a Monodepth2 encoder.pth or "
                         "pose_encoder.pth, not a torchvision state dict; convert its model folder with "
                         "--monodepth2 DIR")
    if any(k.startswith(("decoder.", "net.")) for k in keys) and not any(k.startswith("layer1.") for k in keys):
        raise ValueError(f"{source}: its keys are a Monodepth2 decoder's (depth.pth or pose.pth), not a "
                         "torchvision ResNet's; convert its model folder with --monodepth2 DIR")
    if any(k.startswith("layer1.") for k in keys):
        try:
            found = infer_resnet_depth(state)
        except ValueError:
            return  # not a ResNet of a known depth: every problem is listed key by key
        if found != num_layers:
            raise ValueError(f"{source} holds a ResNet-{found}, not a ResNet-{num_layers}: pass "
                             f"--num-layers {found} (model.num_layers {found} to train with it)")


def torch_missing_message(error: ImportError) -> str:
    """What to do when reading Monodepth2's .pth files finds no torch (an optional extra)."""
    return (f"reading Monodepth2's .pth files needs PyTorch ({error}); pip install torch (CPU is enough), or "
            "convert them once with `xdistill convert-weights --monodepth2` where torch is installed and pass "
            "the converted folder")


def _meta_int(state, key, path):
    v = state.get(key)
    if v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: entry {key!r} should be an integer, got {v!r}") from None


def load_monodepth2(folder, num_layers: int | None = None) -> dict:
    """A Monodepth2 model folder -> {"depth": DepthNet variables, "pose": PoseNet variables or None,
    "num_layers": int, "height": int, "width": int}.

    `num_layers` is inferred from encoder.pth when not given. "pose" is None when the folder has
    neither pose_encoder.pth nor pose.pth (stereo-only models); one without the other is an error.
    Every file's names and shapes are checked; all problems are raised in one ValueError.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a directory (expected a Monodepth2 model folder)")
    enc_path, dec_path = folder / "encoder.pth", folder / "depth.pth"
    penc_path, pdec_path = folder / "pose_encoder.pth", folder / "pose.pth"
    missing_files = [p.name for p in (enc_path, dec_path) if not p.is_file()]
    if penc_path.is_file() != pdec_path.is_file():
        missing_files.append(pdec_path.name if penc_path.is_file() else penc_path.name)
    if missing_files:
        raise ValueError(f"{folder}: missing {', '.join(missing_files)}")

    enc = _torch_load(enc_path)
    if num_layers is None:
        try:
            num_layers = infer_resnet_depth(enc, prefix="encoder.")
        except ValueError as e:
            raise ValueError(f"{enc_path}: {e}{_encoder_hint(enc)}") from None
    problems = _Problems()
    height, width = _meta_int(enc, "height", enc_path), _meta_int(enc, "width", enc_path)
    missing_meta = [k for k, v in (("height", height), ("width", width)) if v is None]
    problems.add(str(enc_path), missing_meta, [], [])
    problems.lines += [f"{enc_path}: entry {k!r} = {v}: the training size must be a positive multiple of 32"
                       for k, v in (("height", height), ("width", width)) if v is not None and (v <= 0 or v % 32)]

    depth_abstract = _abstract_net(DepthNet(num_layers, kernel_layout="HWIO"), 3)
    enc_vars = _convert(enc, {c: t["encoder"] for c, t in depth_abstract.items()}, _resnet_torch_key,
                        source=str(enc_path), prefix="encoder.", problems=problems)
    dec_vars = _convert(_torch_load(dec_path), {"params": depth_abstract["params"]["decoder"]},
                        _depth_decoder_torch_key, source=str(dec_path), problems=problems)
    depth = {"params": {"encoder": enc_vars.get("params", {}), "decoder": dec_vars.get("params", {})},
             "batch_stats": {"encoder": enc_vars.get("batch_stats", {})}}

    pose = None
    if penc_path.is_file():
        pose_abstract = _abstract_net(PoseNet(num_layers, kernel_layout="HWIO"), 6)
        penc_vars = _convert(_torch_load(penc_path), {c: t["encoder"] for c, t in pose_abstract.items()},
                             _resnet_torch_key, source=str(penc_path), prefix="encoder.", problems=problems)
        pdec_vars = _convert(_torch_load(pdec_path), {"params": pose_abstract["params"]["decoder"]},
                             _pose_decoder_torch_key, source=str(pdec_path), problems=problems)
        pose = {"params": {"encoder": penc_vars.get("params", {}), "decoder": pdec_vars.get("params", {})},
                "batch_stats": {"encoder": penc_vars.get("batch_stats", {})}}
    problems.raise_if_any()
    out = {"depth": depth, "pose": pose, "num_layers": num_layers, "height": height, "width": width}
    if "use_stereo" in enc:
        out["use_stereo"] = bool(enc["use_stereo"])
    return out


def _encoder_hint(state: Mapping[str, Any]) -> str:
    """Why an encoder.pth holds no `encoder.layer*` blocks, where its keys tell."""
    keys = [k for k in state if k not in MONODEPTH2_META_KEYS]
    if not keys:
        return " (the file holds no weights)"
    if any(k.startswith("layer1.") for k in keys):
        return " (its keys lack the 'encoder.' prefix: a torchvision state dict? use --torchvision)"
    if any(k.startswith("decoder.") for k in keys):
        return " (its keys are a depth decoder's: encoder.pth and depth.pth swapped?)"
    if any(k.startswith("net.") for k in keys):
        return " (its keys are a pose decoder's)"
    return f" (first keys: {', '.join(keys[:3])})"


CONVERTED_META = "meta.json"


def load_converted_monodepth2(folder) -> dict:
    """A folder written by `xdistill convert-weights --monodepth2` (depth.msgpack [, pose.msgpack],
    meta.json) -> the dict `load_monodepth2` returns; no torch needed. meta.json's entries and every
    variable's name and shape are checked; all problems are raised in one ValueError naming the files."""
    import json

    folder = Path(folder)
    meta_path = folder / CONVERTED_META
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{meta_path}: cannot read ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    lines = []
    n = meta.get("num_layers")
    if isinstance(n, bool) or n not in LAYOUTS:
        lines.append(f"{meta_path}: num_layers = {n!r}, expected one of {sorted(LAYOUTS)}")
    for k in ("height", "width"):
        v = meta.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 32:
            lines.append(f"{meta_path}: {k} = {v!r}, expected a positive multiple of 32")
    if not isinstance(meta.get("has_pose"), bool):
        lines.append(f"{meta_path}: has_pose = {meta.get('has_pose')!r}, expected true or false")
    if meta.get("kernel_layout", "HWIO") != "HWIO":
        lines.append(f"{meta_path}: kernel_layout = {meta['kernel_layout']!r}, expected 'HWIO'")
    if lines:
        raise ValueError("converted Monodepth2 folder does not fit:\n  " + "\n  ".join(lines))
    problems = _Problems()
    out = {"num_layers": n, "height": meta["height"], "width": meta["width"], "pose": None}
    nets = [("depth", DepthNet(n, kernel_layout="HWIO"), 3)]
    if meta["has_pose"]:
        nets.append(("pose", PoseNet(n, kernel_layout="HWIO"), 6))
    for name, model, channels in nets:
        path = folder / f"{name}.msgpack"
        got = load_variables(path)
        want = dict(_leaves(_abstract_net(model, channels)))
        have = dict(_leaves(got)) if isinstance(got, Mapping) else {}
        join = "/".join
        problems.add(str(path), [join(k) for k in want if k not in have], [join(k) for k in have if k not in want],
                     [(join(k), tuple(np.shape(have[k])), tuple(want[k].shape))
                      for k in want if k in have and tuple(np.shape(have[k])) != tuple(want[k].shape)])
        out[name] = got
    problems.raise_if_any("converted Monodepth2 folder does not fit the networks")
    if "use_stereo" in meta:
        out["use_stereo"] = bool(meta["use_stereo"])
    return out


def insert_encoder(variables: Mapping, encoder_variables: Mapping, source: str = "encoder variables") -> dict:
    """DepthNet/PoseNet variables with the "encoder" subtrees replaced by `encoder_variables`.

    `encoder_variables` is {"params": ..., "batch_stats": ...} as `load_torchvision_resnet`
    returns (e.g. ImageNet weights to start training from). Names and shapes must match the
    network's encoder exactly; every difference is listed in one ValueError.
    """
    lines = []
    new = {c: dict(t) for c, t in variables.items()}
    for collection in ("params", "batch_stats"):
        want = dict(_leaves(variables[collection]["encoder"]))
        got = dict(_leaves(encoder_variables.get(collection, {})))
        name = lambda p: f"{collection}/" + "/".join(p)  # noqa: E731
        lines += [f"{source}: missing {name(p)}" for p in want if p not in got]
        lines += [f"{source}: unexpected {name(p)}" for p in got if p not in want]
        lines += [f"{source}: shape mismatch for {name(p)}: {tuple(np.shape(got[p]))}, expected "
                  f"{tuple(np.shape(want[p]))}" for p in want if p in got and np.shape(got[p]) != np.shape(want[p])]
        new[collection]["encoder"] = encoder_variables.get(collection, {})
    if lines:
        raise ValueError("encoder variables do not fit the network:\n  " + "\n  ".join(lines))
    return new


def save_variables(path, variables) -> None:
    """Write a variables tree (nested dict of arrays) as flax msgpack, atomically (temp file + rename)."""
    path = Path(path)
    tree = jax.tree.map(np.asarray, jax.device_get(dict(variables)))
    data = serialization.msgpack_serialize(tree)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_variables(path) -> dict:
    """Read a tree written by `save_variables`: nested dict of numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        return serialization.msgpack_restore(path.read_bytes())
    except Exception as e:
        raise ValueError(f"{path}: not a flax msgpack variables file ({e})") from e
