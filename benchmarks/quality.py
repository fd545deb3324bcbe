"""Benchmark: no-reference video quality (`--task regress`) on footage of another kind than it trained on.

Claim measured (issue 16): a small model trained by `stp train --task regress` to predict a compressed
clip's PSNR from the compressed clip alone ranks clips of held-out source videos by quality better than
the simplest no-reference predictor, the clip's bitrate; and the x264 crf the clip was encoded with (a
predictor that needs to know the encoder's setting) is printed beside them.

Clips: 16 frames cut from the real sample videos (../shared/data/videos), scaled to a short side of 96
and centre-cropped to 96x128, each encoded with PyAV libx264 at every crf of CRFS; a clip's value is the
mean over its frames of the decoded frame's PSNR against the original (stpkeras.enhance.frame_psnr).
Camera footage (bikes.mp4, tree.avi) trains; animation (bigbuckbunny.mp4, Megamind_bugy.avi) is the test
split, another kind of picture. A CSV of `path,split,psnr` goes through `stp convert --values psnr`
(patch 8x32x32), `stp train --task regress` and `stp evaluate`, the library's own functions; a clip is
a video of the data, so the evaluation's video level is the clip level. Printed: the test clips' SROCC,
PLCC and MAE of the model, and the SROCC of bitrate, of -crf and the MAE of predicting the training mean.

    python benchmarks/quality.py [--videos DIR] [--out DIR] [--epochs 10] [--clips 6]

Writes OUT/quality.json. Every step is redone on every run (delete nothing by hand).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time

import numpy as np

DEFAULT_VIDEOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "videos")
TRAIN = ("bikes.mp4", "tree.avi")                    # camera footage
TEST = ("bigbuckbunny.mp4", "Megamind_bugy.avi")     # animation
CRFS = (18, 26, 34, 42)
CLIP_FRAMES = 16
SIZE = (96, 128)   # H, W of every clip
# stcnn with 3x3 spatial filters and one max over the whole patch: each filter's strongest response
# (no position-specific read-out, which learnt the training videos' content: the stcnn default, with
# a 2x4x4 pool, stayed above the training mean's loss for 3 epochs; a 182k-parameter c3d overfit the
# two training videos, its test loss rising from epoch 2).
MODEL_OPTIONS = (("kernel_size", (1, 3, 3)), ("pool_size", (8, 32, 32)))


def log(text: str) -> None:
    print(text, flush=True)


def decoded(path: str) -> tuple:
    """The frames the converter's decoder gives for `path`, short side 96 (uint8 [N, H, W, 3]), and its rate."""
    from tfrecords_tools.spec import PatchSpec
    from tfrecords_tools.video import read_frames
    return read_frames(path, PatchSpec(1, 1, 1, short_side=SIZE[0]))


def clips_of(frames: np.ndarray, count: int) -> list:
    """`count` clips of CLIP_FRAMES frames, evenly spaced, centre-cropped to SIZE."""
    h, w = frames.shape[1:3]
    top, left = (h - SIZE[0]) // 2, (w - SIZE[1]) // 2
    starts = np.linspace(0, len(frames) - CLIP_FRAMES, count).round().astype(int)
    return [frames[s:s + CLIP_FRAMES, top:top + SIZE[0], left:left + SIZE[1]] for s in starts]


def encode(path: str, frames: np.ndarray, crf: int, fps: float) -> np.ndarray:
    """Writes `frames` with libx264 at `crf`; returns the frames PyAV decodes from the file."""
    import av

    from tfrecords_tools.video import VideoWriter

    with VideoWriter(path, fps, crf=crf) as writer:
        for frame in frames:
            writer.write(frame)
    with av.open(path) as container:
        out = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    if out.shape != frames.shape:
        raise RuntimeError(f"{path}: decoded {out.shape}, wrote {frames.shape}")
    return out


def make_clips(src: str, out: str, per_video: int) -> list:
    """Every (source, clip, crf): its file, split, PSNR against the original, bitrate and crf."""
    from stpkeras.enhance import frame_psnr

    rows = []
    for names, split in ((TRAIN, "train"), (TEST, "test")):
        for name in names:
            frames, fps = decoded(os.path.join(src, name))
            stem = os.path.splitext(name)[0]
            for i, clip in enumerate(clips_of(frames, per_video)):
                for crf in CRFS:
                    rel = f"clips/{stem}-{i}-crf{crf}.mp4"
                    compressed = encode(os.path.join(out, rel), clip, crf, 25.0)
                    psnr = float(np.mean([frame_psnr(a, b) for a, b in zip(compressed, clip)]))
                    bits = os.path.getsize(os.path.join(out, rel)) * 8
                    rows.append({"path": rel, "split": split, "psnr": psnr, "crf": crf, "source": name,
                                 "bits_per_pixel": bits / clip[..., 0].size})
            log(f"  {name}: {len(frames)} frames -> {per_video} clips x {len(CRFS)} crf")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", default=DEFAULT_VIDEOS)
    parser.add_argument("--out", default="/tmp/stp-bench-quality")
    parser.add_argument("--epochs", type=int, default=10, help="about 20 s each on 2 cores")
    parser.add_argument("--clips", type=int, default=6, help="clips per source video")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    missing = [n for n in TRAIN + TEST if not os.path.isfile(os.path.join(args.videos, n))]
    if missing:
        log(f"skipped: sample videos {missing} not found in {args.videos} (see ../shared/data/videos/README.md)")
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from scipy.stats import spearmanr

    from stpkeras.evaluate import EvalConfig, evaluate
    from stpkeras.train import TrainConfig, train
    from tfrecords_tools.convert import ConvertConfig, convert
    from tfrecords_tools.spec import PatchSpec

    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(os.path.join(args.out, "clips"))
    started = time.time()
    log(f"clips: {CLIP_FRAMES} frames of {SIZE[1]}x{SIZE[0]}, libx264 crf {', '.join(map(str, CRFS))}")
    rows = make_clips(args.videos, args.out, args.clips)
    clips_s = time.time() - started
    csv_path = os.path.join(args.out, "clips.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "split", "psnr"])
        writer.writerows([[r["path"], r["split"], f"{r['psnr']:.4f}"] for r in rows])

    t = time.time()
    data = os.path.join(args.out, "data")
    convert(ConvertConfig(src=csv_path, out=data, spec=PatchSpec(8, 32, 32), values=("psnr",), workers=1,
                          command="benchmarks/quality.py"))
    convert_s = time.time() - t
    t = time.time()
    run_dir = os.path.join(args.out, "run")
    run = train(TrainConfig(data=data, out=run_dir, task="regress", epochs=args.epochs, batch_size=args.batch_size,
                            lr=args.lr, seed=args.seed, val_split="none", verbose=0,
                            model_options=MODEL_OPTIONS + (("filters", args.filters),)), echo=log)
    train_s = time.time() - t
    result = evaluate(EvalConfig(model=run_dir, data=data, split="test"))
    clip = result["video"]

    test = [r for r in rows if r["split"] == "test"]
    truth = np.array([r["psnr"] for r in test])
    train_mean = float(np.mean([r["psnr"] for r in rows if r["split"] == "train"]))
    baselines = {
        "bitrate_srocc": float(spearmanr([r["bits_per_pixel"] for r in test], truth).statistic),
        "minus_crf_srocc": float(spearmanr([-r["crf"] for r in test], truth).statistic),
        "train_mean_mae": float(np.mean(np.abs(truth - train_mean))),
    }
    report = {"clips": {"train": len(rows) - len(test), "test": len(test)}, "crfs": list(CRFS),
              "train_sources": list(TRAIN), "test_sources": list(TEST),
              "test_psnr_range": [float(truth.min()), float(truth.max())],
              "model": {"srocc": clip["srocc"], "plcc": clip["plcc"], "mae_db": clip["mae"], "rmse_db": clip["rmse"],
                        "patch_srocc": result["patch"]["srocc"]},
              "baselines": baselines, "epochs": args.epochs, "params": run["params"],
              "seconds": {"clips": clips_s, "convert": convert_s, "train": train_s,
                          "total": time.time() - started},
              "srocc_ratio_over_bitrate": clip["srocc"] / baselines["bitrate_srocc"]
              if baselines["bitrate_srocc"] > 0 else None}
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(report, f, indent=1)
    log(f"test clips ({len(test)}, {', '.join(TEST)}; PSNR {truth.min():.1f}-{truth.max():.1f} dB):")
    log(f"  model (stcnn, {run['params']:,} parameters, {args.epochs} epochs): SROCC {clip['srocc']:.3f}  "
        f"PLCC {clip['plcc']:.3f}  MAE {clip['mae']:.2f} dB")
    log(f"  bitrate as predictor: SROCC {baselines['bitrate_srocc']:.3f}")
    log(f"  -crf as predictor:    SROCC {baselines['minus_crf_srocc']:.3f}")
    log(f"  training mean ({train_mean:.2f} dB) as predictor: MAE {baselines['train_mean_mae']:.2f} dB")
    log(f"wrote {os.path.join(args.out, 'quality.json')} in {report['seconds']['total']:.0f}s "
        f"(clips {clips_s:.0f}s, convert {convert_s:.0f}s, train {train_s:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
