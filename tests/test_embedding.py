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
