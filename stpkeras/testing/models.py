"""Test doubles for models: a run folder for a model built in a test, as `stp train` writes one."""

from __future__ import annotations

import json
import os
from typing import Sequence

from tfrecords_tools.spec import PatchSpec


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
