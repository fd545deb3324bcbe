"""Model stage: `vivit`, a ViViT-style video transformer (Arnab et al. 2021, spatio-temporal attention).

Tubelet embedding (a Conv3D whose kernel equals its stride) -> learned
positional embedding -> pre-norm transformer encoder -> mean of the tokens.
"""

from __future__ import annotations

import keras

from stpkeras.models import layers


def encoder_block(x, dim: int, heads: int, mlp_dim: int, dropout: float, name: str):
    y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln1")(x)
    y = keras.layers.MultiHeadAttention(heads, dim // heads, dropout=dropout, name=f"{name}_attention")(y, y)
    x = keras.layers.Add(name=f"{name}_add1")([x, y])
    y = keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln2")(x)
    y = keras.layers.Dense(mlp_dim, activation="gelu", name=f"{name}_mlp1")(y)
    y = keras.layers.Dense(dim, name=f"{name}_mlp2")(y)
    if dropout:
        y = keras.layers.Dropout(dropout, name=f"{name}_dropout")(y)
    return keras.layers.Add(name=f"{name}_add2")([x, y])


def build_vivit(spec, num_classes: int, *, tubelet=(2, 8, 8), dim: int = 128, depth: int = 4, heads: int = 4,
                mlp_dim: int = 256, dropout: float = 0.0, name: str = "vivit") -> keras.Model:
    """uint8 `[B, T, H, W, 3]` -> logits. The tubelet is clipped to the patch; the rest of an axis
    that the tubelet does not divide is ignored (valid padding)."""
    num_classes = layers.check_classes(num_classes)
    tubelet = tuple(min(t, s) for t, s in zip(layers.triple(tubelet, "tubelet"), spec.size))
    dim, depth, heads, mlp_dim = (layers.positive_ints(v, n)[0] for v, n in
                                  ((dim, "dim"), (depth, "depth"), (heads, "heads"), (mlp_dim, "mlp_dim")))
    if dim % heads:
        raise ValueError(f"Invalid value for argument `heads`. Expected a divisor of dim={dim}. Received heads={heads}")
    dropout = layers.check_rate(dropout)
    inputs = layers.patch_input(spec)
    x = layers.normalize(spec, inputs)
    x = keras.layers.Conv3D(dim, tubelet, strides=tubelet, padding="valid", name="tubelets")(x)
    tokens = x.shape[1] * x.shape[2] * x.shape[3]
    x = keras.layers.Reshape((tokens, dim), name="tokens")(x)
    x = layers.PositionalEmbedding(name="position")(x)
    for i in range(depth):
        x = encoder_block(x, dim, heads, mlp_dim, dropout, f"encoder{i}")
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="encoder_ln")(x)
    features = keras.layers.GlobalAveragePooling1D(name="features")(x)
    logits = layers.classifier_head(features, num_classes)
    return keras.Model(inputs, logits, name=name)
