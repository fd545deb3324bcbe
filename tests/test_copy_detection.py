"""Copy detection: black bars found on real footage, a region read exactly, an index of several views
answering each video once, and re-ranking by frame detail telling apart stretches of one static shot (tree.avi)
that the index's features score alike.
"""

import json

import numpy as np
import pytest

from stpkeras import index as ix
from stpkeras import rerank
from tfrecords_tools import borders
from tfrecords_tools.patches import Patch
from tfrecords_tools.spec import PatchSpec
from tfrecords_tools.video import VideoWriter, read_frames, video_patches

from videos import pattern_frames, write_video


def _write(path, frames, crf=18):
    with VideoWriter(str(path), 25.0, crf=crf, options={"preset": "ultrafast"}) as writer:
        for frame in frames:
            writer.write(np.ascontiguousarray(frame))
    return str(path)


def _half(frames):
    from PIL import Image

    h, w = frames.shape[1:3]
    return np.stack([np.asarray(Image.fromarray(f).resize((w // 4 * 2, h // 4 * 2), Image.BILINEAR)) for f in frames])


@pytest.fixture(scope="module")
def bikes(sample):
    frames, _ = read_frames(sample("bikes.mp4"))
    return frames[:24]   # 272 x 640


def test_black_bars_are_found_on_real_footage_and_dark_scenery_is_not_a_bar(bikes, tmp_path):
    small = _half(bikes)                                            # 136 x 320
    boxed = np.pad(small, ((0, 0), (18, 18), (0, 0), (0, 0)))       # letterbox: 18 rows above and below
    boxed = np.pad(boxed, ((0, 0), (0, 0), (24, 24), (0, 0)))       # and pillarbox: 24 columns each side
    region = borders.picture_region(_write(tmp_path / "boxed.mp4", boxed, crf=35))
    # Inside the picture (136 x 320 at 18, 24), short of it by at most the codec's ringing and `EDGE` lines a side.
    top, left, height, width = region
    assert 18 <= top <= 18 + 4 and 24 <= left <= 24 + 4, region
    assert top + height <= 18 + 136 and left + width <= 24 + 320, region
    assert height >= 136 - 8 and width >= 320 - 8, region
    # The same footage without bars, and darkened to a night scene (every value under 60): no bars.
    assert borders.picture_region(_write(tmp_path / "plain.mp4", small)) == (0, 0, 136, 320)
    dark = (small.astype(np.float32) * 0.22).astype(np.uint8)
    assert dark.max() < 60
    assert borders.picture_region(_write(tmp_path / "dark.mp4", dark)) == (0, 0, 136, 320)
    # "Bars" that would leave less than half the height: a fade, not a border.
    faded = np.pad(small[:, :40], ((0, 0), (60, 60), (0, 0), (0, 0)))
    assert borders.picture_region(_write(tmp_path / "faded.mp4", faded)) == (0, 0, 160, 320)
    assert borders.central((10, 20, 100, 200), 0.5) == (35, 70, 50, 100)
    with pytest.raises(ValueError, match="Expected a number in \\(0, 1\\]"):
        borders.central((0, 0, 10, 10), 0)


def test_a_region_is_read_exactly_and_sized_as_a_whole_frame_would_be(tmp_path):
    frames = pattern_frames(8, 48, 64, seed=3)
    path = write_video(str(tmp_path / "lossless.mkv"), frames, lossless=True)
    region = (6, 10, 32, 40)
    # No resize: the region is cut at its own size, pixel for pixel.
    got = [p.pixels for p in video_patches(path, PatchSpec(8, 32, 40), region=region) if isinstance(p, Patch)]
    np.testing.assert_array_equal(got[0], frames[:, 6:38, 10:50])
    # With --resize the region, not the frame, fills the patch: the same as resizing the cut frames.
    spec = PatchSpec(8, 16, 20, resize=(16, 20))
    got = [p.pixels for p in video_patches(path, spec, region=region) if isinstance(p, Patch)]
    want = frames[:, 6:38, 10:50].reshape(8, 16, 2, 20, 2, 3).mean(axis=(2, 4))
    assert np.abs(got[0].astype(np.float32) - want).mean() < 1.0
    with pytest.raises(ValueError, match="inside the 48x64 frame"):
        list(video_patches(path, spec, region=(40, 0, 16, 16)))


def test_an_index_of_views_answers_each_video_once_and_records_how_it_read(bikes, tmp_path):
    paths = [_write(tmp_path / f"{i}.mp4", _half(bikes[i * 8:i * 8 + 8])) for i in range(3)]
    embedder = ix.thumbnail_embedder(PatchSpec(4, 16, 16, resize=(16, 16)), 4)
    reading = ix.Reading(strip_bars=True, views=(1, 0.8))
    embedded = ix.embed_videos(embedder, paths, reading=reading)
    assert embedded.ids == tuple(p for p in paths for _ in range(2))
    index = ix.VideoIndex.build(embedded, aggregate="mean")
    index.info["reading"] = reading.to_dict()
    index.save(str(tmp_path / "idx"))
    loaded = ix.VideoIndex.load(str(tmp_path / "idx"))
    assert loaded.reading == reading and loaded.reading.views == (1.0, 0.8)
    for aggregate, idx in (("mean", loaded), ("windows", ix.VideoIndex.build(embedded, aggregate="windows"))):
        # The central 80% of video 1 is exactly its second view: it comes first, and every video once.
        query = ix.embed_video_windows(embedder, paths[1], region=borders.central((0, 0, 136, 320), 0.8))
        hits = idx.search_windows([query.windows], k=5)[0]
        assert [h.video for h in hits][0] == paths[1] and sorted(h.video for h in hits) == sorted(paths), aggregate
        assert [h.rank for h in hits] == [1, 2, 3] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert ix.Reading.from_dict(None) == ix.Reading()
    with pytest.raises(ValueError, match="Expected a divisor of the patch's 10x16. Received cells=4"):
        ix.thumbnail_embedder(PatchSpec(4, 10, 16), 4)
    with pytest.raises(ValueError, match="distinct fractions in \\(0, 1\\]"):
        ix.Reading(views=(1, 1.5))


def test_a_converted_folder_cannot_be_read_inside_bars_or_as_views(cli, converted, tmp_path):
    root, _ = converted
    with pytest.raises(ix.RetrievalError, match="patches already cut.*need the videos themselves"):
        ix.build_index(str(tmp_path / "no-model"), [str(root)], str(tmp_path / "idx"), reading=ix.Reading(True))
    result = cli("index", str(root), str(root), "--out", tmp_path / "x", "--views", "1,two")
    assert result.exit_code == 2 and "--views" in result.output and "1,two" in result.output


@pytest.fixture(scope="module")
def tree_copies(sample, tmp_path_factory):
    """tree.avi (a camera on one tree, 68 frames) cut in three stretches, and a copy of the middle one as the
    copies benchmark makes them: trimmed, 10% cropped off every side, half size, letterboxed, crf 35."""
    root = tmp_path_factory.mktemp("tree")
    frames, _ = read_frames(sample("tree.avi"))
    bounds = np.linspace(0, len(frames), 4).astype(int)
    stretches = [_write(root / f"tree-{i}.mp4", frames[a:b]) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    part = frames[bounds[1]:bounds[2]]
    n, h, w = part.shape[:3]
    copy = _half(part[n // 4: n - n // 6, h // 10: h - h // 10, w // 10: w - w // 10])
    copy = np.pad(copy, ((0, 0), (10, 10), (0, 0), (0, 0)))
    return stretches, _write(root / "copy.mp4", copy, crf=35)


def test_frame_detail_finds_the_stretch_of_a_static_shot_a_copy_came_from(tree_copies, tmp_path):
    stretches, query = tree_copies
    region = borders.picture_region(query)
    assert region[0] == pytest.approx(10, abs=1)
    frames = rerank.read_query(query, region)
    scores = [rerank.score(frames, s) for s in stretches]
    # The copy is of stretch 1: its own frames' detail, aligned, matches best (scores 0.5-0.7, margin 0.02-0.07).
    assert int(np.argmax(scores)) == 1 and scores[1] - max(scores[0], scores[2]) > 0.01, scores
    # `stp search --rerank`: the compared results first, best first; a video that is gone goes last.
    gone = str(tmp_path / "gone.mp4")
    ranked = ix.reranked_hits(query, [ix.Hit(v, 0.5, r + 1) for r, v in enumerate(
        [stretches[0], gone, stretches[2], stretches[1]])], 4)
    assert [h.video for h in ranked] == [stretches[1], stretches[0], stretches[2], gone], scores
    assert [h.rank for h in ranked] == [1, 2, 3, 4] and ranked[3].matched is None
    assert ranked[0].matched == pytest.approx(scores[1], abs=1e-6)
    assert json.loads(ranked[0].to_json())["matched"] == pytest.approx(scores[1], abs=1e-5)
    # Only the first `count` are compared: the rest keep their order after them, without a match score.
    ranked = ix.reranked_hits(query, [ix.Hit(v, 0.5, r + 1) for r, v in enumerate(stretches)], 2, region=region)
    assert [h.video for h in ranked] == [stretches[1], stretches[0], stretches[2]] and ranked[2].matched is None
    assert "matched" not in json.loads(ranked[2].to_json())
