"""Model stage: `motionnet`, the motion between neighbouring frames of a patch (the default of `--task stabilize`).

A classifier backbone pools its feature map away before the head, and with it *where* things are: it
cannot tell how far the picture moved between two frames (a tiny stcnn trained on the shake reached a
correlation of -0.08 with the true dx). `motionnet` keeps the spatial layout up to the head:

    uint8 [B, T, H, W, 3] -> Normalize -> FrameContrast -> FramePairs: [B, T-1, H, W, 9] (frame t,
    frame t+1, their difference), next to a cost volume (`Correlation`) -> Conv3D (1, 5, 5) ->
    Conv3D (1, 3, 3) stride (1, 2, 2) per width -> per pair flatten
    ('features' [B, T-1, h*w*C]: the layout is still in it) -> Dense -> Dense(k) per pair -> logits
    [B, (T-1) * k]

The temporal kernel of 1 after `FramePairs` shares one estimator across the pairs: every pair is
measured alike whatever its place in the window, which is what the overlapping windows of `stp
stabilize` average.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from stpkeras.models import layers


@keras.saving.register_keras_serializable(package=layers.PACKAGE)
class FramePairs(keras.layers.Layer):
    """`[B, T, H, W, C]` -> `[B, T-1, H, W, 3C]`: each frame t next to frame t+1 and their difference."""

    def call(self, x):
        a, b = x[:, :-1], x[:, 1:]
        return ops.concatenate([a, b, b - a], axis=-1)

    def compute_output_shape(self, input_shape):
        b, t, h, w, c = input_shape
        return (b, None if t is None else t - 1, h, w, 3 * c)


@keras.saving.register_keras_serializable(package=layers.PACKAGE)
class FrameContrast(keras.layers.Layer):
    """`[B, T, H, W, C]` -> each frame less its mean, over its deviation (+ `epsilon`): the same motion
    shows as the same input in a flat cartoon and in textured camera footage. Without it a regressor
    trained on one kind of footage scales its estimates by the other's contrast (on the animation it
    under-estimated the motion by about a third, at a correlation of 0.92)."""

    def __init__(self, epsilon: float = 0.05, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, x):
        mean = ops.mean(x, axis=(2, 3, 4), keepdims=True)
        std = ops.sqrt(ops.mean(ops.square(x - mean), axis=(2, 3, 4), keepdims=True))
        return (x - mean) / (std + self.epsilon)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package=layers.PACKAGE)
class Correlation(keras.layers.Layer):
    """Features `[B, T, H, W, C]` -> `[B, T-gap, H, W, (2r+1)^2]`: for each pair of frames `gap` apart (1:
    neighbours) and each displacement (dx, dy) up to `radius`, the mean over channels of f_t(p) *
    f_t+gap(p + d) (zero outside the frame): a cost volume (FlowNetC's correlation), where a shift shows as
    the displacement that matches. A gap of 2 doubles each motion's displacement, so a slow one moves by
    whole feature pixels."""

    def __init__(self, radius: int = 3, gap: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.radius = int(radius)
        self.gap = int(gap)

    def call(self, x):
        r, g = self.radius, self.gap
        a, b = x[:, :-g], x[:, g:]
        h, w = x.shape[2], x.shape[3]
        b = ops.pad(b, [[0, 0], [0, 0], [r, r], [r, r], [0, 0]])
        return ops.stack([ops.mean(a * b[:, :, r + dy:r + dy + h, r + dx:r + dx + w], axis=-1)
                          for dy in range(-r, r + 1) for dx in range(-r, r + 1)], axis=-1)

    def compute_output_shape(self, input_shape):
        b, t, h, w, _ = input_shape
        return (b, None if t is None else t - self.gap, h, w, (2 * self.radius + 1) ** 2)

    def get_config(self):
        return {**super().get_config(), "radius": self.radius, "gap": self.gap}


@keras.saving.register_keras_serializable(package=layers.PACKAGE)
class MatchSoftmax(keras.layers.Layer):
    """A cost volume `[..., D]` (one value per displacement) -> at each place, a softmax over its displacements
    at a learned temperature: which displacement matches best, relative to the others. What all of a place's
    displacements share drops out (the raw products are high everywhere on strong texture and near zero on
    flat areas, whatever moved), and a flat place, which matches every displacement alike, gives about the
    uniform distribution. The temperature starts at `temperature` and is learned (as its log)."""

    def __init__(self, temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = float(temperature)
        if not self.temperature > 0:
            raise ValueError(f"Invalid value for argument `temperature`. Expected a number > 0. "
                             f"Received temperature={temperature!r}")

    def build(self, input_shape):
        self.log_temperature = self.add_weight(
            shape=(), name="log_temperature", initializer=keras.initializers.Constant(math.log(self.temperature)))

    def call(self, x):
        return ops.softmax(x * ops.cast(ops.exp(-self.log_temperature), x.dtype), axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


COSTS = ("products", "softmax")


def build_motionnet(spec, num_classes: int, *, widths=(16, 32, 64), dense: int = 128, radius: int = 3,
                    name: str = "motionnet") -> keras.Model:
    """uint8 `[B, T, H, W, 3]` -> `[B, num_classes]`: `num_classes / (T-1)` values per pair of neighbouring
    frames, pair by pair (`num_classes` must be a multiple of T-1)."""
    num_classes = layers.check_classes(num_classes)
    pairs = spec.frames - 1
    if pairs < 1 or num_classes % pairs:
        raise ValueError(f"Invalid value for argument `num_classes`. motionnet outputs the same number of values "
                         f"for each of the {pairs} pair(s) of neighbouring frames of a {spec.frames}-frame patch, "
                         f"so it needs a multiple of {pairs}. Received num_classes={num_classes!r}")
    widths = layers.positive_ints(widths, "widths")
    dense = layers.positive_ints(dense, "dense")[0]
    if not isinstance(radius, int) or isinstance(radius, bool) or radius < 0:
        raise ValueError(f"Invalid value for argument `radius`. Expected an integer >= 0 (0: no correlation). "
                         f"Received radius={radius!r}")
    inputs = layers.patch_input(spec)
    pixels = FrameContrast(name="contrast")(layers.normalize(spec, inputs))
    x = FramePairs(name="pairs")(pixels)
    if radius:
        frame_features = keras.layers.Conv3D(widths[0], (1, 3, 3), padding="same", name="match_features")(pixels)
        costs = Correlation(radius, name="correlation")(frame_features)
        x = keras.layers.Concatenate(name="pairs_and_costs")([x, costs])
    x = keras.layers.Conv3D(widths[0], (1, 5, 5), padding="same", activation="relu", name="conv0")(x)
    for i, width in enumerate(widths):
        x = keras.layers.Conv3D(width, (1, 3, 3), strides=(1, 2, 2), padding="same", activation="relu",
                                name=f"conv{i + 1}")(x)
    _, _, h, w, c = x.shape
    features = keras.layers.Reshape((pairs, h * w * c), name="features")(x)
    x = keras.layers.Dense(dense, activation="relu", name="hidden")(features)
    x = keras.layers.Dense(num_classes // pairs, name="pair_logits")(x)
    logits = keras.layers.Reshape((num_classes,), name="logits")(x)
    return keras.Model(inputs, logits, name=name)


def build_corrnet(spec, num_classes: int, *, match: int = 4, stride: int = 2, radius: int = 2, gap: int = 1,
                  widths=(32, 64), cost: str = "softmax", dropout: float = 0.0, name: str = "corrnet") -> keras.Model:
    """uint8 `[B, T, H, W, 3]` -> logits `[B, num_classes]`: a classifier of motion that sees the picture only
    through how neighbouring frames match.

        Normalize -> FrameContrast -> Conv3D (1, 3, 3) stride (1, `stride`, `stride`): `match` features per
        frame -> Correlation (`radius`): [B, T-1, H/s, W/s, (2r+1)^2] -> AveragePooling (1, 2, 2) -> Conv3D
        (3, 3, 3) per width, stride (1, 2, 2) after the first -> global mean ('features') -> Dense (logits)

    The cost volume says, at each place and pair of frames, which displacement matches; the global mean
    keeps what moved and how far, not where nor what it looked like. On pans classified on footage of
    another kind (benchmarks/motion_classify.py) stcnn, which reads the flattened map of one filter bank over
    the pixels, learned the training videos' pictures instead. `radius` x `stride` is the fastest motion
    matched, in pixels a frame (4 by default: a pan of 3 px a frame at 64x64 is inside). The cost volume
    is the expensive part (each displacement a product of two feature maps, forward and backward): 16
    features at full resolution and radius 3 took 40x the CPU of stcnn per step, the defaults about 2x.
    `gap` 2 matches frames two apart (a pan of 1 px a frame then moves a whole feature pixel; with `radius`
    3 the fastest fits too): 1.6x the CPU a step, and no better on the pan benchmark in 15 minutes.
    `cost` "softmax" (the default) reads the cost volume through `MatchSoftmax` (each place's distribution
    over the displacements), "products" the raw products: level without test-time flips on the pan
    benchmark, and 0.03-0.05 ahead with them over left-right, top-bottom and time (`--tta` with
    `--tta-flip-labels t:...`), two seeds both ways.
    """
    num_classes = layers.check_classes(num_classes)
    match = layers.positive_ints(match, "match")[0]
    stride = layers.positive_ints(stride, "stride")[0]
    widths = layers.positive_ints(widths, "widths")
    if not isinstance(radius, int) or isinstance(radius, bool) or radius < 1:
        raise ValueError(f"Invalid value for argument `radius`. Expected an integer >= 1. Received radius={radius!r}")
    gap = layers.positive_ints(gap, "gap")[0]
    if cost not in COSTS:
        raise ValueError(f"Invalid value for argument `cost`. Expected one of {COSTS}. Received cost={cost!r}")
    if spec.frames < gap + 1:
        raise ValueError(f"Invalid value for argument `spec`. corrnet matches frames {gap} apart (gap={gap}), so "
                         f"it needs patches of at least {gap + 1} frames. Received frames={spec.frames}")
    inputs = layers.patch_input(spec)
    pixels = FrameContrast(name="contrast")(layers.normalize(spec, inputs))
    x = keras.layers.Conv3D(match, (1, 3, 3), strides=(1, stride, stride), padding="same",
                            name="match_features")(pixels)
    x = Correlation(radius, gap, name="correlation")(x)
    if cost == "softmax":
        x = MatchSoftmax(name="match_softmax")(x)
    # Half the cost volume's layout each way first: the convolutions after it cost a quarter.
    x = keras.layers.AveragePooling3D((1, 2, 2), padding="same", name="cost_pool")(x)
    for i, width in enumerate(widths):
        x = keras.layers.Conv3D(width, 3, strides=(1, 2, 2) if i else 1, padding="same", activation="relu",
                                name=f"conv{i}")(x)
    features = layers.GlobalMean((1, 2, 3), name="features")(x)
    logits = layers.classifier_head(features, num_classes, layers.check_rate(dropout))
    return keras.Model(inputs, logits, name=name)
