"""Benchmark: clips/s of `make_dataset` against the baselines a TF user would otherwise use, in one run.

On records converted (by the real converter) from the sample videos, 16x112x112 clips, batch 32, 2 cores:

  1. make_dataset raw, flip + shuffle  vs  a DMVR-style pipeline written here (one JPEG per frame in
     `SequenceExample`s; parsed, decoded, cropped, flipped and normalised to float in tf.data), in two
     storage layouts: the pre-cut 16x112x112 clips (the cheapest a DMVR user could store; the goal's
     baseline) and DMVR's own layout, one record per video holding its whole frames, a clip sampled
     and cropped per example                                                        (goal >= 4x)
  2. make_dataset raw, no augmentation  vs  the bare minimum: TFRecordDataset -> batch -> parse_example
     -> decode_raw                                                                  (goal >= 0.9x)
  3. make_dataset raw, flip + shuffle  vs  what users write without this package: a Python generator
     that decodes each clip from the video file with PyAV (seek, decode its frames, resize, crop),
     the same clips in the same number per epoch, in shuffled order              (goal >= 15x)
     The same with records converted with `--pixels yuv440` (2 bytes a pixel, chroma of row pairs; the
     JPEG frames of the baseline keep chroma of 2x2 blocks)                        (goal >= 4x)
  4. jpeg records vs raw records through make_dataset (flip + shuffle)
  5. peak memory (max RSS) streaming 10x more records (repeat 10) vs once, with glibc's default
     malloc arenas and with one arena                                               (goal <= ~1.1x)

Every pipeline is measured `--rounds` times, the rounds interleaved, so that a ratio is taken between
measurements a few seconds apart (other jobs share the machine); the table gives the median and the
range over rounds, and the CPU time the process spent per clip (the pipeline's work, which other jobs
disturb less than its rate).

Run: TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/pipeline.py [--videos DIR] [--seconds 5] [--rounds 3] [--default-malloc]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Tuple

import stpkeras  # noqa: F401  (first, before TensorFlow loads: it turns TensorFlow's oneDNN CPU kernels on)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_VIDEOS = os.path.join(HERE, "..", "..", "shared", "data", "videos")
BATCH = 32
FILES = ("bikes.mp4", "bigbuckbunny.mp4")
JPEG_QUALITY = 90
DMVR_SHUFFLE = 256  # records in the shuffle buffer of the clip pipelines (ours and DMVR-style)


def spec(pixels: str = "rgb"):
    from tfrecords_tools.spec import PatchSpec
    return PatchSpec(16, 112, 112, stride_frames=8, short_side=224, pixels=pixels)


def convert_samples(videos: str, work: str, encoding: str, pixels: str = "rgb") -> str:
    from tfrecords_tools.convert import ConvertConfig, convert
    src = os.path.join(work, "src")
    if not os.path.isdir(src):
        for i, name in enumerate(FILES):
            os.makedirs(os.path.join(src, f"class{i}"), exist_ok=True)
            os.symlink(os.path.abspath(os.path.join(videos, name)), os.path.join(src, f"class{i}", name))
    out = os.path.join(work, encoding if pixels == "rgb" else pixels)
    convert(ConvertConfig(src=src, out=out, spec=spec(pixels), encoding=encoding, quality=JPEG_QUALITY, workers=2,
                          shard_size_mb=32))
    return out


def clip_table(raw: str) -> list:
    """`(video id, first frame, top, left, label, pixels)` of every record: the clips all pipelines produce."""
    from stpkeras.pipeline import make_dataset
    from tfrecords_tools import schema
    clips = []
    for f in make_dataset(raw, "all", batch_size=1, as_supervised=False):
        t, y, x = (int(v) for v in f[schema.OFFSET][0])
        clips.append((f[schema.VIDEO_ID][0].numpy().decode(), t, y, x, int(f[schema.LABEL][0]),
                      f[schema.PATCH][0].numpy()))
    return clips


# --- DMVR-style: one JPEG per frame in SequenceExamples --------------------------------------------

def _sequence_example(frames, label: int) -> bytes:
    import tensorflow as tf
    encoded = [tf.io.encode_jpeg(frame, quality=JPEG_QUALITY).numpy() for frame in frames]
    seq = tf.train.SequenceExample(
        context=tf.train.Features(feature={"clip/label/index": tf.train.Feature(
            int64_list=tf.train.Int64List(value=[label]))}),
        feature_lists=tf.train.FeatureLists(feature_list={"image/encoded": tf.train.FeatureList(feature=[
            tf.train.Feature(bytes_list=tf.train.BytesList(value=[b])) for b in encoded])}))
    return seq.SerializeToString()


def write_dmvr_clips(clips: list, out: str) -> str:
    """The pre-cut clips as `SequenceExample`s, one JPEG per 112x112 frame."""
    import tensorflow as tf
    path = os.path.join(out, "dmvr-clips.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for _, _, _, _, label, pixels in clips:
            writer.write(_sequence_example(pixels, label))
    return path


def write_dmvr_videos(clips: list, src: str, out: str) -> str:
    """DMVR's layout: one `SequenceExample` per video with all its frames, at the size the clips were cut at."""
    import tensorflow as tf
    path = os.path.join(out, "dmvr-videos.tfrecord")
    labels = {video: label for video, _, _, _, label, _ in clips}
    with tf.io.TFRecordWriter(path) as writer:
        for video, label in sorted(labels.items()):
            writer.write(_sequence_example(list(decoded_frames(os.path.join(src, video))), label))
    return path


def _dmvr_parse(serialized):
    import tensorflow as tf
    context, seq = tf.io.parse_single_sequence_example(
        serialized, context_features={"clip/label/index": tf.io.FixedLenFeature([], tf.int64)},
        sequence_features={"image/encoded": tf.io.FixedLenSequenceFeature([], tf.string)})
    return seq["image/encoded"], context["clip/label/index"]


def _dmvr_finish(frames, s):
    """DMVR's chain after sampling: decode the JPEGs, random crop, random flip, normalise to float."""
    import tensorflow as tf
    frames = tf.map_fn(lambda b: tf.io.decode_jpeg(b, channels=3), frames, fn_output_signature=tf.uint8)
    frames = tf.image.random_crop(frames, [s.frames, s.height, s.width, 3])
    frames = tf.cond(tf.random.uniform([]) < 0.5, lambda: tf.reverse(frames, [2]), lambda: frames)
    return tf.cast(frames, tf.float32) / 255.0


def dmvr_clips_dataset(path: str, s):
    import tensorflow as tf

    def element(serialized):
        frames, label = _dmvr_parse(serialized)
        return _dmvr_finish(frames, s), label

    ds = tf.data.TFRecordDataset(path).repeat().shuffle(DMVR_SHUFFLE)
    return ds.map(element, num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH).prefetch(tf.data.AUTOTUNE)


def dmvr_videos_dataset(path: str, s):
    """DMVR's sampling: each example reads a video record, takes `s.frames` consecutive frames at a random
    start, decodes only those, then crops a random window (frames are stored at 224 on the short side)."""
    import tensorflow as tf

    def element(serialized):
        frames, label = _dmvr_parse(serialized)
        start = tf.random.uniform([], 0, tf.shape(frames)[0] - s.frames + 1, dtype=tf.int32)
        return _dmvr_finish(frames[start:start + s.frames], s), label

    ds = tf.data.TFRecordDataset(path).repeat().shuffle(16)
    return ds.map(element, num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH).prefetch(tf.data.AUTOTUNE)


# --- baselines without this package ----------------------------------------------------------------

def _resize(frame, height: int, width: int):
    """A decoded PyAV frame -> `uint8 [height, width, 3]` RGB (swscale, area averaging, as the converter)."""
    return frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="AREA")


def _size(frame, short_side: int):
    """The frame size with `short_side` on the short side, even sides (the converter's rounding)."""
    scale = short_side / min(frame.height, frame.width)
    h, w = max(2, round(frame.height * scale / 2) * 2), max(2, round(frame.width * scale / 2) * 2)
    return (short_side, w) if frame.height <= frame.width else (h, short_side)


def decoded_frames(path: str, short_side: int = 224):
    """Every frame of a video, resized, with plain PyAV."""
    import av
    with av.open(path) as container:
        for frame in container.decode(video=0):
            yield _resize(frame, *_size(frame, short_side))


def decode_clip(path: str, first: int, top: int, left: int, s, short_side: int = 224):
    """One clip from the video file, the way a user without this package would: seek to the clip's first
    frame, decode up to its last, resize each frame, crop. `uint8 [T, H, W, 3]`."""
    import av
    import numpy as np
    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate)
        start = stream.start_time or 0
        # Seeking lands on the keyframe at or before the clip; decoding goes on from there.
        container.seek(start + int(first / rate / stream.time_base), stream=stream, backward=True)
        frames = []
        for frame in container.decode(stream):
            index = round((frame.pts - start) * stream.time_base * rate)
            if index < first:
                continue
            h, w = _size(frame, short_side)
            frames.append(_resize(frame, h, w)[top:top + s.height, left:left + s.width])
            if len(frames) == s.frames:
                return np.stack(frames)
    raise ValueError(f"{path}: clip at frame {first} runs past the end")


def generator_dataset(clips: list, src: str, s):
    """What users write without this package: a Python generator decoding each clip with PyAV, fed to
    tf.data with `from_generator`. Every epoch yields every clip once, in a new random order."""
    import numpy as np
    import tensorflow as tf
    table = [(os.path.join(src, video), t, y, x, label) for video, t, y, x, label, _ in clips]

    def generate():
        order = list(table)
        while True:
            random.shuffle(order)
            for path, t, y, x, label in order:
                pixels = decode_clip(path, t, y, x, s)
                yield (pixels[:, :, ::-1] if np.random.rand() < 0.5 else pixels), label

    sig = (tf.TensorSpec(s.shape, tf.uint8), tf.TensorSpec([], tf.int64))
    return tf.data.Dataset.from_generator(generate, output_signature=sig).batch(BATCH).prefetch(tf.data.AUTOTUNE)


def check_generator(clips: list, src: str, s, count: int = 6) -> float:
    """The generator decodes the records' clips: the largest mean absolute difference over `count` clips."""
    import numpy as np
    worst = 0.0
    for video, t, y, x, _, pixels in random.Random(0).sample(clips, count):
        got = decode_clip(os.path.join(src, video), t, y, x, s)
        worst = max(worst, float(np.abs(got.astype(int) - pixels).mean()))
    return worst


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


# --- measuring -------------------------------------------------------------------------------------

def clips_per_second(ds, seconds: float, min_batches: int = 2) -> Tuple[float, float]:
    """Clips/s of a fresh iterator over `ds`, after a second of warm-up (buffers filled, functions traced),
    and the CPU time this process spent per clip meanwhile (ms; all threads, so the pipeline's own work,
    a figure other jobs on the machine disturb less than clips/s).

    The iterator is dropped afterwards: a live one keeps its background threads filling its buffers,
    which would slow down the pipeline measured next.
    """
    it = iter(ds)
    start = time.perf_counter()
    next(it)
    while time.perf_counter() - start < 1.0:
        next(it)
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds or n < min_batches * BATCH:
        x, _ = next(it)
        n += int((x[0] if isinstance(x, tuple) else x).shape[0])  # a tuple: planes of one batch
    rate, cpu_ms = n / (time.perf_counter() - start), (time.process_time() - cpu) / n * 1e3
    del it
    gc.collect()
    return rate, cpu_ms


def peak_rss_mib() -> float:
    """This process's peak resident memory (`VmHWM`). Not `ru_maxrss`: Linux carries that over from the
    parent across fork and exec, so a child would report its parent's peak when that is larger."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_memory(raw: str, repeats: int) -> None:
    """Streams the records `repeats` times; prints max RSS in MiB."""
    from stpkeras.pipeline import make_dataset
    ds = make_dataset(raw, "all", batch_size=BATCH, training=True, augment="flip", seed=0, repeat=True)
    steps = repeats * (make_dataset(raw, "all", batch_size=BATCH, training=True).cardinality().numpy())
    for _ in ds.take(int(steps)):
        pass
    print(peak_rss_mib())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", default=DEFAULT_VIDEOS)
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per pipeline and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurements of every pipeline")
    parser.add_argument("--child-memory", nargs=2, metavar=("DATA", "REPEATS"), help=argparse.SUPPRESS)
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default malloc arenas (default: one arena, as `stp` runs)")
    args = parser.parse_args()
    if not args.default_malloc and not args.child_memory:
        from stpkeras.allocator import one_malloc_arena
        one_malloc_arena()  # as `stp` does, before TensorFlow starts threads; every pipeline runs under it
    if args.child_memory:
        child_memory(args.child_memory[0], int(args.child_memory[1]))
        return 0
    if not all(os.path.exists(os.path.join(args.videos, f)) for f in FILES):
        print(f"sample videos {FILES} not found in {args.videos}", file=sys.stderr)
        return 2
    from stpkeras.pipeline import load_info, make_dataset

    command = " ".join(["TF_CPP_MIN_LOG_LEVEL=2", "python", "benchmarks/pipeline.py",
                        *map(shlex.quote, sys.argv[1:])])
    s = spec()
    work = tempfile.mkdtemp(prefix="stp-bench-")
    try:
        t = time.perf_counter()
        raw = convert_samples(args.videos, work, "raw")
        jpeg = convert_samples(args.videos, work, "jpeg")
        yuv = convert_samples(args.videos, work, "raw", pixels="yuv440")
        src = os.path.join(work, "src")
        clips = clip_table(raw)
        dmvr_clips = write_dmvr_clips(clips, work)
        dmvr_videos = write_dmvr_videos(clips, src, work)
        n = load_info(raw).num_records("all")
        assert len(clips) == n
        mismatch = check_generator(clips, src, s)
        print(f"`{command}`\n")
        print(f"malloc: {'glibc default arenas' if args.default_malloc else 'one arena (as stp runs)'}; "
              f"shuffle buffer {DMVR_SHUFFLE} records for every clip pipeline (16 for whole-video records).")
        print(f"{n} clips of {'x'.join(map(str, s.shape))} from {', '.join(FILES)} (prepared in "
              f"{time.perf_counter() - t:.0f}s); batch {BATCH}; {os.cpu_count()} CPU cores; "
              f"{args.rounds} rounds of {args.seconds:g}s per pipeline. The generator decodes the records' clips "
              f"(mean |difference| <= {mismatch:.2f} grey levels on 6 clips).\n")

        def megabytes(folder_or_file):
            if os.path.isfile(folder_or_file):
                return os.path.getsize(folder_or_file) / 1e6
            return sum(os.path.getsize(f) for f in load_info(folder_or_file).files("all")) / 1e6

        print(f"Bytes on disk: raw rgb {megabytes(raw):.0f} MB, raw yuv440 {megabytes(yuv):.0f} MB, jpeg "
              f"{megabytes(jpeg):.0f} MB, DMVR-style pre-cut JPEG frames {megabytes(dmvr_clips):.0f} MB.\n")

        def ours(data, augment, training=True):
            # The shuffle buffer of the DMVR-style pipelines (256 records), for a like-for-like shuffle.
            return make_dataset(data, "all", batch_size=BATCH, training=training, augment=augment, seed=0,
                                repeat=True, shuffle_buffer=DMVR_SHUFFLE)

        pipelines = {
            "make_dataset raw, flip+shuffle": ours(raw, "flip"),
            "make_dataset raw yuv440, flip+shuffle": ours(yuv, "flip"),
            "DMVR-style, pre-cut 112x112 JPEG frames": dmvr_clips_dataset(dmvr_clips, s),
            "DMVR-style, whole-video JPEG frames": dmvr_videos_dataset(dmvr_videos, s),
            "make_dataset raw, no augmentation": ours(raw, None, training=False),
            "bare minimum parse_example+decode_raw": bare_minimum_dataset(raw, s),
            "Python generator, PyAV per clip": generator_dataset(clips, src, s),
            "make_dataset jpeg, flip+shuffle": ours(jpeg, "flip"),
        }
        rates = {name: [] for name in pipelines}
        cpu = {name: [] for name in pipelines}
        for _ in range(args.rounds):
            for name, ds in pipelines.items():
                rate, cpu_ms = clips_per_second(ds, args.seconds)
                rates[name].append(rate)
                cpu[name].append(cpu_ms)

        print("| pipeline | clips/s (median) | range over rounds | CPU ms per clip (median) |\n|---|---:|---:|---:|")
        for name, r in rates.items():
            print(f"| {name} | {statistics.median(r):.0f} | {min(r):.0f}-{max(r):.0f} | "
                  f"{statistics.median(cpu[name]):.2f} |")
        print("\n| ratio | median over rounds | range | CPU ms per clip, inverse ratio | goal |\n"
              "|---|---:|---:|---:|---|")
        for a, b, goal in [("make_dataset raw, flip+shuffle", "DMVR-style, pre-cut 112x112 JPEG frames", ">= 4x"),
                           ("make_dataset raw yuv440, flip+shuffle", "DMVR-style, pre-cut 112x112 JPEG frames",
                            ">= 4x"),
                           ("make_dataset raw, flip+shuffle", "DMVR-style, whole-video JPEG frames", "(DMVR's layout)"),
                           ("make_dataset raw, no augmentation", "bare minimum parse_example+decode_raw", ">= 0.9x"),
                           ("make_dataset raw, flip+shuffle", "Python generator, PyAV per clip", ">= 15x"),
                           ("make_dataset jpeg, flip+shuffle", "make_dataset raw, flip+shuffle", "(jpeg / raw)")]:
            ratio = [x / y for x, y in zip(rates[a], rates[b])]
            work_ratio = statistics.median(cpu[b]) / statistics.median(cpu[a])
            print(f"| {a} / {b} | {statistics.median(ratio):.2f}x | {min(ratio):.2f}-{max(ratio):.2f} | "
                  f"{work_ratio:.2f}x | {goal} |")
        # Peak memory, each count of passes in a fresh process. With glibc's default of up to 8 malloc arenas
        # per core, the record-sized blocks that pass between threads fragment the heaps until a plateau
        # some 2x the first pass; one arena keeps the footprint flat. Both are shown.
        print("\n| allocator | peak RSS, 1 pass | peak RSS, 10 passes | 10 / 1 | goal |\n|---|---:|---:|---:|---|")
        for label, extra in [("glibc default", {}), ("glibc, MALLOC_ARENA_MAX=1", {"MALLOC_ARENA_MAX": "1"})]:
            mem = {}
            for repeats in (1, 10):
                out = subprocess.run([sys.executable, __file__, "--child-memory", raw, str(repeats)],
                                     capture_output=True, text=True, check=True,
                                     env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **extra})
                mem[repeats] = float(out.stdout.strip().splitlines()[-1])
            print(f"| {label} | {mem[1]:.0f} MiB | {mem[10]:.0f} MiB | {mem[10] / mem[1]:.2f}x | <= ~1.1x |")
        print(f"\n(streaming the {n} records with flip + shuffle, batch {BATCH}; TF alone takes about 580 MiB)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
