"""Model stage: `softmotion`, the global motion between neighbouring frames read off a cost volume by soft-argmax.

`motionnet` regresses the motion from a flattened feature map through dense layers: its estimates come out in
whatever scale training gave them (on unseen animation, about 0.6 of the true motion), and never finer than its
training allowed. A camera's shake moves the whole frame, so the motion can be *read* instead:

    uint8 [B, T, H, W, 3] -> Normalize -> FrameContrast -> Conv3D (1, 3, 3) x 2: learned features per frame,
    full resolution -> GlobalCorrelation: for each pair of neighbouring frames and each displacement d up to
    `radius`, the normalised correlation of frame t's features with frame t+1's shifted by d, averaged over
    the whole frame and over each quadrant ([B, T-1, 5, 2r+1, 2r+1], by FFT: any radius costs the same)
    -> SoftArgmax: around the whole frame's best integer displacement (+-`window`), a softmax with a learned
    temperature, and the expected displacement -> [B, T-1, 4]: dx, dy (the whole frame's), rotation and
    log-scale (least squares over the quadrants' displacements, in pixels at the patch's edge)

The expected displacement is in the model's pixels from the first step (no gain to learn), and sub-pixel: if
the correlation is locally quadratic about its peak at d*, softmax(correlation / temperature) is a Gaussian
centred at d*, and its mean is d* whatever the temperature, up to the window's truncation (too warm) and
the integer grid (too cold); training sets the temperature and the features between the two.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from stpkeras.models import layers
from stpkeras.models.motion import FrameContrast

REGIONS = 5   # the whole frame, then its quadrants: top-left, top-right, bottom-left, bottom-right


def _quadrants(height: int, width: int):
    """`[(top, bottom, left, right)]` of the whole frame and its four quadrants."""
    h, w = height // 2, width // 2
    return [(0, height, 0, width), (0, h, 0, w), (0, h, w, width), (h, height, 0, w), (h, height, w, width)]


@keras.saving.register_keras_serializable(package=layers.PACKAGE)
class GlobalCorrelation(keras.layers.Layer):
    """Features `[B, T, H, W, C]` -> float32 `[B, T-1, 5, 2r+1, 2r+1]`: for each pair of neighbouring frames,
    each region (`REGIONS`: the whole frame, then its quadrants) and each displacement (dy, dx) in [-r, r]
    (`radius`), the mean over the overlap and the channels of a_t(p) * a_t+1(p + d), where a is each frame's
    features less their mean over the region, over their deviation: 1 where the shifted frames match
    exactly. Computed by FFT, on the region zero-padded by r (no wrap-around)."""

    def __init__(self, radius: int = 8, sigma: float = 1.0, epsilon: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        if not float(sigma) >= 0:
            raise ValueError(f"Invalid value for argument `sigma`. Expected a value >= 0 (pixels; 0: no smoothing). "
                             f"Received sigma={sigma!r}")
        self.sigma = float(sigma)
        self.radius, self.epsilon = layers.positive_ints(radius, "radius")[0], float(epsilon)

    def _region(self, x):
        """`[B, T, h, w, C]` -> `[B, T-1, D, D]` (D = 2r + 1)."""
        r = self.radius
        _, _, h, w, c = x.shape
        # A Hann taper, and the correlation divided by the taper's own: the region's edges do not pull the peak,
        # neither towards 0 (no division: fewer products overlap at larger shifts) nor away from it (a division
        # by the overlap's area alone: measured, a shift of 2.5 px read as 3.0 on bikes.mp4).
        taper = np.outer(np.hanning(h), np.hanning(w))
        fy, fx = np.fft.fftfreq(h + r)[:, None], np.fft.fftfreq(w + r)[None, :]
        # The cost volume blurred by a Gaussian of `sigma` pixels (a product here): a peak that is smooth, not a
        # cone, so that its soft-argmax is not pulled to the nearest integer (see SoftArgmax).
        gain = np.exp(-2 * (np.pi * self.sigma) ** 2 * (fy ** 2 + fx ** 2))
        envelope = np.real(np.fft.ifft2(np.abs(np.fft.fft2(taper, (h + r, w + r))) ** 2 * gain))
        envelope = c * np.roll(envelope, (r, r), axis=(0, 1))[:2 * r + 1, :2 * r + 1]

        x = ops.cast(x, "float32")
        x = x - ops.mean(x, axis=(2, 3), keepdims=True)
        x = x / (ops.sqrt(ops.mean(ops.square(x), axis=(2, 3), keepdims=True)) + self.epsilon)
        x = ops.transpose(x, (0, 1, 4, 2, 3)) * ops.convert_to_tensor(taper, "float32")  # [B, T, C, h, w]
        x = ops.pad(x, [[0, 0], [0, 0], [0, 0], [0, r], [0, r]])                           # no wrap-around
        real, imag = ops.fft2((x, ops.zeros_like(x)))
        ar, ai, br, bi = real[:, :-1], imag[:, :-1], real[:, 1:], imag[:, 1:]
        # sum_p a(p) b(p + d) = IFFT(conj(A) B), summed over the channels (the transform is linear).
        gain = ops.convert_to_tensor(gain, "float32")
        cross = (ops.sum(ar * br + ai * bi, axis=2) * gain, ops.sum(ar * bi - ai * br, axis=2) * gain)
        corr, _ = ops.ifft2(cross)                                          # [B, T-1, h+r, w+r]: d mod (h+r, w+r)
        corr = ops.roll(corr, (r, r), axis=(2, 3))[:, :, :2 * r + 1, :2 * r + 1]  # d = -r..r
        return corr / ops.convert_to_tensor(envelope, "float32")

    def build(self, input_shape):
        _, _, h, w, _ = input_shape
        if self.radius >= min(h, w) // 2:
            raise ValueError(f"Invalid value for argument `radius`. Expected less than the size of a quarter of the "
                             f"frame ({h // 2}x{w // 2}). Received radius={self.radius}")

    def call(self, x):
        _, _, h, w, _ = x.shape
        return ops.stack([self._region(x[:, :, top:bottom, left:right])
                          for top, bottom, left, right in _quadrants(h, w)], axis=2)

    def compute_output_shape(self, input_shape):
        b, t, _, _, _ = input_shape
        d = 2 * self.radius + 1
        return (b, None if t is None else t - 1, REGIONS, d, d)

    def get_config(self):
        return {**super().get_config(), "radius": self.radius, "sigma": self.sigma, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package=layers.PACKAGE)
class SoftArgmax(keras.layers.Layer):
    """Cost volumes `[B, P, 5, D, D]` (`GlobalCorrelation` of a `height` x `width` patch) -> float32 `[B, P, 4]`:
    dx, dy, rotation and log-scale of each pair, in model pixels (rotation and log-scale times half the width,
    `shake.motion_units`).

    Each region's displacement is the expected one under softmax(correlation / temperature) over the
    displacements within `window` of the whole frame's best integer one, then `iterations - 1` times again
    within `window` of the last estimate (one temperature, learned, kept positive as exp(log_temperature)).
    dx, dy: the whole frame's. Rotation and log-scale: the least-squares
    fit of u_i = shift + rotation * (-y_i, x_i) + log_scale * (x_i, y_i) to the quadrants' displacements u_i
    at their centres (x_i, y_i) (small angles), where the shift drops out (the centres sum to zero)."""

    def __init__(self, height: int, width: int, window: int = 2, temperature: float = 0.05, iterations: int = 3,
                 **kwargs):
        super().__init__(**kwargs)
        self.height, self.width = int(height), int(width)
        if not float(temperature) > 0:
            raise ValueError(f"Invalid value for argument `temperature`. Expected a strictly positive value. "
                             f"Received temperature={temperature!r}")
        self.window, self.temperature = layers.positive_ints(window, "window")[0], float(temperature)
        self.iterations = layers.positive_ints(iterations, "iterations")[0]

    def build(self, input_shape):
        self.log_temperature = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(math.log(self.temperature)), name="log_temperature")

    def call(self, costs):
        d = costs.shape[-1]
        r = d // 2
        offsets = ops.arange(-r, r + 1, dtype="float32")
        flat = ops.reshape(costs[:, :, 0], (-1, ops.shape(costs)[1], d * d))
        best = ops.argmax(flat, axis=-1)                                     # [B, P]
        best_y = ops.cast(best // d, "float32")[:, :, None, None, None] - r
        best_x = ops.cast(best % d, "float32")[:, :, None, None, None] - r
        dy, dx = offsets[:, None], offsets[None, :]
        z = costs / ops.exp(self.log_temperature)                                     # [B, P, 5, D, D]
        # Each region's expected displacement under softmax(z), within a box of half-width window + 1/2 about a
        # centre: first the whole frame's best integer displacement, then the last estimate, box edges counted
        # in part. A box that is not centred on the peak cuts more of one tail than of the other and pulls the
        # mean with it (1.5 px read as 1.6); re-centred, the mean of a symmetric peak is its centre.
        centre_x, centre_y = best_x, best_y
        for _ in range(self.iterations):
            box = (ops.clip(self.window + 0.5 - ops.abs(dx - centre_x), 0.0, 1.0)
                   * ops.clip(self.window + 0.5 - ops.abs(dy - centre_y), 0.0, 1.0))
            top = ops.max(ops.where(box > 0, z, -1e9), axis=(3, 4), keepdims=True)
            weights = box * ops.exp(ops.minimum(z - top, 0.0))
            weights = weights / ops.sum(weights, axis=(3, 4), keepdims=True)
            centre_x = ops.sum(weights * dx, axis=(3, 4), keepdims=True)
            centre_y = ops.sum(weights * dy, axis=(3, 4), keepdims=True)
        u = ops.concatenate([centre_x[..., 0], centre_y[..., 0]], -1)                 # [B, P, 5, 2]
        centres = [((left + right - 1) / 2 - (self.width - 1) / 2, (top + bottom - 1) / 2 - (self.height - 1) / 2)
                   for top, bottom, left, right in _quadrants(self.height, self.width)[1:]]
        norm = sum(x * x + y * y for x, y in centres)
        rotation = sum(-y * u[:, :, i + 1, 0] + x * u[:, :, i + 1, 1] for i, (x, y) in enumerate(centres)) / norm
        log_scale = sum(x * u[:, :, i + 1, 0] + y * u[:, :, i + 1, 1] for i, (x, y) in enumerate(centres)) / norm
        units = self.width / 2.0   # shake.motion_units (not imported: models do not import the task's stages)
        return ops.stack([u[:, :, 0, 0], u[:, :, 0, 1], rotation * units, log_scale * units], -1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], 4)

    def get_config(self):
        return {**super().get_config(), "height": self.height, "width": self.width, "window": self.window,
                "temperature": self.temperature, "iterations": self.iterations}


def build_softmotion(spec, num_classes: int, *, features: int = 8, radius: int = 0, sigma: float = 1.0,
                     window: int = 2, temperature: float = 0.05, name: str = "softmotion") -> keras.Model:
    """uint8 `[B, T, H, W, 3]` -> float32 `[B, (T-1) * 4]`: dx, dy, rotation, log-scale per pair of neighbouring
    frames, in model pixels (`shake.relative_motion`'s units) by construction: no de-standardising after it.
    `radius`: the largest displacement searched, in model pixels (0: a quarter of the shorter side)."""
    num_classes = layers.check_classes(num_classes)
    pairs = spec.frames - 1
    if pairs < 1 or num_classes != 4 * pairs:
        raise ValueError(f"Invalid value for argument `num_classes`. softmotion outputs dx, dy, rotation and "
                         f"log-scale for each of the {pairs} pair(s) of neighbouring frames of a {spec.frames}-frame "
                         f"patch: {4 * pairs} values. Received num_classes={num_classes!r}")
    features = layers.positive_ints(features, "features")[0]
    if not isinstance(radius, int) or isinstance(radius, bool) or radius < 0:
        raise ValueError(f"Invalid value for argument `radius`. Expected an integer >= 0 (0: a quarter of the "
                         f"shorter side). Received radius={radius!r}")
    radius = radius or min(spec.height, spec.width) // 4
    inputs = layers.patch_input(spec)
    x = FrameContrast(name="contrast")(layers.normalize(spec, inputs))
    x = keras.layers.Conv3D(features, (1, 3, 3), padding="same", activation="relu", name="features0")(x)
    x = keras.layers.Conv3D(features, (1, 3, 3), padding="same", name="features1")(x)
    costs = GlobalCorrelation(radius, sigma, name="correlation")(x)
    motion = SoftArgmax(spec.height, spec.width, window, temperature, name="soft_argmax")(costs)
    logits = keras.layers.Reshape((num_classes,), name="logits")(motion)
    return keras.Model(inputs, logits, name=name)
