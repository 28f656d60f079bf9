"""Run a teacher backend over the target frames of a prepared triplet split into a logits store.

For each example i of the split (read with `tfds.data_source`, via
`data_pipelines.kitti.tfds_builder.open_split`): the backend gives per-class logits of
``image_0``; a jitted function groups them (`semantics.group_logits`, log-sum-exp of member
logits), resizes them to the store resolution (bilinear with antialiasing -- an area average --
for network logits, nearest for label files) and marks "no opinion" pixels (NaN from ignored
labels) as all-zero logits; the store writer keeps them as float16. Default store resolution:
a quarter of the image size in each dimension (stride 4, a segmentation net's native output).

Non-finite logits: NaN means "no opinion" only from a backend that says so
(``nan_means_no_opinion``: the `labels:` backend, where it stands for label 255). A network
teacher's (``flax:``, ``onnx:``) NaN or inf is a broken teacher (a diverged checkpoint, an fp16
overflow): a ValueError naming the teacher and the example (`check_finite`), before the resize,
whose antialiasing would spread one NaN over the whole map (then stored as all-zero, i.e.
ignored, logits). An inf is an error from every backend.

Resumable: rerunning the same command continues after the last complete shard (see store.py).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.teacher import store
from xdistill_jax import distillation, semantics


@functools.partial(jax.jit, static_argnames=("grouping", "height", "width", "method"))
def group_and_resize(class_logits, *, grouping, height: int, width: int, method: str):
    """(N,h0,w0,C) class logits -> (N,height,width,G) float32 group logits; NaN pixels -> 0.

    NaN (a `labels:` backend's "no opinion") reaches here only with method "nearest", which
    keeps it at its own pixels; a network teacher's non-finite logits are refused before
    (`check_finite`), since the antialiased resize would spread them over the whole map.
    """
    g = semantics.group_logits(class_logits, grouping)
    if method == "nearest":
        g = distillation.resize_nearest(g, height, width)
    elif g.shape[1:3] != (height, width):
        g = jax.image.resize(g, (g.shape[0], height, width, g.shape[-1]), "linear", antialias=True)
    no_opinion = jnp.any(jnp.isnan(g), axis=-1, keepdims=True)
    return jnp.where(no_opinion, 0.0, g)


def check_finite(class_logits: np.ndarray, backend, ids: Sequence[str], indices) -> None:
    """Raises a ValueError naming the teacher and the first example with logits it must not give:
    any inf, and NaN unless the backend's NaN means "no opinion" (`nan_means_no_opinion`)."""
    logits = np.asarray(class_logits)
    nan_ok = bool(getattr(backend, "nan_means_no_opinion", False))
    bad = np.isinf(logits) if nan_ok else ~np.isfinite(logits)
    per_example = bad.reshape(len(logits), -1).sum(axis=1)
    if not per_example.any():
        return
    k = int(np.flatnonzero(per_example)[0])
    kinds = [name for name, hit in (("NaN", not nan_ok and np.isnan(logits[k]).any()),
                                     ("+inf", np.isposinf(logits[k]).any()),
                                     ("-inf", np.isneginf(logits[k]).any())) if hit]
    teacher = backend.describe().get("backend", type(backend).__name__)
    raise ValueError(f"teacher {teacher} gave non-finite class logits ({', '.join(kinds)}: "
                     f"{int(per_example[k])} of {logits[k].size} values) for example {ids[k]!r} "
                     f"(split index {int(indices[k])}); a broken teacher (diverged weights, a "
                     "float16 overflow?): its logits are not stored as \"no opinion\"")


def _as_str(x) -> str:
    return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)


def precompute(backend, source, out_dir, *, grouping: str = "geometric", stride: int = 4,
               height: int | None = None, width: int | None = None, batch_size: int = 8,
               shard_size: int = 1000, fingerprint: str = "", extra_metadata: dict | None = None,
               progress: bool = True) -> Path:
    """Writes the grouped teacher logits of every example of `source` into a store at `out_dir`.

    Args:
      backend: a `backends` object (``class_logits(images uint8 (N,H,W,3), ids) -> (N,h,w,C)``,
        or a list of N (h_i,w_i,C) maps of several sizes; ``num_classes``, ``resize_method``,
        ``describe()``).
      source: random access to the split's examples: ``source[i]`` is a dict with ``id`` (str or
        bytes) and ``image_0`` (uint8 (H,W,3)); e.g. `tfds_builder.open_split(...)`.
      out_dir: the store directory.
      grouping: `semantics` grouping name.
      stride: store resolution = image size // stride, unless `height` and `width` are given.
    """
    g = semantics.get_grouping(grouping)
    if backend.num_classes != g.num_classes:
        raise ValueError(f"teacher has {backend.num_classes} classes but grouping {g.name!r} expects "
                         f"{g.num_classes} teacher classes")
    n = len(source)
    if n == 0:
        raise ValueError("the triplet split has no examples")
    first = np.asarray(source[0]["image_0"])
    img_h, img_w = first.shape[:2]
    if (height is None) != (width is None):
        raise ValueError("give both height and width of the stored logits, or neither (use stride)")
    if height is None:
        if stride < 1 or img_h % stride or img_w % stride:
            raise ValueError(f"stride {stride} does not divide the {img_h}x{img_w} images")
        height, width = img_h // stride, img_w // stride

    def batch_fn(indices: np.ndarray):
        examples = [source[int(i)] for i in indices]
        ids = [_as_str(e["id"]) for e in examples]
        images = np.stack([np.asarray(e["image_0"], np.uint8) for e in examples])
        if images.shape[1:3] != (img_h, img_w):
            raise ValueError(f"example {ids[0]!r}: image_0 is {images.shape[1:3]}, split images "
                             f"are {img_h}x{img_w}")
        logits = backend.class_logits(images, ids)
        if isinstance(logits, list):  # maps of several sizes (label files of several KITTI dates)
            if len(logits) != len(ids):
                raise ValueError(f"teacher backend returned {len(logits)} logit maps for {len(ids)} examples")
            groups = [np.array([k for k, m in enumerate(logits) if m.shape == size])
                      for size in dict.fromkeys(m.shape for m in logits)]
            parts = [np.stack([logits[k] for k in ks]) for ks in groups]
        else:
            groups, parts = [np.arange(len(ids))], [logits]
        out = np.empty((len(ids), height, width, g.num_groups), np.float32)
        for ks, part in zip(groups, parts):  # one resize per size: few compiled programs
            if part.ndim != 4 or part.shape[0] != len(ks) or part.shape[-1] != g.num_classes:
                raise ValueError(f"teacher backend returned logits {part.shape} for {len(ks)} "
                                 f"examples; expected (N,h,w,{g.num_classes})")
            check_finite(part, backend, [ids[k] for k in ks], np.asarray(indices)[ks])
            out[ks] = np.asarray(group_and_resize(part, grouping=g, height=height, width=width,
                                                  method=backend.resize_method))
        return ids, out

    meta = {"teacher": backend.describe(), **(extra_metadata or {})}
    return store.write_store(out_dir, n, batch_fn, grouping=g.name, group_names=g.group_names,
                             height=height, width=width, shard_size=shard_size,
                             batch_size=batch_size, fingerprint=fingerprint,
                             extra_metadata=meta, progress=progress)


def precompute_split(backend_spec: str, dataset_dir, split: str, out_dir, *,
                     backend_options: dict[str, Any] | None = None, **kwargs) -> Path:
    """`precompute` over a split prepared by `xdistill prepare` (the CLI's entry point)."""
    from data_pipelines.kitti import tfds_builder
    from data_pipelines.teacher.backends import make_backend

    g = semantics.get_grouping(kwargs.get("grouping", "geometric"))
    source = tfds_builder.open_split(dataset_dir, split)
    try:  # the split file's hash: a resumed store must be of the same split
        fingerprint = tfds_builder.read_metadata(dataset_dir, split).get("split_sha256", "")
    except (OSError, ValueError) as e:
        raise ValueError(f"{tfds_builder.dataset_dir(dataset_dir, split) / 'metadata.json'}: cannot read "
                         f"the prepared split's metadata ({type(e).__name__}: {e}); prepare the split "
                         "again with `xdistill prepare`") from e
    backend = make_backend(backend_spec, num_classes=g.num_classes, **(backend_options or {}))
    extra = {"dataset_dir": str(Path(dataset_dir).absolute()), "split": split}
    return precompute(backend, source, out_dir, fingerprint=fingerprint, extra_metadata=extra, **kwargs)


def parse_floats(text: str, name: str, count: int | None = None) -> Sequence[float]:
    """'0.485,0.456,0.406' -> floats, errors naming the option."""
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if count is not None and len(vals) != count:
        raise ValueError(f"{name}: expected {count} values, got {len(vals)} ({text!r})")
    return vals
