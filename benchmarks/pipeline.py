"""Benchmark: clips/s of `make_dataset` against the baselines a TF user would otherwise use, in one run.

On records converted (by the real converter) from the sample videos, 16x112x112 clips, batch 32:

  1. make_dataset, flip + shuffle (raw)  vs  a DMVR-style pipeline written here: one JPEG per frame
     in `SequenceExample`s, decoded, flipped and normalised to float in tf.data     (goal >= 4x)
  2. make_dataset, no augmentation  vs  the bare minimum: TFRecordDataset -> batch -> parse_example
     -> decode_raw                                                                  (goal >= 0.9x)
  3. make_dataset, flip + shuffle  vs  decoding the same patches from the video files in a Python
     generator (`from_generator`)                                                   (goal >= 15x)
  4. jpeg records vs raw records through make_dataset (flip + shuffle)
  5. peak memory (max RSS) streaming 10x more records (repeat 10) vs once          (goal <= ~1.1x)

Run: python benchmarks/pipeline.py [--videos DIR] [--seconds 6]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_VIDEOS = os.path.join(HERE, "..", "..", "shared", "data", "videos")
BATCH = 32
FILES = ("bikes.mp4", "bigbuckbunny.mp4")


def spec():
    from tfrecords_tools.spec import PatchSpec
    return PatchSpec(16, 112, 112, stride_frames=8, short_side=224)


def convert_samples(videos: str, work: str, encoding: str) -> str:
    from tfrecords_tools.convert import ConvertConfig, convert
    src = os.path.join(work, "src")
    if not os.path.isdir(src):
        for i, name in enumerate(FILES):
            os.makedirs(os.path.join(src, f"class{i}"), exist_ok=True)
            os.symlink(os.path.abspath(os.path.join(videos, name)), os.path.join(src, f"class{i}", name))
    out = os.path.join(work, encoding)
    convert(ConvertConfig(src=src, out=out, spec=spec(), encoding=encoding, quality=90, workers=2,
                          shard_size_mb=32))
    return out


def write_dmvr_style(raw: str, out: str) -> str:
    """The same clips as `SequenceExample`s with one JPEG per frame (DMVR's storage layout)."""
    import tensorflow as tf

    from stpkeras.pipeline import make_dataset
    from tfrecords_tools import schema
    path = os.path.join(out, "dmvr.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for f in make_dataset(raw, "all", batch_size=1, as_supervised=False):
            clip = f[schema.PATCH][0]
            frames = [tf.io.encode_jpeg(frame, quality=90).numpy() for frame in clip]
            seq = tf.train.SequenceExample(
                context=tf.train.Features(feature={"clip/label/index": tf.train.Feature(
                    int64_list=tf.train.Int64List(value=[int(f[schema.LABEL][0])]))}),
                feature_lists=tf.train.FeatureLists(feature_list={"image/encoded": tf.train.FeatureList(feature=[
                    tf.train.Feature(bytes_list=tf.train.BytesList(value=[b])) for b in frames])}))
            writer.write(seq.SerializeToString())
    return path


def dmvr_style_dataset(path: str, s):
    """DMVR's default video chain, written from its documented steps: parse the sequence, decode every
    JPEG frame, random crop, random flip, normalise to float, shuffle, batch."""
    import tensorflow as tf

    def parse(serialized):
        context, seq = tf.io.parse_single_sequence_example(
            serialized, context_features={"clip/label/index": tf.io.FixedLenFeature([], tf.int64)},
            sequence_features={"image/encoded": tf.io.FixedLenSequenceFeature([], tf.string)})
        frames = tf.map_fn(lambda b: tf.io.decode_jpeg(b, channels=3), seq["image/encoded"],
                           fn_output_signature=tf.uint8)
        frames = tf.image.random_crop(frames, [s.frames, s.height, s.width, 3])
        frames = tf.cond(tf.random.uniform([]) < 0.5, lambda: tf.reverse(frames, [2]), lambda: frames)
        return tf.cast(frames, tf.float32) / 255.0, context["clip/label/index"]

    ds = tf.data.TFRecordDataset(path).repeat().shuffle(256)
    return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH).prefetch(tf.data.AUTOTUNE)


def bare_minimum_dataset(raw: str, s):
    import tensorflow as tf

    from stpkeras.pipeline import load_info
    from tfrecords_tools import schema
    files = load_info(raw).files("all")
    feature = {schema.PATCH: tf.io.FixedLenFeature([], tf.string), schema.LABEL: tf.io.FixedLenFeature([], tf.int64)}

    def parse(batch):
        f = tf.io.parse_example(batch, feature)
        return tf.reshape(tf.io.decode_raw(f[schema.PATCH], tf.uint8), [-1, *s.shape]), f[schema.LABEL]

    return tf.data.TFRecordDataset(files).repeat().batch(BATCH).map(parse, num_parallel_calls=tf.data.AUTOTUNE)\
        .prefetch(tf.data.AUTOTUNE)


def generator_dataset(videos: str, s):
    """What users write without this package: decode and cut in Python, feed with from_generator."""
    import numpy as np
    import tensorflow as tf

    from tfrecords_tools.video import Plan, video_patches

    def clips():
        while True:
            for label, name in enumerate(FILES):
                for event in video_patches(os.path.join(videos, name), s):
                    if not isinstance(event, Plan):
                        flip = np.random.rand() < 0.5
                        yield (event.pixels[:, :, ::-1] if flip else event.pixels), label

    sig = (tf.TensorSpec(s.shape, tf.uint8), tf.TensorSpec([], tf.int64))
    return tf.data.Dataset.from_generator(clips, output_signature=sig).shuffle(256).batch(BATCH)\
        .prefetch(tf.data.AUTOTUNE)


def clips_per_second(ds, seconds: float) -> float:
    it = iter(ds)
    for _ in range(3):  # warm up: fill buffers, trace functions
        next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x, _ = next(it)
        n += int(x.shape[0])
    return n / (time.perf_counter() - start)


def child_memory(raw: str, repeats: int) -> None:
    """Streams the records `repeats` times; prints max RSS in MiB."""
    from stpkeras.pipeline import make_dataset
    ds = make_dataset(raw, "all", batch_size=BATCH, training=True, augment="flip", seed=0, repeat=True)
    steps = repeats * (make_dataset(raw, "all", batch_size=BATCH, training=True).cardinality().numpy())
    for _ in ds.take(int(steps)):
        pass
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", default=DEFAULT_VIDEOS)
    parser.add_argument("--seconds", type=float, default=6.0, help="measuring time per pipeline")
    parser.add_argument("--child-memory", nargs=2, metavar=("DATA", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        child_memory(args.child_memory[0], int(args.child_memory[1]))
        return 0
    if not all(os.path.exists(os.path.join(args.videos, f)) for f in FILES):
        print(f"sample videos {FILES} not found in {args.videos}", file=sys.stderr)
        return 2
    from stpkeras.pipeline import load_info, make_dataset

    s = spec()
    work = tempfile.mkdtemp(prefix="stp-bench-")
    try:
        t = time.perf_counter()
        raw = convert_samples(args.videos, work, "raw")
        jpeg = convert_samples(args.videos, work, "jpeg")
        dmvr = write_dmvr_style(raw, work)
        n = load_info(raw).num_records("all")
        print(f"{n} clips of {'x'.join(map(str, s.shape))} from {', '.join(FILES)} "
              f"(prepared in {time.perf_counter() - t:.0f}s); batch {BATCH}; {os.cpu_count()} CPU cores")

        def ours(data, augment, training=True):
            return make_dataset(data, "all", batch_size=BATCH, training=training, augment=augment, seed=0, repeat=True)

        rate = {}
        for name, ds in [("make_dataset raw, flip+shuffle", ours(raw, "flip")),
                         ("DMVR-style JPEG SequenceExample", dmvr_style_dataset(dmvr, s)),
                         ("make_dataset raw, no augmentation", ours(raw, None, training=False)),
                         ("bare minimum parse_example+decode_raw", bare_minimum_dataset(raw, s)),
                         ("Python generator from the videos", generator_dataset(args.videos, s)),
                         ("make_dataset jpeg, flip+shuffle", ours(jpeg, "flip"))]:
            rate[name] = clips_per_second(ds, args.seconds)
            print(f"  {name:<40} {rate[name]:8.0f} clips/s")
        print("ratios (goal):")
        for a, b, goal in [("make_dataset raw, flip+shuffle", "DMVR-style JPEG SequenceExample", ">= 4"),
                           ("make_dataset raw, no augmentation", "bare minimum parse_example+decode_raw", ">= 0.9"),
                           ("make_dataset raw, flip+shuffle", "Python generator from the videos", ">= 15"),
                           ("make_dataset jpeg, flip+shuffle", "make_dataset raw, flip+shuffle", "(jpeg/raw)")]:
            print(f"  {a} / {b}: {rate[a] / rate[b]:.2f}x  (goal {goal})")
        mem = {}
        for repeats in (1, 10):
            out = subprocess.run([sys.executable, __file__, "--child-memory", raw, str(repeats)], capture_output=True,
                                 text=True, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
            mem[repeats] = float(out.stdout.strip().splitlines()[-1])
        print(f"peak RSS streaming {n} records: {mem[1]:.0f} MiB; 10x as many: {mem[10]:.0f} MiB "
              f"({mem[10] / mem[1]:.3f}x, goal <= ~1.1x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
