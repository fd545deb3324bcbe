"""Augment stage: label-preserving augmentations of one `uint8 [T, H, W, C]` patch, in pure TF.

Every op takes the patch and a stateless seed (`int64 [2]`) and returns a
patch of the same dtype and shape, so the pipeline stays uint8 up to the
model (the model normalises in its first layer) and a seeded pipeline gives
the same pixels on every run. Each op draws its random values once per
patch, never per frame: the same flip, crop window and colour change apply
to every frame, or the augmentation itself would add motion.

Each op computes its output on uint8 (one pass per axis it moves pixels
along, two for colour), never on a float copy of the clip: on a 2-core host a
chain of float passes over 16x112x112 clips costs more than reading them
(see benchmarks/pipeline.py).

Ops are named so the CLI can chain them (`--augment flip,crop,color`).
None of them runs on evaluation.

The *copy views* model what a video goes through when it is copied, so that
`--task embed` learns features that stay put under it (`COPY_AUGMENT`, its
default): a shift of the clip's start (`shift`, a trim that does not fall on
the grid), a playback speed change (`speed`, frames skipped or repeated), a
border crop (`crop`), black bars (`letterbox`), a downscale and upscale
(`rescale`), brightness and contrast (`color`) and a lossy re-encode
(`reencode`: JPEG at a random quality per clip, the blocking, ringing and
chroma loss of a low-rate H.264 encode of each frame). Letterbox, rescale and
re-encode work on RGB patches only.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence, Tuple

import numpy as np
import tensorflow as tf

from stpkeras import pixel_formats
from tfrecords_tools.pixels import PixelFormat

Augment = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]

# The default for `stp train`: a horizontal flip swaps left and right motion, so it is
# not on by default (it would break any task whose classes differ by direction).
DEFAULT_AUGMENT: Tuple[str, ...] = ("crop", "color")


def _reverse_width(patch: tf.Tensor) -> tf.Tensor:
    """`[..., W, C]` reversed along W.

    Viewed as `[rows, W, C]`, the reverse takes TF's row-reversal fast path (one
    memcpy per pixel); on the 4-D patch it runs a generic index loop, 3x slower.
    """
    shape = tf.shape(patch)
    rows = tf.reshape(patch, [-1, shape[-2], shape[-1]])
    return tf.reshape(tf.reverse(rows, axis=[1]), shape)


def random_flip(patch: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Flips the whole clip left-right with probability 1/2.

    `tf.cond` reverses only the patches it flips; a batch-wide `tf.where`
    would reverse and select every patch.
    """
    patch = tf.convert_to_tensor(patch)
    flip = tf.random.stateless_uniform([], seed) < 0.5
    return tf.ensure_shape(tf.cond(flip, lambda: _reverse_width(patch), lambda: patch), patch.shape)


def _nearest(size: tf.Tensor, start: tf.Tensor, length: tf.Tensor) -> tf.Tensor:
    """Source indices of `size` outputs resampled by nearest neighbour from `[start, start + length)`.

    Pixel centres are aligned (`tf.image.resize(..., 'nearest')`): output i reads
    `start + floor((i + 0.5) * length / size)`, computed exactly in integers.
    """
    return start + (2 * tf.range(size) + 1) * length // (2 * size)


def random_crop(patch: tf.Tensor, seed: tf.Tensor, min_scale: float = 0.8) -> tf.Tensor:
    """Crops a random window inside the patch and resizes it back to `[H, W]` (nearest neighbour).

    The window's sides are each a fraction in `[min_scale, 1]` of the patch's
    (a scale and aspect jitter) at a random place. Cropping and nearest-neighbour
    resizing together pick rows and columns of the patch, so the op is two
    gathers on uint8 (rows, then columns): no float copy, and no copy of the
    window before resizing. On `yuv440` pixels a row of the packed patch is a
    pair of rows, so the window's top and height move by two rows at a time.
    """
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"Invalid value for argument `min_scale`. Expected a value in (0, 1]. "
                         f"Received min_scale={min_scale}")
    patch = tf.convert_to_tensor(patch)
    shape = tf.shape(patch)
    height, width = shape[1], shape[2]
    seeds = tf.random.experimental.stateless_split(seed, 4)
    scale_h = tf.random.stateless_uniform([], seeds[0], min_scale, 1.0)
    scale_w = tf.random.stateless_uniform([], seeds[1], min_scale, 1.0)
    crop_h = tf.maximum(1, tf.cast(tf.round(scale_h * tf.cast(height, tf.float32)), tf.int32))
    crop_w = tf.maximum(1, tf.cast(tf.round(scale_w * tf.cast(width, tf.float32)), tf.int32))
    top = tf.random.stateless_uniform([], seeds[2], 0, height - crop_h + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[3], 0, width - crop_w + 1, dtype=tf.int32)
    # Rows first: a row is W x C contiguous bytes, so that gather is a few large copies.
    rows = tf.gather(patch, _nearest(height, top, crop_h), axis=1)
    resized = tf.gather(rows, _nearest(width, left, crop_w), axis=2)
    return tf.ensure_shape(resized, patch.shape)


def _affine_uint8(patch: tf.Tensor, scale: tf.Tensor, offset: tf.Tensor) -> tf.Tensor:
    """`round(clip(patch * scale + offset, 0, 255))` on uint8, for a scalar `scale` > 0 and a scalar
    `offset` or one offset per channel (a vector as long as the last axis).

    Written as a dequantize/quantize pair: dequantizing maps each value v to
    `min + v * (max - min) / 255`, which with `min = offset`, `max = offset + 255
    * scale` is the affine map; quantizing to `[0, 255]` clips and rounds back to
    uint8. That is two passes over the patch, against seven for cast, multiply,
    add, round, clip and cast on a 4x larger float copy.
    """
    offset = tf.convert_to_tensor(offset, tf.float32)
    per_channel = {"axis": patch.shape.rank - 1} if offset.shape.rank == 1 else {}
    values = tf.raw_ops.Dequantize(input=tf.bitcast(patch, tf.quint8), min_range=offset,
                                   max_range=offset + 255.0 * scale, mode="MIN_COMBINED", **per_channel)
    # The raw op: `tf.quantization.quantize` logs a deprecation warning on every trace.
    rounded = tf.raw_ops.QuantizeV2(input=values, min_range=0.0, max_range=255.0, T=tf.quint8, mode="MIN_COMBINED",
                                    round_mode="HALF_AWAY_FROM_ZERO").output
    return tf.bitcast(rounded, tf.uint8)


def random_color(patch: tf.Tensor, seed: tf.Tensor, brightness: float = 0.15,
                 contrast: Tuple[float, float] = (0.75, 1.25), pixels: str | PixelFormat = "rgb") -> tf.Tensor:
    """Random brightness (`+-brightness x 255`) and contrast (factor in `contrast`) for the clip.

    Contrast scales every value around the clip's mean (over all frames, pixels
    and channels, one mean as torchvision takes one grey mean per image), so the
    colour balance is kept: `v -> (v - mean) * factor + mean + delta`, rounded
    and clipped to uint8.

    On `yuv440` pixels (`tfrecords_tools.pixels`) the same change of the RGB
    values is, exactly (clipping aside), luma `Y -> (Y - mean) * factor + mean + delta`
    and chroma `C -> (C - 128) * factor + 128`, with the clip's mean luma as the mean
    (the format's `color_offset` in `stpkeras.pixel_formats`).
    """
    low, high = contrast
    if not 0.0 < low <= high:
        raise ValueError(f"Invalid value for argument `contrast`. Expected 0 < low <= high. "
                         f"Received contrast={contrast}")
    fmt = pixel_formats.get(pixels)   # picks the graph at trace time
    patch = tf.convert_to_tensor(patch)
    seeds = tf.random.experimental.stateless_split(seed, 2)
    delta = tf.random.stateless_uniform([], seeds[0], -brightness, brightness) * 255.0
    factor = tf.random.stateless_uniform([], seeds[1], low, high)
    return tf.ensure_shape(_affine_uint8(patch, factor, fmt.color_offset(patch, factor, delta)), patch.shape)


def random_shift(patch: tf.Tensor, seed: tf.Tensor, max_shift: float = 0.5) -> tf.Tensor:
    """Starts the clip up to `max_shift x T` frames earlier or later: a trim off the patch grid.

    Frames that would come from outside the patch repeat its first or last frame
    (one gather of whole frames).
    """
    if not 0.0 <= max_shift < 1.0:
        raise ValueError(f"Invalid value for argument `max_shift`. Expected a value in [0, 1). "
                         f"Received max_shift={max_shift}")
    patch = tf.convert_to_tensor(patch)
    frames = tf.shape(patch)[0]
    most = tf.cast(tf.math.floor(max_shift * tf.cast(frames, tf.float32)), tf.int32)
    shift = tf.random.stateless_uniform([], seed, -most, most + 1, dtype=tf.int32)
    index = tf.clip_by_value(tf.range(frames) + shift, 0, frames - 1)
    return tf.ensure_shape(tf.gather(patch, index, axis=0), patch.shape)


def random_speed(patch: tf.Tensor, seed: tf.Tensor, rates: Tuple[float, float] = (0.5, 2.0)) -> tf.Tensor:
    """Plays the clip at a rate drawn log-uniformly from `rates` around its middle frame.

    A rate r > 1 skips frames (frame i shows source frame `c + (i - c) x r`, c the
    middle), r < 1 repeats them; frames past either end repeat the end frame.
    """
    low, high = rates
    if not 0.0 < low <= high:
        raise ValueError(f"Invalid value for argument `rates`. Expected 0 < low <= high. Received rates={rates}")
    patch = tf.convert_to_tensor(patch)
    frames = tf.shape(patch)[0]
    rate = tf.exp(tf.random.stateless_uniform([], seed, float(np.log(low)), float(np.log(high))))
    middle = tf.cast(frames - 1, tf.float32) / 2.0
    source = tf.round(middle + (tf.cast(tf.range(frames), tf.float32) - middle) * rate)
    index = tf.clip_by_value(tf.cast(source, tf.int32), 0, frames - 1)
    return tf.ensure_shape(tf.gather(patch, index, axis=0), patch.shape)


def resamplable(pixels) -> bool:
    """Whether patches stored in `pixels` are the video's RGB pixels one for one, as resampling and
    re-encoding them (letterbox, rescale, soften, reencode) need."""
    stored = pixel_formats.get(pixels).format
    return stored.pixel_aligned and stored.channels == 3


def _require_rgb(op: str, pixels) -> None:
    if not resamplable(pixels):
        raise ValueError(f"Invalid value for argument `pixels`. The {op!r} augmentation expects 'rgb' patches. "
                         f"Received pixels={pixel_formats.get(pixels).format.name!r}")


def random_letterbox(patch: tf.Tensor, seed: tf.Tensor, max_bar: float = 0.15) -> tf.Tensor:
    """Shrinks the picture and adds black bars: top and bottom each `[0, max_bar] x H`, left and right
    each `[0, max_bar] x W` (drawn separately), the picture resized into what is left (nearest neighbour)."""
    if not 0.0 <= max_bar < 0.5:
        raise ValueError(f"Invalid value for argument `max_bar`. Expected a value in [0, 0.5). "
                         f"Received max_bar={max_bar}")
    patch = tf.convert_to_tensor(patch)
    shape = tf.shape(patch)
    height, width = shape[1], shape[2]
    seeds = tf.random.experimental.stateless_split(seed, 2)

    def bar(size, s):
        most = tf.cast(tf.math.floor(max_bar * tf.cast(size, tf.float32)), tf.int32)
        return tf.random.stateless_uniform([], s, 0, most + 1, dtype=tf.int32)

    bar_h, bar_w = bar(height, seeds[0]), bar(width, seeds[1])
    inner_h, inner_w = height - 2 * bar_h, width - 2 * bar_w
    rows = tf.gather(patch, _nearest(inner_h, 0, height), axis=1)
    inner = tf.gather(rows, _nearest(inner_w, 0, width), axis=2)
    boxed = tf.pad(inner, [[0, 0], [bar_h, height - inner_h - bar_h], [bar_w, width - inner_w - bar_w], [0, 0]])
    return tf.ensure_shape(boxed, patch.shape)


def random_rescale(patch: tf.Tensor, seed: tf.Tensor, scale: Tuple[float, float] = (0.25, 0.75)) -> tf.Tensor:
    """Downscales every frame by a factor in `scale` (area averaging) and back up to `[H, W]` (bilinear):
    the detail a smaller copy loses."""
    low, high = scale
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"Invalid value for argument `scale`. Expected 0 < low <= high <= 1. Received scale={scale}")
    patch = tf.convert_to_tensor(patch)
    shape = tf.shape(patch)
    factor = tf.random.stateless_uniform([], seed, low, high)
    small = tf.maximum(1, tf.cast(tf.round(factor * tf.cast(shape[1:3], tf.float32)), tf.int32))
    down = tf.image.resize(patch, small, method="area")
    up = tf.image.resize(down, shape[1:3], method="bilinear")
    return tf.ensure_shape(tf.cast(tf.clip_by_value(tf.round(up), 0.0, 255.0), tf.uint8), patch.shape)


def random_soften(patch: tf.Tensor, seed: tf.Tensor, scale: Tuple[float, float] = (0.25, 0.75),
                  rate: float = 0.5) -> tf.Tensor:
    """`random_rescale` on a `rate` share of the clips, the others as they are: footage with less fine detail
    than the training videos have (smooth shading, flat areas), so that a denoiser also learns to average
    more where nothing is left to keep: `--task enhance`'s `soften` (`degrade.make_pairs`), on clean patches
    before they are degraded. RGB patches only, as `rescale`."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"Invalid value for argument `rate`. Expected a value in [0, 1]. Received rate={rate}")
    patch = tf.convert_to_tensor(patch)
    seeds = tf.random.experimental.stateless_split(seed, 2)
    soften = tf.random.stateless_uniform([], seeds[0]) < rate
    return tf.ensure_shape(tf.cond(soften, lambda: random_rescale(patch, seeds[1], scale), lambda: patch),
                           patch.shape)


def random_reencode(patch: tf.Tensor, seed: tf.Tensor, quality: Tuple[int, int] = (10, 60)) -> tf.Tensor:
    """Encodes and decodes every frame as a JPEG at one quality in `quality` (drawn per clip, inclusive)."""
    low, high = quality
    if not 1 <= low <= high <= 100:
        raise ValueError(f"Invalid value for argument `quality`. Expected 1 <= low <= high <= 100. "
                         f"Received quality={quality}")
    patch = tf.convert_to_tensor(patch)
    channels = patch.shape[-1]
    if channels is None or channels % 3:
        raise ValueError(f"Invalid value for argument `patch`. Expected RGB channels (a multiple of 3). "
                         f"Received shape {patch.shape}")
    q = tf.random.stateless_uniform([], seed, low, high + 1, dtype=tf.int32)
    # Stacked clips (the enhance task's input and target along channels) share the draw: each is encoded alike.
    groups = tf.split(patch, channels // 3, axis=-1)
    frames = [tf.map_fn(lambda frame: tf.image.adjust_jpeg_quality(frame, q), g,
                        fn_output_signature=tf.TensorSpec(g.shape[1:], tf.uint8)) for g in groups]
    return tf.ensure_shape(tf.concat(frames, axis=-1) if len(frames) > 1 else frames[0], patch.shape)


AUGMENTATIONS = {"flip": random_flip, "crop": random_crop, "color": random_color, "shift": random_shift,
                 "speed": random_speed, "letterbox": random_letterbox, "rescale": random_rescale,
                 "reencode": random_reencode}
# The order ops run in whatever order they are named: time, then geometry, colour, and the codec last.
ORDER = ("shift", "speed", "flip", "crop", "letterbox", "rescale", "color", "reencode")
RGB_ONLY = ("letterbox", "rescale", "reencode")
# `--task embed`'s default: what a copy of a video goes through (module docstring).
COPY_AUGMENT: Tuple[str, ...] = ("shift", "speed", "crop", "letterbox", "rescale", "color", "reencode")


def parse_augment(text: str | Sequence[str] | None) -> Tuple[str, ...]:
    """`'flip,crop,color'` / `'none'` / `''` / a sequence -> a tuple of known op names."""
    if text is None:
        return ()
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n and n != "none"]
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"Invalid value for argument `augment`. Expected a comma-separated list of "
                         f"{sorted(AUGMENTATIONS)} or 'none'. Received augment={text!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"Invalid value for argument `augment`. Expected each op at most once. "
                         f"Received augment={text!r}")
    return tuple(names)


def make_augment(names: Sequence[str], pixels: str | PixelFormat = "rgb") -> Augment:
    """Chains the named ops into one `(uint8 patch, int64 [2] seed) -> uint8 patch` function.

    Time goes first, then geometry, colour, and re-encoding last (`ORDER`); every op gets its own
    seed split from `seed`.
    `pixels` is the patches' format (`PatchSpec.pixels`): flip and crop move whole
    columns and rows of either layout, colour needs to know which values are luma.
    """
    names = parse_augment(names)
    pixel_formats.get(pixels)  # an unknown format fails here, not when the pipeline is traced
    for name in RGB_ONLY:
        if name in names:
            _require_rgb(name, pixels)
    order = [n for n in ORDER if n in names]
    ops = [functools.partial(random_color, pixels=pixels) if n == "color" else AUGMENTATIONS[n] for n in order]

    def augment(patch: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        if not ops:
            return patch
        seeds = tf.random.experimental.stateless_split(seed, len(ops))
        for i, op in enumerate(ops):
            patch = op(patch, seeds[i])
        return patch

    augment.names = tuple(order)  # type: ignore[attr-defined]
    return augment


# --- flips that swap labels ---------------------------------------------------------------------------
# A flip of a clip panning left pans right: motion classes that mirror each other stay right under a flip
# when the flip swaps their labels too (`--flip-labels h:left=right --flip-labels v:up=down`). Played
# backwards (`t`), a clip panning left pans right too, and one panning up pans down. Mirrored about its main
# diagonal (`d`: rows become columns), a clip panning left pans up and one panning right pans down
# (`--flip-labels d:left=up --flip-labels d:right=down`); it needs square frames.
FLIP_AXES = {"h": 2, "v": 1, "t": 0}   # the axis of `[T, H, W, C]` each flip reverses
TRANSPOSE = "d"                        # the flip that swaps H and W
LABEL_FLIPS = (*FLIP_AXES, TRANSPOSE)


def flip_clips(clips, axis: str, batched: bool = True):
    """`clips` (`[B, T, H, W, C]`, or one `[T, H, W, C]` with `batched=False`; a tf, numpy or Keras tensor)
    flipped along `axis` of `LABEL_FLIPS`. Each flip is its own inverse."""
    import keras

    first = 1 if batched else 0
    if axis == TRANSPOSE:
        order = list(range(first + 4))
        order[first + 1], order[first + 2] = first + 2, first + 1
        return keras.ops.transpose(clips, order)
    return keras.ops.flip(clips, axis=FLIP_AXES[axis] + first)


def parse_flip_labels(entries: Sequence[str], labels: Sequence[str]) -> dict:
    """`['h:left=right', 'v:up=down']` -> `{axis letter: int32 [C] label permutation}`: under a flip along the
    axis, class i becomes class `permutation[i]`; classes not named are their own mirror image."""
    labels = list(labels)
    out = {}
    for entry in entries:
        axis, _, pair = str(entry).partition(":")
        a, _, b = pair.partition("=")
        if axis not in LABEL_FLIPS or not a or not b or a == b or a not in labels or b not in labels:
            raise ValueError(f"Invalid value for argument `flip_labels`. Expected AXIS:A=B with AXIS h (left-right), "
                             f"v (top-bottom), t (time: the clip played backwards) or d (the main diagonal: rows "
                             f"become columns) and two different classes of {labels}. Received {entry!r}")
        permutation = out.setdefault(axis, list(range(len(labels))))
        i, j = labels.index(a), labels.index(b)
        if permutation[i] != i or permutation[j] != j:
            raise ValueError(f"Invalid value for argument `flip_labels`. Expected each class in at most one pair "
                             f"per axis. Received {entry!r} after {[e for e in entries if e != entry]}")
        permutation[i], permutation[j] = j, i
    return out


def _require_row_aligned(permutations: dict, pixels, argument: str) -> None:
    """A top-bottom flip (`v`) or a transposition (`d`) needs one picture row per stored row."""
    if ("v" in permutations or TRANSPOSE in permutations) and not pixel_formats.get(pixels).format.pixel_aligned:
        # A packed row of yuv440 is a pair of picture rows: reversing the rows would swap the pair's order.
        raise ValueError(f"Invalid value for argument `{argument}`. A top-bottom flip (v) or a transposition (d) "
                         f"needs 'rgb' patches. Received pixels={pixel_formats.get(pixels).format.name!r}")


def require_square(permutations: dict, height, width, argument: str = "flip_labels") -> None:
    """A transposition (`d`) keeps a clip's shape only when its frames are square."""
    if TRANSPOSE in permutations and height != width:
        raise ValueError(f"Invalid value for argument `{argument}`. A transposition (d) needs square patches "
                         f"(height = width). Received {height}x{width}")


def make_label_flips(permutations: dict, pixels: str | PixelFormat = "rgb"):
    """`(uint8 [T, H, W, C] patch, int32 label, int64 [2] seed) -> (patch, label)`: each axis of `permutations`
    (`parse_flip_labels`) flips the clip with probability 1/2 and maps its label through the permutation."""
    _require_row_aligned(permutations, pixels, "flip_labels")
    axes = [(a, tf.constant(p, tf.int32)) for a, p in sorted(permutations.items())]

    def flip(patch: tf.Tensor, label: tf.Tensor, seed: tf.Tensor):
        if TRANSPOSE in permutations:
            require_square(permutations, patch.shape[1], patch.shape[2])
        seeds = tf.random.experimental.stateless_split(seed, max(1, len(axes)))
        for (axis, permutation), s in zip(axes, tf.unstack(seeds)):
            flipped = tf.random.stateless_uniform([], s) < 0.5
            patch = tf.cond(flipped, lambda p=patch, a=axis: flip_clips(p, a, batched=False), lambda p=patch: p)
            label = tf.where(flipped, tf.gather(permutation, label), label)
        return patch, label

    return flip


def _mean_over_flips(model, axes: Sequence[str], undo):
    """`(inputs, mean)`: a `keras.Input` like `model`'s and the mean of `model`'s float32 outputs over it and its
    2^k flips (every combination of `axes`, flipped in sorted order), each output mapped back to the unflipped
    input's terms by `undo(output, subset)`. The one loop of both kinds of test-time augmentation."""
    import itertools

    import keras

    axes = sorted(axes)
    inputs = keras.Input(model.input_shape[1:], dtype=model.inputs[0].dtype, name=model.inputs[0].name)
    views = []
    for n in range(len(axes) + 1):
        for subset in itertools.combinations(axes, n):
            patch = inputs
            for axis in subset:
                patch = flip_clips(patch, axis)
            output = keras.ops.cast(model(patch), "float32")
            views.append(undo(output, subset) if subset else output)
    return inputs, views[0] if len(views) == 1 else keras.ops.mean(keras.ops.stack(views), axis=0)


def flip_averaged(model, permutations: dict, pixels: str | PixelFormat = "rgb"):
    """Test-time augmentation, the inference twin of `make_label_flips`: a `keras.Model` whose logits are the
    mean of `model`'s over the clip and its 2^k flips (every combination of the axes of `permutations`), each
    flip's logits put back in the clip's own class order (under a flip, class i is class `permutation[i]`)."""
    import keras

    _require_row_aligned(permutations, pixels, "permutations")
    require_square(permutations, *model.input_shape[2:4], argument="permutations")

    def in_clip_classes(logits, subset):
        order = np.arange(model.output_shape[-1])
        for axis in subset:   # the order `make_label_flips` applies them in
            order = np.asarray(permutations[axis])[order]
        return keras.ops.take(logits, order.astype(np.int32), axis=-1)

    inputs, mean = _mean_over_flips(model, permutations, in_clip_classes)
    return keras.Model(inputs, mean, name=f"{model.name}_flip_averaged")


# `stp enhance --tta`: left-right, top-bottom and backwards in time, 8 passes (on the benchmark's unseen camera footage
# +0.27 dB over one pass; the first two alone, 4 passes, +0.21).
ENHANCE_TTA_AXES = ("h", "v", "t")


def flip_averaged_pixels(model, axes: Sequence[str] = ENHANCE_TTA_AXES):
    """Test-time augmentation for an enhancer (a self-ensemble): a `keras.Model` whose pixels are the mean of
    `model`'s over the patch and its 2^k flips (every combination of `axes`, of "h", "v", "t"), each output
    flipped back. A restoration does not change under a flip of its input, so each pass is an estimate of the
    same clean patch with its own errors, and their mean is the better one."""
    import keras

    from stpkeras.signatures import PIXELS

    unknown = [a for a in axes if a not in FLIP_AXES]
    if not axes or unknown or len(set(axes)) != len(axes):
        raise ValueError(f"Invalid value for argument `axes`. Expected distinct flips of {sorted(FLIP_AXES)}. "
                         f"Received axes={list(axes)!r}")
    inputs, mean = _mean_over_flips(
        model, axes, lambda pixels, subset: keras.ops.flip(pixels, axis=[FLIP_AXES[a] + 1 for a in subset]))
    return keras.Model(inputs, keras.layers.Identity(name=PIXELS)(mean), name=f"{model.name}_flip_averaged")


# Ops that run faster on a decoded batch (`make_batch_augment`) than record by record.
BATCH_OPS = ("flip",)


def make_batch_augment(names: Sequence[str], pixels: str | PixelFormat = "rgb"):
    """`(uint8 [B, T, H, W, C], per-patch seeds int64 [B, 2]) -> batch`: `make_augment(names)` applied
    to each patch with its own seed, so exactly the pixels of the record-by-record path. None when an
    op is not in `BATCH_OPS`.

    The batch is decoded in one op, then each patch flipped on its own (a
    `tf.cond`, unrolled when B is static) and the batch stacked again: on 32
    clips of 16x112x112, 0.14 ms of CPU per clip, against 0.19 for `tf.map_fn`,
    0.49 for gather + reverse + `tensor_scatter_nd_update`, 1.5 for a
    batch-wide `tf.where` and 3.4 for `tf.reverse_sequence`.
    """
    names = parse_augment(names)
    if not names or any(n not in BATCH_OPS for n in names):
        return None
    one = make_augment(names, pixels)

    def augment(patches: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
        n = patches.shape[0]
        if n is None or n > 256:
            return tf.map_fn(lambda a: one(a[0], a[1]), (patches, seeds), fn_output_signature=patches.dtype)
        return tf.stack([one(patches[i], seeds[i]) for i in range(n)])

    augment.names = one.names  # type: ignore[attr-defined]
    return augment
