"""Black bars: the part of a video's frames that holds its picture.

A letterboxed copy (bars above and below) or a pillarboxed one (left and right) shows its source's
picture inside black borders; a model that squeezes the whole frame to its patch size sees the
picture smaller and shifted, and the bars as content. `picture_region` finds the picture once per
video, streaming its frames (one at a time, as shown), and `video_patches(..., region=...)` then
reads only that part (`Plan.region`).

A row (column) is a bar when none of its pixels is brighter than `level` (the mean of R, G and B,
0-255) in any frame: black, give or take a codec's ringing. Dark scenery has brighter pixels
somewhere on every line; burnt-in subtitles in a bar keep their lines (and those between them and
the picture) as picture. Bars are the runs of such lines from each edge, and `EDGE` lines more: the
codec's ringing makes the lines along a bar's edge a little brighter than black without being picture.
Bars that would leave less than `MIN_PICTURE` of the height or width (a dark or fading video, not a
border) are not bars.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from tfrecords_tools.spec import PatchSpec
from tfrecords_tools.video import DEFAULT_MAX_PIXELS, fold_frames, probe

BAR_LEVEL = 16       # no pixel of a bar line is brighter (mean of RGB, 0-255) in any frame: black, bar the codec
MIN_PICTURE = 0.5    # bars never take more than half of the height or of the width
EDGE = 2             # lines given up next to a bar: the codec rings across its edge (brighter, yet not picture)

Region = Tuple[int, int, int, int]   # (top, left, height, width) in pixels of the frame as shown


def _edge_run(brightest: np.ndarray, level: float) -> Tuple[int, int]:
    """(first, last + 1) of the lines with a pixel brighter than `level` in some frame; (0, 0) when none has."""
    lit = np.nonzero(brightest > level)[0]
    return (int(lit[0]), int(lit[-1]) + 1) if len(lit) else (0, 0)


def picture_region(path: str, *, level: float = BAR_LEVEL, max_pixels: int = DEFAULT_MAX_PIXELS) -> Region:
    """The region of `path`'s frames inside its black bars, `(top, left, height, width)`; the whole
    frame when it has none (or when what looks like bars would leave less than `MIN_PICTURE` of it).

    Decodes the whole video once (frames at their own size, one at a time). Raises `VideoError` for
    a file that cannot be read.
    """
    info = probe(path, max_pixels)

    def add(brightest, frame):   # every frame at the probe's size
        grey = frame.mean(axis=2, dtype=np.float32)
        np.maximum(brightest[0], grey.max(axis=1), out=brightest[0])
        np.maximum(brightest[1], grey.max(axis=0), out=brightest[1])

    rows, cols = fold_frames(path, PatchSpec(1, 1, 1), lambda: (np.zeros(info.height, np.float32),
                                                                 np.zeros(info.width, np.float32)), add, info=info)
    top, bottom = _inside(*_edge_run(rows, level), info.height)
    left, right = _inside(*_edge_run(cols, level), info.width)
    if bottom - top < MIN_PICTURE * info.height or right - left < MIN_PICTURE * info.width:
        return 0, 0, info.height, info.width
    return top, left, bottom - top, right - left


def _inside(first: int, end: int, size: int) -> Tuple[int, int]:
    """The lit run `first:end` less `EDGE` lines on each side that has a bar."""
    return (first + EDGE if first > 0 else first), (end - EDGE if end < size else end)


def central(region: Region, fraction: float) -> Region:
    """The central `fraction` (0 < fraction <= 1) of `region` in each dimension (at least one pixel)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"Invalid value for argument `fraction`. Expected a number in (0, 1]. "
                         f"Received fraction={fraction!r}")
    top, left, height, width = region
    h, w = max(1, int(round(height * fraction))), max(1, int(round(width * fraction)))
    return top + (height - h) // 2, left + (width - w) // 2, h, w
