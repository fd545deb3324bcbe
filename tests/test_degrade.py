"""Tests of stpkeras.degrade (eagerly and inside Dataset.map), stpkeras.quality against hand-computed
values, and the enhance element of the pipeline (self-supervised and paired records)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from stpkeras import degrade, quality
from tfrecords_tools import schema
from tfrecords_tools.spec import PatchSpec

SHAPE = (4, 24, 24, 3)


def _patch(seed=0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[1], 0:shape[2]]
    base = 128 + 60 * np.sin(yy / 3.0)[..., None] * np.cos(xx / 4.0)[..., None] + rng.normal(0, 5, (*shape[1:3], 3))
    return np.clip(np.repeat(base[None], shape[0], 0), 0, 255).astype(np.uint8)


def _run(fn, patch, seed, mode):
    if mode == "eager":
        out, params = fn(tf.constant(patch), tf.constant(seed, tf.int64))
        return out.numpy(), {k: float(v) for k, v in params.items()}
    ds = tf.data.Dataset.from_tensors((patch, np.array(seed, np.int64))).map(lambda p, s: fn(p, s))
    out, params = next(iter(ds))
    return out.numpy(), {k: float(v) for k, v in params.items()}


# --- parsing ------------------------------------------------------------------------------------

def test_parse_degrade_values_ranges_order_and_errors():
    ds = degrade.parse_degrade(["jpeg:20", "noise:10-40", "blur:1.5"])
    assert [str(d) for d in ds] == ["blur:1.5", "noise:10-40", "jpeg:20"]  # the physical order, not the given one
    assert ds[1] == degrade.Degradation("noise", 10.0, 40.0)
    assert degrade.parse_degrade("none") == () and degrade.parse_degrade(None) == ()
    assert degrade.describe(degrade.parse_degrade("motion:7,flicker:0.1")) == ("motion:7", "flicker:0.1")
    # A kind alone: its default range, drawn per patch (level-blind training).
    assert degrade.parse_degrade("noise") == (degrade.Degradation("noise", 0.0, 50.0),)
    assert degrade.describe(degrade.parse_degrade(["jpeg", "blur"])) == ("blur:0.5-2", "jpeg:10-60")
    for bad, match in (("noise:", "KIND:PARAM"), ("fog", "Expected a kind"), ("fog:3", "Expected a kind"),
                       ("noise:40-10", "LOW <= HIGH"),
                       ("jpeg:0", "within"), ("noise:5,noise:6", "at most once"), ("jpeg:10.5", "integer")):
        with pytest.raises(ValueError, match=match):
            degrade.parse_degrade(bad)


# --- the ops --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["eager", "map"])
@pytest.mark.parametrize("text", ["noise:10-40", "poisson:5-50", "blur:0.5-2", "motion:3-9", "jpeg:10-30",
                                  "flicker:0.05-0.2"])
def test_every_op_is_seeded_uint8_and_draws_within_its_range(text, mode):
    fn = degrade.make_degrade([text])
    d = fn.degradations[0]
    patch = _patch()
    out, params = _run(fn, patch, [1, 2], mode)
    again, params_again = _run(fn, patch, [1, 2], mode)
    other, params_other = _run(fn, patch, [3, 4], mode)
    assert out.dtype == np.uint8 and out.shape == patch.shape
    assert np.array_equal(out, again) and params == params_again          # same seed, same result
    assert not np.array_equal(out, other) and params != params_other      # another seed, another draw
    assert d.low <= params[d.kind] <= d.high
    assert not np.array_equal(out, patch)


def test_gaussian_noise_has_the_drawn_sigma():
    flat = np.full((8, 64, 64, 3), 128, np.uint8)  # far from 0 and 255: no clipping
    out, params = degrade.make_degrade(["noise:10-40"])(flat, tf.constant([5, 6], tf.int64))
    measured = float(np.std(out.numpy().astype(float) - 128))
    # Rounding adds a variance of 1/12.
    assert measured == pytest.approx(math.sqrt(float(params["noise"]) ** 2 + 1 / 12), rel=0.02)


def test_blur_keeps_a_flat_patch_and_smooths_an_edge():
    flat = np.full(SHAPE, 77, np.uint8)
    out, _ = degrade.make_degrade(["blur:2"])(flat, tf.constant([0, 1], tf.int64))
    assert np.all(out.numpy() == 77)  # normalised kernel, mirrored edges: no darkening
    edge = np.zeros(SHAPE, np.uint8)
    edge[:, :, 12:] = 200
    out, _ = degrade.make_degrade(["blur:2"])(edge, tf.constant([0, 1], tf.int64))
    row = out.numpy()[0, 5, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 200 and np.all(np.diff(row) >= 0) and 0 < row[11] < 200


def test_motion_kernel_is_a_normalised_line():
    k = degrade.motion_kernel(tf.constant(5.0), tf.constant(0.0), 7).numpy()
    assert k.sum() == pytest.approx(1.0)
    assert np.allclose(k[3, 1:6], 0.2) and np.allclose(np.delete(k, 3, axis=0), 0)  # horizontal, 5 pixels
    assert degrade.motion_kernel(tf.constant(1.0), tf.constant(0.7), 7).numpy()[3, 3] == pytest.approx(1.0)


def test_flicker_scales_each_frame_by_one_gain():
    flat = np.full(SHAPE, 100, np.uint8)
    out, params = degrade.make_degrade(["flicker:0.2"])(flat, tf.constant([2, 3], tf.int64))
    out = out.numpy().astype(int)
    gains = out[:, 0, 0, 0] / 100.0
    assert all(np.all(out[t] == out[t, 0, 0, 0]) for t in range(SHAPE[0]))  # one gain per frame
    assert np.all(np.abs(gains - 1) <= 0.2 + 0.005) and len(set(gains)) > 1 and params["flicker"] == 0.2


def test_adding_a_degradation_does_not_change_what_the_others_draw():
    patch = _patch()
    seed = tf.constant([9, 9], tf.int64)
    _, alone = degrade.make_degrade(["noise:10-40"])(patch, seed)
    _, chained = degrade.make_degrade(["noise:10-40", "jpeg:20-60"])(patch, seed)
    assert float(alone["noise"]) == float(chained["noise"])


# --- quality ---------------------------------------------------------------------------------------

def test_psnr_and_ssim_against_hand_computed_values():
    a = np.full((2, 4, 16, 16, 3), 100, np.uint8)
    b = np.full_like(a, 110)
    assert quality.psnr(a, b).numpy() == pytest.approx([10 * math.log10(255 ** 2 / 100)] * 2, abs=1e-4)
    # Constant images: the contrast-structure term is 1, SSIM is the luminance term.
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 110 + c1) / (100 ** 2 + 110 ** 2 + c1)
    assert quality.ssim(a, b).numpy() == pytest.approx([expected] * 2, abs=2e-4)
    # One value off by 155 in a frame of 16x16x3 values: MSE = 155^2 / 768.
    c = a.copy()
    c[0, 0, 0, 0, 0] = 255
    frame = quality.psnr(a[0, 0], c[0, 0], axes=3).numpy()
    assert frame == pytest.approx(10 * math.log10(255 ** 2 * 768 / 155 ** 2), abs=1e-4)
    assert quality.psnr(a, a).numpy().tolist() == [quality.MAX_PSNR] * 2
    assert quality.ssim(a, a).numpy() == pytest.approx([1.0, 1.0])
    # Float predictions are clipped and rounded first: what a uint8 output would hold.
    assert quality.psnr(np.full(a.shape, 300.4, np.float32), np.full_like(a, 255)).numpy()[0] == quality.MAX_PSNR


def test_keras_metrics_average_per_patch():
    m = quality.PSNR()
    y = np.full((2, 4, 16, 16, 3), 100, np.uint8)
    pred = y.astype(np.float32)
    pred[0] += 10
    m.update_state(y, pred)
    assert float(m.result()) == pytest.approx((10 * math.log10(255 ** 2 / 100) + quality.MAX_PSNR) / 2, abs=1e-3)


# --- the element -----------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_make_pairs_self_supervised_and_paired(encoding):
    spec = PatchSpec(4, 24, 24)
    clean = _patch(1)
    degraded = _patch(2)
    common = dict(encoding=encoding, video_id="v", video_size=(4, 24, 24), index=(0, 0, 0), offset=(0, 0, 0),
                  valid=(4, 24, 24), timestamp=0.0)
    plain = schema.encode_patch(clean, **common)
    paired = schema.encode_patch(degraded, target=clean, **common)
    assert np.array_equal(schema.parse_patch_numpy(paired)[schema.TARGET], clean)

    element = degrade.make_pairs(encoding, spec, paired=False, degradations=["noise:25"])
    x, y = element(tf.constant(plain), tf.constant([1, 1], tf.int64))
    assert np.array_equal(y.numpy(), clean) and x.dtype == tf.uint8
    assert 15 < float(quality.psnr(x, y)) < 25  # sigma 25: about 20 dB

    element = degrade.make_pairs(encoding, spec, paired=True)
    ds = tf.data.Dataset.from_tensors(paired).map(lambda r: element(r, tf.constant([0, 0], tf.int64)))
    x, y = next(iter(ds))
    assert np.array_equal(x.numpy(), degraded) and np.array_equal(y.numpy(), clean)

    # Augmentation crops input and target alike.
    element = degrade.make_pairs(encoding, spec, paired=True, augment=["crop", "color"])
    x, y = element(tf.constant(paired), tf.constant([4, 2], tf.int64))
    same = degrade.make_pairs(encoding, spec, paired=True, augment=["crop", "color"])
    x2, y2 = same(tf.constant(paired), tf.constant([4, 2], tf.int64))
    assert np.array_equal(x.numpy(), x2.numpy()) and not np.array_equal(y.numpy(), clean)


def _window_of(crop: np.ndarray, whole: np.ndarray):
    """Every (y, x) where `crop` is `whole`'s window of its size, all frames."""
    _, h, w, _ = crop.shape
    return [(y, x) for y in range(whole.shape[1] - h + 1) for x in range(whole.shape[2] - w + 1)
            if np.array_equal(whole[:, y:y + h, x:x + w], crop)]


def test_make_pairs_crops_input_and_target_at_one_window():
    """`crop`: a window of every frame, the same for the degraded input and its target, drawn per seed; at most
    the patch (a larger crop keeps it whole)."""
    spec = PatchSpec(4, 24, 24)
    clean, degraded = _patch(1), _patch(2)
    record = schema.encode_patch(degraded, target=clean, encoding="raw", video_id="v", video_size=(4, 24, 24),
                                 index=(0, 0, 0), offset=(0, 0, 0), valid=(4, 24, 24), timestamp=0.0)
    element = degrade.make_pairs("raw", spec, paired=True, crop=8)
    corners = set()
    for seed in range(6):
        x, y = (t.numpy() for t in element(tf.constant(record), tf.constant([seed, 3], tf.int64)))
        assert x.shape == y.shape == (4, 8, 8, 3)
        where = _window_of(y, clean)
        assert where and where == _window_of(x, degraded)   # one window for both
        corners.add(where[0])
    assert len(corners) > 1   # drawn, not fixed
    x, y = degrade.make_pairs("raw", spec, paired=True, crop=32)(tf.constant(record), tf.constant([0, 0], tf.int64))
    assert np.array_equal(x.numpy(), degraded) and np.array_equal(y.numpy(), clean)
    # On a grid (codec pairs: 8): every window starts at a multiple of it, and all of them are drawn.
    on_grid = degrade.make_pairs("raw", spec, paired=True, crop=8, crop_grid=8)
    corners = set()
    for seed in range(60):
        x, y = (t.numpy() for t in on_grid(tf.constant(record), tf.constant([seed, 3], tf.int64)))
        where = _window_of(y, clean)
        assert len(where) == 1 and where == _window_of(x, degraded)
        corners.add(where[0])
    assert corners == {(y, x) for y in (0, 8, 16) for x in (0, 8, 16)}


def test_the_enhance_task_crops_codec_pairs_on_their_block_grid():
    from stpkeras.tasks import CODEC_BLOCK, get_task
    spec = PatchSpec(4, 24, 24)
    clean, degraded = _patch(1), _patch(2)
    record = schema.encode_patch(degraded, target=clean, encoding="raw", video_id="v", video_size=(4, 24, 24),
                                 index=(0, 0, 0), offset=(0, 0, 0), valid=(4, 24, 24), timestamp=0.0)
    info = type("Info", (), {"encoding": "raw", "spec": spec, "manifest": {"paired": True}, "root": "data"})()
    task = get_task("enhance", {"crop": 8}).for_data(info)
    element = task.element_fn(info, (), training=True)
    starts = {_window_of(element(tf.constant(record), tf.constant([s, 0], tf.int64))[1].numpy(), clean)[0]
              for s in range(30)}
    assert CODEC_BLOCK == 8 and all(y % 8 == 0 and x % 8 == 0 for y, x in starts) and len(starts) > 3


def test_soften_shrinks_detail_of_clean_patches_before_degrading_and_only_on_self_supervised_rgb():
    """`soften`: a share of clean patches downscaled and back before the degradation (target and input alike);
    the task's default on self-supervised rgb data, refused on pairs (their input is the codec's)."""
    from stpkeras.tasks import Enhance, get_task
    spec = PatchSpec(4, 24, 24)
    checker = np.broadcast_to((np.indices((24, 24)).sum(axis=0) % 2 * 200)[None, :, :, None], (4, 24, 24, 3))
    checker = np.ascontiguousarray(checker, np.uint8)
    record = schema.encode_patch(checker, encoding="raw", video_id="v", video_size=(4, 24, 24), index=(0, 0, 0),
                                 offset=(0, 0, 0), valid=(4, 24, 24), timestamp=0.0)
    always = degrade.make_pairs("raw", spec, paired=False, degradations=["noise:10"], soften=1.0)
    x, y = (t.numpy().astype(np.float32) for t in always(tf.constant(record), tf.constant([1, 2], tf.int64)))
    # A one-pixel checkerboard at 25-75% of its size and back is near grey: the target lost the detail...
    assert np.abs(y - 100).mean() < 40 and np.abs(y - checker).mean() > 60
    # ...and the input is that softened target with the noise (sigma 10), not the original checkerboard.
    assert 5 < np.abs(x - y).mean() < 12
    never = degrade.make_pairs("raw", spec, paired=False, degradations=["noise:10"])
    assert np.array_equal(never(tf.constant(record), tf.constant([1, 2], tf.int64))[1].numpy(), checker)
    half = degrade.make_pairs("raw", spec, paired=False, degradations=["noise:10"], soften=0.5)
    kept = sum(np.array_equal(half(tf.constant(record), tf.constant([s, 2], tf.int64))[1].numpy(), checker)
               for s in range(20))
    assert 4 <= kept <= 16   # about half, seeded
    with pytest.raises(ValueError, match="self-supervised data only"):
        degrade.make_pairs("raw", spec, paired=True, soften=0.5)

    def info(paired, pixels="rgb"):
        return type("Info", (), {"encoding": "raw", "spec": PatchSpec(4, 24, 24, pixels=pixels),
                                 "manifest": {"paired": paired}, "root": "data"})()
    noisy = get_task("enhance", {"degrade": ("noise",)})
    assert noisy.soften is None and noisy.for_data(info(False)).soften == Enhance.SOFTEN == 0.5
    assert noisy.for_data(info(False, "yuv440")).soften == 0.0
    assert get_task("enhance", {}).for_data(info(True)).soften == 0.0
    assert get_task("enhance", {"degrade": ("noise",), "soften": 0}).for_data(info(False)).soften == 0.0
    quarter = get_task("enhance", {"degrade": ("noise",), "soften": 0.25}).for_data(info(False))
    assert quarter.recorded()["soften"] == 0.25
    with pytest.raises(ValueError, match="needs self-supervised rgb patches; expected soften 0 on paired data"):
        get_task("enhance", {"soften": 0.5}).for_data(info(True))
    with pytest.raises(ValueError, match="Expected a share of patches in"):
        get_task("enhance", {"degrade": ("noise",), "soften": 1.5})


def test_a_crop_needs_a_fully_convolutional_enhancer():
    from stpkeras.tasks import get_task
    spec = PatchSpec(4, 24, 24)
    task = get_task("enhance", {"degrade": ("noise",), "crop": 8})
    model = task.build_model("dncnn3d", spec, (), {"depth": 2})
    assert model(np.zeros((1, 4, 24, 24, 3), np.uint8)).shape == (1, 4, 24, 24, 3)    # the whole patch
    assert model(np.zeros((1, 4, 8, 8, 3), np.uint8)).shape == (1, 4, 8, 8, 3)        # a training crop
    # The pixel-phase stack is fully convolutional too, on crops its factor divides.
    phased = task.build_model("dncnn3d", spec, (), {"depth": 2, "downscale": 4})
    assert phased(np.zeros((1, 4, 8, 8, 3), np.uint8)).shape == (1, 4, 8, 8, 3)
    with pytest.raises(ValueError, match="splits frames into 8x8 blocks; expected a crop that 8 divides"):
        get_task("enhance", {"degrade": ("noise",), "crop": 12}).build_model("dncnn3d", spec, (),
                                                                              {"depth": 2, "downscale": 8})
    with pytest.raises(ValueError, match="takes whole 24x24 patches only"):
        task.build_model("unet3d", spec, (), {"filters": (4, 8, 16)})
    with pytest.raises(ValueError, match="Received crop=-1"):
        get_task("enhance", {"degrade": ("noise",), "crop": -1})
