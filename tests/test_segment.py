"""Segmentation: every metric against a hand-computed case, intervals <-> frame labels."""

import numpy as np
import pytest

from stpkeras import segment as sg


def test_iou_per_class_and_mean_hand_computed():
    y_true = [0, 0, 1, 1, 2, -1]
    y_pred = [0, 1, 1, 1, 0, 2]  # the last voxel is unlabelled: not counted
    confusion = sg.confusion_matrix(y_true, y_pred, 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # class 0: TP 1, union 2 + 2 - 1 = 3; class 1: TP 2, union 3 + 2 - 2 = 3; class 2: TP 0, union 1.
    np.testing.assert_allclose(sg.iou_per_class(confusion), [1 / 3, 2 / 3, 0.0])
    m = sg.mask_metrics(confusion, ["bg", "car", "tree"])
    assert m["mean_iou"] == pytest.approx(1 / 3)
    assert m["pixel_accuracy"] == pytest.approx(3 / 5)
    assert m["iou"] == pytest.approx({"bg": 1 / 3, "car": 2 / 3, "tree": 0.0})
    # A class neither present nor predicted has no IoU and does not pull the mean down.
    m = sg.mask_metrics(sg.confusion_matrix([0, 1], [0, 1], 3), ["a", "b", "c"])
    assert m["iou"] == {"a": 1.0, "b": 1.0, "c": None} and m["mean_iou"] == 1.0
    with pytest.raises(ValueError, match=r"class ids outside \[0, 2\)"):
        sg.confusion_matrix([0, 2], [0, 1], 2)


def test_segments_and_segmental_f1_hand_computed():
    y_true = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    y_pred = [0, 0, 1, 1, 1, 1, 1, 0, 1, 1]
    assert sg.to_segments(y_true) == [(0, 0, 4), (1, 4, 10)]
    assert sg.to_segments(y_pred) == [(0, 0, 2), (1, 2, 7), (0, 7, 8), (1, 8, 10)]
    assert sg.to_segments([-1, -1, 2, 2, -1]) == [(2, 2, 4)]
    # Predicted (0,0,2) vs true (0,0,4): IoU 0.5; (1,2,7) vs (1,4,10): 3/8; (0,7,8): 0; (1,8,10): 2/6,
    # its true segment already taken. At 0.1 and 0.25: TP 2, FP 2, FN 0 -> P 1/2, R 1 -> F1 2/3.
    assert sg.segmental_f1(y_true, y_pred, 0.1) == pytest.approx(2 / 3)
    assert sg.segmental_f1(y_true, y_pred, 0.25) == pytest.approx(2 / 3)
    # At 0.5 only the first: TP 1, FP 3, FN 1 -> P 1/4, R 1/2 -> F1 1/3.
    assert sg.segmental_f1(y_true, y_pred, 0.5) == pytest.approx(1 / 3)
    m = sg.frame_metrics([(y_true, y_pred), (y_true, y_true)])
    assert m["frames"] == 20
    assert m["frame_accuracy"] == pytest.approx(17 / 20)  # 7/10 and 10/10
    assert m["f1@0.1"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["f1@0.5"] == pytest.approx((1 / 3 + 1) / 2)
    # Unlabelled frames are cut out before segments are formed.
    assert sg.frame_metrics([([0, -1, 0], [0, 1, 0])])["f1@0.5"] == 1.0


def test_intervals_to_frame_labels_and_back():
    times = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    labels = sg.label_frames(times, [(0.0, 1.0, 0), (1.0, 2.2, 1)])
    assert labels.tolist() == [0, 0, 1, 1, 1, -1]
    intervals = sg.frames_to_intervals(labels[:5], times[:5], end=2.5, names=["walk", "run"])
    assert [i.to_dict() for i in intervals] == [{"start": 0.0, "end": 1.0, "label": "walk"},
                                                {"start": 1.0, "end": 2.5, "label": "run"}]
