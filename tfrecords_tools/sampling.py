"""Sample stage: which frames and patches of one read video each of its items takes (numpy only).

A video is decoded once for all its items. Each item takes a range of the
video's frames (the whole video, or the frames of its segment), its own
temporal grid over that range (every patch, or `clips` evenly spaced clips of
the patch length) and, with `max_patches`, an evenly spread share of those
patches. `ItemsCutter` feeds the one stream of frames to one `PatchCutter` per
item; the frames are shared, not copied, so memory stays at about one patch
length of frames whatever the number of items.

Segment times are counted on the frames the decoder stage delivers: frame k
of a read is at k / rate seconds from the video's first frame, where rate is
`--fps` when resampling and otherwise the video's mean frame rate.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from tfrecords_tools.errors import BadInput
from tfrecords_tools.patches import Grid, Patch, PatchCutter
from tfrecords_tools.spec import PatchSpec

# A frame shown for less than this share of its period at a segment's bound is not the segment's.
_TAIL = 0.01


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How many patches each item keeps: `clips` evenly spaced clips of the patch length (0: the whole
    temporal grid), then at most `max_patches` of them, evenly spread (0: all)."""

    clips: int = 0
    max_patches: int = 0

    def __post_init__(self):
        if self.clips < 0:
            raise ValueError(f"Invalid value for argument `clips`. Expected >= 0 (0: every patch). "
                             f"Received clips={self.clips}")
        if self.max_patches < 0:
            raise ValueError(f"Invalid value for argument `max_patches`. Expected >= 0 (0: no cap). "
                             f"Received max_patches={self.max_patches}")


class SegmentError(BadInput, ValueError):
    """A segment this video cannot give (past its end, shorter than a patch): that item's failure (the
    converter reports it for the row; the other items of the video go on)."""


@dataclasses.dataclass(frozen=True)
class Selection:
    """What one item takes from a read: frames [first, stop), its grid over them, the flat indices of the
    patches kept (None: all), and for the manifest its interval (seconds; None for a whole video) and
    what was sampled."""

    first: int
    stop: int
    grid: Grid
    keep: Optional[frozenset]
    interval: Optional[Tuple[float, float]]
    sampled: dict

    @property
    def frames(self) -> int:
        return self.stop - self.first

    @property
    def patches(self) -> int:
        return self.grid.num_patches if self.keep is None else len(self.keep)


def clip_starts(length: int, size: int, clips: int) -> List[int]:
    """`clips` starts of clips of `size` frames, evenly spaced over `length` frames, first and last
    included (one clip: the middle); fewer when the clips would repeat.

    >>> clip_starts(100, 10, 3), clip_starts(10, 4, 1), clip_starts(6, 4, 5)
    ([0, 45, 90], [3], [0, 1, 2])
    """
    room = max(0, length - size)
    if clips == 1:
        return [room // 2]
    return sorted({round(i * room / (clips - 1)) for i in range(clips)})


def spread(total: int, cap: int) -> List[int]:
    """`cap` of the indices 0..total-1, evenly spread (the middle of each of `cap` equal parts).

    >>> spread(10, 3), spread(4, 9)
    ([1, 5, 8], [0, 1, 2, 3])
    """
    if cap >= total:
        return list(range(total))
    return [(2 * i + 1) * total // (2 * cap) for i in range(cap)]


def frame_range(start: Optional[float], end: Optional[float], rate: float, frames: int) -> Tuple[int, int]:
    """The frames [first, stop) of a read of `frames` frames at `rate` that fall in [start, end) seconds."""
    first = 0 if start is None else max(0, math.ceil(start * rate - _TAIL))
    stop = frames if end is None else min(frames, max(0, math.ceil(end * rate - _TAIL)))
    return first, stop


def select(spec: PatchSpec, frames: int, height: int, width: int, duration: float,
           start: Optional[float] = None, end: Optional[float] = None,
           sampling: Sampling = Sampling()) -> Selection:
    """The `Selection` of one item from a read of `frames` frames lasting `duration` seconds.

    `start`/`end` (seconds, None: from the beginning / to the end) make the item a segment. Raises
    `SegmentError` for a segment past the video's end or shorter than a patch.
    """
    segment = start is not None or end is not None
    rate = frames / duration if duration > 0 else 1.0
    if spec.fps:
        rate = float(spec.fps)
    first, stop = 0, frames
    interval = None
    if segment:
        lo = start or 0.0
        hi = duration if end is None else end
        if lo >= duration:
            raise SegmentError(f"segment {lo:g}-{hi:g}s starts past the video's end at {duration:.3f}s")
        if hi > duration + 1.0 / rate:
            raise SegmentError(f"segment {lo:g}-{hi:g}s ends past the video's end at {duration:.3f}s")
        first, stop = frame_range(start, end, rate, frames)
        if stop - first < spec.frames:
            raise SegmentError(f"segment {lo:g}-{hi:g}s holds {stop - first} frames, shorter than a patch of "
                               f"{spec.frames} frames")
        interval = (lo, hi)
    grid = Grid.for_video(spec, stop - first, height, width)
    sampled = {}
    if sampling.clips and grid.t:
        starts = clip_starts(stop - first, spec.frames, sampling.clips)
        if spec.pad == "drop" and stop - first < spec.frames:
            starts = []
        grid = Grid(tuple(starts), grid.y, grid.x)
        sampled["clips"] = len(starts)
        sampled["clip_starts"] = list(starts)
    keep = None
    if sampling.max_patches and grid.num_patches > sampling.max_patches:
        keep = frozenset(spread(grid.num_patches, sampling.max_patches))
        sampled.update(max_patches=sampling.max_patches, of=grid.num_patches)
    return Selection(first, stop, grid, keep, interval, sampled)


class ItemsCutter:
    """One stream of frames -> the patches of several items, as `(item index, Patch)` in each item's grid
    order (items interleaved as their frames arrive).

    `selections` holds `(index, Selection)`; an item whose frames have all
    arrived has its tail patches cut at once. `done` is true once every item
    has all its frames and some of the read's `frames` are left (the rest of
    the video is needed by none). A read that goes to the end is never `done`
    early: the decoder checks the frame count there.
    """

    def __init__(self, spec: PatchSpec, selections: Sequence[Tuple[int, Selection]], frames: int):
        self.spec = spec
        self._open = [(i, s, PatchCutter(spec, s.grid), [0]) for i, s in selections]
        self._seen = 0
        self._last = max((s.stop for _, s in selections), default=0)
        self._frames = frames

    @property
    def done(self) -> bool:
        return self._last < self._frames and self._seen >= self._last

    def _kept(self, index: int, selection: Selection, counter: list, patches: Iterator[Patch]):
        for patch in patches:
            n = counter[0]
            counter[0] += 1
            if selection.keep is None or n in selection.keep:
                yield index, patch

    def add(self, frame: np.ndarray, timestamp: float) -> Iterator[Tuple[int, Patch]]:
        k = self._seen
        self._seen += 1
        still = []
        for entry in self._open:
            index, selection, cutter, counter = entry
            if selection.first <= k < selection.stop:
                yield from self._kept(index, selection, counter, cutter.add(frame, timestamp))
            if k + 1 >= selection.stop:
                yield from self._kept(index, selection, counter, cutter.finish())
            else:
                still.append(entry)
        self._open = still

    def finish(self) -> Iterator[Tuple[int, Patch]]:
        for index, selection, cutter, counter in self._open:
            yield from self._kept(index, selection, counter, cutter.finish())
        self._open = []
