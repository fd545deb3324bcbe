"""Patch stage: grid arithmetic and cutting of frame windows into spacetime patches (numpy only)."""

from __future__ import annotations

import dataclasses
from typing import Iterator, List, Sequence, Tuple

import numpy as np

from tfrecords_tools.spec import PatchSpec


def grid_starts(length: int, size: int, stride: int, pad: str) -> List[int]:
    """Start offsets of patches of `size` every `stride` along an axis of `length`.

    `drop` keeps only patches that lie wholly inside. `edge`/`zero` also keep a
    last partial patch when it holds values that no whole patch covers; a
    start that falls in a gap between patches (stride > size) adds nothing.

    >>> grid_starts(10, 4, 3, "drop"), grid_starts(10, 4, 3, "edge")
    ([0, 3, 6], [0, 3, 6])
    >>> grid_starts(11, 4, 3, "drop"), grid_starts(11, 4, 3, "zero")
    ([0, 3, 6], [0, 3, 6, 9])
    """
    if length <= 0:
        return []
    if pad == "drop":
        if length < size:
            return []
        return list(range(0, length - size + 1, stride))
    starts = []
    k = 0
    while k * stride < length and (k == 0 or (k - 1) * stride + size < length):
        starts.append(k * stride)
        k += 1
    return starts


@dataclasses.dataclass(frozen=True)
class Grid:
    """The patch grid of one video: starts along time, height and width."""

    t: Tuple[int, ...]
    y: Tuple[int, ...]
    x: Tuple[int, ...]

    @classmethod
    def for_video(cls, spec: PatchSpec, num_frames: int, height: int, width: int) -> "Grid":
        return cls(tuple(grid_starts(num_frames, spec.frames, spec.stride_frames, spec.pad)),
                   tuple(grid_starts(height, spec.height, spec.stride_height, spec.pad)),
                   tuple(grid_starts(width, spec.width, spec.stride_width, spec.pad)))

    @property
    def num_patches(self) -> int:
        return len(self.t) * len(self.y) * len(self.x)


@dataclasses.dataclass(frozen=True)
class Patch:
    """One cut patch: `pixels` is `uint8 [T, H, W, 3]` (padded where `valid` is smaller)."""

    pixels: np.ndarray
    index: Tuple[int, int, int]   # grid index (t, y, x)
    offset: Tuple[int, int, int]  # first frame, top row, left column
    valid: Tuple[int, int, int]   # frames, rows, columns holding real data (the rest is padding)
    timestamp: float              # seconds of the first frame


def _pad_to(block: np.ndarray, shape: Tuple[int, int, int], mode: str) -> np.ndarray:
    widths = [(0, s - b) for s, b in zip(shape, block.shape[:3])] + [(0, 0)]
    if all(w == (0, 0) for w in widths):
        return block
    if mode == "edge":
        return np.pad(block, widths, mode="edge")
    return np.pad(block, widths, mode="constant")


def cut_window(spec: PatchSpec, window: np.ndarray, t_index: int, t_offset: int, grid: Grid,
               timestamp: float) -> Iterator[Patch]:
    """Cuts every spatial patch of one temporal window.

    `window` is `uint8 [t, H, W, 3]` with t <= spec.frames frames starting at
    frame `t_offset` (fewer only for a tail, which is padded here). Patches come
    in row-major order (y, then x), the order every reader expects.
    """
    yield from _cut(spec, window, t_index, t_offset, grid, timestamp)


def _cut(spec: PatchSpec, frames: Sequence[np.ndarray], t_index: int, t_offset: int, grid: Grid,
         timestamp: float) -> Iterator[Patch]:
    """`cut_window` on a sequence of `uint8 [H, W, 3]` frames (an array's first axis, or a list)."""
    t_valid = len(frames)
    height, width = frames[0].shape[:2]
    for iy, y in enumerate(grid.y):
        h_valid = min(spec.height, height - y)
        for ix, x in enumerate(grid.x):
            w_valid = min(spec.width, width - x)
            # One copy per patch, straight from the frames: stacking the window first, then making
            # each patch contiguous, copied every pixel twice.
            area = (slice(y, y + spec.height), slice(x, x + spec.width))
            block = np.stack([frame[area] for frame in frames])
            yield Patch(_pad_to(block, spec.size, spec.pad), (t_index, iy, ix), (t_offset, y, x),
                        (t_valid, h_valid, w_valid), timestamp)


class PatchCutter:
    """Turns a stream of frames into patches, holding at most `spec.frames` frames.

    Feed frames in order with `add(frame, timestamp)`; each call yields the
    patches whose last frame it was. `finish()` yields the padded tail patches
    (`edge`/`zero`) once the stream has ended. The grid must be built for the
    number of frames the stream will deliver.
    """

    def __init__(self, spec: PatchSpec, grid: Grid):
        self.spec = spec
        self.grid = grid
        self._frames: List[np.ndarray] = []
        self._stamps: List[float] = []
        self._first = 0   # frame index of self._frames[0]
        self._seen = 0    # frames added so far
        self._next = 0    # index into grid.t of the next patch to emit

    def _emit(self, length: int) -> Iterator[Patch]:
        start = self.grid.t[self._next]
        lo = start - self._first
        yield from _cut(self.spec, self._frames[lo:lo + length], self._next, start, self.grid, self._stamps[lo])
        self._next += 1
        # Frames before the next start are needed by no later patch.
        keep_from = self.grid.t[self._next] if self._next < len(self.grid.t) else self._seen
        drop = min(max(0, keep_from - self._first), len(self._frames))
        del self._frames[:drop], self._stamps[:drop]
        self._first += drop

    def add(self, frame: np.ndarray, timestamp: float) -> Iterator[Patch]:
        index = self._seen
        self._seen += 1
        if self._next >= len(self.grid.t) or index < self.grid.t[self._next]:
            # In a gap between patches (stride > size) or past the grid: not needed.
            self._first = self._seen
            return
        self._frames.append(frame)
        self._stamps.append(timestamp)
        while self._next < len(self.grid.t) and self._seen >= self.grid.t[self._next] + self.spec.frames:
            yield from self._emit(self.spec.frames)

    def finish(self) -> Iterator[Patch]:
        """Yields the tail patches the grid holds but the stream did not fill."""
        while self._next < len(self.grid.t):
            start = self.grid.t[self._next]
            if start >= self._seen:
                raise RuntimeError(f"the stream ended after {self._seen} frames, "
                                   f"but the grid has a patch starting at frame {start}")
            yield from self._emit(self._seen - start)
        self._frames.clear()
        self._stamps.clear()


# ---------------------------------------------------------------------------------------------
# The inverse of cutting: overlap-add of (processed) patches back into frames


def blend_window(size: int, overlap: int) -> np.ndarray:
    """`float32 [size]` weights of one patch axis for overlap-add: 1 in the middle, and over the first and
    last `overlap` values a raised-cosine ramp `sin^2`, sampled at half steps so it never reaches 0.

    Two ramps that overlap by `overlap` values sum to exactly 1 (sin^2 + cos^2),
    so neighbouring patches cross-fade without a seam; every weight is > 0, so
    dividing by the summed weights gives back any value that all covering
    patches agree on (no darkening at the video's borders).

    >>> [round(v, 3) for v in blend_window(6, 2).tolist()]
    [0.146, 0.854, 1.0, 1.0, 0.854, 0.146]
    """
    if not 0 <= overlap <= size // 2:
        raise ValueError(f"Invalid value for argument `overlap`. Expected 0 <= overlap <= {size // 2} (half the "
                         f"patch side {size}). Received overlap={overlap}")
    w = np.ones(size, np.float64)
    if overlap:
        ramp = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
        w[:overlap] = ramp
        w[size - overlap:] = ramp[::-1]
    return w.astype(np.float32)


def overlap_spec(spec: PatchSpec, overlap: Tuple[int, int, int]) -> PatchSpec:
    """The spec that cuts a whole video for reassembly: `spec`'s patch size, stride `size - overlap`,
    `edge` padding (every pixel is covered, whatever the frame size) and no resampling or resizing."""
    for name, size, o in zip(("frames", "height", "width"), spec.size, overlap):
        if not 0 <= o <= size // 2:
            raise ValueError(f"Invalid value for argument `overlap`. Expected 0 <= overlap <= {size // 2} in "
                             f"{name} (half the patch's {size}). Received overlap={'x'.join(map(str, overlap))}")
    t, h, w = spec.size
    return PatchSpec(t, h, w, spec.channels, stride_frames=t - overlap[0], stride_height=h - overlap[1],
                     stride_width=w - overlap[2], pad="edge")


class PatchAssembler:
    """Puts patches back into frames by weighted overlap-add, streaming over time.

    Feed the patches of one video in grid order (t, then y, then x), each as
    `float or uint8 [T, H, W, C]` pixels with its `offset` and `valid` extent
    (from the `Patch` that was cut); `add` yields `(frame index, uint8 [H, W, C]
    frame)` for every frame no later patch can touch, `finish` the rest. Each
    patch is weighted by the outer product of `blend_window`s (separable in
    t, y, x); a frame is the weighted sum divided by the summed weights, rounded
    and clipped to uint8. Only frames from the current patch start on are held:
    memory is about `spec.frames` float frames, whatever the video's length.
    """

    def __init__(self, spec: PatchSpec, overlap: Tuple[int, int, int], num_frames: int, height: int, width: int,
                 channels: int = 3):
        self.spec = spec
        self.size = (num_frames, height, width)
        self.channels = channels
        self.windows = [blend_window(s, o) for s, o in zip(spec.size, overlap)]
        self._acc: dict = {}       # frame index -> float32 [H, W, C] weighted sum
        self._weight: dict = {}    # frame index -> float32 [H, W, 1] summed weights
        self._next = 0             # the next frame to emit

    def add(self, pixels: np.ndarray, offset: Tuple[int, int, int],
            valid: Tuple[int, int, int]) -> Iterator[Tuple[int, np.ndarray]]:
        t0, y0, x0 = offset
        vt, vh, vw = valid
        if t0 < self._next:
            raise ValueError(f"patch at frame {t0} arrived after frame {self._next - 1} was emitted: "
                             "patches must come in grid order (t, then y, then x)")
        # Frames before this patch's start are complete: patches come in order of their start.
        yield from self._emit(t0)
        wt, wy, wx = (w[:v] for w, v in zip(self.windows, valid))
        plane = (wy[:, None] * wx[None, :])[..., None]
        block = np.asarray(pixels, np.float32)
        for i in range(vt):
            t = t0 + i
            if t not in self._acc:
                self._acc[t] = np.zeros((*self.size[1:], self.channels), np.float32)
                self._weight[t] = np.zeros((*self.size[1:], 1), np.float32)
            w = plane * wt[i]
            self._acc[t][y0:y0 + vh, x0:x0 + vw] += block[i, :vh, :vw] * w
            self._weight[t][y0:y0 + vh, x0:x0 + vw] += w

    def _emit(self, before: int) -> Iterator[Tuple[int, np.ndarray]]:
        while self._next < before:
            t = self._next
            if t not in self._acc:
                raise ValueError(f"frame {t} was covered by no patch (a stride larger than the patch leaves gaps)")
            weight = self._weight.pop(t)
            if not np.all(weight > 0):
                raise ValueError(f"frame {t}: {int((weight <= 0).sum())} pixels were covered by no patch")
            frame = self._acc.pop(t) / weight
            yield t, np.clip(np.rint(frame), 0, 255).astype(np.uint8)
            self._next += 1

    def finish(self) -> Iterator[Tuple[int, np.ndarray]]:
        """Yields the frames still held; checks that every frame of the video was covered."""
        yield from self._emit(self.size[0])
        if self._acc:
            raise ValueError(f"patches reached frames {sorted(self._acc)[:3]}... beyond the video's "
                             f"{self.size[0]} frames")
