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
| `target/data` | as `patch/data` (optional) | clean pixels aligned with `patch/data` (pairs: a `target` CSV column) |
| `mask/data` | bytes x1 (optional) | class ids `uint8 [T, H, W]`, raw, cut on the patch's grid (a `mask` CSV column) |
| `label/frames` | int64 [T] (optional) | class of each frame, -1 outside every interval (an `intervals` column) |
| `label/multi_hot` | int64 [C] (optional) | 1 for each of the item's classes (multi-label sources) |
| `value/data` | float [K] (optional) | the item's regression values, in the manifest's `value_names` order |
| `segment/interval` | float [2] (optional) | start, end in seconds of the source video (segments) |

The optional keys are written only when the source has them: records of other sources keep their bytes.
A multi-label record has `label/index` -1 and `label/name` its class names joined by `;`. A segment's
`video/id` is `PATH#t=START,END` (W3C Media Fragments; `segment_id`).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Dict, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # names in annotations only
    import tensorflow as tf

# TensorFlow loads on first use: writing raw records needs only numpy, so conversion workers start
# without it (importing TensorFlow costs each spawned worker about 2 s of CPU).

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
TARGET = "target/data"  # optional: only records of paired data (path,target CSV) carry it
# Optional segmentation targets: records of videos without them are written exactly as before.
MASK = "mask/data"           # raw uint8 [T, H, W] class ids (always raw: a lossy codec would change the ids)
FRAME_LABELS = "label/frames"  # int64 [T]
# Optional item targets and provenance: written only when the source has them.
MULTI_HOT = "label/multi_hot"    # int64 [C]: multi-label sources (label/index is then UNLABELLED)
VALUES = "value/data"            # float [K]: regression values, named by the manifest's `value_names`
INTERVAL = "segment/interval"    # float [2]: (start, end) seconds of the source video, for segments

UNLABELLED = -1
MULTI_LABEL_SEPARATOR = ";"  # `label/name` of a multi-label record: its class names joined by this


def format_seconds(seconds: float) -> str:
    """Seconds as written in a segment's id: 3 decimals, trailing zeros and dot stripped (`1.5`, `4`, `0`)."""
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def segment_id(video_id: str, start: float, end: float) -> str:
    """The `VIDEO_ID` of a segment: `PATH#t=START,END` (W3C Media Fragments temporal syntax, seconds)."""
    return f"{video_id}#t={format_seconds(start)},{format_seconds(end)}"


# `encode_patch` writes the protobuf wire format of `tf.train.Example` (example.proto, feature.proto)
# itself. Building the message with protobuf cost 1.3 ms for a 16x112x112 raw patch (600 kB), about
# what decoding its 16 frames costs: every `Feature(bytes_list=...)` copies its payload and each fresh
# message's buffers are page-faulted in again. Joining the pieces once costs one copy: 39 us (8x64x64:
# 59 -> 28 us). The bytes are those of `Example.SerializeToString(deterministic=True)`: map entries
# sorted by key (UTF-8 bytes), each entry its key then its value, ints and floats packed;
# tests/test_schema_wire.py checks them against protobuf.
#
# Tags (field number << 3 | 2: length-delimited) of the fields written. Field 1 is `Example.features`,
# `Features.feature` (a map entry), the entry's key and the lists' `value`; field 2 the entry's value.
_TAG_1, _TAG_2 = b"\x0a", b"\x12"
_BYTES_LIST, _FLOAT_LIST, _INT64_LIST = b"\x0a", b"\x12", b"\x1a"  # the `Feature.kind` oneof
_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _ONE_BYTE[value]
    value &= 0xFFFFFFFFFFFFFFFF  # int64: negatives as two's complement, ten bytes
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _nbytes(piece) -> int:
    return piece.nbytes if isinstance(piece, memoryview) else len(piece)


def _bytes(values: Sequence) -> list:
    """The pieces of a `Feature` with a `BytesList` (values: bytes, or flat uint8 memoryviews, not copied)."""
    pieces = [b""]
    size = 0
    for v in values:
        head = _TAG_1 + _varint(_nbytes(v))
        pieces += (head, v)
        size += len(head) + _nbytes(v)
    pieces[0] = _BYTES_LIST + _varint(size)
    return pieces


def _packed(kind: bytes, packed: bytes) -> list:
    inner = _TAG_1 + _varint(len(packed)) + packed if packed else b""
    return [kind + _varint(len(inner)) + inner]


def _ints(values: Sequence[int]) -> list:
    return _packed(_INT64_LIST, b"".join([_varint(int(v)) for v in values]))


def _floats(values: Sequence[float]) -> list:
    return _packed(_FLOAT_LIST, np.asarray([float(v) for v in values], dtype="<f4").tobytes())


@functools.lru_cache(maxsize=256)
def _key(key: str) -> bytes:
    raw = key.encode()
    return _TAG_1 + _varint(len(raw)) + raw


def _serialize_example(features: Dict[str, list]) -> bytes:
    """`{key: feature pieces}` -> the serialized `tf.train.Example` (deterministic: keys sorted)."""
    pieces = [b""]
    size = 0
    for name in sorted(features, key=str.encode):
        feature = features[name]
        length = sum([_nbytes(p) for p in feature])
        body = _key(name) + _TAG_2 + _varint(length)
        head = _TAG_1 + _varint(len(body) + length) + body
        pieces.append(head)
        pieces += feature
        size += len(head) + length
    pieces[0] = _TAG_1 + _varint(size)
    return b"".join(pieces)


def _payload(pixels: np.ndarray, encoding: str, quality: int) -> list:
    """As `encode_frames`, but raw pixels stay a view (copied once, by the final join)."""
    if encoding == "raw":
        return [memoryview(np.ascontiguousarray(pixels, dtype=np.uint8).reshape(-1))]
    return encode_frames(pixels, encoding, quality)


def encode_frames(pixels: np.ndarray, encoding: str, quality: int = 90) -> list:
    """`uint8 [T, H, W, C]` -> the list of byte strings stored under `PATCH`."""
    import tensorflow as tf

    if encoding == "raw":
        return [np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()]
    if encoding == "jpeg":
        return [tf.io.encode_jpeg(frame, quality=quality, chroma_downsampling=False).numpy()
                for frame in pixels]
    if encoding == "png":
        return [tf.io.encode_png(frame).numpy() for frame in pixels]
    raise ValueError("Invalid value for argument `encoding`. Expected raw, jpeg or png. "
                     f"Received encoding={encoding!r}")


def encode_patch(pixels: np.ndarray, *, encoding: str = "raw", quality: int = 90, video_id: str,
                 video_size: Sequence[int], index: Sequence[int], offset: Sequence[int],
                 valid: Sequence[int], timestamp: float, label: int = UNLABELLED,
                 label_name: str = "", split: str = "train", target: Optional[np.ndarray] = None,
                 mask: Optional[np.ndarray] = None, frame_labels: Optional[Sequence[int]] = None,
                 multi_hot: Optional[Sequence[int]] = None, values: Optional[Sequence[float]] = None,
                 interval: Optional[Sequence[float]] = None) -> bytes:
    """Serializes one `uint8 [T, H, W, C]` patch and its metadata to a `tf.train.Example`.

    `target`, when given, is the clean patch aligned with `pixels` (same shape), stored under `TARGET`
    with the same encoding. `multi_hot` (int 0/1 [C]), `values` (float [K]) and `interval` (float [2]:
    start, end seconds) are stored under `MULTI_HOT`, `VALUES` and `INTERVAL` when given.
    """
    if pixels.dtype != np.uint8 or pixels.ndim != 4:
        raise ValueError(f"Expected a uint8 [T, H, W, C] patch. Received dtype={pixels.dtype}, shape={pixels.shape}")
    if target is not None and (target.dtype != np.uint8 or target.shape != pixels.shape):
        raise ValueError(f"Expected a uint8 target of the patch's shape {pixels.shape}. "
                         f"Received dtype={target.dtype}, shape={target.shape}")
    feature = {
        PATCH: _bytes(_payload(pixels, encoding, quality)),
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
    if target is not None:
        feature[TARGET] = _bytes(_payload(target, encoding, quality))
    if mask is not None:
        if mask.dtype != np.uint8 or mask.shape != pixels.shape[:3]:
            raise ValueError(f"Expected a uint8 mask [T, H, W] = {list(pixels.shape[:3])}. "
                             f"Received dtype={mask.dtype}, shape={list(mask.shape)}")
        feature[MASK] = _bytes([memoryview(np.ascontiguousarray(mask).reshape(-1))])
    if frame_labels is not None:
        if len(frame_labels) != pixels.shape[0]:
            raise ValueError(f"Expected one frame label per frame ({pixels.shape[0]}). "
                             f"Received {len(frame_labels)}")
        feature[FRAME_LABELS] = _ints(frame_labels)
    if multi_hot is not None:
        if not len(multi_hot) or any(int(v) not in (0, 1) for v in multi_hot):
            raise ValueError(f"Expected a multi-hot vector of 0s and 1s, one per class. Received {list(multi_hot)}")
        feature[MULTI_HOT] = _ints(multi_hot)
    if values is not None:
        feature[VALUES] = _floats(values)
    if interval is not None:
        if len(interval) != 2 or not 0 <= interval[0] < interval[1]:
            raise ValueError(f"Expected a segment interval (start, end) with 0 <= start < end seconds. "
                             f"Received {list(interval)}")
        feature[INTERVAL] = _floats(interval)
    # Keys sorted, as protobuf's deterministic=True: its default orders map entries by a hash seeded per
    # process, so the same patch would give different bytes in each worker and run, and shard sha256s
    # would depend on --workers.
    return _serialize_example(feature)


def feature_spec(encoding: str, target: bool = False, mask: bool = False,
                 frame_labels: bool = False, num_classes: int = 0, num_values: int = 0,
                 segment: bool = False) -> Dict[str, tf.io.FixedLenFeature]:
    """The parsing spec for `tf.io.parse_example` of records written with `encoding` (`target`: with `TARGET`).

    `num_classes` > 0 parses `MULTI_HOT` (int64 [num_classes]: multi-label records), `num_values` > 0
    `VALUES` (float32 [num_values]), `segment` `INTERVAL` (float32 [2], (-1, -1) in records of whole videos).
    """
    import tensorflow as tf

    data = (tf.io.FixedLenFeature([], tf.string) if encoding == "raw"
            else tf.io.VarLenFeature(tf.string))
    spec = {
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
    if target:
        spec[TARGET] = data
    if mask:
        spec[MASK] = tf.io.FixedLenFeature([], tf.string)
    if frame_labels:
        spec[FRAME_LABELS] = tf.io.VarLenFeature(tf.int64)
    if num_classes:
        spec[MULTI_HOT] = tf.io.FixedLenFeature([num_classes], tf.int64)
    if num_values:
        spec[VALUES] = tf.io.FixedLenFeature([num_values], tf.float32)
    if segment:
        # A dataset may mix segments and whole videos (a CSV with and without start/end).
        spec[INTERVAL] = tf.io.FixedLenFeature([2], tf.float32, default_value=[-1.0, -1.0])
    return spec


def parse_patch(serialized: tf.Tensor, encoding: str, target: bool = False, mask: bool = False,
                frame_labels: bool = False, num_classes: int = 0, num_values: int = 0,
                segment: bool = False) -> Dict[str, tf.Tensor]:
    """Parses one serialized record (a scalar string tensor) into its features.

    Pure TF: usable eagerly and inside `Dataset.map`. `PATCH` (and `TARGET`,
    with `target=True`) stay encoded; `decode_pixels` turns them into pixels.
    """
    import tensorflow as tf

    features = tf.io.parse_single_example(
        serialized, feature_spec(encoding, target, mask, frame_labels, num_classes, num_values, segment))
    if frame_labels:
        features[FRAME_LABELS] = tf.sparse.to_dense(features[FRAME_LABELS])
    if encoding != "raw":
        features[PATCH] = tf.sparse.to_dense(features[PATCH])
        if target:
            features[TARGET] = tf.sparse.to_dense(features[TARGET])
    return features


def decode_mask(data: tf.Tensor, size: Sequence[int]) -> tf.Tensor:
    """The raw `MASK` bytes of one patch -> `uint8 [T, H, W]` class ids with the static `size` (T, H, W)."""
    import tensorflow as tf

    return tf.reshape(tf.io.decode_raw(data, tf.uint8), [int(v) for v in size])


def decode_pixels(data: tf.Tensor, encoding: str, shape: Sequence[int]) -> tf.Tensor:
    """Encoded pixels of one patch -> `uint8 [T, H, W, C]` with the static `shape`.

    `data` is a scalar string (raw) or a `[T]` string vector (jpeg/png).
    """
    import tensorflow as tf

    t, h, w, c = (int(v) for v in shape)
    if encoding == "raw":
        pixels = tf.io.decode_raw(data, tf.uint8)
        return tf.reshape(pixels, [t, h, w, c])
    if encoding in ("jpeg", "png"):
        decode = tf.io.decode_jpeg if encoding == "jpeg" else tf.io.decode_png
        pixels = tf.map_fn(lambda s: decode(s, channels=c), data, fn_output_signature=tf.uint8)
        return tf.ensure_shape(pixels, [t, h, w, c])
    raise ValueError("Invalid value for argument `encoding`. Expected raw, jpeg or png. "
                     f"Received encoding={encoding!r}")


def parse_patch_numpy(serialized: bytes, shape: Optional[Sequence[int]] = None) -> Dict[str, object]:
    """Parses one record in plain Python (for `verify`, `inspect` and tests).

    Returns a dict of numpy values; `PATCH` (and `TARGET`, when present) is decoded to `uint8 [T, H, W, C]`.
    Raises `ValueError` saying what is wrong with the record.
    """
    import tensorflow as tf

    example = tf.train.Example.FromString(serialized)
    f = example.features.feature
    missing = [k for k in (PATCH, SHAPE, ENCODING, VIDEO_ID, VERSION) if k not in f]
    if missing:
        raise ValueError(f"record lacks features {missing}")
    declared = tuple(f[SHAPE].int64_list.value)
    if shape is not None and declared != tuple(shape):
        raise ValueError(f"patch shape {declared} differs from the spec's {tuple(shape)}")
    encoding = f[ENCODING].bytes_list.value[0].decode()
    pixels = _decode_numpy(list(f[PATCH].bytes_list.value), encoding, declared, "patch")
    out = {k: (list(v.int64_list.value) or list(v.float_list.value) or list(v.bytes_list.value))
           for k, v in f.items()}
    out = {k: (v[0] if len(v) == 1 and k not in (SHAPE, INDEX, OFFSET, VALID, VIDEO_SIZE, MULTI_HOT, VALUES) else v)
           for k, v in out.items()}
    for k in (ENCODING, VIDEO_ID, LABEL_NAME, SPLIT):
        if isinstance(out.get(k), bytes):
            out[k] = out[k].decode()
    out[PATCH] = pixels
    if TARGET in f:
        out[TARGET] = _decode_numpy(list(f[TARGET].bytes_list.value), encoding, declared, "target")
    if MASK in f:
        out[MASK] = _decode_numpy(list(f[MASK].bytes_list.value), "raw", declared[:3], "mask")
    if FRAME_LABELS in f:
        out[FRAME_LABELS] = list(f[FRAME_LABELS].int64_list.value)
    if out[VERSION] != SCHEMA_VERSION:
        raise ValueError(f"schema version {out[VERSION]}, expected {SCHEMA_VERSION}")
    return out


def _decode_numpy(data: list, encoding: str, declared: tuple, what: str) -> np.ndarray:
    import tensorflow as tf

    if encoding == "raw":
        expected = int(np.prod(declared))
        if len(data) != 1 or len(data[0]) != expected:
            raise ValueError(f"raw {what} holds {sum(map(len, data))} bytes, expected {expected} for shape {declared}")
        return np.frombuffer(data[0], np.uint8).reshape(declared)
    if len(data) != declared[0]:
        raise ValueError(f"{encoding} {what} holds {len(data)} frames, expected {declared[0]}")
    return decode_pixels(tf.constant(data), encoding, declared).numpy()
