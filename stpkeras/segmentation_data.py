"""Segmentation data stage: what the segment task trains on: the kind of target a converted folder holds
(per-voxel masks or per-frame labels), its class names, and the `(record, seed) -> (patch, target)` element.

Below the tasks (`stpkeras.tasks`) and the inference module (`stpkeras.segment`), which both use it.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

MASK_CLASSES = "mask_classes"     # manifest keys written by `stp convert` for segmentation targets
FRAME_LABEL_NAMES = "frame_labels"
KINDS = ("mask", "frames")


def data_kind(info) -> str:
    """'mask' when the converted data carries masks, else 'frames' when it carries frame labels."""
    if info.manifest.get(MASK_CLASSES):
        return "mask"
    if info.manifest.get(FRAME_LABEL_NAMES):
        return "frames"
    raise ValueError("task segment needs records with masks or frame labels: convert a CSV with a `mask` "
                     "or an `intervals` column")


def class_names(info, kind: Optional[str] = None) -> Tuple[str, ...]:
    """Mask classes are named by their ids ('0', '1', ...); frame classes by the interval labels."""
    kind = kind or data_kind(info)
    if kind == "mask":
        return tuple(str(i) for i in range(int(info.manifest[MASK_CLASSES])))
    return tuple(info.manifest[FRAME_LABEL_NAMES])


def make_element(info, kind: str, augment: Sequence[str] = ()):
    """The segment task's element: `(serialized record, seed) -> (uint8 patch, int32 target)`.

    The target is the mask `[T, H, W]` or the frame labels `[T]`. For masks,
    flip and crop apply to pixels and mask together (the mask rides as a fourth
    channel; crop resizes with nearest neighbours, so ids stay ids); colour
    applies to the pixels only.
    """
    import tensorflow as tf

    from stpkeras import augment as augment_lib
    from tfrecords_tools import schema

    if kind not in KINDS:
        raise ValueError(f"Invalid value for argument `kind`. Expected one of {KINDS}. Received kind={kind!r}")
    spec, encoding = info.spec, info.encoding
    names = augment_lib.parse_augment(augment)
    geometry = augment_lib.make_augment([n for n in names if n != "color"])
    color = augment_lib.make_augment(["color"] if "color" in names else [])

    def element(serialized, seed):
        features = schema.parse_patch(serialized, encoding, mask=kind == "mask", frame_labels=kind == "frames")
        patch = schema.decode_pixels(features[schema.PATCH], encoding, spec.shape)
        seeds = tf.random.experimental.stateless_split(seed, 2)
        if kind == "mask":
            mask = schema.decode_mask(features[schema.MASK], spec.size)
            both = geometry(tf.concat([patch, mask[..., None]], axis=-1), seeds[0])
            patch, target = both[..., :spec.channels], tf.cast(both[..., spec.channels], tf.int32)
        else:
            patch = geometry(patch, seeds[0])
            target = tf.ensure_shape(tf.cast(features[schema.FRAME_LABELS], tf.int32), [spec.frames])
        return color(patch, seeds[1]), target

    return element
