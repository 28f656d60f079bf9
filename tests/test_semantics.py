"""Class groupings: membership tables, probability mass under grouping, label mapping, errors."""

import jax
import numpy as np
import pytest

from xdistill_jax import semantics


def test_geometric_grouping_matches_design():
    g = semantics.get_grouping("geometric")
    assert g.num_groups == 7 and g.num_classes == 19
    # trainIds: road 0, sidewalk 1, building 2, wall 3, fence 4, pole 5, light 6, sign 7,
    # vegetation 8, terrain 9, sky 10, person 11, rider 12, car 13, truck 14, bus 15, train 16,
    # motorcycle 17, bicycle 18
    assert g.class_to_group == (0, 0, 1, 1, 1, 2, 2, 2, 3, 0, 4, 5, 5, 6, 6, 6, 6, 5, 5)


def test_cityscapes_categories_and_classes19():
    c = semantics.get_grouping("cityscapes_categories")
    assert c.group_names == ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
    assert c.class_to_group == (0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 6, 6, 6, 6, 6)
    assert semantics.get_grouping("none").class_to_group == tuple(range(19))
    assert semantics.get_grouping("classes19") is semantics.get_grouping("none")


def test_unknown_grouping_lists_known_names():
    with pytest.raises(ValueError, match="unknown class grouping 'geometrc'.*cityscapes_categories"):
        semantics.get_grouping("geometrc")


def test_grouping_sums_probability_mass_hand_worked():
    # Class probabilities chosen by hand (sum 1); logits = log p + an arbitrary shared offset 3.
    p = np.array([0.10, 0.20, 0.02, 0.03, 0.05, 0.01, 0.01, 0.03, 0.15, 0.05,
                  0.10, 0.04, 0.01, 0.11, 0.02, 0.01, 0.01, 0.02, 0.03])
    assert abs(p.sum() - 1.0) < 1e-12
    logits = np.log(p) + 3.0
    # geometric groups by hand:
    # ground = road .10 + sidewalk .20 + terrain .05 = .35; structure = .02+.03+.05 = .10
    # thin = .01+.01+.03 = .05; vegetation .15; sky .10
    # people = person .04 + rider .01 + motorcycle .02 + bicycle .03 = .10
    # vehicles = car .11 + truck .02 + bus .01 + train .01 = .15
    expected = np.array([0.35, 0.10, 0.05, 0.15, 0.10, 0.10, 0.15])
    out = semantics.group_logits(logits[None, None], "geometric")
    probs = np.asarray(jax.nn.softmax(out, axis=-1))[0, 0]
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    # the raw group logit is log(group mass) + the shared offset (the normaliser is shared)
    np.testing.assert_allclose(np.asarray(out)[0, 0], np.log(expected) + 3.0, atol=1e-5)
    np.testing.assert_allclose(semantics.group_logits_np(logits[None], "geometric")[0],
                               np.log(expected) + 3.0, atol=1e-5)


def test_group_logits_stable_for_large_logits_and_bf16():
    logits = np.zeros((2, 19), np.float32)
    logits[0, 13] = 1000.0  # car dominates; naive exp would overflow
    out = np.asarray(semantics.group_logits(logits.astype(np.float16), "geometric"))
    assert np.isfinite(out).all() and out.dtype == np.float32
    assert out[0].argmax() == 6
    np.testing.assert_allclose(out[1], np.log([3, 3, 3, 1, 1, 4, 4]), atol=1e-3)


def test_class_count_mismatch_names_both_counts():
    with pytest.raises(ValueError, match="20 classes but grouping 'geometric' expects 19"):
        semantics.group_logits(np.zeros((1, 20)), "geometric")


def test_group_labels_keeps_ignore():
    labels = np.array([[0, 9, 255], [17, 16, 10]], np.uint8)
    np.testing.assert_array_equal(semantics.group_labels(labels, "geometric"),
                                  [[0, 0, 255], [5, 6, 4]])
    np.testing.assert_array_equal(semantics.group_labels(labels, "cityscapes_categories"),
                                  [[0, 3, 255], [6, 6, 4]])
    np.testing.assert_array_equal(np.asarray(semantics.group_labels(jax.numpy.asarray(labels))),
                                  [[0, 0, 255], [5, 6, 4]])
    with pytest.raises(ValueError, match=r"values \[19, 200\] outside trainIds 0..18"):
        semantics.group_labels(np.array([19, 200, 3]), "geometric")


def test_group_labels_out_of_range_map_to_ignore_on_jax_input_as_numpy_refuses_them():
    """The jax path clipped labels into 0..255, so -3 became road's group 0; now every label
    outside 0..C-1 maps to 255 there (numpy input: a ValueError naming them)."""
    labels = np.array([0, 19, 255, -3, -1, 256, 1000, 13], np.int32)
    out = np.asarray(semantics.group_labels(jax.numpy.asarray(labels), "geometric"))
    np.testing.assert_array_equal(out, [0, 255, 255, 255, 255, 255, 255, 6])
    # under jit too, and the in-range labels as the numpy path maps them
    jitted = jax.jit(lambda x: semantics.group_labels(x, "cityscapes_categories"))
    np.testing.assert_array_equal(np.asarray(jitted(jax.numpy.asarray(labels))),
                                  [0, 255, 255, 255, 255, 255, 255, 6])
    inside = np.arange(19)
    np.testing.assert_array_equal(np.asarray(semantics.group_labels(jax.numpy.asarray(inside))),
                                  semantics.group_labels(inside))
    with pytest.raises(ValueError, match=r"values \[-3\] outside trainIds 0..18"):
        semantics.group_labels(np.array([-3, 2]), "geometric")
