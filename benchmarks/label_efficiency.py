"""Benchmark: does pretraining without labels pay when labels are few? Accuracy with 10%, 25% and 100% of the
labels, from scratch, after `--task embed` and after `--task pretrain`, in one run.

Data: the motion patches the tests build (a random texture moving 2 pixels a frame right, left, down or up;
4 classes that differ only by motion, so one frame tells nothing), written as converted folders
(`tests/converted.py`). The pretraining runs see every training patch, without labels; each fine-tuning
run sees a fraction of them with labels (the same subset for every start), `vivit` with the same options
throughout, the backbone trained at the head's rate (`--init-from`, no freezing). Every fine-tuning run takes
the same number of optimizer steps (`--epochs` x the full split's steps), so fewer labels do not also mean
fewer steps. Accuracy is the best validation accuracy (the validation split is the same for all rows);
wall time is fine-tuning alone, pretraining is timed on its own line. Rows are means over `--seeds`.

Run: TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/label_efficiency.py [--quick] [--seeds 0,1]
     [--pool 1024] [--val 256] [--epochs 6] [--pretrain-epochs 20]
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import numpy as np  # noqa: E402

SHAPE = (4, 16, 16, 3)
CLASSES = ("right", "left", "down", "up")
STEP = {"right": (0, 2), "left": (0, -2), "down": (2, 0), "up": (-2, 0)}
VIVIT = (("tubelet", (2, 4, 4)), ("dim", 32), ("depth", 2), ("heads", 2), ("mlp_dim", 64))
FRACTIONS = (0.1, 0.25, 1.0)
BATCH = 16


def motion_items(n: int, seed: int):
    """`n` patches `uint8 [4, 16, 16, 3]`, class i % 4: a smoothed random texture shifted by the class's step
    each frame (cyclic), its brightness and contrast random."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        label = i % len(CLASSES)
        texture = rng.random((16, 16, 3))
        texture = (texture + np.roll(texture, 1, 0) + np.roll(texture, 1, 1)) / 3
        texture = rng.uniform(40, 90) + rng.uniform(80, 160) * (texture - texture.min()) / np.ptp(texture)
        dy, dx = STEP[CLASSES[label]]
        frames = [np.roll(texture, (t * dy, t * dx), axis=(0, 1)) for t in range(SHAPE[0])]
        items.append((np.clip(frames, 0, 255).astype(np.uint8), label, f"v{i // 8}.mp4"))
    return items


def write_data(work: str, pool: int, val: int, seed: int) -> dict:
    """{fraction: converted folder}: the same validation split; the first fraction x `pool` training patches
    of one shuffled order (each class equally often), so a smaller subset is inside a larger one."""
    from converted import write_converted

    train, held = motion_items(pool, 1000 + seed), motion_items(val, 2000)
    order = np.random.default_rng(seed).permutation(pool)
    folders = {}
    for fraction in FRACTIONS:
        subset = [train[i] for i in sorted(order[:max(BATCH, int(round(fraction * pool)))])]
        folders[fraction] = os.path.join(work, f"data-{int(fraction * 100)}")
        write_converted(folders[fraction], {"train": subset, "val": held}, CLASSES, shards=1)
    return folders


def run(config) -> tuple:
    from stpkeras.train import train

    started = time.perf_counter()
    record = train(config, echo=lambda s: None)
    return record, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pool 384, val 128, 4 epochs, 8 pretraining epochs")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--pool", type=int, default=1024)
    parser.add_argument("--val", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs of the full split")
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    if args.quick:
        args.pool, args.val, args.epochs, args.pretrain_epochs = 384, 128, 4, 8
    from stpkeras.setup import TrainConfig

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"data: {args.pool} training patches {SHAPE} (4 motion classes), {args.val} validation; vivit "
          f"{dict(VIVIT)}, batch {BATCH}; fine-tuning {args.epochs} x {args.pool // BATCH} steps, "
          f"pretraining {args.pretrain_epochs} epochs")
    common = dict(model="vivit", model_options=VIVIT, batch_size=BATCH, verbose=0, shuffle_buffer=1024,
                  deterministic=False)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for seed in (int(s) for s in args.seeds.split(",")):
            folders = write_data(os.path.join(work, f"seed{seed}"), args.pool, args.val, seed)
            starts = {"scratch": None}
            for task in ("embed", "pretrain"):
                out = os.path.join(work, f"seed{seed}", task)
                record, seconds = run(TrainConfig(data=folders[1.0], out=out, task=task, epochs=args.pretrain_epochs,
                                                  lr=args.lr, seed=seed, val_split="none", **common))
                print(f"seed {seed}: --task {task}: {seconds:.0f} s, final loss "
                      f"{record['metrics']['final']['loss']:.3f}", flush=True)
                starts[task] = out
            full_steps = args.pool // BATCH
            for fraction in FRACTIONS:
                steps = max(1, int(round(fraction * args.pool)) // BATCH)
                epochs = math.ceil(args.epochs * full_steps / steps)
                for start, source in starts.items():
                    out = os.path.join(work, f"seed{seed}", f"{start}-{int(fraction * 100)}")
                    record, seconds = run(TrainConfig(data=folders[fraction], out=out, epochs=epochs, lr=args.lr,
                                                      seed=seed, augment=(), init_from=source, **common))
                    accuracy = record["metrics"]["best"]["val_accuracy"]
                    results.setdefault((fraction, start), []).append((accuracy, seconds))
                    print(f"seed {seed}: {fraction:.0%} labels, {start}: val accuracy {accuracy:.3f}, "
                          f"{seconds:.0f} s", flush=True)
    print(f"\n| labels | start | val accuracy (mean, min-max over {len(args.seeds.split(','))} seeds) "
          "| fine-tuning s |\n|---|---|---|---|")
    for (fraction, start), rows in results.items():
        accuracies = [a for a, _ in rows]
        print(f"| {fraction:.0%} | {start} | {statistics.mean(accuracies):.3f} ({min(accuracies):.3f}-"
              f"{max(accuracies):.3f}) | {statistics.mean(s for _, s in rows):.0f} |")
    print("chance: 0.250")
    return 0


if __name__ == "__main__":
    sys.exit(main())
