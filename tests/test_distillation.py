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
