"""Serving-interface stage: the names of an export's signatures and of their tensors, in one place.

The exporter writes them, the local predictors, the TF Serving clients and the serving stand-in read
them, and the tests import them: nobody retypes a signature or tensor name.

- `serving_default` (classifier): `patches` uint8 `[batch, *spec.shape]` -> `logits`, `probabilities`,
  `class_ids`, `class_names`;
- `serve_examples`: `examples` string `[batch]`, serialized patch records -> the same;
- `embeddings`: `patches` -> `embeddings` float32 `[batch, D]` (the layer named `features`);
- `serving_default` (enhancer): `patches` -> `pixels` uint8, `pixels_float` float32, both `[batch, *spec.shape]`;
- `serving_default` (multi-label classifier): `patches` -> `logits`, `probabilities` (sigmoid, one per class)
  float32 `[batch, C]`;
- `serving_default` (regressor): `patches` -> `values` float32 `[batch, K]` in the data's units,
  `value_names` string `[batch, K]`.
"""

SERVING_DEFAULT = "serving_default"
SERVE_EXAMPLES = "serve_examples"
EMBEDDINGS = "embeddings"

# Tensor keys.
PATCHES = "patches"
EXAMPLES = "examples"
LOGITS = "logits"
PROBABILITIES = "probabilities"
CLASS_IDS = "class_ids"
CLASS_NAMES = "class_names"
PIXELS = "pixels"               # enhancer: uint8 [batch, T, H, W, 3]
PIXELS_FLOAT = "pixels_float"   # enhancer: float32 [batch, T, H, W, 3], 0-255 units, unclipped
VALUES = "values"               # regressor: float32 [batch, K]
VALUE_NAMES = "value_names"     # regressor: string [batch, K], the name of each value

# The layers of a model that export reads.
FEATURES_LAYER = "features"
LOGITS_LAYER = "logits"
VALUES_LAYER = "values"         # a regressor's output layer (stpkeras.models.regression)
