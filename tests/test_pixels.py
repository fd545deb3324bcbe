"""The yuv440 pixel format end to end: packing, the model's first layer, augmentation on packed pixels,
conversion, streaming, prediction from a video, and what refuses it."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfrecords_tools import pixels
from tfrecords_tools.spec import PatchSpec


def _random(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _yuv(rgb):
    """Independent float BT.601 full-range YUV of `uint8 [..., 3]` (U, V centred on 128)."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return y, 128 + (b - y) / 1.772, 128 + (r - y) / 1.402


def test_packing_keeps_luma_of_every_row_and_chroma_averaged_over_row_pairs():
    rgb = _random((3, 6, 5, 3))
    packed = pixels.pack_yuv440(rgb)
    assert packed.shape == (3, 3, 5, 4) and packed.dtype == np.uint8
    y, u, v = _yuv(rgb)
    assert np.abs(packed[..., 0] - y[:, 0::2]).max() <= 0.5 + 1e-6   # top row of each pair, rounded
    assert np.abs(packed[..., 1] - y[:, 1::2]).max() <= 0.5 + 1e-6   # bottom row
    u_pairs = (u[:, 0::2] + u[:, 1::2]) / 2
    v_pairs = (v[:, 0::2] + v[:, 1::2]) / 2
    assert np.abs(packed[..., 2] - np.clip(u_pairs, 0, 255)).max() <= 0.5 + 1e-3
    assert np.abs(packed[..., 3] - np.clip(v_pairs, 0, 255)).max() <= 0.5 + 1e-3
    # Pure colours: white, black, grey have no chroma; red has V at the top of its range.
    flat = np.array([[[255, 255, 255], [0, 0, 0], [128, 128, 128], [255, 0, 0]]] * 2, np.uint8)
    p = pixels.pack_yuv440(flat)[0]
    assert p[:, 0].tolist() == [255, 0, 128, 76] and p[:, 2].tolist() == [128, 128, 128, 85]
    assert p[:, 3].tolist() == [128, 128, 128, 255]


def test_unpacking_inverts_packing_where_chroma_is_the_same_on_both_rows_of_a_pair():
    rgb = np.repeat(_random((4, 8, 9, 3), seed=1), 2, axis=1)   # every pair of rows identical
    back = pixels.unpack_yuv440(pixels.pack_yuv440(rgb))
    assert back.shape == rgb.shape
    assert np.abs(back.astype(int) - rgb).max() <= 2
    assert np.abs(back.astype(int) - rgb).mean() < 0.6


def test_packing_refuses_an_odd_height_and_wrong_dtypes():
    with pytest.raises(ValueError, match="even H"):
        pixels.pack_yuv440(np.zeros((2, 5, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        pixels.pack_yuv440(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[\.\.\., H/2, W, 4\]"):
        pixels.unpack_yuv440(np.zeros((2, 4, 4, 3), np.uint8))


def test_spec_pixels_field_shapes_and_round_trip():
    spec = PatchSpec(8, 16, 24, pixels="yuv440")
    assert spec.shape == (8, 8, 24, 4) and spec.rgb_shape == (8, 16, 24, 3)
    assert spec.num_values == 8 * 8 * 24 * 4
    assert PatchSpec.from_json(spec.to_json()) == spec and "pixels yuv440" in spec.describe()
    # rgb is the default and is left out of the dict, so manifests written before the field read back equal.
    assert "pixels" not in PatchSpec(8, 16, 24).to_dict()
    assert PatchSpec.from_dict(PatchSpec(8, 16, 24).to_dict()).pixels == "rgb"
    with pytest.raises(ValueError, match="even patch height"):
        PatchSpec(8, 15, 24, pixels="yuv440")
    with pytest.raises(ValueError, match="pixels='yuv420'"):
        PatchSpec(8, 16, 24, pixels="yuv420")


def test_normalize_layer_turns_packed_pixels_into_the_rgb_the_numpy_inverse_gives():
    from stpkeras.models import layers

    rgb = _random((2, 3, 8, 6, 3), seed=2)
    packed = pixels.pack_yuv440(rgb)
    out = layers.Normalize(pixels="yuv440")(packed)
    assert tuple(out.shape) == (2, 3, 8, 6, 3)
    expected = pixels.unpack_yuv440(packed).astype(np.float32) / 127.5 - 1.0   # rounded to uint8 there
    assert np.abs(np.asarray(out) - expected).max() <= 0.5 / 127.5 + 1e-5
    with pytest.raises(ValueError, match="pixels"):
        layers.Normalize(pixels="bgr")


def test_flip_of_packed_pixels_is_the_packing_of_the_flipped_rgb_exactly():
    from stpkeras import augment

    rgb = _random((4, 8, 10, 3), seed=3)
    packed = tf.constant(pixels.pack_yuv440(rgb))
    flipped = [s for s in range(20) if bool(tf.random.stateless_uniform([], [s, 0]) < 0.5)]
    kept = [s for s in range(20) if s not in flipped]
    assert flipped and kept
    for seed in (flipped[0], kept[0]):
        direct = augment.random_flip(packed, tf.constant([seed, 0], tf.int64)).numpy()
        want = pixels.pack_yuv440(rgb[:, :, ::-1]) if seed in flipped else packed.numpy()
        assert np.array_equal(direct, want)


def test_color_on_packed_pixels_matches_color_on_rgb_away_from_clipping():
    from stpkeras import augment

    rgb = (_random((4, 8, 10, 3), seed=4) // 4 + 96).astype(np.uint8)   # 96..159: no clipping
    packed = pixels.pack_yuv440(rgb)
    for s in range(5):
        seed = tf.constant([s, 7], tf.int64)
        on_rgb = augment.random_color(tf.constant(rgb), seed).numpy()
        on_yuv = augment.random_color(tf.constant(packed), seed, pixels="yuv440").numpy()
        # The contrast mean is the mean luma for yuv440, the mean of R, G, B for rgb: close on grey-ish
        # clips, so compare luma within 2 and chroma within 2 (rounding of both paths).
        want = pixels.pack_yuv440(on_rgb).astype(int)
        diff = np.abs(on_yuv.astype(int) - want)
        assert diff[..., :2].max() <= 3 and diff[..., 2:].max() <= 2, (s, diff.max(axis=(0, 1, 2)))
        assert not np.array_equal(on_yuv, packed)


def test_crop_on_packed_pixels_moves_whole_pairs_of_rows():
    from stpkeras import augment

    rgb = _random((2, 12, 10, 3), seed=5)
    packed = pixels.pack_yuv440(rgb)
    out = augment.random_crop(tf.constant(packed), tf.constant([3, 1], tf.int64), min_scale=0.5).numpy()
    assert out.shape == packed.shape
    pairs = {packed[0, i, :, :].tobytes() for i in range(packed.shape[1])}
    # Each output row pair is a column selection of one input row pair (nearest-neighbour resize).
    for i in range(out.shape[1]):
        row = out[0, i]
        assert any(set(map(bytes, row.reshape(-1, 4).tolist())) <= set(map(bytes, packed[0, j].reshape(-1, 4).tolist()))
                   for j in range(packed.shape[1])), i
    assert len(pairs) == packed.shape[1]


@pytest.fixture(scope="module")
def yuv_converted(tmp_path_factory, classes_src, converted):
    """`classes_src` with patch 4x32x32: rgb (conftest's `converted`) and converted again as yuv440 (same grid)."""
    from tfrecords_tools.convert import ConvertConfig, convert

    yuv = str(tmp_path_factory.mktemp("yuv") / "yuv440")
    convert(ConvertConfig(src=str(classes_src), out=yuv, spec=PatchSpec(4, 32, 32, pixels="yuv440")))
    return {"rgb": str(converted[0]), "yuv440": yuv}


def _records(folder):
    from tfrecords_tools import manifest, schema

    m = manifest.read_manifest(folder)
    for split in sorted(m["splits"]):
        for path in manifest.shard_files(folder, m, split):
            for r in tf.data.TFRecordDataset(path):
                f = schema.parse_patch_numpy(r.numpy())
                yield (f[schema.VIDEO_ID], tuple(f[schema.OFFSET])), f


def test_yuv440_conversion_stores_two_thirds_of_the_bytes_and_the_same_patches(yuv_converted):
    from tfrecords_tools import manifest, schema

    rgb = dict(_records(yuv_converted["rgb"]))
    yuv = dict(_records(yuv_converted["yuv440"]))
    assert rgb.keys() == yuv.keys() and len(rgb) > 20
    m = manifest.read_manifest(yuv_converted["yuv440"])
    assert m["spec"]["pixels"] == "yuv440"
    for key, f in yuv.items():
        assert f[schema.SHAPE] == [4, 16, 32, 4] and f[schema.PATCH].shape == (4, 16, 32, 4)
        # The packing of the very patch the rgb conversion stored: the same decode and cut.
        assert np.array_equal(f[schema.PATCH], pixels.pack_yuv440(rgb[key][schema.PATCH]))
    size = {k: sum(s["bytes"] for sp in manifest.read_manifest(v)["splits"].values() for s in sp["shards"])
            for k, v in yuv_converted.items()}
    assert 0.66 < size["yuv440"] / size["rgb"] < 0.70


def test_preview_of_yuv440_records_shows_the_rgb_patches(yuv_converted, tmp_path):
    from PIL import Image

    from stpkeras.preview import write_preview

    images = {}
    for name, folder in yuv_converted.items():
        rows = write_preview(folder, str(tmp_path / f"{name}.png"), count=4)
        assert len(rows) == 4
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
    assert images["rgb"].shape == images["yuv440"].shape
    # The same patches; only the chroma of each pair of rows is shared (smooth generated textures).
    assert np.abs(images["rgb"] - images["yuv440"]).mean() < 2.0


def test_yuv440_refuses_jpeg_and_enhancement_or_segmentation_sources(tmp_path, classes_src, cli, clip64):
    result = cli("convert", classes_src, tmp_path / "a", "--patch", "4x32x32", "--pixels", "yuv440",
                 "--encoding", "jpeg")
    assert result.exit_code == 2 and "encoding='jpeg'" in result.output
    csv = tmp_path / "pairs.csv"
    import shutil

    for name in ("a.mp4", "b.mp4"):
        shutil.copy(clip64.path, tmp_path / name)
    csv.write_text("path,target\na.mp4,b.mp4\n")
    result = cli("convert", csv, tmp_path / "b", "--patch", "4x32x32", "--pixels", "yuv440")
    assert result.exit_code == 2 and "'target' column" in result.output and "--pixels rgb" in result.output, \
        result.output
    from stpkeras.models.dncnn3d import build_dncnn3d
    from stpkeras.models.unet3d import build_unet3d

    with pytest.raises(ValueError, match="rgb patches for an enhancer"):
        build_dncnn3d(PatchSpec(4, 32, 32, pixels="yuv440"))
    with pytest.raises(ValueError, match="rgb patches for a U-Net"):
        build_unet3d(PatchSpec(4, 32, 32, pixels="yuv440"))


def test_yuv440_streams_packed_batches_and_a_model_trained_on_them_predicts_videos_the_same_way(
        yuv_converted, classes_src, tmp_path):
    """make_dataset yields packed uint8 batches (flip, crop and colour on them); a model built for the spec takes
    them; `predict` cuts and packs a video exactly as conversion did (same logits as the records)."""
    import keras

    from stpkeras import predict
    from stpkeras.models import build_model
    from stpkeras.pipeline import load_info, make_dataset
    from tfrecords_tools import schema

    info = load_info(yuv_converted["yuv440"])
    ds = make_dataset(info, "all", batch_size=4, training=True, augment="flip,crop,color", seed=1)
    x, y = next(iter(ds))
    assert x.dtype == tf.uint8 and tuple(x.shape) == (4, 4, 16, 32, 4) and y.dtype == tf.int32
    model = build_model("stcnn", info.spec, num_classes=info.num_classes)
    assert tuple(model.input_shape[1:]) == (4, 16, 32, 4)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(ds.take(2), verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    video = sorted((classes_src / "circle").iterdir())[0]
    stored = [f for (vid, _), f in _records(yuv_converted["yuv440"]) if vid == "circle/" + video.name]
    logits = model.predict(np.stack([f[schema.PATCH] for f in stored]), verbose=0)
    result = predict.predict_video(predict.load(path, labels=info.labels, spec=info.spec), str(video))
    reloaded = keras.models.load_model(path)
    assert reloaded.get_layer("normalize").pixels == "yuv440"
    assert result.patches == len(stored)
    np.testing.assert_allclose(result.mean_logits, logits.mean(axis=0), atol=1e-4)


def test_yuv440_run_exports_a_saved_model_that_takes_packed_patches_and_records_in_a_fresh_process(tmp_path):
    """convert (yuv440) -> train -> export; both SavedModel loaders in a new process equal Keras on packed
    patches and on records; the SavedModel predictor classifies a video as the Keras model does."""
    import subprocess
    import sys

    from test_export import FRESH_PROCESS, keras_reference

    from stpkeras import artifacts
    from stpkeras import export as ex
    from stpkeras import predict
    from stpkeras.demo import make_videos
    from stpkeras.train import TrainConfig, train
    from tfrecords_tools.convert import ConvertConfig, convert

    spec = PatchSpec(8, 32, 32, stride_frames=4, pixels="yuv440")
    videos = make_videos(str(tmp_path / "videos"), per_class=2, frames=16, height=32, width=32)
    convert(ConvertConfig(src=videos, out=str(tmp_path / "data"), spec=spec, workers=1, command="test"))
    run_dir = str(tmp_path / "run")
    run = train(TrainConfig.tiny(str(tmp_path / "data"), run_dir, epochs=1), echo=lambda *a: None)
    assert run["spec"]["pixels"] == "yuv440"
    model = artifacts.load_keras_model(os.path.join(run_dir, "best.keras"))
    result = ex.export_for_serving(run_dir, str(tmp_path / "saved_models"), "clf")
    assert artifacts.read_assets(result.path)[1] == spec

    x = pixels.pack_yuv440(np.random.default_rng(3).integers(0, 256, size=(3, 8, 32, 32, 3), dtype=np.uint8))
    inputs = {f"{ex.SERVING_DEFAULT}/3": x,
              f"{ex.SERVE_EXAMPLES}/3": np.array([ex.example_bytes(p, "raw") for p in x], dtype=object)}
    np.savez(tmp_path / "in.npz", **inputs)
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    proc = subprocess.run([sys.executable, str(script), result.path, str(tmp_path / "in.npz"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(np.load(tmp_path / "out.npz", allow_pickle=True))
    logits, _ = keras_reference(model, x)
    for key in ("v1/serving_default/3", "v2/serving_default/3", "v1/serve_examples/3", "v2/serve_examples/3"):
        np.testing.assert_allclose(out[f"{key}/{ex.LOGITS}"], logits, atol=1e-5, rtol=0)

    video = os.path.join(videos, "left", sorted(os.listdir(os.path.join(videos, "left")))[0])
    served = predict.predict_video(predict.load(result.path), video)
    local = predict.predict_video(predict.load(os.path.join(run_dir, "best.keras")), video)
    assert served.patches == local.patches > 0
    np.testing.assert_allclose(served.mean_logits, local.mean_logits, atol=1e-5)


def test_yuv440_batched_flip_gives_each_record_or_its_mirror_and_both_occur(yuv_converted):
    from stpkeras.pipeline import make_dataset
    from tfrecords_tools import schema

    stored = dict(_records(yuv_converted["yuv440"]))
    seen = {"same": 0, "mirrored": 0}
    ds = make_dataset(yuv_converted["yuv440"], "all", batch_size=8, training=True, augment="flip", seed=5,
                      as_supervised=False)
    for batch in ds:
        for i in range(batch[schema.PATCH].shape[0]):
            key = (batch[schema.VIDEO_ID][i].numpy().decode(), tuple(batch[schema.OFFSET][i].numpy().tolist()))
            got, rec = batch[schema.PATCH][i].numpy(), stored[key][schema.PATCH]
            if np.array_equal(got, rec):
                seen["same"] += 1
            else:
                # The mirror of the packed patch is the packing of the mirrored RGB patch (see the flip test).
                assert np.array_equal(got, rec[:, :, ::-1]), key
                seen["mirrored"] += 1
    assert seen["same"] > 3 and seen["mirrored"] > 3


def test_normalize_yuv440_under_mixed_bfloat16_stays_close_to_float32():
    import keras

    from stpkeras.models import layers

    x = pixels.pack_yuv440(_random((2, 2, 8, 6, 3), seed=9))
    full = np.asarray(layers.Normalize(pixels="yuv440")(x))
    half = layers.Normalize(pixels="yuv440", dtype=keras.DTypePolicy("mixed_bfloat16"))(x)
    assert "bfloat16" in str(half.dtype)
    assert np.abs(np.asarray(half, np.float32) - full).max() < 0.03   # bfloat16 keeps 8 bits


@pytest.mark.parametrize("api", ["rest", "grpc"])
def test_yuv440_predict_through_the_serving_stand_in_equals_local(tmp_path, api):
    """`stp predict --server` packs the video's patches as the export's spec says and sends them to the stand-in
    server on 127.0.0.1 (a test double of TF Serving): the same answer as the local SavedModel."""
    from click.testing import CliRunner

    from stpkeras import export as ex
    from stpkeras.cli import main
    from stpkeras.demo import make_videos
    from stpkeras.models import build_model
    from stpkeras.testing.models import write_run
    from stpkeras.testing.standin_server import StandInServer

    spec = PatchSpec(8, 32, 32, pixels="yuv440")
    labels = ("down", "left", "right", "up")
    run_dir = write_run(str(tmp_path / "run"), build_model("stcnn", spec, len(labels)), spec, labels)
    result = ex.export_for_serving(run_dir, str(tmp_path / "saved_models"), "clf")
    folder = make_videos(str(tmp_path / "videos"), per_class=1, frames=16, height=32, width=64, classes=("left",))
    video = os.path.join(folder, "left", "left_000.mp4")
    root = os.path.dirname(result.path)
    with StandInServer(root, "clf") as server:
        url = server.rest_url if api == "rest" else server.grpc_url
        local = CliRunner().invoke(main, ["predict", root, video, "--json", "--top-k", "4"])
        remote = CliRunner().invoke(main, ["predict", root, video, "--json", "--top-k", "4", "--server", url])
    assert local.exit_code == 0 and remote.exit_code == 0, (local.output, remote.output)
    a, b = json.loads(local.output), json.loads(remote.output)
    assert a["patches"] == b["patches"] == 4 and a["label"] == b["label"]
    np.testing.assert_allclose([s for _, s in a["top_k"]], [s for _, s in b["top_k"]], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The PixelFormat object: the one owner of what a format means


def test_registry_gives_one_frozen_object_per_format_and_refuses_unknown_names():
    import dataclasses

    from stpkeras import pixel_formats

    assert list(pixels.PIXEL_FORMATS) == ["rgb", "yuv440"]
    assert pixels.PIXEL_FORMATS == {"rgb": pixels.RGB, "yuv440": pixels.YUV440} and pixels.DEFAULT is pixels.RGB
    for name, fmt in pixels.PIXEL_FORMATS.items():
        assert fmt.name == name and pixels.get(name) is fmt and pixels.get(fmt) is fmt
        with pytest.raises(dataclasses.FrozenInstanceError):
            fmt.name = "other"
        # Every format has its tensor side (the model's first layer, the colour augmentation).
        assert pixel_formats.get(name).format is fmt and pixel_formats.get(fmt) is pixel_formats.get(name)
    assert set(pixel_formats.TENSOR_FORMATS) == set(pixels.PIXEL_FORMATS)
    for bad in ("yuv420", "RGB", None, 3):
        with pytest.raises(ValueError) as e:
            pixels.get(bad)
        assert str(e.value) == ("Invalid value for argument `pixels`. Expected one of ('rgb', 'yuv440'). "
                                f"Received pixels={bad!r}")
    assert (pixels.RGB.pixel_aligned, pixels.YUV440.pixel_aligned) == (True, False)
    assert (pixels.RGB.raw_only, pixels.YUV440.raw_only) == (False, True)


def test_spec_keeps_the_name_in_json_and_gives_the_object():
    by_object = PatchSpec(8, 16, 24, pixels=pixels.YUV440)
    by_name = PatchSpec(8, 16, 24, pixels="yuv440")
    assert by_object == by_name and by_object.pixels == "yuv440" and by_object.pixel_format is pixels.YUV440
    assert by_object.to_json() == by_name.to_json() and json.loads(by_name.to_json())["pixels"] == "yuv440"
    assert PatchSpec(8, 16, 24, pixels=pixels.RGB).to_json() == PatchSpec(8, 16, 24).to_json()
    assert PatchSpec(8, 16, 24).pixel_format is pixels.RGB and "pixels" not in PatchSpec(8, 16, 24).describe()


@pytest.mark.parametrize("name, shape", [("rgb", (8, 16, 24, 3)), ("yuv440", (8, 8, 24, 4))])
def test_record_shape_is_the_shape_to_record_gives_and_the_models_input(name, shape):
    from stpkeras.models import build_model

    fmt = pixels.get(name)
    assert fmt.record_shape(8, 16, 24) == shape and fmt.channels == shape[-1]
    assert PatchSpec(8, 16, 24, pixels=name).shape == shape
    record = fmt.to_record(_random((2, 8, 16, 24, 3), seed=10))
    assert record.shape == (2, *shape) and record.dtype == np.uint8
    assert tuple(build_model("stcnn", PatchSpec(8, 16, 24, pixels=name), 3).input_shape[1:]) == shape


# The most a pixel moves through to_record then to_rgb, on clips whose pairs of rows share their colour
# (yuv440 keeps one chroma for each pair) and on any clip (where the pair's averaged chroma is all there is).
ROUND_TRIP_MAX_ERROR = {"rgb": (0, 0), "yuv440": (2, 255)}


@pytest.mark.parametrize("name", list(pixels.PIXEL_FORMATS))
def test_to_rgb_inverts_to_record_within_the_formats_error(name):
    fmt = pixels.get(name)
    same_pairs = np.repeat(_random((3, 4, 6, 10, 3), seed=11), 2, axis=2)     # [3, 4, 12, 10, 3]
    anything = _random((3, 4, 12, 10, 3), seed=12)
    for clip, bound in zip((same_pairs, anything), ROUND_TRIP_MAX_ERROR[name]):
        back = fmt.to_rgb(fmt.to_record(clip))
        assert back.shape == clip.shape and back.dtype == np.uint8
        assert np.abs(back.astype(int) - clip).max() <= bound
    spec = PatchSpec(4, 12, 10, pixels=name)
    assert np.array_equal(pixels.to_rgb(spec, pixels.to_record(spec, same_pairs)),
                          fmt.to_rgb(fmt.to_record(same_pairs)))


@pytest.mark.parametrize("name", list(pixels.PIXEL_FORMATS))
def test_normalize_gives_the_rgb_of_to_rgb_for_every_format(name):
    from stpkeras.models import layers

    fmt = pixels.get(name)
    record = fmt.to_record(_random((2, 3, 8, 6, 3), seed=13))
    layer = layers.Normalize(pixels=fmt)
    out = np.asarray(layer(record))
    assert layer.pixels == name and layer.get_config()["pixels"] == name
    assert out.shape == (2, 3, 8, 6, 3) == layer.compute_output_shape(record.shape)
    expected = fmt.to_rgb(record).astype(np.float32) / 127.5 - 1.0
    assert np.abs(out - expected).max() <= (0 if fmt.pixel_aligned else 0.5) / 127.5 + 1e-5


def test_refusals_keep_their_messages():
    from stpkeras.models import layers
    from tfrecords_tools.convert import ConvertConfig, check_pixels
    from tfrecords_tools.sources import Item

    with pytest.raises(ValueError) as e:
        PatchSpec(8, 15, 24, pixels="yuv440")
    assert str(e.value) == ("Invalid value for argument `height`. Expected an even patch height with "
                            "pixels='yuv440' (chroma covers pairs of rows). Received height=15")
    PatchSpec(8, 15, 24)  # rgb takes any height
    with pytest.raises(ValueError) as e:
        ConvertConfig(src="in", out="out", spec=PatchSpec(8, 16, 24, pixels="yuv440"), encoding="png")
    assert str(e.value) == ("Invalid arguments: pixels='yuv440' is stored raw (JPEG and PNG hold RGB frames). "
                            "Received encoding='png'")
    for encoding in ("raw", "jpeg", "png"):
        pixels.RGB.check_encoding(encoding)
    pixels.YUV440.check_encoding("raw")
    with pytest.raises(ValueError) as e:
        layers.require_rgb(PatchSpec(4, 32, 32, pixels="yuv440"), "an enhancer")
    assert str(e.value) == ("Invalid value for argument `spec`. Expected rgb patches for an enhancer (its output "
                            "is aligned pixel for pixel with the input's rows; convert with --pixels rgb). "
                            "Received pixels='yuv440'")
    layers.require_rgb(PatchSpec(4, 32, 32), "an enhancer")
    item = Item(id="a.mp4", path="a.mp4", label=None, target="b.mp4")
    check_pixels(ConvertConfig(src="pairs.csv", out="out", spec=PatchSpec(4, 32, 32)), [item])
    with pytest.raises(Exception) as e:
        check_pixels(ConvertConfig(src="pairs.csv", out="out", spec=PatchSpec(4, 32, 32, pixels="yuv440")), [item])
    assert str(e.value) == ("pairs.csv: a.mp4 has a 'target' column (enhancement/segmentation data), which needs "
                            "--pixels rgb. Received pixels='yuv440'")
    with pytest.raises(ValueError, match=r"Received pixels='bgr'"):
        layers.Normalize(pixels="bgr")
    from stpkeras import augment

    with pytest.raises(ValueError, match=r"Received pixels='bgr'"):
        augment.make_augment("color", "bgr")


def test_cli_offers_the_registered_formats():
    from stpkeras.cli import main

    for command in ("convert", "demo"):
        option = next(p for p in main.commands[command].params if p.name == "pixels")
        assert list(option.type.choices) == list(pixels.PIXEL_FORMATS) and option.default == pixels.DEFAULT.name


def _format_name_literals(source: str, filename: str = "<source>"):
    """(line, code) of each comparison with a format's name, and of each hand-written collection of names
    (a `click.Choice([...])`, a dict keyed by name) in `source`."""
    import ast

    names = set(pixels.PIXEL_FORMATS)

    def is_name(node):
        return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names

    def has_name(node):
        return is_name(node) or (isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(map(is_name, node.elts)))

    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Compare):
            hit = any(map(has_name, [node.left, *node.comparators]))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            hit = any(map(is_name, node.elts))
        elif isinstance(node, ast.Dict):
            hit = any(k is not None and is_name(k) for k in node.keys)
        elif isinstance(node, ast.MatchValue):
            hit = is_name(node.value)
        else:
            continue
        if hit:
            found.append((node.lineno, ast.get_source_segment(source, node)))
    return found


def test_the_format_check_catches_comparisons_and_hand_written_vocabularies():
    source = ('if spec.pixels == "yuv440": pass\nok = pixels != "rgb"\nx = name in ("rgb", "yuv440")\n'
              'c = click.Choice(["rgb", "yuv440"])\nd = {"rgb": 1}\ndefault = "rgb"\nmsg = "use --pixels rgb"\n')
    assert sorted({line for line, _ in _format_name_literals(source)}) == [1, 2, 3, 4, 5]


def test_no_module_but_pixels_compares_a_format_by_name():
    """What a format means is asked of its `PixelFormat`; names are only data (defaults, messages, JSON)."""
    from pathlib import Path

    import stpkeras
    import tfrecords_tools

    owner = Path(pixels.__file__).resolve()
    files = [p for package in (stpkeras, tfrecords_tools)
             for p in sorted(Path(package.__file__).parent.rglob("*.py")) if p.resolve() != owner]
    assert len(files) > 30
    found = {f"{p.name}:{line}": code for p in files for line, code in _format_name_literals(p.read_text(), str(p))}
    assert found == {}, "compare formats through tfrecords_tools.pixels.PixelFormat, not by name: " + repr(found)
