"""Benchmark: live video, the stream signature against re-running the whole clip, and causal vs ordinary training.

1. Per-frame latency (p50, p99) and frames/s of one causal model's export, two ways of answering each new
   frame of a stream: the `stream` signature (one new frame + the state) vs `serving_default` re-run on a
   sliding window of the last T frames. Same SavedModel, same process, batch 1 (one stream), calls
   interleaved round by round so that drift in the machine hits both alike. Also how often the two
   agree on the label once T frames have been seen (they differ by design: the stream's convolutions
   see the frames before the window, the re-run pads them with zeros).
2. Validation accuracy of `stp train` with and without `--causal` on the same data (the demo's moving
   squares, four directions), same seed, epochs and model family.

    python benchmarks/live.py                                   # r2plus1d-10, 16x64x64; stcnn for accuracy
    python benchmarks/live.py --model stcnn --patch 16x64x64 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import stpkeras  # noqa: F401  (first, before TensorFlow loads: it turns TensorFlow's oneDNN CPU kernels on)

import numpy as np


def percentiles(times):
    ms = np.asarray(times) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "frames_per_s": float(1000.0 / ms.mean())}


def latency(args, work: str) -> dict:
    import tensorflow as tf

    from stpkeras.export import export_for_serving
    from stpkeras.models import build_model, model_options
    from tfrecords_tools.spec import PatchSpec

    t, h, w = (int(v) for v in args.patch.split("x"))
    spec = PatchSpec(t, h, w)
    options = {"causal": True}
    if "depth" in model_options(args.model):
        options.update(depth=10, widths=(16, 32, 64, 128))
    model = build_model(args.model, spec, 4, **options)
    path = os.path.join(work, "live.keras")
    model.save(path)
    result = export_for_serving(path, os.path.join(work, "sm"), "live", labels=["a", "b", "c", "d"], spec=spec,
                                streaming=True)
    sigs = tf.saved_model.load(result.path).signatures
    stream, whole, init = sigs["stream"], sigs["serving_default"], sigs["init_state"]
    rng = np.random.default_rng(0)
    total = args.warmup + args.rounds * args.calls
    video = rng.integers(0, 256, (total + t, h, w, 3), dtype=np.uint8)
    state = init(streams=tf.zeros([1], tf.int32))
    times = {"stream": [], "sliding_window": []}
    labels = {"stream": [], "sliding_window": []}
    frame = 0

    def one_stream(i):
        nonlocal state
        out = stream(frames=tf.constant(video[None, i:i + 1]), **state)
        state = {k: v for k, v in out.items() if k.startswith("state_")}
        return int(out["class_ids"].numpy()[0, -1])

    def one_window(i):
        clip = video[max(0, i - t + 1):i + 1]
        clip = np.concatenate([np.zeros((t - len(clip), h, w, 3), np.uint8), clip])  # the first frames: zeros
        return int(whole(patches=tf.constant(clip[None]))["class_ids"].numpy()[0])

    fns = {"stream": one_stream, "sliding_window": one_window}
    # Both walk the same frames; the stream's calls advance its state, so they run round by round in step.
    for r in range(args.warmup // args.calls + args.rounds):
        start = frame
        for name, fn in fns.items():
            for i in range(start, start + args.calls):
                t0 = time.perf_counter()
                label = fn(i)
                if r >= args.warmup // args.calls:
                    times[name].append(time.perf_counter() - t0)
                    labels[name].append((i, label))
        frame = start + args.calls
    out = {name: percentiles(v) for name, v in times.items()}
    a = dict(labels["stream"])
    b = dict(labels["sliding_window"])
    seen = [i for i in a if i >= t - 1]
    out["ratio_p50_sliding_over_stream"] = out["sliding_window"]["p50_ms"] / out["stream"]["p50_ms"]
    out["frames_per_s_ratio_stream_over_sliding"] = (out["stream"]["frames_per_s"]
                                                     / out["sliding_window"]["frames_per_s"])
    out["label_agreement_after_T_frames"] = float(np.mean([a[i] == b[i] for i in seen])) if seen else None
    out["model"], out["patch"], out["frames_timed"] = args.model, args.patch, len(times["stream"])
    out["state_floats"] = int(sum(np.prod(v.shape) for v in state.values()))
    return out


def accuracy(args, work: str) -> dict:
    from stpkeras.demo import make_videos
    from stpkeras.train import TrainConfig, train
    from tfrecords_tools.convert import ConvertConfig, convert
    from tfrecords_tools.spec import PatchSpec

    t, h, w = (int(v) for v in args.acc_patch.split("x"))
    videos = make_videos(os.path.join(work, "videos"), per_class=args.per_class, frames=32, height=64, width=64)
    data = os.path.join(work, "data")
    convert(ConvertConfig(src=videos, out=data, spec=PatchSpec(t, h, w, stride_frames=t),
                          split_fractions=(("val", 0.25),), workers=1, command="benchmark"))
    out = {}
    for causal in (False, True):
        name = "causal" if causal else "ordinary"
        options = (("filters", 8), ("causal", True)) if causal else (("filters", 8),)
        started = time.perf_counter()
        run = train(TrainConfig(data=data, out=os.path.join(work, name), model=args.acc_model,
                                model_options=options, epochs=args.epochs, batch_size=16, augment=(), seed=0,
                                deterministic=True, verbose=0), echo=lambda *a: None)
        best = run["metrics"]["best"]
        out[name] = {"val_accuracy": best.get("val_accuracy"), "epoch": run["metrics"].get("best_epoch"),
                     "seconds": time.perf_counter() - started}
    out["model"], out["patch"], out["epochs"], out["videos"] = args.acc_model, args.acc_patch, args.epochs, \
        4 * args.per_class
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="r2plus1d", help="causal family timed (stcnn, r2plus1d, resnet3d)")
    parser.add_argument("--patch", default="16x64x64", help="TxHxW of the timed model")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=10, help="frames per round and way")
    parser.add_argument("--warmup", type=int, default=10, help="frames per way not timed (a multiple of --calls)")
    parser.add_argument("--acc-model", default="stcnn", help="family trained for the accuracy comparison")
    parser.add_argument("--acc-patch", default="8x32x32")
    parser.add_argument("--per-class", type=int, default=8, help="demo videos per class (4 classes)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        report = {"latency": latency(args, work)}
        if not args.skip_accuracy:
            report["accuracy"] = accuracy(args, work)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    lat = report["latency"]
    print(f"{lat['model']} {lat['patch']}, one stream, {lat['frames_timed']} frames timed per way "
          f"(state: {lat['state_floats']} floats)")
    for name in ("stream", "sliding_window"):
        r = lat[name]
        print(f"  {name:15s} p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  {r['frames_per_s']:7.1f} frames/s")
    agree = lat["label_agreement_after_T_frames"]
    print(f"  sliding window / stream at p50: {lat['ratio_p50_sliding_over_stream']:.2f}x; frames/s stream / sliding "
          f"window: {lat['frames_per_s_ratio_stream_over_sliding']:.2f}x"
          + ("" if agree is None else f"; labels agree on {agree:.0%} of the frames after the first T"))
    if "accuracy" in report:
        acc = report["accuracy"]
        print(f"accuracy, {acc['model']} {acc['patch']}, {acc['videos']} videos, {acc['epochs']} epochs: "
              f"ordinary {acc['ordinary']['val_accuracy']:.3f}, causal {acc['causal']['val_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
