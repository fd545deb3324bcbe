"""Verify stage: a good folder passes; a flipped byte, a truncated or missing shard, and a record of the
wrong shape are each found and named (shard and record), and `stp verify` exits 3.
"""

import json
import os

import pytest
import tensorflow as tf

from tfrecords_tools import manifest as mf
from tfrecords_tools.convert import ConvertConfig, convert
from tfrecords_tools.spec import PatchSpec
from tfrecords_tools.verify import verify

SHARD = "train-00000-of-00001.tfrecord"


def record_starts(path):
    """Byte offset of each record in an uncompressed TFRecord file (length + 16 bytes of framing each)."""
    starts, at = [], 0
    for r in tf.data.TFRecordDataset(str(path)):
        starts.append(at)
        at += len(r.numpy()) + 16
    return starts


def test_good_folder_passes(converted, cli):
    root, m = converted
    report = verify(str(root))
    assert report.ok and report.problems == []
    assert report.shards == 1 and report.records == m["counts"]["patches"] == 288
    result = cli("verify", root)
    assert result.exit_code == 0
    assert f"{root}: 1 shards, 288 records read, 0 problem(s)" in result.stdout


def test_flipped_byte_is_found_and_named(converted_copy, cli):
    path = converted_copy / SHARD
    starts = record_starts(path)
    data = bytearray(path.read_bytes())
    data[starts[100] + 16 + 500] ^= 0x01  # one bit in the pixels of record 100
    path.write_bytes(bytes(data))
    report = verify(str(converted_copy))
    assert not report.ok
    assert any(p.startswith(f"{SHARD}: sha256 ") and "the manifest says" in p for p in report.problems)
    assert any(p.startswith(f"{SHARD}: record 100: unreadable (corrupt or truncated)") for p in report.problems)
    assert f"{SHARD}: 100 readable records, the manifest says 288" in report.problems
    result = cli("verify", converted_copy)
    assert result.exit_code == 3
    assert f"error: {SHARD}: record 100: unreadable" in result.stderr
    assert "3 problem(s)" in result.stdout


def test_flipped_byte_names_the_right_shard_among_several(tmp_path, classes_src, cli):
    out = tmp_path / "out"
    m = convert(ConvertConfig(src=str(classes_src), out=str(out), spec=PatchSpec(4, 32, 32), shard_size_mb=1.0))
    names = [s["file"] for s in m["splits"]["train"]["shards"]]
    assert len(names) == 4
    victim = out / names[2]
    data = bytearray(victim.read_bytes())
    data[record_starts(victim)[3] + 16 + 10] ^= 0xFF
    victim.write_bytes(bytes(data))
    result = cli("verify", out)
    assert result.exit_code == 3
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(line.startswith(f"error: {names[2]}: ") for line in errors)
    assert f"error: {names[2]}: record 3: unreadable" in result.stderr


def test_truncated_shard(converted_copy, cli):
    path = converted_copy / SHARD
    starts = record_starts(path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(starts[200] + 30)  # cut inside record 200
    report = verify(str(converted_copy))
    assert f"{SHARD}: {starts[200] + 30} bytes, the manifest says {size}" in report.problems
    assert any(p.startswith(f"{SHARD}: record 200: unreadable") for p in report.problems)
    assert f"{SHARD}: 200 readable records, the manifest says 288" in report.problems
    assert report.records == 200
    assert cli("verify", converted_copy).exit_code == 3


def test_missing_shard(converted_copy, cli):
    os.remove(converted_copy / SHARD)
    report = verify(str(converted_copy))
    assert report.problems == [f"{SHARD}: missing"]
    result = cli("verify", converted_copy)
    assert result.exit_code == 3 and f"error: {SHARD}: missing" in result.stderr


def test_records_not_of_the_declared_shape(converted_copy):
    path = converted_copy / mf.MANIFEST_NAME
    m = json.loads(path.read_text())
    m["spec"]["frames"] = 8  # the manifest now declares patches the records do not hold
    path.write_text(json.dumps(m))
    report = verify(str(converted_copy))
    assert len(report.problems) == 288
    assert report.problems[0] == (f"{SHARD}: record 0: does not decode: patch shape (4, 32, 32, 3) differs "
                                  "from the spec's (8, 32, 32, 3)")


def test_label_map_mismatch_is_found(converted_copy):
    path = converted_copy / mf.MANIFEST_NAME
    m = json.loads(path.read_text())
    m["labels"] = ["square", "circle", "stripe"]  # two classes swapped
    path.write_text(json.dumps(m))
    problems = verify(str(converted_copy)).problems
    assert len(problems) == 2 * 96
    assert problems[0] == f"{SHARD}: record 0: label 0 named 'circle', the label map says 'square'"


def test_not_a_converted_folder(tmp_path, cli):
    with pytest.raises(mf.ManifestError, match="no manifest"):
        verify(str(tmp_path))
    result = cli("verify", tmp_path)
    assert result.exit_code == 3 and "no manifest. Expected a folder written by `stp convert`" in result.stderr
