"""Pretraining stage: the masked-autoencoding task's element and its figure (`--task pretrain`).

The model and its loss live with the ViT family (`stpkeras.models.vivit.build_vivit_mae`,
`MaskedPixelLoss`); here is what the task adds around them: the element (a patch, no label: any converted
folder serves, labelled or not) and `reconstructions.png`, a few fixed patches, their masked input and the
decoder's reconstruction, redrawn as epochs finish at a bounded cost.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

RECONSTRUCTIONS = "reconstructions.png"


def make_element(encoding: str, spec, augment: Sequence[str] = ()) -> Callable[[tf.Tensor, tf.Tensor],
                                                                                Tuple[tf.Tensor, tf.Tensor]]:
    """The pretrain task's element: `(serialized record, seed int64 [2]) -> (uint8 [T, H, W, C], int32 0)`.

    Labels are not read (the int32 0 is a placeholder target): the model's output carries its own target.
    """
    from stpkeras import augment as augment_lib
    from tfrecords_tools import schema

    augment_fn = augment_lib.make_augment(augment, spec.pixels)

    def element(serialized: tf.Tensor, seed: tf.Tensor):
        features = schema.parse_patch(serialized, encoding)
        patch = schema.decode_pixels(features[schema.PATCH], encoding, spec.shape)
        return augment_fn(patch, seed), tf.constant(0, tf.int32)

    return element


def sample_patches(info, split, count: int) -> np.ndarray:
    """The first `count` patches of `split` in manifest order (uint8 `[count, *spec.shape]`), the figure's rows."""
    from stpkeras import pipeline

    dataset = pipeline.make_dataset(info, split, batch_size=count, training=False,
                                    element_fn=make_element(info.encoding, info.spec))
    for patches, _ in dataset.take(1):
        return patches.numpy()
    return np.zeros((0, *info.spec.shape), np.uint8)


def reconstruct(model, patches: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(original, masked input, reconstruction) float RGB in [0, 1], `[K, T', H', W', 3]` (the tubelet grid's
    extent), for a `build_vivit_mae` model in inference mode (its fixed masks). Hidden tubelets of the
    reconstruction are the decoder's normalised prediction put back at the tubelet's own mean and spread
    (the figure shows how well structure is recovered, not whether brightness could be guessed); visible
    ones are the input's."""
    import keras

    from stpkeras.models.vivit import from_tubelets, split_reconstruction, to_tubelets

    tubelet = tuple(model.get_layer("target").tubelet)
    grid_shape = tuple(model.get_layer("tube_mask").grid_shape)
    pixels = keras.Model(model.input, model.get_layer("normalize").output)(patches, training=False)
    prediction, _, hidden = (np.asarray(a) for a in split_reconstruction(model(patches, training=False)))
    original = np.asarray(to_tubelets(keras.ops.cast(pixels, "float32"), tubelet))
    mean, std = original.mean(-1, keepdims=True), np.sqrt(original.var(-1, keepdims=True) + 1e-6)
    rebuilt = np.where(hidden > 0.5, prediction * std + mean, original)
    masked = np.where(hidden > 0.5, 0.0, original)   # hidden tubelets drawn mid-grey

    def image(tubelets):
        return np.clip((np.asarray(from_tubelets(tubelets, grid_shape, tubelet)) + 1.0) / 2.0, 0.0, 1.0)

    return image(original), image(masked), image(rebuilt)


class Reconstructions:
    """Redraws `reconstructions.png` for the model as epochs finish, at a bounded cost (as `run_folder.Curves`:
    a redraw waits `ratio` x the last one's cost, at least `min_interval` s; `final=True` always draws)."""

    def __init__(self, run_dir: str, patches: np.ndarray, min_interval: float = 10.0, ratio: float = 10.0):
        self.path, self.patches = os.path.join(run_dir, RECONSTRUCTIONS), patches
        self.min_interval, self.ratio = min_interval, ratio
        self._last, self._cost, self.epoch = None, 0.0, 0

    def update(self, model, epoch: int, final: bool = False) -> bool:
        """Draws if due (or `final`) with the model after `epoch` finished epochs; returns whether it drew."""
        from stpkeras.figures import draw_reconstructions

        now = time.monotonic()
        if not len(self.patches) or (not final and self._last is not None
                                     and now - self._last < max(self.min_interval, self.ratio * self._cost)):
            return False
        draw_reconstructions(*reconstruct(model, self.patches), self.path, title=f"after epoch {epoch}")
        self._last = time.monotonic()
        self._cost = self._last - now
        return True


def reporter(info, split, run_dir: str, count: int = 4) -> Optional[Reconstructions]:
    return Reconstructions(run_dir, sample_patches(info, split, count))
