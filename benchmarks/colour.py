"""Benchmark: how YUV frames become RGB, FFmpeg's default converter against the exact one.

For each sample video and each of `tfrecords_tools.video.COLOURS`:

  - the mean difference from the BT.601 limited-range formula per channel (R, G, B), in grey levels, over the
    first `--frames` frames, with the formula's chroma taken at the nearest sample (the mean of a frame does
    not depend on how chroma is interpolated, so the bias is comparable; the spread is not, and is not
    reported);
  - the round trip of a command that writes the frames back (`stp enhance`, `stp stabilize`): the first
    `--frames` frames read with each converter, written unchanged by `video.VideoWriter` at crf 0 (lossless
    4:2:0), and the mean of the written luma minus the source's, in grey levels (0: a pixel left unchanged is
    written back as it was; `video.REWRITE_COLOUR` is the converter those commands read with);
  - the CPU a frame of a read of the whole video costs (`video.read_frames`: decoding and converting, native
    size and at `--short-side`), and the ratio exact / ffmpeg measured in the same run.

A video stored as RGB (tree.avi's cinepak) has no YUV to convert and no bias row.

    python benchmarks/colour.py [--frames 48] [--short-side 128]
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

from tfrecords_tools import video  # noqa: E402
from tfrecords_tools.spec import PatchSpec  # noqa: E402

DEFAULT_VIDEOS = os.path.join(ROOT, "..", "shared", "data", "videos")
NAMES = ("bikes.mp4", "bigbuckbunny.mp4", "Megamind_bugy.avi", "tree.avi")


def formula_bias(path: str, frames: int) -> dict:
    """{colour: mean (converted - BT.601 formula) per channel} over the first `frames` yuv420p frames;
    {} for a video that is not yuv420p."""
    import av
    from av.video.reformatter import VideoReformatter

    sums = {c: np.zeros(3) for c in video.COLOURS}
    count = 0
    scaler = VideoReformatter()
    with av.open(path) as container:
        for frame in container.decode(video=0):
            if frame.format.name != "yuv420p":
                return {}
            h, w = frame.height, frame.width
            planes = frame.to_ndarray().astype(np.float64)   # [H * 3 / 2, W]: Y, then U and V at quarter size
            y = planes[:h]
            u = planes[h:h + h // 4].reshape(h // 2, w // 2).repeat(2, 0).repeat(2, 1)
            v = planes[h + h // 4:].reshape(h // 2, w // 2).repeat(2, 0).repeat(2, 1)
            y, u, v = (y - 16) * 255 / 219, (u - 128) * 255 / 224, (v - 128) * 255 / 224
            ref = np.clip(np.round(np.stack([y + 1.402 * v, y - 0.344136 * u - 0.714136 * v, y + 1.772 * u], -1)),
                          0, 255)
            for colour in video.COLOURS:
                flags = {"interpolation": video._exact("BILINEAR")} if colour == "exact" else {}
                rgb = scaler.reformat(frame, format="rgb24", **flags).to_ndarray().astype(np.float64)
                sums[colour] += (rgb - ref).mean(axis=(0, 1))
            count += 1
            if count == frames:
                break
    return {c: (s / max(count, 1)).round(3).tolist() for c, s in sums.items()}


def _luma(path: str, frames: int) -> np.ndarray:
    import av

    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="yuv420p")[:f.height].astype(np.float64)
                         for _, f in zip(range(frames), container.decode(video=0))])


def rewrite_bias(path: str, frames: int, work: str) -> dict:
    """{colour: mean (written luma - source luma)} of the first `frames` frames read with each converter and
    written back unchanged at crf 0; {} for a video that is not yuv420p."""
    import av
    from av.video.reformatter import VideoReformatter

    with av.open(path) as container:
        stream = container.streams.video[0]
        if stream.format is None or stream.format.name != "yuv420p":
            return {}
        rate = float(stream.average_rate or 25)
    source, scaler, bias = _luma(path, frames), VideoReformatter(), {}
    for colour in video.COLOURS:
        out = os.path.join(work, f"rewrite-{colour}.mp4")
        flags = {"interpolation": video._exact("BILINEAR")} if colour == "exact" else {}
        with av.open(path) as container, video.VideoWriter(out, rate, crf=0) as writer:
            for _, frame in zip(range(frames), container.decode(video=0)):
                writer.write(scaler.reformat(frame, format="rgb24", **flags).to_ndarray())
        written = _luma(out, frames)
        bias[colour] = round(float((written - source[:len(written)]).mean()), 3)
    return bias


def read_cost(path: str, short_side: int, colour: str, repeats: int = 3) -> float:
    """CPU milliseconds a frame of `read_frames` of the whole video (decode + convert), the best of `repeats`
    reads."""
    spec = PatchSpec(1, 1, 1, short_side=short_side) if short_side else PatchSpec(1, 1, 1)
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        got, _ = video.read_frames(path, spec, colour=colour)
        best = min(best, (time.process_time() - started) / len(got))
    return best * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", default=DEFAULT_VIDEOS)
    parser.add_argument("--frames", type=int, default=48, help="frames of each video for the bias")
    parser.add_argument("--short-side", type=int, default=128, help="the resized read's short side")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args()
    rows = []
    print("| video | ffmpeg: mean - formula (R, G, B) | exact: mean - formula | written back, luma - source's: "
          "ffmpeg / exact | read, native: ms a frame ffmpeg / exact (ratio) | read, short side %d: ffmpeg / exact "
          "(ratio) |" % args.short_side)
    print("|---|---|---|---|---|---|")
    import tempfile
    work = tempfile.TemporaryDirectory(prefix="colour-")   # the written-back copies, removed at the end
    for name in NAMES:
        path = os.path.join(args.videos, name)
        if not os.path.isfile(path):
            print(f"skipped {name}: not found in {args.videos}")
            continue
        bias = formula_bias(path, args.frames)
        rewrite = rewrite_bias(path, args.frames, work.name)
        cost = {(c, s): read_cost(path, s, c) for c in video.COLOURS for s in (0, args.short_side)}
        row = {"video": name, "bias": bias, "rewrite_luma": rewrite,
               "ms_per_frame": {f"{c}@{s or 'native'}": round(v, 3) for (c, s), v in cost.items()}}
        rows.append(row)
        fmt = (lambda b: ", ".join(f"{x:+.2f}" for x in b)) if bias else (lambda b: "")
        cells = []
        for side in (0, args.short_side):
            plain, exact = cost[("ffmpeg", side)], cost[("exact", side)]
            cells.append(f"{plain:.2f} / {exact:.2f} ({exact / plain:.2f}x)")
        written = f"{rewrite['ffmpeg']:+.3f} / {rewrite['exact']:+.3f}" if rewrite else ""
        print(f"| {name} | {fmt(bias.get('ffmpeg')) or 'RGB stream'} | {fmt(bias.get('exact'))} | {written} | "
              f"{cells[0]} | {cells[1]} |")
    work.cleanup()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
