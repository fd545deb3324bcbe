"""Model stage: `softmotion`, the global motion between neighbouring frames read off a cost volume by soft-argmax.

`motionnet` regresses the motion from a flattened feature map through dense layers: its estimates come out in
whatever scale training gave them (on unseen animation, about 0.6 of the true motion), and never finer than its
training allowed. A camera's shake moves the whole frame, so the motion can be *read* instead:

    uint8 [B, T, H, W, 3] -> Normalize -> FrameContrast -> Conv3D (1, 3, 3) x 2: learned features per frame,
    full resolution -> GlobalCorrelation: for each pair of neighbouring frames and each displacement d up to
    `radius`, the normalised correlation of frame t's features with frame t+1's shifted by d, averaged over
    the whole frame and over each block of a `grid` x `grid` (default 4x4: [B, T-1, 17, 2r+1, 2r+1], by FFT:
    any radius costs the same) -> SoftArgmax: each block's displacement, around its best integer one
    (+-`window`), as the expected displacement under a softmax with a learned temperature; then the robust
    fit of a shift, rotation and log-scale to the blocks' displacements (started from the shift most blocks
    share, iteratively reweighted) -> [B, T-1, 4]: dx, dy, rotation and log-scale (in pixels at the patch's
    edge)

Why blocks and a vote, not the whole frame's correlation: where something in front of the background moves on
its own (an animated character, a passing car), the whole frame's best match lands between the two motions
(measured on the benchmark's animation: 2.6 px off for ten frame pairs in a row, with the same error untrained
and trained); the blocks it covers disagree with the rest, and the rest outvote them. On the benchmark's
shaken clip, untrained, the mean absolute error of dx, dy went from 0.66 / 1.12 frame px (`fit="whole"`, the
grid of quadrants) to 0.23 / 0.16 (docs/stabilization.md).

The expected displacement is in the model's pixels from the first step (no gain to learn), and sub-pixel: if
the correlation is locally quadratic about its peak at d*, softmax(correlation / temperature) is a Gaussian
centred at d*, and its mean is d* whatever the temperature, up to the window's truncation (too warm) and
the integer grid (too cold); training sets the temperature and the features between the two.
"""

from __future__ import annotations

import math
from typing import Optional

import keras
import numpy as np
from keras import ops

from stpkeras.models import layers
from stpkeras.models.motion import FrameContrast

FITS = ("whole", "robust")
MIN_BLOCK = 24   # pixels: build_softmotion's default grid has blocks no smaller
RIDGE = 0.1   # of the blocks' spread about the centre: SoftArgmax's robust fit's prior of no rotation and zoom


def _regions(height: int, width: int, grid: int = 2):
    """`[(top, bottom, left, right)]` of the whole frame, then of a `grid` x `grid` of blocks, row by row (grid 2:
    its quadrants, top-left, top-right, bottom-left, bottom-right)."""
    rows = [i * height // grid for i in range(grid + 1)]      # grid 2: height // 2, as the quadrants always were
    cols = [j * width // grid for j in range(grid + 1)]
    return [(0, height, 0, width)] + [(rows[i], rows[i + 1], cols[j], cols[j + 1])
                                      for i in range(grid) for j in range(grid)]


@keras.saving.register_keras_serializable(package=layers.PACKAGE)
class GlobalCorrelation(keras.layers.Layer):
    """Features `[B, T, H, W, C]` -> float32 `[B, T-1, 1 + grid**2, 2r+1, 2r+1]`: for each pair of neighbouring
    frames, each region (`_regions`: the whole frame, then a `grid` x `grid` of blocks, by default its quadrants)
    and each displacement (dy, dx) in [-r, r]
    (`radius`), the mean over the overlap and the channels of a_t(p) * a_t+1(p + d), where a is each frame's
    features less their mean over the region, over their deviation: 1 where the shifted frames match
    exactly. Computed by FFT, on the region zero-padded by r (no wrap-around)."""

    def __init__(self, radius: int = 8, sigma: float = 1.0, epsilon: float = 1e-3, grid: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.grid = layers.positive_ints(grid, "grid")[0]
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
        if self.grid > min(h, w) // 4:
            raise ValueError(f"Invalid value for argument `grid`. Expected blocks of at least 4x4 pixels in a {h}x{w} "
                             f"frame (grid <= {min(h, w) // 4}). Received grid={self.grid}")
        g = max(self.grid, 2)
        if self.radius >= min(h, w) // g:
            raise ValueError(f"Invalid value for argument `radius`. Expected less than the size of a block of the "
                             f"{g}x{g} grid ({h // g}x{w // g} pixels). Received radius={self.radius}")

    def call(self, x):
        _, _, h, w, _ = x.shape
        return ops.stack([self._region(x[:, :, top:bottom, left:right])
                          for top, bottom, left, right in _regions(h, w, self.grid)], axis=2)

    def compute_output_shape(self, input_shape):
        b, t, _, _, _ = input_shape
        d = 2 * self.radius + 1
        return (b, None if t is None else t - 1, 1 + self.grid ** 2, d, d)

    def get_config(self):
        return {**super().get_config(), "radius": self.radius, "sigma": self.sigma, "epsilon": self.epsilon,
                "grid": self.grid}


@keras.saving.register_keras_serializable(package=layers.PACKAGE)
class SoftArgmax(keras.layers.Layer):
    """Cost volumes `[B, P, 1 + grid**2, D, D]` (`GlobalCorrelation` of a `height` x `width` patch) -> float32
    `[B, P, 4]`: dx, dy, rotation and log-scale of each pair, in model pixels (rotation and log-scale times half
    the width, `shake.motion_units`).

    Each region's displacement u_i is the expected one under softmax(correlation / temperature) over the
    displacements within `window` of a best integer one, then `iterations - 1` times again within `window` of the
    last estimate (one temperature, learned, kept positive as exp(log_temperature)). The motion is the fit of
    u_i = shift + rotation * (-y_i, x_i) + log_scale * (x_i, y_i) (small angles) to the blocks' displacements at
    their centres (x_i, y_i), with `fit`:

    - "whole": every region searched about the whole frame's best integer displacement; dx, dy are the whole
      frame's, rotation and log-scale the least-squares fit to the blocks (the shift drops out: the centres sum
      to zero). A foreground that moves on its own pulls the whole frame's match with it.
    - "robust": each block searched about its own best integer displacement; the fit starts from the shift most
      blocks share (each block's displacement a hypothesis, scored by how many others lie within about `scale`
      model pixels of it) and is then weighted least squares, iterated (`fit_iterations`), each block weighted
      by a Cauchy weight of its distance to the last fit (`scale`), with a weak prior of no rotation and zoom
      (`RIDGE`): what moves on its own, and a flat block's random match, are outvoted by the background.
      (Weighting the blocks by their peak correlation as well was measured worse: a coherent foreground
      matches itself as well as the background does.)
    """

    def __init__(self, height: int, width: int, window: int = 2, temperature: float = 0.05, iterations: int = 3,
                 grid: int = 2, fit: str = "whole", scale: float = 1.0, fit_iterations: int = 4, **kwargs):
        super().__init__(**kwargs)
        self.height, self.width = int(height), int(width)
        if not float(temperature) > 0:
            raise ValueError(f"Invalid value for argument `temperature`. Expected a strictly positive value. "
                             f"Received temperature={temperature!r}")
        if not float(scale) > 0:
            raise ValueError(f"Invalid value for argument `scale`. Expected a strictly positive number of model "
                             f"pixels. Received scale={scale!r}")
        if fit not in FITS:
            raise ValueError(f"Invalid value for argument `fit`. Expected one of {FITS}. Received fit={fit!r}")
        self.window, self.temperature = layers.positive_ints(window, "window")[0], float(temperature)
        self.iterations = layers.positive_ints(iterations, "iterations")[0]
        self.grid = layers.positive_ints(grid, "grid")[0]
        self.fit_iterations = layers.positive_ints(fit_iterations, "fit_iterations")[0]
        self.fit, self.scale = fit, float(scale)

    def build(self, input_shape):
        self.log_temperature = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(math.log(self.temperature)), name="log_temperature")

    def _read(self, costs):
        """`[B, P, R, D, D]` -> each region's displacement `[B, P, R, 2]` (x, y)."""
        d = costs.shape[-1]
        r = d // 2
        offsets = ops.arange(-r, r + 1, dtype="float32")
        regions = costs.shape[2]
        flat = ops.reshape(costs, (-1, ops.shape(costs)[1], regions, d * d))
        best = ops.argmax(flat, axis=-1)                                     # [B, P, R]
        if self.fit == "whole":
            best = ops.repeat(best[:, :, :1], regions, axis=2)
        best_y = ops.cast(best // d, "float32")[..., None, None] - r
        best_x = ops.cast(best % d, "float32")[..., None, None] - r
        dy, dx = offsets[:, None], offsets[None, :]
        z = costs / ops.exp(self.log_temperature)                                     # [B, P, R, D, D]
        # Each region's expected displacement under softmax(z), within a box of half-width window + 1/2 about a
        # centre: first the best integer displacement, then the last estimate, box edges counted in part. A box
        # that is not centred on the peak cuts more of one tail than of the other and pulls the mean with it (1.5
        # px read as 1.6); re-centred, the mean of a symmetric peak is its centre.
        centre_x, centre_y = best_x, best_y
        for _ in range(self.iterations):
            box = (ops.clip(self.window + 0.5 - ops.abs(dx - centre_x), 0.0, 1.0)
                   * ops.clip(self.window + 0.5 - ops.abs(dy - centre_y), 0.0, 1.0))
            top = ops.max(ops.where(box > 0, z, -1e9), axis=(3, 4), keepdims=True)
            weights = box * ops.exp(ops.minimum(z - top, 0.0))
            weights = weights / ops.sum(weights, axis=(3, 4), keepdims=True)
            centre_x = ops.sum(weights * dx, axis=(3, 4), keepdims=True)
            centre_y = ops.sum(weights * dy, axis=(3, 4), keepdims=True)
        u = ops.concatenate([centre_x[..., 0], centre_y[..., 0]], -1)                 # [B, P, R, 2]
        return u

    def _centres(self):
        """The blocks' centres (x, y) from the patch's centre, in model pixels: two float32 arrays `[grid**2]`."""
        centres = np.array([((left + right - 1) / 2 - (self.width - 1) / 2,
                             (top + bottom - 1) / 2 - (self.height - 1) / 2)
                            for top, bottom, left, right in _regions(self.height, self.width, self.grid)[1:]],
                           np.float32)
        return centres[:, 0], centres[:, 1]

    @staticmethod
    def _similarity(ux, uy, px, py, w, ridge: float = 0.0):
        """Weighted least squares of u = t + (b + i a)(p - 0) over the blocks (as complex numbers: one complex
        slope and intercept). All `[B, P, G]` but p `[G]`; returns tx, ty, a (rotation), b (log-scale) `[B, P]`."""
        total = ops.sum(w, -1) + 1e-12
        mx, my = ops.sum(w * px, -1) / total, ops.sum(w * py, -1) / total
        mux, muy = ops.sum(w * ux, -1) / total, ops.sum(w * uy, -1) / total
        qx, qy = px - mx[..., None], py - my[..., None]
        vx, vy = ux - mux[..., None], uy - muy[..., None]
        # A ridge towards no rotation and no zoom (`ridge` of the blocks' own spread): one or two blocks that
        # carry all the weight can then not swing the rotation or zoom by what their noise says.
        spread = ops.sum(w * (qx * qx + qy * qy), -1)
        norm = spread + ridge * total * ops.mean(px * px + py * py) + 1e-12
        b = ops.sum(w * (qx * vx + qy * vy), -1) / norm
        a = ops.sum(w * (qx * vy - qy * vx), -1) / norm
        return mux - (b * mx - a * my), muy - (b * my + a * mx), a, b

    def call(self, costs):
        u = self._read(costs)
        px, py = (ops.convert_to_tensor(c, "float32") for c in self._centres())
        ux, uy = u[:, :, 1:, 0], u[:, :, 1:, 1]                                        # the blocks: [B, P, G]
        units = self.width / 2.0   # shake.motion_units (not imported: models do not import the task's stages)
        if self.fit == "whole":
            _, _, rotation, log_scale = self._similarity(ux, uy, px, py, ops.ones_like(ux))
            return ops.stack([u[:, :, 0, 0], u[:, :, 0, 1], rotation * units, log_scale * units], -1)
        # The start: the block whose displacement most others share (within about `scale`: a vote, each block
        # one hypothesis of the shift), so that a foreground moving on its own over many blocks does not decide
        # where the fit begins as it would a mean's or a median's.
        apart = ops.square(ux[..., :, None] - ux[..., None, :]) + ops.square(uy[..., :, None] - uy[..., None, :])
        near = ops.exp(-apart / (2 * self.scale ** 2))                                 # [B, P, G, G]
        votes = ops.stop_gradient(ops.sum(near, -1))                                   # [B, P, G]
        pick = ops.one_hot(ops.argmax(votes, -1), self.grid ** 2)
        tx, ty = ops.sum(pick * ux, -1), ops.sum(pick * uy, -1)
        a = b = ops.zeros_like(tx)
        for _ in range(self.fit_iterations):
            rx = ux - (tx[..., None] - a[..., None] * py + b[..., None] * px)
            ry = uy - (ty[..., None] + a[..., None] * px + b[..., None] * py)
            w = 1.0 / (1.0 + ops.stop_gradient(rx * rx + ry * ry) / self.scale ** 2)
            tx, ty, a, b = self._similarity(ux, uy, px, py, w, RIDGE)
        return ops.stack([tx, ty, a * units, b * units], -1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1], 4)

    def get_config(self):
        return {**super().get_config(), "height": self.height, "width": self.width, "window": self.window,
                "temperature": self.temperature, "iterations": self.iterations, "grid": self.grid, "fit": self.fit,
                "scale": self.scale, "fit_iterations": self.fit_iterations}


def build_softmotion(spec, num_classes: int, *, features: int = 8, radius: int = 0, sigma: float = 1.0,
                     window: int = 2, temperature: float = 0.05, grid: Optional[int] = None,
                     fit: Optional[str] = None,
                     scale: float = 0.3, name: str = "softmotion") -> keras.Model:
    """uint8 `[B, T, H, W, 3]` -> float32 `[B, (T-1) * 4]`: dx, dy, rotation, log-scale per pair of neighbouring
    frames, in model pixels (`shake.relative_motion`'s units) by construction: no de-standardising after it.
    `radius`: the largest displacement searched, in model pixels (0: half a block of the grid, a quarter of the
    shorter side at `grid` 2). `grid`, `fit`, `scale`: `SoftArgmax`. By default the grid has blocks of at least
    `MIN_BLOCK` pixels, up to 4x4 (4x4 at 96x96), and the fit is "robust" where that gives 3x3 blocks or more
    (a foreground moving on its own does not move the estimate), "whole" on smaller patches (quadrants: a
    smaller block matches too little to vote)."""
    num_classes = layers.check_classes(num_classes)
    pairs = spec.frames - 1
    if pairs < 1 or num_classes != 4 * pairs:
        raise ValueError(f"Invalid value for argument `num_classes`. softmotion outputs dx, dy, rotation and "
                         f"log-scale for each of the {pairs} pair(s) of neighbouring frames of a {spec.frames}-frame "
                         f"patch: {4 * pairs} values. Received num_classes={num_classes!r}")
    features = layers.positive_ints(features, "features")[0]
    if not isinstance(radius, int) or isinstance(radius, bool) or radius < 0:
        raise ValueError(f"Invalid value for argument `radius`. Expected an integer >= 0 (0: half a block of the "
                         f"grid). Received radius={radius!r}")
    if grid is None:
        grid = max(2, min(4, min(spec.height, spec.width) // MIN_BLOCK))
    if fit is None:
        fit = "robust" if grid >= 3 else "whole"
    radius = radius or min(spec.height, spec.width) // (2 * max(grid, 2))   # half a block: 12 at 96x96, grid 4
    inputs = layers.patch_input(spec)
    x = FrameContrast(name="contrast")(layers.normalize(spec, inputs))
    x = keras.layers.Conv3D(features, (1, 3, 3), padding="same", activation="relu", name="features0")(x)
    x = keras.layers.Conv3D(features, (1, 3, 3), padding="same", name="features1")(x)
    # The geometry in float32 under any mixed-precision policy: FFTs, soft-argmax and least-squares fits of
    # sub-pixel displacements (bfloat16 keeps 3 significant digits).
    costs = GlobalCorrelation(radius, sigma, grid=grid, name="correlation", dtype="float32")(x)
    motion = SoftArgmax(spec.height, spec.width, window, temperature, grid=grid, fit=fit, scale=scale,
                        name="soft_argmax", dtype="float32")(costs)
    logits = keras.layers.Reshape((num_classes,), name="logits", dtype="float32")(motion)
    return keras.Model(inputs, logits, name=name)


def at_size(model: keras.Model, spec) -> keras.Model:
    """A trained softmotion rebuilt for patches of `spec` (any frame size) with the same learned weights.

    Nothing softmotion learns depends on the frame's size (per-pixel features, one temperature), so a model
    trained at 96x96 reads a larger window as well, and finer: at 144x144 `stp stabilize` shows it a 320x180
    frame at full scale instead of two thirds, at 180x180 at 1.25x (measured on the benchmark, residual at
    vid.stab defaults' cropping: 0.36 px at 96, 0.29 at 144, 0.27 at 180; docs/stabilization.md). The search
    radius and the grid's blocks follow the size (half a block, as when built); the grid, fit and Cauchy scale
    are the trained model's. A model that is not a softmotion raises ValueError.
    """
    try:
        correlation, head = model.get_layer("correlation"), model.get_layer("soft_argmax")
        features = model.get_layer("features0").filters
    except ValueError:
        raise ValueError(f"Invalid model. Expected a softmotion model (layers 'features0', 'correlation', "
                         f"'soft_argmax'), the one family that reads any frame size. Received {model.name!r}") from None
    if not isinstance(head, SoftArgmax):
        raise ValueError(f"Invalid model. Expected a softmotion model. Received {model.name!r}")
    c, h = correlation.get_config(), head.get_config()
    rebuilt = build_softmotion(spec, int(model.output_shape[-1]), features=features, sigma=c["sigma"],
                               window=h["window"], temperature=h["temperature"], grid=h["grid"], fit=h["fit"],
                               scale=h["scale"], name=model.name)
    rebuilt.set_weights(model.get_weights())
    return rebuilt
