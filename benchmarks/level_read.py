"""Benchmark: how well `--pairs h264:auto` reads the level (crf) of H.264 footage, against the crf it was made at.

For each sample video and each `--crfs` value: the video's first `--frames` frames (native size and rate, as
the converter decodes them) are encoded with the copies' own encoder (`video.VideoWriter`: libx264, veryfast)
at that crf, as footage of a known level; then the level is read back from the file by

  - `median`: the footage's mean quantizer its decoder reports (`video.mean_quantizer`) less libx264's median
    offset (`codec.QUANTIZER_ABOVE_CRF`), rounded: the rule `--pairs h264:auto` used until 2026-12-07;
  - `trial`: `codec.footage_level`, what `--pairs h264:auto` uses: one trial encode of the footage's own
    decoded frames at the `median` level gives this content's offset (the trial's quantizer less its crf); the
    level is the footage's quantizer less that, less `codec.SECOND_GENERATION` (shown without it as well);

and each is reported with its error (level read - crf). Also the footage's mean quantizer by frame type
(I, P, B: `pict_type`), to show where the offset comes from. CPU seconds of each reading, measured in the run.

    python benchmarks/level_read.py [--crfs 28,37] [--frames 300] [--out /tmp/stp-level-read]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from tfrecords_tools import codec, video  # noqa: E402

DEFAULT_VIDEOS = os.path.join(ROOT, "..", "shared", "data", "videos")
NAMES = ("bikes.mp4", "tree.avi", "bigbuckbunny.mp4", "Megamind_bugy.avi")
PICTURE_TYPES = {1: "I", 2: "P", 3: "B"}   # FFmpeg's AVPictureType, as PyAV 18 gives it (an int)


def encode_first(path: str, out: str, crf: int, frames: int) -> str:
    """`path`'s first `frames` frames at `crf` (`codec.encode_first`), whole at `out` or not there."""
    codec.encode_first(path, out + ".part.mp4", crf, frames)
    os.replace(out + ".part.mp4", out)   # a later run takes a file that is there as made
    return out


def quantizer_by_type(path: str, frames: int) -> dict:
    """The mean quantizer over each frame type's macroblocks (I, P, B) of the first `frames` frames."""
    import av

    sums: dict = {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.options = {"export_side_data": "venc_params"}
        for count, frame in enumerate(container.decode(stream), 1):
            for data in video.side_data(frame):
                if hasattr(data, "qp_map"):
                    qp = np.asarray(data.qp_map(), np.float64)
                    kind = PICTURE_TYPES.get(int(frame.pict_type), str(frame.pict_type))
                    total, blocks = sums.get(kind, (0.0, 0))
                    sums[kind] = (total + float(qp.sum()), blocks + qp.size)
            if count >= frames:
                break
    return {k: round(t / n, 2) for k, (t, n) in sorted(sums.items())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--videos", default=DEFAULT_VIDEOS)
    parser.add_argument("--crfs", default="28,37")
    parser.add_argument("--frames", type=int, default=video.QUANTIZER_FRAMES)
    parser.add_argument("--out", default="/tmp/stp-level-read")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    print("| video | crf | mean quantizer (I / P / B) | `median` level (error) | `trial` level (error; without "
          "`SECOND_GENERATION`) | CPU s: median / trial |")
    print("|---|---:|---|---:|---:|---:|")
    for crf in (int(c) for c in args.crfs.split(",")):
        for name in NAMES:
            footage = os.path.join(args.out, f"{os.path.splitext(name)[0]}-crf{crf}.mp4")
            if not os.path.exists(footage):
                encode_first(os.path.join(args.videos, name), footage, crf, args.frames)
            t = time.process_time()
            quantizer = video.mean_quantizer(footage, args.frames)
            median = round(quantizer - codec.QUANTIZER_ABOVE_CRF)
            t_median = time.process_time() - t
            trial = codec.footage_level(footage, frames=args.frames)
            t_trial = time.process_time() - t - t_median
            types = quantizer_by_type(footage, args.frames)
            rows.append(dict(video=name, crf=crf, quantizer=round(quantizer, 2), by_type=types, median=median,
                             trial=round(trial, 2), cpu_median=round(t_median, 2), cpu_trial=round(t_trial, 2)))
            kinds = " / ".join(f"{types.get(k, float('nan')):.1f}" for k in ("I", "P", "B"))
            print(f"| {name} | {crf} | {quantizer:.2f} ({kinds}) | {median} ({median - crf:+d}) | "
                  f"{trial:.2f} ({round(trial) - crf:+d}; {trial + codec.SECOND_GENERATION:.2f}) | "
                  f"{t_median:.2f} / {t_trial:.2f} |", flush=True)
    for rule in ("median", "trial"):
        errors = np.array([round(r[rule]) - r["crf"] for r in rows])
        print(f"{rule}: errors {errors.tolist()}, mean |error| {np.abs(errors).mean():.2f}, max {np.abs(errors).max()}")
    with open(os.path.join(args.out, "level_read.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
