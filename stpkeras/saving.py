"""Saving stage: the Keras objects stpkeras saves its models with, made known to `keras.saving.load_model`.

After `import stpkeras`, `keras.saving.load_model("RUN/best.keras")` loads every model the package
writes, though `import stpkeras` itself does not import TensorFlow (so `stp --help` and
`stp inspect` start at once). When Keras is imported, before or after stpkeras, `register()` puts a
stand-in for each name in `DEFINED_IN` into Keras' global custom objects; the first time Keras
deserialises one, the stand-in imports the module that defines it, whose
`@keras.saving.register_keras_serializable` replaces every stand-in of that module with the real
class. Importing those modules from the import hook itself would run them in the middle of the
stpkeras import that first imported Keras, half-initialised; the stand-ins defer that to load time.
"""

from __future__ import annotations

import importlib

PACKAGE = "stpkeras"

# Registered class name -> the module that defines it (tests/test_saving.py checks it is complete).
DEFINED_IN = {
    "BudgetSchedule": "stpkeras.budget",
    "Normalize": "stpkeras.models.layers",
    "PositionalEmbedding": "stpkeras.models.layers",
    "ResidualPixels": "stpkeras.models.layers",
    "PixelPhases": "stpkeras.models.layers",
    "SegmentationLoss": "stpkeras.models.segmentation",
    "GlobalMean": "stpkeras.models.layers",
    "GridMean": "stpkeras.models.layers",
    "MergeViews": "stpkeras.models.layers",
    "SplitViews": "stpkeras.models.layers",
    "Destandardize": "stpkeras.models.regression",
    "RegressionLoss": "stpkeras.models.regression",
    "ContrastiveLoss": "stpkeras.embedding",
    "PairAccuracy": "stpkeras.embedding",
    "PSNR": "stpkeras.quality",
    "Tubelets": "stpkeras.models.vivit",
    "TubeMask": "stpkeras.models.vivit",
    "FillMasked": "stpkeras.models.vivit",
    "MaskedPixelLoss": "stpkeras.models.vivit",
    "ScaledAdamW": "stpkeras.finetune",
    "SSIM": "stpkeras.quality",
    "CausalConv3D": "stpkeras.models.causal",
    "CausalMean": "stpkeras.models.causal",
    "LastFrame": "stpkeras.models.causal",
    "FrameFeatures": "stpkeras.models.causal",
    "Correlation": "stpkeras.models.motion",
    "FrameContrast": "stpkeras.models.motion",
    "MatchSoftmax": "stpkeras.models.motion",
    "FramePairs": "stpkeras.models.motion",
    "GlobalCorrelation": "stpkeras.models.softmotion",
    "SoftArgmax": "stpkeras.models.softmotion",
}


class _StandIn:
    """Registered under `stpkeras>NAME` until NAME's module is imported; `from_config` imports it."""

    def __init__(self, name: str):
        self.name = name

    def from_config(self, config):
        import keras

        importlib.import_module(DEFINED_IN[self.name])
        real = keras.saving.get_custom_objects()[f"{PACKAGE}>{self.name}"]
        if isinstance(real, _StandIn):
            raise TypeError(f"{DEFINED_IN[self.name]} does not define the Keras object {self.name!r}; "
                            f"expected a class registered as '{PACKAGE}>{self.name}'")
        return real.from_config(config)


def register(keras_module=None) -> None:
    """Makes every stpkeras object loadable by name (the real class where its module is imported)."""
    import keras

    objects = keras.saving.get_custom_objects()
    for name in DEFINED_IN:
        objects.setdefault(f"{PACKAGE}>{name}", _StandIn(name))
