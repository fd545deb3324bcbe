"""Model stage: the layers every model family shares (pixel normalisation, positional embedding).

`Normalize` is the one place where uint8 pixels become floats: every model's
first layer, and the function `to_unit` for code that needs the same mapping.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import keras
import numpy as np
from keras import ops

from stpkeras import pixel_formats

PACKAGE = "stpkeras"


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
    pair's chroma for both its rows, clipped to the range of RGB pixels
    (`stpkeras.pixel_formats` holds each format's conversion).
    """

    def __init__(self, pixels: str = "rgb", **kwargs):
        super().__init__(**kwargs)
        self._format = pixel_formats.get(pixels)   # ValueError naming the formats for an unknown one
        self.pixels = self._format.format.name      # the name: what get_config and saved models hold
        self.supports_masking = False

    def call(self, inputs):
        return self._format.to_unit(ops.cast(inputs, self.compute_dtype))

    def compute_output_shape(self, input_shape):
        return self._format.unit_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "pixels": self.pixels}


@keras.saving.register_keras_serializable(package=PACKAGE)
class PositionalEmbedding(keras.layers.Layer):
    """Adds a learned embedding per token position to `[B, N, D]` tokens.

    With `grid_shape` `(t, h, w)` (tokens in that order, time first), the embedding starts as the fixed 3-D
    sine-cosine table of VideoMAE (a third of the channels per axis, `sincos_table`) and is trained from
    there: from the first step, neighbouring positions have similar embeddings, which a masked autoencoder's
    decoder needs to place what it rebuilds (from a random start it has to learn the grid first). Without,
    it starts from a truncated normal of `initializer_stddev`."""

    def __init__(self, initializer_stddev: float = 0.02, grid_shape=None, **kwargs):
        super().__init__(**kwargs)
        if not initializer_stddev > 0:
            raise ValueError("Invalid value for argument `initializer_stddev`. Expected a strictly positive "
                             f"value. Received initializer_stddev={initializer_stddev}")
        self.initializer_stddev = initializer_stddev
        self.grid_shape = None if grid_shape is None else tuple(int(g) for g in grid_shape)

    def build(self, input_shape):
        _, tokens, dim = input_shape
        if self.grid_shape is not None:
            if math.prod(self.grid_shape) != tokens:
                raise ValueError("Invalid value for argument `grid_shape`. Expected a grid of as many positions "
                                 f"as tokens ({tokens}). Received grid_shape={self.grid_shape}")
            table = sincos_table(self.grid_shape, dim)
            initializer = lambda shape, dtype=None: ops.convert_to_tensor(table, dtype=dtype)  # noqa: E731
        else:
            initializer = keras.initializers.TruncatedNormal(stddev=self.initializer_stddev)
        self.embedding = self.add_weight(name="embedding", shape=(tokens, dim), initializer=initializer)

    def call(self, tokens):
        return tokens + ops.cast(self.embedding, tokens.dtype)[None]

    def get_config(self):
        return {**super().get_config(), "initializer_stddev": self.initializer_stddev,
                "grid_shape": None if self.grid_shape is None else list(self.grid_shape)}


def sincos_table(grid_shape, dim: int) -> np.ndarray:
    """float32 `[t*h*w, dim]`: per axis of the grid `(t, h, w)`, sines and cosines of the position at
    geometrically spaced frequencies (Vaswani et al.), on a third of the channels each (the rest zero)."""
    per_axis = (dim // 3) // 2 * 2
    half = per_axis // 2
    frequencies = 1.0 / 10000.0 ** (np.arange(half, dtype="float64") / max(half, 1))
    axes = np.meshgrid(*(np.arange(g, dtype="float64") for g in grid_shape), indexing="ij")
    parts = []
    for position in axes:
        angle = position.reshape(-1, 1) * frequencies[None]
        parts += [np.sin(angle), np.cos(angle)]
    table = np.concatenate(parts + [np.zeros((math.prod(grid_shape), dim - 3 * per_axis))], axis=1)
    return table.astype("float32")


def patch_input(spec, any_size: bool = False) -> keras.KerasTensor:
    """The model input for patches of `spec`: `uint8 [None, *spec.shape]` (`[T, H, W, 3]` for rgb), named 'patch'.
    `any_size`: height and width left open (`[None, T, None, None, C]`), for fully convolutional models that
    train on crops of the patches (the run's spec stays the contract of loading and export)."""
    shape = (spec.shape[0], None, None, *spec.shape[3:]) if any_size else spec.shape
    return keras.Input(shape=shape, dtype="uint8", name="patch")


def normalize(spec, inputs, name: str = "normalize"):
    """Every model's first layer: `Normalize` for `spec.pixels` -> float RGB `[B, T, H, W, 3]` in [-1, 1]."""
    return Normalize(pixels=spec.pixels, name=name)(inputs)


def require_rgb(spec, what: str) -> None:
    """Models whose output is aligned with the input's pixels (enhancement, segmentation) take rgb patches."""
    if not spec.pixel_format.pixel_aligned:
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
    given = values
    try:
        values = tuple(values)
    except TypeError:           # one value (an int, or anything else that is then refused below)
        values = (values,)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"Invalid value for argument `{name}`. Expected strictly positive integers. "
                         f"Received {name}={given!r}")
    return values


def check_classes(num_classes, minimum: int = 1) -> int:
    """The number of outputs of a head: one is allowed (a single value of `--task regress`); the tasks check
    their own minimum (classify and segment: two classes)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < minimum:
        raise ValueError(f"Invalid value for argument `num_classes`. Expected an integer >= {minimum}. "
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


def dct_matrix(size: int) -> np.ndarray:
    """The orthonormal DCT-II matrix `D` (`D @ x` transforms a column; `D.T` inverts it), as SciPy's
    `dct(norm="ortho")` computes."""
    k, n = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    d = np.cos(np.pi * (2 * n + 1) * k / (2 * size)) * np.sqrt(2.0 / size)
    d[0] /= np.sqrt(2.0)
    return d.astype(np.float32)


def block_shrink(x, threshold, block: int = 8, step: int = 2):
    """Float frames `[B, T, H, W, C]` -> the same, deblocked by re-applying a block transform's quantizer.

    Each frame's `block` x `block` DCT (orthonormal, per channel) at every shift of the grid by `step`
    pixels (16 shifts at 8 and 2; `step` must divide `block`), coefficients with |c| < `threshold` zeroed
    but the DC, back and averaged over the shifts (Nosratinia 2001, what FFmpeg's `spp` filter does): a
    block edge that one grid's quantizer made is not on the other grids, and their mean smooths it.
    `threshold` is in the frames' units (0-255 pixels) and may be a tensor (0: the identity, up to float
    rounding). Frames are mirrored by `block` pixels at their borders so that every shift covers every
    pixel; height and width may be any size over `block` and unknown until the call.
    `stpkeras.baselines.shifted_dct` and the enhancers' deblocking stage (`ResidualPixels(deblock=...)`)
    both run this.
    """
    import tensorflow as tf

    # The shifts at `step` are the blocks at every `step`-th row and column: a convolution at that stride
    # computes them all. Separably (columns, then rows, each an 8-tap convolution per coefficient) that is
    # about 320 multiply-adds a pixel and a quarter of the time of a `block` x `block` basis as one kernel
    # or of 16 shifted block transforms (0.72-0.88 s against 3.26 s for 8 frames of 360x640, where the
    # default enhancer took 3.05 s). On 8x64x64 patches, whose mirrored borders double the pixels, it takes 0.22 s
    # a batch of 8 where the default enhancer takes 0.36 (`stp enhance`'s model time 1.6x).
    x = tf.convert_to_tensor(x, tf.float32)
    d = dct_matrix(block)
    columns = tf.constant(d.T.reshape(block, 1, 1, block))    # tap y -> coefficient i: d[i, y]
    rows = tf.constant(d.T.reshape(1, block, 1, block))
    shape = tf.shape(x)
    b, t, h, w, c = shape[0], shape[1], shape[2], shape[3], shape[4]
    planes = tf.reshape(tf.transpose(x, [0, 1, 4, 2, 3]), [-1, h, w, 1])     # every channel of every frame
    padded = tf.pad(planes, [[0, 0], [block, block], [block, block], [0, 0]], mode="REFLECT")
    n, ph, pw = tf.shape(padded)[0], h + 2 * block, w + 2 * block
    v = tf.nn.conv2d(padded, columns, strides=(step, 1), padding="VALID")            # [n, y, pw, i]
    ny = tf.shape(v)[1]
    v = tf.reshape(tf.transpose(v, [0, 3, 1, 2]), [-1, ny, pw, 1])                   # [n * i, y, pw, 1]
    coef = tf.nn.conv2d(v, rows, strides=(1, step), padding="VALID")                  # [n * i, y, x, l]
    nx = tf.shape(coef)[2]
    coef = tf.reshape(coef, [n, block, ny, nx, block])
    dc = np.zeros((block, 1, 1, block), bool)
    dc[0, 0, 0, 0] = True                                    # the DC coefficient (i = l = 0) is always kept
    coef = tf.where(tf.logical_or(tf.abs(coef) >= tf.cast(threshold, tf.float32), dc), coef, 0.0)
    v = tf.nn.conv2d_transpose(tf.reshape(coef, [-1, ny, nx, block]), rows, [n * block, ny, pw, 1],
                               strides=(1, step), padding="VALID")
    v = tf.transpose(tf.reshape(v, [n, block, ny, pw]), [0, 2, 3, 1])
    back = tf.nn.conv2d_transpose(v, columns, [n, ph, pw, 1], strides=(step, 1), padding="VALID")
    out = back[:, block:block + h, block:block + w, 0] / float((block // step) ** 2)   # 16 blocks cover a pixel
    return tf.transpose(tf.reshape(out, [b, t, c, h, w]), [0, 1, 3, 4, 2])


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResidualPixels(keras.layers.Layer):
    """`[uint8 pixels [B, T, H, W, C], residual [B, T, H, W, C]]` -> float32 pixels `pixels + 127.5 * residual`.

    The output layer of the enhancement models: they predict a residual in
    `to_unit`'s scale, added here in float32 to the exact input values (not to
    their normalised copy, which is bfloat16 under mixed precision), so a zero
    residual returns the input unchanged. Not clipped: the loss sees the raw values;
    serving clips and rounds to uint8.

    `deblock` B > 0 adds a deblocking stage after the sum, outside training: `block_shrink` on B x B blocks
    with the layer's non-trainable weight `deblock_threshold` (0 when built: the identity). Training leaves it
    at 0; `stp train` chooses it on paired data's patches at the end of the run (`tasks.Enhance.tune_model`),
    so a model file, its SavedModel and `stp enhance` carry the threshold chosen for it.
    """

    def __init__(self, deblock: int = 0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if isinstance(deblock, bool) or not isinstance(deblock, int) or deblock < 0:
            raise ValueError("Invalid value for argument `deblock`. Expected a block size in pixels (8: H.264's "
                             f"transform), or 0 for no deblocking stage. Received deblock={deblock!r}")
        self.deblock = deblock

    def build(self, input_shapes):
        if self.deblock:
            self.deblock_threshold = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                                     name="deblock_threshold", dtype="float32")

    def call(self, inputs, training=None):
        pixels, residual = inputs
        out = ops.cast(pixels, "float32") + ops.cast(residual, "float32") * 127.5
        if self.deblock and not training:
            out = block_shrink(out, self.deblock_threshold, block=self.deblock)
        return out

    def compute_output_shape(self, input_shapes):
        return input_shapes[0]

    def get_config(self):
        return {**super().get_config(), **({"deblock": self.deblock} if self.deblock else {})}


def enhance_output(pixels, residual, deblock: int = 0):
    """The enhancement models' output layer, named 'pixels' (see `ResidualPixels`)."""
    return ResidualPixels(deblock=deblock, name="pixels")([pixels, residual])


@keras.saving.register_keras_serializable(package=PACKAGE)
class PixelPhases(keras.layers.Layer):
    """`[B, T, H, W, C]` -> `[B, T, H/f, W/f, f*f*C]`: each frame's `f x f` blocks of pixels as channels
    (pixel unshuffle; FFDNet's sub-images), in (row in the block, column, channel) order; `inverse` puts
    them back. Height and width may be unknown until the call (any frame size that `f` divides), so a
    model built on it still trains on crops and runs on whole frames.
    """

    def __init__(self, factor: int, inverse: bool = False, **kwargs):
        super().__init__(**kwargs)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError("Invalid value for argument `factor`. Expected an integer >= 1. "
                             f"Received factor={factor!r}")
        self.factor = factor
        self.inverse = bool(inverse)

    def call(self, x):
        f = self.factor
        shape = ops.shape(x)
        t, h, w, c = shape[1], shape[2], shape[3], shape[4]
        if not self.inverse:
            x = ops.reshape(x, (-1, t, h // f, f, w // f, f, c))
            x = ops.transpose(x, (0, 1, 2, 4, 3, 5, 6))
            return ops.reshape(x, (-1, t, h // f, w // f, f * f * c))
        x = ops.reshape(x, (-1, t, h, w, f, f, c // (f * f)))
        x = ops.transpose(x, (0, 1, 2, 4, 3, 5, 6))
        return ops.reshape(x, (-1, t, h * f, w * f, c // (f * f)))

    def compute_output_shape(self, input_shape):
        b, t, h, w, c = input_shape
        f = self.factor
        if self.inverse:
            return (b, t, h and h * f, w and w * f, c // (f * f))
        return (b, t, h and h // f, w and w // f, c * f * f)

    def get_config(self):
        return {**super().get_config(), "factor": self.factor, "inverse": self.inverse}


# --- pooling and reshaping layers (the embed task's views, segmentation's per-frame features) ----------

@keras.saving.register_keras_serializable(package=PACKAGE)
class GlobalMean(keras.layers.Layer):
    """Mean over `axes` (e.g. (1, 2, 3): time, height, width of `[B, T, H, W, C]`), in float32."""

    def __init__(self, axes: Sequence[int], **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.axes = tuple(int(a) for a in axes)

    def call(self, x):
        return ops.mean(ops.cast(x, "float32"), axis=self.axes)

    def compute_output_shape(self, input_shape):
        return tuple(d for i, d in enumerate(input_shape) if i not in self.axes)

    def get_config(self):
        return {**super().get_config(), "axes": list(self.axes)}


@keras.saving.register_keras_serializable(package=PACKAGE)
class GridMean(keras.layers.Layer):
    """`[B, T, H, W, C]` -> `float32 [B, cells * cells * C]`: the mean over time and over each cell of a
    `cells x cells` grid of the picture, each cell's `C` values L2-normalised, then divided by `cells`
    so that the whole vector has norm 1. Unlike a global mean, it keeps where in the picture things
    are (what tells two shots of one scene apart). H and W must be multiples of `cells`."""

    def __init__(self, cells: int, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if int(cells) < 1:
            raise ValueError(f"Invalid value for argument `cells`. Expected a strictly positive value. "
                             f"Received cells={cells!r}")
        self.cells = int(cells)

    def build(self, input_shape):
        _, _, h, w, _ = input_shape
        if h % self.cells or w % self.cells:
            raise ValueError(f"GridMean({self.cells}): the map's height and width must be multiples of "
                             f"{self.cells}; received a map of shape {tuple(input_shape)}")

    def call(self, x):
        _, _, h, w, c = x.shape
        n = self.cells
        x = ops.mean(ops.cast(x, "float32"), axis=1)                                  # [B, H, W, C]
        x = ops.reshape(x, (-1, n, h // n, n, w // n, c))
        x = ops.mean(x, axis=(2, 4))                                                   # [B, n, n, C]
        x = x / ops.maximum(ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True)), 1e-12)
        return ops.reshape(x, (-1, n * n * c)) / float(n)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.cells * self.cells * input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "cells": self.cells}


@keras.saving.register_keras_serializable(package=PACKAGE)
class MergeViews(keras.layers.Layer):
    """`[B, V, ...]` -> `[B * V, ...]`: every view goes through the encoder as its own patch."""

    def call(self, x):
        return ops.reshape(x, (-1, *x.shape[2:]))

    def compute_output_shape(self, input_shape):
        batch = None if input_shape[0] is None else input_shape[0] * input_shape[1]
        return (batch, *input_shape[2:])


@keras.saving.register_keras_serializable(package=PACKAGE)
class SplitViews(keras.layers.Layer):
    """`[B * V, D]` -> `[B, V, D]`, the inverse of `MergeViews`."""

    def __init__(self, views: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.views = int(views)

    def call(self, x):
        return ops.reshape(x, (-1, self.views, x.shape[-1]))

    def compute_output_shape(self, input_shape):
        batch = None if input_shape[0] is None else input_shape[0] // self.views
        return (batch, self.views, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "views": self.views}
