"""Model stage, regression: any classifier family turned into a model of K values in the user's units.

The family's `logits` layer (K units) predicts standardised values `z`; the output layer `values`
(`Destandardize`) returns `z * std + mean` with the training targets' mean and deviation, so the model,
its `.keras` file and its export all answer in the units of the data. The loss (`RegressionLoss`) is taken
on the standardised scale, where every value weighs alike whatever its unit (a PSNR in dB next to a
score in [0, 1]) and a Huber `delta` of 1 means one standard deviation.
"""

from __future__ import annotations

from typing import Sequence

import keras
from keras import ops

from stpkeras.signatures import VALUES_LAYER

PACKAGE = "stpkeras"
REGRESSION_LOSSES = ("mse", "huber")


@keras.saving.register_keras_serializable(package=PACKAGE)
class Destandardize(keras.layers.Layer):
    """float `z [B, K]` -> float32 `z * std + mean` (`mean`, `std`: K floats, fixed, saved in the config)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        if len(self.mean) != len(self.std) or not all(s > 0 for s in self.std):
            raise ValueError(f"Invalid value for argument `std`. Expected {len(self.mean)} strictly positive "
                             f"values (one per mean). Received std={std!r}")

    def call(self, z):
        return ops.cast(z, "float32") * ops.convert_to_tensor(self.std) + ops.convert_to_tensor(self.mean)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std}


@keras.saving.register_keras_serializable(package=PACKAGE)
class RegressionLoss(keras.losses.Loss):
    """Mean squared error (`kind='mse'`) or Huber loss (`'huber'`, delta 1) of `(y_true - y_pred) / std`:
    float `[B, K]` targets and predictions in the user's units, the error in standard deviations. `std` holds
    K deviations, or k that repeat along the K values (`--task stabilize`: 4 per pair of frames)."""

    def __init__(self, kind: str = "mse", std: Sequence[float] = (1.0,), name: str = "regression", **kwargs):
        super().__init__(name=name, **kwargs)
        if kind not in REGRESSION_LOSSES:
            raise ValueError(f"Invalid value for argument `kind`. Expected one of {REGRESSION_LOSSES}. "
                             f"Received kind={kind!r}")
        self.kind, self.std = kind, [float(v) for v in std]

    def call(self, y_true, y_pred):
        std = ops.convert_to_tensor(self.std)
        values = y_pred.shape[-1]
        if values is not None and values != len(self.std) and values % len(self.std) == 0:
            std = ops.tile(std, [values // len(self.std)])  # k deviations repeated: k values per frame pair
        error = (ops.cast(y_true, "float32") - ops.cast(y_pred, "float32")) / std
        if self.kind == "mse":
            return ops.mean(ops.square(error), axis=-1)
        small = ops.abs(error) <= 1.0
        return ops.mean(ops.where(small, 0.5 * ops.square(error), ops.abs(error) - 0.5), axis=-1)

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "std": self.std}


def build_regressor(model: str, spec, mean: Sequence[float], std: Sequence[float], **options) -> keras.Model:
    """The family `model` with `len(mean)` outputs, ending in the layer `values` (user units, float32)."""
    from stpkeras.models import build_model

    base = build_model(model, spec, len(mean), **options)
    values = Destandardize(mean, std, name=VALUES_LAYER)(base.output)
    return keras.Model(base.input, values, name=f"{base.name}_regressor")
