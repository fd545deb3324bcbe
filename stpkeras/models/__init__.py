"""Model stage: the registry of model families, each a factory `(spec, num_classes, **options) -> keras.Model`.

Every model takes uint8 patches in the spec's pixel format (input 'patch': `[B, T, H, W, 3]` for
`rgb`, `[B, T, H/2, W, 4]` for `yuv440`) and turns them into RGB in [-1, 1] in its first layer
(`layers.Normalize`). Classifiers have a
pooled feature layer named 'features' and an output layer named 'logits'
(float32, no softmax). Enhancers (`ENHANCE_MODELS`, for `--task enhance`) take
the output channels in place of `num_classes` and end in the layer 'pixels':
float32 `[B, T, H, W, 3]` in 0-255 units, the input plus a predicted residual. The motion model
(`MOTION_MODELS`, the default of `--task stabilize`) outputs the same number of values for each pair of
neighbouring frames, `[B, (T-1) * k]`, from features that keep the frames' layout.
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict, Tuple

from stpkeras.models.c3d import build_c3d
from stpkeras.models.dncnn3d import build_dncnn3d
from stpkeras.models.motion import build_corrnet, build_motionnet
from stpkeras.models.r2plus1d import build_r2plus1d
from stpkeras.models.resnet3d import build_resnet3d
from stpkeras.models.softmotion import build_softmotion
from stpkeras.models.segmentation import SegmentationLoss  # noqa: F401  registered: segment runs load with it
from stpkeras.models.stcnn import build_stcnn
from stpkeras.models.unet3d import build_unet3d
from stpkeras.models.vivit import build_vivit

MODELS: Dict[str, Callable] = {
    "stcnn": build_stcnn,
    "c3d": build_c3d,
    "r2plus1d": build_r2plus1d,
    "resnet3d": build_resnet3d,
    "vivit": build_vivit,
    "unet3d": build_unet3d,
    "dncnn3d": build_dncnn3d,
    "motionnet": build_motionnet,
    "corrnet": build_corrnet,
    "softmotion": build_softmotion,
}
# Families that output pixels (input + residual), not logits: the models of `--task enhance`.
ENHANCE_MODELS = ("unet3d", "dncnn3d")
# Families that output values per pair of neighbouring frames: the default of `--task stabilize`.
MOTION_MODELS = ("motionnet", "softmotion")
# Motion models whose outputs are model pixels by construction (a soft-argmax): not de-standardised.
PIXEL_MOTION_MODELS = ("softmotion",)


def model_names() -> Tuple[str, ...]:
    return tuple(MODELS)


def model_options(name: str) -> Dict[str, object]:
    """The keyword options of model `name` and their defaults (for `--model-arg` and help)."""
    factory = _factory(name)
    return {p.name: p.default for p in inspect.signature(factory).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "name"}


def _factory(name: str) -> Callable:
    if name not in MODELS:
        raise ValueError(f"Invalid value for argument `model`. Expected one of {sorted(MODELS)}. "
                         f"Received model={name!r}")
    return MODELS[name]


def build_model(name: str, spec, num_classes: int, **options):
    """Builds model `name` for patches of `spec`; `options` are the factory's keyword options (checked)."""
    known = model_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"Invalid options {unknown} for model {name!r}. Expected some of {sorted(known)}.")
    return _factory(name)(spec, num_classes, **options)
