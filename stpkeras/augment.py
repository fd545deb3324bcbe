"""Augment stage: label-preserving augmentations of one `uint8 [T, H, W, C]` patch, in pure TF.

Every op takes the patch and a stateless seed (`int64 [2]`) and returns a
patch of the same dtype and shape, so the pipeline stays uint8 up to the
model (the model normalises in its first layer) and a seeded pipeline gives
the same pixels on every run. Each op draws its random values once per
patch, never per frame: the same flip, crop window and colour change apply
to every frame, or the augmentation itself would add motion.

Ops are named so the CLI can chain them (`--augment flip,crop,color`).
None of them runs on evaluation.
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import tensorflow as tf

Augment = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]

# The default for `stp train`: a horizontal flip swaps left and right motion, so it is
# not on by default (it would break any task whose classes differ by direction).
DEFAULT_AUGMENT: Tuple[str, ...] = ("crop", "color")


def random_flip(patch: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Flips the whole clip left-right with probability 1/2.

    `tf.cond` reverses only the patches it flips; a batch-wide `tf.where`
    would reverse and select every patch.
    """
    patch = tf.convert_to_tensor(patch)
    flip = tf.random.stateless_uniform([], seed) < 0.5
    return tf.cond(flip, lambda: tf.reverse(patch, axis=[2]), lambda: patch)


def random_crop(patch: tf.Tensor, seed: tf.Tensor, min_scale: float = 0.8) -> tf.Tensor:
    """Crops a random window inside the patch and resizes it back to `[H, W]`.

    The window's sides are each a fraction in `[min_scale, 1]` of the patch's
    (a scale and aspect jitter) at a random place. Nearest-neighbour resizing
    keeps the pixels uint8, so the op never makes a float copy of the clip.
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
    window = patch[:, top:top + crop_h, left:left + crop_w, :]
    resized = tf.image.resize(window, [height, width], method="nearest")
    return tf.ensure_shape(resized, patch.shape)


def random_color(patch: tf.Tensor, seed: tf.Tensor, brightness: float = 0.15,
                 contrast: Tuple[float, float] = (0.75, 1.25)) -> tf.Tensor:
    """Random brightness (`+-brightness x 255`) and contrast (factor in `contrast`) for the clip.

    Contrast scales each channel around its mean over the whole clip, as
    `tf.image.adjust_contrast` does per image. One float pass, rounded back to uint8.
    """
    low, high = contrast
    if not 0.0 < low <= high:
        raise ValueError(f"Invalid value for argument `contrast`. Expected 0 < low <= high. "
                         f"Received contrast={contrast}")
    seeds = tf.random.experimental.stateless_split(seed, 2)
    delta = tf.random.stateless_uniform([], seeds[0], -brightness, brightness) * 255.0
    factor = tf.random.stateless_uniform([], seeds[1], low, high)
    x = tf.cast(patch, tf.float32)
    mean = tf.reduce_mean(x, axis=[0, 1, 2], keepdims=True)
    x = (x - mean) * factor + mean + delta
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


AUGMENTATIONS = {"flip": random_flip, "crop": random_crop, "color": random_color}


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


def make_augment(names: Sequence[str]) -> Augment:
    """Chains the named ops into one `(uint8 patch, int64 [2] seed) -> uint8 patch` function.

    Geometry goes first, colour last; every op gets its own seed split from `seed`.
    """
    names = parse_augment(names)
    order = [n for n in ("flip", "crop", "color") if n in names]
    ops = [AUGMENTATIONS[n] for n in order]

    def augment(patch: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        if not ops:
            return patch
        seeds = tf.random.experimental.stateless_split(seed, len(ops))
        for i, op in enumerate(ops):
            patch = op(patch, seeds[i])
        return patch

    augment.names = tuple(order)  # type: ignore[attr-defined]
    return augment
