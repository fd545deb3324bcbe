"""Record stage: the one schema of a patch record (`tf.train.Example`), its encoder and its parser.

Every writer, reader, exporter and verifier imports the keys and the
`encode_patch` / `parse_patch` / `decode_pixels` functions from here; no
feature key is ever written as a string anywhere else.

A record holds one patch:

| key | type | meaning |
|---|---|---|
| `patch/data` | bytes x1 (raw) or x T (one JPEG/PNG per frame) | the pixels |
| `patch/shape` | int64 [4] | T, H, W, C |
| `patch/encoding` | bytes | `raw`, `jpeg` or `png` |
| `patch/index` | int64 [3] | grid index (t, y, x) |
| `patch/offset` | int64 [3] | first frame, top row, left column in the resized video |
| `patch/valid` | int64 [3] | frames, rows, columns of real data (the rest is padding) |
| `patch/timestamp` | float | seconds of the first frame |
| `video/id` | bytes | path relative to the source root |
| `video/size` | int64 [3] | frame count, height, width of the resized, resampled video |
| `label/index` | int64 | class index, -1 when unlabelled |
| `label/name` | bytes | class name, empty when unlabelled |
| `split` | bytes | split name |
| `schema/version` | int64 | `SCHEMA_VERSION` |
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import tensorflow as tf

SCHEMA_VERSION = 1

PATCH = "patch/data"
SHAPE = "patch/shape"
ENCODING = "patch/encoding"
INDEX = "patch/index"
OFFSET = "patch/offset"
VALID = "patch/valid"
TIMESTAMP = "patch/timestamp"
VIDEO_ID = "video/id"
VIDEO_SIZE = "video/size"
LABEL = "label/index"
LABEL_NAME = "label/name"
SPLIT = "split"
VERSION = "schema/version"

UNLABELLED = -1


def _bytes(values: Sequence[bytes]) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(values: Sequence[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _floats(values: Sequence[float]) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def encode_frames(pixels: np.ndarray, encoding: str, quality: int = 90) -> list:
    """`uint8 [T, H, W, C]` -> the list of byte strings stored under `PATCH`."""
    if encoding == "raw":
        return [np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()]
    if encoding == "jpeg":
        return [tf.io.encode_jpeg(frame, quality=quality, chroma_downsampling=False).numpy()
                for frame in pixels]
    if encoding == "png":
        return [tf.io.encode_png(frame).numpy() for frame in pixels]
    raise ValueError(f"Invalid value for argument `encoding`. Expected raw, jpeg or png. Received encoding={encoding!r}")


def encode_patch(pixels: np.ndarray, *, encoding: str = "raw", quality: int = 90, video_id: str,
                 video_size: Sequence[int], index: Sequence[int], offset: Sequence[int],
                 valid: Sequence[int], timestamp: float, label: int = UNLABELLED,
                 label_name: str = "", split: str = "train") -> bytes:
    """Serializes one `uint8 [T, H, W, C]` patch and its metadata to a `tf.train.Example`."""
    if pixels.dtype != np.uint8 or pixels.ndim != 4:
        raise ValueError(f"Expected a uint8 [T, H, W, C] patch. Received dtype={pixels.dtype}, shape={pixels.shape}")
    feature = {
        PATCH: _bytes(encode_frames(pixels, encoding, quality)),
        SHAPE: _ints(pixels.shape),
        ENCODING: _bytes([encoding.encode()]),
        INDEX: _ints(index),
        OFFSET: _ints(offset),
        VALID: _ints(valid),
        TIMESTAMP: _floats([timestamp]),
        VIDEO_ID: _bytes([video_id.encode()]),
        VIDEO_SIZE: _ints(video_size),
        LABEL: _ints([label]),
        LABEL_NAME: _bytes([label_name.encode()]),
        SPLIT: _bytes([split.encode()]),
        VERSION: _ints([SCHEMA_VERSION]),
    }
    # deterministic=True writes the feature map sorted by key. Without it, protobuf (upb) orders map
    # entries by a hash seeded per process: the same patch gives different bytes in each worker
    # process and each run, and shard sha256s would depend on --workers.
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def feature_spec(encoding: str) -> Dict[str, tf.io.FixedLenFeature]:
    """The parsing spec for `tf.io.parse_example` of records written with `encoding`."""
    data = (tf.io.FixedLenFeature([], tf.string) if encoding == "raw"
            else tf.io.VarLenFeature(tf.string))
    return {
        PATCH: data,
        SHAPE: tf.io.FixedLenFeature([4], tf.int64),
        ENCODING: tf.io.FixedLenFeature([], tf.string),
        INDEX: tf.io.FixedLenFeature([3], tf.int64),
        OFFSET: tf.io.FixedLenFeature([3], tf.int64),
        VALID: tf.io.FixedLenFeature([3], tf.int64),
        TIMESTAMP: tf.io.FixedLenFeature([], tf.float32),
        VIDEO_ID: tf.io.FixedLenFeature([], tf.string),
        VIDEO_SIZE: tf.io.FixedLenFeature([3], tf.int64),
        LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=UNLABELLED),
        LABEL_NAME: tf.io.FixedLenFeature([], tf.string, default_value=""),
        SPLIT: tf.io.FixedLenFeature([], tf.string, default_value=""),
        VERSION: tf.io.FixedLenFeature([], tf.int64),
    }


def parse_patch(serialized: tf.Tensor, encoding: str) -> Dict[str, tf.Tensor]:
    """Parses one serialized record (a scalar string tensor) into its features.

    Pure TF: usable eagerly and inside `Dataset.map`. `PATCH` stays encoded;
    `decode_pixels` turns it into pixels.
    """
    features = tf.io.parse_single_example(serialized, feature_spec(encoding))
    if encoding != "raw":
        features[PATCH] = tf.sparse.to_dense(features[PATCH])
    return features


def decode_pixels(data: tf.Tensor, encoding: str, shape: Sequence[int]) -> tf.Tensor:
    """Encoded pixels of one patch -> `uint8 [T, H, W, C]` with the static `shape`.

    `data` is a scalar string (raw) or a `[T]` string vector (jpeg/png).
    """
    t, h, w, c = (int(v) for v in shape)
    if encoding == "raw":
        pixels = tf.io.decode_raw(data, tf.uint8)
        return tf.reshape(pixels, [t, h, w, c])
    if encoding in ("jpeg", "png"):
        decode = tf.io.decode_jpeg if encoding == "jpeg" else tf.io.decode_png
        pixels = tf.map_fn(lambda s: decode(s, channels=c), data, fn_output_signature=tf.uint8)
        return tf.ensure_shape(pixels, [t, h, w, c])
    raise ValueError(f"Invalid value for argument `encoding`. Expected raw, jpeg or png. Received encoding={encoding!r}")


def parse_patch_numpy(serialized: bytes, shape: Optional[Sequence[int]] = None) -> Dict[str, object]:
    """Parses one record in plain Python (for `verify`, `inspect` and tests).

    Returns a dict of numpy values; `PATCH` is decoded to `uint8 [T, H, W, C]`.
    Raises `ValueError` saying what is wrong with the record.
    """
    example = tf.train.Example.FromString(serialized)
    f = example.features.feature
    missing = [k for k in (PATCH, SHAPE, ENCODING, VIDEO_ID, VERSION) if k not in f]
    if missing:
        raise ValueError(f"record lacks features {missing}")
    declared = tuple(f[SHAPE].int64_list.value)
    if shape is not None and declared != tuple(shape):
        raise ValueError(f"patch shape {declared} differs from the spec's {tuple(shape)}")
    encoding = f[ENCODING].bytes_list.value[0].decode()
    data = list(f[PATCH].bytes_list.value)
    if encoding == "raw":
        expected = int(np.prod(declared))
        if len(data) != 1 or len(data[0]) != expected:
            raise ValueError(f"raw patch holds {sum(map(len, data))} bytes, expected {expected} for shape {declared}")
        pixels = np.frombuffer(data[0], np.uint8).reshape(declared)
    else:
        if len(data) != declared[0]:
            raise ValueError(f"{encoding} patch holds {len(data)} frames, expected {declared[0]}")
        pixels = decode_pixels(tf.constant(data), encoding, declared).numpy()
    out = {k: (list(v.int64_list.value) or list(v.float_list.value) or list(v.bytes_list.value))
           for k, v in f.items()}
    out = {k: (v[0] if len(v) == 1 and k not in (SHAPE, INDEX, OFFSET, VALID, VIDEO_SIZE) else v)
           for k, v in out.items()}
    for k in (ENCODING, VIDEO_ID, LABEL_NAME, SPLIT):
        if isinstance(out.get(k), bytes):
            out[k] = out[k].decode()
    out[PATCH] = pixels
    if out[VERSION] != SCHEMA_VERSION:
        raise ValueError(f"schema version {out[VERSION]}, expected {SCHEMA_VERSION}")
    return out
