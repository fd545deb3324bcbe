"""Model stage: the layers every model family shares (pixel normalisation, positional embedding).

`Normalize` is the one place where uint8 pixels become floats: every model's
first layer, and the function `to_unit` for code that needs the same mapping.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import keras
from keras import ops

from tfrecords_tools.pixels import PIXEL_FORMATS, YUV_TO_RGB

PACKAGE = "stpkeras"


def _yuv440_affine():
    """`[4, 6]` weights and `[6]` bias: packed (Y top, Y bottom, U, V) -> (R, G, B of the top row, of the
    bottom row) in [-1, 1] (`to_unit` of `YUV_TO_RGB` applied to Y, U - 128, V - 128)."""
    weights = [[0.0] * 6 for _ in range(4)]
    bias = [-1.0] * 6
    for row in range(2):
        for c, (y, u, v) in enumerate(YUV_TO_RGB.tolist()):
            out = 3 * row + c
            weights[row][out] = y / 127.5
            weights[2][out], weights[3][out] = u / 127.5, v / 127.5
            bias[out] -= 128.0 * (u + v) / 127.5
    return weights, bias


_YUV440_WEIGHTS, _YUV440_BIAS = _yuv440_affine()


def to_unit(pixels):
    """uint8 (or float) pixels in [0, 255] -> float in [-1, 1] (`x / 127.5 - 1`), in the input's float dtype."""
    dtype = pixels.dtype if "float" in str(pixels.dtype) else "float32"
    return ops.cast(pixels, dtype) / 127.5 - 1.0


@keras.saving.register_keras_serializable(package=PACKAGE)
class Normalize(keras.layers.Layer):
    """uint8 pixels -> RGB floats in [-1, 1] in the layer's compute dtype.

    The first layer of every model, so the input pipeline and the serving
    signature stay uint8 and the conversion runs on the accelerator. With
    `pixels='rgb'` it takes `[B, T, H, W, 3]`; with `pixels='yuv440'` the packed
    `[B, T, H/2, W, 4]` of `tfrecords_tools.pixels` (luma of two rows, then U
    and V), which it turns into `[B, T, H, W, 3]` RGB: `YUV_TO_RGB` with each
    pair's chroma for both its rows, clipped to the range of RGB pixels.
    """

    def __init__(self, pixels: str = "rgb", **kwargs):
        super().__init__(**kwargs)
        if pixels not in PIXEL_FORMATS:
            raise ValueError(f"Invalid value for argument `pixels`. Expected one of {PIXEL_FORMATS}. "
                             f"Received pixels={pixels!r}")
        self.pixels = pixels
        self.supports_masking = False

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.pixels == "yuv440":
            return self._yuv440_to_unit(x)
        return x / 127.5 - 1.0

    def _yuv440_to_unit(self, x):
        # One matmul over the 4 packed values gives both rows' R, G, B in [-1, 1] (normalisation folded
        # into the weights), then the rows are interleaved: a few passes over the clip. Measured on CPU
        # for 32 clips of 16x112x112: 70 ms, against 195 ms converting plane by plane (and 22 ms for
        # `x / 127.5 - 1` on RGB input).
        _, t, half, w, _ = x.shape
        rows = ops.matmul(ops.reshape(x, (-1, 4)), ops.cast(_YUV440_WEIGHTS, x.dtype))  # a 2-D matmul: 2x faster
        rows = ops.reshape(rows + ops.cast(_YUV440_BIAS, x.dtype), (-1, t, half, w, 2, 3))
        rows = ops.transpose(rows, (0, 1, 2, 4, 3, 5))
        return ops.clip(ops.reshape(rows, (-1, t, 2 * half, w, 3)), -1.0, 1.0)

    def compute_output_shape(self, input_shape):
        if self.pixels == "yuv440":
            b, t, half, w, _ = input_shape
            return (b, t, None if half is None else 2 * half, w, 3)
        return input_shape

    def get_config(self):
        return {**super().get_config(), "pixels": self.pixels}


@keras.saving.register_keras_serializable(package=PACKAGE)
class PositionalEmbedding(keras.layers.Layer):
    """Adds a learned embedding per token position to `[B, N, D]` tokens."""

    def __init__(self, initializer_stddev: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        if not initializer_stddev > 0:
            raise ValueError("Invalid value for argument `initializer_stddev`. Expected a strictly positive "
                             f"value. Received initializer_stddev={initializer_stddev}")
        self.initializer_stddev = initializer_stddev

    def build(self, input_shape):
        _, tokens, dim = input_shape
        self.embedding = self.add_weight(
            name="embedding", shape=(tokens, dim),
            initializer=keras.initializers.TruncatedNormal(stddev=self.initializer_stddev))

    def call(self, tokens):
        return tokens + ops.cast(self.embedding, tokens.dtype)[None]

    def get_config(self):
        return {**super().get_config(), "initializer_stddev": self.initializer_stddev}


def patch_input(spec) -> keras.KerasTensor:
    """The model input for patches of `spec`: `uint8 [None, *spec.shape]` (`[T, H, W, 3]` for rgb), named 'patch'."""
    return keras.Input(shape=spec.shape, dtype="uint8", name="patch")


def normalize(spec, inputs, name: str = "normalize"):
    """Every model's first layer: `Normalize` for `spec.pixels` -> float RGB `[B, T, H, W, 3]` in [-1, 1]."""
    return Normalize(pixels=spec.pixels, name=name)(inputs)


def require_rgb(spec, what: str) -> None:
    """Models whose output is aligned with the input's pixels (enhancement, segmentation) take rgb patches."""
    if spec.pixels != "rgb":
        raise ValueError(f"Invalid value for argument `spec`. Expected rgb patches for {what} (its output is "
                         f"aligned pixel for pixel with the input's rows; convert with --pixels rgb). "
                         f"Received pixels={spec.pixels!r}")


def triple(value, name: str) -> Tuple[int, int, int]:
    """An int or three ints -> three strictly positive ints (checked)."""
    values = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(values) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"Invalid value for argument `{name}`. Expected a strictly positive integer or three "
                         f"of them (T, H, W). Received {name}={value!r}")
    return values


def positive_ints(values: Sequence[int], name: str) -> Tuple[int, ...]:
    values = (values,) if isinstance(values, int) else tuple(values)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"Invalid value for argument `{name}`. Expected strictly positive integers. "
                         f"Received {name}={values!r}")
    return values


def check_classes(num_classes) -> int:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError("Invalid value for argument `num_classes`. Expected an integer >= 2. "
                         f"Received num_classes={num_classes!r}")
    return num_classes


def check_rate(rate, name: str = "dropout") -> float:
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"Invalid value for argument `{name}`. Expected a value in [0, 1). Received {name}={rate!r}")
    return float(rate)


def classifier_head(features, num_classes: int, dropout: float = 0.0):
    """Pooled `features` -> `logits` (float32 even under mixed precision; no softmax)."""
    x = keras.layers.Dropout(dropout, name="head_dropout")(features) if dropout else features
    return keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResidualPixels(keras.layers.Layer):
    """`[uint8 pixels [B, T, H, W, C], residual [B, T, H, W, C]]` -> float32 pixels `pixels + 127.5 * residual`.

    The output layer of the enhancement models: they predict a residual in
    `to_unit`'s scale, added here in float32 to the exact input values (not to
    their normalised copy, which is bfloat16 under mixed precision), so a zero
    residual returns the input unchanged. Not clipped: the loss sees the raw values;
    serving clips and rounds to uint8.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, inputs):
        pixels, residual = inputs
        return ops.cast(pixels, "float32") + ops.cast(residual, "float32") * 127.5

    def compute_output_shape(self, input_shapes):
        return input_shapes[0]

    def get_config(self):
        return super().get_config()


def enhance_output(pixels, residual):
    """The enhancement models' output layer, named 'pixels' (see `ResidualPixels`)."""
    return ResidualPixels(name="pixels")([pixels, residual])
