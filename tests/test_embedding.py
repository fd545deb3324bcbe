"""The contrastive task: NT-Xent and pair accuracy by hand, the views element eagerly and in tf.data, the model."""

import numpy as np
import pytest
import tensorflow as tf

from stpkeras import embedding as em
from tfrecords_tools import schema
from tfrecords_tools.spec import PatchSpec


def _nt_xent_by_hand(z, temperature):
    """Straight from the SimCLR paper's definition, one view at a time."""
    b = z.shape[0]
    views = np.concatenate([z[:, 0], z[:, 1]])
    views = views / np.linalg.norm(views, axis=1, keepdims=True)
    losses = []
    for i in range(2 * b):
        positive = (i + b) % (2 * b)
        sims = {j: float(views[i] @ views[j]) / temperature for j in range(2 * b) if j != i}
        losses.append(-sims[positive] + np.log(sum(np.exp(s) for s in sims.values())))
    return np.array([(losses[i] + losses[i + b]) / 2 for i in range(b)])


def test_nt_xent_and_pair_accuracy_hand_computed():
    # Two patches in 2-d: patch 0's views are (1, 0) and (0.8, 0.6); patch 1's are (0, 1) and (-0.6, 0.8).
    z = np.array([[[1.0, 0.0], [0.8, 0.6]], [[0.0, 1.0], [-0.6, 0.8]]], np.float32)
    # View (1,0): positive 0.8; negatives (0,1) -> 0, (-0.6,0.8) -> -0.6. With temperature 1:
    first = -0.8 + np.log(np.exp(0.8) + np.exp(0.0) + np.exp(-0.6))
    # View (0.8, 0.6): positive 0.8; negatives (0,1) -> 0.6, (-0.6,0.8) -> 0.
    second = -0.8 + np.log(np.exp(0.8) + np.exp(0.6) + np.exp(0.0))
    assert em.nt_xent(tf.constant(z), 1.0).numpy()[0] == pytest.approx((first + second) / 2, rel=1e-5)
    np.testing.assert_allclose(em.nt_xent(tf.constant(z), 1.0).numpy(), _nt_xent_by_hand(z, 1.0), rtol=1e-5)
    np.testing.assert_allclose(em.nt_xent(tf.constant(z), 0.1).numpy(), _nt_xent_by_hand(z, 0.1), rtol=1e-5)
    # The view (1, 0): its loss term is exactly `first`.
    logits, positives = em._pair_logits(tf.constant(z), 1.0)
    row = logits.numpy()[0]
    assert positives.numpy().tolist() == [2, 3, 0, 1]
    assert -row[2] + np.log(np.exp(row[[1, 2, 3]]).sum()) == pytest.approx(first, rel=1e-6)
    # Every view's nearest other view is its positive here...
    np.testing.assert_array_equal(em.pair_accuracy(tf.constant(z)).numpy(), [1.0, 1.0])
    # ...and not when patch 1's second view (0.6, 0.8) is nearer patch 0's second view (0.96) than it is to (0, 1).
    z[1, 1] = [0.6, 0.8]
    np.testing.assert_array_equal(em.pair_accuracy(tf.constant(z)).numpy(), [0.5, 0.5])
    with pytest.raises(ValueError, match="Expected a strictly positive value. Received temperature=0"):
        em.ContrastiveLoss(temperature=0)


def test_views_element_eagerly_and_in_map():
    spec = PatchSpec(2, 8, 8)
    pixels = np.random.default_rng(0).integers(0, 256, spec.shape, dtype=np.uint8)
    record = schema.encode_patch(pixels, video_id="v", video_size=(2, 8, 8), index=(0, 0, 0), offset=(0, 0, 0),
                                 valid=(2, 8, 8), timestamp=0.0)
    element = em.make_views("raw", spec, ("crop", "color"))
    seed = tf.constant([3, 4], tf.int64)
    views, target = element(tf.constant(record), seed)
    assert views.dtype == tf.uint8 and views.shape == (2, *spec.shape) and int(target) == 0
    assert not np.array_equal(views[0], views[1])  # two different draws
    ds = tf.data.Dataset.from_tensors((tf.constant(record), seed)).map(element)
    mapped, _ = next(iter(ds))
    np.testing.assert_array_equal(mapped, views)  # seeded: the same pixels in tf.data
    plain, _ = em.make_views("raw", spec, ())(tf.constant(record), seed)
    np.testing.assert_array_equal(plain, np.stack([pixels, pixels]))


def test_contrastive_model_round_trips_and_exposes_its_encoder(tmp_path):
    import keras

    from stpkeras.models import build_model

    spec = PatchSpec(4, 16, 16)
    model = em.build_contrastive(build_model("stcnn", spec, 2, filters=4), spec, projection_dim=8, hidden_dim=16)
    views = np.random.default_rng(1).integers(0, 256, (3, 2, *spec.shape), dtype=np.uint8)
    assert model(views).shape == (3, 2, 8)
    # Views go through the same encoder: swapping them swaps the projections.
    np.testing.assert_allclose(model(views[:, ::-1]), np.asarray(model(views))[:, ::-1], atol=1e-5)
    model.save(str(tmp_path / "m.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "m.keras"), compile=False)
    np.testing.assert_allclose(loaded(views), model(views), atol=1e-6)
    features = em.feature_model(loaded)
    assert features.output_shape == (None, 4)
    np.testing.assert_allclose(features(views[:, 0]), em.feature_model(model)(views[:, 0]), atol=1e-6)


def _grid_by_hand(pooled_map, cells):
    """numpy: `[B, T, H, W, C]` -> mean over time and over each cell, each cell L2-normalised, / cells."""
    m = np.asarray(pooled_map, np.float64).mean(axis=1)
    b, h, w, c = m.shape
    g = m.reshape(b, cells, h // cells, cells, w // cells, c).mean(axis=(2, 4))
    g = g / np.linalg.norm(g, axis=-1, keepdims=True)
    return g.reshape(b, -1) / cells


def test_grid_pool_keeps_layout_for_stcnn_and_for_a_saved_embed_model(tmp_path):
    import keras

    from stpkeras.models import build_model

    spec = PatchSpec(4, 16, 16)
    backbone = build_model("stcnn", spec, 2, filters=4)
    patches = np.random.default_rng(2).integers(0, 256, (3, *spec.shape), dtype=np.uint8)
    pooled_map = keras.Model(backbone.input, backbone.get_layer(em.FEATURES).input)(patches)  # [3, 2, 4, 4, 4]
    assert pooled_map.shape == (3, 2, 4, 4, 4)
    grid = em.feature_model(backbone, "grid:2")
    assert grid.output_shape == (None, 2 * 2 * 4)
    np.testing.assert_allclose(grid(patches), _grid_by_hand(pooled_map, 2), atol=1e-5)
    np.testing.assert_allclose(em.feature_model(backbone, "grid:1")(patches), _grid_by_hand(pooled_map, 1), atol=1e-5)
    np.testing.assert_allclose(em.feature_model(backbone)(patches), np.asarray(pooled_map).mean(axis=(1, 2, 3)),
                               atol=1e-5)
    # Mirroring the map left-right leaves the global mean as it is and swaps the grid's cells.
    mirrored = np.asarray(pooled_map)[:, :, :, ::-1]
    by_cell = _grid_by_hand(mirrored, 2).reshape(3, 2, 2, 4)
    np.testing.assert_allclose(by_cell[:, :, ::-1], _grid_by_hand(pooled_map, 2).reshape(3, 2, 2, 4), atol=1e-6)

    # An embed-task model, trained with the global mean, read through a grid after saving and loading.
    model = em.build_contrastive(backbone, spec, projection_dim=8, hidden_dim=16)
    model.save(str(tmp_path / "m.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "m.keras"), compile=False)
    np.testing.assert_allclose(em.feature_model(loaded, "grid:2")(patches), _grid_by_hand(pooled_map, 2), atol=1e-5)
    np.testing.assert_allclose(em.feature_model(loaded)(patches), np.asarray(pooled_map).mean(axis=(1, 2, 3)),
                               atol=1e-5)


def test_grid_pool_refuses_what_it_cannot_do():
    from stpkeras.models import build_model

    assert em.parse_pool("mean") == 0 and em.parse_pool("grid:4") == 4
    for bad in ("grid", "grid:0", "grid:x", "max"):
        with pytest.raises(ValueError, match=f"Expected 'mean' or 'grid:N'.*Received pool={bad!r}"):
            em.parse_pool(bad)
    spec = PatchSpec(4, 16, 16)
    with pytest.raises(ValueError, match="multiples of 3"):
        em.feature_model(build_model("stcnn", spec, 2, filters=4), "grid:3")   # a 4x4 map


# --- the copy views ---------------------------------------------------------------------------------

def _clip(t=8, h=32, w=32, seed=0):
    """A clip whose frame i is a smooth picture plus 8 x i, so every frame is told apart by its mean."""
    rng = np.random.default_rng(seed)
    base = np.kron(rng.integers(40, 180, (h // 8, w // 8, 3)), np.ones((8, 8, 1)))
    return np.stack([base + 8 * i for i in range(t)]).astype(np.uint8)


def _frame_sources(out, clip):
    """For each output frame, the input frame it is (every output frame must be one)."""
    found = [[j for j in range(len(clip)) if np.array_equal(frame, clip[j])] for frame in np.asarray(out)]
    assert all(len(f) == 1 for f in found), found
    return [f[0] for f in found]


def test_shift_and_speed_pick_whole_frames_as_they_say():
    from stpkeras import augment as aug

    clip = _clip()
    shifts = set()
    for s in range(20):
        index = _frame_sources(aug.random_shift(clip, tf.constant([s, 1], tf.int64), max_shift=0.5), clip)
        shift = index[0] if index[0] > 0 else index[7] - 7   # the end that is not clipped tells the shift
        assert abs(shift) <= 4
        assert index == np.clip(np.arange(8) + shift, 0, 7).tolist()
        shifts.add(shift)
    assert min(shifts) < 0 < max(shifts)   # earlier and later starts both drawn
    # Speed: frame i shows frame round(3.5 + (i - 3.5) x rate), clipped; rate 2 skips every other frame...
    fast = _frame_sources(aug.random_speed(clip, tf.constant([0, 0], tf.int64), rates=(2.0, 2.0)), clip)
    assert fast == np.clip(np.round(3.5 + (np.arange(8) - 3.5) * 2.0), 0, 7).astype(int).tolist()
    assert fast == [0, 0, 0, 2, 4, 6, 7, 7]
    # ...rate 0.5 repeats them, around the middle.
    slow = _frame_sources(aug.random_speed(clip, tf.constant([0, 0], tf.int64), rates=(0.5, 0.5)), clip)
    assert slow == [2, 2, 3, 3, 4, 4, 5, 5]


def test_letterbox_rescale_and_reencode_do_what_they_say():
    from PIL import Image

    from stpkeras import augment as aug

    clip = _clip()
    seed = tf.constant([5, 6], tf.int64)
    boxed = np.asarray(aug.random_letterbox(clip, seed, max_bar=0.25))
    # Black bars: rows (columns) that are zero across every frame, as many at each end.
    rows = np.flatnonzero(boxed.any(axis=(0, 2, 3)))
    cols = np.flatnonzero(boxed.any(axis=(0, 1, 3)))
    top, left = rows[0], cols[0]
    assert 0 < top <= 8 or 0 < left <= 8
    assert rows[-1] == 31 - top and cols[-1] == 31 - left
    # Inside the bars, the whole picture shrunk (nearest neighbour): its corners are the clip's corners.
    inner = boxed[:, top:32 - top, left:32 - left]
    np.testing.assert_array_equal(inner[:, 0, 0], clip[:, 0, 0])
    np.testing.assert_array_equal(inner[:, -1, -1], clip[:, -1, -1])
    np.testing.assert_array_equal(aug.random_letterbox(clip, seed, max_bar=0.0), clip)
    # Rescale at exactly 1/4: a one-pixel checkerboard averages out to grey; smooth 8x8 blocks survive.
    checker = np.broadcast_to((np.indices((32, 32)).sum(axis=0) % 2 * 200)[None, :, :, None], (8, 32, 32, 3))
    grey = np.asarray(aug.random_rescale(checker.astype(np.uint8), seed, scale=(0.25, 0.25)), np.float32)
    assert np.abs(grey - 100).max() <= 1
    smooth = np.asarray(aug.random_rescale(clip, seed, scale=(0.25, 0.25)), np.float32)
    assert np.abs(smooth - clip).mean() < np.abs(grey - checker).mean() / 5   # measured: 12.9 against 100
    # Soften: the rescale on a share of the clips (each either untouched or exactly the rescale of its seed).
    soft, kept = 0, 0
    for i in range(16):
        s = tf.constant([i, 7], tf.int64)
        out = np.asarray(aug.random_soften(checker.astype(np.uint8), s, scale=(0.25, 0.25), rate=0.5))
        if np.array_equal(out, checker):
            kept += 1
        else:
            assert np.abs(out.astype(np.float32) - 100).max() <= 1
            soft += 1
    assert soft + kept == 16 and 3 <= soft <= 13   # seeded: 16 fair draws
    np.testing.assert_array_equal(aug.random_soften(clip, seed, rate=0.0), clip)
    # Re-encode at quality q: each frame is what a JPEG encoder at q gives (PIL's libjpeg), within rounding.
    noisy = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out = np.asarray(aug.random_reencode(noisy, seed, quality=(20, 20)))
    for frame, got in zip(noisy, out):
        import io
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=20)
        by_pil = np.asarray(Image.open(buffer), np.float32)
        assert np.abs(got - by_pil).mean() < 2.0
        assert np.abs(got.astype(np.float32) - frame).mean() > 20   # quality 20 loses most of the noise


def test_copy_views_are_seeded_rgb_only_and_the_embed_default():
    from stpkeras import augment as aug
    from stpkeras.tasks import TASKS

    assert TASKS["embed"].default_augment == aug.COPY_AUGMENT
    assert set(aug.COPY_AUGMENT) <= set(aug.AUGMENTATIONS) and "flip" not in aug.COPY_AUGMENT
    clip = _clip(seed=1)
    views = aug.make_augment(aug.COPY_AUGMENT)
    a = views(clip, tf.constant([1, 2], tf.int64))
    np.testing.assert_array_equal(a, views(clip, tf.constant([1, 2], tf.int64)))
    np.testing.assert_array_equal(a, tf.function(views)(tf.constant(clip), tf.constant([1, 2], tf.int64)))
    assert not np.array_equal(a, views(clip, tf.constant([1, 3], tf.int64)))
    assert aug.make_augment(("speed", "shift")).names == ("shift", "speed")
    for name in aug.RGB_ONLY:
        with pytest.raises(ValueError, match=f"The '{name}' augmentation expects 'rgb' patches. "
                                             "Received pixels='yuv440'"):
            aug.make_augment((name,), "yuv440")
    aug.make_augment(("shift", "speed", "crop", "color"), "yuv440")   # these move or scale whole values
