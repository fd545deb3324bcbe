"""Re-ranking stage: a search's first results re-ordered by the fine detail of aligned frames.

An embedding finds the videos that look like a query; it cannot tell apart two stretches of one
static shot (a camera on a tree: the same picture, leaves a little elsewhere), because it squeezes
frames to a few dozen pixels and averages them over a window. A copy, though, holds the very
frames of its source: once aligned, its detail matches one stretch and not the other. So, for the
first `--rerank N` results of `stp search` (as the spatial verification of image retrieval re-ranks):

1. the query's frames (inside its black bars, `tfrecords_tools.borders`) are read in grey at
   `FrameMatch.width` pixels across, `frames` of them evenly spaced, and averaged;
2. each candidate's mean frame is searched for the query's mean frame over `scales` (the share of
   the candidate's width the query shows: a border-cropped, letterboxed copy shows less than its
   source) and every shift (normalised cross-correlation, `scipy.signal.fftconvolve`);
3. at that alignment each query frame is compared with every frame of the candidate after both
   lose what a Gaussian blur of `detail` pixels keeps (what remains is the detail the codec left),
   and the candidate scores the mean over query frames of the best normalised correlation.

Candidates are read twice (the mean, then the frames), one frame at a time; a query's kept frames
are `frames x width` floats. A query that shows more than a candidate (the candidate is a crop of
it), or a mirrored one, does not align and scores low: re-ranking only re-orders the first
results and never adds one. Measured in benchmarks/copies.py (docs/benchmarks.md, copy detection).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np

from tfrecords_tools.spec import PatchSpec
from tfrecords_tools.video import DEFAULT_MAX_PIXELS, fold_frames, probe

Region = Optional[Tuple[int, int, int, int]]


@dataclasses.dataclass(frozen=True)
class FrameMatch:
    """How frames are compared: `width` pixels across, `frames` query frames, blur `detail` (pixels at
    that width) removed, and the candidate shares of width `scales` searched for the alignment."""

    width: int = 128
    frames: int = 16
    detail: float = 2.0
    scales: Tuple[float, ...] = tuple(float(s) for s in np.linspace(0.5, 1.0, 26))

    def __post_init__(self):
        if self.width < 16 or self.frames < 1 or self.detail <= 0 or not self.scales or \
                any(not 0 < s <= 1 for s in self.scales):
            raise ValueError("Invalid FrameMatch. Expected width >= 16, frames >= 1, detail > 0 and scales in "
                             f"(0, 1]. Received {self}")


@dataclasses.dataclass(frozen=True)
class QueryFrames:
    frames: np.ndarray   # float32 [n, h, width]: detail of the kept frames, each zero-mean and unit-norm
    mean: np.ndarray     # float32 [h, width]: the mean grey frame (for the alignment)


def _grey(frame: np.ndarray) -> np.ndarray:
    return frame.mean(axis=2, dtype=np.float32)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.BOX), np.float32)


def _detail(image: np.ndarray, sigma: float) -> np.ndarray:
    """`image` less its Gaussian blur, zero-mean and unit-norm (all zeros for a flat image)."""
    from scipy.ndimage import gaussian_filter

    d = image - gaussian_filter(image, sigma)
    d = d - d.mean()
    norm = float(np.sqrt((d * d).sum()))
    return d / norm if norm > 1e-6 else np.zeros_like(d)


def _picture_size(region: Region, info) -> Tuple[int, int]:
    """(height, width) of what is read of a video: `region`, or the whole frame the probe `info` saw."""
    return (region[2], region[3]) if region is not None else (info.height, info.width)


def read_query(path: str, region: Region = None, cfg: FrameMatch = FrameMatch(), *,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> QueryFrames:
    """The query's frames as they are compared (module docstring, step 1)."""
    info = probe(path, max_pixels)
    h, w = _picture_size(region, info)
    height = max(8, int(round(h * cfg.width / w)))
    keep = set(np.linspace(0, max(info.packets - 1, 0), cfg.frames).round().astype(int).tolist())

    def add(state, frame):
        grey = _grey(frame)
        state["sum"] = grey if state["sum"] is None else state["sum"] + grey
        if state["count"] in keep:
            state["kept"].append(_detail(grey, cfg.detail))
        state["count"] += 1

    state = fold_frames(path, PatchSpec(1, height, cfg.width, resize=(height, cfg.width)),
                        lambda: {"sum": None, "count": 0, "kept": []}, add, region=region, max_pixels=max_pixels,
                        info=info)
    return QueryFrames(np.stack(state["kept"]), state["sum"] / state["count"])


def _ncc_map(image: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Zero-mean normalised cross-correlation of `template` at every position where it fits in `image`."""
    from scipy.signal import fftconvolve

    t = template - template.mean()
    norm = float(np.sqrt((t * t).sum())) + 1e-6
    ones = np.ones_like(template)
    product = fftconvolve(image, t[::-1, ::-1], mode="valid")
    total = fftconvolve(image, ones, mode="valid")
    squares = fftconvolve(image * image, ones, mode="valid")
    variance = np.maximum(squares - total * total / ones.size, 1e-6)
    return product / (np.sqrt(variance) * norm)


def score(query: QueryFrames, path: str, region: Region = None, cfg: FrameMatch = FrameMatch(), *,
          max_pixels: int = DEFAULT_MAX_PIXELS) -> float:
    """How well the detail of `query`'s frames matches `path`'s (module docstring, steps 2-3): the mean over
    query frames of the best normalised correlation, in [-1, 1]; -1 when the query fits nowhere in it."""
    info = probe(path, max_pixels)   # once: both reads below take it
    h, w = _picture_size(region, info)
    qh, qw = query.mean.shape
    # Read at the largest size any scale needs: a share `s` of the width becomes the query's width.
    width = int(round(qw / min(cfg.scales)))
    height = max(8, int(round(h * width / w)))
    spec = PatchSpec(1, height, width, resize=(height, width))

    def add_sum(state, frame):
        state[0] = _grey(frame) if state[0] is None else state[0] + _grey(frame)
        state[1] += 1

    total, count = fold_frames(path, spec, lambda: [None, 0], add_sum, region=region, max_pixels=max_pixels,
                               info=info)
    mean = total / count
    best, where = -2.0, None
    for s in cfg.scales:
        sw = int(round(qw / s))                      # the candidate scaled so its share `s` is `qw` wide
        sh = int(round(height * sw / width))
        if sh < qh or sw < qw:
            continue
        ncc = _ncc_map(_resize(mean, sh, sw), query.mean)
        y, x = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
        if ncc[y, x] > best:
            best, where = float(ncc[y, x]), (sh, sw, int(y), int(x))
    if where is None:
        return -1.0
    sh, sw, y, x = where

    def add_best(state, frame):
        d = _detail(_resize(_grey(frame), sh, sw)[y:y + qh, x:x + qw], cfg.detail)
        np.maximum(state, np.tensordot(query.frames, d, axes=([1, 2], [0, 1])), out=state)

    matches = fold_frames(path, spec, lambda: np.full(len(query.frames), -1.0, np.float32), add_best, region=region,
                          max_pixels=max_pixels, info=info)
    return float(matches.mean())
