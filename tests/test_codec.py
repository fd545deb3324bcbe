"""Codec pairs (`stp convert --pairs`): compressed/clean pairs made from any clean video with PyAV's libx264."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import tensorflow as tf

from tfrecords_tools import schema
from tfrecords_tools.errors import EXIT_PARTIAL
from tfrecords_tools.codec import QUANTIZER_ABOVE_CRF, CodecPairs, auto_crfs, footage_level, parse_pairs
from tfrecords_tools.spec import PatchSpec
from tfrecords_tools.video import VideoError, VideoWriter, mean_quantizer, read_frames
from videos import pattern_frames, write_video


def test_parse_pairs_levels_lists_and_errors():
    assert parse_pairs("h264:23-40") == CodecPairs("h264", (23, 29, 34, 40))   # 4 levels, evenly spaced
    assert parse_pairs("h264:crf=23-40", levels=2).crfs == (23, 40)
    assert parse_pairs("H264: 30,37").crfs == (30, 37) and str(parse_pairs("h264:37")) == "h264:37"
    for bad, match in (("h265:30", "Expected a codec"), ("h264:40-23", "LOW <= HIGH"), ("h264:60", r"\[0, 51\]"),
                       ("h264", "CODEC:CRF"), ("h264:30,30", "distinct")):
        with pytest.raises(ValueError, match=match):
            parse_pairs(bad)


def _records(root):
    manifest = json.loads((root / "dataset.json").read_text())
    out = []
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            out += [schema.parse_patch_numpy(r.numpy()) for r in tf.data.TFRecordDataset(str(root / shard["file"]))]
    return manifest, out


def _bikes_pairs(tmp_path, cli, sample, patch: str, short_side: int, pairs: str) -> list:
    """The records of `stp convert --pairs PAIRS` of the real sample bikes.mp4 (one worker), in `tmp_path/pairs`."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "bikes.mp4").symlink_to(sample("bikes.mp4"))
    r = cli("convert", src, tmp_path / "pairs", "--patch", patch, "--short-side", str(short_side), "--pairs", pairs,
            "--workers", "1", "--quiet")
    assert r.exit_code == 0, r.output
    return _records(tmp_path / "pairs")[1]


@pytest.fixture(scope="module")
def bikes_crf40(tmp_path_factory, cli, sample):
    """bikes.mp4 at short side 96 as 8x32x32 pairs at crf 40: (the converted folder, its records)."""
    root = tmp_path_factory.mktemp("bikes40")
    return root / "pairs", _bikes_pairs(root, cli, sample, "8x32x32", 96, "h264:40")


def test_convert_pairs_makes_compressed_copies_of_clean_videos_with_the_clean_frames_as_target(tmp_path, cli):
    # Two clean sources stored losslessly (so their frames are known exactly) and downscaled at conversion; each
    # video's copies are its own (they once shared a name in the work folder: the second video's pairs failed).
    src = tmp_path / "src"
    src.mkdir()
    write_video(str(src / "clean.mkv"), pattern_frames(16, 48, 64, seed=3), lossless=True)
    write_video(str(src / "other.mkv"), pattern_frames(16, 48, 64, seed=4), lossless=True)
    r = cli("convert", src, tmp_path / "plain", "--patch", "4x16x16", "--short-side", "32", "--quiet")
    assert r.exit_code == 0, r.output
    r = cli("convert", src, tmp_path / "pairs", "--patch", "4x16x16", "--short-side", "32", "--pairs", "h264:18,45",
            "--quiet")
    assert r.exit_code == 0, r.output
    manifest, records = _records(tmp_path / "pairs")
    _, plain = _records(tmp_path / "plain")
    assert manifest["paired"] is True and manifest["counts"]["ok"] == 4, manifest["videos"]
    # The fingerprint says how the pairs were decoded: data of an older conversion is not resumed into these.
    assert manifest["fingerprint"]["pair_colour"] == "exact" and manifest["fingerprint"]["pairs"] == "h264:18,45"
    assert sorted(v["id"] for v in manifest["videos"]) == ["clean.mkv#crf=18", "clean.mkv#crf=45",
                                                           "other.mkv#crf=18", "other.mkv#crf=45"]
    assert not (tmp_path / "pairs" / ".stp-work").exists()   # the copies went with the work folder
    # Every pair's target is the patch a plain conversion of the clean video gives, exactly (lossless copy).
    clean = {(str(r[schema.VIDEO_ID]), tuple(r[schema.OFFSET])): r[schema.PATCH] for r in plain}
    assert len(records) == 2 * len(clean) and {v for v, _ in clean} == {"clean.mkv", "other.mkv"}
    mse = {}
    for rec in records:
        video, crf = str(rec[schema.VIDEO_ID]).rsplit("#crf=", 1)
        np.testing.assert_array_equal(rec[schema.TARGET], clean[(video, tuple(rec[schema.OFFSET]))])
        err = (rec[schema.PATCH].astype(np.float64) - rec[schema.TARGET]) ** 2
        mse.setdefault(crf, []).append(err.mean())
    # Real codec degradation, stronger at the higher crf.
    assert 0 < np.mean(mse["18"]) < np.mean(mse["45"])
    psnr = {k: 10 * np.log10(255 ** 2 / np.mean(v)) for k, v in mse.items()}
    assert psnr["18"] > 30 > psnr["45"], psnr


def test_convert_pairs_refuses_data_that_already_has_targets(tmp_path, cli):
    write_video(str(tmp_path / "a.mp4"), pattern_frames(8, 32, 32, seed=1))
    (tmp_path / "list.csv").write_text("path,target\na.mp4,a.mp4\n")
    r = cli("convert", tmp_path / "list.csv", tmp_path / "out", "--patch", "4x16x16", "--pairs", "h264:30")
    assert r.exit_code != 0 and "--pairs makes compressed/clean pairs of whole clean videos" in r.output
    r = cli("convert", tmp_path, tmp_path / "out2", "--patch", "4x16x16", "--pairs", "mpeg2:30")
    assert r.exit_code == 2 and "Expected a codec" in r.output


def test_two_processes_writing_the_same_copies_each_leave_them_whole(tmp_path):
    # Each process writes under its own temporary names (they once shared `NAME.partial.EXT`: the second writer
    # truncated the first's file, and one of them failed renaming a file the other had already renamed).
    import os
    import subprocess
    import sys

    from tfrecords_tools.video import read_frames

    frames = pattern_frames(48, 64, 96, seed=5)
    write_video(str(tmp_path / "src.mkv"), frames, lossless=True)
    code = ("import sys; from tfrecords_tools.codec import CodecPairs, write_copies; "
            "from tfrecords_tools.spec import PatchSpec; "
            "write_copies(sys.argv[1], PatchSpec(8, 16, 16), CodecPairs('h264', (30, 40)), sys.argv[2], 'src')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "src.mkv"), str(tmp_path / "copies")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(os.listdir(tmp_path / "copies")) == ["src-clean.mkv", "src-crf30.mp4", "src-crf40.mp4"]
    clean, _ = read_frames(str(tmp_path / "copies" / "src-clean.mkv"))
    np.testing.assert_array_equal(clean, frames)
    for crf in (30, 40):
        assert read_frames(str(tmp_path / "copies" / f"src-crf{crf}.mp4"))[0].shape == frames.shape


def test_copies_start_again_when_decoding_asks_for_a_second_read(tmp_path, monkeypatch):
    # A video whose timestamps prove its plan wrong part-way (`Replan`) is read again; the copies are written
    # again from their first frame, not appended to, and nothing of the first attempt is left.
    import os

    from tfrecords_tools import video
    from tfrecords_tools.codec import write_copies
    from tfrecords_tools.spec import PatchSpec

    frames = pattern_frames(24, 32, 48, seed=7)
    write_video(str(tmp_path / "src.mkv"), frames, lossless=True)
    real, reads = video.FrameStream, []

    def stream_asking_once(info, spec, plan, **options):
        reads.append(plan)
        for i, item in enumerate(real(info, spec, plan, **options)):
            if len(reads) == 1 and i == 5:
                raise video.Replan(plan, "a test's second read")
            yield item

    monkeypatch.setattr(video, "FrameStream", stream_asking_once)
    clean, copies = write_copies(str(tmp_path / "src.mkv"), PatchSpec(8, 16, 16), CodecPairs("h264", (30,)),
                                 str(tmp_path / "copies"), "src")
    monkeypatch.setattr(video, "FrameStream", real)
    assert len(reads) == 2
    assert sorted(os.listdir(tmp_path / "copies")) == ["src-clean.mkv", "src-crf30.mp4"]
    np.testing.assert_array_equal(video.read_frames(clean)[0], frames)
    assert video.read_frames(copies[0])[0].shape == frames.shape


def test_copies_that_cannot_be_encoded_leave_nothing_behind(tmp_path):
    # Odd frame sizes cannot be 4:2:0-encoded: one error naming the video, and no file (whole or temporary) left.
    import os

    from tfrecords_tools.codec import write_copies
    from tfrecords_tools.spec import PatchSpec
    from tfrecords_tools.video import VideoError

    write_video(str(tmp_path / "src.mkv"), pattern_frames(16, 32, 48, seed=2), lossless=True)
    with pytest.raises(VideoError, match="expected even sizes"):
        write_copies(str(tmp_path / "src.mkv"), PatchSpec(8, 8, 8, short_side=15), CodecPairs("h264", (30, 40)),
                     str(tmp_path / "copies"), "src")
    assert os.listdir(tmp_path / "copies") == []


@pytest.mark.parametrize("colour", ["exact", "ffmpeg"])
def test_pairs_of_real_footage_differ_by_the_codec_not_by_a_colour_offset(tmp_path, cli, sample, monkeypatch, colour):
    # crf 0 in yuv420p is lossless but for the RGB <-> YUV conversions and the halved chroma, so what is left
    # between a pair's sides is what converting costs. Decoded as FFmpeg's tools decode (the default elsewhere),
    # the compressed side of real footage comes out 1.0-1.3 grey levels darker on average while the clean side
    # (a lossless RGB copy) never went through YUV: a model trained on such pairs learns to brighten. Pairs
    # read both sides with the exact conversion (`tfrecords_tools.pairs.COLOUR`); the ffmpeg case shows what the
    # test would see without it.
    import tfrecords_tools.convert as convert_module

    monkeypatch.setattr(convert_module, "PAIR_COLOUR", colour)
    records = _bikes_pairs(tmp_path, cli, sample, "4x32x32", 64, "h264:0")
    assert len(records) > 50
    diff = np.mean([rec[schema.TARGET].astype(np.float64) - rec[schema.PATCH] for rec in records], axis=(0, 1, 2, 3))
    if colour == "exact":
        assert np.all(np.abs(diff) < 0.4), diff
    else:
        assert np.all(diff > 0.5), diff   # every channel darker: an offset, not a codec error


def test_auto_pairs_parse_and_span_the_level_to_4_above():
    auto = parse_pairs("H264:auto")
    assert auto.auto and auto.crfs == () and str(auto) == "h264:auto" and auto.crfs_text == "auto"
    assert auto_crfs(37.2) == (37, 38, 39)     # the level, to 2 above, a level per crf step
    assert auto_crfs(37.6) == (38, 39, 40)
    assert auto_crfs(57.0) == (49, 50, 51) and auto_crfs(-2.0) == (0, 1, 2)   # inside libx264's 0-51
    with pytest.raises(ValueError, match="no crf values with auto"):
        CodecPairs("h264", (30,), auto=True)
    assert CodecPairs("h264", (30, 37)).resolve("not read") == CodecPairs("h264", (30, 37))


def _write_mpeg4(path: str, frames: np.ndarray) -> str:
    """`frames` as MPEG-4 Part 2 (a codec whose decoder reports no H.264 quantizer)."""
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.pix_fmt, stream.height, stream.width = "yuv420p", frames.shape[1], frames.shape[2]
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_the_level_read_from_real_footage_is_the_crf_it_was_encoded_at(tmp_path, sample):
    # 64 frames of real footage encoded at three crf values: the quantizer its decoder reports is the crf plus
    # libx264's offset (here 2.8-3.7), and the level `auto` reads back (a trial encode of the same frames gives
    # the content's own offset) is within 2 of the crf (the quantizer alone, the offset left out: 3-4 above).
    frames, _ = read_frames(sample("bikes.mp4"), PatchSpec(1, 1, 1, short_side=128))
    frames = frames[:64]
    levels = {}
    for crf in (23, 33, 43):
        writer = VideoWriter(str(tmp_path / f"bikes-crf{crf}.mp4"), 25, crf=crf)
        for frame in frames:
            writer.write(frame)
        writer.close()
        quantizer = mean_quantizer(writer.path)
        assert crf + 1 <= quantizer <= crf + 6, (crf, quantizer)
        levels[crf] = footage_level(writer.path)
        assert abs(levels[crf] - (quantizer - QUANTIZER_ABOVE_CRF)) < 3   # the trial moves the first guess a little
    assert all(abs(level - crf) <= 2 for crf, level in levels.items()), levels
    assert levels[23] < levels[33] < levels[43]
    # The trial encodes went to a temporary folder of their own, now gone: nothing beside the footage.
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"bikes-crf{crf}.mp4" for crf in (23, 33, 43)]
    # Where the content's offset is far from libx264's median (bigbuckbunny's opening: 5.5-5.8), the quantizer
    # less the median reads 2.5-3 high; the trial reads the crf within 1.
    opening, rate = read_frames(sample("bigbuckbunny.mp4"), PatchSpec(1, 1, 1, short_side=128))
    for crf in (30, 37):
        writer = VideoWriter(str(tmp_path / f"bbb-crf{crf}.mp4"), rate, crf=crf)
        for frame in opening[:64]:
            writer.write(frame)
        writer.close()
        assert mean_quantizer(writer.path) - QUANTIZER_ABOVE_CRF - crf > 2, crf
        assert abs(footage_level(writer.path) - crf) < 1, crf
    # Another codec has no H.264 quantizer: refused with the file and the reason.
    other = _write_mpeg4(str(tmp_path / "mpeg4.mkv"), frames[:4])
    with pytest.raises(VideoError, match=r"mpeg4.mkv: its video is mpeg4, expected H.264"):
        mean_quantizer(other)


def test_convert_auto_pairs_each_video_at_its_own_level_and_fails_a_video_it_cannot_read(tmp_path, cli, sample):
    # Compressed footage at two levels and one video of another codec, in one folder: each H.264 video's copies
    # are at its own level to 2 above (named in the manifest), the other fails with one line and the job goes on.
    frames, _ = read_frames(sample("bikes.mp4"), PatchSpec(1, 1, 1, short_side=64))
    src = tmp_path / "src"
    src.mkdir()
    for crf in (25, 40):
        writer = VideoWriter(str(src / f"bikes{crf}.mp4"), 25, crf=crf)
        for frame in frames[:16]:
            writer.write(frame)
        writer.close()
    _write_mpeg4(str(src / "other.avi"), frames[:8])
    r = cli("convert", src, tmp_path / "pairs", "--patch", "4x32x32", "--pairs", "h264:auto", "--workers", "1")
    assert r.exit_code == EXIT_PARTIAL, r.output
    assert "other.avi: its video is mpeg4, expected H.264" in r.output and "Traceback" not in r.output
    manifest, records = _records(tmp_path / "pairs")
    assert manifest["fingerprint"]["pairs"] == "h264:auto"
    ids = {v["id"]: v["status"] for v in manifest["videos"]}
    assert ids.pop("other.avi#crf=auto") == "failed" and set(ids.values()) == {"ok"}
    crfs = {name: sorted(int(i.rsplit("=", 1)[1]) for i in ids if i.startswith(name + "#"))
            for name in ("bikes25.mp4", "bikes40.mp4")}
    for name, got in crfs.items():
        level = int(name[5:7])
        assert got == list(range(got[0], got[0] + 3)) and abs(got[0] - level) <= 3, crfs
    assert records and all(str(r[schema.VIDEO_ID]).split("#")[0] in crfs for r in records)


def test_the_deblocker_baseline_takes_back_part_of_what_h264_lost_on_real_footage(bikes_crf40):
    # `stp evaluate` measures a restoration of codec pairs against `shifted_dct` (FFmpeg's spp on patches): on
    # real footage at crf 40 it must gain over the compressed input, or it would be no baseline at all; a
    # threshold of 0 keeps every coefficient and gives the input back exactly.
    from stpkeras import baselines
    from stpkeras.quality import psnr

    records = bikes_crf40[1]
    x = np.stack([rec[schema.PATCH] for rec in records[:48]])
    y = np.stack([rec[schema.TARGET] for rec in records[:48]])
    assert np.array_equal(baselines.shifted_dct(x, 0.0), x)
    threshold = baselines.tune("shifted_dct", x, y)
    gain = float(np.mean(psnr(baselines.shifted_dct(x, threshold), y)) - np.mean(psnr(x, y)))
    assert threshold < max(baselines.GRIDS["shifted_dct"]) and gain > 0.1, (threshold, gain)
    assert "shifted_dct" in baselines.for_degradations(())  # pairs
    assert "shifted_dct" not in baselines.for_degradations(("noise",))


def test_codec_postfilters_benchmark_measures_ffmpegs_filters_against_the_clean_video(tmp_path, sample,
                                                                                      benchmark_script):
    """benchmarks/codec_postfilters.py (its figures are on the benchmarks page): FFmpeg's post-filters, each
    tuned on the clean original, on a real clip compressed with libx264; spp gains over the input there."""
    import shutil

    from videos import decode_all

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg not installed (Debian's `apt-get install ffmpeg`): the baselines are FFmpeg's")
    bench = benchmark_script("codec_postfilters")
    frames = decode_all(sample("bikes.mp4"), size=(136, 320))[0][:24]
    write_video(str(tmp_path / "copies" / "bikes-clean.mkv"), frames, lossless=True)
    with VideoWriter(str(tmp_path / "copies" / "bikes-crf40.mp4"), 25, crf=40) as w:
        for frame in frames:
            w.write(frame)
    results = bench.main(["--work", str(tmp_path), "--stems", "bikes", "--crf", "40",
                          "--json", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text())["videos"] == results
    rows = results["bikes"]
    assert set(rows) == {"input", *bench.GRIDS}
    assert 25 < rows["input"]["y"] < 40 and rows["input"]["mean"] > rows["input"]["y"]   # chroma is easier
    assert rows["spp"]["y"] > rows["input"]["y"] + 0.05 and rows["spp"]["chain"].startswith("spp="), rows["spp"]
    assert all(rows[f]["chain"] in bench.GRIDS[f] for f in bench.GRIDS)


def test_a_run_on_codec_pairs_chooses_a_deblocking_threshold_that_its_files_and_export_carry(tmp_path, cli,
                                                                                              bikes_crf40):
    # On paired data the enhancer ends in a deblocking stage (`layers.block_shrink`, the `shifted_dct` baseline's
    # method) whose threshold `stp train` chooses after training on the run's patches: on real footage at crf 40
    # a barely trained model leaves blocks that the stage takes back, so the threshold is not 0. Each model file
    # keeps its choice, and the file and its SavedModel (what TF Serving loads) compute it.
    from stpkeras.artifacts import load_keras_model
    from stpkeras.models.layers import block_shrink
    from stpkeras.tasks import Enhance

    data, records = bikes_crf40
    run = tmp_path / "run"
    r = cli("train", data, "--out", run, "--task", "enhance", "--model-arg", "depth=2",
            "--model-arg", "filters=4", "--epochs", "1", "--steps-per-epoch", "8", "--batch-size", "8", "--seed", "0",
            "--verbose", "0")
    assert r.exit_code == 0, r.output
    tuned = json.loads((run / "run.json").read_text())["tuned"]
    assert set(tuned) == {"last.keras", "best.keras"}
    chosen = tuned["best.keras"]
    scores = chosen["psnr_by_threshold"]
    assert list(scores) == [f"{t:g}" for t in Enhance.DEBLOCK_GRID] and chosen["split"] == "train"
    assert chosen["patches"] == Enhance.TUNE_PATCHES and chosen["deblock_block"] == 8
    assert chosen["deblock_threshold"] > 0 and scores[f"{chosen['deblock_threshold']:g}"] == max(scores.values())
    assert scores[f"{chosen['deblock_threshold']:g}"] > scores["0"] + 0.02, scores
    threshold = tuned["last.keras"]["deblock_threshold"]
    assert f"tuned after training (last.keras, best.keras): deblock_threshold {threshold}" in r.output

    model = load_keras_model(str(run / "best.keras"))
    layer = model.get_layer("pixels")
    assert float(layer.deblock_threshold.numpy()) == chosen["deblock_threshold"]
    x = np.stack([rec[schema.PATCH] for rec in records[:3]])
    out = np.asarray(model(x))
    layer.deblock_threshold.assign(0.0)
    raw = np.asarray(model(x))
    layer.deblock_threshold.assign(chosen["deblock_threshold"])
    np.testing.assert_allclose(out, block_shrink(raw, chosen["deblock_threshold"]).numpy(), atol=1e-3)
    assert np.abs(out - raw).max() > 1.0            # the stage is in the model's path

    r = cli("export", run, "--name", "restore", "--out", tmp_path / "saved")
    assert r.exit_code == 0, r.output
    serve = tf.saved_model.load(str(tmp_path / "saved" / "restore" / "1")).signatures["serving_default"]
    np.testing.assert_allclose(serve(patches=tf.constant(x))["pixels_float"].numpy(), out, atol=1e-3)
