"""Inference stage: classify video files with an export, a `.keras` model or a TF Serving server.

A video is decoded and cut by `tfrecords_tools.video.video_patches`, the
function `stp convert` uses, under the model's own `PatchSpec` (stored in the
export), so the model sees exactly the kind of patches it was trained on.
Patches go to the model in batches while decoding goes on in a second thread;
only a few batches are in memory at any time, whatever the video's length.
The logits of a video's patches are averaged, and the softmax of that mean
gives the video's scores.

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
from stpkeras.inference import MeanHead, NoPatches, Timing, run_video
from stpkeras.signatures import (CLASS_IDS, CLASS_NAMES, EMBEDDINGS, LOGITS, PATCHES, PROBABILITIES,
                                 SERVING_DEFAULT)
from tfrecords_tools.errors import BadInput
from tfrecords_tools.spec import PatchSpec

DEFAULT_BATCH_SIZE = 32
DEFAULT_TOP_K = 5


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
    """A classifier on uint8 patches, with the labels and `PatchSpec` it was trained with.

    Calling it with `uint8 [batch, T, H, W, 3]` returns numpy arrays:
    `logits` float32 [batch, K], `probabilities` float32 [batch, K],
    `class_ids` int64 [batch] and `class_names` (str) [batch], the outputs of
    the export's `serving_default` signature.
    """

    labels: Tuple[str, ...]
    spec: PatchSpec
    source: str

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
        logits = np.asarray(logits, np.float32)
        ids = logits.argmax(axis=-1).astype(np.int64)
        return {LOGITS: logits, PROBABILITIES: _softmax(logits).astype(np.float32), CLASS_IDS: ids,
                CLASS_NAMES: np.array([self.labels[i] for i in ids], dtype=object)}


class SavedModelPredictor(Predictor):
    """An export of `stp export` (loaded with `tf.saved_model.load`, the TF 2 loader): its signatures."""

    def __init__(self, artifact: Artifact):
        self.source, self.labels, self.spec = artifact.path, artifact.labels, artifact.spec
        signatures = artifact.model.signatures
        if SERVING_DEFAULT not in signatures:
            raise ArtifactError(f"{self.source}: no {SERVING_DEFAULT!r} signature (it has {sorted(signatures)})")
        self._loaded = artifact.model  # the signatures' functions hold on to it
        self._serve = signatures[SERVING_DEFAULT]
        self._embed = signatures.get(EMBEDDINGS)

    def _run(self, patches):
        out = {k: v.numpy() for k, v in self._serve(**{PATCHES: patches}).items()}
        out[CLASS_NAMES] = _as_str(out[CLASS_NAMES])
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

    def __init__(self, client, labels: Sequence[str], spec: PatchSpec):
        self.client = client
        self.labels = tuple(labels)
        self.spec = spec
        self.source = str(client.address)

    def _run(self, patches):
        out = self.client.predict({PATCHES: patches}, SERVING_DEFAULT)
        missing = {LOGITS, CLASS_IDS, CLASS_NAMES, PROBABILITIES} - set(out)
        if missing:
            raise ArtifactError(f"{self.source}: the server's answer lacks {sorted(missing)}; is it serving an export "
                              "of `stp export`?")
        if out[LOGITS].shape[-1] != len(self.labels):
            raise ArtifactError(f"{self.source}: the served model has {out[LOGITS].shape[-1]} classes, the local "
                              f"export {len(self.labels)}; MODEL and --server must be the same model")
        return out

    def embed(self, patches) -> np.ndarray:
        return self.client.predict({PATCHES: self.check(patches)}, EMBEDDINGS)[EMBEDDINGS]


def load(path: str, *, labels: Optional[Sequence[str]] = None, spec: Optional[PatchSpec] = None) -> Predictor:
    """A predictor for a classifier: an export (`saved_models/NAME[/VERSION]`), a run folder or a `.keras` file.

    Loads through `stpkeras.artifacts.load`; `labels` and `spec` are for a `.keras` file without its run folder.
    """
    artifact = artifacts.load(path, labels=labels, spec=spec)
    if artifact.task != "classify":
        raise ArtifactError(f"{artifact.path}: a model of task {artifact.task!r}; expected a classifier (task "
                          "classify). Enhancement, embedding and segmentation models run with `stp enhance`, "
                          "`stp index` and `stp segment`")
    return KerasPredictor(artifact) if artifact.form == "keras" else SavedModelPredictor(artifact)


# --- videos -----------------------------------------------------------------------------------


@dataclasses.dataclass
class VideoPrediction:
    """The answer for one video; `error` is set (and the rest empty) when it could not be classified."""

    video: str
    label: Optional[str] = None
    score: Optional[float] = None
    top_k: List[Tuple[str, float]] = dataclasses.field(default_factory=list)
    patches: int = 0
    mean_logits: Optional[np.ndarray] = None
    decode_s: float = 0.0   # time spent decoding and cutting (in the reader thread)
    model_s: float = 0.0    # time spent in the model (or waiting for the server)
    seconds: float = 0.0    # wall time for the video
    error: Optional[str] = None

    def to_json(self) -> str:
        if self.error is not None:
            return json.dumps({"video": self.video, "error": self.error})
        return json.dumps({"video": self.video, "label": self.label, "score": round(self.score, 6),
                           "top_k": [[label, round(score, 6)] for label, score in self.top_k],
                           "patches": self.patches})


def predict_video(predictor: Predictor, path: str, *, batch_size: int = DEFAULT_BATCH_SIZE,
                  top_k: int = DEFAULT_TOP_K, max_pixels: Optional[int] = None) -> VideoPrediction:
    """Classifies one video file: mean logits over all its patches. Raises on failure."""
    start = time.perf_counter()
    timing = Timing()
    mean = run_video(path, predictor.spec, lambda batch: predictor(batch)[LOGITS], MeanHead(),
                     batch_size=batch_size, max_pixels=max_pixels, timing=timing)
    probs = _softmax(mean)
    order = np.argsort(-probs, kind="stable")[:max(1, top_k)]
    return VideoPrediction(video=path, label=predictor.labels[order[0]], score=float(probs[order[0]]),
                           top_k=[(predictor.labels[i], float(probs[i])) for i in order], patches=timing.patches,
                           mean_logits=mean, decode_s=timing.decode_s, model_s=timing.model_s,
                           seconds=time.perf_counter() - start)


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
    """A plain-text table: video, label, score, the other top-k classes, patches."""
    rows = [("video", "label", "score", f"top {top_k}", "patches")]
    for r in results:
        if r.error is not None:
            rows.append((r.video, "ERROR", "", r.error, ""))
        else:
            rows.append((r.video, r.label, f"{r.score:.3f}",
                         "  ".join(f"{label} {score:.3f}" for label, score in r.top_k), str(r.patches)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
    return "\n".join(line.rstrip() for line in lines)
