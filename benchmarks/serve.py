"""Benchmark: the exported SavedModel against the Keras model it came from, and `stp predict` on videos.

1. Latency (p50, p99) at batch 1 and throughput at batch 32 of the export's
   `serving_default` signature (loaded with `tf.saved_model.load`) vs calling
   the Keras model inside a `tf.function`: the ratio SavedModel / Keras is the
   claim (goal <= 1.1x). Both run in this process, their calls interleaved
   round by round so that drift in the machine hits both alike.
2. Videos per second of `stp predict`'s code path (decode + cut in one thread,
   model in the other) on the built-in sample videos, and where the time goes.
3. With `--standin`: batch-1 latency through the REST and gRPC clients to the
   stand-in server on 127.0.0.1. That server is a TEST DOUBLE, not TF Serving:
   the figure shows the cost of the clients' encoding, not TF Serving's speed.

    python benchmarks/serve.py                     # stcnn, patch 8x32x32, the demo's spec
    python benchmarks/serve.py --model c3d --standin --json
"""

from __future__ import annotations

import argparse
import gc
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
            "mean_ms": float(ms.mean())}


def interleaved(fns, make_input, rounds, calls_per_round):
    """Times each fn `rounds x calls_per_round` times, alternating fns every round; returns {name: [seconds]}."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(calls_per_round):
                x = make_input()
                t = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="stcnn", help="registry model family")
    parser.add_argument("--patch", default="8x32x32", help="TxHxW (the demo's spec by default)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds per measurement")
    parser.add_argument("--calls", type=int, default=25, help="batch-1 calls per round (batch-32: a fifth)")
    parser.add_argument("--videos", type=int, default=4, help="sample videos per class (4 classes)")
    parser.add_argument("--batch-size", type=int, default=32, help="predict batch size")
    parser.add_argument("--standin", action="store_true", help="also time REST/gRPC to the stand-in (test double)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--work", default=None, help="folder for the export and videos (default: a temp folder)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import keras
    import tensorflow as tf

    from stpkeras import export as ex
    from stpkeras import predict as pr
    from stpkeras.demo import make_videos
    from stpkeras.models import build_model
    from stpkeras.testing.models import write_run
    from tfrecords_tools.spec import PatchSpec

    work = args.work or tempfile.mkdtemp(prefix="stp-bench-")
    from tfrecords_tools.spec import parse_triple

    frames, height, width = parse_triple(args.patch)
    # Time stride half a patch, as the demo converts.
    spec = PatchSpec(frames, height, width, stride_frames=max(1, frames // 2))
    labels = ("down", "left", "right", "up")
    keras.utils.set_random_seed(0)
    model = build_model(args.model, spec, len(labels))
    run_dir = write_run(os.path.join(work, "run"), model, spec, labels, args.model)
    result = ex.export_for_serving(run_dir, os.path.join(work, "saved_models"), "bench")

    serve = tf.saved_model.load(result.path).signatures[ex.SERVING_DEFAULT]
    keras_fn = tf.function(lambda x: model(x, training=False))
    rng = np.random.default_rng(0)
    pool = {b: [tf.constant(rng.integers(0, 256, size=(b, *spec.shape), dtype=np.uint8)) for _ in range(8)]
            for b in (1, 32)}
    fns = {"savedmodel": lambda x: serve(patches=x)[ex.LOGITS].numpy(),
           "keras_tf_function": lambda x: keras_fn(x).numpy()}
    for b in (1, 32):  # trace and warm up both
        for fn in fns.values():
            for _ in range(3):
                fn(pool[b][0])

    # TensorFlow leaves millions of Python objects behind; a full pass of the garbage collector
    # over them takes 100+ ms and lands on a random call. Freezing them keeps the collector on
    # the objects made while measuring, so p99 reflects the model and the clients, not the GC.
    gc.collect()
    gc.freeze()
    report = {"model": args.model, "params": int(model.count_params()), "spec": spec.describe(),
              "tensorflow": tf.__version__, "keras": keras.__version__, "cpus": os.cpu_count()}
    counter = iter(range(10**9))
    lat = interleaved(fns, lambda: pool[1][next(counter) % 8], args.rounds, args.calls)
    thr = interleaved(fns, lambda: pool[32][next(counter) % 8], args.rounds, max(1, args.calls // 5))
    for name in fns:
        report[name] = {"batch1": percentiles(lat[name]),
                        "batch32_patches_per_s": float(32 * len(thr[name]) / sum(thr[name]))}
    sm, kr = report["savedmodel"], report["keras_tf_function"]
    report["ratio_savedmodel_over_keras"] = {
        "batch1_p50": sm["batch1"]["p50_ms"] / kr["batch1"]["p50_ms"],
        "batch1_p99": sm["batch1"]["p99_ms"] / kr["batch1"]["p99_ms"],
        "batch32_time": kr["batch32_patches_per_s"] / sm["batch32_patches_per_s"],
    }

    if args.standin:
        from stpkeras import serving
        from stpkeras.testing.standin_server import StandInServer

        with StandInServer(os.path.dirname(result.path), "bench") as server:
            x1 = rng.integers(0, 256, size=(1, *spec.shape), dtype=np.uint8)
            for api, url in (("rest", server.rest_url), ("grpc", server.grpc_url)):
                with serving.connect(url) as client:
                    for _ in range(3):
                        client(x1)
                    times = []
                    for _ in range(args.rounds * args.calls):
                        t = time.perf_counter()
                        client(x1)
                        times.append(time.perf_counter() - t)
                report[f"standin_{api}_batch1"] = percentiles(times)

    videos_dir = make_videos(os.path.join(work, "videos"), per_class=args.videos)
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(videos_dir) for f in files if f.endswith(".mp4"))
    predictor = pr.load(result.path)
    pr.predict_video(predictor, paths[0], batch_size=args.batch_size)  # warm-up
    t = time.perf_counter()
    results = list(pr.predict_videos(predictor, paths, batch_size=args.batch_size))
    wall = time.perf_counter() - t
    failed = [r for r in results if r.error]
    report["predict"] = {
        "videos": len(paths), "failed": len(failed), "patches": sum(r.patches for r in results),
        "video_shape": "32 frames 64x64 H.264", "batch_size": args.batch_size,
        "videos_per_s": len(paths) / wall, "wall_s": wall,
        "decode_s": sum(r.decode_s for r in results), "model_s": sum(r.model_s for r in results),
    }

    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    r = report["ratio_savedmodel_over_keras"]
    p = report["predict"]
    print(f"{args.model} ({report['params']:,} params), {spec.describe()}; TF {tf.__version__}, "
          f"Keras {keras.__version__}, {os.cpu_count()} CPUs")
    print(f"{'':22}{'b1 p50 ms':>10}{'b1 p99 ms':>10}{'b32 patches/s':>15}")
    for name in fns:
        m = report[name]
        print(f"{name:22}{m['batch1']['p50_ms']:10.2f}{m['batch1']['p99_ms']:10.2f}{m['batch32_patches_per_s']:15.0f}")
    print(f"{'SavedModel / Keras':22}{r['batch1_p50']:9.2f}x{r['batch1_p99']:9.2f}x{r['batch32_time']:14.2f}x"
          "   (time ratios; goal <= 1.1x)")
    for api in ("rest", "grpc"):
        if f"standin_{api}_batch1" in report:
            m = report[f"standin_{api}_batch1"]
            print(f"{'stand-in ' + api + ' (test double)':22}{m['p50_ms']:10.2f}{m['p99_ms']:10.2f}")
    print(f"predict: {p['videos']} videos ({p['video_shape']}, {p['patches']} patches) in {p['wall_s']:.2f}s = "
          f"{p['videos_per_s']:.1f} videos/s; decode+cut {p['decode_s']:.2f}s, model {p['model_s']:.2f}s "
          f"(in two threads, so they overlap){'; FAILED ' + str(len(failed)) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
