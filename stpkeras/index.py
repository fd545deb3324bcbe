"""Retrieval stage: videos -> embeddings per temporal window -> an index folder -> the nearest videos of a query.

A *window* is the patches of a video that share a first frame (one row of the
patch grid in time); its embedding is the mean of their L2-normalised pooled
features (`stpkeras.embedding.feature_model`, or an export's `embeddings`
signature). A video's embedding is the mean over all its patches. Every vector
is centred on the mean of the indexed videos and L2-normalised again, so
scores are cosines in [-1, 1]. Centring removes what every video shares (the
features of a model not trained for retrieval are all positive after a ReLU,
and their raw cosines all sit near 1), so the scores spread out.

Two ways to score a query against a video (`AGGREGATES`, chosen at `stp index`):

- `windows` (the default): for each window of the query the best-matching
  window of the video, averaged over the query's windows (a Chamfer
  similarity, as in ViSiL, Kordopatis-Zilos et al. 2019, without the learned
  part). A trimmed or shifted copy still finds every one of its windows in its
  source, where the mean of all windows moves with what was cut off; another
  part of the same scene does not.
- `mean`: the cosine of the two videos' embeddings (one vector a video); what
  semantic retrieval (same class = relevant) wants, and what indexes written
  before windows existed hold.

INDEX layout:

    index.json          model, PatchSpec, dimension, backend, aggregate, the ids (and labels) of the videos
    embeddings.npy      float32 [N, D], L2-normalised, row i = ids[i]
    center.npy          float32 [D], subtracted from every embedding before normalising
    windows.npy         aggregate `windows` only: float32 [M, D], centred and L2-normalised, video by video
    window_offsets.npy  aggregate `windows` only: int64 [N + 1], video i's windows are rows offsets[i]:offsets[i+1]
    faiss.index         only for backend `faiss` (pip install stpkeras[ann]), over the video embeddings

Search is exact in TensorFlow (one matrix product and `tf.math.top_k`) unless the
index was built with `backend="faiss"`: an approximate HNSW graph (faiss
`IndexHNSWFlat`, inner product) with the same interface, picked by
`benchmarks/retrieval.py`. With windows, the faiss graph of video embeddings
shortlists `max(SHORTLIST, 10 k)` videos, which are then scored window by window.
Copy detection on real footage: `benchmarks/copies.py`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import json
import os
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from tfrecords_tools import outputs
from tfrecords_tools.errors import BadInput
from tfrecords_tools.spec import PatchSpec

INDEX_JSON = "index.json"
EMBEDDINGS_NPY = "embeddings.npy"
CENTER_NPY = "center.npy"
FAISS_FILE = "faiss.index"
WINDOWS_NPY = "windows.npy"
OFFSETS_NPY = "window_offsets.npy"
FORMAT = "stpkeras.index"
BACKENDS = ("exact", "faiss")
AGGREGATES = ("windows", "mean")
DEFAULT_AGGREGATE = "windows"
SHORTLIST = 100
WINDOW_BLOCK = 1 << 18   # index windows scored per matrix product (bounds memory at block x query windows)
DEFAULT_BATCH_SIZE = 32
# HNSW settings: 32 links per node; a wider beam at build and at search than faiss' defaults
# (40 / 16) keeps recall@10 >= 0.99 at 1M vectors in benchmarks/retrieval.py.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128


class RetrievalError(BadInput, RuntimeError):
    """A model, index folder or query that cannot be used; the message names the path."""


# --- embedding models -----------------------------------------------------------------------------

@dataclasses.dataclass
class Embedder:
    """Patches -> pooled features: `embed(uint8 [n, T, H, W, 3]) -> float32 [n, D]`, with the model's spec."""

    spec: PatchSpec
    source: str
    embed: Callable[[np.ndarray], np.ndarray]


def thumbnail_embedder(spec: PatchSpec, cells: int = 8) -> Embedder:
    """No model: each patch's mean frame as a `cells x cells` colour thumbnail (`cells**2 * 3` values; the
    patch's height and width must be multiples of `cells`). The simplest thing that finds copies, which
    benchmarks/copies.py measures the learned embeddings against."""
    if spec.height % cells or spec.width % cells:
        raise ValueError(f"Invalid value for argument `cells`. Expected a divisor of the patch's {spec.height}x"
                         f"{spec.width}. Received cells={cells!r}")

    def embed(patches: np.ndarray) -> np.ndarray:
        p = np.asarray(patches, np.float32).mean(axis=1)   # [n, H, W, 3]: the window's mean frame
        n, h, w, _ = p.shape
        return p.reshape(n, cells, h // cells, cells, w // cells, 3).mean(axis=(2, 4)).reshape(n, -1)

    return Embedder(spec, f"thumbnail {cells}x{cells}", embed)


def load_embedder(path: str, pool: str = "mean") -> Embedder:
    """A run folder, a `.keras` file or an export (`saved_models/NAME[/VERSION]`) -> its `Embedder`.

    Keras models embed with `feature_model(model, pool)` (pooled features, whatever
    the task; `pool` is `"mean"` or `"grid:N"`, see `stpkeras.embedding`); an
    export, which has its own `embeddings` signature, only with `pool="mean"`;
    an export with its `embeddings` signature. The spec comes from the run's
    `run.json` (or the export's assets); a `.keras` file alone gives only the patch
    shape, so its videos are cut without resampling or resizing.
    """
    import tensorflow as tf

    from stpkeras import artifacts
    from stpkeras.embedding import FeatureError, feature_model

    path = os.fspath(path)
    try:
        if path.endswith(".keras") and os.path.isfile(path) and artifacts.run_of(path) is None:
            model = artifacts.load_keras_model(path)
            t, h, w, _ = model.input_shape[1:]
            artifact = artifacts.Artifact(path, "keras", "embed", (), PatchSpec(frames=t, height=h, width=w), model)
        else:
            artifact = artifacts.load(path, task="embed")
    except artifacts.ArtifactError as e:
        raise RetrievalError(str(e)) from e
    if artifact.form == "saved_model":
        from stpkeras.predict import SavedModelPredictor

        if pool != "mean":
            raise RetrievalError(f"{artifact.path}: an export embeds with its own `embeddings` signature; "
                                 f"pool {pool!r} needs a run folder or a .keras file")
        predictor = SavedModelPredictor(artifact)
        if not predictor.has_embeddings:
            raise RetrievalError(f"{predictor.source}: the export has no `embeddings` signature (its model has no "
                                 "layer named features)")
        return Embedder(predictor.spec, predictor.source, predictor.embed)
    try:
        features = feature_model(artifact.model, pool)
    except FeatureError as e:
        raise RetrievalError(f"{artifact.path}: {e}") from e
    t, h, w, c = features.input_shape[1:]
    if tuple(artifact.spec.shape) != (t, h, w, c):
        raise RetrievalError(f"{artifact.path}: the model takes {[t, h, w, c]}, its run.json spec "
                             f"{list(artifact.spec.shape)}")
    call = tf.function(lambda x: features(x, training=False), reduce_retracing=True)
    return Embedder(artifact.spec, artifact.path, lambda patches: np.asarray(call(patches), np.float32))


def _normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


@dataclasses.dataclass(frozen=True)
class VideoEmbedding:
    """One video: per temporal window, the mean of its patches' L2-normalised features, in time order."""

    windows: np.ndarray     # float32 [m, D]
    counts: np.ndarray      # int64 [m]: patches per window

    @property
    def mean(self) -> np.ndarray:
        """The mean over all the video's patches, `float32 [D]`."""
        return (self.counts @ self.windows.astype(np.float64) / self.counts.sum()).astype(np.float32)

    @property
    def patches(self) -> int:
        return int(self.counts.sum())


@dataclasses.dataclass(frozen=True)
class Reading:
    """How videos are read for an index (index.json `reading`): `strip_bars` reads every video (gallery and
    queries) inside its black bars (`tfrecords_tools.borders`); `views` are the central fractions of that
    picture each *indexed* video is embedded as, one index entry each (a query is read once, whole, and a
    video scores its best view): a copy cut out of the middle of its source's frame then meets a view of
    the source at about its own framing."""

    strip_bars: bool = False
    views: Tuple[float, ...] = (1.0,)

    def __post_init__(self):
        views = tuple(float(v) for v in self.views)
        if not views or any(not 0 < v <= 1 for v in views) or len(set(views)) != len(views):
            raise ValueError("Invalid value for argument `views`. Expected distinct fractions in (0, 1]. "
                             f"Received views={self.views!r}")
        object.__setattr__(self, "views", views)

    def to_dict(self) -> dict:
        return {"strip_bars": self.strip_bars, "views": list(self.views)}

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "Reading":
        """index.json's `reading`; indexes written before it read whole frames, one view."""
        return cls(**d) if d else cls()

    def regions(self, path: str, max_pixels: Optional[int] = None, *, indexed: bool = True) -> list:
        """The regions (`Plan.region`; None: the whole frame) `path` is embedded as: one per view when
        `indexed`, else one (a query)."""
        if not self.strip_bars and (self.views == (1.0,) or not indexed):
            return [None]
        from tfrecords_tools import borders
        from tfrecords_tools.video import DEFAULT_MAX_PIXELS, probe

        max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        if self.strip_bars:
            picture = borders.picture_region(path, max_pixels=max_pixels)
        else:
            info = probe(path, max_pixels)
            picture = (0, 0, info.height, info.width)
        return [borders.central(picture, v) for v in (self.views if indexed else (1.0,))]


def embed_video_windows(embedder: Embedder, path: str, *, batch_size: int = DEFAULT_BATCH_SIZE,
                        max_pixels: Optional[int] = None, region=None) -> VideoEmbedding:
    """One video file -> its `VideoEmbedding` (windows and patch counts).

    Decoding and cutting run in a second thread (the predictor's reader), under
    the model's own `PatchSpec`; `region` (`Plan.region`) reads only that part of the frames.
    Raises `NoPatches` for a video smaller than one patch.
    """
    from stpkeras.inference import WindowHead, run_video

    windows = run_video(path, embedder.spec, lambda x: _normalize(embedder.embed(x)), WindowHead(embedder.spec),
                        batch_size=batch_size, max_pixels=max_pixels, region=region)
    return VideoEmbedding(np.stack([w.mean for w in windows]).astype(np.float32),
                          np.array([w.patches for w in windows], np.int64))


def embed_video(embedder: Embedder, path: str, *, batch_size: int = DEFAULT_BATCH_SIZE,
                max_pixels: Optional[int] = None) -> Tuple[np.ndarray, int]:
    """One video file -> (mean of its patches' L2-normalised features `float32 [D]`, patch count)."""
    video = embed_video_windows(embedder, path, batch_size=batch_size, max_pixels=max_pixels)
    return video.mean, video.patches


@dataclasses.dataclass(frozen=True)
class Embedded:
    """Videos and their embeddings (before centring): `vectors float32 [N, D]`, one row per id, and
    each video's window embeddings `float32 [m_i, D]` (empty tuple: not known)."""

    ids: Tuple[str, ...]
    vectors: np.ndarray
    labels: Tuple[str, ...] = ()     # class names, '' unlabelled (empty tuple: none known)
    patches: Tuple[int, ...] = ()
    failed: Tuple[Tuple[str, str], ...] = ()   # (video, reason)
    windows: Tuple[np.ndarray, ...] = ()


def embed_videos(embedder: Embedder, paths: Sequence[str], *, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_pixels: Optional[int] = None, on_video: Optional[Callable[[str, Optional[str]], None]] = None,
                 reading: Reading = Reading()) -> Embedded:
    """`embed_video` for each path, once per view of `reading` (consecutive entries with the same id); a
    video that fails is listed in `failed` with the reason, never dropped silently."""
    from stpkeras.inference import NoPatches
    from tfrecords_tools.video import VideoError

    ids, videos, failed = [], [], []
    for path in paths:
        try:
            views = [embed_video_windows(embedder, path, batch_size=batch_size, max_pixels=max_pixels, region=r)
                     for r in reading.regions(path, max_pixels)]
        except (VideoError, NoPatches) as e:
            failed.append((path, str(e)))
            if on_video:
                on_video(path, str(e))
            continue
        ids.extend([path] * len(views))
        videos.extend(views)
        if on_video:
            on_video(path, None)
    dim = videos[0].windows.shape[1] if videos else 0
    return Embedded(tuple(ids), np.stack([v.mean for v in videos]) if videos else np.zeros((0, dim), np.float32),
                    patches=tuple(v.patches for v in videos), failed=tuple(failed),
                    windows=tuple(v.windows for v in videos))


def embed_records(embedder: Embedder, data: str, split: Optional[str] = None, *,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> Embedded:
    """A converted folder's `split` (None: every split) -> one embedding per `video/id`, with its label.

    The records must have been cut with the model's patch shape.
    """
    from stpkeras import pipeline
    from tfrecords_tools import schema

    info = pipeline.load_info(data, embedder.spec)
    dataset = pipeline.make_dataset(info, split, batch_size=batch_size, training=False, as_supervised=False)
    # Per video, per temporal grid index: [sum of normalised features, patch count].
    sums: Dict[str, Dict[int, list]] = {}
    labels: Dict[str, int] = {}
    for features in dataset:
        e = _normalize(embedder.embed(features[schema.PATCH].numpy())).astype(np.float64)
        for vid, label, grid, row in zip(features[schema.VIDEO_ID].numpy(), features[schema.LABEL].numpy(),
                                         features[schema.INDEX].numpy(), e):
            vid = vid.decode("utf-8")
            entry = sums.setdefault(vid, {}).setdefault(int(grid[0]), [0.0, 0])
            entry[0] = entry[0] + row
            entry[1] += 1
            labels[vid] = int(label)
    ids = tuple(sums)
    names = info.labels
    videos = [VideoEmbedding(np.stack([total / n for total, n in (sums[i][t] for t in sorted(sums[i]))]
                                      ).astype(np.float32),
                             np.array([sums[i][t][1] for t in sorted(sums[i])], np.int64)) for i in ids]
    return Embedded(ids, np.stack([v.mean for v in videos]) if ids else np.zeros((0, 0), np.float32),
                    labels=tuple(names[labels[i]] if labels[i] >= 0 else "" for i in ids),
                    patches=tuple(v.patches for v in videos), windows=tuple(v.windows for v in videos))


# --- search backends ------------------------------------------------------------------------------

class ExactSearch:
    """Exact inner-product search in TensorFlow: `scores = queries @ vectors^T`, then `tf.math.top_k`.

    The vectors live in one constant tensor; queries go in blocks so the score
    matrix stays at most `block x N` floats.
    """

    name = "exact"

    def __init__(self, vectors: np.ndarray, block: int = 256):
        import tensorflow as tf

        self.count = len(vectors)
        self._vectors = tf.constant(np.asarray(vectors, np.float32))
        self._block = block

        @tf.function(reduce_retracing=True)
        def top_k(queries, k):
            scores = tf.linalg.matmul(queries, self._vectors, transpose_b=True)
            return tf.math.top_k(scores, k=k)

        self._top_k = top_k

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        import tensorflow as tf

        k = min(int(k), self.count)
        queries = np.asarray(queries, np.float32)
        scores, indices = [], []
        for i in range(0, len(queries), self._block):
            s, j = self._top_k(tf.constant(queries[i:i + self._block]), tf.constant(k))
            scores.append(s.numpy())
            indices.append(j.numpy())
        return np.concatenate(scores), np.concatenate(indices).astype(np.int64)


class FaissSearch:
    """Approximate inner-product search with a faiss HNSW graph (the `ann` extra: faiss-cpu)."""

    name = "faiss"

    def __init__(self, index, count: int):
        self._index = index
        self.count = count

    @staticmethod
    def _faiss():
        try:
            import faiss
        except ImportError as e:
            raise RetrievalError("backend 'faiss' needs faiss-cpu: pip install 'stpkeras[ann]' "
                              f"(or pip install faiss-cpu) ({e})") from e
        return faiss

    @classmethod
    def build(cls, vectors: np.ndarray, m: int = HNSW_M, ef_construction: int = HNSW_EF_CONSTRUCTION,
              ef_search: int = HNSW_EF_SEARCH) -> "FaissSearch":
        faiss = cls._faiss()
        vectors = np.ascontiguousarray(vectors, np.float32)
        index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.hnsw.efSearch = ef_search
        index.add(vectors)
        return cls(index, len(vectors))

    @classmethod
    def read(cls, path: str, count: int, ef_search: int = HNSW_EF_SEARCH) -> "FaissSearch":
        faiss = cls._faiss()
        index = faiss.read_index(path)
        index.hnsw.efSearch = ef_search
        return cls(index, count)

    def write(self, path: str) -> None:
        self._faiss().write_index(self._index, path)

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        k = min(int(k), self.count)
        scores, indices = self._index.search(np.ascontiguousarray(queries, np.float32), k)
        return scores, indices.astype(np.int64)


# --- the index ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Hit:
    video: str
    score: float
    rank: int
    label: str = ""
    matched: Optional[float] = None   # `stpkeras.rerank.score` when `stp search --rerank` compared its frames

    def to_json(self) -> str:
        out = {"video": self.video, "score": round(self.score, 6), "rank": self.rank}
        if self.label:
            out["label"] = self.label
        if self.matched is not None:
            out["matched"] = round(self.matched, 6)
        return json.dumps(out)


def chamfer_scores(query: np.ndarray, windows: np.ndarray, offsets: np.ndarray,
                   block: int = WINDOW_BLOCK) -> np.ndarray:
    """Query windows `[m, D]` against videos' windows `[M, D]` (video i: rows `offsets[i]:offsets[i+1]`,
    each video at least one) -> `float32 [N]`: per video, the mean over the query's windows of the
    best cosine with one of the video's windows (vectors already normalised)."""
    query = np.asarray(query, np.float32)
    offsets = np.asarray(offsets, np.int64)
    out = np.empty(len(offsets) - 1, np.float32)
    first = 0
    while first < len(offsets) - 1:
        # Whole videos per block, at least one.
        last = max(first + 1, int(np.searchsorted(offsets, offsets[first] + block, side="right")) - 1)
        last = min(last, len(offsets) - 1)
        lo, hi = offsets[first], offsets[last]
        similarity = query @ windows[lo:hi].T                               # [m, block windows]
        best = np.maximum.reduceat(similarity, offsets[first:last] - lo, axis=1)  # [m, videos]
        out[first:last] = best.mean(axis=0)
        first = last
    return out


class VideoIndex:
    """Indexed videos: ids, L2-normalised centred embeddings (and windows) and a search backend.

    `search(vectors [Q, D], k)` takes raw video embeddings (as `embed_video`
    returns them), centres and normalises them as the indexed ones were, and
    returns for each query its `k` best `Hit`s, best first, by the cosine of the
    video embeddings. `search_windows([windows [m_q, D], ...], k)` scores by the
    index's `aggregate` (module docstring): window by window when it holds windows.
    """

    def __init__(self, ids: Sequence[str], vectors: np.ndarray, center: np.ndarray, *, labels: Sequence[str] = (),
                 model: str = "", spec: Optional[PatchSpec] = None, backend: str = "exact", searcher=None,
                 info: Optional[dict] = None, windows: Optional[np.ndarray] = None,
                 offsets: Optional[np.ndarray] = None):
        if backend not in BACKENDS:
            raise ValueError(f"Invalid value for argument `backend`. Expected one of {BACKENDS}. "
                             f"Received backend={backend!r}")
        if (windows is None) != (offsets is None):
            raise ValueError("Invalid arguments `windows` and `offsets`. Expected both or neither. "
                             f"Received windows={None if windows is None else np.shape(windows)}, "
                             f"offsets={None if offsets is None else np.shape(offsets)}")
        self.ids = tuple(ids)
        self.vectors = np.asarray(vectors, np.float32)
        self.center = np.asarray(center, np.float32)
        self.labels = tuple(labels)
        self.model = model
        self.spec = spec
        self.backend = backend
        self.info = dict(info or {})
        self.windows = None if windows is None else np.asarray(windows, np.float32)
        self.offsets = None if offsets is None else np.asarray(offsets, np.int64)
        if self.offsets is not None and (len(self.offsets) != len(self.ids) + 1 or self.offsets[0] != 0
                                         or self.offsets[-1] != len(self.windows)
                                         or np.any(np.diff(self.offsets) < 1)):
            raise ValueError(f"Invalid value for argument `offsets`. Expected {len(self.ids) + 1} increasing "
                             f"offsets from 0 to {len(self.windows)}, at least one window per video. "
                             f"Received offsets of shape {self.offsets.shape}")
        if searcher is None:
            searcher = ExactSearch(self.vectors) if backend == "exact" else FaissSearch.build(self.vectors)
        self.searcher = searcher
        # A video indexed as several views (`Reading.views`) has that many consecutive entries with its id;
        # a search answers each video once, with its best entry.
        self._entries_per_video = max(collections.Counter(self.ids).values(), default=1)

    @property
    def reading(self) -> Reading:
        """How the indexed videos were read (index.json `reading`); queries are read the same way."""
        return Reading.from_dict(self.info.get("reading"))

    @property
    def aggregate(self) -> str:
        return "mean" if self.windows is None else "windows"

    @property
    def pool(self) -> str:
        """How the model's map was pooled into features (`load_embedder`); `mean` before index.json had it."""
        return self.info.get("pool", "mean")

    @classmethod
    def build(cls, embedded: Embedded, *, model: str = "", spec: Optional[PatchSpec] = None,
              backend: str = "exact", center: bool = True, aggregate: Optional[str] = None) -> "VideoIndex":
        """`aggregate` None: `windows` when `embedded` holds windows, else `mean`."""
        if aggregate is None:
            aggregate = "windows" if embedded.windows else "mean"
        if aggregate not in AGGREGATES:
            raise ValueError(f"Invalid value for argument `aggregate`. Expected one of {AGGREGATES}. "
                             f"Received aggregate={aggregate!r}")
        if len(embedded.ids) == 0:
            raise RetrievalError("no videos to index: every input failed or none was given")
        raw = np.asarray(embedded.vectors, np.float32)
        mean = raw.mean(axis=0) if center and len(raw) > 1 else np.zeros(raw.shape[1], np.float32)
        vectors = _normalize(raw - mean)
        windows = offsets = None
        if aggregate == "windows":
            if len(embedded.windows) != len(embedded.ids):
                raise ValueError("Invalid value for argument `embedded`. Expected window embeddings for every "
                                 f"video with aggregate='windows'. Received {len(embedded.windows)} for "
                                 f"{len(embedded.ids)} videos")
            windows = _normalize(np.concatenate(embedded.windows) - mean)
            offsets = np.concatenate([[0], np.cumsum([len(w) for w in embedded.windows])])
        return cls(embedded.ids, vectors, mean, labels=embedded.labels, model=model, spec=spec, backend=backend,
                   windows=windows, offsets=offsets)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def prepare(self, raw: np.ndarray) -> np.ndarray:
        """Raw video embeddings `[Q, D]` -> centred, L2-normalised (as the indexed vectors are)."""
        raw = np.asarray(raw, np.float32).reshape(-1, self.dim) if np.ndim(raw) else raw
        if raw.shape[-1] != self.dim:
            raise RetrievalError(f"query embeddings have {raw.shape[-1]} dimensions, the index {self.dim}")
        return _normalize(raw - self.center)

    def search(self, raw: np.ndarray, k: int = 5) -> List[List[Hit]]:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid value for argument `k`. Expected a strictly positive integer. Received k={k!r}")
        scores, indices = self.searcher.search(self.prepare(raw), k * self._entries_per_video)
        return [self._hits(row_scores, row_indices, k) for row_scores, row_indices in zip(scores, indices)]

    def _hits(self, scores, indices, k: int) -> List[Hit]:
        """Entries best first -> the first `k` videos, each at its best entry (views: `Reading`)."""
        out, seen = [], set()
        for s, j in zip(scores, indices):
            if j < 0 or self.ids[j] in seen:
                continue
            seen.add(self.ids[j])
            out.append(Hit(self.ids[j], float(s), len(out) + 1, self.labels[j] if self.labels else ""))
            if len(out) == k:
                break
        return out

    def search_windows(self, queries: Sequence[np.ndarray], k: int = 5) -> List[List[Hit]]:
        """Raw window embeddings of each query video (`[m_q, D]`, as `embed_video_windows` gives them)
        -> its `k` best `Hit`s by the index's aggregate. With `mean` (an index without windows) a query
        counts as the mean of its windows."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid value for argument `k`. Expected a strictly positive integer. Received k={k!r}")
        if self.windows is None:
            return self.search(np.stack([np.asarray(q, np.float32).mean(axis=0) for q in queries]), k)
        out = []
        for query in queries:
            prepared = self.prepare(query)
            if isinstance(self.searcher, FaissSearch):
                _, candidates = self.searcher.search(self.prepare(np.asarray(query, np.float32).mean(axis=0)),
                                                     max(SHORTLIST, 10 * k) * self._entries_per_video)
                candidates = np.array([j for j in candidates[0] if j >= 0], np.int64)
                starts, ends = self.offsets[candidates], self.offsets[candidates + 1]
                rows = np.concatenate([np.arange(a, b) for a, b in zip(starts, ends)])
                scores = chamfer_scores(prepared, self.windows[rows], np.concatenate([[0], np.cumsum(ends - starts)]))
            else:
                candidates = np.arange(len(self.ids))
                scores = chamfer_scores(prepared, self.windows, self.offsets)
            order = np.argsort(-scores, kind="stable")
            out.append(self._hits(scores[order], candidates[order], k))
        return out

    # --- on disk ---

    def save(self, path: str) -> str:
        """Writes the index into the folder `path`, index.json last: a folder with index.json is complete.

        An earlier index there loses its index.json first, so a failed or killed save never leaves
        a folder that looks complete with arrays of two different indexes.
        """
        os.makedirs(path, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, INDEX_JSON))
        arrays = [(EMBEDDINGS_NPY, self.vectors), (CENTER_NPY, self.center)]
        if self.windows is not None:
            arrays += [(WINDOWS_NPY, self.windows), (OFFSETS_NPY, self.offsets)]
        for name, array in arrays:
            with outputs.atomic_file(os.path.join(path, name)) as tmp:
                np.save(tmp, array)
        if isinstance(self.searcher, FaissSearch):
            with outputs.atomic_file(os.path.join(path, FAISS_FILE)) as tmp:
                self.searcher.write(tmp)
        import keras
        import tensorflow as tf

        info = {**self.info, "format": FORMAT, "count": len(self.ids), "dim": self.dim, "backend": self.backend,
                "aggregate": self.aggregate,
                "model": self.model, "spec": self.spec.to_dict() if self.spec else None,
                "ids": list(self.ids), "labels": list(self.labels),
                "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        outputs.write_text(os.path.join(path, INDEX_JSON), json.dumps(info, indent=1) + "\n")
        self.info = info
        return path

    @classmethod
    def load(cls, path: str) -> "VideoIndex":
        meta = os.path.join(path, INDEX_JSON)
        try:
            with open(meta, encoding="utf-8") as f:
                info = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise RetrievalError(f"{path}: not an index written by `stp index` ({e})") from e
        if info.get("format") != FORMAT:
            raise RetrievalError(f"{meta}: format {info.get('format')!r}, expected {FORMAT!r}")
        vectors = np.load(os.path.join(path, EMBEDDINGS_NPY))
        center = np.load(os.path.join(path, CENTER_NPY))
        if vectors.shape != (info["count"], info["dim"]):
            raise RetrievalError(f"{path}: {EMBEDDINGS_NPY} holds {vectors.shape}, index.json says "
                              f"{(info['count'], info['dim'])}")
        # Indexes written before windows existed have no `aggregate`: they score by the mean, as they did.
        aggregate = info.get("aggregate", "mean")
        windows = offsets = None
        if aggregate == "windows":
            try:
                windows = np.load(os.path.join(path, WINDOWS_NPY))
                offsets = np.load(os.path.join(path, OFFSETS_NPY))
            except OSError as e:
                raise RetrievalError(f"{path}: index.json says aggregate 'windows' but the windows cannot be "
                                     f"read ({e}); rebuild it with `stp index`") from e
            if windows.ndim != 2 or windows.shape[1] != info["dim"] or offsets.shape != (info["count"] + 1,):
                raise RetrievalError(f"{path}: {WINDOWS_NPY} holds {windows.shape} and {OFFSETS_NPY} "
                                     f"{offsets.shape}; expected [M, {info['dim']}] and [{info['count'] + 1}]")
        elif aggregate != "mean":
            raise RetrievalError(f"{meta}: aggregate {aggregate!r}, expected one of {AGGREGATES}")
        searcher = None
        if info["backend"] == "faiss":
            searcher = FaissSearch.read(os.path.join(path, FAISS_FILE), info["count"])
        spec = PatchSpec.from_dict(info["spec"]) if info.get("spec") else None
        return cls(info["ids"], vectors, center, labels=info.get("labels", ()), model=info.get("model", ""),
                   spec=spec, backend=info["backend"], searcher=searcher, info=info, windows=windows, offsets=offsets)


# --- what the commands call -----------------------------------------------------------------------

def is_converted(path: str) -> bool:
    from tfrecords_tools.manifest import MANIFEST_NAME
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST_NAME))


def list_videos(paths: Iterable[str]) -> List[str]:
    """Video files and folders of videos (walked, sorted) -> video files."""
    from tfrecords_tools.sources import walk_videos

    out = []
    for p in paths:
        out.extend(walk_videos(p) if os.path.isdir(p) else [p])
    return out


def build_index(model: str, inputs: Sequence[str], out: str, *, split: Optional[str] = None,
                backend: str = "exact", batch_size: int = DEFAULT_BATCH_SIZE, center: bool = True,
                max_pixels: Optional[int] = None, aggregate: str = DEFAULT_AGGREGATE, pool: str = "mean",
                on_video: Optional[Callable[[str, Optional[str]], None]] = None,
                reading: Reading = Reading()) -> VideoIndex:
    """`stp index`: embeds `inputs` (video files, folders of videos, or one converted folder) with `model`
    and writes the index to `out`. Videos that fail are listed in index.json under `failed`; `pool`
    (see `load_embedder`) and `reading` are recorded there, and `search_videos` embeds queries with them.

    `out` is held for writing (`outputs.writing`) from the start; an `out` that is one of the inputs
    (or the model) raises `outputs.OutputIsInputError`."""
    outputs.check_not_input(out, [model, *inputs])
    with outputs.writing(out):
        return _build_index(model, inputs, out, split=split, backend=backend, batch_size=batch_size, center=center,
                            max_pixels=max_pixels, aggregate=aggregate, pool=pool, on_video=on_video,
                            reading=reading)


def _build_index(model: str, inputs: Sequence[str], out: str, *, split: Optional[str], backend: str,
                 batch_size: int, center: bool, max_pixels: Optional[int], aggregate: str, pool: str,
                 on_video: Optional[Callable[[str, Optional[str]], None]], reading: Reading) -> VideoIndex:
    if backend not in BACKENDS:
        raise ValueError(f"Invalid value for argument `backend`. Expected one of {BACKENDS}. "
                         f"Received backend={backend!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"Invalid value for argument `aggregate`. Expected one of {AGGREGATES}. "
                         f"Received aggregate={aggregate!r}")
    started = time.perf_counter()
    records = len(inputs) == 1 and is_converted(inputs[0])
    if records and reading != Reading():
        raise RetrievalError(f"{inputs[0]}: a converted folder holds patches already cut; stripping black bars "
                             f"and views ({reading.to_dict()}) need the videos themselves")
    embedder = load_embedder(model, pool)
    if records:
        embedded = embed_records(embedder, inputs[0], split, batch_size=batch_size)
        source = {"data": os.path.abspath(inputs[0]), "split": split}
    else:
        embedded = embed_videos(embedder, list_videos(inputs), batch_size=batch_size, max_pixels=max_pixels,
                                on_video=on_video, reading=reading)
        source = {"videos": [os.path.abspath(p) for p in inputs]}
    index = VideoIndex.build(embedded, model=os.path.abspath(model), spec=embedder.spec, backend=backend,
                             center=center, aggregate=aggregate)
    index.info.update(pool=pool, reading=reading.to_dict(), source=source,
                      failed=[{"video": v, "reason": r} for v, r in embedded.failed],
                      patches=list(embedded.patches), seconds=round(time.perf_counter() - started, 3))
    index.save(out)
    return index


def search_videos(index: VideoIndex, model: str, queries: Sequence[str], k: int = 5, *,
                  batch_size: int = DEFAULT_BATCH_SIZE, max_pixels: Optional[int] = None, rerank: int = 0
                  ) -> Iterator[Tuple[str, Optional[List[Hit]], Optional[str]]]:
    """`stp search` on video files: yields (query, hits best first, None) or (query, None, reason).

    Queries are pooled and read as the index was (index.json `pool` and `reading`: inside their black bars when
    the index strips them; `mean` and whole frames for indexes written before these were recorded). `rerank`
    > 0: the first `rerank` results are re-ordered by `reranked_hits`."""
    from stpkeras.inference import NoPatches
    from tfrecords_tools.video import VideoError

    embedder = load_embedder(model, index.pool)
    reading = index.reading
    for path in queries:
        try:
            region, = reading.regions(path, max_pixels, indexed=False)
            video = embed_video_windows(embedder, path, batch_size=batch_size, max_pixels=max_pixels, region=region)
            wanted = max(k, rerank)
            hits = (index.search_windows([video.windows], wanted) if index.aggregate == "windows"
                    else index.search(video.mean[None], wanted))[0]
            if rerank:
                hits = reranked_hits(path, hits, rerank, max_pixels=max_pixels,
                                     region=region if reading.strip_bars else None)
        except (VideoError, NoPatches) as e:
            yield path, None, str(e)
            continue
        yield path, hits[:k], None


def reranked_hits(query: str, hits: Sequence[Hit], count: int, *, max_pixels: Optional[int] = None,
                  region=None) -> List[Hit]:
    """`hits` with the first `count` re-ranked by `stpkeras.rerank.score` (the detail of the query's frames,
    read inside its black bars, aligned to each video's): those first, best match first, each with its
    `matched` score; then the rest in their order. A hit whose video cannot be read any more keeps
    `matched` None and goes after the compared ones. `region`: the query's picture if already found."""
    from stpkeras import rerank
    from tfrecords_tools import borders
    from tfrecords_tools.video import DEFAULT_MAX_PIXELS, VideoError

    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    frames = rerank.read_query(query, region or borders.picture_region(query, max_pixels=max_pixels),
                               max_pixels=max_pixels)
    checked = []
    for hit in hits[:count]:
        try:
            checked.append(dataclasses.replace(hit, matched=rerank.score(frames, hit.video, max_pixels=max_pixels)))
        except VideoError:
            checked.append(hit)
    checked.sort(key=lambda h: np.inf if h.matched is None else -h.matched)   # stable: unreadable ones last
    return [dataclasses.replace(h, rank=r + 1) for r, h in enumerate([*checked, *hits[count:]])]


# --- retrieval metrics ----------------------------------------------------------------------------

def recall_at_k(query_labels: Sequence[str], retrieved_labels: Sequence[Sequence[str]],
                ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Recall@k with 'same class = relevant': the fraction of queries with a relevant item in their top k.

    `retrieved_labels[q]` are the labels of query q's results, best first (at
    least max(ks) of them unless the gallery is smaller).
    """
    if len(query_labels) != len(retrieved_labels):
        raise ValueError(f"{len(query_labels)} query labels for {len(retrieved_labels)} result lists")
    out = {}
    for k in ks:
        hits = [label in list(got)[:k] for label, got in zip(query_labels, retrieved_labels)]
        out[f"recall@{k}"] = float(np.mean(hits)) if hits else 0.0
    return out


def mean_average_precision(query_labels: Sequence[str], ranked_labels: Sequence[Sequence[str]]) -> float:
    """mAP with 'same class = relevant': per query, the average precision of its whole ranking of the
    gallery (`ranked_labels[q]`, best first; `sklearn.metrics.average_precision_score`), averaged over
    the queries that have a relevant item (a query with none has no AP)."""
    from sklearn.metrics import average_precision_score

    if len(query_labels) != len(ranked_labels):
        raise ValueError(f"{len(query_labels)} query labels for {len(ranked_labels)} result lists")
    aps = []
    for label, ranked in zip(query_labels, ranked_labels):
        relevant = np.array([r == label for r in ranked])
        if relevant.any():
            aps.append(average_precision_score(relevant, -np.arange(len(ranked), dtype=np.float64)))
    return float(np.mean(aps)) if aps else 0.0


def evaluate_retrieval(index: VideoIndex, queries: Embedded, ks: Sequence[int] = (1, 5)) -> dict:
    """Recall@k and mAP (over the whole gallery) of labelled `queries` (e.g. a held-out split) against
    a labelled index."""
    if not index.labels or not any(index.labels):
        raise RetrievalError("the index holds no labels (index a labelled converted folder to measure recall)")
    keep = [i for i, label in enumerate(queries.labels) if label]
    if not keep:
        raise RetrievalError("the queries hold no labels")
    everything = len(set(index.ids))
    hits = (index.search_windows([queries.windows[i] for i in keep], everything) if queries.windows
            else index.search(queries.vectors[keep], everything))
    labels = [queries.labels[i] for i in keep]
    ranked = [[h.label for h in row] for row in hits]
    result = recall_at_k(labels, ranked, ks)
    result["map"] = mean_average_precision(labels, ranked)
    result["queries"] = len(keep)
    result["gallery"] = len(index.ids)
    return result
