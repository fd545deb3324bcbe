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
- `stream` (a causal classifier exported with `--streaming`): `frames` uint8 `[batch, n, H, W, C]` (n >= 1 new
  frames of each stream) and its state tensors `state_*` float32 -> `logits`, `probabilities` `[batch, n, K]`,
  `class_ids`, `class_names` `[batch, n]` (the answer at each new frame) and the new `state_*` (same keys);
- `init_state`: `streams` int32 `[batch]` (one entry per stream, values unused) -> the zero `state_*` of
  `batch` streams.
"""

SERVING_DEFAULT = "serving_default"
SERVE_EXAMPLES = "serve_examples"
EMBEDDINGS = "embeddings"
STREAM = "stream"
INIT_STATE = "init_state"
STREAM_SIGNATURES = (STREAM, INIT_STATE)

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
FRAMES = "frames"               # stream: uint8 [batch, n, H, W, C], the new frames of each stream
STREAMS = "streams"             # init_state: int32 [batch], one entry per stream
STATE_PREFIX = "state_"         # stream state tensors: state_<layer> (stpkeras.models.causal)

# The layers of a model that export reads.
FEATURES_LAYER = "features"
LOGITS_LAYER = "logits"
VALUES_LAYER = "values"         # a regressor's output layer (stpkeras.models.regression)
