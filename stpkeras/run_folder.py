"""Run folder stage, the writing side: what both training loops (`train.fit`, `multiworker.train_custom`) write.

The files' names and their reading are `stpkeras.artifacts`'; this module adds what a loop writes while it
runs: run.json (atomically, `artifacts.write_json`), a history row per epoch, the summary of the epochs,
and the backup an unfinished run goes on from.

The backup: each finished epoch's state goes to its own folder `BACKUP_DIR/epoch-NNNNN/` (weights and
optimizer state as a Keras `.weights.h5`, the layers' seed generator states in `random.npz`), written
under a temporary name and renamed when complete; then `training_metadata.json` is replaced (atomically)
to name it, and only then the previous folder is deleted. A kill at any point leaves the metadata naming
a complete state. The rest of a run's random state needs no saving: the data stream and its augmentation
seeds are a function of the seed and the position (`stpkeras.setup` skips the finished batches), and the
learning rate of the optimizer's step count. (`keras.callbacks.BackupAndRestore` writes the weights in
place and the epoch after them, so a kill in between left weights of one epoch labelled with the previous
one.) Under multiworker every worker keeps its own backup folder: saving reads local values only, no
collective op, so the workers need not save in step.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from typing import Dict, List, Optional

from stpkeras.artifacts import RUN_JSON, write_json
from tfrecords_tools.errors import BadInput

BACKUP_METADATA, BACKUP_WEIGHTS, BACKUP_RANDOM = "training_metadata.json", "latest.weights.h5", "random.npz"


class RunError(BadInput, RuntimeError):
    """A run folder that cannot be used as asked (exists without --resume, missing files, ...)."""


# --- curves.png -----------------------------------------------------------------------------------

class Curves:
    """Redraws `curves.png` from history.csv as epochs finish, at a bounded cost.

    Drawing with matplotlib takes 1-2 s on a busy 2-core CPU, about as long as an epoch of a small
    run. A redraw waits until `ratio` times the last draw's cost (and at least `min_interval` s)
    has passed since it, so drawing stays under about 1/ratio of the wall time; the end of
    training always draws (`update(final=True)`). A killed run keeps the figure of a recent epoch,
    and history.csv has every epoch.
    """

    def __init__(self, run_dir: str, min_interval: float = 10.0, ratio: float = 10.0):
        self.run_dir, self.min_interval, self.ratio = run_dir, min_interval, ratio
        self._last, self._cost = None, 0.0

    def update(self, final: bool = False) -> bool:
        """Draws if due (or `final`); returns whether it drew."""
        import time

        from stpkeras.artifacts import CURVES, read_history
        from stpkeras.figures import draw_curves

        now = time.monotonic()
        if not final and self._last is not None and now - self._last < max(self.min_interval,
                                                                             self.ratio * self._cost):
            return False
        history = read_history(self.run_dir)
        if not history.get("epoch"):
            return False
        draw_curves(history, os.path.join(self.run_dir, CURVES))
        self._last = time.monotonic()
        self._cost = self._last - now
        return True


# --- history and summary --------------------------------------------------------------------------

def append_history(path: str, epoch: int, logs: Dict[str, float]) -> None:
    """One row per epoch, in the columns Keras' CSVLogger writes (epoch first, then the keys sorted)."""
    keys = sorted(logs)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["epoch"] + keys)
        writer.writerow([epoch] + [logs[k] for k in keys])


def best_value(history: Dict[str, List[float]], monitor: str, mode: str, before_epoch: int) -> Optional[float]:
    """The best `monitor` of the epochs before `before_epoch` (a resumed run's best.keras must beat it)."""
    values = [v for e, v in zip(history.get("epoch", []), history.get(monitor, [])) if e < before_epoch]
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def is_better(value: Optional[float], best: Optional[float], mode: str) -> bool:
    return value is not None and (best is None or (value > best if mode == "max" else value < best))


def summarize(history: Dict[str, List[float]], monitor: str, mode: str) -> dict:
    """run.json's `metrics`: epochs, the last epoch's values, and the best epoch by `monitor` with its values."""
    if not history.get("epoch"):
        return {"epochs": 0}
    last = {k: v[-1] for k, v in history.items() if k != "epoch"}
    values = history.get(monitor, [])
    best = (max if mode == "max" else min)(range(len(values)), key=values.__getitem__) if values else None
    return {"epochs": len(history["epoch"]), "final": last, "monitor": monitor,
            "best_epoch": int(history["epoch"][best]) + 1 if best is not None else None,
            "best": {k: v[best] for k, v in history.items() if k != "epoch"} if best is not None else {}}


def write_run_json(run_dir: str, run: dict) -> None:
    write_json(os.path.join(run_dir, RUN_JSON), run)


def versions() -> Dict[str, str]:
    """The versions run.json records: stpkeras, TensorFlow, Keras, NumPy, Python."""
    import platform

    import keras
    import numpy
    import tensorflow as tf

    from stpkeras import __version__
    return {"stpkeras": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


# --- the backup of an unfinished run --------------------------------------------------------------

def backup_metadata(backup_dir: str) -> dict:
    """The backup's `{"epoch": finished epochs, "state": its folder}` ({} when there is no backup)."""
    path = os.path.join(backup_dir, BACKUP_METADATA)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def seed_states(model) -> list:
    """The state variables of the model's Keras `SeedGenerator`s (dropout...), in the model's order.

    `Model.save_weights` leaves them out; without them a resumed run would draw its first epoch's
    dropout masks again.
    """
    return [v for v in model.variables if v.name == "seed_generator_state"]


def save_backup(backup_dir: str, model, epochs_done: int, extra: Optional[dict] = None) -> None:
    """Saves the state after `epochs_done` finished epochs (see the module's docstring); `extra` goes into
    the metadata (a timed run's seconds used, `budget.Budget.state`)."""
    import numpy as np

    name = f"epoch-{epochs_done:05d}"
    final, partial = os.path.join(backup_dir, name), os.path.join(backup_dir, name + ".partial")
    for stale in (final, partial):  # left by a run killed while writing this epoch
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(partial)
    model.save_weights(os.path.join(partial, BACKUP_WEIGHTS))
    np.savez(os.path.join(partial, BACKUP_RANDOM), *[v.numpy() for v in seed_states(model)])
    os.replace(partial, final)
    write_json(os.path.join(backup_dir, BACKUP_METADATA), {"epoch": epochs_done, "state": name, **(extra or {})})
    for entry in os.listdir(backup_dir):
        if entry.startswith("epoch-") and entry != name:
            shutil.rmtree(os.path.join(backup_dir, entry), ignore_errors=True)


def restore_backup(backup_dir: str, model) -> int:
    """Loads the state `save_backup` saved last into `model` (compiled, inside the strategy's scope);
    returns the number of finished epochs. A backup of `keras.callbacks.BackupAndRestore` (weights only,
    no `state` folder) loads too."""
    import numpy as np

    metadata = backup_metadata(backup_dir)
    state = os.path.join(backup_dir, metadata.get("state", ""))
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)  # its variables must exist to be loaded
    model.load_weights(os.path.join(state, BACKUP_WEIGHTS))
    if os.path.exists(os.path.join(state, BACKUP_RANDOM)):
        with np.load(os.path.join(state, BACKUP_RANDOM)) as saved:
            values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        variables = seed_states(model)
        if len(values) != len(variables):
            raise RunError(f"{state}: {len(values)} seed generator states saved, the model has {len(variables)}. "
                           "Expected the model the backup was written by.")
        for variable, value in zip(variables, values):
            variable.assign(value)
    return int(metadata.get("epoch", 0))


def remove_backup(backup_dir: str) -> None:
    """As BackupAndRestore does at the end of training: the backup only serves an unfinished run."""
    shutil.rmtree(backup_dir, ignore_errors=True)
