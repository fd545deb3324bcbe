"""Shake stage: synthetic camera shake of a stable `uint8 [T, H, W, 3]` patch, in pure TF, for `--task stabilize`.

A camera path is drawn per patch from a stateless seed: for each frame t a
similarity transform (rotation `theta_t` in radians, log-scale `s_t`,
translation `b_t` in pixels), each component a sum of `SINES` sinusoids at
hand-tremor frequencies (`FREQUENCIES`, cycles per frame: 1-9 Hz at 25 fps)
plus a little white jitter, with amplitudes drawn per patch from 0 (a still
camera) up to the task's limits. Frame t of the shaken patch shows the
stable frame through that transform, zoomed in by `ZOOM` about the centre:
the patch is sampled from the central 1/ZOOM of the stable frame, so, within
the limits, every sampled point lies inside it and no border shows.

The target is the *relative* motion between neighbouring shaken frames, which
is what `stp stabilize` integrates into a path: for frames t and t+1, the
similarity that carries a point of frame t to where the same scene point is
in frame t+1 (centred pixel coordinates of the patch), as

    [dx, dy, dtheta * W/2, dlog_scale * W/2]          float32, per pair

Rotation and log-scale are multiplied by half the patch width (`motion_units`)
so all four are "pixels at the patch's edge" and one squared error weighs
them alike. A pair's motion depends only on the two frames, so a smooth
camera move in the footage itself is just more motion to estimate: the
stable footage's own motion is taken as zero (tripod or slow footage is best;
moving footage adds its motion as noise to the targets).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence, Tuple

import numpy as np
import tensorflow as tf

# The shaken patch is sampled from the central 1/ZOOM of the stable frame: the margin that keeps the
# shake's borders outside. `stp stabilize` shows the model frames at the same scale.
ZOOM = 1.25
SINES = 3
FREQUENCIES = (0.04, 0.36)   # cycles per frame: 1 to 9 Hz at 25 fps, the band of hand tremor and walking
JITTER = 0.1                 # white jitter, as a share of each component's amplitude
MOTION = 4                   # dx, dy, rotation, log-scale


@dataclasses.dataclass(frozen=True)
class ShakeLimits:
    """The largest shake drawn: translation as a share of the margin ZOOM leaves, rotation in degrees,
    zoom in percent (log-scale). Within the defaults the warped corners stay inside the stable frame."""

    shift: float = 0.5
    degrees: float = 1.5
    zoom_percent: float = 2.0

    def __post_init__(self):
        for name, high in (("shift", 1.0), ("degrees", 5.0), ("zoom_percent", 5.0)):
            value = getattr(self, name)
            if not 0 <= value <= high:
                raise ValueError(f"Invalid value for argument `{name}`. Expected a value in [0, {high:g}]. "
                                 f"Received {name}={value!r}")


def motion_units(width: int) -> float:
    """The factor that turns radians and log-scale into 'pixels at the patch's edge' (half the width)."""
    return width / 2.0


def random_path(seed: tf.Tensor, frames: int, height: int, width: int,
                limits: ShakeLimits = ShakeLimits()) -> tf.Tensor:
    """A camera path `float32 [frames, 4]`: (theta radians, log-scale, bx, by pixels) per frame, seeded.

    Each component is a sum of `SINES` sinusoids (frequencies in `FREQUENCIES`, random phases) plus
    white jitter, scaled to an amplitude drawn uniformly in [0, its limit] per patch.
    """
    margin = (1.0 - 1.0 / ZOOM) * min(height, width) / 2.0
    highs = tf.constant([math.radians(limits.degrees), math.log1p(limits.zoom_percent / 100.0),
                         limits.shift * margin, limits.shift * margin], tf.float32)
    seeds = tf.random.experimental.stateless_split(seed, 5)
    amplitude = tf.random.stateless_uniform([MOTION], seeds[0], 0.0, 1.0) * highs
    freq = tf.random.stateless_uniform([SINES, MOTION], seeds[1], *FREQUENCIES)
    phase = tf.random.stateless_uniform([SINES, MOTION], seeds[2], 0.0, 2.0 * math.pi)
    weight = tf.random.stateless_uniform([SINES, MOTION], seeds[3], 0.2, 1.0)
    weight = weight / tf.reduce_sum(weight, axis=0, keepdims=True)
    t = tf.range(frames, dtype=tf.float32)[:, None, None]
    waves = tf.reduce_sum(weight * tf.sin(2.0 * math.pi * freq * t + phase), axis=1)  # [frames, 4], |.| <= 1
    jitter = tf.random.stateless_uniform([frames, MOTION], seeds[4], -JITTER, JITTER)
    return amplitude * (1.0 - JITTER) * waves + amplitude * jitter


def motion_std(frames: int, height: int, width: int, limits: ShakeLimits = ShakeLimits(),
               samples: int = 512) -> Tuple[float, ...]:
    """The deviation of each target component (`relative_motion`: dx, dy, rotation, log-scale in
    `motion_units`) over `samples` shakes of `frames`-frame patches of `height` x `width` (a fixed seed: the
    same figures every time). The scale `--task stabilize` standardises its targets by; a component that
    cannot move (a zero limit) gets a small floor, not zero."""
    seeds = tf.random.experimental.stateless_split(tf.constant([18, 0], tf.int64), samples)
    draw = tf.function(lambda seeds: tf.map_fn(
        lambda seed: relative_motion(random_path(seed, frames, height, width, limits), width), seeds,
        fn_output_signature=tf.float32))
    motions = draw(seeds)
    std = np.sqrt(np.mean(np.square(motions.numpy().reshape(-1, MOTION)), axis=0))  # about 0: the shake is symmetric
    return tuple(float(max(s, 1e-2)) for s in std)


def similarity(theta, log_scale, bx, by, zoom=1.0):
    """`(A [..., 2, 2], b [..., 2])` of the map output point p -> source point `A p + b` (centred coordinates):
    A = exp(log_scale) / zoom * R(theta). Works on numpy arrays and tensors alike."""
    k = np.exp(log_scale) / zoom if isinstance(log_scale, np.ndarray) else tf.exp(log_scale) / zoom
    sin, cos = (np.sin, np.cos) if isinstance(theta, np.ndarray) else (tf.sin, tf.cos)
    stack = np.stack if isinstance(theta, np.ndarray) else tf.stack
    c, s = k * cos(theta), k * sin(theta)
    a = stack([stack([c, -s], -1), stack([s, c], -1)], -2)
    return a, stack([bx, by], -1)


def projective_transforms(a, b, height: int, width: int):
    """The 8-vectors of `ImageProjectiveTransformV3` for maps p -> A p + b in centred coordinates: output pixel
    (x, y) samples the input at `A (x - cx, y - cy) + b + (cx, cy)`. `a [N, 2, 2]`, `b [N, 2]` -> `[N, 8]`."""
    concat = np.concatenate if isinstance(a, np.ndarray) else tf.concat
    centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0], np.float32)
    if isinstance(a, np.ndarray):
        offset = b + centre - np.einsum("nij,j->ni", a, centre)
        zeros = np.zeros_like(offset[:, :1])
    else:
        offset = b + centre - tf.einsum("nij,j->ni", a, tf.constant(centre))
        zeros = tf.zeros_like(offset[:, :1])
    return concat([a[:, 0, :], offset[:, :1], a[:, 1, :], offset[:, 1:], zeros, zeros], 1)


def warp(frames: tf.Tensor, transforms: tf.Tensor, fill: str = "REFLECT") -> tf.Tensor:
    """`float32 [N, H, W, C]` frames resampled (bilinear) by `transforms [N, 8]` (`projective_transforms`)."""
    shape = tf.shape(frames)[1:3]
    return tf.raw_ops.ImageProjectiveTransformV3(images=frames, transforms=tf.cast(transforms, tf.float32),
                                                 output_shape=shape, fill_value=0.0, interpolation="BILINEAR",
                                                 fill_mode=fill)


def relative_motion(path: tf.Tensor, width: int, zoom: float = ZOOM) -> tf.Tensor:
    """The target of a path `[T, 4]` (`random_path`): `float32 [T-1, 4]` motions between neighbouring frames
    of the patch it shakes, `[dx, dy, dtheta, dlog_scale]` with the last two in `motion_units(width)`.

    A scene point at source q shows at p_t = A_t^-1 (q - b_t), so p_{t+1} = A_{t+1}^-1 A_t p_t +
    A_{t+1}^-1 (b_t - b_{t+1}): rotation theta_t - theta_{t+1}, log-scale s_t - s_{t+1}, and that translation.
    """
    theta, log_scale, bx, by = tf.unstack(path, axis=1)
    # A_{t+1}^-1 = zoom * exp(-s) R(-theta).
    inv, _ = similarity(-theta[1:], -log_scale[1:], bx[1:], by[1:], zoom=1.0 / zoom)
    d = tf.stack([bx[:-1] - bx[1:], by[:-1] - by[1:]], -1)
    shift = tf.einsum("nij,nj->ni", inv, d)
    units = motion_units(width)
    return tf.concat([shift, (units * (theta[:-1] - theta[1:]))[:, None],
                      (units * (log_scale[:-1] - log_scale[1:]))[:, None]], 1)


def shake_patch(patch: tf.Tensor, path: tf.Tensor) -> tf.Tensor:
    """A stable `uint8 [T, H, W, C]` patch seen through the camera path `[T, 4]` at `ZOOM`: uint8, same shape."""
    height, width = patch.shape[1], patch.shape[2]
    theta, log_scale, bx, by = tf.unstack(path, axis=1)
    a, b = similarity(theta, log_scale, bx, by, zoom=ZOOM)
    frames = warp(tf.cast(patch, tf.float32), projective_transforms(a, b, height, width))
    return tf.ensure_shape(tf.cast(tf.clip_by_value(tf.round(frames), 0.0, 255.0), tf.uint8), patch.shape)


def make_shaky(encoding: str, spec, limits: ShakeLimits = ShakeLimits(), augment: Sequence[str] = ()
               ) -> Callable[[tf.Tensor, tf.Tensor], Tuple[tf.Tensor, tf.Tensor]]:
    """The stabilize task's element: `(serialized record, seed) -> (uint8 [T, H, W, 3] shaken patch,
    float32 [(T-1) * 4] relative motions)` (labels ignored). Validation draws the same shake every epoch.

    Augmentations (`stpkeras.augment`) apply to the stable patch, before the shake: the target is the
    shake's motion whatever they do to the stable patch."""
    from stpkeras import augment as augment_lib
    from tfrecords_tools import schema

    frames, height, width = spec.frames, spec.height, spec.width
    augment_fn = augment_lib.make_augment(augment, spec.pixels)

    def element(serialized: tf.Tensor, seed: tf.Tensor):
        features = schema.parse_patch(serialized, encoding)
        patch = schema.decode_pixels(features[schema.PATCH], encoding, spec.shape)
        seeds = tf.random.experimental.stateless_split(seed, 2)
        if augment_fn.names:
            patch = augment_fn(patch, seeds[0])
        path = random_path(seeds[1], frames, height, width, limits)
        return shake_patch(patch, path), tf.reshape(relative_motion(path, width), [(frames - 1) * MOTION])

    return element
