"""Embedding stage: pooled features of any model, and the self-supervised contrastive task (`--task embed`).

Two things live here:

- `feature_model(model)`: a model's pooled representation `float32 [B, D]`, the
  input of retrieval (`stpkeras.index`). Most families already end in a pooled
  layer named `features`; `stcnn`'s `features` is a Flatten of its pooled map
  (`T/2 x H/4 x W/4 x filters` values, 32k for 8x64x64 patches) whose values are
  tied to positions in the patch, so here it is replaced by the global average of
  the same map (`filters` values), which does not care where in the patch
  something is. The model's own outputs are unchanged: this is a second view of
  the same layers (shared weights).
- The contrastive task: two augmented views of every patch are positives, every
  other patch of the batch is a negative (SimCLR's NT-Xent, an InfoNCE loss,
  Chen et al. 2020), written in TF ops. The trained model takes `uint8 [B, 2, T,
  H, W, C]` views and outputs their projections `[B, 2, P]`; its nested model
  named `encoder` takes single patches, and retrieval uses the encoder's pooled
  `features` (before the projection head, as SimCLR does).
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import keras
import tensorflow as tf

from stpkeras.models.layers import PACKAGE, GlobalMean, GridMean, MergeViews, SplitViews
from tfrecords_tools.errors import BadInput

FEATURES = "features"
ENCODER = "encoder"
PROJECTION = "projection"
VIEWS = 2
DEFAULT_TEMPERATURE = 0.1
POOLED = "pooled_features"
DEFAULT_POOL = "mean"


def parse_pool(pool: str) -> int:
    """`"mean"` -> 0; `"grid:N"` -> N (cells a side, N >= 1): how `feature_model` pools a map."""
    if pool == "mean":
        return 0
    kind, _, cells = str(pool).partition(":")
    if kind == "grid" and cells.isdigit() and int(cells) >= 1:
        return int(cells)
    raise ValueError(f"Invalid value for argument `pool`. Expected 'mean' or 'grid:N' with N >= 1. "
                     f"Received pool={pool!r}")


class FeatureError(BadInput, ValueError):
    """A model without a pooled representation to embed with."""


def _pooled_map_model(model: keras.Model):
    """The model (possibly nested in `model`) whose `pooled_features` layer `feature_model` added, or None."""
    for layer in model.layers:
        if layer.name == POOLED and isinstance(layer, GlobalMean):
            return model
        if isinstance(layer, keras.Model):
            found = _pooled_map_model(layer)
            if found is not None:
                return found
    return None


def feature_model(model: keras.Model, pool: str = DEFAULT_POOL) -> keras.Model:
    """`model` -> a model sharing its weights: uint8 patches `[B, T, H, W, C]` -> pooled features `[B, D]`.

    An embed-task model (one with a nested `encoder`) gives its encoder's
    features. A `features` layer with a rank-2 output is used as it is; a
    `Flatten` named `features` (stcnn) is replaced by a pooling of its input map:
    `pool="mean"`, the global average over time, height and width (`C` values);
    `pool="grid:N"`, the mean over time and over each cell of an N x N grid, each
    cell L2-normalised (`N * N * C` values, `GridMean`), which keeps the layout of
    the picture. An embed-task encoder trained on the global mean can be read
    with a grid too: its map is the same.
    """
    cells = parse_pool(pool)
    try:
        encoder = model.get_layer(ENCODER)
    except ValueError:
        encoder = None
    if isinstance(encoder, keras.Model):
        model = encoder
        if cells:
            inner = _pooled_map_model(encoder)
            if inner is None:
                raise FeatureError(f"model {model.name!r}: its features are not a pooled map (no layer "
                                   f"{POOLED!r}); pool {pool!r} needs one, use 'mean'")
            pooled_map = inner.get_layer(POOLED).input
            features = GridMean(cells, name=f"grid{cells}_features")(pooled_map)
            return keras.Model(inner.input, features, name=f"{model.name}_features")
    try:
        layer = model.get_layer(FEATURES)
    except ValueError as e:
        raise FeatureError(f"model {model.name!r} has no layer named {FEATURES!r} to embed with "
                           f"(layers: {[layer.name for layer in model.layers][-6:]} ...)") from e
    if isinstance(layer, keras.layers.Flatten):
        pooled_map = layer.input
        if cells:
            features = GridMean(cells, name=f"grid{cells}_features")(pooled_map)
        else:
            axes = tuple(range(1, len(pooled_map.shape) - 1))
            features = GlobalMean(axes, name=POOLED)(pooled_map)
    else:
        if cells:
            raise FeatureError(f"model {model.name!r}: layer {FEATURES!r} is {type(layer).__name__}, already "
                               f"pooled; pool {pool!r} needs a Flatten of a pooled map (stcnn), use 'mean'")
        features = layer.output
        if len(features.shape) != 2:
            raise FeatureError(f"model {model.name!r}: layer {FEATURES!r} outputs {features.shape}; expected "
                               "[batch, D] or a Flatten of a pooled map")
    return keras.Model(model.input, features, name=f"{model.name}_features")


def build_contrastive(backbone: keras.Model, spec, *, projection_dim: int = 64, hidden_dim: int = 256,
                      name: str = "contrastive") -> keras.Model:
    """A backbone (any registry model) -> the embed task's model.

    `encoder`: uint8 `[B, T, H, W, C]` -> pooled `features` -> Dense-ReLU-Dense
    `projection` `[B, projection_dim]` (float32). The returned model maps views
    `uint8 [B, 2, T, H, W, C]` to projections `[B, 2, projection_dim]`.
    """
    pooled = feature_model(backbone)
    patch = keras.Input(spec.shape, dtype="uint8", name="patch")
    features = pooled(patch)
    # The name `features` marks the representation retrieval uses, whatever the backbone called it.
    features = keras.layers.Identity(name=FEATURES)(features)
    x = keras.layers.Dense(hidden_dim, activation="relu", name="projection_hidden")(features)
    projection = keras.layers.Dense(projection_dim, dtype="float32", name=PROJECTION)(x)
    encoder = keras.Model(patch, projection, name=ENCODER)
    views = keras.Input((VIEWS, *spec.shape), dtype="uint8", name="views")
    z = encoder(MergeViews(name="merge_views")(views))
    return keras.Model(views, SplitViews(VIEWS, name="split_views")(z), name=name)


# --- the loss -------------------------------------------------------------------------------------

def _pair_logits(projections: tf.Tensor, temperature: float) -> Tuple[tf.Tensor, tf.Tensor]:
    """`[B, 2, D]` -> (cosine similarities / temperature `[2B, 2B]` with self-pairs masked, positive index `[2B]`)."""
    z = tf.math.l2_normalize(tf.cast(projections, tf.float32), axis=-1)
    z = tf.concat([z[:, 0], z[:, 1]], axis=0)                     # rows 0..B-1 view 1, B..2B-1 view 2
    n = tf.shape(z)[0]
    batch = n // 2
    logits = tf.matmul(z, z, transpose_b=True) / temperature
    # A patch is trivially closest to itself: that pair is neither positive nor negative.
    logits = logits - tf.eye(n, dtype=logits.dtype) * 1e9
    positives = tf.concat([tf.range(batch, n), tf.range(0, batch)], axis=0)
    return logits, positives


def nt_xent(projections: tf.Tensor, temperature: float = DEFAULT_TEMPERATURE) -> tf.Tensor:
    """NT-Xent (SimCLR's InfoNCE) of projections `[B, 2, D]`: per-patch loss `float32 [B]`.

    For each of the 2B views, cross-entropy of finding its other view among the
    2B - 1 others by cosine similarity / `temperature`; a patch's loss is the
    mean over its two views.
    """
    logits, positives = _pair_logits(projections, temperature)
    loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=positives, logits=logits)
    batch = tf.shape(projections)[0]
    return 0.5 * (loss[:batch] + loss[batch:])


def pair_accuracy(projections: tf.Tensor) -> tf.Tensor:
    """Per patch, the fraction of its two views whose nearest other view is its positive: `float32 [B]`."""
    logits, positives = _pair_logits(projections, 1.0)
    hit = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), positives), tf.float32)
    batch = tf.shape(projections)[0]
    return 0.5 * (hit[:batch] + hit[batch:])


@keras.saving.register_keras_serializable(package=PACKAGE)
class ContrastiveLoss(keras.losses.Loss):
    """`nt_xent` as a Keras loss; `y_true` (a placeholder the dataset yields) is ignored."""

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, name: str = "nt_xent", **kwargs):
        super().__init__(name=name, **kwargs)
        if not temperature > 0:
            raise ValueError("Invalid value for argument `temperature`. Expected a strictly positive value. "
                             f"Received temperature={temperature!r}")
        self.temperature = float(temperature)

    def call(self, y_true, y_pred):
        return nt_xent(y_pred, self.temperature)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


def _pair_accuracy_of_projections(y_true, y_pred):
    return pair_accuracy(y_pred)


@keras.saving.register_keras_serializable(package=PACKAGE)
class PairAccuracy(keras.metrics.MeanMetricWrapper):
    """Mean `pair_accuracy` of the projections; `y_true` (a placeholder the dataset yields) is ignored."""

    def __init__(self, name: str = "pair_accuracy", dtype=None):
        super().__init__(fn=_pair_accuracy_of_projections, name=name, dtype=dtype)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}


# --- the task's element ---------------------------------------------------------------------------

def make_views(encoding: str, spec,
               augment: Sequence[str] = ()) -> Callable[[tf.Tensor, tf.Tensor], Tuple[tf.Tensor, tf.Tensor]]:
    """The embed task's element: `(serialized record, seed int64 [2]) -> (uint8 [2, T, H, W, C], int32 0)`.

    The two views are the record's patch augmented twice with independent seeds
    (`stpkeras.augment` ops, e.g. crop and colour): what stays the same across
    them is what the encoder must learn. The int32 0 is a placeholder target.
    """
    from stpkeras import augment as augment_lib
    from tfrecords_tools import schema

    augment_fn = augment_lib.make_augment(augment, spec.pixels)

    def element(serialized: tf.Tensor, seed: tf.Tensor):
        features = schema.parse_patch(serialized, encoding)
        patch = schema.decode_pixels(features[schema.PATCH], encoding, spec.shape)
        seeds = tf.random.experimental.stateless_split(seed, VIEWS)
        views = tf.stack([augment_fn(patch, seeds[i]) for i in range(VIEWS)])
        return views, tf.constant(0, tf.int32)

    return element
