"""Fine-tuning stage: start a model from an earlier run's backbone (`--init-from`), and train that backbone
frozen (`--freeze-backbone`, a linear probe) or more slowly than the new head (`--backbone-lr-scale`,
and for ViTs layer-wise decay, `--layer-decay`).

Weights are taken layer by layer: a layer of the new model takes the weights of the layer of the same name
in the earlier model (nested models, as the embed task's encoder, are searched through) when every weight
has the same shape. The task's head layers (`Task.HEAD`: the classifier's `logits`, ...) are always new:
they belong to the new task and labels. The backbone is what was taken; everything else is new.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, Iterator, Optional, Sequence, Tuple

import keras

from stpkeras.models.layers import PACKAGE
from stpkeras.run_folder import RunError

BLOCK = re.compile(r"^encoder(\d+)_")   # the transformer blocks of `vivit` (and its masked autoencoder)
EMBEDDING = ("tubelets", "position")    # below the first block


@dataclasses.dataclass(frozen=True)
class Transfer:
    """What `--init-from` did: recorded as run.json's `init_from`."""

    source: str
    taken: Tuple[str, ...]           # layers whose weights came from the source (the backbone)
    new: Tuple[str, ...]             # layers with weights that start from their initialiser (the head ...)
    frozen: bool = False
    lr_scales: Tuple[Tuple[str, float], ...] = ()   # layer -> learning-rate factor, where not 1

    def to_dict(self) -> dict:
        return {"source": self.source, "taken": list(self.taken), "new": list(self.new), "frozen": self.frozen,
                "lr_scales": dict(self.lr_scales)}

    def describe(self) -> str:
        how = "frozen" if self.frozen else ("at scaled learning rates" if self.lr_scales else "trained")
        return (f"init from {self.source}: {len(self.taken)} layers taken ({how}), "
                f"{len(self.new)} new: {', '.join(self.new) or 'none'}")


def leaf_layers(model) -> Iterator[keras.layers.Layer]:
    """The layers of `model` that hold weights themselves, nested models opened."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from leaf_layers(layer)
        elif layer.weights:
            yield layer


def load_source(path: str) -> keras.Model:
    """A run folder (its best model) or a `.keras` file -> the Keras model, uncompiled."""
    from stpkeras.artifacts import is_run_dir, load_keras_model, run_model_path

    path = os.fspath(path)
    if os.path.isdir(path) and is_run_dir(path):
        return load_keras_model(run_model_path(path))
    if path.endswith(".keras") and os.path.isfile(path):
        return load_keras_model(path)
    raise RunError(f"--init-from {path}: expected a run folder of `stp train` or a .keras file")


def transfer(model, source, source_name: str, head: Sequence[str]) -> Transfer:
    """Copies into `model` the weights of `source`'s layers of the same name and shapes (see the module's
    docstring); returns what was taken and what is new. Raises `RunError` when nothing matches."""
    by_name: Dict[str, keras.layers.Layer] = {}
    for layer in leaf_layers(source):
        by_name.setdefault(layer.name, layer)
    taken, new = [], []
    for layer in leaf_layers(model):
        match = by_name.get(layer.name) if layer.name not in head else None
        if match is not None and [tuple(w.shape) for w in match.weights] == [tuple(w.shape) for w in layer.weights]:
            layer.set_weights(match.get_weights())
            taken.append(layer.name)
        else:
            new.append(layer.name)
    if not taken:
        raise RunError(f"--init-from {source_name}: none of its layers matches a layer of the new model by name "
                       f"and shapes (new model: {[layer.name for layer in leaf_layers(model)][:8]} ...; source: "
                       f"{sorted(by_name)[:8]} ...). Expected a run of the same model family with the same "
                       "model options and patch size")
    return Transfer(source_name, tuple(taken), tuple(new))


def freeze(model, taken: Sequence[str]) -> None:
    """Makes the taken layers untrainable (batch norms then also keep their statistics: a linear probe)."""
    for layer in leaf_layers(model):
        if layer.name in taken:
            layer.trainable = False


def lr_scales(taken: Sequence[str], backbone_lr_scale: float, layer_decay: Optional[float]) -> Dict[str, float]:
    """Layer -> learning-rate factor for the backbone: `backbone_lr_scale`, times, with `layer_decay`, the decay
    to the power of a ViT layer's distance from the head (BEiT's layer-wise decay: the embedding `depth + 1`
    steps, block i `depth - i`, the final norm 0). Layers at factor 1 are left out."""
    depth = 1 + max((int(m.group(1)) for m in map(BLOCK.match, taken) if m), default=-1)
    if layer_decay is not None and not depth:
        raise RunError("--layer-decay: the backbone has no transformer blocks (layers named encoderN_...); "
                       "expected --model vivit initialised from a vivit run (--task pretrain, embed or classify)")
    scales = {}
    for name in taken:
        scale = backbone_lr_scale
        if layer_decay is not None:
            block = BLOCK.match(name)
            distance = depth - int(block.group(1)) if block else (depth + 1 if name in EMBEDDING else 0)
            scale *= layer_decay ** distance
        if scale != 1.0:
            scales[name] = scale
    return scales


def variable_scales(model, scales: Dict[str, float]) -> Dict[str, float]:
    """Layer -> factor (`lr_scales`) -> variable path -> factor, what `ScaledAdamW` takes."""
    return {v.path: scales[layer.name] for layer in leaf_layers(model) if layer.name in scales
            for v in layer.trainable_weights}


@keras.saving.register_keras_serializable(package=PACKAGE)
class ScaledAdamW(keras.optimizers.AdamW):
    """AdamW whose step for some variables is scaled: `lr_scales` maps a variable's path (`LAYER/NAME`, as
    `variable_scales` gives it) to its factor (the others: 1). Weight decay stays at the base rate (it is
    tiny next to the step)."""

    def __init__(self, *args, lr_scales: Optional[Dict[str, float]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_scales = {str(k): float(v) for k, v in (lr_scales or {}).items()}

    def build(self, var_list):
        if self.built:
            return
        self._scales = [self.lr_scales.get(v.path, 1.0) for v in var_list]
        super().build(var_list)

    def update_step(self, gradient, variable, learning_rate):
        scale = self._scales[self._get_variable_index(variable)]
        return super().update_step(gradient, variable, learning_rate * scale if scale != 1.0 else learning_rate)

    def get_config(self):
        return {**super().get_config(), "lr_scales": dict(self.lr_scales)}
