"""Tests of stabilization: the synthetic shake and its target, path smoothing + warp with the true motion as the
"model" (a known shake is removed to a small residual, checked against the known path), a tiny `--task stabilize`
model whose estimates follow the truth, a still video that stays still, odd frame sizes and lengths, a video
shorter than a window, outputs never over the input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from converted import write_converted
from stpkeras import shake
from stpkeras.camera_paths import windowed_path
from stpkeras.stabilize import (CameraMotion, StabilizeError, camera_path, crop_zoom, load_motion_model, phase_shift,
                                render, smooth, stabilize_video)
from tfrecords_tools.outputs import OutputIsInputError
from videos import assert_planes_written_back, decode_all, write_video, write_yuv_window

VIDEOS = "/work/shared/data/videos"
EPOCHS = 10


def _real_frames(name: str, count: int, height: int, width: int) -> np.ndarray:
    """The first `count` frames of a sample video, scaled to `height` x `width`."""
    path = os.path.join(VIDEOS, name)
    if not os.path.exists(path):
        pytest.skip(f"{path}: the sample videos are not here")
    frames, _ = decode_all(path, size=(height, width))
    return frames[:count]


def _shaken(stable: np.ndarray, seed: int, limits=shake.ShakeLimits(shift=1.0, degrees=1.0, zoom_percent=0.0)):
    """`stable` frames through a seeded camera path at full frame size: (uint8 frames, true motions [N-1, 4]
    in frame pixels and radians)."""
    n, h, w = stable.shape[:3]
    path = shake.random_path(tf.constant([seed, 1], tf.int64), n, h, w, limits)
    # Every frame with its own stable frame: shake_patch warps a [T, H, W, 3] stack frame by frame.
    frames = shake.shake_patch(tf.constant(stable), path).numpy()
    rel = shake.relative_motion(path, w).numpy()
    units = shake.motion_units(w)
    return frames, np.concatenate([rel[:, :2], rel[:, 2:] / units], axis=1).astype(np.float32)


def _jitter(frames: np.ndarray) -> np.ndarray:
    """Frame-to-frame translation [N-1, 2] measured by phase correlation on the central half."""
    h, w = frames.shape[1:3]
    centre = frames[:, h // 4:h - h // 4, w // 4:w - w // 4]
    return np.array([phase_shift(a, b) for a, b in zip(centre[:-1], centre[1:])])


def test_shake_targets_are_the_motion_between_the_shaken_frames():
    """Warping shaken frame t by its target motion gives frame t+1 (to interpolation level), eagerly and in
    `Dataset.map`; a zero limit draws no shake at all."""
    stable = np.repeat(_real_frames("bigbuckbunny.mp4", 1, 64, 114)[:, :, 25:89], 6, axis=0)
    element = lambda seed: (lambda p: (shake.shake_patch(tf.constant(stable), p), shake.relative_motion(p, 64)))(  # noqa: E731
        shake.random_path(seed, 6, 64, 64))
    frames, rel = element(tf.constant([3, 4], tf.int64))
    mapped = tf.data.Dataset.from_tensors(tf.constant([3, 4], tf.int64)).map(element).get_single_element()
    np.testing.assert_array_equal(frames.numpy(), mapped[0].numpy())
    frames, rel = frames.numpy().astype(np.float32), rel.numpy()
    units = shake.motion_units(64)
    inner = slice(10, 54)
    errors, unwarped = [], []
    for t in range(5):
        dx, dy, r, s = rel[t]
        a, _ = shake.similarity(np.array([-r / units]), np.array([-s / units]), np.zeros(1), np.zeros(1))
        b = -np.einsum("nij,j->ni", a, np.array([dx, dy]))
        back = shake.warp(tf.constant(frames[t:t + 1]), shake.projective_transforms(a, b, 64, 64)).numpy()[0]
        errors.append(np.abs(back - frames[t + 1])[inner, inner].mean())
        unwarped.append(np.abs(frames[t] - frames[t + 1])[inner, inner].mean())
    # Two bilinear resamplings blur a little: about 1-1.5 grey levels, against 2-12 without the warp.
    assert max(errors) < 2.0 and sum(errors) < 0.4 * sum(unwarped), (errors, unwarped)
    still = shake.random_path(tf.constant([1, 2], tf.int64), 6, 64, 64, shake.ShakeLimits(0.0, 0.0, 0.0))
    assert float(tf.reduce_max(tf.abs(still))) == 0.0


def test_smoothing_keeps_a_steady_pan():
    """A constant drift (a pan) is kept exactly, also at the ends; tremor is removed."""
    pan = np.tile([[1.5, -0.5, 0.001, 0.0]], (59, 1))
    path = camera_path(pan)
    np.testing.assert_allclose(smooth(path, 25.0, 1.0), path, atol=1e-9)
    tremor = pan + np.sin(np.arange(59) * 2.1)[:, None] * [2, 2, 0, 0]
    residual = smooth(camera_path(tremor), 25.0, 1.0) - camera_path(pan)
    assert np.abs(residual).max() < 1.0


def test_true_motion_removes_a_known_shake_on_odd_sizes(tmp_path):
    """A still real frame (161x91, 37 frames) shaken by a known path, stabilized with the true motion: the
    output's frame-to-frame jitter is a small part of the input's, checked against the known path."""
    stable = np.repeat(_real_frames("bigbuckbunny.mp4", 1, 91, 161), 37, axis=0)
    frames, motions = _shaken(stable, seed=7)
    video = write_video(str(tmp_path / "shaky.mp4"), frames, lossless=True)
    out, side = str(tmp_path / "steady.mp4"), str(tmp_path / "side.mp4")
    result = render(video, out, CameraMotion(motions, 25.0, 91, 161), smoothing=1.0, side_by_side=side)
    output, _ = decode_all(out)
    assert output.shape == (37, 91, 161, 3) and decode_all(side)[0].shape == (37, 91, 322, 3)
    measured_in = _jitter(frames)
    np.testing.assert_allclose(measured_in, motions[:, :2], atol=0.6)  # the estimator agrees with the known path
    jitter_in = np.sqrt(np.mean(measured_in ** 2))
    jitter_out = np.sqrt(np.mean(_jitter(output) ** 2))
    assert jitter_in > 1.0 and jitter_out < 0.25 * jitter_in, (jitter_in, jitter_out)
    assert 1.0 < result.zoom < 1.5 and result.output["cropping"] == pytest.approx(1 / result.zoom, rel=0.02)
    assert result.output["distortion"] == pytest.approx(1.0)
    assert result.output["stability"] > result.input["stability"]


def _benchmark_path(frames=60, height=180, width=320):
    """The true motion of the benchmark's shake (benchmarks/stabilize.py, seed 1): `[frames - 1, 4]`."""
    path = shake.random_path(tf.constant([1, 5], tf.int64), frames, height, width,
                             shake.ShakeLimits(shift=1.0, degrees=1.0, zoom_percent=0.0))
    rel = shake.relative_motion(path, width).numpy()
    return np.concatenate([rel[:, :2], rel[:, 2:] / shake.motion_units(width)], 1)


def test_windowed_path_keeps_its_crop_and_is_steadier_than_a_gaussian_of_that_crop():
    """At a cropping ratio of 0.85 the windowed path needs no more zoom than 1/0.85. At the zoom that a short
    Gaussian needs (0.1 s and 0.2 s), its frame-to-frame motion (what is left of the shake, in output pixels)
    is a fraction of the Gaussian's (measured: 0.14 against 0.75 px, 0.03 against 0.31)."""
    trajectory = camera_path(_benchmark_path())
    anchor = smooth(trajectory, 25.0, 1.0)
    steady = windowed_path(trajectory, anchor, 180, 320, 1 / 0.85)
    assert crop_zoom(steady - trajectory, 180, 320) <= 1 / 0.85 + 1e-6

    def residual(path):
        return float(np.sqrt(np.mean(np.diff(path[:, :2], axis=0) ** 2)) * crop_zoom(path - trajectory, 180, 320))

    for sigma in (0.1, 0.2):
        gaussian = smooth(trajectory, 25.0, sigma)
        zoom = crop_zoom(gaussian - trajectory, 180, 320)
        steady = windowed_path(trajectory, anchor, 180, 320, zoom)
        assert crop_zoom(steady - trajectory, 180, 320) <= zoom + 1e-6
        assert residual(steady) < 0.25 * residual(gaussian), (sigma, residual(steady), residual(gaussian))


def test_windowed_path_keeps_a_pan_and_a_full_crop_leaves_the_frames_alone():
    """A steady pan with a tremor on it: the path keeps the pan's speed (the Gaussian anchor's) and loses the
    tremor; at a cropping ratio of 1 nothing can move."""
    t = np.arange(80.0)
    motions = np.zeros((79, 4))
    motions[:, 0] = 1.5 + 3.0 * np.cos(2 * np.pi * 0.2 * t[1:])      # a pan right, 1.5 px a frame, and tremor
    motions[:, 2] = 0.002 * np.cos(2 * np.pi * 0.13 * t[1:])
    trajectory = camera_path(motions)
    steady = windowed_path(trajectory, smooth(trajectory, 25.0, 1.0), 120, 200, 1.25)
    speed = np.diff(steady[:, 0])
    assert np.abs(speed - 1.5).max() < 0.05 and np.abs(np.diff(steady[:, 1])).max() < 1e-6, speed
    assert crop_zoom(steady - trajectory, 120, 200) <= 1.25 + 1e-6
    np.testing.assert_allclose(windowed_path(trajectory, smooth(trajectory, 25.0, 1.0), 120, 200, 1.0), trajectory,
                               atol=1e-6)


def test_windowed_path_refuses_a_crop_with_no_room_for_the_zoom_correction():
    """A zoom shake (log-scale) is corrected as the Gaussian path says; at a cropping ratio of 1 the frames it
    shrinks would show borders, so no path fits: one error naming the zoom needed."""
    from stpkeras.camera_paths import PathError

    motions = np.zeros((39, 4))
    motions[:, 3] = 0.01 * np.sin(np.arange(39) * 0.9)
    trajectory = camera_path(motions)
    with pytest.raises(PathError, match=r"no camera path fits a crop window of zoom 1\.000.*at least 1\.0"):
        windowed_path(trajectory, smooth(trajectory, 25.0, 1.0), 90, 160, 1.0)
    assert crop_zoom(windowed_path(trajectory, smooth(trajectory, 25.0, 1.0), 90, 160, 1.05) - trajectory,
                     90, 160) <= 1.05 + 1e-6


def test_true_motion_with_a_cropping_ratio_keeps_it_on_a_real_shaken_clip(tmp_path):
    """`--crop 0.85` on Big Buck Bunny (60 frames) shaken by the benchmark's path: the zoom is at most 1/0.85 and
    the residual jitter against the clean clip's own motion is below vid.stab's defaults on the benchmark (0.344
    px at a cropping of 0.844; measured here 0.31 px at 0.85)."""
    clean = _real_frames("bigbuckbunny.mp4", 60, 180, 320)
    path = shake.random_path(tf.constant([1, 5], tf.int64), 60, 180, 320,
                             shake.ShakeLimits(shift=1.0, degrees=1.0, zoom_percent=0.0))
    shaken = shake.shake_patch(tf.constant(clean), path).numpy()
    clean_zoomed = shake.shake_patch(tf.constant(clean), tf.zeros_like(path)).numpy()
    video = write_video(str(tmp_path / "shaky.mp4"), shaken)
    result = render(video, str(tmp_path / "out.mp4"), CameraMotion(_benchmark_path(), 25.0, 180, 320), crop=0.85)
    assert result.zoom <= 1 / 0.85 + 1e-6 and result.output["cropping"] >= 0.85 - 1e-6, result.zoom
    assert result.crop == "0.85"

    def shifts(frames):   # the benchmark's measure: phase correlation on the central 3/4
        inner = frames[:, 22:158, 40:280]
        return np.array([phase_shift(a, b) for a, b in zip(inner[:-1], inner[1:])])

    error = shifts(decode_all(str(tmp_path / "out.mp4"))[0]) - shifts(clean_zoomed)
    jitter = float(np.sqrt(np.mean(error ** 2)))
    assert jitter < 0.34, jitter


def test_cli_crop_takes_a_ratio_and_refuses_others_before_any_work(tmp_path):
    from stpkeras.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "in.mp4").write_bytes(b"")
    for crop in ("1.7", "0.5", "most"):
        result = CliRunner().invoke(main, ["stabilize", str(tmp_path / "run"), str(tmp_path / "in.mp4"), "--out",
                                           str(tmp_path / "o.mp4"), "--crop", crop])
        assert result.exit_code == 2 and "cropping ratio in [0.667, 1]" in result.output and crop in result.output, \
            result.output
    assert not os.path.exists(tmp_path / "o.mp4")


def test_the_cost_volume_peaks_at_the_displacement_and_motionnet_round_trips(tmp_path):
    """`Correlation`: frame t+1 = frame t moved by (dx, dy) = (2, -1) matches best at that displacement;
    motionnet outputs 4 values per pair, reloads from .keras unchanged, and refuses a count that is not per pair."""
    import keras

    from stpkeras.models import build_model
    from stpkeras.models.motion import Correlation
    from tfrecords_tools.spec import PatchSpec

    frame = np.random.default_rng(0).normal(size=(16, 16, 3)).astype(np.float32)
    pair = np.stack([frame, np.roll(frame, (-1, 2), axis=(0, 1))])[None]
    costs = np.asarray(Correlation(3)(pair))[0, 0, 4:12, 4:12].mean(axis=(0, 1))
    assert costs.shape == (49,) and np.argmax(costs) == (-1 + 3) * 7 + (2 + 3)
    spec = PatchSpec(4, 16, 16)
    model = build_model("motionnet", spec, 12, widths=(4, 8), dense=8, radius=1)
    x = np.random.default_rng(1).integers(0, 256, (2, *spec.shape), dtype=np.uint8)
    y = np.asarray(model(x))
    model.save(str(tmp_path / "m.keras"))
    np.testing.assert_allclose(np.asarray(keras.models.load_model(str(tmp_path / "m.keras"))(x)), y, rtol=1e-5,
                               atol=1e-6)
    assert y.shape == (2, 12)
    with pytest.raises(ValueError, match="multiple of 3"):
        build_model("motionnet", spec, 10)


FRAMES, SIZE = 4, 16   # the tiny motion model's patches: 4 frames (3 pairs) of 16x16


@pytest.fixture(scope="module")
def motion_run(tmp_path_factory):
    """A tiny motionnet trained on camera footage (bikes.mp4 frames, 4x16x16 patches, shift up to the whole
    margin): 200 steps."""
    from stpkeras.train import TrainConfig, train

    frames = _real_frames("bikes.mp4", 250, SIZE, 38)
    items = [(frames[t:t + FRAMES, :, x:x + SIZE], 0, f"v{t}") for t in range(0, 246, 2) for x in (0, 11, 22)]
    root = tmp_path_factory.mktemp("stab")
    write_converted(str(root / "data"), {"train": items[:-24], "val": items[-24:]}, ["scene"])
    config = TrainConfig.tiny(str(root / "data"), str(root / "run"), task="stabilize", model="motionnet",
                              epochs=EPOCHS, batch_size=16, lr=2e-3, task_options=(("shift", 1.0),),
                              model_options=(("widths", [8, 16]), ("dense", 32), ("radius", 2)))
    record = train(config, echo=lambda s: None)
    return str(root / "run"), record


def test_a_tiny_trained_model_follows_the_true_motion(motion_run):
    """Trained on camera footage, the model measures the shake of footage of another kind (the animation)."""
    run, record = motion_run
    assert record["task"] == "stabilize" and record["status"] == "done"
    model = load_motion_model(run)
    assert model.spec.frames == FRAMES
    stable = _real_frames("bigbuckbunny.mp4", FRAMES, SIZE, 28)[:, :, 6:6 + SIZE]
    xs, ys = [], []
    limits = shake.ShakeLimits(shift=1.0)
    for seed in range(32):
        path = shake.random_path(tf.constant([seed, 99], tf.int64), FRAMES, SIZE, SIZE, limits)
        xs.append(shake.shake_patch(tf.constant(stable), path).numpy())
        ys.append(shake.relative_motion(path, SIZE).numpy())
    pred, truth = model(np.stack(xs)), np.stack(ys)
    # dx, dy: the estimate follows the truth (measured: r = 0.91 for dx after 10 epochs; the stcnn head of
    # before scored -0.08) and errs less than no estimate at all (zero motion; measured 0.25 against 0.31 px:
    # on the animation the estimates come out too small, see docs/stabilization.md).
    for k in (0, 1):
        r = np.corrcoef(pred[..., k].ravel(), truth[..., k].ravel())[0, 1]
        error, still = np.abs(pred[..., k] - truth[..., k]).mean(), np.abs(truth[..., k]).mean()
        assert r > 0.75 and error < 0.9 * still, (k, r, error, still)


def test_a_still_video_stays_still_and_outputs_never_overwrite_the_input(motion_run, tmp_path):
    """With no motion estimated (the true motion of a still video), the output is the input: no drift, no zoom;
    and the trained model's run refuses to write over its input before any work."""
    run, _ = motion_run
    still = np.repeat(_real_frames("bikes.mp4", 1, 70, 165), 21, axis=0)  # odd length and width
    video = write_video(str(tmp_path / "still.mp4"), still, lossless=True)
    with pytest.raises(OutputIsInputError):
        stabilize_video(load_motion_model(run), video, video)
    with pytest.raises(OutputIsInputError):
        render(video, str(tmp_path / "o.mp4"), CameraMotion(np.zeros((20, 4), np.float32), 25.0, 70, 165),
               side_by_side=video)
    result = render(video, str(tmp_path / "out.mp4"), CameraMotion(np.zeros((20, 4), np.float32), 25.0, 70, 165))
    output, _ = decode_all(str(tmp_path / "out.mp4"))
    assert output.shape == still.shape and result.zoom == 1.0
    # Only the codec's loss is left (crf 18: 1.25 grey levels, measured).
    assert np.abs(output.astype(int) - decode_all(video)[0].astype(int)).mean() < 2.0
    assert np.sqrt(np.mean(_jitter(output) ** 2)) < 0.05


def test_the_rendering_pass_writes_an_unchanged_pixel_back_as_it_was(tmp_path):
    """With no motion, the rendering pass gives back a real YUV video's own luma and chroma: it reads with the
    exact YUV -> RGB conversion (`video.REWRITE_COLOUR`) that the encoder's formula inverts; read the fast way,
    every pixel of bikes.mp4 came out about 1.2 grey levels darker (as in `stp enhance`'s test)."""
    rows, cols = 64, 96
    video = write_yuv_window(str(tmp_path / "bikes_yuv.mp4"), os.path.join(VIDEOS, "bikes.mp4"), 12, rows, cols)
    result = render(video, str(tmp_path / "out.mp4"), CameraMotion(np.zeros((11, 4), np.float32), 25.0, rows, cols),
                    crf=0)
    assert result.zoom == 1.0
    assert_planes_written_back(video, str(tmp_path / "out.mp4"), 12, rows)


def test_a_video_shorter_than_a_window_is_one_error_line(motion_run, tmp_path):
    from stpkeras.cli import main

    run, _ = motion_run
    video = write_video(str(tmp_path / "short.mp4"), np.repeat(_real_frames("bikes.mp4", 1, 48, 64), 3, axis=0))
    result = CliRunner().invoke(main, ["stabilize", run, video, "--out", str(tmp_path / "o.mp4")])
    assert result.exit_code == 2, result.output
    assert "3 frame(s)" in result.output and f"at least {FRAMES}" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "o.mp4")
    with pytest.raises(StabilizeError):
        stabilize_video(load_motion_model(run), video, str(tmp_path / "o.mp4"))
    # --motion-size is for softmotion (it reads any window size); this run's motionnet is refused in one line.
    result = CliRunner().invoke(main, ["stabilize", run, video, "--out", str(tmp_path / "o.mp4"),
                                       "--motion-size", "96"])
    assert result.exit_code == 2 and "cannot read windows of 96x96" in result.output, result.output
    assert "Expected a softmotion model" in result.output and len(result.output.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "o.mp4")


def test_cli_json_reports_the_three_measures(motion_run, tmp_path):
    from stpkeras.cli import main

    run, _ = motion_run
    stable = np.repeat(_real_frames("bigbuckbunny.mp4", 1, 48, 86), 30, axis=0)
    video = write_video(str(tmp_path / "shaky.mp4"), _shaken(stable, seed=3)[0])
    result = CliRunner().invoke(main, ["stabilize", run, video, "--out", str(tmp_path / "o.mp4"), "--json",
                                       "--crop", "none"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    for side in ("input", "output"):
        assert {"cropping", "distortion", "stability"} <= set(report[side])
    assert report["zoom"] == 1.0 and report["output"]["cropping"] == pytest.approx(1.0, abs=0.02)


def test_export_refuses_a_motion_model_with_the_reason(motion_run, tmp_path):
    """A motion model runs over whole videos, not patch by patch: `stp export` says so in one line and writes
    nothing."""
    from stpkeras.cli import main

    run, _ = motion_run
    result = CliRunner().invoke(main, ["export", run, "--name", "stab", "--out", str(tmp_path / "saved")])
    assert result.exit_code != 0 and "task stabilize" in result.output and "stp stabilize" in result.output, \
        result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not os.listdir(tmp_path / "saved") if os.path.exists(tmp_path / "saved") else True


def test_train_shake_option_is_checked_before_any_work(tmp_path):
    """`stp train --shake SHIFT,DEGREES,ZOOM`: stabilize's alone, three numbers, each within its range."""
    from stpkeras.cli import main

    def train(*args):
        return CliRunner().invoke(main, ["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *args])

    for args, expected in ((("--task", "classify", "--shake", "1,1,1"), "--shake is an option of --task stabilize"),
                           (("--task", "stabilize", "--shake", "1,2"), "three numbers"),
                           (("--task", "stabilize", "--shake", "2,1,1"), "shift")):
        result = train(*args)
        assert result.exit_code == 2 and expected in result.output, (args, result.output)
    assert not os.path.exists(tmp_path / "run")
