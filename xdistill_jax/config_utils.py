"""Experiment configs: load a `configs/*.py` file, apply `--config.a.b=value` overrides, validate,
save/load the resolved config as `config.json` in the workdir.

Everything here runs before JAX compiles anything, so a typo or an impossible value fails in
well under a second with the offending key named, instead of minutes into a run.

Config files are plain Python modules exposing `get_config()` (or `get_config(arg)`, selected
with `path.py:arg`). They are only ever loaded from a path the user names.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pathlib
from typing import Any, Iterable, Sequence

import ml_collections

from xdistill_jax import config_defaults

CONFIG_JSON = "config.json"

# Fields whose values change the shapes or meaning of the saved variables: a checkpoint written
# under one value cannot be restored under another.
STRUCTURAL_KEYS = (
    "data.height",
    "data.width",
    "model.num_layers",
    "model.pose_num_layers",
    "model.kernel_layout",
    "distill.grouping",
    "distill.num_groups",
    "distill.translator",
    "distill.weight_is_zero",  # derived below: the translator params exist only when weight > 0
)

# How this process joins a multi-process run (its process id, the coordinator's address): they
# differ between the processes of one run and between its launches, not the run's settings, so
# resuming with other values is not reported as a changed setting.
LAUNCH_KEYS = ("distributed",)


class ConfigError(ValueError):
    """A config file, override or value is wrong; the message names the key."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Load `path/to/file.py` or `path/to/file.py:arg` and return its `get_config([arg])`."""
    path, sep, arg = spec.partition(":")
    p = pathlib.Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    module_name = "xdistill_config_" + p.stem.replace("-", "_")
    mod_spec = importlib.util.spec_from_file_location(module_name, p)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    try:
        config = module.get_config(arg) if sep else module.get_config()
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError) as e:  # e.g. an unknown variant, or one not taken
        what = f"get_config({arg!r})" if sep else "get_config()"
        raise ConfigError(f"config {spec!r}: {what} failed: {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return config


def _parse_value(key: str, text: str, current: Any) -> Any:
    """Convert the string `text` to the type of the existing value `current`."""
    if isinstance(current, bool):
        low = text.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected a bool (true/false), got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--config.{key}: expected an int, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{key}: expected a float, got {text!r}") from None
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError(f"--config.{key}: expected a tuple like (1, 2), got {text!r}") from None
        if not isinstance(value, (tuple, list)):
            value = (value,)
        # the element type from the field's table, else from its current elements: an empty
        # tuple has none to take it from, and would take any literal
        elem = config_defaults.TUPLE_ELEMENT_TYPES.get(key) or (type(current[0]) if current else None)
        if elem is None:
            raise ConfigError(f"--config.{key}: the element type of this empty tuple is unknown; "
                              "add the field to config_defaults.TUPLE_ELEMENT_TYPES")
        if any(type(v) is not elem for v in value):  # `type is`: a bool is no int here
            # allow ints where floats are expected, nothing else
            if not (elem is float and all(type(v) in (int, float) for v in value)):
                raise ConfigError(f"--config.{key}: expected a tuple of {elem.__name__}, got {text!r}")
            value = tuple(float(v) for v in value)
        return type(current)(value)
    if current is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    raise ConfigError(f"--config.{key}: cannot override a field of type {type(current).__name__}")


def _lookup(config: ml_collections.ConfigDict, key: str):
    """Return (parent ConfigDict, leaf name) for a dotted key, or raise naming the key."""
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"unknown config key {key!r} (no field {'.'.join(parts[:i + 1])!r})")
        node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or parts[-1] not in node:
        raise ConfigError(f"unknown config key {key!r}")
    return node, parts[-1]


def apply_overrides(config: ml_collections.ConfigDict, args: Sequence[str]) -> ml_collections.ConfigDict:
    """Apply `--config.a.b=value` (or `--config.a.b value`) strings to a copy of `config`.

    Unknown keys, values of the wrong type, and arguments that are not config overrides raise
    ConfigError naming the key. Overriding a whole sub-config is not allowed.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    args = list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--config."):
            raise ConfigError(f"unrecognised argument {arg!r} (config overrides look like --config.a.b=value)")
        body = arg[len("--config."):]
        if "=" in body:
            key, text = body.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"--config.{body}: missing value")
            key, text = body, args[i + 1]
            i += 1
        parent, leaf = _lookup(config, key)
        current = parent[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{key}: is a group of fields; override its fields one by one")
        parent[leaf] = _parse_value(key, text, current)
        i += 1
    return config


# the config's paths (local or mounted filesystem paths: `local_paths`)
PATH_KEYS = ("data.dataset_dir", "data.teacher_dir", "data.val_teacher_dir", "data.val_gt_depth", "model.init")


def _check(cond: bool, key: str, message: str):
    if not cond:
        raise ConfigError(f"config.{key}: {message}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Reject impossible values, naming the key. `num_devices`: global device count, if known."""
    d, m, lo, ds, o, r = config.data, config.model, config.loss, config.distill, config.optim, config.run
    from xdistill_jax import local_paths

    for key in PATH_KEYS:
        group, leaf = key.split(".")
        value = config[group].get(leaf, "")
        _check(not local_paths.url_scheme(value), key,
               f"{value!r} is a URL ({local_paths.url_scheme(value)}), not a path; {local_paths.MOUNT_HINT}")
    for key, value in (("data.height", d.height), ("data.width", d.width)):
        _check(isinstance(value, int) and value > 0 and value % 32 == 0, key,
               f"must be a positive multiple of 32 (the encoder downsamples by 32), got {value}")
    _check(m.num_layers in (18, 34, 50), "model.num_layers", f"must be 18, 34 or 50, got {m.num_layers}")
    _check(m.pose_num_layers in (18, 50), "model.pose_num_layers",
           f"must be 18 or 50 (two-image ResNet input), got {m.pose_num_layers}")
    _check(m.dtype in ("float32", "bfloat16"), "model.dtype", f"must be float32 or bfloat16, got {m.dtype!r}")
    _check(m.kernel_layout in config_defaults.KERNEL_LAYOUT_SETTINGS, "model.kernel_layout",
           f"must be one of {config_defaults.KERNEL_LAYOUT_SETTINGS}, got {m.kernel_layout!r}")
    _check(isinstance(m.get("gpu_channel_padding", True), bool), "model.gpu_channel_padding",
           f"must be true or false, got {m.get('gpu_channel_padding')!r}")
    _check(m.init in ("scratch", config_defaults.INIT_IMAGENET) or m.init.endswith(".msgpack"), "model.init",
           f"must be 'scratch' or a path to a converted .msgpack, got {m.init!r}")
    _check(0 < lo.min_depth < lo.max_depth, "loss.min_depth",
           f"need 0 < min_depth < max_depth, got {lo.min_depth} and {lo.max_depth}")
    _check(lo.smoothness_weight >= 0, "loss.smoothness_weight", f"must be >= 0, got {lo.smoothness_weight}")
    _check(ds.weight >= 0, "distill.weight", f"must be >= 0, got {ds.weight}")
    from xdistill_jax import semantics  # numpy + jax.numpy only

    _check(ds.grouping in semantics.GROUPINGS, "distill.grouping",
           f"must be one of {', '.join(sorted(semantics.GROUPINGS))}, got {ds.grouping!r}")
    _check(ds.mode in ("hard", "soft"), "distill.mode", f"must be 'hard' or 'soft', got {ds.mode!r}")
    _check(ds.temperature > 0, "distill.temperature", f"must be > 0, got {ds.temperature}")
    _check(type(ds.scale) is int and ds.scale in config_defaults.DISPARITY_SCALES, "distill.scale",
           f"must be one of the depth net's disparity scales {config_defaults.DISPARITY_SCALES}, got {ds.scale!r}")
    for key in ("depth_grad_start", "depth_grad_ramp"):
        _check(isinstance(ds[key], int) and ds[key] >= 0, f"distill.{key}",
               f"must be an integer >= 0, got {ds[key]!r}")
    t = ds.translator
    _check(isinstance(t.features, int) and t.features > 0, "distill.translator.features",
           f"must be an integer > 0, got {t.features!r}")
    _check(all(isinstance(v, int) and v > 0 for v in t.dilations), "distill.translator.dilations",
           f"must be integers > 0, got {t.dilations!r}")
    stride = t.output_stride
    _check(isinstance(stride, int) and 1 <= stride <= 32 and stride & (stride - 1) == 0,
           "distill.translator.output_stride", f"must be a power of 2 from 1 to 32, got {stride!r}")
    _check(isinstance(t.multi_scale, bool), "distill.translator.multi_scale", f"must be true or false, got {t.multi_scale!r}")
    _check(not t.multi_scale or ds.scale == 0, "distill.scale",
           f"is {ds.scale}, but distill.translator.multi_scale=True feeds every scale to the translator: "
           "leave distill.scale at 0 (a 'which scale' ablation needs multi_scale=False)")
    _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    for key in ("b1", "b2"):
        _check(0 <= o[key] < 1, f"optim.{key}", f"must be in [0, 1), got {o[key]}")
    _check(o.eps > 0, "optim.eps", f"must be > 0, got {o.eps}")
    _check(o.batch_size > 0, "optim.batch_size", f"must be > 0, got {o.batch_size}")
    _check(o.epochs > 0 or o.num_steps > 0, "optim.num_steps", "set optim.epochs or optim.num_steps > 0")
    _check(0 < o.lr_decay_factor <= 1, "optim.lr_decay_factor", f"must be in (0, 1], got {o.lr_decay_factor}")
    for key in ("lr_drop_epochs", "lr_drop_steps"):
        # increasing: optax keys the drops by step, so a repeated one would drop the rate once
        drops = o[key]
        _check(isinstance(drops, (tuple, list)) and all(type(v) is int and v > 0 for v in drops)
               and all(a < b for a, b in zip(drops, drops[1:])), f"optim.{key}",
               f"must be increasing integers > 0, got {drops!r}")
    _check(type(r.seed) is int and 0 <= r.seed < 2**63, "run.seed",  # numpy's SeedSequence, jax.random.key
           f"must be an integer from 0 to 2**63-1, got {r.seed!r}")
    _check(r.on_nonfinite in ("stop", "skip"), "run.on_nonfinite", f"must be 'stop' or 'skip', got {r.on_nonfinite!r}")
    state_layout = r.get("state_layout", "default")  # .get: a config.json saved before the field existed
    _check(state_layout in config_defaults.STATE_LAYOUTS, "run.state_layout",
           f"must be one of {config_defaults.STATE_LAYOUTS}, got {state_layout!r}")
    _check(isinstance(d.num_workers, int) and d.num_workers >= -1, "data.num_workers",
           f"must be an integer >= 0, or -1 for one per CPU core (auto), got {d.num_workers!r}")
    _check(d.val_gt_crop in ("garg", ""), "data.val_gt_crop", f"must be 'garg' or '', got {d.val_gt_crop!r}")
    for key in ("log_every", "ckpt_every", "val_every", "keep"):
        _check(r[key] > 0, f"run.{key}", f"must be > 0, got {r[key]}")
    if num_devices is not None:
        _check(o.batch_size % num_devices == 0, "optim.batch_size",
               f"{o.batch_size} is not divisible by the {num_devices} devices of the mesh")


def config_from_args(config_spec: str, overrides: Sequence[str] = (), num_devices: int | None = None):
    """The whole front door: load file, apply overrides, validate."""
    config = apply_overrides(load_config_file(config_spec), overrides)
    validate(config, num_devices)
    return config


def _tuplify(value):
    if isinstance(value, dict):
        return {k: _tuplify(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def save_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> pathlib.Path:
    """Write `workdir/config.json` atomically (temp name, then rename).

    `distributed.process_id` is saved as -1 (each process's own, given at launch or detected):
    the writing process's id would be wrong for every other process resuming from the file."""
    path = pathlib.Path(workdir) / CONFIG_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = config.to_dict()
    if "process_id" in saved.get("distributed", {}):
        saved["distributed"]["process_id"] = -1
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def load_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """Read `workdir/config.json` back (lists become tuples, as the config files write them)."""
    path = pathlib.Path(workdir) / CONFIG_JSON
    if not path.is_file():
        hint = (" (a folder `xdistill convert-weights --monodepth2` wrote: pass it as --monodepth2)"
                if (pathlib.Path(workdir) / "meta.json").is_file() else "")
        raise ConfigError(f"{path} does not exist: is {workdir} a training workdir?{hint}")
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path}: not a readable config.json ({e})") from None
    groups = {"data", "model", "loss", "optim"}  # in every config.json since the first (later groups may be absent)
    if not isinstance(saved, dict) or not groups <= set(saved):
        found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise ConfigError(f"{path} is not an `xdistill train` config (needs the groups {sorted(groups)}, "
                          f"found {found}); is {workdir} another tool's workdir, e.g. `xdistill teacher train`'s?")
    config = ml_collections.ConfigDict(_tuplify(saved))
    # Files saved before distill.translator spelled out its fields (an empty group) meant the
    # Translator's defaults of that time (full resolution), not today's: fill those in, so that
    # the checkpoint's translator is rebuilt as it was and comparisons and overrides see every field.
    if "distill" in config and "translator" in config.distill:
        for key, value in config_defaults.base_config().distill.translator.items():
            if key not in config.distill.translator:
                config.distill.translator[key] = config_defaults.LEGACY_TRANSLATOR.get(key, value)
    # Files saved before model.kernel_layout existed hold checkpoints with HWIO kernels.
    if "model" in config and "kernel_layout" not in config.model:
        config.model.kernel_layout = config_defaults.LEGACY_KERNEL_LAYOUT
    return config


def resolve_kernel_layout(config: ml_collections.ConfigDict, platform: str,
                          workdir: str | os.PathLike | None = None) -> ml_collections.ConfigDict:
    """`config` with `model.kernel_layout` "auto" made concrete (a copy; a concrete one is
    returned as it is): the layout of the run already in `workdir` (its config.json), so that a
    run resumes with the kernels it was trained with wherever it resumes, else the layout for
    `platform` (`config_defaults.kernel_layout_for`)."""
    if config.model.kernel_layout != "auto":
        return config
    layout = None
    if workdir is not None and (pathlib.Path(workdir) / CONFIG_JSON).is_file():
        layout = load_config(workdir).model.get("kernel_layout")
    if layout not in config_defaults.KERNEL_LAYOUTS:  # no run there (or one that said "auto")
        layout = config_defaults.kernel_layout_for("auto", platform)
    resolved = ml_collections.ConfigDict(config.to_dict())
    resolved.model.kernel_layout = layout
    return resolved


def keep_run_init(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """`config` with the `model.init` of the run in `workdir` when it has checkpoints (a copy):
    the encoders' start only applies when a run starts, and a resume with today's KITTI configs
    ("imagenet") would otherwise relabel a run that started from "scratch" or a file."""
    from xdistill_jax.checkpoints import complete_steps  # orbax: only where a run resumes

    workdir = pathlib.Path(workdir)
    if not (workdir / CONFIG_JSON).is_file() or not complete_steps(workdir / "checkpoints"):
        return config
    saved = load_config(workdir).model.get("init")
    if saved is None or saved == config.model.init:
        return config
    kept = ml_collections.ConfigDict(config.to_dict())
    kept.model.init = saved
    return kept


def _flatten(value, prefix="") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def _under(key: str, prefixes) -> bool:
    """Whether dotted `key` is one of `prefixes` or lies under one."""
    return any(key == s or key.startswith(s + ".") for s in prefixes)


def structural_differences(saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict) -> list[str]:
    """Keys (dotted) under STRUCTURAL_KEYS whose values differ, as 'key: saved -> current'."""
    a = _flatten(_tuplify(saved.to_dict()))
    b = _flatten(_tuplify(current.to_dict()))
    a["distill.weight_is_zero"] = a.get("distill.weight", 0) == 0
    b["distill.weight_is_zero"] = b.get("distill.weight", 0) == 0
    out = []
    for key in sorted(set(a) | set(b)):
        if _under(key, STRUCTURAL_KEYS) and a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def differences(saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict) -> Iterable[str]:
    """All differing keys but LAUNCH_KEYS, as 'key: saved -> current'."""
    a, b = _flatten(_tuplify(saved.to_dict())), _flatten(_tuplify(current.to_dict()))
    for key in sorted(set(a) | set(b)):
        if not _under(key, LAUNCH_KEYS) and a.get(key) != b.get(key):
            yield f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
