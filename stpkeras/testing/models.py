"""Test doubles for models: a tiny Conv3D classifier with the model contract, and a run folder for it.

The contract every trained classifier meets (and export relies on): one input
`uint8 [None, T, H, W, 3]`, normalisation inside the first layer, a pooled
layer named `features` and an output layer named `logits` (no softmax).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from tfrecords_tools.spec import PatchSpec


def build_tiny_classifier(spec: PatchSpec, num_classes: int, *, width: int = 8, seed: int = 0):
    """A two-conv Conv3D classifier with random weights: `uint8 [None, T, H, W, 3]` -> logits [None, K]."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(spec.shape, dtype="uint8", name="patches")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="normalize")(inputs)
    x = keras.layers.Conv3D(width, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv3D(2 * width, 3, padding="same", activation="relu")(x)
    features = keras.layers.GlobalAveragePooling3D(name="features")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(features)
    return keras.Model(inputs, logits, name="tiny")


def write_run(run_dir: str, model, spec: PatchSpec, labels: Sequence[str], model_name: str = "tiny") -> str:
    """Writes a run folder as `stp train` does (`run.json`, `best.keras`, `last.keras`); returns `run_dir`."""
    os.makedirs(run_dir, exist_ok=True)
    model.save(os.path.join(run_dir, "best.keras"))
    model.save(os.path.join(run_dir, "last.keras"))
    run = {"task": "classify", "model": model_name, "config": {"test_double": True},
           "spec": spec.to_dict(), "labels": list(labels)}
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump(run, f, indent=1)
    return run_dir
