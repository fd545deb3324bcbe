"""Benchmark: does pretraining without labels pay when labels are few? Accuracy with 10%, 25% and 100% of the
labels, from scratch, after `--task embed` and after `--task pretrain`, in one run.

Data: real footage with a known camera pan. Frames of the sample videos (`--videos`, default
../shared/data/videos: bikes, Big Buck Bunny, tree, Megamind), scaled to a short side of 32, and a 16x16 window
that moves 2 pixels a frame right, left, down or up over one of them for 8 frames: 4 classes that differ only by
motion (one frame tells nothing), on real textures, edges and faces that a masked autoencoder can learn to
rebuild. Training patches come from the first 70% of each video's frames, validation patches from the last 30%.
The patches are written as converted folders (`tests/converted.py`). The pretraining runs see every training
patch of the pool without labels, and with `--unlabelled N` more patches of the same videos' training frames (a
user's unlabelled footage is larger than what was labelled), for `--pretrain-epochs` x pool / batch steps in ten
epochs; each fine-tuning run sees a fraction of the pool with labels (the same subset for every start),
`vivit` with the same options throughout, the backbone trained at the head's rate (`--init-from`), or frozen
(`pretrain-frozen`: `--freeze-backbone`, a linear probe of the masked autoencoder's features).
Masked autoencoding hides `--mask-ratio` 0.75 of the 4x4 tubelet positions (0.9, the task's default, would leave
2 of 16 visible). Every fine-tuning run takes the same number of optimizer steps
(`--epochs` x `--pool` / batch: the labelled subset is repeated to `--pool` records), so fewer labels do not
also mean fewer steps, and so about the same wall time. Accuracy is the best validation accuracy (the validation
split is the same for all rows); wall time is fine-tuning alone, pretraining is timed on its own line. Rows are
means over `--seeds`, with the range.

Run: TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/label_efficiency.py [--quick] [--seeds 0,1] [--videos DIR] [--keep DIR]
     [--pool 1024] [--val 256] [--epochs 8] [--pretrain-epochs 40] [--unlabelled N] [--fractions 0.1,0.25,1.0]
     [--starts ...]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
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

from train_input import benchmark_config  # noqa: E402  (benchmarks/train_input.py)

SHAPE = (8, 16, 16, 3)
CLASSES = ("right", "left", "down", "up")
STEP = {"right": (0, 2), "left": (0, -2), "down": (2, 0), "up": (-2, 0)}
VIVIT = (("tubelet", (2, 4, 4)), ("dim", 32), ("depth", 2), ("heads", 2), ("mlp_dim", 64))
FRACTIONS = (0.1, 0.25, 1.0)
BATCH = 16
PRETRAIN_EPOCHS = 10
STARTS = ("scratch", "embed", "pretrain", "pretrain-frozen")
DEFAULT_VIDEOS = os.path.join(HERE, "..", "..", "shared", "data", "videos")
SHORT_SIDE = 32


def video_frames(videos: str, every: int = 3) -> list:
    """Per video of the folder: every `every`-th frame, RGB scaled (area averaging) to a short side of 32."""
    import av
    from PIL import Image

    out = []
    for path in sorted(glob.glob(os.path.join(videos, "*.*"))):
        if path.endswith((".md", ".txt")):
            continue
        frames = []
        with av.open(path) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i % every == 0:
                    image = frame.to_image()
                    scale = SHORT_SIDE / min(image.size)
                    size = (max(SHORT_SIDE, round(image.width * scale)), max(SHORT_SIDE, round(image.height * scale)))
                    frames.append(np.asarray(image.resize(size, Image.BOX), np.uint8))
        out.append(frames)
    return out


def pan_items(frames: list, n: int, part: str, seed: int):
    """`n` patches `uint8 [8, 16, 16, 3]`, class i % 4: a window panning 2 pixels a frame over one real frame,
    at a random video, frame (the first 70% of each video's frames for `part` 'train', the rest for 'val')
    and start."""
    rng = np.random.default_rng(seed)
    t, h, w = SHAPE[:3]
    items = []
    for i in range(n):
        label = i % len(CLASSES)
        video = int(rng.integers(len(frames)))
        cut = int(0.7 * len(frames[video]))
        pool = frames[video][:cut] if part == "train" else frames[video][cut:]
        image = pool[int(rng.integers(len(pool)))]
        dy, dx = STEP[CLASSES[label]]
        span_y, span_x = h + abs(dy) * (t - 1), w + abs(dx) * (t - 1)
        y0 = int(rng.integers(0, image.shape[0] - span_y + 1)) + (abs(dy) * (t - 1) if dy < 0 else 0)
        x0 = int(rng.integers(0, image.shape[1] - span_x + 1)) + (abs(dx) * (t - 1) if dx < 0 else 0)
        patch = np.stack([image[y0 + k * dy:y0 + k * dy + h, x0 + k * dx:x0 + k * dx + w] for k in range(t)])
        items.append((patch, label, f"v{video}-{i // 8}.mp4"))
    return items


def write_data(work: str, frames: list, pool: int, val: int, seed: int, unlabelled: int,
               fractions=FRACTIONS) -> dict:
    """{fraction: converted folder}: the same validation split; the first fraction x `pool` training patches
    of one shuffled order (each class equally often), so a smaller subset is inside a larger one, repeated to
    `pool` records (an epoch is the same number of steps for every fraction: fewer epochs, so less of the
    per-epoch work of a run, its checkpoints, figures and validation); under 'unlabelled', `unlabelled`
    training patches for the pretraining runs (the pool first, then more of the same draw when it is larger:
    a user has more footage than labels)."""
    from converted import write_converted

    drawn = pan_items(frames, max(pool, unlabelled), "train", 1000 + seed)
    train, held = drawn[:pool], pan_items(frames, val, "val", 2000)
    order = np.random.default_rng(seed).permutation(pool)
    folders = {}
    for fraction in fractions:
        subset = [train[i] for i in sorted(order[:max(BATCH, int(round(fraction * pool)))])]
        folders[fraction] = os.path.join(work, f"data-{int(fraction * 100)}")
        write_converted(folders[fraction], {"train": [subset[i % len(subset)] for i in range(pool)], "val": held},
                        CLASSES, shards=1)
    folders["unlabelled"] = os.path.join(work, "unlabelled")
    # Validation patches (later frames of the same videos) give the masked-autoencoding run its held-out loss
    # and the patches of its reconstructions.png.
    write_converted(folders["unlabelled"], {"train": drawn[:unlabelled], "val": held}, CLASSES, shards=1)
    return folders


def run(config) -> tuple:
    from stpkeras.train import train

    started = time.perf_counter()
    record = train(config, echo=lambda s: None)
    return record, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pool 128, val 64, 3 epochs, 8 pretraining passes")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--videos", default=DEFAULT_VIDEOS, help="folder of real videos (default the samples)")
    parser.add_argument("--pool", type=int, default=1024)
    parser.add_argument("--val", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs of `--pool` records")
    parser.add_argument("--pretrain-epochs", type=int, default=40,
                        help="pretraining steps, in passes over the pool (x pool / batch steps)")
    parser.add_argument("--unlabelled", type=int, help="distinct patches the pretraining runs see (default: the "
                        "pool; more: a user's unlabelled footage beyond the labelled patches)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--fractions", default="0.1,0.25,1.0", help="label fractions, comma-separated")
    parser.add_argument("--keep", help="keep the data and run folders here (default: a temporary folder)")
    parser.add_argument("--starts", default=",".join(STARTS), help=f"starts, comma-separated, of {STARTS}")
    args = parser.parse_args()
    if args.quick:
        args.pool, args.val, args.epochs, args.pretrain_epochs = 128, 64, 3, 8
    args.unlabelled = args.unlabelled or args.pool
    pretrain_steps = args.pretrain_epochs * args.pool // BATCH
    # Ten epochs (fewer for a short run): reconstructions.png and the held-out loss follow the pretraining.
    pretrain_epochs = min(PRETRAIN_EPOCHS, pretrain_steps)
    if not glob.glob(os.path.join(args.videos, "*.*")):
        print(f"--videos {args.videos}: no videos there (expected the sample videos, ../shared/data/videos)",
              file=sys.stderr)
        return 2
    print("command:", shlex.join(["TF_CPP_MIN_LOG_LEVEL=2", "python", "benchmarks/label_efficiency.py",
                                  *sys.argv[1:]]))
    print(f"data: {args.pool} training patches {SHAPE} (4 pan directions over real frames), {args.val} validation; "
          f"vivit {dict(VIVIT)}, batch {BATCH}; fine-tuning {args.epochs} x {args.pool // BATCH} steps, "
          f"pretraining {pretrain_steps} steps on {args.unlabelled} unlabelled patches", flush=True)
    frames = video_frames(args.videos)
    fractions = tuple(float(f) for f in args.fractions.split(","))

    def config(data, out, task, seed, epochs, **overrides):
        return benchmark_config(data, out, task, "vivit", VIVIT, BATCH, seed, lr=args.lr, epochs=epochs,
                                shuffle_buffer=1024, **overrides)

    results = {}
    with (contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory()) as work:
        for seed in (int(s) for s in args.seeds.split(",")):
            folders = write_data(os.path.join(work, f"seed{seed}"), frames, args.pool, args.val, seed,
                                 args.unlabelled, fractions)
            wanted = args.starts.split(",")
            runs = {}
            for task in (t for t in ("embed", "pretrain") if t in wanted or f"{t}-frozen" in wanted):
                out = os.path.join(work, f"seed{seed}", task)
                options = (("mask_ratio", args.mask_ratio),) if task == "pretrain" else ()
                record, seconds = run(config(folders["unlabelled"], out, task, seed, pretrain_epochs,
                                             steps_per_epoch=pretrain_steps // pretrain_epochs,
                                             val_split="val" if task == "pretrain" else "none", task_options=options))
                final = record["metrics"]["final"]
                print(f"seed {seed}: --task {task}: {seconds:.0f} s, final loss {final['loss']:.3f}"
                      + (f", validation loss {final['val_loss']:.3f}" if "val_loss" in final else ""), flush=True)
                runs[task] = out
            for fraction in fractions:
                for start in (s for s in STARTS if s in wanted):
                    # '-frozen': a linear probe, only the new head trains (`--freeze-backbone`).
                    source, frozen = (None, False) if start == "scratch" else (runs[start.split("-")[0]],
                                                                               start.endswith("-frozen"))
                    out = os.path.join(work, f"seed{seed}", f"{start}-{int(fraction * 100)}")
                    record, seconds = run(config(folders[fraction], out, "classify", seed, args.epochs, augment=(),
                                                 init_from=source, freeze_backbone=frozen))
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
