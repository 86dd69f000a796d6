from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.metrics import confusion, iou_per_class, mean_iou, pixel_accuracy


def test_confusion_matches_hand_count():
    target = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 0, 2]])
    conf = confusion(pred, target, 3)
    np.testing.assert_array_equal(conf, [[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    iou = iou_per_class(conf)
    np.testing.assert_allclose(iou, [1 / 3, 2 / 3, 0.0])
    assert mean_iou(conf) == np.mean([1 / 3, 2 / 3, 0.0])
    assert pixel_accuracy(conf) == 3 / 5


def test_rectangular_confusion_counts_ignore_predictions_in_the_last_column():
    target = np.array([0, 0, 1, 2, 255])
    pred = np.array([0, 3, 1, 3, 0])  # 3 = "ignored" with K = 3
    conf = confusion(pred, target, 3, pred_classes=4)
    np.testing.assert_array_equal(conf, [[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 1]])


def test_absent_class_is_nan_and_skipped():
    conf = confusion(np.array([0, 1]), np.array([0, 1]), 3)
    assert np.isnan(iou_per_class(conf)[2]) and mean_iou(conf) == 1.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.one_of(st.integers(0, 3), st.just(255))), min_size=1, max_size=60))
def test_confusion_counts_every_non_ignore_pixel(pairs):
    pred, target = np.array(pairs).T
    conf = confusion(pred, target, 4)
    assert conf.sum() == (target != 255).sum()
    for p, t in pairs:
        if t != 255:
            assert conf[t, p] >= 1
