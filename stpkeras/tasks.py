"""Task stage: what a task adds to a model family: its head, targets, loss, metrics and monitor.

`classify` is the one task today; `enhance`, `embed` and `segment` join the
`TASKS` registry with the same interface, so `train.py` and `evaluate.py`
never branch on the task's name.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import keras


@dataclasses.dataclass(frozen=True)
class Task:
    """The interface every task implements."""

    name: str = ""
    # The metric that picks `best.keras` (with `val_` in front when there is a validation split).
    monitor: str = "loss"
    monitor_mode: str = "min"
    # Whether the task needs labelled records (the pipeline then yields `(patch, label)`).
    needs_labels: bool = False

    def build_model(self, model: str, spec, labels: Sequence[str], options: Dict[str, object]) -> keras.Model:
        raise NotImplementedError

    def loss(self) -> keras.losses.Loss:
        raise NotImplementedError

    def metrics(self, labels: Sequence[str]) -> List[keras.metrics.Metric]:
        raise NotImplementedError

    def class_weight(self, counts: Dict[str, int], labels: Sequence[str]) -> Optional[Dict[int, float]]:
        return None


@dataclasses.dataclass(frozen=True)
class Classify(Task):
    """One label per patch: `logits [B, num_classes]` against `int32 [B]` labels (cross-entropy)."""

    name: str = "classify"
    monitor: str = "accuracy"
    monitor_mode: str = "max"
    needs_labels: bool = True

    def build_model(self, model, spec, labels, options):
        from stpkeras.models import build_model
        return build_model(model, spec, len(labels), **dict(options))

    def loss(self):
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def top_k(self, num_classes: int) -> int:
        """k of the top-k metric: 5, or fewer for fewer classes (k >= num_classes is always 1)."""
        return max(1, min(5, num_classes - 1))

    def metrics(self, labels):
        k = self.top_k(len(labels))
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        if k > 1:
            metrics.append(keras.metrics.SparseTopKCategoricalAccuracy(k=k, name=f"top{k}"))
        return metrics

    def class_weight(self, counts, labels):
        """'Balanced' weights n / (classes x n_c), so every class counts as much in the loss."""
        total = sum(counts.get(name, 0) for name in labels)
        missing = [name for name in labels if not counts.get(name)]
        if missing:
            raise ValueError(f"class weights need every class in the training split; {missing} have no patches")
        return {i: total / (len(labels) * counts[name]) for i, name in enumerate(labels)}


TASKS: Dict[str, Task] = {"classify": Classify()}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"Invalid value for argument `task`. Expected one of {sorted(TASKS)}. Received task={name!r}")
    return TASKS[name]


def task_names() -> Tuple[str, ...]:
    return tuple(TASKS)
