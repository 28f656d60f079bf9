"""Teacher backends: where the segmentation teacher's per-class logits come from.

A backend is chosen by a spec string ``KIND:PATH``:

- ``flax:WORKDIR``  our segmentation checkpoint (`data_pipelines.teacher.train_teacher`): the
  images are resized to the size it was trained at, the jitted network gives logits at stride 4.
- ``onnx:FILE``     any ONNX segmentation model through onnxruntime (optional extra
  ``xdistill-jax[onnx]``). Options: ``input_size`` (H,W) (default: the model's static input size,
  else the image size), ``mean``/``std`` per RGB channel in [0,1] units (default ImageNet's:
  ``(x/255 - mean)/std``; a 0..255 model's normalisation is the same numbers divided by 255),
  ``layout`` "NCHW" (default) or "NHWC" for input and output, ``class_order``: for each model
  output channel, the Cityscapes trainId it is (-1 = drop; several channels of one trainId are
  merged by log-sum-exp). Without it the model must output exactly the grouping's classes.
  A model with a static batch dimension (the usual export: input [1,3,H,W]) is run on chunks
  of exactly that many images (the last one padded with copies of its last image, their
  outputs dropped), so any precompute --batch-size works. A file onnxruntime cannot load, or an
  onnxruntime error during a run, is a ValueError naming the file.
- ``labels:DIR``    files written by any external tool, one per example id. Naming rule: the id
  is a split line ``FOLDER FRAME SIDE`` (``2011_09_26/2011_09_26_drive_0001_sync 5 l``) and the
  file is ``DIR/`` + ``template`` + ``.npy`` or ``.png`` (``.npy`` preferred), with the default
  template ``"{folder}/semantic_{cam}/data/{frame:010d}"`` (``cam`` = 02 for l, 03 for r): the
  synthetic world's own label folders, so ``labels:WORLD_DIR`` works on it directly. Other
  fields: ``side`` (l/r), ``camera`` (image_02/image_03), ``date``, ``drive``. ``.png``: trainId labels
  (uint8, 255 = ignore) -> logits ``label_logit`` (10) for the labelled class, 0 elsewhere
  (softmax 0.9992 on the label). ``.npy``: float (h,w,C) class logits, or integer (h,w) trainIds.
  Label files must have the image's aspect ratio (within 2%: raw KITTI-size labels of a resized
  dataset are fine, and one batch may mix the sizes of several recording dates) or exactly
  ``expected_size`` when given; a wrong size or a missing id is a ValueError naming the file.

Every backend returns float32 class logits (N,h,w,C) in the teacher's Cityscapes trainId order at
its own resolution. From the `labels:` backend (``nan_means_no_opinion = True``) NaN at a pixel
means "no opinion" (label 255): the precompute groups the logits, resizes them to the store
resolution (``resize_method``) and stores NaN pixels as all-zero logits, which the distillation
loss ignores (hard and soft mode). From a network backend (``flax:``, ``onnx:``) a NaN or inf
is an error naming the teacher and the example (`precompute.check_finite`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_TEMPLATE = "{folder}/semantic_{cam}/data/{frame:010d}"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resize_images(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (N,H,W,3) -> float32 (N,height,width,3) in [0,1], PIL bilinear (identity if same size)."""
    if images.shape[1:3] == (height, width):
        return images.astype(np.float32) / 255.0
    from PIL import Image

    out = [np.asarray(Image.fromarray(im).resize((width, height), Image.BILINEAR)) for im in images]
    return np.stack(out).astype(np.float32) / 255.0


def _onnxruntime_errors() -> tuple[type, ...]:
    """onnxruntime's own exception classes (InvalidArgument, InvalidProtobuf, Fail, ...): they
    derive from Exception directly, so no narrower built-in class catches them."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(c for c in vars(state).values() if isinstance(c, type) and issubclass(c, Exception))


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _other_layout_hint(shape, layout: str, want) -> str:
    """A hint when the model's other layout's channel axis has the size wanted (an NHWC model run
    as NCHW, or the reverse); "" otherwise."""
    other, axis = ("NHWC", -1) if layout == "NCHW" else ("NCHW", 1)
    if len(shape) == 4 and isinstance(shape[axis], int) and shape[axis] == want:
        return (f"; its {other} channel axis has {want}: if the model is {other}, give "
                f"layout={other!r} (--layout {other})")
    return ""


class OnnxBackend:
    """``onnx:FILE`` (see the module docstring for the options)."""

    resize_method = "linear"
    nan_means_no_opinion = False  # a NaN from a network is a broken teacher (precompute.check_finite)

    def __init__(self, path, *, num_classes: int = 19, input_size: Sequence[int] | None = None,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 layout: str = "NCHW", class_order: Sequence[int] | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:  # optional extra
            raise ValueError("the onnx: teacher backend needs onnxruntime "
                             "(pip install 'xdistill-jax[onnx]')") from e
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"onnx teacher model {self.path} does not exist")
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"onnx layout must be NCHW or NHWC, got {layout!r}")
        self._ort_errors = _onnxruntime_errors()
        try:
            self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except self._ort_errors as e:  # not an ONNX file, a truncated one, an unsupported opset
            raise ValueError(f"onnx teacher model {self.path}: onnxruntime cannot load it "
                             f"({_one_line(e)})") from e
        self.layout = layout
        self.num_classes = num_classes
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        if self.mean.shape != (3,) or self.std.shape != (3,) or (self.std <= 0).any():
            raise ValueError(f"onnx mean/std need 3 values each (std > 0), got {mean}, {std}")
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        in_channels = inp.shape[1] if layout == "NCHW" else inp.shape[-1]
        if len(inp.shape) != 4 or (isinstance(in_channels, int) and in_channels != 3):
            raise ValueError(f"{self.path}: model input {inp.name!r} has shape {inp.shape}, not a "
                             f"{layout} batch of RGB images (3 channels)"
                             + _other_layout_hint(inp.shape, layout, 3))
        # a static batch dimension (exported as [1,3,H,W]) takes exactly that many images a run
        self.static_batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
        static = inp.shape[2:4] if layout == "NCHW" else inp.shape[1:3]
        if input_size is None and all(isinstance(s, int) for s in static):
            input_size = tuple(static)
        self.input_size = tuple(input_size) if input_size is not None else None
        out_shape = self.session.get_outputs()[0].shape
        channels = out_shape[1] if layout == "NCHW" else out_shape[-1]
        self.class_order = None if class_order is None else [int(c) for c in class_order]
        if self.class_order is not None:
            if isinstance(channels, int) and len(self.class_order) != channels:
                raise ValueError(f"{self.path}: class_order has {len(self.class_order)} entries but "
                                 f"the model outputs {channels} channels"
                                 + _other_layout_hint(out_shape, layout, len(self.class_order)))
            bad = [c for c in self.class_order if not -1 <= c < num_classes]
            if bad:
                raise ValueError(f"{self.path}: class_order values {bad} outside -1..{num_classes - 1}")
            missing = sorted(set(range(num_classes)) - set(self.class_order))
            if missing:
                raise ValueError(f"{self.path}: class_order maps no model channel to teacher "
                                 f"classes {missing}")
        elif isinstance(channels, int) and channels != num_classes:
            raise ValueError(f"ONNX teacher {self.path} outputs {channels} classes but the grouping "
                             f"expects {num_classes} teacher classes; give a class_order"
                             + _other_layout_hint(out_shape, layout, num_classes))

    def describe(self) -> dict:
        return {"backend": f"onnx:{self.path}", "input_size": self.input_size,
                "mean": self.mean.tolist(), "std": self.std.tolist(), "layout": self.layout,
                "class_order": self.class_order}

    def class_logits(self, images: np.ndarray, example_ids: Sequence[str]) -> np.ndarray:
        h, w = self.input_size or images.shape[1:3]
        x = (_resize_images(images, h, w) - self.mean) / self.std
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        x = np.ascontiguousarray(x, np.float32)
        n = len(x)
        chunk = self.static_batch or n
        outs = []
        for start in range(0, n, chunk):
            part = x[start:start + chunk]
            if len(part) < chunk:  # a static batch: pad with copies of the last image, dropped below
                part = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), axis=0)])
            try:
                (out,) = self.session.run(None, {self.input_name: part})[:1]
            except self._ort_errors as e:  # e.g. an input size the model's graph cannot take
                raise ValueError(f"onnx teacher model {self.path}: onnxruntime failed on a batch of "
                                 f"input shape {part.shape} ({_one_line(e)})") from e
            out = np.asarray(out, np.float32)
            if out.ndim != 4 or out.shape[0] != len(part):
                raise ValueError(f"onnx teacher model {self.path}: output shape {out.shape} for an "
                                 f"input of shape {part.shape}; expected a {self.layout} batch of logits")
            outs.append(out[:min(chunk, n - start)])
        out = np.concatenate(outs)
        raw_shape = out.shape
        if self.layout == "NCHW":
            out = out.transpose(0, 2, 3, 1)
        if self.class_order is None:
            if out.shape[-1] != self.num_classes:
                raise ValueError(f"ONNX teacher {self.path} outputs {out.shape[-1]} classes but the "
                                 f"grouping expects {self.num_classes} teacher classes"
                                 + _other_layout_hint(raw_shape, self.layout, self.num_classes))
            return out
        if out.shape[-1] != len(self.class_order):
            raise ValueError(f"{self.path}: model output has {out.shape[-1]} channels, class_order "
                             f"{len(self.class_order)}"
                             + _other_layout_hint(raw_shape, self.layout, len(self.class_order)))
        order = np.asarray(self.class_order)
        merged = np.empty(out.shape[:-1] + (self.num_classes,), np.float32)
        for c in range(self.num_classes):
            ch = out[..., order == c]
            m = ch.max(axis=-1, keepdims=True)
            merged[..., c] = (m + np.log(np.exp(ch - m).sum(axis=-1, keepdims=True)))[..., 0]
        return merged


def parse_example_id(example_id: str) -> dict:
    """Template fields of a split-line id ``FOLDER FRAME SIDE``."""
    parts = example_id.split()
    if len(parts) != 3 or not parts[1].lstrip("-").isdigit() or parts[2] not in ("l", "r"):
        raise ValueError(f"example id {example_id!r} is not a split line 'FOLDER FRAME l|r'")
    folder, frame, side = parts[0], int(parts[1]), parts[2]
    cam = "02" if side == "l" else "03"
    return {"folder": folder, "frame": frame, "side": side, "cam": cam, "camera": f"image_{cam}",
            "date": folder.split("/")[0], "drive": folder.split("/")[-1]}


class LabelsBackend:
    """``labels:DIR`` (see the module docstring for the naming rule and file kinds)."""

    resize_method = "nearest"
    nan_means_no_opinion = True  # NaN stands for label 255 (`_labels_to_logits`)

    def __init__(self, root, *, num_classes: int = 19, template: str = DEFAULT_TEMPLATE,
                 expected_size: Sequence[int] | None = None, label_logit: float = 10.0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"labels teacher directory {self.root} does not exist")
        self.template = template
        self.num_classes = num_classes
        self.expected_size = tuple(expected_size) if expected_size is not None else None
        self.label_logit = float(label_logit)

    def describe(self) -> dict:
        return {"backend": f"labels:{self.root}", "template": self.template,
                "expected_size": self.expected_size, "label_logit": self.label_logit}

    def path_for(self, example_id: str) -> Path:
        stem = self.root / self.template.format(**parse_example_id(example_id))
        for suffix in (".npy", ".png"):
            if stem.with_name(stem.name + suffix).is_file():
                return stem.with_name(stem.name + suffix)
        raise ValueError(f"no teacher label file for example id {example_id!r}: expected "
                         f"{stem}.npy or {stem}.png (template {self.template!r})")

    def _check_size(self, path: Path, shape: tuple[int, int], image_shape: tuple[int, int]) -> None:
        if self.expected_size is not None:
            if shape != self.expected_size:
                raise ValueError(f"teacher label file {path} is {shape[0]}x{shape[1]} (HxW), "
                                 f"expected {self.expected_size[0]}x{self.expected_size[1]}")
            return
        aspect, want = shape[1] / shape[0], image_shape[1] / image_shape[0]
        if abs(aspect / want - 1) > 0.02:
            raise ValueError(f"teacher label file {path} is {shape[0]}x{shape[1]} (HxW), which does "
                             f"not have the aspect ratio of the {image_shape[0]}x{image_shape[1]} "
                             "image (2% tolerance)")

    def _labels_to_logits(self, path: Path, labels: np.ndarray) -> np.ndarray:
        bad = (labels != 255) & ((labels < 0) | (labels >= self.num_classes))
        if bad.any():
            raise ValueError(f"teacher label file {path} has values "
                             f"{sorted(np.unique(labels[bad]).tolist())[:5]} outside trainIds "
                             f"0..{self.num_classes - 1} and 255")
        onehot = (labels[..., None] == np.arange(self.num_classes)).astype(np.float32) * self.label_logit
        onehot[labels == 255] = np.nan
        return onehot

    def load(self, example_id: str, image_shape: tuple[int, int]) -> np.ndarray:
        """(h,w,C) float32 class logits of one example (NaN where the label is 255)."""
        path = self.path_for(example_id)
        if path.suffix == ".npy":
            arr = np.load(path)
            if arr.ndim == 3 and np.issubdtype(arr.dtype, np.floating):
                if arr.shape[-1] != self.num_classes:
                    raise ValueError(f"teacher logits file {path} has {arr.shape[-1]} classes, the "
                                     f"grouping expects {self.num_classes}")
                self._check_size(path, arr.shape[:2], image_shape)
                return arr.astype(np.float32)
            if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"teacher file {path}: need (h,w,{self.num_classes}) float logits or "
                                 f"(h,w) integer trainIds, got {arr.dtype} {arr.shape}")
            labels = arr.astype(np.int64)
        else:
            from PIL import Image

            with Image.open(path) as im:
                if im.mode not in ("L", "P", "I;16", "I"):
                    raise ValueError(f"teacher label file {path} has image mode {im.mode}; need a "
                                     "single-channel trainId PNG")
                labels = np.asarray(im).astype(np.int64)
        self._check_size(path, labels.shape, image_shape)
        return self._labels_to_logits(path, labels)

    def class_logits(self, images: np.ndarray, example_ids: Sequence[str]) -> np.ndarray | list:
        """(N,h,w,C) when the batch's label files share a size; else the list of N (h_i,w_i,C) maps
        (raw KITTI frames differ in size by recording date: 1242x375, 1226x370, 1241x376), which
        `precompute` resizes to the store size each on its own."""
        maps = [self.load(i, images.shape[1:3]) for i in example_ids]
        if len({m.shape for m in maps}) > 1:
            return maps
        return np.stack(maps)


def make_backend(spec: str, *, num_classes: int = 19, **options):
    """Builds a backend from ``flax:WORKDIR`` | ``onnx:FILE`` | ``labels:DIR`` and its options."""
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise ValueError(f"teacher backend {spec!r} must look like flax:WORKDIR, onnx:FILE or labels:DIR")
    if kind == "onnx":
        return OnnxBackend(path, num_classes=num_classes, **options)
    if kind == "labels":
        return LabelsBackend(path, num_classes=num_classes, **options)
    if kind == "flax":
        from data_pipelines.teacher.train_teacher import FlaxBackend

        return FlaxBackend(path, num_classes=num_classes, **options)
    raise ValueError(f"unknown teacher backend kind {kind!r} in {spec!r}; known: flax, onnx, labels")
