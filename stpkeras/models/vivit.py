"""Model stage: `vivit`, a ViViT-style video transformer (Arnab et al. 2021, spatio-temporal attention),
and its masked autoencoder for `--task pretrain` (VideoMAE, Tong et al. 2022).

Tubelet embedding (a Conv3D whose kernel equals its stride) -> learned
positional embedding -> pre-norm transformer encoder -> mean of the tokens.

The masked autoencoder (`build_vivit_mae`) shares the encoder's layers and their names with `vivit`, so
`--init-from` a pretraining run fills a `vivit` classifier's encoder. Tokens are in the order of the
tubelet grid `(t, h, w)`, time first. Tube masking hides the same spatial positions at every time step
(else a hidden tubelet could be copied from its neighbour in time); the encoder runs on the visible
tokens only, gathered, so at a mask ratio of 0.9 it sees a tenth of them; a light decoder fills the hidden
positions with a learned mask token, adds its own positional embedding and predicts each tubelet's pixels.
"""

from __future__ import annotations

import math
from typing import Tuple

import keras
from keras import ops

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


def _check(spec, tubelet, dim, depth, heads, mlp_dim, dropout):
    tubelet = tuple(min(t, s) for t, s in zip(layers.triple(tubelet, "tubelet"), spec.size))
    dim, depth, heads, mlp_dim = (layers.positive_ints(v, n)[0] for v, n in
                                  ((dim, "dim"), (depth, "depth"), (heads, "heads"), (mlp_dim, "mlp_dim")))
    if dim % heads:
        raise ValueError(f"Invalid value for argument `heads`. Expected a divisor of dim={dim}. Received heads={heads}")
    return tubelet, dim, depth, heads, mlp_dim, layers.check_rate(dropout)


POSITIONS = ("sincos", "learned")


def _position(position: str, grid_shape, name: str):
    """The positional embedding layer: trained either way, starting from the sine-cosine table of the grid
    (`sincos`, VideoMAE's) or from small random values (`learned`, ViViT's)."""
    if position not in POSITIONS:
        raise ValueError(f"Invalid value for argument `position`. Expected one of {POSITIONS}. "
                         f"Received position={position!r}")
    return layers.PositionalEmbedding(grid_shape=grid_shape if position == "sincos" else None, name=name)


def _tokens(spec, inputs, tubelet, dim, position="sincos"):
    """uint8 patches -> (tokens with their positions `[B, t*h*w, dim]`, RGB in [-1, 1] `[B, T, H, W, 3]`)."""
    pixels = layers.normalize(spec, inputs)
    x = keras.layers.Conv3D(dim, tubelet, strides=tubelet, padding="valid", name="tubelets")(pixels)
    grid_shape = tuple(x.shape[1:4])
    x = keras.layers.Reshape((math.prod(grid_shape), dim), name="tokens")(x)
    return _position(position, grid_shape, "position")(x), pixels


def build_vivit(spec, num_classes: int, *, tubelet=(2, 8, 8), dim: int = 128, depth: int = 4, heads: int = 4,
                mlp_dim: int = 256, dropout: float = 0.0, position: str = "sincos", name: str = "vivit") -> keras.Model:
    """uint8 `[B, T, H, W, 3]` -> logits. The tubelet is clipped to the patch; the rest of an axis
    that the tubelet does not divide is ignored (valid padding)."""
    num_classes = layers.check_classes(num_classes)
    tubelet, dim, depth, heads, mlp_dim, dropout = _check(spec, tubelet, dim, depth, heads, mlp_dim, dropout)
    inputs = layers.patch_input(spec)
    x, _ = _tokens(spec, inputs, tubelet, dim, position)
    for i in range(depth):
        x = encoder_block(x, dim, heads, mlp_dim, dropout, f"encoder{i}")
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="encoder_ln")(x)
    features = keras.layers.GlobalAveragePooling1D(name="features")(x)
    logits = layers.classifier_head(features, num_classes)
    return keras.Model(inputs, logits, name=name)


# --- the masked autoencoder (--task pretrain) -----------------------------------------------------

def grid(spec, tubelet) -> Tuple[int, int, int]:
    """The tubelet grid `(t, h, w)` of patches of `spec` (the tubelet clipped to the patch, valid padding)."""
    tubelet = tuple(min(t, s) for t, s in zip(layers.triple(tubelet, "tubelet"), spec.size))
    return tuple(s // t for s, t in zip(spec.size, tubelet))


def to_tubelets(pixels, tubelet):
    """Pixels `[B, T, H, W, C]` -> tubelets `[B, t*h*w, pt*ph*pw*C]` in the token order of `tubelets` (t, h, w);
    what an axis holds beyond a whole number of tubelets is dropped (as the Conv3D's valid padding does)."""
    pt, ph, pw = tubelet
    t, h, w = (int(s) // k for s, k in zip(pixels.shape[1:4], tubelet))
    c = pixels.shape[-1]
    x = pixels[:, :t * pt, :h * ph, :w * pw]
    x = ops.reshape(x, (-1, t, pt, h, ph, w, pw, c))
    x = ops.transpose(x, (0, 1, 3, 5, 2, 4, 6, 7))
    return ops.reshape(x, (-1, t * h * w, pt * ph * pw * c))


def from_tubelets(tubelets, grid_shape, tubelet, channels: int = 3):
    """The inverse of `to_tubelets`: `[B, t*h*w, pt*ph*pw*C]` -> pixels `[B, t*pt, h*ph, w*pw, C]`."""
    (t, h, w), (pt, ph, pw) = grid_shape, tubelet
    x = ops.reshape(tubelets, (-1, t, h, w, pt, ph, pw, channels))
    x = ops.transpose(x, (0, 1, 4, 2, 5, 3, 6, 7))
    return ops.reshape(x, (-1, t * pt, h * ph, w * pw, channels))


@keras.saving.register_keras_serializable(package=layers.PACKAGE)
class Tubelets(keras.layers.Layer):
    """Pixels `[B, T, H, W, C]` -> the reconstruction target: each tubelet's pixels `[B, N, pt*ph*pw*C]`,
    normalised by the tubelet's own mean and standard deviation (VideoMAE's target), in float32."""

    def __init__(self, tubelet=(2, 8, 8), epsilon: float = 1e-6, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.tubelet, self.epsilon = tuple(layers.triple(tuple(tubelet), "tubelet")), float(epsilon)

    def call(self, pixels):
        x = to_tubelets(ops.cast(pixels, "float32"), self.tubelet)
        mean = ops.mean(x, axis=-1, keepdims=True)
        var = ops.var(x, axis=-1, keepdims=True)
        return (x - mean) / ops.sqrt(var + self.epsilon)

    def get_config(self):
        return {**super().get_config(), "tubelet": list(self.tubelet), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package=layers.PACKAGE)
class TubeMask(keras.layers.Layer):
    """Tokens `[B, t*h*w, D]` -> (the visible tokens `[B, t*k, D]`, their spatial positions int32 `[B, k]`).

    Each patch keeps `k = round((1 - mask_ratio) * h*w)` (at least 1) of its `h*w` spatial positions, drawn at
    random, the same ones at every time step (a tube); the kept positions are in increasing order. In
    training the draw is new every step; otherwise it is a fixed function of the position in the batch, so
    validation losses and the reconstruction figure compare like with like across epochs.
    """

    def __init__(self, grid_shape, mask_ratio: float = 0.9, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.grid_shape = tuple(int(g) for g in grid_shape)
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ValueError("Invalid value for argument `mask_ratio`. Expected a value in [0, 1). "
                             f"Received mask_ratio={mask_ratio!r}")
        self.mask_ratio = float(mask_ratio)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def visible(self) -> int:
        t, h, w = self.grid_shape
        return max(1, int(round((1.0 - self.mask_ratio) * h * w)))

    def call(self, tokens, training=None):
        t, h, w = self.grid_shape
        batch = ops.shape(tokens)[0]
        noise = keras.random.uniform((batch, h * w), seed=self.seed_generator if training else 1234)
        keep = ops.sort(ops.cast(ops.argsort(noise, axis=-1)[:, :self.visible], "int32"), axis=-1)
        x = ops.reshape(tokens, (batch, t, h * w, tokens.shape[-1]))
        index = ops.broadcast_to(keep[:, None, :, None], (batch, t, self.visible, tokens.shape[-1]))
        x = ops.take_along_axis(x, index, axis=2)
        return ops.reshape(x, (batch, t * self.visible, tokens.shape[-1])), keep

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.grid_shape[0] * self.visible, input_shape[-1]), (input_shape[0], self.visible)

    def get_config(self):
        return {**super().get_config(), "grid_shape": list(self.grid_shape), "mask_ratio": self.mask_ratio,
                "seed": self.seed}


@keras.saving.register_keras_serializable(package=layers.PACKAGE)
class FillMasked(keras.layers.Layer):
    """(Visible tokens `[B, t*k, D]`, their spatial positions `[B, k]`) -> (all tokens `[B, t*h*w, D]`, a learned
    mask token where hidden; the hidden mark float32 `[B, t*h*w, 1]`: 1 hidden, 0 visible)."""

    def __init__(self, grid_shape, **kwargs):
        super().__init__(**kwargs)
        self.grid_shape = tuple(int(g) for g in grid_shape)

    def build(self, input_shape):
        self.mask_token = self.add_weight(name="mask_token", shape=(input_shape[0][-1],),
                                          initializer=keras.initializers.TruncatedNormal(stddev=0.02))

    def call(self, inputs):
        tokens, keep = inputs
        t, h, w = self.grid_shape
        dim = tokens.shape[-1]
        # Scattered by a one-hot product: a few thousand multiply-adds per token, no scatter op to distribute.
        onehot = ops.one_hot(keep, h * w, dtype=tokens.dtype)                        # [B, k, hw]
        visible = ops.reshape(tokens, (-1, t, keep.shape[-1], dim))
        placed = ops.einsum("bks,btkd->btsd", onehot, visible)                       # [B, t, hw, D]
        hidden = 1.0 - ops.sum(onehot, axis=1)                                       # [B, hw]
        full = placed + hidden[:, None, :, None] * ops.cast(self.mask_token, tokens.dtype)
        hidden = ops.broadcast_to(ops.cast(hidden, "float32")[:, None, :], (ops.shape(tokens)[0], t, h * w))
        return ops.reshape(full, (-1, t * h * w, dim)), ops.reshape(hidden, (-1, t * h * w, 1))

    def compute_output_shape(self, input_shape):
        n = math.prod(self.grid_shape)
        return (input_shape[0][0], n, input_shape[0][-1]), (input_shape[0][0], n, 1)

    def get_config(self):
        return {**super().get_config(), "grid_shape": list(self.grid_shape)}


def build_vivit_mae(spec, *, mask_ratio: float = 0.9, decoder_dim: int = 64, decoder_depth: int = 1,
                    tubelet=(2, 8, 8), dim: int = 128, depth: int = 4, heads: int = 4, mlp_dim: int = 256,
                    dropout: float = 0.0, position: str = "sincos", seed=None, name: str = "vivit_mae") -> keras.Model:
    """uint8 `[B, T, H, W, 3]` -> float32 `[B, N, 2P + 1]` (output layer 'reconstruction'), per token of the
    tubelet grid (N = t*h*w, P = pt*ph*pw*3): the decoder's prediction of the tubelet's normalised pixels,
    the target (`Tubelets`), and 1 where the tubelet was hidden from the encoder (`MaskedPixelLoss` reads
    the three). The encoder's options and layer names are `build_vivit`'s."""
    tubelet, dim, depth, heads, mlp_dim, dropout = _check(spec, tubelet, dim, depth, heads, mlp_dim, dropout)
    decoder_dim, decoder_depth = (layers.positive_ints(v, n)[0] for v, n in
                                  ((decoder_dim, "decoder_dim"), (decoder_depth, "decoder_depth")))
    decoder_heads = math.gcd(decoder_dim, heads)
    grid_shape = grid(spec, tubelet)
    inputs = layers.patch_input(spec)
    tokens, pixels = _tokens(spec, inputs, tubelet, dim, position)
    x, keep = TubeMask(grid_shape, mask_ratio, seed=seed, name="tube_mask")(tokens)
    for i in range(depth):
        x = encoder_block(x, dim, heads, mlp_dim, dropout, f"encoder{i}")
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="encoder_ln")(x)
    x = keras.layers.Dense(decoder_dim, name="decoder_embed")(x)
    x, hidden = FillMasked(grid_shape, name="decoder_fill")([x, keep])
    x = _position(position, grid_shape, "decoder_position")(x)
    for i in range(decoder_depth):
        x = encoder_block(x, decoder_dim, decoder_heads, 2 * decoder_dim, 0.0, f"decoder{i}")
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="decoder_ln")(x)
    prediction = keras.layers.Dense(math.prod(tubelet) * 3, dtype="float32", name="decoder_pixels")(x)
    target = Tubelets(tubelet, name="target")(pixels)
    output = keras.layers.Concatenate(dtype="float32", name="reconstruction")([prediction, target, hidden])
    return keras.Model(inputs, output, name=name)


@keras.saving.register_keras_serializable(package=layers.PACKAGE)
class MaskedPixelLoss(keras.losses.Loss):
    """The pretraining loss: mean squared error of the predicted normalised pixels of the hidden tubelets only
    (visible ones are not scored: copying them is trivial). Reads `build_vivit_mae`'s output; `y_true` (a
    placeholder the dataset yields) is ignored. Per patch, float32 `[B]`."""

    def __init__(self, name: str = "masked_pixel_mse", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        prediction, target, hidden = split_reconstruction(y_pred)
        error = ops.mean(ops.square(prediction - target), axis=-1)                  # [B, N]
        hidden = hidden[..., 0]
        return ops.sum(error * hidden, axis=-1) / ops.maximum(ops.sum(hidden, axis=-1), 1.0)


def split_reconstruction(output):
    """`build_vivit_mae`'s output `[B, N, 2P + 1]` -> (prediction `[B, N, P]`, target `[B, N, P]`,
    hidden `[B, N, 1]`)."""
    output = ops.cast(output, "float32")
    size = (output.shape[-1] - 1) // 2
    return output[..., :size], output[..., size:2 * size], output[..., 2 * size:]
