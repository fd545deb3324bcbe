"""Tests of `softmotion` (stpkeras/models/softmotion.py): the soft-argmax head reads a known sub-pixel shift of a
real frame without training, in the model's pixels (no gain to learn); rotation and zoom from the quadrants; a
foreground that moves on its own is outvoted by the background's blocks; the model round-trips through a .keras
file and refuses an output count that is not 4 per pair."""

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


def _fine_frame(name: str = "bikes.mp4", rows: int = 90, cols: int = 160) -> np.ndarray:
    """A real textured frame at FINE x rows x FINE x cols (float32 RGB)."""
    path = os.path.join(VIDEOS, name)
    if not os.path.exists(path):
        pytest.skip(f"{path}: the sample videos are not here")
    frames, _ = decode_all(path, size=(rows * FINE, cols * FINE))
    return frames[20].astype(np.float32)


def _moving(frame: np.ndarray, step, frames: int = 4, size: int = SIZE) -> np.ndarray:
    """uint8 `[frames, size, size, 3]`: a window over `frame` whose content moves by `step` = (dx, dy) model
    pixels a frame (multiples of 1/FINE), by whole-pixel crops at the fine size averaged down FINE x FINE."""
    sx, sy = int(round(step[0] * FINE)), int(round(step[1] * FINE))
    assert (sx / FINE, sy / FINE) == tuple(step)
    side = size * FINE
    out = []
    for t in range(frames):
        top, left = 52 - t * sy, 192 - t * sx   # scene point q shows at q - top: it moves by +sy a frame
        crop = frame[top:top + side, left:left + side]
        out.append(crop.reshape(size, FINE, size, FINE, 3).mean(axis=(1, 3)))
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
    with pytest.raises(ValueError, match=r"less than the size of a block of the 4x4 grid \(8x12 pixels\)"):
        build_model("softmotion", spec, 12, grid=4, radius=8)
    with pytest.raises(ValueError, match="Expected one of"):
        build_model("softmotion", spec, 12, fit="mean")


def test_a_foreground_moving_on_its_own_is_outvoted_by_the_background():
    """A textured object over a quarter of a 96x96 window moves its own way (as an animated character does over
    the background): the default at 96x96 (each block of a 4x4 grid read alone, a vote, a robust fit) reads the
    background's shift; the whole frame's correlation (`fit="whole"`, the earlier default) is pulled towards the
    object's motion. Untrained: the fit, not learned features, is what is tested."""
    size, step = 96, (2.0, -1.0)
    background = _moving(_fine_frame("tree.avi", 120, 200), step, size=size)
    thing = _moving(_fine_frame("bikes.mp4", 120, 200)[::-1], (-3.0, 2.0), size=size)   # its own texture and motion
    windows = background.copy()
    windows[:, 12:60, 6:54] = thing[:, 12:60, 6:54]                 # 48 x 48 of 96 x 96 pixels: a quarter
    keras.utils.set_random_seed(0)
    robust = build_model("softmotion", PatchSpec(4, size, size), 12)
    assert robust.get_layer("soft_argmax").get_config()["fit"] == "robust"
    whole = build_model("softmotion", PatchSpec(4, size, size), 12, grid=2, fit="whole")
    robust_xy = np.asarray(robust(windows[None])).reshape(3, 4)[:, :2]
    whole_xy = np.asarray(whole(windows[None])).reshape(3, 4)[:, :2]
    np.testing.assert_allclose(robust_xy, np.tile(step, (3, 1)), atol=0.15)
    assert np.abs(whole_xy - step).max() > 0.5, whole_xy       # the case the fit is for: the whole frame is pulled


def test_a_trained_softmotion_reads_a_larger_window_with_the_same_weights():
    """`at_size` (`stp stabilize --motion-size`): the same learned weights in a model for 128x128 windows, its
    search radius grown with its blocks; it reads a known shift of a real frame in its own pixels. A model of
    another family is refused with the reason."""
    from stpkeras.models.softmotion import at_size

    keras.utils.set_random_seed(0)
    trained = build_model("softmotion", PatchSpec(4, 96, 96), 12)
    larger = at_size(trained, PatchSpec(4, 128, 128))
    assert larger.input_shape[1:4] == (4, 128, 128)
    for a, b in zip(trained.get_weights(), larger.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert larger.get_layer("correlation").get_config()["radius"] == 16          # half a 32-px block
    assert larger.get_layer("soft_argmax").get_config()["fit"] == "robust"
    step = (2.5, -1.25)
    windows = _moving(_fine_frame("tree.avi", 150, 220), step, size=128)
    out = np.asarray(larger(windows[None])).reshape(3, 4)
    np.testing.assert_allclose(out[:, :2], np.tile(step, (3, 1)), atol=0.15)
    with pytest.raises(ValueError, match="Expected a softmotion model"):
        at_size(build_model("stcnn", PatchSpec(4, 32, 32), 12), PatchSpec(4, 64, 64))
