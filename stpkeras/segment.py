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

import contextlib
import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from stpkeras.inference import Head, OverlapAddHead
from stpkeras.segmentation_data import class_names, data_kind, make_element
from tfrecords_tools import outputs
from tfrecords_tools.errors import BadInput
from tfrecords_tools.video import VideoWriter

IGNORE = -1
F1_THRESHOLDS = (0.1, 0.25, 0.5)


# --- per-voxel metrics ----------------------------------------------------------------------------

def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """`int64 [num_classes, num_classes]` counts (rows: true class, columns: predicted); ids < 0 in y_true skipped.

    One `np.bincount` rather than `sklearn.metrics.confusion_matrix`, which sorts the labels first: on the
    8.4M voxels of 256 patches of 8x64x64 it took 2.6 s where this takes 0.8 s (equal counts).
    """
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


# --- whole videos and converted data --------------------------------------------------------------

# Colours of classes 1, 2, ... in overlays (class 0, background, is left as it is).
PALETTE = np.array([[255, 40, 40], [40, 220, 40], [60, 90, 255], [255, 220, 0], [255, 0, 255], [0, 230, 230],
                    [255, 140, 0], [150, 60, 255]], np.float32)


class SegmentError(BadInput, ValueError):
    """A model or input that cannot be segmented as asked; the message names the path."""


@dataclasses.dataclass
class Segmenter:
    """A trained segment-task model: `logits(uint8 [n, T, H, W, 3])` -> float32 `[n, T, H, W, K]` or `[n, T, K]`."""

    model: object
    spec: object          # PatchSpec
    labels: Tuple[str, ...]
    kind: str             # "mask" or "frames"
    source: str

    def logits(self, patches: np.ndarray) -> np.ndarray:
        return np.asarray(self._call(patches), np.float32)

    def __post_init__(self):
        import tensorflow as tf
        model = self.model
        self._call = tf.function(lambda x: model(x, training=False), reduce_retracing=True)


def load_segmenter(path: str) -> Segmenter:
    """A run folder of `stp train --task segment` (or a `.keras` file in one) -> its `Segmenter`."""
    from stpkeras import artifacts

    try:
        artifact = artifacts.load(path, task="segment")
    except artifacts.ArtifactError as e:
        raise SegmentError(str(e)) from e
    if artifact.task != "segment" or artifact.form != "keras":
        raise SegmentError(f"{path}: the run's task is {artifact.task!r}; expected a model trained with --task segment")
    model = artifact.model
    kind = {5: "mask", 3: "frames"}.get(len(model.output_shape))
    if kind is None:
        raise SegmentError(f"{path}: output {model.output_shape}; expected [B, T, H, W, K] or [B, T, K] logits")
    return Segmenter(model, artifact.spec, artifact.labels, kind, artifact.path)


@dataclasses.dataclass
class VideoSegmentation:
    """What `segment_video` found: per frame class ids (`frames`) or coverage per class (`mask`)."""

    video: str
    kind: str
    frames: int = 0
    patches: int = 0
    intervals: List[Interval] = dataclasses.field(default_factory=list)
    class_fraction: Dict[str, float] = dataclasses.field(default_factory=dict)
    out: Optional[str] = None

    def to_dict(self) -> dict:
        out = {"video": self.video, "kind": self.kind, "frames": self.frames, "patches": self.patches}
        if self.kind == "frames":
            out["intervals"] = [i.to_dict() for i in self.intervals]
        else:
            out["class_fraction"] = {k: round(v, 6) for k, v in self.class_fraction.items()}
            out["out"] = self.out
        return out


def overlay(frame: np.ndarray, ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """`uint8 [H, W, 3]` frame with classes >= 1 of `ids [H, W]` tinted in their palette colour."""
    out = frame.astype(np.float32)
    for k in np.unique(ids):
        if k == 0:
            continue
        where = ids == k
        out[where] = (1 - alpha) * out[where] + alpha * PALETTE[(int(k) - 1) % len(PALETTE)]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class _MaskOverlay(OverlapAddHead[Dict[str, float]]):
    """Masks: per-class probabilities blended across overlapping patches; each frame's argmax tinted over it."""

    def __init__(self, cut, overlap, labels: Sequence[str], staged: str, fps: float):
        super().__init__(cut, overlap, channels=len(labels))
        self.labels, self.staged, self.fps = tuple(labels), staged, fps
        self.writer = None

    def start(self, plan) -> None:
        super().start(plan)
        self.close()
        self.writer = VideoWriter(self.staged, self.fps)
        self.counts = np.zeros(len(self.labels), np.int64)

    def patch_output(self, logits):
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return 255.0 * e / e.sum(axis=-1, keepdims=True)   # the assembler rounds to uint8: 1/255 steps

    def frame(self, t, frame_in, frame_out) -> None:
        ids = frame_out.argmax(axis=-1)
        self.counts += np.bincount(ids.ravel(), minlength=len(self.labels))
        self.writer.write(overlay(frame_in, ids))

    def result(self) -> Dict[str, float]:
        total = max(1, int(self.counts.sum()))
        return {name: float(c) / total for name, c in zip(self.labels, self.counts)}

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _FrameLabels(Head[List[Interval]]):
    """Frames: a frame's class is the argmax of the mean logits of the patches holding it; runs of it are intervals."""

    def __init__(self, labels: Sequence[str]):
        self.labels = tuple(labels)

    def start(self, plan) -> None:
        self.plan = plan
        self.sums = np.zeros((plan.frames, len(self.labels)), np.float64)
        self.covered = np.zeros(plan.frames, np.int64)

    def add(self, patches, logits) -> None:
        for patch, lg in zip(patches, logits):
            t0, vt = patch.offset[0], patch.valid[0]
            self.sums[t0:t0 + vt] += lg[:vt]
            self.covered[t0:t0 + vt] += 1

    def finish(self) -> List[Interval]:
        plan = self.plan
        ids = self.sums.argmax(axis=1)
        ids[self.covered == 0] = IGNORE
        period = (plan.end - plan.start) / max(1, plan.frames)
        return frames_to_intervals(ids, [j * period for j in range(plan.frames)], plan.frames * period, self.labels)


def segment_video(segmenter: Segmenter, path: str, out: Optional[str] = None, *,
                  overlap: Optional[Tuple[int, int, int]] = None, batch_size: int = 16,
                  max_pixels: Optional[int] = None) -> VideoSegmentation:
    """Segments one video with overlapping patches.

    mask: class probabilities of overlapping patches are blended back into
    frames by `tfrecords_tools.patches.PatchAssembler` (the enhancement's
    overlap-add), their argmax tinted over the frames into `out` (H.264).
    frames: the logits of every patch covering a frame are averaged; the
    argmax per frame gives the intervals.
    """
    from stpkeras.inference import NoPatches, Timing, run_video
    from tfrecords_tools.patches import overlap_spec
    from tfrecords_tools.video import DEFAULT_MAX_PIXELS, probe

    if segmenter.kind == "mask" and not out:
        raise SegmentError("a mask model writes an overlay video: pass `out` (--out overlay.mp4)")
    outputs.check_not_input(out, [path])
    spec = segmenter.spec
    overlap = tuple(overlap) if overlap is not None else tuple(s // 4 for s in spec.size)
    # Overlapping, edge-padded patches cover every pixel; the model's own resampling and resizing stay.
    cut = dataclasses.replace(overlap_spec(spec, overlap), fps=spec.fps, resize=spec.resize,
                              short_side=spec.short_side)
    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    result = VideoSegmentation(path, segmenter.kind, out=out)
    timing = Timing()
    with contextlib.ExitStack() as stack:
        if segmenter.kind == "mask":
            # The overlay is written under a temporary name, renamed when complete, after the writer is closed.
            staged = stack.enter_context(outputs.atomic_file(out))
            head = _MaskOverlay(cut, overlap, segmenter.labels, staged, spec.fps or probe(path, max_pixels).rate)
            stack.callback(head.close)
        else:
            head = _FrameLabels(segmenter.labels)
        try:
            answer = run_video(path, spec, segmenter.logits, head, batch_size=batch_size, cut=cut,
                               max_pixels=max_pixels, timing=timing)
        except NoPatches as e:
            raise SegmentError(f"{path}: no patches ({cut.describe()})") from e
    if segmenter.kind == "mask":
        result.class_fraction = answer
    else:
        result.intervals = answer
    result.frames, result.patches = head.plan.frames, timing.patches
    return result


def evaluate_segmentation(segmenter: Segmenter, data: str, split: Optional[str] = None,
                          batch_size: int = 16) -> dict:
    """Mean IoU per class (masks) or frame accuracy and segmental F1 (frames) on a converted split.

    Frames: a video's frame is labelled by the mean logits of the patches holding
    it; segments are formed per video over its whole timeline.
    """
    from stpkeras import pipeline
    from tfrecords_tools import schema

    info = pipeline.load_info(data, segmenter.spec)
    kind = data_kind(info)
    if kind != segmenter.kind or tuple(class_names(info, kind)) != segmenter.labels:
        raise SegmentError(f"{data}: holds {kind} targets of classes {list(class_names(info, kind))}; the model "
                           f"predicts {segmenter.kind} of {list(segmenter.labels)}")
    if split is None:
        split = next((s for s in ("test", "val") if s in info.splits), None)
        if split is None:
            raise SegmentError(f"{data}: no 'test' or 'val' split; pass --split (available: {list(info.splits)})")
    element = make_element(info, kind)

    def with_ids(serialized, seed):
        patch, target = element(serialized, seed)
        f = schema.parse_patch(serialized, info.encoding)
        return {"patch": patch, "target": target, "video": f[schema.VIDEO_ID], "offset": f[schema.OFFSET][0]}

    ds = pipeline.make_dataset(info, split, batch_size=batch_size, training=False, element_fn=with_ids)
    k = len(segmenter.labels)
    confusion = np.zeros((k, k), np.int64)
    sums: Dict[str, Dict[int, np.ndarray]] = {}
    truth: Dict[str, Dict[int, int]] = {}
    for batch in ds:
        logits = segmenter.logits(batch["patch"].numpy())
        target = batch["target"].numpy()
        if kind == "mask":
            confusion += confusion_matrix(target, logits.argmax(axis=-1), k)
            continue
        for vid, t0, lg, y in zip(batch["video"].numpy(), batch["offset"].numpy(), logits, target):
            per_frame = sums.setdefault(vid.decode(), {})
            labels = truth.setdefault(vid.decode(), {})
            for i in range(len(y)):
                if y[i] < 0 and int(t0) + i in labels:
                    continue  # padding repeats a frame that a real patch labels
                per_frame[int(t0) + i] = per_frame.get(int(t0) + i, 0) + lg[i]
                labels[int(t0) + i] = max(labels.get(int(t0) + i, IGNORE), int(y[i]))
    result = {"split": split, "kind": kind, "labels": list(segmenter.labels)}
    if kind == "mask":
        return {**result, **mask_metrics(confusion, segmenter.labels)}
    sequences = []
    for vid in sorted(sums):
        frames = sorted(sums[vid])
        sequences.append(([truth[vid][j] for j in frames], [int(np.argmax(sums[vid][j])) for j in frames]))
    return {**result, "videos": len(sequences), **frame_metrics(sequences)}
