"""Benchmark: segments of one long video, cut from one decode, against converting the whole video.

1. Segments vs whole. One generated H.264 video (`--seconds` long, 25 fps,
   small frames so it is quick) converted twice by `convert()` with one worker:
   as a whole (a CSV with one row), and as `--segments` overlapping segments
   that cover it from start to end (each overlapping the next by 10%), from
   one decode. Goal: whole time / segments time >= 0.8 (segments not much slower;
   they cut and write about 10% more patches). Best of `--repeats` rounds,
   interleaved.
2. Bounded memory. Peak RSS (`ru_maxrss` of a child process that converts the
   segments CSV) for the video and for a 10x longer one (segments spread over it
   the same way). Goal: ratio <= 1.10.

    python benchmarks/segments.py             # about 1 minute on 2 idle cores
    python benchmarks/segments.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PATCH = (8, 32, 32)
SIZE = (64, 96)


def write_long_video(path: str, seconds: float, fps: int = 25) -> str:
    """A moving gradient with noise (so H.264 has work to do), `seconds` long, written frame by frame."""
    from tfrecords_tools.video import VideoWriter

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:SIZE[0], 0:SIZE[1]]
    with VideoWriter(path, fps) as writer:
        for k in range(int(seconds * fps)):
            base = (x * 2 + y + 3 * k) % 256
            frame = np.stack([base, (base + 85) % 256, (255 - base)], -1).astype(np.int16)
            frame += rng.integers(-12, 13, frame.shape, dtype=np.int16)
            writer.write(np.clip(frame, 0, 255).astype(np.uint8))
    return path


def segments_csv(path: str, video: str, seconds: float, count: int) -> str:
    """`count` segments covering [0, seconds], each 10% longer than its step (overlapping the next)."""
    step = seconds / count
    rows = ["path,start,end"]
    for i in range(count):
        start = i * step
        end = min(seconds, start + 1.1 * step)
        rows.append(f"{os.path.basename(video)},{start:.3f},{end:.3f}")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    return path


def convert_once(csv_path: str, out: str) -> dict:
    from tfrecords_tools.convert import ConvertConfig, convert
    from tfrecords_tools.spec import PatchSpec

    cfg = ConvertConfig(src=csv_path, out=out, spec=PatchSpec(*PATCH), overwrite=True)
    cpu = time.process_time()
    start = time.perf_counter()
    m = convert(cfg)
    return {"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu,
            "patches": m["counts"]["patches"], "items": m["counts"]["ok"]}


CHILD = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, sys.argv[3])
    from tfrecords_tools.convert import ConvertConfig, convert
    from tfrecords_tools.spec import PatchSpec
    m = convert(ConvertConfig(src=sys.argv[1], out=sys.argv[2], spec=PatchSpec(*json.loads(sys.argv[4]))))
    print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "patches": m["counts"]["patches"], "ok": m["counts"]["ok"]}))
""")


def peak_rss(csv_path: str, out: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, csv_path, out, REPO, json.dumps(PATCH)],
                          capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=40.0, help="length of the long video")
    parser.add_argument("--segments", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a 10 s video, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.repeats = 10.0, 1
    command = "python benchmarks/segments.py" + (" --quick" if args.quick else "")
    with tempfile.TemporaryDirectory(prefix="stp-bench-segments-") as tmp:
        long = write_long_video(os.path.join(tmp, "long.mp4"), args.seconds)
        whole = os.path.join(tmp, "whole.csv")
        with open(whole, "w") as f:
            f.write("path\nlong.mp4\n")
        segs = segments_csv(os.path.join(tmp, "segments.csv"), long, args.seconds, args.segments)
        best = {"whole": None, "segments": None}
        convert_once(whole, os.path.join(tmp, "warm-up"))  # imports TensorFlow and warms the caches: not timed
        for _ in range(args.repeats):
            for name, csv_path in (("whole", whole), ("segments", segs)):
                r = convert_once(csv_path, os.path.join(tmp, "out-" + name))
                if best[name] is None or r["seconds"] < best[name]["seconds"]:
                    best[name] = r
        ratio = best["whole"]["seconds"] / best["segments"]["seconds"]

        # Memory: the segments CSV of a video and of one 10x longer (same segment layout).
        short_s = args.seconds / 10
        short = write_long_video(os.path.join(tmp, "short.mp4"), short_s)
        short_csv = segments_csv(os.path.join(tmp, "short.csv"), short, short_s, args.segments)
        mem_short = peak_rss(short_csv, os.path.join(tmp, "mem-short"))
        mem_long = peak_rss(segs, os.path.join(tmp, "mem-long"))
        mem_ratio = mem_long["maxrss_kb"] / mem_short["maxrss_kb"]

    frames = int(args.seconds * 25)
    print(f"`{command}` ({frames} frames of {SIZE[0]}x{SIZE[1]}, patch {'x'.join(map(str, PATCH))}, "
          f"{args.segments} segments overlapping by 10%, best of {args.repeats}):\n")
    print("| run | items | patches | seconds | CPU s | ratio | goal |")
    print("|---|---:|---:|---:|---:|---:|---|")
    w, s = best["whole"], best["segments"]
    print(f"| whole video, one decode | {w['items']} | {w['patches']} | {w['seconds']:.2f} | {w['cpu']:.2f} "
          "| 1.00 | |")
    print(f"| {args.segments} segments, one decode | {s['items']} | {s['patches']} | {s['seconds']:.2f} | "
          f"{s['cpu']:.2f} | {ratio:.2f}x | >= 0.8x: {'met' if ratio >= 0.8 else 'NOT met'} |")
    print(f"\nPeak RSS converting {args.segments} segments: {short_s:g} s video "
          f"{mem_short['maxrss_kb'] / 1024:.0f} MB, {args.seconds:g} s video "
          f"{mem_long['maxrss_kb'] / 1024:.0f} MB: ratio {mem_ratio:.3f} "
          f"(goal <= 1.10: {'met' if mem_ratio <= 1.10 else 'NOT met'})")
    return 0 if ratio >= 0.8 and mem_ratio <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
