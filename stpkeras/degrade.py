"""Degrade stage: synthetic degradations of a clean `uint8 [T, H, W, C]` patch, in pure TF, for `--task enhance`.

Each degradation is named on the CLI as `KIND:PARAM` (repeatable), where PARAM
is one value or a range `LOW-HIGH` drawn uniformly once per patch, or as `KIND`
alone: its default range (`DEFAULTS`), so that the model is blind to the level
(one model for every noise level a user's footage has, rather than one per level):

| kind | PARAM | default | what it does |
|---|---|---|---|
| `noise` | sigma, 0-255 units | 0-50 | additive white Gaussian noise |
| `poisson` | peak: photons at full white | 5-100 | shot noise, `Poisson(peak * x) / peak` (lower = noisier) |
| `blur` | sigma in pixels | 0.5-2 | spatial Gaussian blur of every frame |
| `motion` | length in pixels | 1-9 | linear motion blur, one direction drawn per patch, the same in every frame |
| `jpeg` | quality 1-100 | 10-60 | every frame JPEG-compressed at that quality (`tf.image.adjust_jpeg_quality`) |
| `flicker` | amplitude | 0-0.2 | brightness gain `1 + a_t`, `a_t` drawn per frame in `[-A, A]` |

Whatever order they are given in, they apply in the order light meets a
camera: optics (`blur`, `motion`), exposure (`flicker`), sensor noise
(`poisson`, `noise`), then the codec (`jpeg`). Every op takes the patch and a
stateless seed (`int64 [2]`) and returns `(uint8 patch of the same shape,
float32 parameter drawn)`, so a seeded pipeline degrades the same patch the
same way on every run and the drawn parameters can be checked.

`make_pairs(...)` turns a serialized record into the `(degraded, clean)`
element `Model.fit` takes, for self-supervised data (any converted folder,
degraded on the fly) and for paired data (`schema.TARGET`, written by
`stp convert` from a `path,target` CSV).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Dict, Optional, Sequence, Tuple

import tensorflow as tf

# The order degradations apply in (see the module docstring), and each kind's valid PARAM range.
ORDER = ("blur", "motion", "flicker", "poisson", "noise", "jpeg")
LIMITS: Dict[str, Tuple[float, float]] = {
    "blur": (0.0, 10.0), "motion": (1.0, 31.0), "flicker": (0.0, 0.9), "poisson": (0.1, 1e6),
    "noise": (0.0, 255.0), "jpeg": (1.0, 100.0),
}
# `KIND` alone: the range its parameter is drawn from (level-blind training).
DEFAULTS: Dict[str, Tuple[float, float]] = {
    "noise": (0.0, 50.0), "poisson": (5.0, 100.0), "blur": (0.5, 2.0), "motion": (1.0, 9.0), "jpeg": (10.0, 60.0),
    "flicker": (0.0, 0.2),
}
_UNITS = {"blur": "sigma in pixels", "motion": "length in pixels", "flicker": "amplitude", "poisson": "peak",
          "noise": "sigma in 0-255 units", "jpeg": "quality"}
_NUMBER = r"\s*(\d+(?:\.\d*)?|\.\d+)\s*"
_SPEC = re.compile(rf"^\s*([a-z]+)\s*(?::{_NUMBER}(?:-{_NUMBER})?)?$")


@dataclasses.dataclass(frozen=True)
class Degradation:
    """One degradation: its kind and the range its parameter is drawn from (`low == high`: fixed)."""

    kind: str
    low: float
    high: float

    def __post_init__(self):
        if self.kind not in LIMITS:
            raise ValueError(f"Invalid value for argument `degrade`. Expected a kind in {sorted(LIMITS)}. "
                             f"Received kind={self.kind!r}")
        lo, hi = LIMITS[self.kind]
        if not lo <= self.low <= self.high <= hi:
            raise ValueError(f"Invalid value for argument `degrade`. Expected {self.kind}'s {_UNITS[self.kind]} "
                             f"within [{lo:g}, {hi:g}] with LOW <= HIGH. Received {self}")
        if self.kind == "jpeg" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError(f"Invalid value for argument `degrade`. Expected integer JPEG qualities. Received {self}")

    def __str__(self) -> str:
        return f"{self.kind}:{self.low:g}" + (f"-{self.high:g}" if self.high != self.low else "")


def parse_degrade(texts: Optional[Sequence[str]]) -> Tuple[Degradation, ...]:
    """`['noise:10-40', 'jpeg:30']` (or one comma-separated string) -> degradations in `ORDER`.

    Each kind at most once; a kind alone (`'noise'`) takes its `DEFAULTS` range; `'none'` or nothing -> `()`.
    """
    if texts is None:
        return ()
    if isinstance(texts, str):
        texts = texts.split(",")
    found: Dict[str, Degradation] = {}
    for text in texts:
        if isinstance(text, Degradation):
            d = text
        else:
            text = str(text).strip().lower()
            if text in ("", "none"):
                continue
            m = _SPEC.match(text)
            if not m:
                raise ValueError(f"Invalid value for argument `degrade`. Expected KIND, KIND:PARAM or KIND:LOW-HIGH "
                                 f"with KIND one of {list(ORDER)}, e.g. noise, noise:25 or noise:10-40. "
                                 f"Received {text!r}")
            if m.group(2) is None:
                if m.group(1) not in DEFAULTS:
                    raise ValueError(f"Invalid value for argument `degrade`. Expected a kind in {sorted(LIMITS)}. "
                                     f"Received kind={m.group(1)!r}")
                d = Degradation(m.group(1), *DEFAULTS[m.group(1)])
            else:
                low = float(m.group(2))
                d = Degradation(m.group(1), low, float(m.group(3)) if m.group(3) else low)
        if d.kind in found:
            raise ValueError(f"Invalid value for argument `degrade`. Expected each kind at most once. "
                             f"Received {d.kind} twice ({found[d.kind]}, {d})")
        found[d.kind] = d
    return tuple(found[k] for k in ORDER if k in found)


def describe(degradations: Sequence[Degradation]) -> Tuple[str, ...]:
    """The CLI strings of `degradations` (what run.json records)."""
    return tuple(str(d) for d in degradations)


# --- the ops: (uint8 patch, seed, degradation) -> (uint8 patch, float32 parameter drawn) ------------

def _draw(d: Degradation, seed: tf.Tensor) -> tf.Tensor:
    if d.low == d.high:
        return tf.constant(d.low, tf.float32)
    return tf.random.stateless_uniform([], seed, d.low, d.high)


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _filter_frames(patch: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    """Every frame of float `[T, H, W, C]` filtered with the 2D `kernel [k, k]` (edges mirrored)."""
    k = kernel.shape[0]
    r = k // 2
    channels = patch.shape[-1]
    # SYMMETRIC (not REFLECT): valid for any pad width up to the frame size.
    padded = tf.pad(patch, [[0, 0], [r, r], [r, r], [0, 0]], mode="SYMMETRIC")
    depthwise = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
    return tf.nn.depthwise_conv2d(padded, depthwise, [1, 1, 1, 1], "VALID")


def gaussian_noise(patch: tf.Tensor, seed: tf.Tensor, d: Degradation) -> Tuple[tf.Tensor, tf.Tensor]:
    """Adds `N(0, sigma^2)` to every value (sigma in 0-255 units), rounded and clipped."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    sigma = _draw(d, seeds[0])
    x = tf.cast(patch, tf.float32)
    return _to_uint8(x + sigma * tf.random.stateless_normal(tf.shape(x), seeds[1])), sigma


def poisson_noise(patch: tf.Tensor, seed: tf.Tensor, d: Degradation) -> Tuple[tf.Tensor, tf.Tensor]:
    """Shot noise: a value `v` becomes `255 * Poisson(peak * v / 255) / peak` (`peak` photons at white)."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    peak = _draw(d, seeds[0])
    lam = tf.cast(patch, tf.float32) / 255.0 * peak
    counts = tf.random.stateless_poisson(tf.shape(lam), seeds[1], lam, dtype=tf.float32)
    return _to_uint8(counts / peak * 255.0), peak


def gaussian_blur(patch: tf.Tensor, seed: tf.Tensor, d: Degradation) -> Tuple[tf.Tensor, tf.Tensor]:
    """Blurs every frame with an isotropic Gaussian of `sigma` pixels.

    The kernel's size comes from the range's high end (static shape); its
    weights from the sigma drawn. sigma 0 leaves the patch unchanged.
    """
    sigma = _draw(d, seed)
    radius = max(1, int(math.ceil(3.0 * d.high)))
    xs = tf.range(-radius, radius + 1, dtype=tf.float32)
    g = tf.exp(-0.5 * tf.square(xs / tf.maximum(sigma, 1e-3)))
    g = g / tf.reduce_sum(g)
    kernel = g[:, None] * g[None, :]
    return _to_uint8(_filter_frames(tf.cast(patch, tf.float32), kernel)), sigma


def motion_kernel(length: tf.Tensor, angle: tf.Tensor, size: int) -> tf.Tensor:
    """A `[size, size]` kernel: a line segment of `length` pixels through the centre at `angle` (radians).

    Each pixel weighs `max(0, 1 - distance to the segment)` (an antialiased
    line), normalised to sum 1. Length 1 is the identity.
    """
    r = size // 2
    ys, xs = tf.meshgrid(tf.range(-r, r + 1, dtype=tf.float32), tf.range(-r, r + 1, dtype=tf.float32),
                         indexing="ij")
    dx, dy = tf.cos(angle), tf.sin(angle)
    half = tf.maximum(length - 1.0, 0.0) / 2.0
    along = tf.clip_by_value(xs * dx + ys * dy, -half, half)
    dist = tf.sqrt(tf.square(xs - along * dx) + tf.square(ys - along * dy))
    w = tf.nn.relu(1.0 - dist)
    return w / tf.reduce_sum(w)


def motion_blur(patch: tf.Tensor, seed: tf.Tensor, d: Degradation) -> Tuple[tf.Tensor, tf.Tensor]:
    """Linear motion blur of `length` pixels in a direction drawn per patch, the same for all its frames
    (a camera pan during the exposure)."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    length = _draw(d, seeds[0])
    angle = tf.random.stateless_uniform([], seeds[1], 0.0, math.pi)
    size = 2 * int(math.ceil(d.high / 2.0)) + 1
    kernel = motion_kernel(length, angle, size)
    return _to_uint8(_filter_frames(tf.cast(patch, tf.float32), kernel)), length


def jpeg(patch: tf.Tensor, seed: tf.Tensor, d: Degradation) -> Tuple[tf.Tensor, tf.Tensor]:
    """JPEG-compresses every frame at one quality drawn per patch (an integer in the range)."""
    if d.low == d.high:
        q = tf.constant(int(d.low), tf.int32)
    else:
        q = tf.random.stateless_uniform([], seed, int(d.low), int(d.high) + 1, dtype=tf.int32)
    frames = tf.map_fn(lambda f: tf.image.adjust_jpeg_quality(f, q), patch, fn_output_signature=tf.uint8)
    return tf.ensure_shape(frames, patch.shape), tf.cast(q, tf.float32)


def flicker(patch: tf.Tensor, seed: tf.Tensor, d: Degradation) -> Tuple[tf.Tensor, tf.Tensor]:
    """Multiplies frame t by `1 + a_t`, `a_t` uniform in `[-A, A]` (A drawn per patch): lamp or exposure flicker."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    amplitude = _draw(d, seeds[0])
    frames = tf.shape(patch)[0]
    gains = 1.0 + tf.random.stateless_uniform([frames], seeds[1], -1.0, 1.0) * amplitude
    return _to_uint8(tf.cast(patch, tf.float32) * gains[:, None, None, None]), amplitude


OPS: Dict[str, Callable] = {"noise": gaussian_noise, "poisson": poisson_noise, "blur": gaussian_blur,
                            "motion": motion_blur, "jpeg": jpeg, "flicker": flicker}

Degrade = Callable[[tf.Tensor, tf.Tensor], Tuple[tf.Tensor, Dict[str, tf.Tensor]]]


def make_degrade(degradations: Sequence) -> Degrade:
    """Chains degradations into `(uint8 patch, int64 [2] seed) -> (uint8 patch, {kind: parameter drawn})`.

    Each kind draws from its own seed, split from `seed` by its place in
    `ORDER`: adding a degradation does not change what the others draw.
    """
    degradations = parse_degrade(degradations)

    def degrade(patch: tf.Tensor, seed: tf.Tensor):
        params = {}
        if not degradations:
            return patch, params
        seeds = tf.random.experimental.stateless_split(seed, len(ORDER))
        for d in degradations:
            patch, params[d.kind] = OPS[d.kind](patch, seeds[ORDER.index(d.kind)], d)
        return patch, params

    degrade.degradations = degradations  # type: ignore[attr-defined]
    return degrade


# --- the enhance task's element: record -> (degraded, clean) ------------------------------------------

def make_pairs(encoding: str, spec, *, paired: bool, degradations: Sequence = (), augment: Sequence[str] = (),
               crop: int = 0, crop_grid: int = 1,
               soften: float = 0.0) -> Callable[[tf.Tensor, tf.Tensor], Tuple[tf.Tensor, tf.Tensor]]:
    """The `element_fn` of `pipeline.make_dataset` for enhancement: `(serialized record, seed) -> (input, target)`.

    Both are `uint8 [T, H, W, C]`. Self-supervised (`paired=False`): the
    target is the record's patch and the input that patch degraded. Paired data
    (`paired=True`): the input is the record's patch (e.g. a compressed copy) and
    the target its `schema.TARGET`; `degradations`, if any, degrade the input
    further. Augmentations (`stpkeras.augment`) apply before degrading and to
    input and target alike (stacked along channels, so one crop/colour draw covers both).
    `crop`: then a random window of at most `crop` x `crop` pixels (all frames), the same for both, whose
    offsets are multiples of `crop_grid` (8 keeps a codec's block grid where the patch's own origin is on it).
    `soften` (self-supervised RGB data only): the share of clean patches downscaled to 25-75% and back up
    before they are degraded (`augment.random_soften`; after the augmentations, before the crop).
    """
    from stpkeras import augment as augment_lib
    from tfrecords_tools import schema

    augment_fn = augment_lib.make_augment(augment)
    degrade = make_degrade(degradations)
    if soften and (paired or not 0.0 < soften <= 1.0):
        raise ValueError(f"Invalid value for argument `soften`. Expected a share in (0, 1] of clean patches, on "
                         f"self-supervised data only (paired={paired}). Received soften={soften!r}")
    channels = spec.channels
    window = (min(crop, spec.height), min(crop, spec.width)) if crop else tuple(spec.shape[1:3])
    cropping = window != tuple(spec.shape[1:3])

    def element(serialized: tf.Tensor, seed: tf.Tensor):
        features = schema.parse_patch(serialized, encoding, target=paired)
        patch = schema.decode_pixels(features[schema.PATCH], encoding, spec.shape)
        target = schema.decode_pixels(features[schema.TARGET], encoding, spec.shape) if paired else patch
        seeds = tf.random.experimental.stateless_split(seed, 2)
        if augment_fn.names or cropping or soften:
            both = tf.concat([patch, target], axis=-1)
            if augment_fn.names:
                both = augment_fn(both, seeds[0])
            if soften:
                both = augment_lib.random_soften(both, tf.random.experimental.stateless_fold_in(seeds[0], 2),
                                                 rate=soften)
            if cropping:
                crop_seed = tf.random.experimental.stateless_fold_in(seeds[0], 1)
                both = _random_window(both, window, crop_grid, crop_seed)
            patch, target = both[..., :channels], both[..., channels:]
        degraded, _ = degrade(patch, seeds[1])
        return degraded, target

    return element


def _random_window(x: tf.Tensor, window: Tuple[int, int], grid: int, seed: tf.Tensor) -> tf.Tensor:
    """A random `window` (height, width) of `[T, H, W, C]` (static shapes), at offsets that are multiples of `grid`."""
    if grid == 1:
        return tf.image.stateless_random_crop(x, (x.shape[0], *window, x.shape[-1]), seed)
    offsets = []
    for i, (size, side) in enumerate(zip(x.shape[1:3], window)):
        choices = (size - side) // grid + 1
        offsets.append(tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(seed, i), 0, choices,
                                                   dtype=tf.int32) * grid)
    return tf.slice(x, [0, offsets[0], offsets[1], 0], [x.shape[0], *window, x.shape[-1]])
