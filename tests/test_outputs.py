"""Outputs: an output that is an input is refused, a failed write leaves nothing, one writer per folder.

Real components throughout: generated H.264 videos, the `stp` CLI in-process and as concurrent
subprocesses, `stp verify`, SavedModels loaded back.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tfrecords_tools import outputs
from tfrecords_tools.spec import PatchSpec
from videos import write_video

ROOT = Path(__file__).resolve().parents[1]


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def stp(*args) -> subprocess.Popen:
    """`stp ARGS...` as a real process (its own PID, its own locks)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen([sys.executable, "-m", "stpkeras.cli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def leftovers(folder) -> list:
    return sorted(n for n in os.listdir(folder) if ".stp-tmp-" in n)


# --- the module itself ---------------------------------------------------------------------------

def test_check_not_input_sees_the_same_path_symlinks_and_hard_links(tmp_path):
    video = tmp_path / "x.mp4"
    video.write_bytes(b"video")
    (tmp_path / "link.mp4").symlink_to(video)
    os.link(video, tmp_path / "hard.mp4")
    for out, how in ((video, "the same path as"), (tmp_path / "sub" / ".." / "x.mp4", "the same path as"),
                     (tmp_path / "link.mp4", "a symbolic link to"), (tmp_path / "hard.mp4", "a hard link to")):
        with pytest.raises(outputs.OutputIsInputError) as e:
            outputs.check_not_input(str(out), [None, str(video)])
        assert e.value.how == how and str(video) in str(e.value) and str(out) in str(e.value)
    outputs.check_not_input(str(tmp_path / "new.mp4"), [str(video)])  # a new file is fine


def test_atomic_file_leaves_the_old_file_whole_when_the_write_fails(tmp_path):
    path = tmp_path / "out.txt"
    outputs.write_text(str(path), "old")
    with pytest.raises(ZeroDivisionError):
        with outputs.atomic_file(str(path)) as tmp:
            Path(tmp).write_text("half")
            1 / 0
    assert path.read_text() == "old" and leftovers(tmp_path) == []


# --- enhance / segment: the input is never the output ----------------------------------------------

@pytest.fixture(scope="module")
def identity_run(tmp_path_factory):
    from test_enhance import _identity_run

    return _identity_run(tmp_path_factory.mktemp("enhance") / "run", PatchSpec(4, 16, 16))


@pytest.fixture
def victim(tmp_path, lossless_odd):
    """A private copy of a real video, with a symbolic and a hard link to it."""
    path = tmp_path / "x.mp4"
    path.write_bytes(Path(lossless_odd.path).read_bytes())
    (tmp_path / "link.mp4").symlink_to(path)
    os.link(path, tmp_path / "hard.mp4")
    return path


@pytest.mark.parametrize("out", ["x.mp4", "link.mp4", "hard.mp4"])
def test_enhance_refuses_an_out_that_is_its_input(identity_run, victim, out, cli):
    before = sha256(victim)
    r = cli("enhance", identity_run, victim, "--out", victim.parent / out)
    assert r.exit_code == 2, r.output
    assert "not one of the inputs" in r.output and str(victim) in r.output and "Traceback" not in r.output
    assert sha256(victim) == before and os.path.getsize(victim) == len(Path(victim).read_bytes()) > 10_000
    # The other outputs too: --side-by-side and --frame-png may not be the input or the reference.
    r = cli("enhance", identity_run, victim, "--out", victim.parent / "new.mp4", "--side-by-side", victim.parent / out)
    assert r.exit_code == 2 and sha256(victim) == before and not (victim.parent / "new.mp4").exists()


def test_enhance_that_fails_while_writing_leaves_no_output(identity_run, tmp_path, lossless_odd, cli):
    # A reference 8 frames long for a 19-frame video: the error comes after frames were written.
    short = write_video(str(tmp_path / "short.mp4"), lossless_odd.frames[:8], lossless=True)
    out = tmp_path / "out.mp4"
    r = cli("enhance", identity_run, lossless_odd.path, "--out", out, "--reference", short)
    assert r.exit_code == 2 and "ends after" in r.output
    assert not out.exists() and leftovers(tmp_path) == []
    # An earlier output at --out stays as it was.
    out.write_bytes(b"an earlier enhanced video")
    r = cli("enhance", identity_run, lossless_odd.path, "--out", out, "--reference", short,
            "--frame-png", tmp_path / "f.png")
    assert r.exit_code == 2 and out.read_bytes() == b"an earlier enhanced video"
    assert not (tmp_path / "f.png").exists() and leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def mask_run(tmp_path_factory):
    """A run folder of an untrained per-voxel segmenter: uint8 [T, 16, 16, 3] -> logits [T, 16, 16, 2]."""
    import keras

    spec = PatchSpec(4, 16, 16)
    inputs = keras.Input(spec.shape, dtype="uint8")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    model = keras.Model(inputs, keras.layers.Conv3D(2, 1)(x))
    run = tmp_path_factory.mktemp("segment") / "run"
    run.mkdir()
    model.save(str(run / "best.keras"))
    (run / "run.json").write_text(json.dumps({"task": "segment", "spec": spec.to_dict(), "labels": ["0", "1"]}))
    return run


@pytest.mark.parametrize("out", ["x.mp4", "link.mp4", "hard.mp4"])
def test_segment_refuses_an_out_that_is_its_input(mask_run, victim, out, cli):
    before = sha256(victim)
    r = cli("segment", mask_run, victim, "--out", victim.parent / out)
    assert r.exit_code == 2 and "not one of the inputs" in r.output and str(victim) in r.output, r.output
    assert sha256(victim) == before


def test_segment_writes_its_overlay_whole_or_not_at_all(mask_run, tmp_path, clip64, monkeypatch, cli):
    from stpkeras import segment

    out = tmp_path / "overlay.mp4"
    r = cli("segment", mask_run, clip64.path, "--out", out)
    assert r.exit_code == 0, r.output
    good = sha256(out)
    real, calls = segment.overlay, []

    def failing(frame, ids, alpha=0.5):  # fails on the 5th frame, after 4 were encoded
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk full (injected)")
        return real(frame, ids, alpha)

    monkeypatch.setattr(segment, "overlay", failing)
    with pytest.raises(RuntimeError, match="injected"):
        segment.segment_video(segment.load_segmenter(str(mask_run)), clip64.path, str(out))
    assert sha256(out) == good and leftovers(tmp_path) == []
    out.unlink()
    with pytest.raises(RuntimeError, match="injected"):
        calls.clear()
        segment.segment_video(segment.load_segmenter(str(mask_run)), clip64.path, str(out))
    assert not out.exists() and leftovers(tmp_path) == []


# --- one writer per folder -------------------------------------------------------------------------

def test_simultaneous_converts_one_runs_the_others_are_refused_naming_it(classes_src, tmp_path, cli):
    out = tmp_path / "data"
    runs = [stp("convert", classes_src, out, "--patch", "4x32x32", "-q") for _ in range(3)]
    results = [(p, *p.communicate(timeout=300)) for p in runs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 4, 4], [(p.returncode, err[-2000:]) for p, _, err in results]
    winner = next(p for p, _, _ in results if p.returncode == 0)
    for p, stdout, stderr in results:
        if p is winner:
            continue
        lines = stderr.strip().splitlines()
        assert f"PID {winner.pid}" in lines[-1] and "being written" in lines[-1], stderr
        assert "Traceback" not in stderr and stdout == ""
    r = cli("verify", out)
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "dataset.json").read_text())
    assert f"{manifest['counts']['patches']:,} records read" in r.output and manifest["counts"]["patches"] == 288
    assert manifest["counts"]["ok"] == 12 and not (out / ".stp-work").exists()


def test_a_sigkilled_convert_does_not_block_the_next_one(classes_src, tmp_path, cli):
    out = tmp_path / "data"
    p = stp("convert", classes_src, out, "--patch", "4x32x32", "-q")
    lock = out / outputs.LOCK_NAME
    deadline = time.time() + 120
    while not (lock.exists() and lock.read_text().strip()):
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.05)
    assert json.loads(lock.read_text())["pid"] == p.pid
    with pytest.raises(outputs.OutputBusyError) as e:  # held while it runs
        with outputs.writing(str(out)):
            pass
    assert e.value.pids == [p.pid]
    os.kill(p.pid, signal.SIGKILL)
    p.communicate()
    r = cli("convert", classes_src, out, "--patch", "4x32x32", "-q")
    assert r.exit_code == 0, r.output
    r = cli("verify", out)
    assert r.exit_code == 0 and "288 records read" in r.output, r.output


def test_readers_and_a_writer_of_one_folder_refuse_each_other(converted_copy, classes_src, tmp_path, cli):
    data = converted_copy
    before = sha256(data / "dataset.json")
    with outputs.reading(str(data)):  # what `stp train DATA` holds while it trains
        r = cli("convert", classes_src, data, "--patch", "4x32x32", "--overwrite", "-q")
        assert r.exit_code == 4 and f"being read by PID {os.getpid()}" in r.output, r.output
        assert cli("verify", data).exit_code == 0  # readers share the folder
    assert sha256(data / "dataset.json") == before
    from stpkeras.models import build_model
    from stpkeras.testing.models import write_run

    spec = PatchSpec(4, 32, 32)
    trained = write_run(str(tmp_path / "trained"), build_model("stcnn", spec, 3, filters=4), spec,
                        json.loads((data / "dataset.json").read_text())["labels"])
    with outputs.writing(str(data), command="stp convert (test)"):  # a conversion in progress
        for args in (("verify", data), ("train", data, "--out", tmp_path / "run", "--epochs", "1"),
                     ("evaluate", trained, data, "--split", "train")):
            r = cli(*args)
            assert r.exit_code == 4, (args, r.output)
            assert f"being written by PID {os.getpid()}" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run").exists() and not list(Path(trained).glob("eval-*"))
    assert cli("evaluate", trained, data, "--split", "train").exit_code == 0  # free again
    r = cli("convert", classes_src, classes_src, "--patch", "4x32x32")
    assert r.exit_code == 2 and "not one of the inputs" in r.output


# --- exports ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from stpkeras.models import build_model
    from stpkeras.testing.models import write_run

    spec = PatchSpec(4, 16, 16)
    run = tmp_path_factory.mktemp("export") / "run"
    return write_run(str(run), build_model("stcnn", spec, 3, filters=4), spec, ["a", "b", "c"]), spec


def test_two_exports_at_once_get_two_versions_and_both_load(tiny_run, tmp_path):
    import tensorflow as tf

    run, spec = tiny_run
    root = tmp_path / "saved_models"
    procs = [stp("export", run, "--name", "m", "--out", root) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert sorted(os.listdir(root / "m")) == [outputs.LOCK_NAME, "1", "2"]
    x = np.random.default_rng(0).integers(0, 256, (2, *spec.shape), dtype=np.uint8)
    got = []
    for version in ("1", "2"):
        info = json.loads((root / "m" / version / "assets.extra" / "stpkeras_export.json").read_text())
        assert info["version"] == int(version)
        loaded = tf.saved_model.load(str(root / "m" / version))
        got.append(loaded.signatures["serving_default"](patches=tf.constant(x))["logits"].numpy())
    np.testing.assert_allclose(got[0], got[1], atol=1e-6)


def test_export_never_renames_over_a_version_claimed_meanwhile(tiny_run, tmp_path, monkeypatch):
    """rename(2) silently replaces an empty folder: a version that appears during the build is skipped."""
    from stpkeras import export

    run, _ = tiny_run
    root = tmp_path / "saved_models"
    real = export.write_warmup

    def claim_meanwhile(target, records):
        (root / "m" / "1").mkdir()  # another writer's version folder, still empty
        return real(target, records)

    monkeypatch.setattr(export, "write_warmup", claim_meanwhile)
    result = export.export_for_serving(run, str(root), "m")
    assert result.version == 2 and result.path == str(root / "m" / "2")
    assert os.listdir(root / "m" / "1") == [] and (root / "m" / "2" / "saved_model.pb").is_file()
