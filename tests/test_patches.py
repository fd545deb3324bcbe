"""Patch stage: grid arithmetic on odd sizes for every pad mode, and streaming cutting versus cutting by hand."""

import itertools

import numpy as np
import pytest

from tfrecords_tools.patches import Grid, PatchCutter, cut_window, grid_starts
from tfrecords_tools.spec import PatchSpec
from videos import cut


# (length, size, stride) -> expected starts, worked out by hand:
# drop keeps whole patches only; edge/zero add one last partial patch when it
# covers values that no earlier patch covers (a start inside a gap adds nothing).
@pytest.mark.parametrize("length, size, stride, drop, padded", [
    (10, 4, 4, [0, 4], [0, 4, 8]),            # 8..9 left over: padded keeps it
    (12, 4, 4, [0, 4, 8], [0, 4, 8]),         # divides exactly: the same
    (3, 4, 4, [], [0]),                       # shorter than one patch
    (4, 4, 4, [0], [0]),
    (1, 4, 4, [], [0]),
    (0, 4, 4, [], []),
    (10, 4, 3, [0, 3, 6], [0, 3, 6]),         # stride < size: 6..9 ends exactly at 10
    (11, 4, 3, [0, 3, 6], [0, 3, 6, 9]),      # value 10 only in a patch starting at 9
    (10, 4, 2, [0, 2, 4, 6], [0, 2, 4, 6]),
    (11, 4, 2, [0, 2, 4, 6], [0, 2, 4, 6, 8]),
    (45, 16, 16, [0, 16], [0, 16, 32]),       # odd frame height
    (71, 16, 16, [0, 16, 32, 48], [0, 16, 32, 48, 64]),
    (71, 16, 8, [0, 8, 16, 24, 32, 40, 48], [0, 8, 16, 24, 32, 40, 48, 56]),
    (10, 2, 4, [0, 4, 8], [0, 4, 8]),         # stride > size: gaps of 2 between patches
    (9, 2, 4, [0, 4], [0, 4, 8]),             # value 8 only in a partial patch at 8
    (7, 2, 4, [0, 4], [0, 4]),                # values 6 fall in a gap: no patch added
    (3, 2, 4, [0], [0]),                      # value 2 in the gap after the first patch
    (5, 2, 4, [0], [0, 4]),
    (20, 3, 7, [0, 7, 14], [0, 7, 14]),       # 14..16, then 17..19 is a gap
    (22, 3, 7, [0, 7, 14], [0, 7, 14, 21]),
])
def test_grid_starts(length, size, stride, drop, padded):
    assert grid_starts(length, size, stride, "drop") == drop
    assert grid_starts(length, size, stride, "edge") == padded
    assert grid_starts(length, size, stride, "zero") == padded


def test_grid_for_video_on_odd_sizes():
    spec = PatchSpec(8, 16, 16, stride_frames=6, pad="edge")
    grid = Grid.for_video(spec, 19, 45, 71)
    assert grid.t == (0, 6, 12)           # 12..19 reaches the last frame (18) with 7 real frames
    assert grid.y == (0, 16, 32)
    assert grid.x == (0, 16, 32, 48, 64)
    assert grid.num_patches == 3 * 3 * 5
    drop = Grid.for_video(PatchSpec(8, 16, 16, stride_frames=6), 19, 45, 71)
    assert (drop.t, drop.y, drop.x) == ((0, 6), (0, 16), (0, 16, 32, 48))
    assert drop.num_patches == 16


def _video(t=19, h=45, w=71, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


def _stream(spec, frames, stamps=None):
    """All patches of `frames` cut by a `PatchCutter` fed one frame at a time."""
    grid = Grid.for_video(spec, *frames.shape[:3])
    cutter = PatchCutter(spec, grid)
    stamps = stamps if stamps is not None else [i / 10 for i in range(len(frames))]
    patches, held = [], 0
    for frame, t in zip(frames, stamps):
        patches.extend(cutter.add(frame, t))
        held = max(held, len(cutter._frames))
    patches.extend(cutter.finish())
    return grid, patches, held


# Hand-computed starts for a 19 x 45 x 71 video (see test_grid_starts).
CASES = {
    # spec kwargs: (t starts, y starts, x starts)
    "drop": (dict(pad="drop"), ([0, 8], [0, 16], [0, 16, 32, 48])),
    "edge": (dict(pad="edge"), ([0, 8, 16], [0, 16, 32], [0, 16, 32, 48, 64])),
    "zero": (dict(pad="zero"), ([0, 8, 16], [0, 16, 32], [0, 16, 32, 48, 64])),
    "overlap-edge": (dict(pad="edge", stride_frames=5, stride_height=12, stride_width=20),
                     ([0, 5, 10, 15], [0, 12, 24, 36], [0, 20, 40, 60])),
    "gaps-zero": (dict(pad="zero", stride_frames=11, stride_height=30, stride_width=40),
                  ([0, 11], [0, 30], [0, 40])),
    "gaps-drop": (dict(pad="drop", stride_frames=11, stride_height=30, stride_width=40),
                  ([0, 11], [0], [0, 40])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cutter_equals_cutting_the_whole_array_by_hand(case):
    kwargs, (ts, ys, xs) = CASES[case]
    spec = PatchSpec(8, 16, 16, **kwargs)
    frames = _video()
    stamps = [0.5 + 0.04 * i for i in range(len(frames))]
    grid, patches, held = _stream(spec, frames, stamps)
    assert (list(grid.t), list(grid.y), list(grid.x)) == (ts, ys, xs)
    expected = list(itertools.product(range(len(ts)), range(len(ys)), range(len(xs))))
    assert [p.index for p in patches] == expected  # t, then y, then x
    for p in patches:
        it, iy, ix = p.index
        t, y, x = ts[it], ys[iy], xs[ix]
        assert p.offset == (t, y, x)
        assert p.valid == (min(8, 19 - t), min(16, 45 - y), min(16, 71 - x))
        assert p.timestamp == stamps[t]
        assert p.pixels.dtype == np.uint8 and p.pixels.shape == (8, 16, 16, 3)
        np.testing.assert_array_equal(p.pixels, cut(frames, t, y, x, (8, 16, 16), spec.pad))
    # Bounded memory: never more frames held than one patch spans.
    assert held <= spec.frames


def test_valid_extents_of_the_corner_patch():
    spec = PatchSpec(8, 16, 16, pad="zero")
    _, patches, _ = _stream(spec, _video())
    last = patches[-1]
    assert last.index == (2, 2, 4)
    assert last.offset == (16, 32, 64)
    assert last.valid == (3, 13, 7)   # 19-16 frames, 45-32 rows, 71-64 columns


def test_padded_values_edge_repeats_and_zero_fills():
    frames = _video(t=5, h=5, w=6, seed=1)
    edge = [p for p in _stream(PatchSpec(4, 4, 4, pad="edge"), frames)[1] if p.index == (1, 1, 1)][0]
    zero = [p for p in _stream(PatchSpec(4, 4, 4, pad="zero"), frames)[1] if p.index == (1, 1, 1)][0]
    # Patch (1, 1, 1) starts at frame 4, row 4, column 4: one frame, one row, two columns are real.
    assert edge.valid == zero.valid == (1, 1, 2)
    real = frames[4, 4, 4:6]
    np.testing.assert_array_equal(edge.pixels[0, 0, :2], real)
    np.testing.assert_array_equal(zero.pixels[0, 0, :2], real)
    # zero: everything outside the real 1x1x2 corner is 0.
    mask = np.ones(zero.pixels.shape[:3], bool)
    mask[0, 0, :2] = False
    assert not zero.pixels[mask].any()
    # edge: columns repeat the last real column, rows the last real row, frames the last real frame.
    for t, y, x in itertools.product(range(4), range(4), range(4)):
        np.testing.assert_array_equal(edge.pixels[t, y, x], real[min(x, 1)])


def test_drop_drops_the_tail_and_padding_never_invents_frames():
    frames = _video(t=7, h=8, w=8)
    assert _stream(PatchSpec(8, 8, 8), frames)[1] == []
    tail = _stream(PatchSpec(8, 8, 8, pad="edge"), frames)[1]
    assert len(tail) == 1 and tail[0].valid == (7, 8, 8)
    np.testing.assert_array_equal(tail[0].pixels[:7], frames)
    np.testing.assert_array_equal(tail[0].pixels[7], frames[6])


def test_cut_window_pads_a_short_window():
    spec = PatchSpec(4, 4, 4, pad="zero")
    window = _video(t=2, h=6, w=4)
    grid = Grid.for_video(spec, 2, 6, 4)
    patches = list(cut_window(spec, window, 0, 0, grid, 1.25))
    assert [p.offset for p in patches] == [(0, 0, 0), (0, 4, 0)]
    assert [p.valid for p in patches] == [(2, 4, 4), (2, 2, 4)]
    np.testing.assert_array_equal(patches[1].pixels[:2, :2], window[:, 4:6])
    assert not patches[1].pixels[2:].any() and not patches[1].pixels[:, 2:].any()


def test_finish_refuses_a_stream_shorter_than_the_grid():
    spec = PatchSpec(4, 4, 4)
    cutter = PatchCutter(spec, Grid.for_video(spec, 12, 4, 4))
    frames = _video(t=5, h=4, w=4)
    for i, frame in enumerate(frames):
        list(cutter.add(frame, float(i)))
    with pytest.raises(RuntimeError, match="ended after 5 frames, but the grid has a patch starting at frame 8"):
        list(cutter.finish())
