"""Inference stage: classify or score video files with an export, a `.keras` model or a TF Serving server.

A video is decoded and cut by `tfrecords_tools.video.video_patches`, the
function `stp convert` uses, under the model's own `PatchSpec` (stored in the
export), so the model sees exactly the kind of patches it was trained on.
Patches go to the model in batches while decoding goes on in a second thread;
only a few batches are in memory at any time, whatever the video's length.
The logits of a video's patches are averaged, and the softmax of that mean
gives the video's scores. A multi-label classifier averages its patches' probabilities (sigmoid, one per
class) and names every class at or above a threshold; a regressor averages its patches' values. With
`timeline=True` the same is done per temporal window too (`inference.WindowHead`), with its times.

    predictor = stpkeras.load("saved_models/NAME")    # newest version
    predictor(patches)                                 # uint8 [batch, T, H, W, 3] -> dict of outputs
    predict_video(predictor, "clip.mp4").label
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from stpkeras import artifacts
from stpkeras.artifacts import Artifact, ArtifactError
from stpkeras.inference import MeanHead, NoPatches, Timing, WindowHead, run_video
from stpkeras.signatures import (CLASS_IDS, CLASS_NAMES, EMBEDDINGS, LOGITS, PATCHES, PROBABILITIES,
                                 SERVING_DEFAULT, VALUE_NAMES, VALUES)
from tfrecords_tools.errors import BadInput
from tfrecords_tools.spec import PatchSpec

DEFAULT_BATCH_SIZE = 32
DEFAULT_TOP_K = 5
DEFAULT_THRESHOLD = 0.5


class PatchInputError(BadInput, ValueError):
    """Patches whose dtype or shape the model does not take."""


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _as_str(values) -> np.ndarray:
    return np.array([v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in np.ravel(values)],
                    dtype=object).reshape(np.shape(values))


class Predictor:
    """A classifier or regressor on uint8 patches, with the labels (a regressor's: value names) and
    `PatchSpec` it was trained with.

    Calling it with `uint8 [batch, T, H, W, 3]` returns numpy arrays, the outputs of the export's
    `serving_default` signature: `logits` float32 [batch, K], `probabilities` float32 [batch, K],
    `class_ids` int64 [batch] and `class_names` (str) [batch] for a classifier; `logits` and
    `probabilities` (sigmoid) for a multi-label one; `values` float32 [batch, K] and `value_names`
    (str) [batch, K] for a regressor.
    """

    labels: Tuple[str, ...]
    spec: PatchSpec
    source: str
    task: str = "classify"
    multi_label: bool = False

    @property
    def averaged(self) -> str:
        """The output whose mean over patches describes a video (or a window)."""
        return VALUES if self.task == "regress" else PROBABILITIES if self.multi_label else LOGITS

    @property
    def expected_outputs(self) -> Tuple[str, ...]:
        if self.task == "regress":
            return (VALUES, VALUE_NAMES)
        return (LOGITS, PROBABILITIES) if self.multi_label else (LOGITS, PROBABILITIES, CLASS_IDS, CLASS_NAMES)

    def describe(self, mean: np.ndarray, top_k: int = DEFAULT_TOP_K,
                 threshold: float = DEFAULT_THRESHOLD) -> dict:
        """A video's (or window's) mean `averaged` output -> what it says: `values` {name: value}
        (regressor), else `label`, `score` and `top_k` [(label, score)], and for a multi-label classifier
        `labels`, every class whose probability is >= `threshold`, most probable first."""
        if self.task == "regress":
            return {"values": {name: float(v) for name, v in zip(self.labels, mean)}}
        scores = np.asarray(mean, np.float64) if self.multi_label else _softmax(np.asarray(mean, np.float64))
        order = np.argsort(-scores, kind="stable")
        out = {"label": self.labels[order[0]], "score": float(scores[order[0]]),
               "top_k": [(self.labels[i], float(scores[i])) for i in order[:max(1, top_k)]]}
        if self.multi_label:
            out["labels"] = [self.labels[i] for i in order if scores[i] >= threshold]
        return out

    def check(self, patches) -> np.ndarray:
        patches = np.asarray(patches)
        if patches.dtype != np.uint8 or patches.ndim != 5 or patches.shape[1:] != self.spec.shape:
            raise PatchInputError(
                f"{self.source}: expected uint8 patches [batch, {', '.join(map(str, self.spec.shape))}] "
                f"(the model's PatchSpec: {self.spec.describe()}). Received {patches.dtype} {list(patches.shape)}")
        return patches

    def __call__(self, patches) -> Dict[str, np.ndarray]:
        return self._run(self.check(patches))

    def _run(self, patches: np.ndarray) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    @property
    def has_embeddings(self) -> bool:
        return False

    def embed(self, patches) -> np.ndarray:
        """`uint8 [batch, T, H, W, 3]` -> float32 [batch, D], the model's `features` layer."""
        raise ArtifactError(f"{self.source}: the model has no `{EMBEDDINGS}` signature (no layer named features)")

    def _outputs(self, logits: np.ndarray) -> Dict[str, np.ndarray]:
        """The model's own output (logits, or a regressor's values) -> the export's outputs."""
        logits = np.asarray(logits, np.float32)
        if self.task == "regress":
            return {VALUES: logits, VALUE_NAMES: np.array([list(self.labels)] * len(logits), dtype=object)}
        if self.multi_label:
            return {LOGITS: logits, PROBABILITIES: (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)}
        ids = logits.argmax(axis=-1).astype(np.int64)
        return {LOGITS: logits, PROBABILITIES: _softmax(logits).astype(np.float32), CLASS_IDS: ids,
                CLASS_NAMES: np.array([self.labels[i] for i in ids], dtype=object)}


class SavedModelPredictor(Predictor):
    """An export of `stp export` (loaded with `tf.saved_model.load`, the TF 2 loader): its signatures."""

    def __init__(self, artifact: Artifact):
        self.source, self.labels, self.spec = artifact.path, artifact.labels, artifact.spec
        self.task, self.multi_label = artifact.task, artifact.multi_label
        signatures = artifact.model.signatures
        if SERVING_DEFAULT not in signatures:
            raise ArtifactError(f"{self.source}: no {SERVING_DEFAULT!r} signature (it has {sorted(signatures)})")
        self._loaded = artifact.model  # the signatures' functions hold on to it
        self._serve = signatures[SERVING_DEFAULT]
        self._embed = signatures.get(EMBEDDINGS)

    def _run(self, patches):
        out = {k: v.numpy() for k, v in self._serve(**{PATCHES: patches}).items()}
        for key in (CLASS_NAMES, VALUE_NAMES):
            if key in out:
                out[key] = _as_str(out[key])
        return out

    @property
    def has_embeddings(self) -> bool:
        return self._embed is not None

    def embed(self, patches) -> np.ndarray:
        if self._embed is None:
            return super().embed(patches)
        return self._embed(**{PATCHES: self.check(patches)})[EMBEDDINGS].numpy()


class KerasPredictor(Predictor):
    """A `.keras` classifier (a run's, or a lone file with labels and spec passed in)."""

    def __init__(self, artifact: Artifact):
        import keras
        import tensorflow as tf

        self.source, self.labels, self.spec = artifact.path, artifact.labels, artifact.spec
        self.task, self.multi_label = artifact.task, artifact.multi_label
        self.model = artifact.model
        self._call = tf.function(lambda x: self.model(x, training=False), reduce_retracing=True)
        try:
            features = self.model.get_layer("features")
        except ValueError:
            self._features = None
        else:
            sub = keras.Model(self.model.input, features.output)
            self._features = tf.function(lambda x: sub(x, training=False), reduce_retracing=True)

    def _run(self, patches):
        return self._outputs(self._call(patches).numpy())

    @property
    def has_embeddings(self) -> bool:
        return self._features is not None

    def embed(self, patches) -> np.ndarray:
        if self._features is None:
            return super().embed(patches)
        return np.asarray(self._features(self.check(patches)), np.float32)


class RemotePredictor(Predictor):
    """A model served by TF Serving: labels and spec from the local export, the compute at the server."""

    def __init__(self, client, labels: Sequence[str], spec: PatchSpec, task: str = "classify",
                 multi_label: bool = False):
        self.client = client
        self.labels = tuple(labels)
        self.spec = spec
        self.task, self.multi_label = task, multi_label
        self.source = str(client.address)

    @classmethod
    def like(cls, client, local: Predictor) -> "RemotePredictor":
        """The served copy of the `local` model: its labels, spec and task."""
        return cls(client, local.labels, local.spec, local.task, local.multi_label)

    def _run(self, patches):
        out = self.client.predict({PATCHES: patches}, SERVING_DEFAULT)
        missing = set(self.expected_outputs) - set(out)
        if missing:
            raise ArtifactError(f"{self.source}: the server's answer lacks {sorted(missing)}; is it serving an export "
                                "of `stp export` of the same model as MODEL?")
        main = out[self.averaged]
        if main.shape[-1] != len(self.labels):
            raise ArtifactError(f"{self.source}: the served model has {main.shape[-1]} outputs, the local "
                                f"export {len(self.labels)}; MODEL and --server must be the same model")
        return out

    def embed(self, patches) -> np.ndarray:
        return self.client.predict({PATCHES: self.check(patches)}, EMBEDDINGS)[EMBEDDINGS]


def load(path: str, *, labels: Optional[Sequence[str]] = None, spec: Optional[PatchSpec] = None,
         tta: bool = False, tta_flip_labels: Sequence[str] = ()) -> Predictor:
    """A predictor for a classifier or a regressor: an export (`saved_models/NAME[/VERSION]`), a run folder or a
    `.keras` file.

    Loads through `stpkeras.artifacts.load`; `labels` and `spec` are for a `.keras` file without its run folder.
    `tta` averages each patch over the run's `--flip-labels` flips and `tta_flip_labels`
    (`artifacts.flip_averaged`); `tta_flip_labels` implies `tta`.
    """
    artifact = artifacts.load(path, labels=labels, spec=spec)
    if tta or tta_flip_labels:
        artifact = artifacts.flip_averaged(artifact, tta_flip_labels)
    if artifact.task not in ("classify", "regress"):
        raise ArtifactError(f"{artifact.path}: a model of task {artifact.task!r}; expected a classifier or a "
                            "regressor (task classify or regress). Enhancement, embedding and segmentation models "
                            "run with `stp enhance`, `stp index` and `stp segment`")
    return KerasPredictor(artifact) if artifact.form == "keras" else SavedModelPredictor(artifact)


# --- videos -----------------------------------------------------------------------------------


@dataclasses.dataclass
class VideoPrediction:
    """The answer for one video; `error` is set (and the rest empty) when it could not be predicted.

    A classifier fills `label`, `score` and `top_k` (a multi-label one also `labels`, the classes at or
    above the threshold); a regressor fills `values` ({name: value}). `timeline`, when asked for, holds
    the same per temporal window, each with its `start` and `end` seconds.
    """

    video: str
    label: Optional[str] = None
    score: Optional[float] = None
    top_k: List[Tuple[str, float]] = dataclasses.field(default_factory=list)
    labels: Optional[List[str]] = None
    values: Optional[Dict[str, float]] = None
    timeline: Optional[List[dict]] = None
    patches: int = 0
    mean_logits: Optional[np.ndarray] = None   # the mean of the averaged output (logits, probabilities, values)
    decode_s: float = 0.0   # time spent decoding and cutting (in the reader thread)
    model_s: float = 0.0    # time spent in the model (or waiting for the server)
    seconds: float = 0.0    # wall time for the video
    error: Optional[str] = None

    def to_json(self) -> str:
        if self.error is not None:
            return json.dumps({"video": self.video, "error": self.error})
        return json.dumps({"video": self.video, **_rounded(self.summary()), "patches": self.patches,
                           **({"timeline": [_rounded(w) for w in self.timeline]} if self.timeline is not None
                              else {})})

    def summary(self) -> dict:
        """What the video is: label, score, top_k (and labels), or values."""
        if self.values is not None:
            return {"values": self.values}
        out = {"label": self.label, "score": self.score, "top_k": self.top_k}
        if self.labels is not None:
            out["labels"] = self.labels
        return out


def _rounded(d: dict) -> dict:
    def r(v):
        if isinstance(v, float):
            return round(v, 6)
        if isinstance(v, dict):
            return {k: r(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [r(x) for x in v]
        return v
    return {k: r(v) for k, v in d.items()}


def predict_video(predictor: Predictor, path: str, *, batch_size: int = DEFAULT_BATCH_SIZE,
                  top_k: int = DEFAULT_TOP_K, max_pixels: Optional[int] = None,
                  threshold: float = DEFAULT_THRESHOLD, timeline: bool = False) -> VideoPrediction:
    """Predicts one video file from the mean of its patches' outputs (logits; a multi-label classifier's
    probabilities; a regressor's values). `timeline`: also per temporal window. Raises on failure."""
    start = time.perf_counter()
    timing = Timing()
    key = predictor.averaged
    head = WindowHead(predictor.spec) if timeline else MeanHead()
    result = run_video(path, predictor.spec, lambda batch: predictor(batch)[key], head,
                       batch_size=batch_size, max_pixels=max_pixels, timing=timing)
    windows = None
    if timeline:
        windows = [{"start": w.start, "end": w.end, **predictor.describe(w.mean, top_k, threshold)}
                   for w in result]
        # The video's mean over all its patches, from the windows' means and counts.
        mean = (sum(w.mean.astype(np.float64) * w.patches for w in result)
                / sum(w.patches for w in result)).astype(np.float32)
    else:
        mean = result
    found = predictor.describe(mean, top_k, threshold)
    return VideoPrediction(video=path, label=found.get("label"), score=found.get("score"),
                           top_k=found.get("top_k", []), labels=found.get("labels"), values=found.get("values"),
                           timeline=windows, patches=timing.patches, mean_logits=mean, decode_s=timing.decode_s,
                           model_s=timing.model_s, seconds=time.perf_counter() - start)


def predict_videos(predictor: Predictor, paths: Iterable[str], **kwargs) -> Iterator[VideoPrediction]:
    """`predict_video` for each path; a video that fails yields a result with `error` set, naming the reason.

    Errors of the model or the server itself (wrong input, server down) are raised: every
    later video would fail the same way.
    """
    from tfrecords_tools.video import VideoError

    for path in paths:
        try:
            yield predict_video(predictor, path, **kwargs)
        except (VideoError, NoPatches) as e:
            yield VideoPrediction(video=path, error=str(e))


def format_table(results: Sequence[VideoPrediction], top_k: int = DEFAULT_TOP_K) -> str:
    """A plain-text table: video, label, score, the other top-k classes (or the values), patches."""
    values = any(r.values is not None for r in results)
    rows = [("video", "values", "patches") if values else ("video", "label", "score", f"top {top_k}", "patches")]
    for r in results:
        if r.error is not None:
            rows.append((r.video, "ERROR", r.error, "") if values else (r.video, "ERROR", "", r.error, ""))
        elif values:
            rows.append((r.video, "  ".join(f"{k} {v:.4g}" for k, v in r.values.items()), str(r.patches)))
        else:
            label = r.label if r.labels is None else ";".join(r.labels) or "-"
            rows.append((r.video, label, f"{r.score:.3f}",
                         "  ".join(f"{label} {score:.3f}" for label, score in r.top_k), str(r.patches)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def format_timeline(result: VideoPrediction) -> str:
    """One line per window: its start and end seconds, then its label(s) and score, or its values."""
    lines = [f"{result.video}:"]
    for w in result.timeline or []:
        if "values" in w:
            what = "  ".join(f"{k} {v:.4g}" for k, v in w["values"].items())
        else:
            what = (";".join(w["labels"]) or "-") if "labels" in w else w["label"]
            what += f"  {w['score']:.3f}"
        lines.append(f"  {w['start']:8.2f}s - {w['end']:8.2f}s  {what}")
    return "\n".join(lines)
