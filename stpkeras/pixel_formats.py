"""Pixel-format stage, tensor side: what each `tfrecords_tools.pixels.PixelFormat` means to the model and
to the augmentations.

`tfrecords_tools` stays free of Keras, so a format's tensor code lives here, one
`TensorPixelFormat` per format keyed by the same name (`get(pixels)`): the
conversion to RGB in every model's first layer (`models.layers.Normalize`) and
what a colour change does to the stored values (`augment.random_color`). Flip
and crop need nothing per format: every format keeps the video's columns as
its columns (`PixelFormat.rows_per_row` says how many video rows a stored row
holds). Each method builds its part of a graph; picking the object happens in
Python, at trace time, so the graphs are the ones written for the format alone.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Union

import tensorflow as tf
from keras import ops

from tfrecords_tools import pixels as pixels_lib


@dataclasses.dataclass(frozen=True)
class TensorPixelFormat:
    """The tensor code of `format`; the base class is the code of stored RGB."""

    format: pixels_lib.PixelFormat

    def to_unit(self, x):
        """Stored pixels `[B, T, h, W, C]` as floats in 0..255 -> RGB `[B, T, H, W, 3]` in [-1, 1] (keras.ops)."""
        return x / 127.5 - 1.0

    def unit_shape(self, input_shape):
        """`compute_output_shape` of `to_unit`."""
        return input_shape

    def color_offset(self, patch: tf.Tensor, factor: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
        """The offset that, with `factor` as scale, applies contrast `factor` around the clip's mean and then
        brightness `delta` (0-255 units) to the RGB values: a scalar, or one offset per stored channel."""
        # A reduction over the flat patch: reducing per channel would stride over the 3-wide last axis.
        mean = tf.reduce_mean(tf.cast(tf.reshape(patch, [-1]), tf.float32))
        return (1.0 - factor) * mean + delta


def _yuv440_affine():
    """`[4, 6]` weights and `[6]` bias: packed (Y top, Y bottom, U, V) -> (R, G, B of the top row, of the
    bottom row) in [-1, 1] (`to_unit` of `YUV_TO_RGB` applied to Y, U - 128, V - 128)."""
    weights = [[0.0] * 6 for _ in range(4)]
    bias = [-1.0] * 6
    for row in range(2):
        for c, (y, u, v) in enumerate(pixels_lib.YUV_TO_RGB.tolist()):
            out = 3 * row + c
            weights[row][out] = y / 127.5
            weights[2][out], weights[3][out] = u / 127.5, v / 127.5
            bias[out] -= 128.0 * (u + v) / 127.5
    return weights, bias


_YUV440_WEIGHTS, _YUV440_BIAS = _yuv440_affine()


@dataclasses.dataclass(frozen=True)
class TensorYuv440(TensorPixelFormat):
    """Packed `[.., H/2, W, 4]` (Y top, Y bottom, U, V; `tfrecords_tools.pixels.pack_yuv440`)."""

    def to_unit(self, x):
        # `YUV_TO_RGB` with each pair's chroma for both its rows, clipped to the range of RGB pixels.
        # One matmul over the 4 packed values gives both rows' R, G, B in [-1, 1] (normalisation folded
        # into the weights), then the rows are interleaved: a few passes over the clip. Measured on CPU
        # for 32 clips of 16x112x112: 70 ms, against 195 ms converting plane by plane (and 22 ms for
        # `x / 127.5 - 1` on RGB input).
        _, t, half, w, _ = x.shape
        rows = ops.matmul(ops.reshape(x, (-1, 4)), ops.cast(_YUV440_WEIGHTS, x.dtype))  # a 2-D matmul: 2x faster
        rows = ops.reshape(rows + ops.cast(_YUV440_BIAS, x.dtype), (-1, t, half, w, 2, 3))
        rows = ops.transpose(rows, (0, 1, 2, 4, 3, 5))
        return ops.clip(ops.reshape(rows, (-1, t, 2 * half, w, 3)), -1.0, 1.0)

    def unit_shape(self, input_shape):
        b, t, half, w, _ = input_shape
        return (b, t, None if half is None else 2 * half, w, 3)

    def color_offset(self, patch: tf.Tensor, factor: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
        # The same change of the RGB values is, exactly (clipping aside), luma
        # `Y -> (Y - mean) * factor + mean + delta` and chroma `C -> (C - 128) * factor + 128`,
        # with the clip's mean luma as the mean.
        means = tf.reduce_mean(tf.cast(tf.reshape(patch, [-1, 4]), tf.float32), axis=0)
        luma = (1.0 - factor) * (means[0] + means[1]) / 2 + delta
        chroma = (1.0 - factor) * 128.0
        return tf.stack([luma, luma, chroma, chroma])


TENSOR_FORMATS: Dict[str, TensorPixelFormat] = {
    t.format.name: t for t in (TensorPixelFormat(pixels_lib.RGB), TensorYuv440(pixels_lib.YUV440))}


def get(pixels: Union[str, pixels_lib.PixelFormat]) -> TensorPixelFormat:
    """A format's name or `PixelFormat` -> its tensor code (`ValueError` for an unknown name)."""
    return TENSOR_FORMATS[pixels_lib.get(pixels).name]
