"""Quality stage: PSNR and SSIM of enhanced pixels against clean ones, in TF (functions and Keras metrics).

Both take pixels in 0-255 units (uint8, or float as the enhancement models
output) shaped `[..., H, W, C]`; predictions are clipped to [0, 255] and rounded
first, so a metric measures the uint8 video a user gets. PSNR is
`10 log10(255^2 / MSE)` over the last four axes (a whole patch `[T, H, W, C]`,
or one frame when given `[H, W, C]`); SSIM is `tf.image.ssim` (Gaussian window
11x11, sigma 1.5, K1 0.01, K2 0.03, on RGB values) per frame, averaged over
frames. A perfect match has infinite PSNR; it is reported as `MAX_PSNR`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

MAX_VALUE = 255.0
# The PSNR of two identical patches: a finite cap, so means over patches stay finite.
MAX_PSNR = 100.0


def as_pixels(x) -> tf.Tensor:
    """uint8 or float values in 0-255 units -> float32, clipped to [0, 255] and rounded (what uint8 output holds)."""
    x = tf.convert_to_tensor(x)
    if x.dtype == tf.uint8:
        return tf.cast(x, tf.float32)
    return tf.round(tf.clip_by_value(tf.cast(x, tf.float32), 0.0, MAX_VALUE))


def psnr(pred, target, axes: int = 4) -> tf.Tensor:
    """PSNR in dB over the last `axes` axes (4: per patch `[T, H, W, C]`; 3: per frame), capped at `MAX_PSNR`."""
    a, b = as_pixels(pred), as_pixels(target)
    mse = tf.reduce_mean(tf.square(a - b), axis=list(range(-axes, 0)))
    value = 10.0 * tf.math.log(MAX_VALUE ** 2 / tf.maximum(mse, 1e-12)) / tf.math.log(10.0)
    return tf.minimum(value, MAX_PSNR)


def ssim(pred, target) -> tf.Tensor:
    """SSIM per patch `[..., T, H, W, C]` (mean over its frames) or per frame `[H, W, C]`; needs H, W >= 11."""
    a, b = as_pixels(pred), as_pixels(target)
    per_frame = tf.image.ssim(a, b, max_val=MAX_VALUE)
    return tf.reduce_mean(per_frame, axis=-1) if a.shape.rank >= 4 else per_frame


@keras.saving.register_keras_serializable(package="stpkeras")
class PSNR(keras.metrics.MeanMetricWrapper):
    """Mean PSNR (dB) per patch of float predictions against uint8 targets."""

    def __init__(self, name: str = "psnr", dtype=None):
        super().__init__(fn=psnr, name=name, dtype=dtype)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="stpkeras")
class SSIM(keras.metrics.MeanMetricWrapper):
    """Mean SSIM per patch of float predictions against uint8 targets."""

    def __init__(self, name: str = "ssim", dtype=None):
        super().__init__(fn=ssim, name=name, dtype=dtype)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}
