"""schema writes the `tf.train.Example` wire format itself: its bytes must be protobuf's deterministic ones."""

import numpy as np
import pytest
import tensorflow as tf

from tfrecords_tools import schema


def _protobuf(features: dict) -> bytes:
    """The same features built with protobuf, serialized with deterministic=True."""
    feature = {}
    for key, (kind, values) in features.items():
        if kind == "bytes":
            feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
        elif kind == "ints":
            feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        else:
            feature[key] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def _ours(features: dict) -> bytes:
    make = {"bytes": schema._bytes, "ints": schema._ints, "floats": schema._floats}
    return schema._serialize_example({k: make[kind](v) for k, (kind, v) in features.items()})


@pytest.mark.parametrize("seed", range(20))
def test_random_examples_match_protobuf(seed):
    rng = np.random.default_rng(seed)
    keys = ["patch/data", "a", "b/c", "label/index", "é/ü", "x" * 200, "A", "split", "z"]
    features = {}
    for key in rng.choice(keys, size=int(rng.integers(0, len(keys) + 1)), replace=False):
        kind = ["bytes", "ints", "floats"][int(rng.integers(0, 3))]
        n = int(rng.choice([0, 1, 2, 3, 16, 200]))
        if kind == "bytes":
            values = [rng.integers(0, 256, int(rng.choice([0, 1, 127, 128, 300])), dtype=np.uint8).tobytes()
                      for _ in range(n)]
        elif kind == "ints":
            values = [int(v) for v in rng.choice([0, 1, -1, 127, 128, 2 ** 31, -2 ** 63, 2 ** 63 - 1, 10 ** 12], n)]
        else:
            values = [float(v) for v in rng.choice([0.0, -0.0, 1.5, 1e-30, 3.4e38, np.inf, -np.inf, 1 / 3], n)]
        features[str(key)] = (kind, values)
    assert _ours(features) == _protobuf(features)


def test_pixels_as_a_view_equal_pixels_as_bytes():
    pixels = np.arange(2 * 5 * 7 * 3, dtype=np.uint8).reshape(2, 5, 7, 3)
    view = schema._serialize_example({"p": schema._bytes([memoryview(pixels.reshape(-1))])})
    assert view == _protobuf({"p": ("bytes", [pixels.tobytes()])})


@pytest.mark.parametrize("encoding", ["raw", "jpeg", "png"])
def test_encode_patch_is_canonical_and_round_trips(encoding):
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (3, 11, 13, 3), dtype=np.uint8)
    pixels = big[:, 1:10, 2:12]  # not contiguous
    record = schema.encode_patch(
        pixels, encoding=encoding, quality=75, video_id="é/clip 1.mp4", video_size=(300, 9, 10),
        index=(2, 0, 1), offset=(6, 0, 12), valid=(3, 9, 10), timestamp=0.2, label=-1, label_name="",
        split="val", target=pixels[::-1].copy(), mask=np.full(pixels.shape[:3], 7, np.uint8),
        frame_labels=[-1, 0, 5])
    example = tf.train.Example.FromString(record)
    assert example.SerializeToString(deterministic=True) == record
    out = schema.parse_patch_numpy(record)
    if encoding != "jpeg":
        np.testing.assert_array_equal(out[schema.PATCH], pixels)
    assert out[schema.LABEL] == -1 and out[schema.VIDEO_ID] == "é/clip 1.mp4" and out[schema.SPLIT] == "val"
    assert out[schema.INDEX] == [2, 0, 1] and out[schema.VIDEO_SIZE] == [300, 9, 10]
    assert out[schema.TIMESTAMP] == pytest.approx(0.2)
    assert out[schema.FRAME_LABELS] == [-1, 0, 5]


@pytest.mark.parametrize("writer", ["plain", "tensorflow"])
def test_chunk_writer_frames_records_as_tensorflow_does(tmp_path, writer, monkeypatch):
    """The chunk writer's own TFRecord framing (google-crc32c) gives the bytes of `tf.io.TFRecordWriter`,
    and without google-crc32c's C extension it falls back to TensorFlow's writer."""
    from tfrecords_tools import shards

    if writer == "tensorflow":
        monkeypatch.setattr(shards, "_crc32c", lambda: None)
    records = [b"", b"x", bytes(range(256)) * 3000, np.random.default_rng(0).bytes(65537)]
    chunk = shards.ChunkWriter(str(tmp_path / "chunk.tfrecord"))
    assert isinstance(chunk._writer, shards._PlainWriter if writer == "plain" else shards._TFWriter)
    chunk.write(b"dropped")
    chunk.reset()  # a second read of the video starts the chunk again
    for r in records:
        chunk.write(r)
    chunk.commit()
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as w:
        for r in records:
            w.write(r)
    got = (tmp_path / "chunk.tfrecord").read_bytes()
    assert got == (tmp_path / "tf.tfrecord").read_bytes()
    assert len(got) == sum(chunk.sizes) and chunk.sizes == [len(r) + 16 for r in records]
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "chunk.tfrecord"))] == records
    assert not (tmp_path / "chunk.tfrecord.tmp").exists()


def test_optional_item_keys_match_protobuf():
    pixels = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    record = schema.encode_patch(
        pixels, video_id="a.mp4#t=1.5,4", video_size=(2, 3, 4), index=(0, 0, 0), offset=(0, 0, 0),
        valid=(2, 3, 4), timestamp=1.5, label=-1, label_name="a;c", split="train",
        multi_hot=[1, 0, 1], values=[0.5, 2.0], interval=(1.5, 4.0))
    example = tf.train.Example.FromString(record)
    assert example.SerializeToString(deterministic=True) == record
