"""Test helper: converted folders of multi-label and regression records, and tiny runs trained on them.

The patches tell their targets by brightness (levels 0, 1, 2: 30, 100, 170 +- 10), so a tiny model
learns them in a few steps: classes "dark" (level 0), "lit" (1 or 2), "bright" (2); values "level" and
"brightness" (the patch's mean pixel value). Patch i belongs to video i % 6, whose level is
(i % 6) % 3: the targets of a video's patches agree, as video-level evaluation needs.
"""

from __future__ import annotations

import os
from typing import Tuple

import numpy as np

from converted import write_converted

SHAPE = (4, 16, 16, 3)
CLASSES = ("dark", "lit", "bright")
VALUE_NAMES = ("level", "brightness")


def _split(n: int, seed: int, videos: int = 6):
    rng = np.random.default_rng(seed)
    items, multi_hot, values = [], [], []
    for i in range(n):
        video = i % videos
        level = video % 3
        base = 30 + 70 * level + (video // 3) * 4   # the videos of a level differ a little
        patch = np.clip(base + rng.integers(-10, 11, SHAPE), 0, 255).astype(np.uint8)
        items.append((patch, -1, f"v{video}.mp4"))
        multi_hot.append([level == 0, level >= 1, level == 2])
        values.append([level, base])   # the video's brightness: the same for all its patches
    return items, multi_hot, values


def write_target_data(root: str) -> str:
    """train (48 patches) and test (30 patches of 6 videos) with multi-hot labels and values."""
    splits = {"train": _split(48, 0), "test": _split(30, 1)}
    write_converted(root, {k: v[0] for k, v in splits.items()}, CLASSES, shards=1,
                    multi_hot={k: v[1] for k, v in splits.items()}, values={k: v[2] for k, v in splits.items()},
                    value_names=VALUE_NAMES)
    return root


def train_target_runs(root: str) -> Tuple[str, str, str]:
    """(data, multi-label run, regression run): two tiny runs of 3 epochs on `write_target_data`."""
    from stpkeras.train import TrainConfig, train

    data = write_target_data(os.path.join(root, "data"))
    runs = []
    for name, task in (("multi", "classify"), ("regress", "regress")):
        run_dir = os.path.join(root, name)
        train(TrainConfig.tiny(data, run_dir, task=task, val_split="none", epochs=3, lr=1e-2),
              echo=lambda s: None)
        runs.append(run_dir)
    return data, runs[0], runs[1]
