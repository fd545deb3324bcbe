"""Sample stage: segment frame ranges, evenly spaced clips, evenly spread caps, and one stream cut for
several items (checked against cutting each item's frames on its own)."""

import numpy as np
import pytest

from tfrecords_tools.patches import Grid, PatchCutter
from tfrecords_tools.sampling import (ItemsCutter, Sampling, SegmentError, clip_starts, frame_range, select,
                                      spread)
from tfrecords_tools.spec import PatchSpec
from videos import pattern_frames

SPEC = PatchSpec(4, 16, 16)


def test_clip_starts_and_spread():
    assert clip_starts(50, 4, 3) == [0, 23, 46]
    assert clip_starts(50, 4, 1) == [23]
    assert clip_starts(5, 4, 4) == [0, 1]          # only two distinct clips fit
    assert spread(18, 5) == [1, 5, 9, 12, 16]
    assert spread(3, 5) == [0, 1, 2]


def test_frame_range_counts_frames_at_the_rate():
    assert frame_range(0.4, 1.2, 25.0, 50) == (10, 30)
    assert frame_range(None, None, 25.0, 50) == (0, 50)
    assert frame_range(1.6, None, 25.0, 50) == (40, 50)
    assert frame_range(0.5, 1.5, 25.0, 50) == (13, 38)  # frame 12 is at 0.48 s, before the start


def test_select_reports_what_a_video_cannot_give():
    whole = select(SPEC, 50, 32, 48, 2.0)
    assert (whole.first, whole.stop, whole.interval, whole.patches) == (0, 50, None, 12 * 2 * 3)
    seg = select(SPEC, 50, 32, 48, 2.0, 1.6, None)
    assert (seg.first, seg.stop, seg.interval) == (40, 50, (1.6, 2.0))
    with pytest.raises(SegmentError, match=r"segment 1.9-2.5s ends past the video's end at 2.000s"):
        select(SPEC, 50, 32, 48, 2.0, 1.9, 2.5)
    with pytest.raises(SegmentError, match=r"segment 2-3s starts past the video's end at 2.000s"):
        select(SPEC, 50, 32, 48, 2.0, 2.0, 3.0)
    with pytest.raises(SegmentError, match=r"segment 1-1.05s holds 2 frames, shorter than a patch of 4 frames"):
        select(SPEC, 50, 32, 48, 2.0, 1.0, 1.05)
    sampled = select(SPEC, 50, 32, 48, 2.0, sampling=Sampling(clips=3, max_patches=5))
    assert sampled.grid.t == (0, 23, 46) and sampled.keep == frozenset([1, 5, 9, 12, 16])
    assert sampled.sampled == {"clips": 3, "clip_starts": [0, 23, 46], "max_patches": 5, "of": 18}


@pytest.mark.parametrize("pad", ["drop", "edge"])
def test_items_cutter_gives_each_item_the_patches_of_its_own_frames(pad):
    spec = PatchSpec(4, 16, 16, pad=pad)
    frames = pattern_frames(50, 32, 40, seed=5)
    ranges = [(None, None), (0.4, 1.2), (0.5, 1.5), (1.6, None), (0.0, 0.3)]
    selections = [(i, select(spec, 50, 32, 40, 2.0, s, e, Sampling(max_patches=7 if i == 2 else 0)))
                  for i, (s, e) in enumerate(ranges)]
    cutter = ItemsCutter(spec, selections, 50)
    got = {i: [] for i, _ in selections}
    for k, frame in enumerate(frames):
        for i, patch in cutter.add(frame, k / 25):
            got[i].append(patch)
        if cutter.done:
            break
    for i, patch in cutter.finish():
        got[i].append(patch)
    assert not cutter.done  # the whole video's item needs every frame
    for i, sel in selections:
        alone = PatchCutter(spec, Grid.for_video(spec, sel.frames, 32, 40))
        expected = [p for k in range(sel.first, sel.stop) for p in alone.add(frames[k], k / 25)]
        expected += list(alone.finish())
        if sel.keep is not None:
            expected = [p for n, p in enumerate(expected) if n in sel.keep]
        assert len(got[i]) == len(expected) == sel.patches
        for a, b in zip(got[i], expected):
            assert a.offset == b.offset and a.timestamp == b.timestamp
            np.testing.assert_array_equal(a.pixels, b.pixels)
        # Offsets count from the item's first frame; the pixels are the video's frames there.
        if sel.keep is None:
            first = got[i][0]
            assert first.offset == (0, 0, 0)
            np.testing.assert_array_equal(first.pixels, frames[sel.first:sel.first + 4, :16, :16])


def test_items_cutter_is_done_when_no_item_needs_the_rest():
    cutter = ItemsCutter(SPEC, [(0, select(SPEC, 50, 32, 48, 2.0, 0.0, 0.5))], 50)
    frames = pattern_frames(13, 32, 48, seed=1)
    out = [p for k, f in enumerate(frames) for p in cutter.add(f, k / 25)]
    assert cutter.done and len(out) == 3 * 2 * 3  # frames 0..12: three patches along time
