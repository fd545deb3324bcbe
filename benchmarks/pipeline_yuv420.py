"""Probe, not a product path: how fast would records holding YUV 4:2:0 (half the bytes of RGB) stream?

The input-pipeline goal of issue 3 (make_dataset with flip + shuffle >= 4x a DMVR-style pipeline of
pre-cut JPEG frames) is short by about 10%: a profile puts some 80% of the raw pipeline's CPU in work
proportional to the bytes per clip (CRC32C of every record, copies, the row reversal). This script
measures, in one run, what keeping the source's YUV 4:2:0 in the records would give before that
format is built into convert, the pipeline and the models: the same 330 clips of 16x112x112 as
`benchmarks/pipeline.py`, written as Examples with a Y plane `[T, H, W]` and a U+V plane
`[T, 2, H/2, W/2]` (each a bytes feature, so no slicing copy), read with the pipeline's shape
(interleave over shards, shuffle 256 serialized records, repeat, batch 32, parse + decode a batch at a
time, each clip flipped on its own with the same coin for its three planes). The colour conversion
would move into the model's first layer, like `Normalize`; it is not measured here.

    TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/pipeline_yuv420.py [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline as bench  # noqa: E402  benchmarks/pipeline.py: the same clips, baselines and clock


def to_yuv420(rgb):
    """uint8 [T, H, W, 3] RGB -> (Y [T, H, W], UV [T, 2, H/2, W/2]), BT.601 full range, 2x2 chroma mean."""
    import numpy as np
    x = rgb.astype(np.float32)
    y = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    u = 128 + (x[..., 2] - y) * 0.564
    v = 128 + (x[..., 0] - y) * 0.713
    t, h, w = y.shape
    uv = np.stack([u, v], 1).reshape(t, 2, h // 2, 2, w // 2, 2).mean((3, 5))
    return (np.clip(np.rint(y), 0, 255).astype(np.uint8), np.clip(np.rint(uv), 0, 255).astype(np.uint8))


def write_yuv_shards(clips, out: str, shards: int) -> list:
    import tensorflow as tf
    paths = [os.path.join(out, f"yuv-{i:05d}.tfrecord") for i in range(shards)]
    writers = [tf.io.TFRecordWriter(p) for p in paths]
    for i, (video, _, _, _, label, pixels) in enumerate(clips):
        y, uv = to_yuv420(pixels)
        feature = {"patch/y": tf.train.Feature(bytes_list=tf.train.BytesList(value=[y.tobytes()])),
                   "patch/uv": tf.train.Feature(bytes_list=tf.train.BytesList(value=[uv.tobytes()])),
                   "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                   "video/id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[video.encode()]))}
        writers[i % shards].write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    for w in writers:
        w.close()
    return paths


def yuv_dataset(paths, s, seed: int = 0):
    import tensorflow as tf
    t, h, w = s.frames, s.height, s.width
    feature = {"patch/y": tf.io.FixedLenFeature([], tf.string), "patch/uv": tf.io.FixedLenFeature([], tf.string),
               "label": tf.io.FixedLenFeature([], tf.int64)}

    def element(serialized, seeds):
        f = tf.io.parse_example(serialized, feature)
        y = tf.reshape(tf.io.decode_raw(f["patch/y"], tf.uint8), [bench.BATCH, t, h, w])
        uv = tf.reshape(tf.io.decode_raw(f["patch/uv"], tf.uint8), [bench.BATCH, t, 2, h // 2, w // 2])
        ys, uvs = [], []
        for i in range(bench.BATCH):
            coin = tf.random.stateless_uniform([], seeds[i]) < 0.5
            ys.append(tf.cond(coin, lambda: tf.reverse(y[i], [2]), lambda: y[i]))
            uvs.append(tf.cond(coin, lambda: tf.reverse(uv[i], [3]), lambda: uv[i]))
        return (tf.stack(ys), tf.stack(uvs)), f["label"]

    ds = tf.data.Dataset.from_tensor_slices(paths).shuffle(len(paths), seed=seed)
    ds = ds.interleave(lambda p: tf.data.TFRecordDataset(p, buffer_size=0), cycle_length=min(len(paths), 8),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.shuffle(bench.DMVR_SHUFFLE, seed=seed + 1).repeat().batch(bench.BATCH, drop_remainder=True)
    seeds = tf.data.Dataset.random(seed=seed + 2).batch(2).batch(bench.BATCH)
    ds = tf.data.Dataset.zip(ds, seeds).map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    options = tf.data.Options()
    options.deterministic = False
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", default=bench.DEFAULT_VIDEOS)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from stpkeras.allocator import one_malloc_arena
    one_malloc_arena()
    if not all(os.path.exists(os.path.join(args.videos, f)) for f in bench.FILES):
        print(f"sample videos {bench.FILES} not found in {args.videos}", file=sys.stderr)
        return 2
    from stpkeras.pipeline import load_info, make_dataset

    s = bench.spec()
    work = tempfile.mkdtemp(prefix="stp-bench-yuv-")
    try:
        raw = bench.convert_samples(args.videos, work, "raw")
        clips = bench.clip_table(raw)
        shards = len(load_info(raw).files("all"))
        yuv = write_yuv_shards(clips, work, shards)
        sizes = {"raw RGB": sum(os.path.getsize(f) for f in load_info(raw).files("all")),
                 "YUV 4:2:0": sum(os.path.getsize(p) for p in yuv)}
        pipelines = {
            "make_dataset raw RGB, flip+shuffle": make_dataset(raw, "all", batch_size=bench.BATCH, training=True,
                                                               augment="flip", seed=0, repeat=True,
                                                               shuffle_buffer=bench.DMVR_SHUFFLE),
            "probe: YUV 4:2:0 records, flip+shuffle": yuv_dataset(yuv, s),
            "DMVR-style, pre-cut 112x112 JPEG frames": bench.dmvr_clips_dataset(bench.write_dmvr_clips(clips, work), s),
        }
        rates = {n: [] for n in pipelines}
        cpu = {n: [] for n in pipelines}
        for _ in range(args.rounds):
            for name, ds in pipelines.items():
                r, c = bench.clips_per_second(ds, args.seconds)
                rates[name].append(r)
                cpu[name].append(c)
        print(f"{len(clips)} clips of {'x'.join(map(str, s.shape))} in {shards} shards; bytes on disk: "
              + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in sizes.items()) + "\n")
        print("| pipeline | clips/s (median) | range | CPU ms per clip |\n|---|---:|---:|---:|")
        for name in pipelines:
            print(f"| {name} | {statistics.median(rates[name]):.0f} | {min(rates[name]):.0f}-{max(rates[name]):.0f}"
                  f" | {statistics.median(cpu[name]):.2f} |")
        base = "DMVR-style, pre-cut 112x112 JPEG frames"
        for name in list(pipelines)[:2]:
            ratio = [a / b for a, b in zip(rates[name], rates[base])]
            print(f"\n{name} / DMVR-style pre-cut: {statistics.median(ratio):.2f}x "
                  f"(range {min(ratio):.2f}-{max(ratio):.2f})", end="")
        print()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
