"""Cross-task distillation loss: translator group logits against the teacher's group targets.

The translator maps predicted disparity to G group logits (B,h,w,G); the teacher gives either
group logits (B,h',w',G) (float, e.g. float16 from the logits store) or group labels (B,h',w')
(integer group ids, 255 = ignore).

Ignored pixels, the same in both modes: an integer label outside 0..G-1 (255, the ignore value,
or any other), and teacher *logits* that are equal for every group at a pixel (no opinion: that
is how the logits store represents label 255; the `labels:` teacher backend writes all-zero
logits there). They are left out of the mean's numerator and denominator; an all-ignored batch
gives 0, not NaN. Two modes:

- ``"hard"`` (default): cross-entropy to the teacher's argmax (or to the labels), averaged over
  the valid pixels.
- ``"soft"``: ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` summed over groups and
  averaged over the valid pixels (Hinton et al.'s scaling keeps gradient magnitude independent
  of T). Needs teacher logits.

Resolution: when the teacher's (h',w') differs from the translator's (h,w), the teacher is
resized to (h,w): labels and the hard-mode argmax by nearest neighbour (pixel centres,
``src = floor((dst + 0.5) * in / out)``, so no label is invented); logits in soft mode
bilinearly (half-pixel centres, no antialiasing), since a blend of logits is itself a valid,
smooth teacher distribution. The ignored pixels are found at the teacher's resolution and resized
by nearest neighbour in both modes, so soft mode ignores exactly the pixels hard mode ignores; in
soft mode a valid pixel next to an ignored one blends its valid neighbours only (the bilinear
weights renormalised over them: an ignored pixel's all-equal logits would flatten the target).
All arithmetic and reductions are float32 whatever the inputs' dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = 255


def _nearest_indices(out_size: int, in_size: int):
    idx = jnp.floor((jnp.arange(out_size) + 0.5) * (in_size / out_size)).astype(jnp.int32)
    return jnp.clip(idx, 0, in_size - 1)


def resize_nearest(x, height: int, width: int):
    """Nearest-neighbour resize of (B,H,W[,C]) to (B,height,width[,C]); keeps dtype."""
    if x.shape[1] == height and x.shape[2] == width:
        return x
    rows = _nearest_indices(height, x.shape[1])
    cols = _nearest_indices(width, x.shape[2])
    return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)


def resize_bilinear(x, height: int, width: int):
    """Bilinear resize of (B,H,W,C) float to (B,height,width,C) float32, half-pixel centres."""
    x = x.astype(jnp.float32)
    if x.shape[1] == height and x.shape[2] == width:
        return x
    return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), "linear", antialias=False)


def _teacher_is_labels(teacher) -> bool:
    if jnp.issubdtype(teacher.dtype, jnp.integer):
        return True
    if jnp.issubdtype(teacher.dtype, jnp.floating):
        return False
    raise ValueError(f"teacher must be integer labels or float logits, got dtype {teacher.dtype}")


def distillation_loss(translator_logits, teacher, *, mode: str = "hard", temperature: float = 1.0,
                      ignore_index: int = IGNORE_INDEX):
    """Distillation loss (float32 scalar).

    Args:
      translator_logits: (B,h,w,G) student group logits (any float dtype).
      teacher: (B,h',w',G) float group logits, or (B,h',w') / (B,h',w',1) integer group ids.
      mode: "hard" (cross-entropy to the teacher's argmax / labels) or "soft" (KL at temperature).
      temperature: T > 0 for soft mode (ignored in hard mode).
      ignore_index: the label that marks an ignored pixel (any label outside [0, G) is ignored).
    """
    if mode not in ("hard", "soft"):
        raise ValueError(f"distillation mode must be 'hard' or 'soft', got {mode!r}")
    if translator_logits.ndim != 4:
        raise ValueError(f"translator_logits must be (B,h,w,G), got shape {translator_logits.shape}")
    b, h, w, g = translator_logits.shape
    is_labels = _teacher_is_labels(teacher)
    if is_labels and teacher.ndim == 4 and teacher.shape[-1] == 1:
        teacher = teacher[..., 0]
    if is_labels and teacher.ndim != 3:
        raise ValueError(f"teacher labels must be (B,h,w), got shape {teacher.shape}")
    if not is_labels and (teacher.ndim != 4 or teacher.shape[-1] != g):
        raise ValueError(f"teacher logits shape {teacher.shape} does not match translator logits "
                         f"{translator_logits.shape}: need (B,h',w',{g})")
    if teacher.shape[0] != b:
        raise ValueError(f"teacher batch {teacher.shape[0]} != translator batch {b}")

    student = translator_logits.astype(jnp.float32)
    if is_labels:
        labels = resize_nearest(teacher, h, w).astype(jnp.int32)
        # a label outside the G groups (255, or e.g. a trainId given where a group id is due) has
        # no student logit to compare with: ignored, not counted as a pixel of zero loss
        valid = (labels != ignore_index) & (labels >= 0) & (labels < g)
    else:
        # "all groups equal" (no opinion, e.g. an ignored label), found at the teacher's resolution
        flat = jnp.max(teacher, axis=-1) == jnp.min(teacher, axis=-1)
        valid = ~resize_nearest(flat, h, w)
    count = jnp.sum(valid.astype(jnp.float32))

    if mode == "soft":
        if is_labels:
            raise ValueError("soft distillation needs teacher logits, got integer labels")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        t = jnp.float32(temperature)
        if teacher.shape[1:3] == (h, w):
            tl = teacher.astype(jnp.float32) / t
        else:  # the ignored pixels' logits left out of their valid neighbours' blend: the bilinear
            # weights renormalised over the valid teacher pixels (a valid pixel's nearest teacher
            # pixel is one of its taps, weighted >= 1/2 along each axis: the sum is >= 1/4 there)
            keep = (~flat).astype(jnp.float32)[..., None]
            blend = resize_bilinear(teacher.astype(jnp.float32) * keep, h, w)
            tl = blend / jnp.maximum(resize_bilinear(keep, h, w), 0.25) / t
        log_p = jax.nn.log_softmax(tl, axis=-1)
        log_q = jax.nn.log_softmax(student / t, axis=-1)
        kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # (B,h,w)
        masked = jnp.sum(jnp.where(valid, kl, 0.0)) / jnp.maximum(count, 1.0)
        # with every pixel valid, jnp.mean(kl) itself: bitwise the loss (and gradient: the other
        # branch's cotangent is an exact 0) of before ignored pixels left soft mode, eagerly and
        # under jit, where XLA may order the masked sum's float32 additions otherwise
        mean = jnp.where(count == kl.size, jnp.mean(kl), masked)
        return mean * t * t

    if not is_labels:
        labels = resize_nearest(jnp.argmax(teacher, axis=-1).astype(jnp.int32), h, w)
    safe = jnp.where(valid, labels, 0)
    log_q = jax.nn.log_softmax(student, axis=-1)
    # The label's log-probability as a masked sum over the groups, not a gather: the same value
    # (the other terms are exact zeros) and the same gradient, but its gradient is a select that
    # fuses into the softmax's backward instead of a scatter (atomics on a GPU).
    nll = -jnp.sum(jnp.where(safe[..., None] == jnp.arange(g), log_q, 0.0), axis=-1)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1.0)
