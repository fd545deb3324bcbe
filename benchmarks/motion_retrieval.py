"""Benchmark: semantic retrieval by motion (same pan direction = relevant, mAP), against the thumbnail.

Clips: from each source video (default: the sample videos), `--clips` clips per direction of a 64x64
window panning left, right, up or down at 3 pixels a frame over 16 consecutive frames (short side
scaled to 180), written with libx264 at crf 18. A clip's picture says nothing about its direction, so
an 8x8 colour thumbnail ranks at chance.

Held-out footage, as in `benchmarks/copies.py`: the sources split by kind (camera: bikes, tree;
animation: bigbuckbunny, Megamind); a model trained on one kind's clips indexes and searches the
other kind's. Each clip is a query against all the other clips of its kind (leave one out); mAP over
the whole ranking (`stpkeras.index.mean_average_precision`), and recall@1.

Methods, measured in the same run:
  - thumbnail 8x8 (mean over frames, L2-normalised and centred as the index does);
  - a classifier's pooled features (`stp train --task classify`, the default model and augmentation,
    `--epochs` or `--minutes`, `--batch-size`, clips resized to 32x32), indexed with `--aggregate mean`;
    each `--variant NAME=ARGS` trains another with ARGS added (e.g. the motion recipe: `corrnet+hv='--model
    corrnet --flip-labels h:left=right --flip-labels v:up=down'`), `--skip-default` leaves the default out;
  - `--embed-run`s given (e.g. `--task embed` runs of benchmarks/copies.py): their features, the same way.

Run: python benchmarks/motion_retrieval.py [--work /tmp/stp-motion] [--epochs 10 | --minutes 5 [--clock cpu]]
       [--variant NAME=ARGS ...] [--skip-default] [--embed-run FOLD=RUN ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import motion_classify  # noqa: E402
from copies import FOLDS, read_frames, thumbnail_embedder, write_video  # noqa: E402
from motion_classify import stp  # noqa: E402

DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
SIZE, FRAMES, STEP = 64, 16, 3
MODEL_SIZE = 32   # the models see clips resized to 32x32 (4x cheaper on 2 cores); pans stay 1.5 px a frame


def make_clips(videos: str, work: str, per_direction: int, seed: int) -> dict:
    """-> {fold: [(path, direction), ...]}; clips are written once."""
    rng = np.random.default_rng(seed)
    out = {}
    for fold, names in FOLDS.items():
        out[fold] = []
        folder = os.path.join(work, "clips", fold)
        os.makedirs(folder, exist_ok=True)
        for name in names:
            frames, rate = read_frames(os.path.join(videos, name), short_side=180)
            h, w = frames[0].shape[:2]
            travel = STEP * (FRAMES - 1)
            for direction, (dy, dx) in DIRECTIONS.items():
                for i in range(per_direction):
                    t0 = int(rng.integers(0, len(frames) - FRAMES + 1))
                    y0 = int(rng.integers(travel if dy < 0 else 0, h - SIZE - (travel if dy > 0 else 0) + 1))
                    x0 = int(rng.integers(travel if dx < 0 else 0, w - SIZE - (travel if dx > 0 else 0) + 1))
                    clip = [frames[t0 + k][y0 + dy * STEP * k: y0 + dy * STEP * k + SIZE,
                                           x0 + dx * STEP * k: x0 + dx * STEP * k + SIZE] for k in range(FRAMES)]
                    path = os.path.join(folder, f"{os.path.splitext(name)[0]}-{direction}-{i}.mp4")
                    if not os.path.exists(path):
                        write_video(path, clip, rate, crf=18)
                    out[fold].append((path, direction))
    return out


def leave_one_out(embedder, clips) -> dict:
    """Index the clips (mean aggregate), each clip a query against the others -> mAP and recall@1."""
    import dataclasses

    from stpkeras.index import VideoIndex, embed_videos, mean_average_precision

    embedded = embed_videos(embedder, [p for p, _ in clips])
    assert not embedded.failed, embedded.failed
    label_of = dict(clips)
    embedded = dataclasses.replace(embedded, labels=tuple(label_of[i] for i in embedded.ids))
    index = VideoIndex.build(embedded, aggregate="mean")
    hits = index.search(embedded.vectors, k=len(embedded.ids))
    ranked = [[h.label for h in row if h.video != q] for q, row in zip(embedded.ids, hits)]
    return {"map": mean_average_precision(embedded.labels, ranked),
            "recall@1": float(np.mean([r[0] == label for r, label in zip(ranked, embedded.labels)]))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", default=os.path.join(ROOT, "..", "shared", "data", "videos"))
    parser.add_argument("--work", default="/tmp/stp-motion")
    parser.add_argument("--clips", type=int, default=8, help="Clips per direction and source video.")
    parser.add_argument("--epochs", type=int, default=10)
    motion_classify.add_training_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embed-run", action="append", default=[], metavar="FOLD=RUN",
                        help="An embedding run to measure on FOLD's clips (trained without them).")
    args = parser.parse_args(argv)

    from stpkeras.index import load_embedder
    from tfrecords_tools.spec import PatchSpec

    budget, variants = motion_classify.training_plan(args)
    length = f"m{args.minutes:g}" if args.minutes else f"e{args.epochs}"
    clips = make_clips(args.videos, args.work, args.clips, args.seed)
    print(f"{sum(len(c) for c in clips.values())} clips, {len(DIRECTIONS)} directions; chance recall@1 "
          f"{1 / len(DIRECTIONS):.2f}", flush=True)
    thumb = thumbnail_embedder()
    thumb.spec = PatchSpec(FRAMES, SIZE, SIZE)
    runs = dict(r.split("=", 1) for r in args.embed_run)
    for fold in FOLDS:
        r = leave_one_out(thumb, clips[fold])
        print(f"{fold:<10} thumbnail 8x8           mAP {r['map']:.3f}  recall@1 {r['recall@1']:.3f}", flush=True)
        other = [c for f, cs in clips.items() if f != fold for c in cs]
        csv = os.path.join(args.work, f"train-{fold}.csv")
        with open(csv, "w") as f:
            f.write("path,label\n" + "".join(f"{p},{d}\n" for p, d in other))
        data = os.path.join(args.work, f"data-{fold}")
        if not os.path.isdir(data):
            stp("convert", csv, data, "--patch", f"{FRAMES}x{MODEL_SIZE}x{MODEL_SIZE}", "--resize",
                f"{MODEL_SIZE}x{MODEL_SIZE}")
        for name, extra in variants:
            run = os.path.join(args.work, f"run-{fold}-{length}" + ("" if name == "default" else f"-{name}"))
            started, cpu = time.perf_counter(), os.times()
            if not os.path.isfile(os.path.join(run, "best.keras")):
                stp("train", data, "--out", run, *budget, "--seed", str(args.seed), "--batch-size",
                    str(args.batch_size), "--val-split", "none", "--verbose", "0", *extra)
            seconds, cpu_seconds = time.perf_counter() - started, os.times().children_user - cpu.children_user
            r = leave_one_out(load_embedder(run), clips[fold])
            print(f"{fold:<10} {name + ' features':<23} mAP {r['map']:.3f}  recall@1 {r['recall@1']:.3f}  "
                  f"(trained {' '.join(budget[:2])} on the other kind's {len(other)} clips: {seconds:.0f} s wall, "
                  f"{cpu_seconds:.0f} CPU s)", flush=True)
        if fold in runs:
            r = leave_one_out(load_embedder(runs[fold]), clips[fold])
            print(f"{fold:<10} embed features          mAP {r['map']:.3f}  recall@1 {r['recall@1']:.3f}  "
                  f"({runs[fold]})", flush=True)


if __name__ == "__main__":
    main()
