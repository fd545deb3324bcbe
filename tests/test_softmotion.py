"""Tests of `softmotion` (stpkeras/models/softmotion.py): the soft-argmax head reads a known sub-pixel shift of a
real frame without training, in the model's pixels (no gain to learn); rotation and zoom from the quadrants; the
model round-trips through a .keras file and refuses an output count that is not 4 per pair."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

from stpkeras.models import build_model
from stpkeras.models.softmotion import GlobalCorrelation, SoftArgmax
from tfrecords_tools.spec import PatchSpec
from videos import decode_all

VIDEOS = "/work/shared/data/videos"
SIZE = 64
FINE = 4   # the frame is shifted by whole pixels at FINE times the model's size, then averaged down: exact sub-pixels


def _fine_frame(name: str = "bikes.mp4") -> np.ndarray:
    """A real textured frame at FINE x 90 x FINE x 160 (float32 RGB)."""
    path = os.path.join(VIDEOS, name)
    if not os.path.exists(path):
        pytest.skip(f"{path}: the sample videos are not here")
    frames, _ = decode_all(path, size=(90 * FINE, 160 * FINE))
    return frames[20].astype(np.float32)


def _moving(frame: np.ndarray, step, frames: int = 4) -> np.ndarray:
    """uint8 `[frames, SIZE, SIZE, 3]`: a window over `frame` whose content moves by `step` = (dx, dy) model
    pixels a frame (multiples of 1/FINE), by whole-pixel crops at the fine size averaged down FINE x FINE."""
    sx, sy = int(round(step[0] * FINE)), int(round(step[1] * FINE))
    assert (sx / FINE, sy / FINE) == tuple(step)
    side = SIZE * FINE
    out = []
    for t in range(frames):
        top, left = 52 - t * sy, 192 - t * sx   # scene point q shows at q - top: it moves by +sy a frame
        crop = frame[top:top + side, left:left + side]
        out.append(crop.reshape(SIZE, FINE, SIZE, FINE, 3).mean(axis=(1, 3)))
    return np.round(np.stack(out)).astype(np.uint8)


def _head(radius: int = 12) -> keras.Model:
    """The head alone on grey pixels: GlobalCorrelation -> SoftArgmax, no learned features."""
    inputs = keras.Input((None, SIZE, SIZE, 1))
    costs = GlobalCorrelation(radius)(inputs)
    return keras.Model(inputs, SoftArgmax(SIZE, SIZE)(costs))


STEPS = [(1.5, -0.75), (0.25, 2.5), (-4.25, 0.5), (3.75, -3.25)]


def test_the_head_reads_a_known_sub_pixel_shift_of_a_real_frame():
    """Without training: dx, dy of every pair within 0.12 model px of the truth (pixel-locking would read 1.5 as
    1 or 2), and one fit over all the shifts has a gain within 2% of 1 (the model's pixels by construction)."""
    frame = _fine_frame()
    head = _head()
    estimates, truths = [], []
    for step in STEPS:
        grey = _moving(frame, step).astype(np.float32).mean(-1, keepdims=True)
        out = np.asarray(head(grey[None]))[0]          # [3 pairs, 4]
        np.testing.assert_allclose(out[:, :2], np.tile(step, (3, 1)), atol=0.12, err_msg=f"step {step}")
        estimates.append(out[:, :2].ravel())
        truths.append(np.tile(step, 3))
    gain = np.polyfit(np.concatenate(truths), np.concatenate(estimates), 1)[0]
    assert abs(gain - 1.0) < 0.02, gain


def test_an_untrained_softmotion_is_already_in_model_pixels():
    """The whole model, learned features at their seeded initial values: the same shifts within 0.2 px and a
    gain within 3% of 1 (motionnet's gain on unseen footage was about 0.6 after training)."""
    keras.utils.set_random_seed(0)
    model = build_model("softmotion", PatchSpec(4, SIZE, SIZE), 12)
    frame = _fine_frame()
    out = np.asarray(model(np.stack([_moving(frame, s) for s in STEPS]))).reshape(len(STEPS), 3, 4)
    truth = np.repeat(np.array(STEPS, np.float32)[:, None], 3, axis=1)
    np.testing.assert_allclose(out[..., :2], truth, atol=0.2)
    gain = np.polyfit(truth.ravel(), out[..., :2].ravel(), 1)[0]
    assert abs(gain - 1.0) < 0.03, gain


def test_softmotion_round_trips_and_refuses_a_count_that_is_not_four_per_pair(tmp_path):
    keras.utils.set_random_seed(1)
    spec = PatchSpec(4, 32, 48)
    model = build_model("softmotion", spec, 12, features=4, radius=6)
    windows = np.random.default_rng(0).integers(0, 256, (2, *spec.shape), dtype=np.uint8)
    path = str(tmp_path / "m.keras")
    model.save(path)
    again = keras.saving.load_model(path)
    np.testing.assert_allclose(np.asarray(again(windows)), np.asarray(model(windows)), atol=1e-5)
    assert again.get_layer("correlation").get_config()["radius"] == 6
    with pytest.raises(ValueError, match="4 values per pair|12 values. Received num_classes=8"):
        build_model("softmotion", spec, 8)
    with pytest.raises(ValueError, match="less than the size of a quarter"):
        build_model("softmotion", spec, 12, radius=20)
