"""Record stage: `encode_patch` / `parse_patch` / `decode_pixels` round trip, eagerly and inside tf.data."""

import numpy as np
import pytest
import tensorflow as tf

from tfrecords_tools import schema
from videos import pattern_frames

SHAPE = (3, 16, 24, 3)
META = dict(video_id="cls/a b.mp4", video_size=(30, 45, 71), index=(2, 1, 0), offset=(8, 16, 0),
            valid=(3, 13, 24), timestamp=0.32, label=4, label_name="cls", split="val")


@pytest.fixture(scope="module")
def pixels():
    # Smooth content so JPEG stays close to the original.
    return pattern_frames(SHAPE[0], SHAPE[1], SHAPE[2], seed=7)


def _encode(pixels, encoding, **kw):
    return schema.encode_patch(pixels, encoding=encoding, quality=95, **{**META, **kw})


def _check_metadata(f):
    def scalar(v):
        v = v.numpy() if hasattr(v, "numpy") else v
        return v.decode() if isinstance(v, bytes) else v

    assert list(np.asarray(f[schema.SHAPE])) == list(SHAPE)
    assert list(np.asarray(f[schema.INDEX])) == [2, 1, 0]
    assert list(np.asarray(f[schema.OFFSET])) == [8, 16, 0]
    assert list(np.asarray(f[schema.VALID])) == [3, 13, 24]
    assert list(np.asarray(f[schema.VIDEO_SIZE])) == [30, 45, 71]
    assert scalar(f[schema.VIDEO_ID]) == "cls/a b.mp4"
    assert scalar(f[schema.LABEL]) == 4
    assert scalar(f[schema.LABEL_NAME]) == "cls"
    assert scalar(f[schema.SPLIT]) == "val"
    assert scalar(f[schema.VERSION]) == schema.SCHEMA_VERSION
    assert scalar(f[schema.TIMESTAMP]) == pytest.approx(0.32, abs=1e-6)


def _assert_pixels(decoded, pixels, encoding):
    decoded = np.asarray(decoded)
    assert decoded.dtype == np.uint8 and decoded.shape == SHAPE
    if encoding == "jpeg":  # lossy: close, not equal
        diff = np.abs(decoded.astype(int) - pixels.astype(int))
        assert diff.mean() < 2.0 and diff.max() < 40
    else:
        np.testing.assert_array_equal(decoded, pixels)


def test_keys_are_distinct_and_every_record_has_exactly_them(pixels):
    keys = [schema.PATCH, schema.SHAPE, schema.ENCODING, schema.INDEX, schema.OFFSET, schema.VALID,
            schema.TIMESTAMP, schema.VIDEO_ID, schema.VIDEO_SIZE, schema.LABEL, schema.LABEL_NAME,
            schema.SPLIT, schema.VERSION]
    assert len(set(keys)) == len(keys)
    for encoding in ("raw", "jpeg", "png"):
        example = tf.train.Example.FromString(_encode(pixels, encoding))
        assert set(example.features.feature) == set(keys)
        assert set(schema.feature_spec(encoding)) == set(keys)


@pytest.mark.parametrize("encoding", ["raw", "jpeg", "png"])
def test_round_trip_eager(pixels, encoding):
    record = _encode(pixels, encoding)
    f = schema.parse_patch(tf.constant(record), encoding)
    assert f[schema.ENCODING].numpy() == encoding.encode()
    _check_metadata(f)
    _assert_pixels(schema.decode_pixels(f[schema.PATCH], encoding, SHAPE), pixels, encoding)


@pytest.mark.parametrize("encoding", ["raw", "jpeg", "png"])
def test_round_trip_inside_dataset_map(pixels, encoding):
    other = pixels[::-1].copy()
    records = [_encode(pixels, encoding), _encode(other, encoding, label=1, split="train")]

    def parse(serialized):
        f = schema.parse_patch(serialized, encoding)
        return schema.decode_pixels(f[schema.PATCH], encoding, SHAPE), f[schema.LABEL]

    ds = tf.data.Dataset.from_tensor_slices(records).map(parse)
    assert ds.element_spec[0].shape == SHAPE  # static shape, as models need it
    out = list(ds.as_numpy_iterator())
    assert [label for _, label in out] == [4, 1]
    _assert_pixels(out[0][0], pixels, encoding)
    _assert_pixels(out[1][0], other, encoding)


def test_raw_bytes_are_the_array_bytes(pixels):
    example = tf.train.Example.FromString(_encode(pixels, "raw"))
    assert example.features.feature[schema.PATCH].bytes_list.value == [pixels.tobytes()]


def test_jpeg_and_png_store_one_image_per_frame(pixels):
    for encoding, magic in (("jpeg", b"\xff\xd8"), ("png", b"\x89PNG")):
        data = tf.train.Example.FromString(_encode(pixels, encoding)).features.feature[schema.PATCH].bytes_list.value
        assert len(data) == SHAPE[0] and all(d.startswith(magic) for d in data)


def test_unlabelled_defaults():
    example = schema.encode_patch(np.zeros((1, 2, 2, 3), np.uint8), video_id="v", video_size=(1, 2, 2),
                                  index=(0, 0, 0), offset=(0, 0, 0), valid=(1, 2, 2), timestamp=0.0)
    f = schema.parse_patch_numpy(example)
    assert f[schema.LABEL] == schema.UNLABELLED == -1
    assert f[schema.LABEL_NAME] == ""
    assert f[schema.SPLIT] == "train"


@pytest.mark.parametrize("encoding", ["raw", "jpeg", "png"])
def test_parse_patch_numpy(pixels, encoding):
    f = schema.parse_patch_numpy(_encode(pixels, encoding), SHAPE)
    assert f[schema.ENCODING] == encoding
    _check_metadata(f)
    _assert_pixels(f[schema.PATCH], pixels, encoding)


def _tamper(record: bytes, key: str, *, ints=None, data=None, drop=False) -> bytes:
    example = tf.train.Example.FromString(record)
    feature = example.features.feature
    if drop:
        del feature[key]
    elif ints is not None:
        feature[key].int64_list.value[:] = ints
    else:
        feature[key].bytes_list.value[:] = data
    return example.SerializeToString()


def test_parse_patch_numpy_errors(pixels):
    raw = _encode(pixels, "raw")
    png = _encode(pixels, "png")
    with pytest.raises(ValueError, match=r"patch shape \(3, 16, 24, 3\) differs from the spec's \(4, 16, 24, 3\)"):
        schema.parse_patch_numpy(raw, (4, 16, 24, 3))
    with pytest.raises(ValueError, match=r"raw patch holds 3455 bytes, expected 3456 for shape \(3, 16, 24, 3\)"):
        schema.parse_patch_numpy(_tamper(raw, schema.PATCH, data=[pixels.tobytes()[:-1]]))
    with pytest.raises(ValueError, match=r"record lacks features \['patch/shape'\]"):
        schema.parse_patch_numpy(_tamper(raw, schema.SHAPE, drop=True))
    with pytest.raises(ValueError, match="png patch holds 2 frames, expected 3"):
        frames = tf.train.Example.FromString(png).features.feature[schema.PATCH].bytes_list.value
        schema.parse_patch_numpy(_tamper(png, schema.PATCH, data=list(frames)[:2]))
    with pytest.raises(ValueError, match=f"schema version 99, expected {schema.SCHEMA_VERSION}"):
        schema.parse_patch_numpy(_tamper(raw, schema.VERSION, ints=[99]))
    with pytest.raises(Exception):  # not a tf.train.Example at all
        schema.parse_patch_numpy(b"\x01\x02garbage")


def test_encode_refuses_wrong_arrays():
    with pytest.raises(ValueError, match=r"Expected a uint8 \[T, H, W, C\] patch. Received dtype=float32"):
        schema.encode_patch(np.zeros((1, 2, 2, 3), np.float32), video_id="v", video_size=(1, 2, 2),
                            index=(0, 0, 0), offset=(0, 0, 0), valid=(1, 2, 2), timestamp=0.0)
    with pytest.raises(ValueError, match="Received encoding='webp'"):
        schema.encode_frames(np.zeros((1, 2, 2, 3), np.uint8), "webp")


def test_multi_label_values_and_segment_round_trip(pixels):
    record = _encode(pixels, "raw", label=schema.UNLABELLED, label_name="run;jump",
                     video_id=schema.segment_id("cls/a b.mp4", 1.5, 4.0),
                     multi_hot=[0, 1, 0, 1], values=[0.25, -3.0], interval=(1.5, 4.0))
    example = tf.train.Example.FromString(record)
    assert list(example.features.feature[schema.MULTI_HOT].int64_list.value) == [0, 1, 0, 1]
    f = schema.parse_patch(tf.constant(record), "raw", num_classes=4, num_values=2, segment=True)
    assert f[schema.MULTI_HOT].numpy().tolist() == [0, 1, 0, 1]
    assert f[schema.VALUES].numpy().tolist() == [0.25, -3.0]
    assert f[schema.INTERVAL].numpy().tolist() == [1.5, 4.0]
    assert f[schema.VIDEO_ID].numpy() == b"cls/a b.mp4#t=1.5,4"
    assert f[schema.LABEL].numpy() == -1 and f[schema.LABEL_NAME].numpy() == b"run;jump"
    n = schema.parse_patch_numpy(record)
    assert n[schema.MULTI_HOT] == [0, 1, 0, 1] and n[schema.VALUES] == [0.25, -3.0]
    assert n[schema.INTERVAL] == [1.5, 4.0]
    # One value stays a list (K = 1), and a record of a whole video parses with interval (-1, -1).
    plain = _encode(pixels, "raw", values=[7.0])
    assert schema.parse_patch_numpy(plain)[schema.VALUES] == [7.0]
    f = schema.parse_patch(tf.constant(plain), "raw", num_values=1, segment=True)
    assert f[schema.INTERVAL].numpy().tolist() == [-1.0, -1.0] and f[schema.VALUES].numpy().tolist() == [7.0]


def test_optional_keys_are_absent_unless_given(pixels):
    keys = set(tf.train.Example.FromString(_encode(pixels, "raw")).features.feature)
    assert not keys & {schema.MULTI_HOT, schema.VALUES, schema.INTERVAL}


@pytest.mark.parametrize("start,end,expected", [(1.5, 4.0, "a.mp4#t=1.5,4"), (0, 10.25, "a.mp4#t=0,10.25"),
                                                (0.0004, 2.1234, "a.mp4#t=0,2.123"), (12.5, 13.1, "a.mp4#t=12.5,13.1")])
def test_segment_id(start, end, expected):
    assert schema.segment_id("a.mp4", start, end) == expected


def test_encode_refuses_bad_multi_hot_and_interval(pixels):
    with pytest.raises(ValueError, match=r"Expected a multi-hot vector of 0s and 1s.*Received \[0, 2\]"):
        _encode(pixels, "raw", multi_hot=[0, 2])
    with pytest.raises(ValueError, match=r"Expected a segment interval.*Received \[4.0, 1.0\]"):
        _encode(pixels, "raw", interval=(4.0, 1.0))
