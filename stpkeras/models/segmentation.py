"""Model stage: segmentation networks for `--task segment`: a class per voxel or a class per frame.

`unet3d` here is the same encoder-decoder as the enhancement `unet3d` (levels
that halve height and width, never time; Conv3DTranspose back up; skips by
concatenation) with a classification head instead of the residual pixels:

- `kind="mask"`: a 1x1x1 Conv3D to `num_classes` logits per voxel, `[B, T, H, W, K]`;
- `kind="frames"`: the decoder's map averaged over height and width, then a
  Dense to logits per frame, `[B, T, K]`.

`kernel_size=(1, 3, 3)` makes every convolution per frame: the 2D baseline that
sees no motion (the control model of the segmentation test).

`SegmentationLoss` is the task's loss: cross-entropy plus a soft Dice term,
both over labelled voxels only (ids < 0 are left out).
"""

from __future__ import annotations

import keras
from keras import ops

from stpkeras.models import layers
from stpkeras.models.unet3d import unet_trunk

KINDS = ("mask", "frames")
SEGMENT_MODELS = ("unet3d",)


def build_unet3d_segmenter(spec, num_classes: int, *, kind: str = "mask", filters=(16, 32, 64), convs: int = 2,
                           kernel_size=3, name: str = "unet3d_segment") -> keras.Model:
    """uint8 `[B, T, H, W, 3]` -> float32 logits `[B, T, H, W, K]` (mask) or `[B, T, K]` (frames), layer 'logits'."""
    num_classes = layers.check_classes(num_classes, minimum=2)
    if kind not in KINDS:
        raise ValueError(f"Invalid value for argument `kind`. Expected one of {KINDS}. Received kind={kind!r}")
    inputs, x = unet_trunk(spec, filters, convs, kernel_size)
    if kind == "mask":
        logits = keras.layers.Conv3D(num_classes, 1, dtype="float32", name="logits")(x)
    else:
        from stpkeras.models.layers import GlobalMean
        per_frame = GlobalMean((2, 3), name="frame_features")(x)
        logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(per_frame)
    return keras.Model(inputs, logits, name=name)


def build_segmenter(model: str, spec, num_classes: int, *, kind: str, **options) -> keras.Model:
    """The segment task's factory: model family `model` (only 'unet3d') with a `kind` head."""
    if model not in SEGMENT_MODELS:
        raise ValueError(f"Invalid value for argument `model`. Task segment supports {list(SEGMENT_MODELS)}. "
                         f"Received model={model!r}")
    return build_unet3d_segmenter(spec, num_classes, kind=kind, **options)


@keras.saving.register_keras_serializable(package=layers.PACKAGE)
class SegmentationLoss(keras.losses.Loss):
    """Cross-entropy + `dice` x soft Dice loss: int `y_true [B, ...]` (ids < 0 unlabelled) against float
    logits `y_pred [B, ..., K]`; one scalar per batch.

    Why Dice: a small object is a small share of the voxels, and cross-entropy
    alone first settles on "all background" (85% right, and a flat gradient
    from there). Dice is `1 - 2|P.Y| / (|P| + |Y|)` per class, averaged over
    classes present in the batch or predicted, so the object class weighs as
    much as the background however few voxels it has (Milletari et al. 2016,
    V-Net). `dice=0` is plain cross-entropy.
    """

    def __init__(self, dice: float = 1.0, smooth: float = 1.0, name: str = "ce_dice", **kwargs):
        super().__init__(name=name, **kwargs)
        if not dice >= 0:
            raise ValueError(f"Invalid value for argument `dice`. Expected a value >= 0. Received dice={dice!r}")
        if not smooth > 0:
            raise ValueError(f"Invalid value for argument `smooth`. Expected a strictly positive value. "
                             f"Received smooth={smooth!r}")
        self.dice = float(dice)
        self.smooth = float(smooth)

    def call(self, y_true, y_pred):
        logits = ops.cast(y_pred, "float32")
        k = ops.shape(logits)[-1]
        y_true = ops.cast(y_true, "int32")
        valid = ops.cast(y_true >= 0, "float32")
        ids = ops.where(y_true >= 0, y_true, 0)
        count = ops.maximum(ops.sum(valid), 1.0)
        ce = ops.sparse_categorical_crossentropy(ids, logits, from_logits=True)
        loss = ops.sum(ce * valid) / count
        if self.dice:
            # Flattened to [N, K]: one soft confusion over the batch, not per patch (a patch may miss the object).
            probs = ops.reshape(ops.softmax(logits, axis=-1) * valid[..., None], (-1, k))
            onehot = ops.reshape(ops.one_hot(ids, k) * valid[..., None], (-1, k))
            inter = ops.sum(probs * onehot, axis=0)
            sizes = ops.sum(probs, axis=0) + ops.sum(onehot, axis=0)
            dice = (2.0 * inter + self.smooth) / (sizes + self.smooth)
            # A class absent from the batch and predicted nowhere scores ~1: it neither helps nor hurts.
            loss = loss + self.dice * (1.0 - ops.mean(dice))
        return loss

    def get_config(self):
        return {**super().get_config(), "dice": self.dice, "smooth": self.smooth}
