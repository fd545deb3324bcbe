"""Convert stage: the three kinds of source, every kind of bad input, determinism across workers,
kill-and-resume, refusing a different spec, compression and shard splitting, all on real encoded videos.
"""

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tfrecords_tools import manifest as mf
from tfrecords_tools import schema
from tfrecords_tools.convert import WORK_DIR, ConvertConfig, ConvertError, convert
from tfrecords_tools.outputs import LOCK_NAME
from tfrecords_tools.shards import SHARD_RE
from tfrecords_tools.spec import PatchSpec
from videos import (CLASSES, DISPLAY_TURNS, PER_CLASS, checkerboard, cut, decode_all, pattern_frames,
                    set_display_matrix, write_audio_only, write_size_changing_ts, write_video)

SPEC = PatchSpec(4, 32, 32)
PATCHES_PER_CLIP = 6 * 2 * 2  # 24 frames of 64x64 in 4x32x32 patches


def records_of(root, m=None, split=None):
    """Every record of a converted folder (one split, or all in manifest order), parsed with numpy."""
    m = m or mf.read_manifest(str(root))
    out = []
    for name in ([split] if split else list(m["splits"])):
        for path in mf.shard_files(str(root), m, name):
            for r in tf.data.TFRecordDataset(path, compression_type=mf.compression_type(m)):
                out.append(r.numpy())
    return out


def shard_digests(root):
    """{file name: sha256} of every shard in `root`, hashed here (not taken from the manifest)."""
    return {n: hashlib.sha256((Path(root) / n).read_bytes()).hexdigest()
            for n in sorted(os.listdir(root)) if SHARD_RE.match(n)}


def stable(manifest):
    """The manifest minus what may differ between equivalent runs (timings, command line, date)."""
    return {k: v for k, v in manifest.items() if k not in ("seconds", "created", "command", "up_to_date")}


def leftovers(root):
    """Temporary or work files anywhere under `root` (a finished conversion leaves none)."""
    return [str(p.relative_to(root)) for p in Path(root).rglob("*") if p.name.endswith(".tmp") or p.name == WORK_DIR]


# --- sources -------------------------------------------------------------------------------------


def test_folder_of_classes(converted, classes_src):
    root, m = converted
    assert m["labels"] == list(CLASSES)
    assert m["counts"] == {"videos": 12, "ok": 12, "failed": 0, "skipped": 0, "patches": 12 * PATCHES_PER_CLIP}
    train = m["splits"]["train"]
    assert list(m["splits"]) == ["train"]
    assert train["records"] == 12 * PATCHES_PER_CLIP and train["videos"] == 12
    assert train["label_counts"] == {c: PER_CLASS * PATCHES_PER_CLIP for c in CLASSES}
    assert [s["file"] for s in train["shards"]] == ["train-00000-of-00001.tfrecord"]
    assert shard_digests(root) == {s["file"]: s["sha256"] for s in train["shards"]}
    assert all(v["status"] == "ok" and v["reason"] == "" and v["patches"] == PATCHES_PER_CLIP and
               (v["frames"], v["height"], v["width"], v["timing"]) == (24, 64, 64, "pts") for v in m["videos"])
    assert m["fingerprint"]["spec"] == SPEC.to_dict() and PatchSpec.from_dict(m["spec"]) == SPEC
    assert leftovers(root) == []

    parsed = [schema.parse_patch_numpy(r, SPEC.shape) for r in records_of(root, m)]
    ids = [f"{c}/{c}_{i}.mp4" for c in CLASSES for i in range(PER_CLASS)]
    # Records come video by video in (split, id) order, each video's patches in grid order.
    assert [p[schema.VIDEO_ID] for p in parsed] == [i for i in ids for _ in range(PATCHES_PER_CLIP)]
    assert [tuple(p[schema.INDEX]) for p in parsed[:PATCHES_PER_CLIP]] == [
        (t, y, x) for t in range(6) for y in range(2) for x in range(2)]
    for p in parsed:
        cls = p[schema.VIDEO_ID].split("/")[0]
        assert p[schema.LABEL_NAME] == cls and p[schema.LABEL] == CLASSES.index(cls)
        assert p[schema.SPLIT] == "train" and list(p[schema.VIDEO_SIZE]) == [24, 64, 64]
    # The pixels of one whole video: exactly PyAV's frames, cut by hand.
    video = str(classes_src / ids[5])
    decoded, times = decode_all(video)
    for p in parsed[5 * PATCHES_PER_CLIP:6 * PATCHES_PER_CLIP]:
        t, y, x = p[schema.OFFSET]
        np.testing.assert_array_equal(p[schema.PATCH], decoded[t:t + 4, y:y + 32, x:x + 32])
        assert p[schema.TIMESTAMP] == pytest.approx(times[t], abs=1e-6)


def test_flat_folder_is_unlabelled(tmp_path, clip64, odd_clip):
    src = tmp_path / "flat"
    src.mkdir()
    shutil.copy(clip64.path, src / "b.mp4")
    shutil.copy(odd_clip.path, src / "a.mp4")
    (src / "notes.txt").write_text("not listed: not a video extension")
    spec = PatchSpec(4, 16, 16, stride_height=12, stride_width=20, pad="zero")
    m = convert(ConvertConfig(src=str(src), out=str(tmp_path / "out"), spec=spec))
    assert m["labels"] == [] and m["splits"]["train"]["label_counts"] == {}
    assert [v["id"] for v in m["videos"]] == ["a.mp4", "b.mp4"]
    parsed = [schema.parse_patch_numpy(r, spec.shape) for r in records_of(tmp_path / "out", m)]
    assert {(p[schema.LABEL], p[schema.LABEL_NAME]) for p in parsed} == {(-1, "")}
    # a.mp4 is 20 x 50 x 70: t starts 0,4,8,12,16; y 0,12,24,36; x 0,20,40,60 (hand-computed, zero pad).
    a = [p for p in parsed if p[schema.VIDEO_ID] == "a.mp4"]
    assert len(a) == 5 * 4 * 4 == m["videos"][0]["patches"]
    decoded, _ = decode_all(str(src / "a.mp4"))
    for p in a:
        t, y, x = p[schema.OFFSET]
        assert t in (0, 4, 8, 12, 16) and y in (0, 12, 24, 36) and x in (0, 20, 40, 60)
        assert list(p[schema.VALID]) == [4, min(16, 50 - y), min(16, 70 - x)]
        np.testing.assert_array_equal(p[schema.PATCH], cut(decoded, t, y, x, (4, 16, 16), "zero"))


def test_split_folders_above_class_folders(tmp_path, clip64, odd_clip):
    src = tmp_path / "src"
    for split, cls, video in (("train", "x", clip64), ("train", "y", odd_clip), ("val", "x", odd_clip)):
        (src / split / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(video.path, src / split / cls / "v.mp4")
    m = convert(ConvertConfig(src=str(src), out=str(tmp_path / "out"), spec=PatchSpec(4, 32, 32)))
    assert m["labels"] == ["x", "y"]
    assert {k: v["videos"] for k, v in m["splits"].items()} == {"train": 2, "val": 1}
    assert sorted(os.listdir(tmp_path / "out")) == [LOCK_NAME, "dataset.json", "train-00000-of-00001.tfrecord",
                                                     "val-00000-of-00001.tfrecord"]


def test_csv_with_split_column(tmp_path, clip64, odd_clip, cli):
    src = tmp_path / "src"
    (src / "clips").mkdir(parents=True)
    shutil.copy(clip64.path, src / "clips" / "c.mp4")
    shutil.copy(odd_clip.path, src / "o.mp4")
    (src / "list.csv").write_text("path,label,split\n"
                                  "clips/c.mp4,walk,train\n"
                                  "o.mp4,run,train\n"
                                  "clips/c.mp4,walk,val\n"
                                  "o.mp4,run,test\n")
    out = tmp_path / "out"
    result = cli("convert", src / "list.csv", out, "--patch", "4x32x32", "--quiet")
    assert result.exit_code == 0, result.output
    m = mf.read_manifest(str(out))
    assert m["labels"] == ["run", "walk"]
    assert sorted(m["splits"]) == ["test", "train", "val"]
    assert sorted(n for n in os.listdir(out) if SHARD_RE.match(n)) == [
        "test-00000-of-00001.tfrecord", "train-00000-of-00001.tfrecord", "val-00000-of-00001.tfrecord"]
    # o.mp4 (20 x 50 x 70) holds 5 x 1 x 2 patches of 4x32x32 (drop); c.mp4 holds 24.
    assert {k: v["records"] for k, v in m["splits"].items()} == {"train": 34, "val": 24, "test": 10}
    assert m["splits"]["train"]["label_counts"] == {"run": 10, "walk": 24}
    for split in ("train", "val", "test"):
        for r in records_of(out, m, split):
            p = schema.parse_patch_numpy(r, (4, 32, 32, 3))
            assert p[schema.SPLIT] == split
            assert p[schema.LABEL] == m["labels"].index(p[schema.LABEL_NAME])
            assert p[schema.VIDEO_ID] == {"walk": "clips/c.mp4", "run": "o.mp4"}[p[schema.LABEL_NAME]]


def test_csv_listing_a_video_twice_keeps_the_first_and_reports_the_others(tmp_path, clip64):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(clip64.path, src / "a.mp4")
    (src / "list.csv").write_text("path,label\na.mp4,x\na.mp4,\na.mp4,y\n")
    m = convert(ConvertConfig(src=str(src / "list.csv"), out=str(tmp_path / "out"), spec=SPEC))
    by_line = sorted(m["videos"], key=lambda v: v["reason"])
    assert [(v["id"], v["label"], v["status"]) for v in m["videos"]] == [
        ("a.mp4", "x", "ok"), ("a.mp4", "", "failed"), ("a.mp4", "y", "failed")]
    assert m["videos"][0]["patches"] == PATCHES_PER_CLIP and m["videos"][0]["reason"] == ""
    assert m["videos"][1]["reason"].endswith("list.csv:3: empty label")
    assert "listed twice in split 'train'" in m["videos"][2]["reason"]
    assert m["counts"]["patches"] == PATCHES_PER_CLIP and len(by_line) == 3
    assert {schema.parse_patch_numpy(r)[schema.LABEL_NAME] for r in records_of(tmp_path / "out", m)} == {"x"}


# --- bad input -------------------------------------------------------------------------------------

# Every kind of bad input the issue lists: (video id in the manifest, status, what the reason says).
BAD = {
    "missing": ("missing.mp4", "failed", "missing.mp4: file not found"),
    "empty": ("empty.mp4", "failed", "empty.mp4: empty file (0 bytes)"),
    "not-a-video": ("text.mp4", "failed", "text.mp4: FFmpeg could not open it: "),
    "truncated": ("truncated.mp4", "failed", "truncated.mp4: FFmpeg could not open it: "),
    "too-short": ("short.mp4", "skipped", "short.mp4: no patch fits: 3 frames of 64x64"),
    "empty-label": ("good3.mp4", "failed", "list.csv:5: empty label"),
    "unknown-label": ("good4.mp4", "failed", "list.csv:6: unknown label 'zebra'; expected one of ['a', 'b']"),
    "escapes": ("../outside.mp4", "failed", "path '../outside.mp4' escapes the CSV's folder"),
    "too-large": ("big.mp4", "failed", "big.mp4: declared frame size 128x128 = 16384 pixels exceeds the limit "
                                       "of 10000 (--max-pixels)"),
    "audio-only": ("audio.mp4", "failed", "audio.mp4: no video stream (streams found: audio)"),
}
GOOD = {"good1.mp4": "a", "good2.mp4": "b"}


def make_bad_source(root: Path, clip) -> Path:
    """A CSV of two good videos and one of each kind of bad input; returns the CSV path."""
    src = root / "src"
    src.mkdir(parents=True)
    for name in ("good1.mp4", "good2.mp4", "good3.mp4", "good4.mp4"):
        shutil.copy(clip.path, src / name)
    shutil.copy(clip.path, root / "outside.mp4")           # a real video, but outside the CSV's folder
    (src / "empty.mp4").write_bytes(b"")
    (src / "text.mp4").write_text("this is a text file renamed .mp4\n" * 40)
    data = Path(clip.path).read_bytes()
    (src / "truncated.mp4").write_bytes(data[:len(data) // 2])  # `head -c`: the index at the end is lost
    write_video(str(src / "short.mp4"), pattern_frames(3, 64, 64))
    write_video(str(src / "big.mp4"), pattern_frames(4, 128, 128))
    write_audio_only(str(src / "audio.mp4"))
    (src / "list.csv").write_text(
        "path,label,split\n"
        "good1.mp4,a,train\n"
        "good2.mp4,b,val\n"
        "missing.mp4,a,train\n"
        "good3.mp4,,train\n"
        "good4.mp4,zebra,train\n"
        "empty.mp4,a,train\n"
        "text.mp4,b,train\n"
        "truncated.mp4,a,train\n"
        "short.mp4,a,train\n"
        "../outside.mp4,a,train\n"
        "big.mp4,b,train\n"
        "audio.mp4,a,train\n")
    return src / "list.csv"


BAD_ARGS = ("--patch", "4x32x32", "--labels", "a,b", "--max-pixels", "10000")


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, clip64):
    """One CLI conversion of the bad source: (click result, manifest, CSV path)."""
    from click.testing import CliRunner

    from stpkeras.cli import main

    root = tmp_path_factory.mktemp("bad")
    csv_path = make_bad_source(root, clip64)
    out = root / "out"
    result = CliRunner().invoke(main, ["convert", str(csv_path), str(out), *BAD_ARGS], catch_exceptions=False)
    return result, mf.read_manifest(str(out)), csv_path


def test_bad_inputs_leave_the_rest_converted_and_exit_1(bad_run):
    result, m, _ = bad_run
    assert result.exit_code == 1, result.output
    assert m["counts"] == {"videos": 12, "ok": 2, "failed": 9, "skipped": 1, "patches": 2 * PATCHES_PER_CLIP}
    assert {k: v["records"] for k, v in m["splits"].items()} == {"train": PATCHES_PER_CLIP, "val": PATCHES_PER_CLIP}
    assert {k: v["label_counts"] for k, v in m["splits"].items()} == {
        "train": {"a": PATCHES_PER_CLIP}, "val": {"b": PATCHES_PER_CLIP}}
    ok = {v["id"]: v for v in m["videos"] if v["status"] == "ok"}
    assert sorted(ok) == sorted(GOOD)
    assert "converted 2/12 videos" in result.stdout
    assert "9 failed, 1 skipped" in result.stderr


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_bad_input_is_reported_with_file_and_reason(bad_run, kind):
    result, m, csv_path = bad_run
    vid, status, reason = BAD[kind]
    entries = [v for v in m["videos"] if v["id"] == vid]
    assert len(entries) == 1, m["videos"]
    entry = entries[0]
    assert entry["status"] == status and entry["patches"] == 0
    assert reason in entry["reason"]
    # The reason names the file: the video's own path, or the CSV and its line for a bad row.
    assert str(csv_path.parent) in entry["reason"] or str(csv_path) in entry["reason"]
    assert f"warning: {status}: {entry['reason']}" in result.stderr.splitlines()


@pytest.mark.parametrize("kind, says", [("missing", "file not found"), ("truncated", "FFmpeg could not open it"),
                                        ("too-short", "no patch fits"), ("unknown-label", "unknown label 'zebra'"),
                                        ("audio-only", "no video stream")])
def test_strict_makes_any_failure_fatal_and_writes_no_manifest(tmp_path, clip64, cli, kind, says):
    csv_path = make_bad_source(tmp_path, clip64)
    vid = BAD[kind][0]
    rows = [line for line in csv_path.read_text().splitlines()[1:] if line.split(",")[0] in ("good1.mp4", vid)]
    assert len(rows) == 2
    csv_path.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    result = cli("convert", csv_path, out, *BAD_ARGS, "--strict")
    assert result.exit_code == 1
    assert f"Error: --strict: {csv_path.parent}" in result.stderr and says in result.stderr
    assert not (out / "dataset.json").exists()
    assert not [n for n in os.listdir(out) if SHARD_RE.match(n)]


def test_bad_file_in_a_class_folder(tmp_path, clip64, cli):
    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        shutil.copy(clip64.path, src / cls / "ok.mp4")
    (src / "b" / "broken.mp4").write_text("not a video")
    result = cli("convert", src, tmp_path / "out", "--patch", "4x32x32", "--quiet")
    assert result.exit_code == 1
    assert f"warning: failed: {src / 'b' / 'broken.mp4'}: FFmpeg could not open it" in result.stderr
    m = mf.read_manifest(str(tmp_path / "out"))
    assert m["labels"] == ["a", "b"]
    assert m["splits"]["train"]["label_counts"] == {"a": PATCHES_PER_CLIP, "b": PATCHES_PER_CLIP}


def test_source_errors_are_usage_errors(tmp_path, cli):
    (tmp_path / "empty").mkdir()
    result = cli("convert", tmp_path / "empty", tmp_path / "out")
    assert result.exit_code == 2 and "no videos found" in result.stderr
    (tmp_path / "bad.csv").write_text("file,label\nx.mp4,a\n")
    result = cli("convert", tmp_path / "bad.csv", tmp_path / "out2")
    assert result.exit_code == 2 and "expected a header with a `path` column" in result.stderr
    result = cli("convert", tmp_path / "bad.csv", tmp_path / "out3", "--patch", "8x64")
    assert result.exit_code == 2 and "Expected three integers written TxHxW" in result.stderr


# --- determinism, resume, refusal -------------------------------------------------------------------


def test_two_workers_write_the_same_records_and_manifest(tmp_path, converted, classes_src):
    root, m1 = converted
    m2 = convert(ConvertConfig(src=str(classes_src), out=str(tmp_path / "out"), spec=SPEC, workers=2))
    assert shard_digests(tmp_path / "out") == shard_digests(root)
    assert stable(m2) == stable(m1)
    assert leftovers(tmp_path / "out") == []


def _results(work: Path):
    return [n for n in os.listdir(work) if n.endswith(".json") and n != "config.json"] if work.is_dir() else []


def test_kill_and_resume_gives_the_records_of_a_clean_run(tmp_path, converted, classes_src, cli):
    root, clean = converted
    out = tmp_path / "out"
    work = out / WORK_DIR
    args = ["convert", str(classes_src), str(out), "--patch", "4x32x32", "--quiet"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "stpkeras.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not _results(work) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    done_before = len(_results(work))
    assert proc.returncode == -signal.SIGKILL, f"the conversion ended by itself first: {err.decode()[-2000:]}"
    assert 1 <= done_before < 12, f"killed with {done_before} of 12 videos done"
    assert not (out / "dataset.json").exists()

    # A half-written shard of an assembly that was killed too: it must not survive the rerun.
    (out / ".train-00000-of-00001.tfrecord.tmp").write_bytes(b"half a shard")
    # Another spec must not be mixed into the unfinished work.
    refused = cli("convert", classes_src, out, "--patch", "4x16x16", "--quiet")
    assert refused.exit_code == 2
    assert "holds an unfinished conversion with other settings" in refused.stderr
    assert len(_results(work)) == done_before

    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert shard_digests(out) == shard_digests(root)
    assert stable(mf.read_manifest(str(out))) == stable(clean)
    assert leftovers(out) == []
    assert sorted(os.listdir(out)) == [LOCK_NAME, "dataset.json", "train-00000-of-00001.tfrecord"]


def test_completed_conversion_is_up_to_date(converted_copy, converted, classes_src, cli):
    before = shard_digests(converted_copy)
    mtime = (converted_copy / "train-00000-of-00001.tfrecord").stat().st_mtime_ns
    result = cli("convert", classes_src, converted_copy, "--patch", "4x32x32")
    assert result.exit_code == 0
    assert "already converted with these settings" in result.stdout
    assert shard_digests(converted_copy) == before
    assert (converted_copy / "train-00000-of-00001.tfrecord").stat().st_mtime_ns == mtime
    assert leftovers(converted_copy) == []


def test_refuses_another_spec_unless_overwrite(converted_copy, classes_src, cli):
    before = shard_digests(converted_copy)
    result = cli("convert", classes_src, converted_copy, "--patch", "4x32x32", "--encoding", "png")
    assert result.exit_code == 2
    assert "holds a conversion with other settings (encoding: 'raw' there, 'png' asked)" in result.stderr
    result = cli("convert", classes_src, converted_copy, "--patch", "2x64x64")
    assert result.exit_code == 2 and "spec:" in result.stderr and "--overwrite" in result.stderr
    assert shard_digests(converted_copy) == before
    assert mf.read_manifest(str(converted_copy))["spec"] == SPEC.to_dict()
    assert leftovers(converted_copy) == []
    # The refusals changed nothing: the original command still finds its work done.
    assert "already converted with these settings" in cli("convert", classes_src, converted_copy,
                                                          "--patch", "4x32x32").stdout

    result = cli("convert", classes_src, converted_copy, "--patch", "2x64x64", "--overwrite", "--quiet")
    assert result.exit_code == 0, result.output
    m = mf.read_manifest(str(converted_copy))
    assert PatchSpec.from_dict(m["spec"]) == PatchSpec(2, 64, 64)
    assert m["counts"]["patches"] == 12 * 12
    assert shard_digests(converted_copy) == {s["file"]: s["sha256"] for s in m["splits"]["train"]["shards"]}


def test_refusal_through_the_library_raises_convert_error(converted_copy, classes_src):
    with pytest.raises(ConvertError, match="quality: None there, 50 asked"):
        convert(ConvertConfig(src=str(classes_src), out=str(converted_copy), spec=SPEC, encoding="jpeg",
                              quality=50))


# --- compression and shards ------------------------------------------------------------------------


@pytest.mark.parametrize("compression, suffix, tf_type, decompress", [
    ("gzip", ".tfrecord.gz", "GZIP", gzip.decompress),
    ("zlib", ".tfrecord.zz", "ZLIB", zlib.decompress),
])
def test_compressed_shards_hold_the_same_records(tmp_path, converted, classes_src, compression, suffix, tf_type,
                                                 decompress):
    root, plain = converted
    out = tmp_path / "out"
    m = convert(ConvertConfig(src=str(classes_src), out=str(out), spec=SPEC, compression=compression))
    (shard,) = m["splits"]["train"]["shards"]
    assert shard["file"] == "train-00000-of-00001" + suffix
    data = (out / shard["file"]).read_bytes()
    assert len(data) == shard["bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"]
    # The file is exactly the uncompressed shard, compressed.
    assert decompress(data) == (root / "train-00000-of-00001.tfrecord").read_bytes()
    assert len(data) < plain["splits"]["train"]["shards"][0]["bytes"]
    read = [r.numpy() for r in tf.data.TFRecordDataset(str(out / shard["file"]), compression_type=tf_type)]
    assert read == records_of(root, plain)
    assert records_of(out, m) == read  # the manifest names the right compression type


def test_shard_size_splits_into_named_shards(tmp_path, converted, classes_src, cli):
    root, plain = converted
    out = tmp_path / "out"
    total = plain["splits"]["train"]["shards"][0]["bytes"]   # about 3.6 MB
    result = cli("convert", classes_src, out, "--patch", "4x32x32", "--shard-size", "0.5", "--quiet")
    assert result.exit_code == 0
    m = mf.read_manifest(str(out))
    shards = m["splits"]["train"]["shards"]
    n = -(-total // 500_000)
    assert len(shards) == n > 1
    assert [s["file"] for s in shards] == [f"train-{i:05d}-of-{n:05d}.tfrecord" for i in range(n)]
    assert sorted(n for n in os.listdir(out) if SHARD_RE.match(n)) == [s["file"] for s in shards]
    record_size = 4 * 32 * 32 * 3 + 200
    for s in shards:
        count = sum(1 for _ in tf.data.TFRecordDataset(str(out / s["file"])))
        assert count == s["records"] > 0
        assert s["bytes"] == (out / s["file"]).stat().st_size <= 500_000 + record_size
    assert sum(s["records"] for s in shards) == m["splits"]["train"]["records"] == 12 * PATCHES_PER_CLIP
    assert sum(s["bytes"] for s in shards) == total
    # Splitting only cuts the same record stream at record boundaries.
    assert records_of(out, m) == records_of(root, plain)
    whole = (root / "train-00000-of-00001.tfrecord").read_bytes()
    assert b"".join((out / s["file"]).read_bytes() for s in shards) == whole


def test_manifest_records_the_run(converted):
    _, m = converted
    assert m["format"] == "stpkeras.patches" and m["schema_version"] == schema.SCHEMA_VERSION
    assert m["encoding"] == "raw" and m["compression"] == "none"
    assert set(m["versions"]) >= {"stpkeras", "tensorflow", "numpy", "av", "python"}
    assert m["versions"]["tensorflow"] == tf.__version__
    assert isinstance(m["seconds"], float) and m["created"].endswith("Z") and m["command"]
    json.dumps(m)  # plain JSON all the way down


def test_wrong_timestamps_are_reread_by_index_without_duplicate_records(tmp_path, sample, cli):
    # Megamind_bugy.avi's timestamps go back at some frame: the first read is abandoned there and the
    # video read again by frame index. Records of the abandoned read must not stay in the chunk.
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(sample("Megamind_bugy.avi"), src / "m.avi")
    result = cli("convert", src, tmp_path / "out", "--patch", "4x24x32", "--resize", "24x32", "--quiet")
    assert result.exit_code == 0, result.output
    m = mf.read_manifest(str(tmp_path / "out"))
    (video,) = m["videos"]
    assert (video["status"], video["timing"], video["frames"], video["patches"]) == ("ok", "index", 270, 67)
    parsed = [schema.parse_patch_numpy(r) for r in records_of(tmp_path / "out", m)]
    assert [p[schema.OFFSET][0] for p in parsed] == [4 * k for k in range(67)]
    decoded, _ = decode_all(str(src / "m.avi"), size=(24, 32))
    np.testing.assert_array_equal(np.concatenate([p[schema.PATCH] for p in parsed]), decoded[:268])


def test_turned_and_size_changing_videos_convert_as_shown_and_the_manifest_says_so(tmp_path, lossless_odd, cli):
    """A portrait phone clip (coded 45x71, display matrix 90 degrees clockwise) gives the patches of its
    frames turned upright; a `.ts` whose frames go from 48x64 to 48x32 keeps 48x64 without a stretch."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(lossless_odd.path, src / "plain.mp4")
    shutil.copy(lossless_odd.path, src / "phone.mp4")
    set_display_matrix(str(src / "phone.mp4"), DISPLAY_TURNS["phone_portrait"][0])
    write_size_changing_ts(str(src / "recording.ts"), [checkerboard(10, 48, 64, 8), checkerboard(10, 48, 32, 8)])
    result = cli("convert", src, tmp_path / "out", "--patch", "1x16x16", "--pad", "edge", "--quiet")
    assert result.exit_code == 0, result.output
    m = mf.read_manifest(str(tmp_path / "out"))
    videos = {v["id"]: v for v in m["videos"]}
    assert [videos[k]["status"] for k in ("phone.mp4", "plain.mp4", "recording.ts")] == ["ok"] * 3
    size_and_turn = {k: (v["height"], v["width"], v["rotation"]) for k, v in videos.items()}
    assert size_and_turn == {"phone.mp4": (71, 45, 270), "plain.mp4": (45, 71, 0), "recording.ts": (48, 64, 0)}
    assert "size_changes" not in videos["plain.mp4"] and "mirrored" not in videos["phone.mp4"]
    assert videos["recording.ts"]["size_changes"] == 1
    assert videos["recording.ts"]["size_change_list"] == [{"frame": 10, "from": [48, 64], "to": [48, 32],
                                                           "fit": "cover"}]

    def frames(video_id, shape):
        out = np.zeros(shape, np.uint8)
        for r in records_of(tmp_path / "out", m):
            p = schema.parse_patch_numpy(r)
            if p[schema.VIDEO_ID] == video_id:
                t, y, x = p[schema.OFFSET]
                vh, vw = list(p[schema.VALID])[1:]
                out[t, y:y + vh, x:x + vw] = p[schema.PATCH][0, :vh, :vw]
        return out

    upright = DISPLAY_TURNS["phone_portrait"][1](lossless_odd.frames)  # 19 x 71 x 45
    np.testing.assert_array_equal(frames("phone.mp4", upright.shape), upright)
    np.testing.assert_array_equal(frames("plain.mp4", lossless_odd.frames.shape), lossless_odd.frames)
    # The 48x32 board scaled x2 (squares of 16) and centre-cropped to rows 24..72: colour changes at rows
    # 8, 24, 40 and columns 16, 32, 48. A stretch would change colour every 8 rows.
    later = frames("recording.ts", (20, 48, 64, 3))[15, :, :, 0] > 128
    assert list(np.flatnonzero(np.diff(later[:, 31].astype(int))) + 1) == [8, 24, 40]
    assert list(np.flatnonzero(np.diff(later[23].astype(int))) + 1) == [16, 32, 48]


# --- a full disk or a forbidden folder: one line saying where and how much, and a rerun is identical --------


def _failing_writes(monkeypatch, errno_, after_bytes):
    """Shard writes fail with `errno_` once `after_bytes` have been written (all shards together)."""
    import errno as errnos
    import io

    from tfrecords_tools import shards

    written = [0]

    class Failing(io.FileIO):
        def write(self, data):
            written[0] += len(data)
            if written[0] > after_bytes:
                raise OSError(errno_, os.strerror(errno_))
            return super().write(data)

    assert errno_ in (errnos.ENOSPC, errnos.EACCES)
    monkeypatch.setattr(shards, "_open_output", lambda path: Failing(path, "wb"))


def _failing_chunks(monkeypatch, after_records):
    """Chunk writes fail with ENOSPC after `after_records` records (all videos together)."""
    import errno as errnos

    from tfrecords_tools import shards

    count = [0]
    plain_write = shards._PlainWriter.write

    def write(self, record):
        count[0] += 1
        if count[0] > after_records:
            raise OSError(errnos.ENOSPC, os.strerror(errnos.ENOSPC))
        plain_write(self, record)

    monkeypatch.setattr(shards._PlainWriter, "write", write)


def _assert_same_shards(out, reference):
    m = mf.read_manifest(str(out))
    assert m["splits"]["train"]["shards"] == reference["splits"]["train"]["shards"]
    for entry in m["splits"]["train"]["shards"]:
        assert hashlib.sha256((out / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    files = [e["file"] for e in m["splits"]["train"]["shards"]]
    assert sorted(os.listdir(out)) == sorted([LOCK_NAME, mf.MANIFEST_NAME] + files)


@pytest.mark.parametrize("phase", ["assembly", "chunks"])
def test_a_full_disk_is_one_line_with_the_space_needed_and_a_rerun_is_identical(phase, converted, classes_src,
                                                                                 tmp_path, monkeypatch, cli):
    import errno as errnos

    out = tmp_path / "out"
    chunk_bytes = sum(e["bytes"] for e in converted[1]["splits"]["train"]["shards"])
    with monkeypatch.context() as patch:
        if phase == "assembly":
            _failing_writes(patch, errnos.ENOSPC, after_bytes=1_000_000)
        else:
            _failing_chunks(patch, after_records=5 * PATCHES_PER_CLIP + 3)  # in the 6th of 12 videos
        result = cli("convert", classes_src, out, "--patch", "4x32x32")
    assert result.exit_code == 4, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    if phase == "assembly":
        assert errors[0].startswith(f"Error: {out / '.train-00000-of-00001.tfrecord.tmp'}: No space left on device "
                                    f"while assembling the shards: the shards need about {chunk_bytes / 1e6:,.1f} MB "
                                    f"beside the {chunk_bytes / 1e6:,.1f} MB of chunks in {out / WORK_DIR}; ")
    else:
        assert errors[0].startswith(f"Error: {out / WORK_DIR}/")
        assert ("No space left on device while writing the per-video chunks: 5 of 12 videos took "
                f"{5 * chunk_bytes / 12 / 1e6:,.1f} MB of chunks; the whole conversion needs about "
                f"{2 * chunk_bytes / 1e6:,.1f} MB (the chunks, then as much again for the shards); ") in errors[0]
    assert "MB free there now. Free space and run the same command again" in errors[0]
    # Nothing half-written is left to be read: no manifest, no shard, no temporary beside the work folder.
    assert sorted(os.listdir(out)) == [LOCK_NAME, WORK_DIR]
    assert not [n for n in os.listdir(out / WORK_DIR) if n.endswith(".tmp")]
    again = cli("convert", classes_src, out, "--patch", "4x32x32")
    assert again.exit_code == 0, again.output
    _assert_same_shards(out, converted[1])


def test_a_forbidden_folder_is_one_line_naming_it(converted, classes_src, tmp_path, monkeypatch, cli):
    import errno as errnos

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _failing_writes(patch, errnos.EACCES, after_bytes=0)
        result = cli("convert", classes_src, out, "--patch", "4x32x32")
    assert result.exit_code == 4, result.output
    assert result.stderr.startswith(f"Error: {out / '.train-00000-of-00001.tfrecord.tmp'}: Permission denied "
                                    "while assembling the shards. Make the folder writable")
    assert len(result.stderr.splitlines()) == 1
    assert cli("convert", classes_src, out, "--patch", "4x32x32").exit_code == 0
    _assert_same_shards(out, converted[1])


# --- segments, sampling, multi-label and values --------------------------------------------------

SEG_SPEC = PatchSpec(4, 16, 16)  # on clip2s (50 frames of 32x48): 2 x 3 patches a window


@pytest.fixture
def reads(monkeypatch):
    """Counts what the decoder does: probes (file opens) and frames decoded, per file."""
    from tfrecords_tools import video

    counts = {"probes": {}, "decoded": {}}
    probe, init = video._probe, video.FrameStream.__iter__

    def counting_probe(path, *a, **k):
        counts["probes"][path] = counts["probes"].get(path, 0) + 1
        return probe(path, *a, **k)

    def counting_iter(self):
        try:
            yield from init(self)
        finally:
            counts["decoded"][self.info.path] = counts["decoded"].get(self.info.path, 0) + self.decoded

    monkeypatch.setattr(video, "_probe", counting_probe)
    monkeypatch.setattr(video.FrameStream, "__iter__", counting_iter)
    return counts


def test_segments_of_one_video_are_items_cut_from_one_decode(tmp_path, clip2s, reads):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(clip2s.path, src / "v.mp4")
    (src / "list.csv").write_text(
        "path,label,start,end\n"
        "v.mp4,a,0.4,1.2\n"      # frames 10..29: 5 windows
        "v.mp4,b,0.5,1.5\n"      # overlaps the first: frames 13..37, 6 windows
        "v.mp4,a,1.6,\n"         # to the end: frames 40..49, 2 windows
        "v.mp4,b,,0.32\n"        # from the beginning: frames 0..7, 2 windows
        "v.mp4,b,1.9,2.5\n"      # past the end
        "v.mp4,a,1.0,1.05\n"     # 2 frames: shorter than a patch
        "v.mp4,a,1,0.5\n"        # reversed
        "v.mp4,b,0.4,1.2\n")     # the same segment again
    m = convert(ConvertConfig(src=str(src / "list.csv"), out=str(tmp_path / "out"), spec=SEG_SPEC))
    # One probe and one pass over the 50 frames for all eight rows.
    assert reads["probes"] == {str(src / "v.mp4"): 1} and reads["decoded"] == {str(src / "v.mp4"): 50}
    by_id = {v["id"]: v for v in m["videos"] if v["status"] == "ok"}
    got = {i: (v["status"], v["label"], v["patches"], v.get("segment"), v.get("frames")) for i, v in by_id.items()}
    assert got == {
        "v.mp4#t=0.4,1.2": ("ok", "a", 5 * 6, [0.4, 1.2], 20),
        "v.mp4#t=0.5,1.5": ("ok", "b", 6 * 6, [0.5, 1.5], 25),
        "v.mp4#t=1.6,2": ("ok", "a", 2 * 6, [1.6, 2.0], 10),
        "v.mp4#t=0,0.32": ("ok", "b", 2 * 6, [0.0, 0.32], 8)}
    assert by_id["v.mp4#t=1.6,2"]["listed"] == "v.mp4#t=1.6,"
    failed = sorted(v["reason"] for v in m["videos"] if v["status"] == "failed")
    csv_path = src / "list.csv"
    assert failed == sorted([
        f"{csv_path}:6: {src / 'v.mp4'}: segment 1.9-2.5s ends past the video's end at 2.000s",
        f"{csv_path}:7: {src / 'v.mp4'}: segment 1-1.05s holds 2 frames, shorter than a patch of 4 frames",
        f"{csv_path}:8: a reversed interval: start=1s, end=0.5s; expected start < end",
        f"{csv_path}:9: {src / 'v.mp4'}#t=0.4,1.2: listed twice in split 'train' (first on line 2)"])
    assert m["counts"] == {"videos": 8, "ok": 4, "failed": 4, "skipped": 0, "patches": 30 + 36 + 12 + 12}
    assert m["splits"]["train"]["label_counts"] == {"a": 42, "b": 48}
    records = [schema.parse_patch_numpy(r) for r in records_of(tmp_path / "out", m)]
    segs = {}
    for r in records:
        segs.setdefault(r[schema.VIDEO_ID], []).append(r)
    first, start = segs["v.mp4#t=0.5,1.5"][0], 13
    assert first[schema.INTERVAL] == pytest.approx([0.5, 1.5]) and first[schema.VIDEO_SIZE] == [25, 32, 48]
    assert first[schema.OFFSET] == [0, 0, 0] and first[schema.LABEL_NAME] == "b" and first[schema.LABEL] == 1
    assert first[schema.TIMESTAMP] == pytest.approx(start / 25, abs=1e-4)
    # Lossless: each patch holds exactly the video's frames of its segment.
    for vid, first_frame in (("v.mp4#t=0.5,1.5", 13), ("v.mp4#t=1.6,2", 40), ("v.mp4#t=0,0.32", 0)):
        for r in segs[vid]:
            t, y, x = r[schema.OFFSET]
            k = first_frame + t
            np.testing.assert_array_equal(r[schema.PATCH], clip2s.frames[k:k + 4, y:y + 16, x:x + 16])


def test_a_segment_early_in_a_video_stops_decoding_after_it(tmp_path, clip2s, reads):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(clip2s.path, src / "v.mp4")
    (src / "list.csv").write_text("path,start,end\nv.mp4,0,0.5\nv.mp4,0.1,0.3\n")
    m = convert(ConvertConfig(src=str(src / "list.csv"), out=str(tmp_path / "out"), spec=SEG_SPEC))
    assert [(v["id"], v["patches"]) for v in m["videos"]] == [("v.mp4#t=0,0.5", 3 * 6), ("v.mp4#t=0.1,0.3", 6)]
    assert m["label_mode"] == "none" and reads["decoded"][str(src / "v.mp4")] < 20


def test_clips_per_video_and_max_patches_sample_evenly(tmp_path, clip2s):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(clip2s.path, src / "v.mp4")
    (src / "list.csv").write_text("path,start,end\nv.mp4,,\nv.mp4,0.4,1.2\n")
    m = convert(ConvertConfig(src=str(src / "list.csv"), out=str(tmp_path / "out"), spec=SEG_SPEC,
                              clips_per_video=3, max_patches_per_video=5))
    whole, seg = m["videos"]
    assert whole["sampled"] == {"clips": 3, "clip_starts": [0, 23, 46], "max_patches": 5, "of": 18}
    assert seg["sampled"] == {"clips": 3, "clip_starts": [0, 8, 16], "max_patches": 5, "of": 18}
    assert whole["patches"] == seg["patches"] == 5
    records = [schema.parse_patch_numpy(r) for r in records_of(tmp_path / "out", m)]
    # Patches 1, 5, 9, 12, 16 of the 3 clips x 6: (clip, y, x) = (0,0,1) (0,1,2) (1,1,0) (2,0,0) (2,1,1).
    offsets = [r[schema.OFFSET] for r in records if r[schema.VIDEO_ID] == "v.mp4"]
    assert offsets == [[0, 0, 16], [0, 16, 32], [23, 16, 0], [46, 0, 0], [46, 16, 16]]
    for r in records:
        if r[schema.VIDEO_ID] == "v.mp4":
            t, y, x = r[schema.OFFSET]
            np.testing.assert_array_equal(r[schema.PATCH], clip2s.frames[t:t + 4, y:y + 16, x:x + 16])
    assert m["fingerprint"]["clips_per_video"] == 3 and m["fingerprint"]["max_patches_per_video"] == 5


def test_multi_label_and_value_columns(tmp_path, clip2s, clip64):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(clip2s.path, src / "v.mp4")
    shutil.copy(clip64.path, src / "w.mp4")
    (src / "list.csv").write_text(
        "path,label,start,end,speed,size\n"
        "v.mp4,run;jump,0,1,1.5,2\n"
        "v.mp4,sit,1,2,0.25,-1\n"
        "w.mp4,jump; sit ;jump,,,3,4\n"
        "v.mp4,run,0.2,0.9,fast,1\n")
    m = convert(ConvertConfig(src=str(src / "list.csv"), out=str(tmp_path / "out"), spec=SEG_SPEC,
                              values=("speed", "size")))
    assert m["labels"] == ["jump", "run", "sit"] and m["label_mode"] == "multi"
    assert m["value_names"] == ["speed", "size"]
    assert [(v["id"], v["label"], v["status"]) for v in m["videos"]] == [
        ("v.mp4#t=0,1", "jump;run", "ok"), ("v.mp4#t=0.2,0.9", "run", "failed"), ("v.mp4#t=1,2", "sit", "ok"),
        ("w.mp4", "jump;sit", "ok")]
    assert m["videos"][1]["reason"] == f"{src / 'list.csv'}:5: value column 'speed' is 'fast'; expected a finite number"
    records = [schema.parse_patch_numpy(r) for r in records_of(tmp_path / "out", m)]
    by_id = {r[schema.VIDEO_ID]: r for r in records}
    assert by_id["v.mp4#t=0,1"][schema.MULTI_HOT] == [1, 1, 0] and by_id["v.mp4#t=0,1"][schema.LABEL] == -1
    assert by_id["v.mp4#t=0,1"][schema.VALUES] == [1.5, 2.0]
    assert by_id["v.mp4#t=1,2"][schema.MULTI_HOT] == [0, 0, 1]
    assert by_id["v.mp4#t=1,2"][schema.VALUES] == [0.25, -1.0]
    assert by_id["w.mp4"][schema.MULTI_HOT] == [1, 0, 1] and by_id["w.mp4"][schema.LABEL_NAME] == "jump;sit"
    assert schema.INTERVAL not in by_id["w.mp4"] and by_id["w.mp4"][schema.VALUES] == [3.0, 4.0]
    counts = m["splits"]["train"]["label_counts"]
    assert counts == {"jump": 36 + 96, "run": 36, "sit": 36 + 96}  # w.mp4: 6 windows of 4 x 4 patches
    from tfrecords_tools.verify import verify

    report = verify(str(tmp_path / "out"))
    assert report.ok and report.problems == []
