"""Model stage: `c3d`, a small C3D (Tran et al. 2015): stacked 3x3x3 convolutions and 3D pooling.

The first pool is spatial only (1x2x2), so early layers keep the temporal
resolution, as in the paper.
"""

from __future__ import annotations

import keras

from stpkeras.models import layers


def build_c3d(spec, num_classes: int, *, widths=(32, 64, 128, 256), convs_per_stage=(1, 1, 2, 2),
              dropout: float = 0.3, name: str = "c3d") -> keras.Model:
    """uint8 `[B, T, H, W, 3]` -> logits; `features` is the global average of the last stage."""
    num_classes = layers.check_classes(num_classes)
    widths = layers.positive_ints(widths, "widths")
    convs_per_stage = layers.positive_ints(convs_per_stage, "convs_per_stage")
    if len(convs_per_stage) != len(widths):
        raise ValueError("Invalid value for argument `convs_per_stage`. Expected one count per width "
                         f"({len(widths)}). Received convs_per_stage={convs_per_stage!r}")
    inputs = layers.patch_input(spec)
    x = layers.normalize(spec, inputs)
    for stage, (width, convs) in enumerate(zip(widths, convs_per_stage)):
        for i in range(convs):
            x = keras.layers.Conv3D(width, 3, padding="same", use_bias=False, name=f"conv{stage}_{i}")(x)
            x = keras.layers.BatchNormalization(name=f"bn{stage}_{i}")(x)
            x = keras.layers.ReLU(name=f"relu{stage}_{i}")(x)
        if stage < len(widths) - 1:
            pool = (1, 2, 2) if stage == 0 else (2, 2, 2)
            x = keras.layers.MaxPool3D(pool, padding="same", name=f"pool{stage}")(x)
    features = keras.layers.GlobalAveragePooling3D(name="features")(x)
    logits = layers.classifier_head(features, num_classes, layers.check_rate(dropout))
    return keras.Model(inputs, logits, name=name)
