"""Distillation loss values worked out by hand, resizing, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xdistill_jax.distillation import distillation_loss, resize_nearest


def test_hard_mode_by_hand_with_ignore():
    # 3 pixels, G=3. Pixel 0: uniform student, target 1 -> CE ln 3.
    # Pixel 1: student softmax (.5,.25,.25), target 0 -> CE ln 2. Pixel 2: ignored (255).
    student = np.array([[[[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0], [5.0, -3.0, 1.0]]]], np.float32)
    labels = np.array([[[1, 0, 255]]], np.int32)
    loss = distillation_loss(jnp.asarray(student), jnp.asarray(labels), mode="hard")
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), (math.log(3) + math.log(2)) / 2, rtol=1e-6)
    # the same targets given as teacher logits (argmax 1 and 0) -- no ignore possible there
    teacher = np.array([[[[0.1, 2.0, 0.3], [9.0, 1.0, 1.0]]]], np.float16)
    loss = distillation_loss(jnp.asarray(student[:, :, :2]), jnp.asarray(teacher))
    np.testing.assert_allclose(float(loss), (math.log(3) + math.log(2)) / 2, rtol=1e-6)


def test_hard_mode_gradient_by_hand_without_a_scatter():
    # d CE / d logits = (softmax - one_hot(label)) / (number of counted pixels); 0 where ignored.
    student = np.array([[[[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0], [5.0, -3.0, 1.0]]]], np.float32)
    labels = np.array([[[1, 0, 255]]], np.int32)
    grad_fn = jax.jit(jax.grad(lambda s: distillation_loss(s, jnp.asarray(labels))))
    grad = np.asarray(grad_fn(jnp.asarray(student)))
    expected = np.array([[[[1 / 3, -2 / 3, 1 / 3], [0.5 - 1, 0.25, 0.25], [0.0, 0.0, 0.0]]]]) / 2
    np.testing.assert_allclose(grad, expected, atol=1e-7)
    # the label's log-probability is picked by a mask, not a gather: no scatter in the gradient
    assert "scatter" not in grad_fn.lower(jnp.asarray(student)).as_text()


def test_uniform_teacher_logits_are_ignored_in_hard_mode():
    student = np.array([[[[0.0, 0.0, 0.0], [math.log(2), 0.0, 0.0]]]], np.float32)
    teacher = np.array([[[[0.0, 0.0, 0.0], [3.0, 1.0, 1.0]]]], np.float16)  # pixel 0: no opinion
    loss = distillation_loss(jnp.asarray(student), jnp.asarray(teacher))
    np.testing.assert_allclose(float(loss), math.log(2), rtol=1e-6)


def test_hard_mode_all_ignored_is_zero_not_nan():
    loss = distillation_loss(jnp.zeros((1, 2, 2, 3)), jnp.full((1, 2, 2), 255, jnp.uint8))
    assert float(loss) == 0.0


def test_soft_mode_by_hand():
    # T=2. Pixel 0: teacher (2 ln3, 0)/2 -> p=(.75,.25); student (0,0) -> q=(.5,.5).
    # KL = .75 ln(1.5) + .25 ln(.5). Pixel 1: teacher == student -> KL 0. Loss = T^2 * mean.
    teacher = np.array([[[[2 * math.log(3), 0.0], [1.0, -1.0]]]], np.float32)
    student = np.array([[[[0.0, 0.0], [1.0, -1.0]]]], np.float32)
    expected = 4 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2
    loss = distillation_loss(jnp.asarray(student), jnp.asarray(teacher), mode="soft",
                             temperature=2.0)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # T=1 on the same data: p = softmax(2 ln3, 0) = (.9,.1)
    expected1 = (0.9 * math.log(1.8) + 0.1 * math.log(0.2)) / 2
    loss1 = distillation_loss(jnp.asarray(student), jnp.asarray(teacher), mode="soft")
    np.testing.assert_allclose(float(loss1), expected1, rtol=1e-5)


def test_teacher_resized_nearest_to_translator_resolution():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (2, 3, 5)).astype(np.int32)
    labels[0, 1, 2] = 255
    student = rng.normal(size=(2, 6, 10, 4)).astype(np.float32)
    up = np.repeat(np.repeat(labels, 2, axis=1), 2, axis=2)
    np.testing.assert_array_equal(np.asarray(resize_nearest(jnp.asarray(labels), 6, 10)), up)
    a = distillation_loss(jnp.asarray(student), jnp.asarray(labels))
    b = distillation_loss(jnp.asarray(student), jnp.asarray(up))
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    # downsampling by 2 picks pixel centres 1, 3, 5 (floor((i + .5) * 2))
    np.testing.assert_array_equal(
        np.asarray(resize_nearest(jnp.asarray(up), 3, 5)), up[:, 1::2, 1::2])
    # soft mode with logits at another resolution: bilinear, equal when the map is constant
    t = np.tile(np.array([2.0, 0.0, 0.0, 1.0], np.float32), (2, 3, 5, 1))
    s = np.tile(np.array([0.0, 0.0, 0.0, 0.0], np.float32), (2, 6, 10, 1))
    same = distillation_loss(jnp.asarray(s), jnp.asarray(np.tile(t[:, :1, :1], (1, 6, 10, 1))),
                             mode="soft")
    np.testing.assert_allclose(float(distillation_loss(jnp.asarray(s), jnp.asarray(t),
                                                       mode="soft")), float(same), rtol=1e-6)


def test_bad_inputs_are_named():
    s = jnp.zeros((1, 2, 2, 7))
    with pytest.raises(ValueError, match=r"teacher logits shape \(1, 2, 2, 19\).*\(B,h',w',7\)"):
        distillation_loss(s, jnp.zeros((1, 2, 2, 19)))
    with pytest.raises(ValueError, match="soft distillation needs teacher logits"):
        distillation_loss(s, jnp.zeros((1, 2, 2), jnp.int32), mode="soft")
    with pytest.raises(ValueError, match="mode must be 'hard' or 'soft'"):
        distillation_loss(s, jnp.zeros((1, 2, 2), jnp.int32), mode="kl")
    with pytest.raises(ValueError, match="teacher batch 2 != translator batch 1"):
        distillation_loss(s, jnp.zeros((2, 2, 2), jnp.int32))


def _kl(p_logits, q_logits, t=1.0):
    """KL(softmax(p/t) || softmax(q/t)) over the last axis, float64, from the definition."""
    lp = np.asarray(p_logits, np.float64) / t
    lq = np.asarray(q_logits, np.float64) / t
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    return (np.exp(lp) * (lp - lq)).sum(-1)


def test_soft_mode_at_another_resolution_blends_only_valid_teacher_pixels():
    """A valid pixel next to an ignored one blended the ignored pixel's all-zero logits into its
    target (here 0.75 x [4, 0] + 0.25 x [0, 0] = [3, 0]): a flatter target than the teacher's."""
    teacher = np.array([[[[4.0, 0.0], [0.0, 0.0]]]], np.float32)  # (1,1,2,2): valid, no opinion
    student = np.zeros((1, 1, 4, 2), np.float32)  # 2x wider: nearest -> pixels 0,0,1,1
    # translator pixel 0 samples x = -0.25 (teacher pixel 0 alone), pixel 1 x = 0.25 (0.75 of
    # pixel 0, 0.25 of the ignored pixel 1): both targets are teacher pixel 0's logits
    for t in (1.0, 2.0):
        loss = distillation_loss(jnp.asarray(student), jnp.asarray(teacher), mode="soft", temperature=t)
        np.testing.assert_allclose(float(loss), t * t * _kl(teacher[0, 0, 0], student[0, 0, 0], t), rtol=1e-6)
    # with no ignored pixel: the plain bilinear blend of the teacher's logits
    rng = np.random.default_rng(1)
    teacher = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
    student = rng.normal(size=(2, 6, 10, 4)).astype(np.float32)
    target = np.asarray(jax.image.resize(jnp.asarray(teacher), (2, 6, 10, 4), "linear", antialias=False))
    np.testing.assert_allclose(float(distillation_loss(jnp.asarray(student), jnp.asarray(teacher), mode="soft")),
                               _kl(target, student).mean(), rtol=1e-5)

def test_soft_mode_ignores_the_pixels_hard_mode_ignores():
    """All-zero teacher logits (the store's label 255) were uniform targets in soft mode and
    counted in the mean's denominator (loss 0.816 where the one valid pixel's KL is 2.264)."""
    rng = np.random.default_rng(0)
    student = rng.normal(size=(1, 2, 2, 7)).astype(np.float32)
    teacher = np.zeros((1, 2, 2, 7), np.float16)
    teacher[0, 0, 0, 3] = 10  # one labelled pixel, three with no opinion
    for t in (1.0, 2.0):
        loss = distillation_loss(jnp.asarray(student), jnp.asarray(teacher), mode="soft", temperature=t)
        np.testing.assert_allclose(float(loss), t * t * _kl(teacher[0, 0, 0], student[0, 0, 0], t), rtol=1e-5)
    # all ignored: 0 (not NaN), as in hard mode
    zero = jnp.zeros((1, 2, 2, 7), jnp.float16)
    assert float(distillation_loss(jnp.asarray(student), zero, mode="soft")) == 0.0
    # the same pixels as hard mode, with the teacher at another resolution too: both modes'
    # gradients are exactly 0 at the ignored pixels (no numerator) and nowhere else
    teacher = rng.normal(size=(2, 3, 5, 4)).astype(np.float32)
    teacher[0, 1, 2] = 0.0
    teacher[1, 0, 4] = 1.5  # no opinion: all groups equal, whatever the value
    student = jnp.asarray(rng.normal(size=(2, 6, 10, 4)).astype(np.float32))
    masks = []
    for mode in ("hard", "soft"):
        grad = jax.grad(lambda s: distillation_loss(s, jnp.asarray(teacher), mode=mode))(student)
        masks.append(np.asarray(jnp.all(grad == 0, axis=-1)))
    np.testing.assert_array_equal(masks[0], masks[1])
    ignored = np.zeros((2, 6, 10), bool)
    ignored[0, 2:4, 4:6] = ignored[1, 0:2, 8:10] = True  # nearest: each teacher pixel -> 2x2
    np.testing.assert_array_equal(masks[1], ignored)


def test_hard_mode_labels_outside_the_groups_are_ignored():
    """A label outside 0..G-1 other than 255 (9 with G=7, -1) counted as a valid pixel of zero
    loss: labels {3, 9, 255, 255} gave half the loss of label 3 alone."""
    rng = np.random.default_rng(0)
    student = rng.normal(size=(1, 2, 2, 7)).astype(np.float32)
    log_q = np.asarray(jax.nn.log_softmax(jnp.asarray(student), axis=-1))
    for other in (9, 7, -1, 300):
        labels = np.array([[[3, other], [255, 255]]], np.int32)
        loss = distillation_loss(jnp.asarray(student), jnp.asarray(labels))
        np.testing.assert_allclose(float(loss), -log_q[0, 0, 0, 3], rtol=1e-6)
    outside = np.array([[[9, -1], [7, 255]]], np.int32)
    assert float(distillation_loss(jnp.asarray(student), jnp.asarray(outside))) == 0.0


def _previous_loss(student, teacher, mode, temperature=1.0, ignore_index=255):
    """distillation_loss as it was before ignored pixels left soft mode's mean and out-of-range
    labels left hard mode's (teacher at the translator's resolution, as in training)."""
    g = student.shape[-1]
    student = student.astype(jnp.float32)
    if mode == "soft":
        t = jnp.float32(temperature)
        log_p = jax.nn.log_softmax(teacher.astype(jnp.float32) / t, axis=-1)
        log_q = jax.nn.log_softmax(student / t, axis=-1)
        return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)) * t * t
    if jnp.issubdtype(teacher.dtype, jnp.integer):
        labels = teacher.astype(jnp.int32)
    else:
        flat = jnp.max(teacher, axis=-1) == jnp.min(teacher, axis=-1)
        labels = jnp.where(flat, ignore_index, jnp.argmax(teacher, axis=-1)).astype(jnp.int32)
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    log_q = jax.nn.log_softmax(student, axis=-1)
    nll = -jnp.sum(jnp.where(safe[..., None] == jnp.arange(g), log_q, 0.0), axis=-1)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)


def test_loss_unchanged_where_no_pixel_is_ignored():
    """The default training path (hard, valid labels or non-constant logits; and soft mode with
    finite non-constant logits) gives bitwise the loss and gradient of the previous formula,
    eagerly and under jit; labels with 255 (the ignore the previous formula knew) too."""
    rng = np.random.default_rng(5)
    student = jnp.asarray(rng.normal(size=(2, 12, 40, 7)).astype(np.float32))
    logits = jnp.asarray((3 * rng.normal(size=(2, 12, 40, 7))).astype(np.float16))
    labels = rng.integers(0, 7, (2, 12, 40)).astype(np.int32)
    with_255 = labels.copy()
    with_255[0, :3] = 255
    cases = [(logits, "hard", 1.0), (jnp.asarray(labels), "hard", 1.0), (jnp.asarray(with_255), "hard", 1.0),
             (logits, "soft", 1.0), (logits, "soft", 2.0)]
    for teacher, mode, t in cases:
        def new(s, teacher=teacher, mode=mode, t=t):
            return distillation_loss(s, teacher, mode=mode, temperature=t)

        def old(s, teacher=teacher, mode=mode, t=t):
            return _previous_loss(s, teacher, mode, t)

        for wrap in (lambda f: f, jax.jit):
            assert np.asarray(wrap(new)(student)) == np.asarray(wrap(old)(student)), (mode, t)
            np.testing.assert_array_equal(np.asarray(wrap(jax.grad(new))(student)),
                                          np.asarray(wrap(jax.grad(old))(student)))
