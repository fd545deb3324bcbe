"""Segmentation stage: per-voxel masks and per-frame action labels: metrics, intervals, and whole-video inference.

Two kinds of segmentation share this module:

- per voxel (`--task segment` on records with a `mask`): class ids `int [..]`
  against predictions of the same shape; metric: IoU per class and its mean;
- per frame (`--task segment` on records with `frame labels` from
  `start,end,label` intervals): one class per frame; metrics: frame accuracy and
  segmental F1@{0.1, 0.25, 0.5} (Lea et al. 2017, as computed by MS-TCN): a
  predicted segment is a true positive when its IoU with an unmatched
  ground-truth segment of the same class reaches the threshold.

Ids below 0 (`IGNORE`) are unlabelled and left out of every metric.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

IGNORE = -1
F1_THRESHOLDS = (0.1, 0.25, 0.5)


# --- per-voxel metrics ----------------------------------------------------------------------------

def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """`int64 [num_classes, num_classes]` counts (rows: true class, columns: predicted); ids < 0 in y_true skipped."""
    y_true = np.asarray(y_true, np.int64).ravel()
    y_pred = np.asarray(y_pred, np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} values, y_pred {y_pred.size}")
    keep = y_true >= 0
    if np.any(y_true[keep] >= num_classes) or np.any((y_pred[keep] < 0) | (y_pred[keep] >= num_classes)):
        raise ValueError(f"class ids outside [0, {num_classes})")
    return np.bincount(y_true[keep] * num_classes + y_pred[keep],
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """IoU = TP / (TP + FP + FN) per class, `float64 [C]`; NaN for a class neither present nor predicted."""
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mask_metrics(confusion: np.ndarray, class_names: Sequence[str]) -> dict:
    """IoU per class, mean IoU (over classes with an IoU) and pixel accuracy of a confusion matrix."""
    iou = iou_per_class(confusion)
    total = confusion.sum()
    return {"mean_iou": float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else 0.0,
            "pixel_accuracy": float(np.trace(confusion) / total) if total else 0.0,
            "iou": {name: (None if np.isnan(v) else float(v)) for name, v in zip(class_names, iou)},
            "confusion": np.asarray(confusion).tolist()}


# --- per-frame metrics ----------------------------------------------------------------------------

def to_segments(labels: Sequence[int]) -> List[Tuple[int, int, int]]:
    """Frame labels -> runs `(label, first frame, end frame exclusive)`; unlabelled runs (< 0) are left out."""
    labels = np.asarray(labels, np.int64).ravel()
    if labels.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(labels)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [labels.size]])
    return [(int(labels[s]), int(s), int(e)) for s, e in zip(starts, ends) if labels[s] >= 0]


def segmental_f1(y_true: Sequence[int], y_pred: Sequence[int], threshold: float) -> float:
    """Segmental F1 at an IoU `threshold` of one sequence's frame labels (predicted ids must be >= 0)."""
    truth, predicted = to_segments(y_true), to_segments(y_pred)
    matched = [False] * len(truth)
    tp = fp = 0
    for label, start, end in predicted:
        best, best_iou = -1, 0.0
        for j, (t_label, t_start, t_end) in enumerate(truth):
            if t_label != label:
                continue
            inter = max(0, min(end, t_end) - max(start, t_start))
            union = max(end, t_end) - min(start, t_start)
            iou = inter / union
            if iou > best_iou:
                best, best_iou = j, iou
        if best >= 0 and best_iou >= threshold and not matched[best]:
            tp += 1
            matched[best] = True
        else:
            fp += 1
    fn = len(truth) - sum(matched)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def frame_metrics(sequences: Sequence[Tuple[Sequence[int], Sequence[int]]],
                  thresholds: Sequence[float] = F1_THRESHOLDS) -> dict:
    """Frame accuracy over all labelled frames, and segmental F1@thresholds averaged over sequences.

    `sequences` are `(y_true, y_pred)` pairs, one per video. Unlabelled frames
    (y_true < 0) count in neither accuracy nor segments.
    """
    correct = total = 0
    f1 = {t: [] for t in thresholds}
    for y_true, y_pred in sequences:
        y_true = np.asarray(y_true, np.int64)
        y_pred = np.asarray(y_pred, np.int64)
        keep = y_true >= 0
        correct += int(np.sum(y_true[keep] == y_pred[keep]))
        total += int(keep.sum())
        # Unlabelled frames are cut out of both sequences before segments are formed.
        for t in thresholds:
            f1[t].append(segmental_f1(y_true[keep], y_pred[keep], t))
    return {"frame_accuracy": correct / total if total else 0.0, "frames": total,
            **{f"f1@{t:g}": float(np.mean(v)) if v else 0.0 for t, v in f1.items()}}


# --- intervals ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Interval:
    start: float   # seconds
    end: float     # seconds, exclusive
    label: str

    def to_dict(self) -> dict:
        return {"start": round(self.start, 4), "end": round(self.end, 4), "label": self.label}


def frames_to_intervals(labels: Sequence[int], times: Sequence[float], end: float,
                        names: Sequence[str]) -> List[Interval]:
    """Per-frame labels with each frame's start time -> intervals; the last one ends at `end` (seconds)."""
    times = list(times)
    out = []
    for label, first, stop in to_segments(labels):
        out.append(Interval(float(times[first]), float(times[stop]) if stop < len(times) else float(end),
                            names[label]))
    return out


def label_frames(times: Sequence[float], intervals: Sequence[Tuple[float, float, int]]) -> np.ndarray:
    """`int64 [len(times)]`: the label of the interval `start <= t < end` holding each time, `IGNORE` if none.

    A later interval wins where intervals overlap.
    """
    out = np.full(len(times), IGNORE, np.int64)
    t = np.asarray(times, np.float64)
    for start, end, label in intervals:
        out[(t >= start) & (t < end)] = label
    return out
