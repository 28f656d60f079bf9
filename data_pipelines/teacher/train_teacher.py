"""Train our own segmentation teacher (`xdistill teacher train`) and load it back (`flax:` backend).

Data layouts (image, trainId label) pairs:
- ``cityscapes``: ``ROOT/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` with
  ``ROOT/gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png``.
- ``synthetic``: the synthetic world (KITTI raw layout): the frames of
  ``ROOT/splits/<split>_files.txt``, left (``image_02``) or right (``image_03``) camera as the
  line says, with the semantic trainId PNG of the same frame (see `synthetic_label_path`).

Training: images resized to (height, width) (PIL bilinear; labels nearest), random horizontal
flip, pixel cross-entropy (255 ignored) on logits bilinearly upsampled to the input size, AdamW
with cosine decay, one jitted step. Workdir: ``config.json`` (the `TeacherTrainConfig`) and
``checkpoints/`` (orbax, via `xdistill_jax.checkpoints.Checkpointer`); rerunning resumes from the
latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

CONFIG_FILE = "config.json"


@dataclasses.dataclass
class TeacherTrainConfig:
    data_dir: str = ""
    layout: str = "cityscapes"         # "cityscapes" | "synthetic"
    split: str = "train"
    variant: str = "resnet18_tiny"     # models.segmentation variant ("resnet50" for real use)
    num_classes: int = 19
    height: int = 64                   # training / inference input size (multiple of 32)
    width: int = 192
    batch_size: int = 4
    steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    save_every: int = 100
    pretrained: str = ""               # torchvision ResNet state-dict .pth for the encoder (optional)

    def validate(self) -> None:
        if self.layout not in ("cityscapes", "synthetic"):
            raise ValueError(f"teacher layout must be 'cityscapes' or 'synthetic', got {self.layout!r}")
        if self.height % 32 or self.width % 32:
            raise ValueError(f"teacher height/width must be multiples of 32, got {self.height}x{self.width}")
        for key in ("batch_size", "steps", "save_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"teacher {key} must be >= 1, got {getattr(self, key)}")


# ----------------------------------------------------------------------------- data

def cityscapes_pairs(root, split: str) -> list[tuple[Path, Path]]:
    root = Path(root)
    images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    if not images:
        raise ValueError(f"no images matching {root}/leftImg8bit/{split}/<city>/*_leftImg8bit.png")
    pairs = []
    for img in images:
        stem = img.name[: -len("_leftImg8bit.png")]
        label = root / "gtFine" / split / img.parent.name / f"{stem}_gtFine_labelTrainIds.png"
        if not label.is_file():
            raise ValueError(f"label {label} missing for image {img}")
        pairs.append((img, label))
    return pairs


SYNTHETIC_LABEL_FOLDER = {"l": "semantic_02", "r": "semantic_03"}


def synthetic_label_path(root, folder: str, frame: int, side: str) -> Path:
    """Semantic trainId PNG of a synthetic-world frame (layout of data_pipelines/synthetic_world)."""
    return Path(root) / folder / SYNTHETIC_LABEL_FOLDER[side] / "data" / f"{frame:010d}.png"


def synthetic_pairs(root, split: str) -> list[tuple[Path, Path]]:
    root = Path(root)
    split_file = root / "splits" / f"{split}_files.txt"
    if not split_file.is_file():
        raise ValueError(f"split file {split_file} does not exist")
    pairs = []
    for lineno, line in enumerate(split_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3 or parts[2] not in ("l", "r"):
            raise ValueError(f"{split_file}:{lineno}: expected 'FOLDER FRAME l|r', got {line!r}")
        folder, frame, side = parts[0], int(parts[1]), parts[2]
        cam = "image_02" if side == "l" else "image_03"
        img = root / folder / cam / "data" / f"{frame:010d}.png"
        label = synthetic_label_path(root, folder, frame, side)
        for p in (img, label):
            if not p.is_file():
                raise ValueError(f"{split_file}:{lineno}: {p} does not exist")
        pairs.append((img, label))
    return pairs


def load_pair(image_path: Path, label_path: Path, height: int, width: int, num_classes: int = 19):
    """uint8 (height,width,3) image (bilinear) and uint8 (height,width) trainIds (nearest).

    A label value outside 0..num_classes-1 and 255 (ignore) is an error naming the file (the
    loss would have counted it as class 0, road: e.g. a Cityscapes labelIds PNG, ids 0..33,
    given for a labelTrainIds one)."""
    from PIL import Image

    with Image.open(image_path) as im:
        image = np.asarray(im.convert("RGB").resize((width, height), Image.BILINEAR))
    with Image.open(label_path) as lb:
        if lb.mode not in ("L", "P"):
            raise ValueError(f"label {label_path} has mode {lb.mode}; need a single-channel trainId PNG")
        full = np.asarray(lb)
        bad = (full >= num_classes) & (full != 255)  # elementwise: loading a 2048x1024 label is a hot path
        if bad.any():
            values = np.unique(full[bad])[:8].tolist()
            raise ValueError(f"label {label_path}: values {values} are not trainIds 0..{num_classes - 1} "
                             "or 255 (ignore); a labelIds PNG instead of labelTrainIds?")
        label = np.asarray(lb.resize((width, height), Image.NEAREST))
    return image, label


# ----------------------------------------------------------------------------- training

def _cross_entropy(logits, labels, num_classes: int):
    import jax
    import jax.numpy as jnp

    valid = labels != 255
    safe = jnp.where(valid & (labels < num_classes), labels, 0).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def _model(cfg: TeacherTrainConfig):
    from xdistill_jax.models.segmentation import make_segmentation_net

    return make_segmentation_net(cfg.variant, num_classes=cfg.num_classes)


def _optimizer(cfg: TeacherTrainConfig):
    import optax

    return optax.adamw(optax.cosine_decay_schedule(cfg.lr, cfg.steps), weight_decay=cfg.weight_decay)


def _init_state(cfg: TeacherTrainConfig, model, tx):
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((1, cfg.height, cfg.width, 3), jnp.float32)
    variables = model.init(jax.random.PRNGKey(cfg.seed), x, train=False)
    params, stats = variables["params"], variables["batch_stats"]
    if cfg.pretrained:
        from xdistill_jax.convert import load_torchvision_resnet

        enc = load_torchvision_resnet(cfg.pretrained, model.num_layers)
        params = {**params, "encoder": enc["params"]}
        stats = {**stats, "encoder": enc["batch_stats"]}
    return {"params": params, "batch_stats": stats, "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32)}


# What a resumed teacher run may change: how long it trains (the cosine schedule then follows the
# new length) and how often it saves. Anything else would continue one run under another's
# settings, and `flax:` inference would read the last run's input size.
RESUMABLE_CHANGES = ("steps", "save_every")


def _check_resume(cfg: TeacherTrainConfig, workdir: Path) -> None:
    """Refuses to resume a teacher workdir's checkpoint under other settings, naming the keys."""
    from xdistill_jax.inference import checkpoint_steps

    if not (workdir / CONFIG_FILE).is_file() or not checkpoint_steps(workdir):
        return
    saved = read_teacher_config(workdir)
    diffs = [f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(cfg, f.name)!r}"
             for f in dataclasses.fields(TeacherTrainConfig)
             if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(cfg, f.name)]
    if diffs:
        raise ValueError(f"{workdir / CONFIG_FILE}: the teacher checkpoint here was trained with other "
                         f"settings ({'; '.join(diffs)}); use another --workdir, or the same "
                         f"settings to resume (only {', '.join(RESUMABLE_CHANGES)} may change)")


def train_teacher(cfg: TeacherTrainConfig, workdir, *, log_every: int = 20) -> dict:
    """Trains (or resumes) a segmentation teacher in `workdir`; returns final metrics."""
    import jax
    import jax.numpy as jnp
    import optax

    from xdistill_jax.checkpoints import Checkpointer

    cfg.validate()
    workdir = Path(workdir)
    _check_resume(cfg, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pairs = (cityscapes_pairs if cfg.layout == "cityscapes" else synthetic_pairs)(cfg.data_dir, cfg.split)
    tmp = workdir / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    os.replace(tmp, workdir / CONFIG_FILE)

    model = _model(cfg)
    tx = _optimizer(cfg)
    ckpt = Checkpointer(workdir / "checkpoints", keep=2, async_save=False)
    # pretrained="": a resumed run's weights are in its checkpoint, the ImageNet file is not read
    abstract = jax.eval_shape(lambda: _init_state(dataclasses.replace(cfg, pretrained=""), model, tx))
    state, _, _ = ckpt.restore(abstract)
    if state is None:
        # one compiled program, not hundreds of eagerly dispatched ops (cold: 5 s instead of 8);
        # a pretrained encoder is read from disk, outside the trace
        if cfg.pretrained:
            state = _init_state(cfg, model, tx)
        else:  # its threefry draws unrolled on the CPU: compiled in 1.6 s instead of 5.4, the same bits
            from xdistill_jax import threefry_cpu

            init = jax.jit(lambda: _init_state(cfg, model, tx))
            with threefry_cpu.for_key(jax.random.PRNGKey(cfg.seed)):
                init = init.lower().compile()
            state = init()

    @jax.jit
    def step_fn(state, images, labels):
        def loss_fn(params):
            logits, new = model.apply({"params": params, "batch_stats": state["batch_stats"]},
                                      images, train=True, mutable=["batch_stats"])
            logits = jax.image.resize(logits, logits.shape[:1] + labels.shape[1:3] + logits.shape[3:],
                                      "linear", antialias=False)
            return _cross_entropy(logits, labels, cfg.num_classes), new["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "batch_stats": stats,
                "opt_state": opt_state, "step": state["step"] + 1}, loss

    start = int(state["step"])
    loss = float("nan")
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])  # data order depends on the step only
        idx = rng.integers(0, len(pairs), cfg.batch_size)
        batch = [load_pair(*pairs[i], cfg.height, cfg.width, cfg.num_classes) for i in idx]
        images = np.stack([b[0] for b in batch]).astype(np.float32) / 255.0
        labels = np.stack([b[1] for b in batch]).astype(np.int32)
        flip = rng.random(cfg.batch_size) < 0.5
        images[flip], labels[flip] = images[flip, :, ::-1], labels[flip, :, ::-1]
        state, loss_arr = step_fn(state, jnp.asarray(images), jnp.asarray(labels))
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            loss = float(loss_arr)
            if not np.isfinite(loss):
                raise FloatingPointError(f"teacher loss is {loss} at step {step + 1}")
            print(f"teacher step {step + 1}/{cfg.steps} loss {loss:.4f}", flush=True)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            ckpt.save(step + 1, state)
    ckpt.close()
    return {"steps": cfg.steps, "steps_run": max(cfg.steps - start, 0), "loss": loss}


def read_teacher_config(workdir) -> TeacherTrainConfig:
    """The `TeacherTrainConfig` saved in a teacher workdir (errors name the file and keys)."""
    cfg_path = Path(workdir) / CONFIG_FILE
    if not cfg_path.is_file():
        raise ValueError(f"{cfg_path}: not a teacher workdir (run `xdistill teacher train` first)")
    known = {f.name for f in dataclasses.fields(TeacherTrainConfig)}
    raw = json.loads(cfg_path.read_text())
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{cfg_path}: unknown teacher config keys {unknown}")
    return TeacherTrainConfig(**raw)


def load_teacher(workdir):
    """(model, variables {"params","batch_stats"}, config, checkpoint step) of a trained teacher
    workdir."""
    import jax

    from xdistill_jax.checkpoints import Checkpointer

    workdir = Path(workdir)
    cfg = read_teacher_config(workdir)
    model = _model(cfg)
    tx = _optimizer(cfg)
    ckpt = Checkpointer(workdir / "checkpoints", keep=2, async_save=False)
    # pretrained="" : the abstract target must not read the ImageNet file again
    state, _, step = ckpt.restore(jax.eval_shape(lambda: _init_state(
        dataclasses.replace(cfg, pretrained=""), model, tx)))
    ckpt.close()
    if state is None:
        raise ValueError(f"{workdir}/checkpoints: no teacher checkpoint to load")
    return model, {"params": state["params"], "batch_stats": state["batch_stats"]}, cfg, step


class FlaxBackend:
    """``flax:WORKDIR`` teacher backend: our checkpoint, jitted, logits at stride 4."""

    resize_method = "linear"
    nan_means_no_opinion = False  # a NaN from a network is a broken teacher (precompute.check_finite)

    def __init__(self, workdir, *, num_classes: int = 19):
        import jax

        self.workdir = Path(workdir)
        cfg = read_teacher_config(self.workdir)
        if cfg.num_classes != num_classes:
            raise ValueError(f"flax teacher {self.workdir} has {cfg.num_classes} classes but "
                             f"the grouping expects {num_classes} teacher classes")
        self.model, self.variables, self.config, self.step = load_teacher(self.workdir)
        if self.step < self.config.steps:  # an interrupted run: its logits are not the teacher's
            raise ValueError(f"flax teacher {self.workdir}: its last checkpoint is of step {self.step} "
                             f"of {self.config.steps}; finish the run first (`xdistill teacher train` "
                             "with the same --workdir and settings resumes it)")
        self.num_classes = num_classes
        self._apply = jax.jit(lambda v, x: self.model.apply(v, x, train=False))

    def describe(self) -> dict:
        return {"backend": f"flax:{self.workdir}", "variant": self.config.variant,
                "input_size": [self.config.height, self.config.width], "step": self.step}

    def class_logits(self, images: np.ndarray, example_ids: Sequence[str]) -> np.ndarray:
        from data_pipelines.teacher.backends import _resize_images

        x = _resize_images(images, self.config.height, self.config.width)
        return np.asarray(self._apply(self.variables, x), np.float32)
