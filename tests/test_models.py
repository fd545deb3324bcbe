"""Tests of stpkeras.models: every family builds from a PatchSpec, takes uint8, normalises in its first
layer, names 'features' and 'logits', wires its options through and reloads from .keras unchanged."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from stpkeras.models import build_model, model_names, model_options
from stpkeras.models.layers import Normalize, PositionalEmbedding, to_unit
from stpkeras.models.r2plus1d import intermediate_channels
from tfrecords_tools.spec import PatchSpec

SPEC = PatchSpec(4, 16, 16)
# Small widths keep the whole file to a few seconds; the defaults are checked by count below.
SMALL = {"stcnn": {"filters": 4}, "c3d": {"widths": (4, 8), "convs_per_stage": (1, 1)},
         "r2plus1d": {"widths": (4, 8), "depth": 10}, "resnet3d": {"widths": (4, 8), "depth": 10},
         "vivit": {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16, "tubelet": (2, 8, 8)},
         "corrnet": {"match": 4, "stride": 1, "widths": (4, 8), "radius": 1}}


def _pixels(batch, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, *SPEC.shape), dtype=np.uint8)


def test_registry_lists_the_six_families():
    # ... (corrnet: the motion classifier), the two enhancement families (pixels out, tested in test_enhance.py)
    # and the motion model of --task stabilize (values per frame pair, tested in test_stabilize.py).
    assert set(model_names()) == {"stcnn", "c3d", "r2plus1d", "resnet3d", "vivit", "unet3d", "dncnn3d",
                                  "motionnet", "corrnet", "softmotion"}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_model_contract_and_keras_round_trip(name, tmp_path):
    model = build_model(name, SPEC, 3, **SMALL[name])
    assert model.input.dtype == "uint8" and tuple(model.input.shape) == (None, *SPEC.shape)
    assert isinstance(model.layers[1], Normalize)
    assert model.output.name.startswith("logits") or model.layers[-1].name == "logits"
    assert tuple(model.get_layer("logits").output.shape) == (None, 3)
    assert model.get_layer("logits").activation is keras.activations.linear
    assert len(model.get_layer("features").output.shape) == 2
    x = _pixels(2)
    y = np.asarray(model(x, training=False))
    path = str(tmp_path / f"{name}.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_array_equal(np.asarray(reloaded(x, training=False)), y)
    # Another batch size through the reloaded model gives the same per-example outputs.
    x3 = np.concatenate([x, _pixels(1, seed=1)])
    np.testing.assert_allclose(np.asarray(reloaded(x3, training=False))[:2], y, rtol=1e-5, atol=1e-5)


def test_normalize_maps_uint8_to_unit_range_and_serializes():
    layer = Normalize()
    out = np.asarray(layer(np.array([[0, 127, 255]], np.uint8)))
    np.testing.assert_allclose(out, [[-1.0, 127 / 127.5 - 1, 1.0]], rtol=1e-6)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.asarray(to_unit(np.array([0, 255], np.uint8))), [-1.0, 1.0])
    clone = Normalize.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert PositionalEmbedding.from_config(PositionalEmbedding(0.5).get_config()).initializer_stddev == 0.5


def test_every_option_is_wired_through():
    stcnn = build_model("stcnn", SPEC, 4, filters=6, kernel_size=(1, 3, 3), pool_size=(2, 8, 8))
    conv = stcnn.get_layer("conv")
    assert conv.filters == 6 and conv.kernel_size == (1, 3, 3)
    assert stcnn.get_layer("pool").pool_size == (2, 8, 8)
    assert tuple(stcnn.get_layer("features").output.shape) == (None, 2 * 2 * 2 * 6)
    c3d = build_model("c3d", SPEC, 4, widths=(4, 8, 12), convs_per_stage=(1, 2, 1), dropout=0.5)
    assert [c.filters for c in c3d.layers if isinstance(c, keras.layers.Conv3D)] == [4, 8, 8, 12]
    assert c3d.get_layer("head_dropout").rate == 0.5
    res = build_model("resnet3d", SPEC, 4, depth=18, widths=(4, 8))
    assert sum(layer.name.endswith("_conv1") for layer in res.layers) == 4  # 2 + 2 blocks
    full = build_model("r2plus1d", SPEC, 4, depth=10, width="full")
    assert full.get_layer("features").output.shape[-1] == 512
    vivit = build_model("vivit", SPEC, 4, tubelet=(2, 4, 4), dim=8, depth=2, heads=2, mlp_dim=12)
    assert tuple(vivit.get_layer("tokens").output.shape) == (None, 2 * 4 * 4, 8)
    assert sum(isinstance(layer, keras.layers.MultiHeadAttention) for layer in vivit.layers) == 2
    assert vivit.get_layer("encoder0_mlp1").units == 12
    assert set(model_options("stcnn")) == {"filters", "kernel_size", "pool_size", "dropout", "causal"}


def test_corrnet_sees_motion_not_brightness():
    # A picture moving one pixel a frame to the right, to the left, and the right-moving clip brighter.
    picture = np.random.default_rng(0).integers(60, 190, (16, 24, 3), dtype=np.uint8)
    right = np.stack([picture[:, 4 - t:20 - t] for t in range(SPEC.frames)])
    left = right[::-1]
    brighter = right + np.uint8(40)
    for cost in ("softmax", "products"):   # the default, and the raw cost volume
        model = build_model("corrnet", SPEC, 3, match=4, widths=(4, 8), radius=1, cost=cost)
        out = np.asarray(model(np.stack([right, left, brighter]), training=False))
        # FrameContrast takes each frame's mean away: a brighter clip is the same input to the cost volume.
        np.testing.assert_allclose(out[2], out[0], rtol=1e-4, atol=1e-4)
        # ... and the motion the other way is not: untrained, its logits differ by far more than float noise
        # (the softmax's by 9e-4 at this start, the raw products' by more than 1e-3, the bound before the softmax).
        apart = np.abs(out[1] - out[0]).max()
        assert apart > (1e-3 if cost == "products" else 1e-4) and apart > 20 * np.abs(out[2] - out[0]).max(), cost
    with pytest.raises(ValueError, match="at least 2 frames. Received frames=1"):
        build_model("corrnet", PatchSpec(1, 16, 16), 3)
    with pytest.raises(ValueError, match="frames 2 apart .* at least 3 frames. Received frames=2"):
        build_model("corrnet", PatchSpec(2, 16, 16), 3, gap=2)


@pytest.mark.parametrize("gap", [1, 2])
def test_the_cost_volume_matches_at_the_motion_times_the_gap(gap):
    from stpkeras.models.motion import Correlation

    # Random features moving one pixel a frame to the right: frame t+gap is frame t moved by `gap` pixels.
    field = np.random.default_rng(1).normal(size=(12, 20, 2)).astype("float32")
    clip = np.stack([field[:, 4 - t:16 - t] for t in range(4)])[None]    # [1, 4, 12, 12, 2]
    layer = Correlation(radius=2, gap=gap)
    costs = np.asarray(layer(clip))
    assert costs.shape == (1, 4 - gap, 12, 12, 25) == layer.compute_output_shape(clip.shape)
    # Averaged over the frame, every pair matches best at dx = +gap, dy = 0 (index dy * 5 + dx, from -2).
    best = costs[0].mean(axis=(1, 2)).argmax(-1)
    assert (best == (0 + 2) * 5 + (gap + 2)).all()
    again = Correlation.from_config(layer.get_config())
    assert (again.radius, again.gap) == (2, gap)


def test_match_softmax_reads_where_the_picture_matches():
    from stpkeras.models.motion import Correlation, MatchSoftmax

    # Random features moving one pixel a frame to the right: each place's distribution peaks at dx = +1; a flat
    # place (a zero cost at every displacement) gets the uniform distribution.
    field = np.random.default_rng(2).normal(size=(12, 20, 2)).astype("float32")
    clip = np.stack([field[:, 4 - t:16 - t] for t in range(3)])[None]     # [1, 3, 12, 12, 2]
    costs = Correlation(radius=1)(clip)
    layer = MatchSoftmax(temperature=0.5)
    probs = np.asarray(layer(costs))
    assert probs.shape == tuple(costs.shape)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    inner = probs[0, :, 2:10, 2:10]                 # away from the zero padding at the edges
    assert (inner.mean(axis=(1, 2)).argmax(-1) == 1 * 3 + 2).all()   # dy = 0, dx = +1 (index (dy+1)*3 + dx+1)
    # What every displacement of a place shares drops out.
    np.testing.assert_allclose(np.asarray(layer(costs + 3.0)), probs, rtol=1e-5, atol=1e-6)
    flat = np.asarray(layer(np.zeros((1, 1, 2, 2, 9), "float32")))
    np.testing.assert_allclose(flat, 1 / 9, rtol=1e-6)
    # The temperature is learned, as its log, and survives the config.
    assert [w.name for w in layer.trainable_weights] == ["log_temperature"]
    np.testing.assert_allclose(float(layer.log_temperature.numpy()), np.log(0.5), rtol=1e-6)
    assert MatchSoftmax.from_config(layer.get_config()).temperature == 0.5
    with pytest.raises(ValueError, match="Expected a number > 0. Received temperature=0"):
        MatchSoftmax(temperature=0)


def test_corrnet_cost_softmax_and_its_errors(tmp_path):
    model = build_model("corrnet", SPEC, 3, match=4, widths=(4, 8), radius=1)
    assert model.get_layer("match_softmax").input.shape[-1] == 9
    clip = np.random.default_rng(3).integers(0, 255, (2, *SPEC.shape), dtype=np.uint8)
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(again(clip)), np.asarray(model(clip)), rtol=1e-5, atol=1e-6)
    assert "match_softmax" in [layer.name for layer in build_model("corrnet", SPEC, 3, radius=1).layers]  # default
    products = build_model("corrnet", SPEC, 3, radius=1, cost="products")
    assert "match_softmax" not in [layer.name for layer in products.layers]
    with pytest.raises(ValueError, match=r"Expected one of \('products', 'softmax'\). Received cost='soft'"):
        build_model("corrnet", SPEC, 3, cost="soft")


def test_r2plus1d_keeps_the_parameter_count_of_the_full_convolution():
    t, d, n_in, n_out = 3, 3, 64, 64
    m = intermediate_channels(t, d, n_in, n_out)
    assert m == 144  # the paper's M_i for 64 -> 64 channels
    assert abs((d * d * n_in * m + t * m * n_out) - t * d * d * n_in * n_out) / (t * d * d * n_in * n_out) < 0.01


def test_bad_arguments_say_what_was_expected():
    with pytest.raises(ValueError, match="Expected an integer >= 1. Received num_classes=0"):
        build_model("stcnn", SPEC, 0)
    with pytest.raises(ValueError, match="Invalid options \\['widht'\\] for model 'c3d'"):
        build_model("c3d", SPEC, 3, widht=4)
    with pytest.raises(ValueError, match="Expected one of \\['c3d'"):
        build_model("i3d", SPEC, 3)
    with pytest.raises(ValueError, match="Received kernel_size=\\(3, 0, 3\\)"):
        build_model("stcnn", SPEC, 3, kernel_size=(3, 0, 3))
    with pytest.raises(ValueError, match="Expected a divisor of dim=16"):
        build_model("vivit", SPEC, 3, dim=16, heads=3)


def test_mixed_precision_keeps_float32_logits():
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_model("stcnn", SPEC, 3, filters=4)
        assert model.get_layer("conv").compute_dtype == "bfloat16"
        assert np.asarray(model(_pixels(1))).dtype == np.float32
    finally:
        keras.mixed_precision.set_global_policy(policy)


def test_softmotion_measures_in_float32_under_mixed_precision():
    """Its features may compute in bfloat16; the FFT correlation and the soft-argmax fit stay float32 (a
    sub-pixel shift needs more than bfloat16's 3 digits), and the model runs under the policy."""
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        spec = PatchSpec(frames=3, height=32, width=32)
        model = build_model("softmotion", spec, 8)
        assert model.get_layer("features0").compute_dtype == "bfloat16"
        assert model.get_layer("correlation").compute_dtype == model.get_layer("soft_argmax").compute_dtype == "float32"
        out = np.asarray(model(np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32, 3), dtype=np.uint8)))
        assert out.dtype == np.float32 and out.shape == (2, 8) and np.all(np.isfinite(out))
    finally:
        keras.mixed_precision.set_global_policy(policy)


def test_a_regressor_answers_in_the_units_of_its_data(tmp_path):
    """One value (K=1): the `values` layer maps the family's output z to z x std + mean; the loss is taken
    in standard deviations; saved and loaded, the same outputs."""
    from stpkeras.models.regression import RegressionLoss, build_regressor

    model = build_regressor("stcnn", SPEC, [40.0], [5.0], filters=4)
    assert model.output_shape == (None, 1) and model.layers[-1].name == "values"
    head = model.get_layer("logits")
    head.set_weights([np.zeros_like(w) for w in head.get_weights()])
    np.testing.assert_allclose(np.asarray(model(_pixels(3))), 40.0)       # z = 0: the mean
    head.set_weights([head.get_weights()[0], np.ones(1, np.float32)])
    np.testing.assert_allclose(np.asarray(model(_pixels(3))), 45.0)       # z = 1: one deviation above
    path = str(tmp_path / "r.keras")
    model.save(path)
    np.testing.assert_allclose(np.asarray(keras.saving.load_model(path)(_pixels(3))), 45.0)
    # An error of 10 units is 2 deviations: squared 4; Huber (delta 1) 2 - 0.5.
    assert float(RegressionLoss("mse", [5.0])(np.array([[50.0]]), np.array([[40.0]]))) == pytest.approx(4.0)
    assert float(RegressionLoss("huber", [5.0])(np.array([[50.0]]), np.array([[40.0]]))) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="Expected one of \\('mse', 'huber'\\)"):
        RegressionLoss("l1")


CAUSAL = ["stcnn", "r2plus1d", "resnet3d"]


@pytest.mark.parametrize("name", CAUSAL)
def test_a_causal_model_answers_at_frame_t_without_later_frames(name, tmp_path):
    from stpkeras.models import causal

    keras.utils.set_random_seed(0)
    spec = PatchSpec(6, 16, 16)
    model = build_model(name, spec, 3, **SMALL[name], causal=True)
    assert causal.is_causal(model) and not causal.is_causal(build_model(name, spec, 3, **SMALL[name]))
    # Nothing shortens time: each frame has its answer (the running mean before the last-frame read-out).
    per_frame = keras.Model(model.input, model.get_layer("causal_mean").output)
    x = np.random.default_rng(0).integers(0, 256, (2, *spec.shape), dtype=np.uint8)
    for t in (1, 3, 5):
        later = x.copy()
        later[:, t:] = 255 - later[:, t:]
        a, b = np.asarray(per_frame(x, training=False)), np.asarray(per_frame(later, training=False))
        np.testing.assert_array_equal(a[:, :t], b[:, :t])           # frames < t: bit for bit the same
        assert np.abs(a[:, t:] - b[:, t:]).max(axis=-1).min() > 0   # every frame >= t sees the change
    # The clip's answer is the last frame's (the mean over all T frames), and it survives a .keras round trip.
    path = str(tmp_path / "causal.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(np.asarray(reloaded(x, training=False)), np.asarray(model(x, training=False)),
                               atol=1e-6)
    assert causal.is_causal(reloaded)


@pytest.mark.parametrize("name,pixels", [("stcnn", "rgb"), ("r2plus1d", "rgb"), ("stcnn", "yuv440")])
def test_a_causal_model_streams_in_chunks_of_any_size_to_the_whole_clip_answer(name, pixels):
    from stpkeras.models import causal

    spec = PatchSpec(6, 16, 16, pixels=pixels)
    model = build_model(name, spec, 3, **SMALL[name], causal=True)
    step = causal.stream_model(model)
    x = np.random.default_rng(1).integers(0, 256, (2, *spec.shape), dtype=np.uint8)   # packed for yuv440
    whole = np.asarray(keras.Model(model.input, model.get_layer("causal_mean").output)(x, training=False))
    head = model.get_layer("logits")
    for chunks in ((1,) * 6, (2, 2, 2), (4, 2), (6,)):
        state = {k: np.zeros((2, *shape), np.float32) for k, (shape, _) in causal.state_spec(model).items()}
        outs, start = [], 0
        for n in chunks:
            with causal.streaming(state) as new:
                outs.append(np.asarray(step(x[:, start:start + n], training=False)))
            assert set(new) == set(state)
            state, start = {k: np.asarray(v) for k, v in new.items()}, start + n
        np.testing.assert_allclose(np.concatenate(outs, axis=1), np.asarray(head(whole)), atol=1e-4)


def test_a_causal_layer_refuses_a_temporal_stride():
    from stpkeras.models.causal import CausalConv3D

    with pytest.raises(ValueError, match="Expected a temporal stride and dilation of 1"):
        CausalConv3D(4, 3, strides=(2, 1, 1))


def test_stp_train_causal_records_the_option_and_trains_a_causal_model(causal_run, cli, converted, tmp_path):
    import json

    from stpkeras import artifacts
    from stpkeras.models import causal

    run = json.loads((causal_run / "run.json").read_text())
    assert run["config"]["model_options"]["causal"] is True
    assert causal.is_causal(artifacts.load(str(causal_run)).model)
    refused = cli("train", converted[0], "--out", tmp_path / "r", "--causal", "--model", "c3d")
    assert refused.exit_code == 2 and "model 'c3d' has no causal form" in refused.output


def test_a_model_trained_in_mixed_precision_loads_computing_in_float32(tmp_path):
    """Mixed precision is how a run trains; a loaded model (predict, evaluate, export) computes in float32, with
    the trained weights: the float32 model's outputs exactly, where bfloat16 differs in the 3rd digit."""
    from stpkeras.artifacts import load_keras_model

    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        trained = build_model("stcnn", SPEC, 3, filters=4)
        trained.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                        metrics=["accuracy"])
    finally:
        keras.mixed_precision.set_global_policy(policy)
    path = str(tmp_path / "m.keras")
    trained.save(path)
    reference = build_model("stcnn", SPEC, 3, filters=4)     # float32, the same weights
    reference.set_weights(trained.get_weights())
    x = _pixels(2)
    for compile in (False, True):
        loaded = load_keras_model(path, compile=compile)
        assert {layer.dtype_policy.name for layer in loaded.layers} == {"float32"}
        np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(reference(x)))
        assert loaded.compiled == compile
    assert np.abs(np.asarray(trained(x)) - np.asarray(reference(x))).max() > 1e-4   # bfloat16 is not float32
    evaluated = load_keras_model(path, compile=True).evaluate(x, np.array([0, 1]), verbose=0, return_dict=True)
    assert set(evaluated) >= {"loss", "accuracy"}
