"""Predict: real encoded videos, decoded and cut by the converter's code, classified end to end."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

import stpkeras
from stpkeras import export as ex
from stpkeras import predict as pr
from stpkeras.cli import main
from tfrecords_tools.spec import PatchSpec

SPEC = PatchSpec(frames=8, height=32, width=32, stride_frames=4, pad="edge")
LABELS = ("down", "left", "right", "up")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from stpkeras.demo import make_videos
    from stpkeras.models import build_model
    from stpkeras.testing.models import write_run

    root = tmp_path_factory.mktemp("predict")
    videos = make_videos(str(root / "videos"), per_class=1, frames=20, height=48, width=64)
    paths = sorted(os.path.join(videos, c, f"{c}_000.mp4") for c in LABELS)
    model = build_model("stcnn", SPEC, len(LABELS))
    run_dir = write_run(str(root / "run"), model, SPEC, LABELS, "stcnn")
    result = ex.export_for_serving(run_dir, str(root / "saved_models"), "clf")
    return model, run_dir, result, paths, root


def expected_for(model, path):
    """The reference: every patch the converter's code cuts, through the Keras model at once."""
    from tfrecords_tools.patches import Patch
    from tfrecords_tools.video import video_patches

    patches = [p.pixels for p in video_patches(path, SPEC) if isinstance(p, Patch)]
    logits = np.asarray(model(np.stack(patches), training=False))
    return logits.mean(axis=0), len(patches)


@pytest.mark.parametrize("batch_size", [3, 64])
def test_predict_video_averages_logits_of_all_patches(setup, batch_size):
    model, _, result, paths, _ = setup
    predictor = stpkeras.load(result.path)
    for path in paths[:2]:
        mean, count = expected_for(model, path)
        # 20 frames, time starts 0,4,...,12 with edge padding -> 4; 48x64 -> 2x2: 16 patches.
        assert count == 16
        got = pr.predict_video(predictor, path, batch_size=batch_size, top_k=3)
        assert got.patches == count
        np.testing.assert_allclose(got.mean_logits, mean, atol=1e-5, rtol=0)
        probs = np.exp(mean - mean.max()) / np.exp(mean - mean.max()).sum()
        assert got.label == LABELS[int(mean.argmax())]
        assert got.score == pytest.approx(float(probs.max()), abs=1e-5)
        assert [label for label, _ in got.top_k] == [LABELS[i] for i in np.argsort(-probs)[:3]]
        assert got.decode_s > 0 and got.model_s > 0


def test_batches_never_exceed_batch_size(setup):
    _, _, result, paths, _ = setup
    inner = stpkeras.load(result.path)
    sizes = []

    class Counting(pr.Predictor):
        labels, spec, source = inner.labels, inner.spec, "counting"

        def _run(self, patches):
            sizes.append(len(patches))
            return inner(patches)

    got = pr.predict_video(Counting(), paths[0], batch_size=5)
    assert sizes == [5, 5, 5, 1] and got.patches == 16


def test_load_every_format_gives_the_same_outputs(setup):
    model, run_dir, result, _, _ = setup
    x = np.random.default_rng(3).integers(0, 256, size=(4, *SPEC.shape), dtype=np.uint8)
    reference = np.asarray(model(x, training=False))
    for path in (result.path, os.path.dirname(result.path), os.path.join(run_dir, "best.keras"), run_dir):
        predictor = stpkeras.load(path)
        assert predictor.labels == LABELS and predictor.spec == SPEC
        out = predictor(x)
        np.testing.assert_allclose(out[ex.LOGITS], reference, atol=1e-5, rtol=0)
        assert list(out[ex.CLASS_NAMES]) == [LABELS[i] for i in reference.argmax(-1)]
        width = model.get_layer("features").output.shape[-1]
        assert predictor.has_embeddings and predictor.embed(x).shape == (4, width)
    with pytest.raises(ex.ExportError, match="no such SavedModel folder"):
        stpkeras.load(os.path.join(run_dir, "missing"))


def test_cli_predict_json_and_table(setup):
    model, _, result, paths, _ = setup
    model_root = os.path.dirname(result.path)
    r = CliRunner().invoke(main, ["predict", model_root, *paths, "--json", "--top-k", "2", "--batch-size", "7"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.output.splitlines()]
    assert [d["video"] for d in lines] == paths
    for d, path in zip(lines, paths):
        mean, _ = expected_for(model, path)
        assert set(d) == {"video", "label", "score", "top_k", "patches"}
        assert d["label"] == LABELS[int(mean.argmax())] and len(d["top_k"]) == 2
        assert d["top_k"][0] == [d["label"], d["score"]] and d["patches"] == 16
    r = CliRunner().invoke(main, ["predict", model_root, paths[0]])
    assert r.exit_code == 0, r.output
    header, row = r.output.splitlines()
    assert header.split()[:3] == ["video", "label", "score"]
    assert row.startswith(paths[0]) and lines[0]["label"] in row


def test_cli_predict_reports_bad_videos_and_exits_1(setup):
    _, run_dir, result, paths, root = setup
    broken = root / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    from stpkeras.demo import make_videos

    small = make_videos(str(root / "small"), per_class=1, frames=4, height=16, width=16, classes=("up",))
    tiny = os.path.join(small, "up", "up_000.mp4")  # smaller than one patch in every dimension
    r = CliRunner().invoke(main, ["predict", result.path, paths[0], str(broken), tiny, "--json"])
    assert r.exit_code == 1, r.output
    lines = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    assert lines[0]["video"] == paths[0] and "label" in lines[0]
    assert lines[1]["video"] == str(broken) and "FFmpeg could not open it" in lines[1]["error"]
    # The export's spec pads tails (`edge`): the tiny video is one padded patch.
    assert lines[2]["video"] == tiny and lines[2]["patches"] == 1
    # Under `drop` it has none, and says so.
    drop = dataclasses.replace(SPEC, pad="drop")
    predictor = stpkeras.load(os.path.join(run_dir, "best.keras"), labels=LABELS, spec=drop)
    (got,) = pr.predict_videos(predictor, [tiny])
    assert got.label is None and "no patches: the video is smaller than one patch" in got.error


def test_keras_file_without_run_json_needs_labels(setup, tmp_path):
    _, run_dir, _, _, _ = setup
    lone = tmp_path / "lone.keras"
    shutil.copy(os.path.join(run_dir, "best.keras"), lone)
    with pytest.raises(ex.ExportError, match="labels and PatchSpec are unknown"):
        stpkeras.load(str(lone))
    predictor = stpkeras.load(str(lone), labels=LABELS, spec=SPEC)
    assert predictor(np.zeros((1, *SPEC.shape), np.uint8))[ex.LOGITS].shape == (1, 4)


def test_predict_sees_a_portrait_phone_clip_upright(setup, tmp_path):
    """A clip coded landscape with a 90-degree display matrix is predicted as its upright copy is."""
    from videos import DISPLAY_TURNS, decode_all, set_display_matrix, write_video

    model, _, result, paths, _ = setup
    coded, _ = decode_all(paths[0])  # 20 x 48 x 64
    matrix, turn = DISPLAY_TURNS["phone_portrait"]
    phone = set_display_matrix(write_video(str(tmp_path / "phone.mp4"), coded, lossless=True), matrix)
    upright = write_video(str(tmp_path / "upright.mp4"), np.ascontiguousarray(turn(coded)), lossless=True)
    sideways = write_video(str(tmp_path / "sideways.mp4"), coded, lossless=True)
    predictor = stpkeras.load(result.path)
    got = {name: pr.predict_video(predictor, path) for name, path in
           (("phone", phone), ("upright", upright), ("sideways", sideways))}
    np.testing.assert_allclose(got["phone"].mean_logits, got["upright"].mean_logits, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got["phone"].mean_logits, expected_for(model, upright)[0], atol=1e-5, rtol=0)
    assert np.abs(got["phone"].mean_logits - got["sideways"].mean_logits).max() > 1e-3


@pytest.fixture(scope="module")
def stepped_video(tmp_path_factory):
    """12 frames of 32x32 at 25 fps, lossless: frames 0-3 at level 0 (30), 4-7 at 1 (100), 8-11 at 2 (170)."""
    from videos import write_video

    frames = np.concatenate([np.full((4, 32, 32, 3), 30 + 70 * level, np.uint8) for level in range(3)])
    return write_video(str(tmp_path_factory.mktemp("stepped") / "stepped.mp4"), frames, lossless=True)


def _reference_windows(run_dir, path):
    """Per temporal window, the Keras model's outputs over its patches, cut by the converter's code."""
    from tfrecords_tools.patches import Patch
    from tfrecords_tools.video import video_patches

    artifact = stpkeras.artifacts.load(run_dir)
    patches = [p for p in video_patches(path, artifact.spec) if isinstance(p, Patch)]
    out = np.asarray(artifact.model(np.stack([p.pixels for p in patches]), training=False), np.float64)
    windows = sorted({p.index[0] for p in patches})
    return [out[[i for i, p in enumerate(patches) if p.index[0] == t]] for t in windows], out


def test_timeline_of_multi_label_and_regression_models(target_runs, stepped_video, cli):
    """`stp predict --timeline --json`: per window of 4 frames (0.16 s) the mean probabilities or values of its
    4 patches, with its times; the video's answer is the mean over all 12 patches."""
    from targets import CLASSES, VALUE_NAMES

    _, multi, regress = target_runs
    r = cli("predict", regress, stepped_video, "--timeline", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    windows, everything = _reference_windows(regress, stepped_video)
    assert got["patches"] == 12 and len(got["timeline"]) == 3
    times = [t for w in got["timeline"] for t in (w["start"], w["end"])]
    assert times == pytest.approx([0, 0.16, 0.16, 0.32, 0.32, 0.48])
    for w, rows in zip(got["timeline"], windows):
        assert list(w["values"]) == list(VALUE_NAMES)
        np.testing.assert_allclose(list(w["values"].values()), rows.mean(axis=0), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(list(got["values"].values()), everything.mean(axis=0), rtol=1e-4, atol=1e-3)
    brightness = [w["values"]["brightness"] for w in got["timeline"]]
    assert brightness[0] < brightness[1] < brightness[2]   # the steps, in the data's units

    r = cli("predict", multi, stepped_video, "--timeline", "--json", "--threshold", "0.5")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    windows, everything = _reference_windows(multi, stepped_video)
    for w, rows in zip(got["timeline"], windows):
        probs = (1 / (1 + np.exp(-rows))).mean(axis=0)
        assert dict(w["top_k"]) == pytest.approx(dict(zip(CLASSES, probs)), abs=1e-5)
        assert w["labels"] == [CLASSES[i] for i in np.argsort(-probs, kind="stable") if probs[i] >= 0.5]
    assert got["timeline"][0]["labels"] == ["dark"] and "bright" in got["timeline"][2]["labels"]
    # The plain table prints the windows with their times.
    r = cli("predict", multi, stepped_video, "--timeline")
    assert r.exit_code == 0 and "0.16s -     0.32s" in r.output
