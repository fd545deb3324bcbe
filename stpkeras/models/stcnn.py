"""Model stage: `stcnn`, the spacetime-patch network of the user's document.

Conv3D -> ReLU -> MaxPool3D -> flatten -> Dense(num_classes): one
spatiotemporal filter bank over the patch, then a linear read-out. A temporal
kernel of 1 (`kernel_size=(1, 3, 3)`) sees no motion: the control model of the
learning test.

`causal=True`: the convolution pads time on the past side only (`causal.CausalConv3D`), the pooling is
spatial only, and the head averages each frame's flattened map over the last `spec.frames` frames
(`causal.CausalMean`): the answer at frame t sees no later frame, and the model can stream
(`stp export --streaming`).
"""

from __future__ import annotations

import keras

from stpkeras.models import causal as causal_layers
from stpkeras.models import layers


def build_stcnn(spec, num_classes: int, *, filters: int = 32, kernel_size=(3, 5, 5), pool_size=(2, 4, 4),
                dropout: float = 0.0, causal: bool = False, name: str = "stcnn") -> keras.Model:
    """uint8 `[B, T, H, W, 3]` -> logits `[B, num_classes]`; `features` is the flattened pooled map (causal: the
    mean of the last `spec.frames` frames' flattened maps, read at the last frame)."""
    num_classes = layers.check_classes(num_classes)
    filters = layers.positive_ints(filters, "filters")[0]
    kernel_size = layers.triple(kernel_size, "kernel_size")
    pool_size = layers.triple(pool_size, "pool_size")
    inputs = layers.patch_input(spec)
    x = layers.normalize(spec, inputs)
    if causal:
        x = causal_layers.CausalConv3D(filters, kernel_size, name="conv")(x)
        x = keras.layers.ReLU(name="relu")(x)
        x = keras.layers.MaxPool3D((1, *pool_size[1:]), padding="same", name="pool")(x)
        frames = causal_layers.FrameFeatures(mean=False, name="frame_features")(x)
        features = causal_layers.causal_features(frames, spec.frames)
    else:
        x = keras.layers.Conv3D(filters, kernel_size, padding="same", name="conv")(x)
        x = keras.layers.ReLU(name="relu")(x)
        x = keras.layers.MaxPool3D(pool_size, padding="same", name="pool")(x)
        features = keras.layers.Flatten(name="features")(x)
    logits = layers.classifier_head(features, num_classes, layers.check_rate(dropout))
    return keras.Model(inputs, logits, name=name)
