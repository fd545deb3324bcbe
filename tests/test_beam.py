"""Convert stage on Apache Beam (DirectRunner): the same records, shards and manifest as the local converter."""

import hashlib
import os
import shutil

import pytest

beam = pytest.importorskip("apache_beam", reason="needs Apache Beam: pip install 'stpkeras[beam]' (tox -e beam)")

from test_convert import records_of, shard_digests, stable  # noqa: E402
from tfrecords_tools.beam import beam_options, convert_beam  # noqa: E402
from tfrecords_tools.convert import ConvertConfig, convert  # noqa: E402
from tfrecords_tools.spec import PatchSpec  # noqa: E402

SPEC = PatchSpec(4, 32, 32)


@pytest.fixture(scope="module")
def source(classes_src, tmp_path_factory):
    """The class folders plus one broken file, so that a failure travels through both runners."""
    src = tmp_path_factory.mktemp("beam_src") / "videos"
    shutil.copytree(classes_src, src)
    (src / "circle" / "broken.mp4").write_bytes(b"not a video at all")
    return src


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_beam_writes_the_same_shards_and_manifest_as_the_local_converter(source, tmp_path, compression):
    common = dict(src=str(source), spec=SPEC, shard_size_mb=0.1, compression=compression,
                  split_fractions=(("val", 0.3),))
    local = convert(ConvertConfig(out=str(tmp_path / "local"), workers=1, **common))
    remote = convert_beam(ConvertConfig(out=str(tmp_path / "beam"), **common), beam_options(["direct_num_workers=1"]))

    # Several shards per split, so the byte-offset layout across videos is exercised.
    assert len(local["splits"]["train"]["shards"]) > 2
    # Same set of records (decoded), then the stronger claim: the same bytes in the same files.
    assert sorted(records_of(tmp_path / "beam", remote)) == sorted(records_of(tmp_path / "local", local))
    assert shard_digests(tmp_path / "beam") == shard_digests(tmp_path / "local")
    drop = ("runner", "versions")
    assert ({k: v for k, v in stable(remote).items() if k not in drop}
            == {k: v for k, v in stable(local).items() if k not in drop})
    assert remote["runner"] == "beam"
    failed = [v for v in remote["videos"] if v["status"] == "failed"]
    assert [v["id"] for v in failed] == ["circle/broken.mp4"] and "broken.mp4" in failed[0]["reason"]
    assert remote["counts"]["failed"] == 1 and remote["counts"]["ok"] == 12
    # No temporary or work files left in OUT.
    assert sorted(n for n in os.listdir(tmp_path / "beam") if n.startswith(".")) == []


def test_stp_convert_runner_beam(source, tmp_path, cli):
    out = tmp_path / "out"
    result = cli("convert", source, out, "--patch", "4x32x32", "--runner", "beam", "--beam-option",
                 "direct_num_workers=1")
    # exit 1: one video failed, listed in the manifest and on stderr.
    assert result.exit_code == 1, result.output
    assert "broken.mp4" in result.stderr and "converted 12/13 videos" in result.stdout
    digest = hashlib.sha256((out / "dataset.json").read_bytes()).hexdigest()
    assert len(digest) == 64
    bad = cli("convert", source, tmp_path / "x", "--beam-option", "runner=DirectRunner")
    assert bad.exit_code == 2 and "needs --runner beam" in bad.output


def test_strict_beam_run_writes_no_manifest(source, tmp_path):
    from tfrecords_tools.convert import ConvertError

    with pytest.raises(Exception, match="--strict: .*broken.mp4"):
        convert_beam(ConvertConfig(src=str(source), out=str(tmp_path / "out"), spec=SPEC, strict=True))
    assert not (tmp_path / "out" / "dataset.json").exists()
    assert issubclass(ConvertError, RuntimeError)


def test_beam_segments_multi_label_and_values_match_the_local_converter(tmp_path, clip2s, clip64):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(clip2s.path, src / "v.mp4")
    shutil.copy(clip64.path, src / "w.mp4")
    (src / "list.csv").write_text(
        "path,label,start,end,value,split\n"
        "v.mp4,run;jump,0,1,1.5,train\n"
        "v.mp4,sit,0.5,,0.25,train\n"        # open end: its id gets the video's end
        "v.mp4,run,1.9,3,2,train\n"          # past the end: fails, the rest of v.mp4 converts
        "v.mp4,jump,0.2,1.2,3,val\n"
        "w.mp4,sit,,,4,train\n")
    common = dict(src=str(src / "list.csv"), spec=PatchSpec(4, 16, 16), shard_size_mb=0.05,
                  clips_per_video=4, max_patches_per_video=10)
    local = convert(ConvertConfig(out=str(tmp_path / "local"), **common))
    remote = convert_beam(ConvertConfig(out=str(tmp_path / "beam"), **common), beam_options(["direct_num_workers=1"]))
    assert local["label_mode"] == "multi" and local["value_names"] == ["value"]
    assert [(v["id"], v["status"]) for v in local["videos"]] == [
        ("v.mp4#t=0,1", "ok"), ("v.mp4#t=0.5,2", "ok"), ("v.mp4#t=1.9,3", "failed"), ("w.mp4", "ok"),
        ("v.mp4#t=0.2,1.2", "ok")]
    assert len(local["splits"]["train"]["shards"]) > 1
    assert shard_digests(tmp_path / "beam") == shard_digests(tmp_path / "local")
    drop = ("runner", "versions")
    assert ({k: v for k, v in stable(remote).items() if k not in drop}
            == {k: v for k, v in stable(local).items() if k not in drop})
