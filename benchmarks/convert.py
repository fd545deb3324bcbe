"""Benchmark: `stp convert` (tfrecords_tools.convert.convert) against the irreducible decode work.

1. Throughput. Frames/s of the converter with 1 and 2 workers against the
   irreducible work on the same frames: PyAV decode (one thread) + RGB
   conversion + the same resize (same size, same interpolation as
   `FrameStream`, one swscale thread), nothing else. The sample videos are
   linked `--copies` times into a temp folder so that two workers have work
   to share. Goals: 1 worker >= 0.85x irreducible, 2 workers >= 1.7x 1 worker.
   The converter's time is the whole `convert()` call: listing, probing,
   decoding, cutting, encoding, chunk writing, worker start-up (2 workers:
   spawned processes that import TensorFlow), shard assembly with sha256 and
   the manifest. Each figure is the best of `--repeats` rounds, the
   measurements interleaved round by round so that other load on the machine
   hits them alike. Frames per CPU-second (user + system, all processes) are
   printed beside them: on a shared machine they say what the work costs when
   wall-clock figures only say how busy the machine was. One more row: a
   single worker whose decoder and scaler use 2 threads (`decode_threads=2`).
2. Interpolation. The irreducible work with AREA (the default), BILINEAR and
   FAST_BILINEAR.
3. Storage. raw / jpeg (`--quality`) / png, and raw + gzip: bytes per patch,
   write frames/s (1 worker), read speed through tf.data (TFRecordDataset ->
   `parse_patch` for records/s, then `decode_pixels` for patches/s), and the
   PSNR of jpeg against raw.
4. Bounded memory. Peak RSS (`resource.getrusage` in a child process that
   converts one video, 1 worker) for a clip and for the same content 10x
   longer (the clip's decoded frames written 10 times into one H.264 file with
   `tfrecords_tools.video.VideoWriter`; the 1x file is written the same way).
   Goal: ratio <= 1.10.

    python benchmarks/convert.py                 # the full run (about 6 minutes on 2 idle cores)
    python benchmarks/convert.py --quick         # a small run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import stpkeras  # noqa: F401  (first, before TensorFlow loads: it turns TensorFlow's oneDNN CPU kernels on)

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VIDEOS = os.path.join(os.path.dirname(REPO), "shared", "data", "videos")
INTERPOLATIONS = ("AREA", "BILINEAR", "FAST_BILINEAR")


def sample_videos(folder: str) -> list:
    from tfrecords_tools.sources import VIDEO_EXTENSIONS

    if not os.path.isdir(folder):
        raise SystemExit(f"{folder}: no such folder. Pass --videos DIR (a folder of videos).")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(VIDEO_EXTENSIONS))
    if not names:
        raise SystemExit(f"{folder}: holds no videos ({', '.join(VIDEO_EXTENSIONS)}).")
    return [os.path.join(folder, n) for n in names]


def link_copies(videos: list, copies: int, folder: str) -> str:
    """A flat folder holding every video `copies` times (symlinks; a copy where links are refused)."""
    os.makedirs(folder, exist_ok=True)
    for c in range(copies):
        for v in videos:
            dst = os.path.join(folder, f"c{c:02d}_{os.path.basename(v)}")
            try:
                os.symlink(v, dst)
            except OSError:
                shutil.copyfile(v, dst)
    return folder


# ---------------------------------------------------------------------------------------------
# The irreducible work


def decode_resize(path: str, spec, interpolation: str = "AREA") -> int:
    """Decodes every frame (one thread), converts it to RGB uint8 at `spec`'s frame size; returns the count."""
    import av
    from av.video.reformatter import VideoReformatter

    container = av.open(path, metadata_errors="ignore")
    try:
        stream = container.streams.video[0]
        stream.thread_count = 1
        height, width = spec.frame_size(stream.codec_context.height, stream.codec_context.width)
        scaler = VideoReformatter()  # one scaler, one thread: the cheapest way PyAV offers
        n = 0
        for frame in container.decode(stream):
            size = {} if (frame.width, frame.height) == (width, height) else {
                "width": width, "height": height, "interpolation": interpolation}
            scaler.reformat(frame, format="rgb24", threads=1, **size).to_ndarray()
            n += 1
        return n
    finally:
        container.close()


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (pool workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_irreducible(paths: list, spec, interpolation: str = "AREA"):
    start, cpu = time.perf_counter(), cpu_seconds()
    frames = sum(decode_resize(p, spec, interpolation) for p in paths)
    return frames, time.perf_counter() - start, cpu_seconds() - cpu


# ---------------------------------------------------------------------------------------------
# The converter


def run_convert(src: str, out: str, spec, workers: int, encoding: str = "raw", compression: str = "none",
                quality: int = 90, decode_threads: int = 1):
    """Runs `convert` into a fresh `out`; returns (manifest, seconds, CPU seconds of all its processes)."""
    from tfrecords_tools.convert import ConvertConfig, convert

    shutil.rmtree(out, ignore_errors=True)
    cfg = ConvertConfig(src, out, spec, encoding=encoding, compression=compression, quality=quality,
                        workers=workers, decode_threads=decode_threads, command="benchmarks/convert.py")
    start, cpu = time.perf_counter(), cpu_seconds()
    last = [start]

    def on_progress(progress, result):
        last[0] = time.perf_counter()

    manifest = convert(cfg, on_progress=on_progress)
    end, cpu = time.perf_counter(), cpu_seconds() - cpu
    if manifest["counts"]["failed"]:
        bad = [v for v in manifest["videos"] if v["status"] != "ok"]
        raise SystemExit(f"conversion failed for {bad}")
    # The time after the last video is done: shard assembly (copy + sha256), manifest, clean-up.
    manifest["_tail_seconds"] = end - last[0]
    return manifest, end - start, cpu


def converted_frames(manifest: dict) -> int:
    return sum(v.get("frames", 0) for v in manifest["videos"] if v["status"] == "ok")


def shard_paths(out: str, manifest: dict) -> list:
    return [os.path.join(out, s["file"]) for split in manifest["splits"].values() for s in split["shards"]]


def throughput(src: str, paths: list, spec, work: str, repeats: int, threads: bool = False) -> dict:
    """Irreducible, 1 worker, 2 workers (and, with `threads`, 1 worker decoding and scaling with 2 threads)."""
    runs = [(1, 1), (2, 1)] + ([(1, 2)] if threads else [])
    best = {"irreducible": math.inf, **{_run_key(w, d): math.inf for w, d in runs}}
    best_cpu = dict(best)
    tail = dict(best)
    frames = {}
    for _ in range(repeats):
        n, seconds, cpu = time_irreducible(paths, spec)
        frames["irreducible"], best["irreducible"] = n, min(best["irreducible"], seconds)
        best_cpu["irreducible"] = min(best_cpu["irreducible"], cpu)
        for workers, decode_threads in runs:
            key = _run_key(workers, decode_threads)
            out = os.path.join(work, f"out-w{workers}-d{decode_threads}")
            manifest, seconds, cpu = run_convert(src, out, spec, workers, decode_threads=decode_threads)
            if seconds < best[key]:
                tail[key] = manifest["_tail_seconds"]
            frames[key], best[key] = converted_frames(manifest), min(best[key], seconds)
            best_cpu[key] = min(best_cpu[key], cpu)
            shas = [s["sha256"] for s in manifest["splits"]["train"]["shards"]]
            frames.setdefault("sha256", {})[key] = shas
    if frames["workers=1"] != frames["irreducible"]:
        print(f"note: the converter reports {frames['workers=1']} frames, the irreducible pass decoded "
              f"{frames['irreducible']}", file=sys.stderr)
    if threads:
        same = frames["sha256"][_run_key(1, 2)] == frames["sha256"]["workers=1"]
        frames.setdefault("notes", []).append(f"decode threads 2 gives the same shards: {same}")
    fps = {k: frames[k] / best[k] for k in best}
    # Frames per CPU second (all processes): what the work costs, whatever else runs on the machine.
    cpu_fps = {k: frames[k] / best_cpu[k] for k in best_cpu}
    # Without the serial tail (assembly): how the per-video work itself scales.
    phase = {k: best[k] - tail[k] for k in best if k != "irreducible"}
    return {"frames": frames["irreducible"], "seconds": best, "fps": fps, "cpu_seconds": best_cpu,
            "tail_seconds": {k: tail[k] for k in phase}, "ratio_2w_videos": phase["workers=1"] / phase["workers=2"],
            "cpu_fps": cpu_fps, "cpu_ratio_1w": cpu_fps["workers=1"] / cpu_fps["irreducible"],
            "ratio_1w": fps["workers=1"] / fps["irreducible"],
            "ratio_2w": fps["workers=2"] / fps["workers=1"],
            "same_shards_1w_2w": frames["sha256"]["workers=1"] == frames["sha256"]["workers=2"],
            "notes": frames.get("notes", [])}


def _run_key(workers: int, decode_threads: int) -> str:
    return f"workers={workers}" + (f",threads={decode_threads}" if decode_threads > 1 else "")


def worker_startup(repeats: int) -> float:
    """Seconds (wall) a fresh Python process takes to import what a conversion worker needs."""
    best = math.inf
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import tfrecords_tools.convert"], check=True, env=env, cwd=REPO,
                       capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def interpolation_costs(paths: list, spec, repeats: int) -> dict:
    best = {name: math.inf for name in INTERPOLATIONS}
    per_video = {name: {} for name in INTERPOLATIONS}
    frames = 0
    for _ in range(repeats):
        for name in INTERPOLATIONS:
            total = 0.0
            frames = 0
            for p in paths:
                start = time.perf_counter()
                n = decode_resize(p, spec, name)
                seconds = time.perf_counter() - start
                total += seconds
                frames += n
                key = os.path.basename(p)
                per_video[name][key] = max(per_video[name].get(key, 0.0), n / seconds)
            best[name] = min(best[name], total)
    return {"frames": frames, "fps": {k: frames / v for k, v in best.items()}, "per_video": per_video}


# ---------------------------------------------------------------------------------------------
# Storage


def read_speed(files: list, encoding: str, compression: str, shape, decode: bool, repeats: int = 2) -> float:
    """Records (or decoded patches) per second through tf.data, best of `repeats` passes."""
    import tensorflow as tf

    from tfrecords_tools.schema import PATCH, decode_pixels, parse_patch

    kind = {"none": "", "gzip": "GZIP", "zlib": "ZLIB"}[compression]
    ds = tf.data.TFRecordDataset(files, compression_type=kind)
    ds = ds.map(lambda s: parse_patch(s, encoding), num_parallel_calls=tf.data.AUTOTUNE)
    if decode:
        ds = ds.map(lambda f: decode_pixels(f[PATCH], encoding, shape), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda f: f[PATCH], num_parallel_calls=tf.data.AUTOTUNE)
    best = math.inf
    n = 0
    for _ in range(repeats):
        start = time.perf_counter()
        n = 0
        for _ in ds:
            n += 1
        best = min(best, time.perf_counter() - start)
    return n / best


def psnr_against(raw_files: list, jpeg_files: list, shape) -> dict:
    """PSNR (dB) of jpeg patches against the raw ones (same records, same order), per video and overall."""
    import tensorflow as tf

    from tfrecords_tools.schema import PATCH, VIDEO_ID, decode_pixels, parse_patch

    def pixels(files, encoding):
        ds = tf.data.TFRecordDataset(files).map(lambda s: parse_patch(s, encoding))
        return ds.map(lambda f: (f[VIDEO_ID], decode_pixels(f[PATCH], encoding, shape)))

    sums = {}
    for (vid, a), (vid2, b) in zip(pixels(raw_files, "raw"), pixels(jpeg_files, "jpeg")):
        if vid.numpy() != vid2.numpy():
            raise SystemExit("raw and jpeg shards hold records in a different order")
        err = (a.numpy().astype(np.float64) - b.numpy().astype(np.float64)) ** 2
        s = sums.setdefault(vid.numpy().decode(), [0.0, 0])
        s[0] += float(err.sum())
        s[1] += err.size

    def db(total, count):
        mse = total / count
        return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)

    out = {k: db(*v) for k, v in sorted(sums.items())}
    out["all"] = db(sum(v[0] for v in sums.values()), sum(v[1] for v in sums.values()))
    return out


def storage(src: str, spec, work: str, quality: int, repeats: int) -> dict:
    rows = {}
    files = {}
    for encoding, compression in (("raw", "none"), ("raw", "gzip"), ("jpeg", "none"), ("png", "none")):
        name = encoding if compression == "none" else f"{encoding}+{compression}"
        out = os.path.join(work, f"store-{name}")
        seconds = math.inf
        for _ in range(repeats):
            manifest, took, _ = run_convert(src, out, spec, 1, encoding, compression, quality)
            seconds = min(seconds, took)
        paths = shard_paths(out, manifest)
        patches = manifest["counts"]["patches"]
        size = sum(s["bytes"] for split in manifest["splits"].values() for s in split["shards"])
        rows[name] = {
            "bytes_per_patch": size / patches, "patches": patches,
            "write_fps": converted_frames(manifest) / seconds,
            "read_records_s": read_speed(paths, encoding, compression, spec.shape, decode=False),
            "read_patches_s": read_speed(paths, encoding, compression, spec.shape, decode=True),
        }
        files[name] = paths
    rows["raw"]["psnr_db"] = float("inf")
    rows["jpeg"]["psnr"] = psnr_against(files["raw"], files["jpeg"], spec.shape)
    rows["jpeg"]["psnr_db"] = rows["jpeg"]["psnr"]["all"]
    return rows


# ---------------------------------------------------------------------------------------------
# Bounded memory


_CHILD = textwrap.dedent("""
    import json, resource, sys
    from tfrecords_tools.convert import ConvertConfig, convert
    from tfrecords_tools.spec import PatchSpec

    def rss_kb():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    src, out, spec = sys.argv[1], sys.argv[2], PatchSpec.from_json(sys.argv[3])
    before = rss_kb()  # TensorFlow, PyAV and numpy imported, nothing converted yet
    manifest = convert(ConvertConfig(src, out, spec, workers=1))
    print(json.dumps({"before_kb": before, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "frames": sum(v.get("frames", 0) for v in manifest["videos"]),
                      "patches": manifest["counts"]["patches"], "failed": manifest["counts"]["failed"]}))
""")


def write_repeated(src: str, dst: str, times: int, max_frames: int = 0) -> None:
    """Writes the decoded frames of `src` `times` over into one H.264 file (streamed, one frame at a time)."""
    import av

    from tfrecords_tools.video import VideoWriter

    with av.open(src) as probe:
        stream = probe.streams.video[0]
        rate = float(stream.average_rate or 25)
    with VideoWriter(dst, rate) as writer:
        for _ in range(times):
            with av.open(src) as container:
                for i, frame in enumerate(container.decode(video=0)):
                    if max_frames and i >= max_frames:
                        break
                    writer.write(frame.to_ndarray(format="rgb24"))


def peak_memory(video: str, spec, work: str, longer: int, max_frames: int) -> dict:
    result = {}
    for times in (1, longer):
        folder = os.path.join(work, f"memory-{times}x")
        os.makedirs(folder, exist_ok=True)
        write_repeated(video, os.path.join(folder, f"clip-{times}x.mp4"), times, max_frames)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        proc = subprocess.run([sys.executable, "-c", _CHILD, folder, os.path.join(work, f"memory-out-{times}x"),
                               spec.to_json()], capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"memory child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        if data["failed"]:
            raise SystemExit(f"memory child: the {times}x video failed to convert")
        result[f"{times}x"] = data
    short, long_ = result["1x"], result[f"{longer}x"]
    result["ratio"] = long_["peak_kb"] / short["peak_kb"]
    result["growth_mb"] = (long_["peak_kb"] - short["peak_kb"]) / 1024
    return result


# ---------------------------------------------------------------------------------------------
# Report


def markdown(report: dict) -> str:
    t = report["throughput"]
    spec = report["spec"]
    lines = [f"Converter throughput ({report['videos']} videos, {t['frames']} frames, {spec}; "
             f"{report['cpus']} CPU cores; best of {report['repeats']}):", "",
             "| run | frames/s | ratio | goal | frames per CPU-second |", "|---|---:|---:|---|---:|",
             f"| irreducible: PyAV decode + RGB + resize, 1 thread | {t['fps']['irreducible']:.0f} | 1.00 | "
             f"| {t['cpu_fps']['irreducible']:.0f} |",
             f"| `stp convert --workers 1` | {t['fps']['workers=1']:.0f} | {t['ratio_1w']:.2f}x irreducible "
             f"| >= 0.85x {'(met)' if t['ratio_1w'] >= 0.85 else '(missed)'} | {t['cpu_fps']['workers=1']:.0f} "
             f"({t['cpu_ratio_1w']:.2f}x) |",
             f"| `stp convert --workers 2` | {t['fps']['workers=2']:.0f} | {t['ratio_2w']:.2f}x 1 worker "
             f"| >= 1.7x {'(met)' if t['ratio_2w'] >= 1.7 else '(missed)'} | {t['cpu_fps']['workers=2']:.0f} |"]
    if "workers=1,threads=2" in t["fps"]:
        k = "workers=1,threads=2"
        lines.append(f"| `--workers 1`, decode + scale with 2 threads (`decode_threads=2`) | {t['fps'][k]:.0f} | "
                     f"{t['fps'][k] / t['fps']['workers=1']:.2f}x 1 worker | | {t['cpu_fps'][k]:.0f} |")
    lines_after = [f"Fixed costs that 2 workers do not divide: a spawned worker needs {report['startup']:.1f} s "
                   "(wall) to import what it needs (no TensorFlow for raw records) before its first video "
                   "(this process converts meanwhile), and "
                   f"after the last video this process assembles the shards ({t['tail_seconds']['workers=2']:.2f} s: "
                   "copy + sha256, manifest). Until the last video is done, 2 workers run "
                   f"{t['ratio_2w_videos']:.2f}x as fast as 1."]
    for extra in report.get("more_throughput", []):
        e = extra["throughput"]
        lines += [f"| same, {extra['spec']}: irreducible / 1 worker / 2 workers | {e['fps']['irreducible']:.0f} / "
                  f"{e['fps']['workers=1']:.0f} / {e['fps']['workers=2']:.0f} | {e['ratio_1w']:.2f}x / "
                  f"{e['ratio_2w']:.2f}x | | {e['cpu_fps']['irreducible']:.0f} / {e['cpu_fps']['workers=1']:.0f} "
                  f"({e['cpu_ratio_1w']:.2f}x) / {e['cpu_fps']['workers=2']:.0f} |"]
    lines += ["", *lines_after]
    if "interpolation" not in report:  # --throughput-only
        return "\n".join(lines)
    i = report["interpolation"]
    base = i["fps"]["AREA"]
    lines += ["", "Resize interpolation (irreducible work, frames/s):", "",
              "| interpolation | frames/s | vs AREA |", "|---|---:|---:|"]
    lines += [f"| {name}{' (default)' if name == 'AREA' else ''} | {fps:.0f} | {fps / base:.2f}x |"
              for name, fps in i["fps"].items()]
    s = report["storage"]
    lines += ["", f"Storage ({spec}; sample videos once; read through tf.data with AUTOTUNE maps):", "",
              "| encoding | bytes/patch | vs raw | write frames/s | read records/s | read+decode patches/s "
              "| PSNR vs raw |", "|---|---:|---:|---:|---:|---:|---:|"]
    raw = s["raw"]["bytes_per_patch"]
    for name, row in s.items():
        psnr = row.get("psnr_db")
        psnr_text = "lossless" if psnr is None or math.isinf(psnr) else f"{psnr:.1f} dB"
        if name.startswith("png") or name.startswith("raw"):
            psnr_text = "lossless"
        lines.append(f"| {name} | {row['bytes_per_patch'] / 1e3:,.1f} kB | {row['bytes_per_patch'] / raw:.2f} "
                     f"| {row['write_fps']:.0f} | {row['read_records_s']:.0f} | {row['read_patches_s']:.0f} "
                     f"| {psnr_text} |")
    m = report["memory"]
    longer = report["memory_longer"]
    lines += ["", "Bounded memory (peak RSS of a child converting one video, 1 worker):", "",
              "| video | frames | RSS after imports | peak RSS |", "|---|---:|---:|---:|"]
    for key in ("1x", f"{longer}x"):
        lines.append(f"| {report['memory_video']} x{key[:-1]} | {m[key]['frames']} | "
                     f"{m[key]['before_kb'] / 1024:.0f} MB | {m[key]['peak_kb'] / 1024:.0f} MB |")
    lines += ["", f"Peak RSS {longer}x longer / 1x: **{m['ratio']:.3f}** (goal <= 1.10), "
                  f"{m['growth_mb']:+.1f} MB."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", default=DEFAULT_VIDEOS, help="folder of sample videos (default: %(default)s)")
    parser.add_argument("--copies", type=int, default=16,
                        help="times each video is linked for the throughput run (enough work to amortize the "
                             "2-worker start-up)")
    parser.add_argument("--patch", default="16x112x112", help="TxHxW of the main spec")
    parser.add_argument("--also-patch", default="8x64x64", help="a second spec for throughput ('' for none)")
    parser.add_argument("--short-side", type=int, default=128, help="resize frames to this short side")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--pixels", default="rgb", choices=["rgb", "yuv440"], help="the records' pixel format")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per throughput figure (best is kept)")
    parser.add_argument("--memory-video", default="bikes.mp4", help="video (in --videos) for the memory test")
    parser.add_argument("--longer", type=int, default=10, help="how many times longer the long video is")
    parser.add_argument("--memory-frames", type=int, default=0, help="use only the first N frames (0: all)")
    parser.add_argument("--quick", action="store_true", help="a small run: 2 copies, 1 repeat, one spec, "
                                                             "a 60-frame clip for memory")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp folder, removed after)")
    parser.add_argument("--json", action="store_true", help="also print the whole report as JSON")
    parser.add_argument("--throughput-only", action="store_true",
                        help="only the throughput table (e.g. to compare --pixels formats)")
    args = parser.parse_args(argv)
    if args.quick:
        args.copies, args.repeats, args.also_patch = 2, 1, ""
        args.memory_frames = args.memory_frames or 60

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tfrecords_tools.spec import PatchSpec

    videos = sample_videos(args.videos)
    work = args.work or tempfile.mkdtemp(prefix="stp-bench-convert-")
    os.makedirs(work, exist_ok=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    try:
        import tensorflow  # noqa: F401  (imported once here, outside every timed section)

        spec = PatchSpec.from_strings(args.patch, short_side=args.short_side, pixels=args.pixels)
        src = link_copies(videos, args.copies, os.path.join(work, "videos"))
        paths = [os.path.join(src, n) for n in sorted(os.listdir(src))]
        report = {"spec": f"patch {args.patch}, short side {args.short_side}, pixels {args.pixels}",
                  "videos": len(paths), "cpus": os.cpu_count(), "repeats": args.repeats}
        print(f"throughput: {len(paths)} videos, {report['spec']} ...", file=sys.stderr, flush=True)
        report["throughput"] = throughput(src, paths, spec, work, args.repeats, threads=True)
        report["more_throughput"] = []
        if args.also_patch:
            other = PatchSpec.from_strings(args.also_patch, short_side=args.short_side, pixels=args.pixels)
            print(f"throughput: patch {args.also_patch} ...", file=sys.stderr, flush=True)
            report["more_throughput"].append({"spec": f"patch {args.also_patch}",
                                              "throughput": throughput(src, paths, other, work, args.repeats)})
        report["startup"] = worker_startup(args.repeats)
        if not args.throughput_only:
            print("interpolation ...", file=sys.stderr, flush=True)
            report["interpolation"] = interpolation_costs(videos, spec, args.repeats)
            print("storage ...", file=sys.stderr, flush=True)
            once = link_copies(videos, 1, os.path.join(work, "videos-once"))
            report["storage"] = storage(once, spec, work, args.quality, args.repeats)
            print("memory ...", file=sys.stderr, flush=True)
            report["memory_video"] = args.memory_video
            report["memory_longer"] = args.longer
            report["memory"] = peak_memory(os.path.join(args.videos, args.memory_video), spec, work, args.longer,
                                           args.memory_frames)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    report["load_average"] = {"before": load_before, "after": os.getloadavg()}
    report["seconds"] = time.perf_counter() - started
    report["command"] = "python benchmarks/convert.py " + " ".join(sys.argv[1:] if argv is None else argv)

    if args.json:
        print(json.dumps(report, indent=1, default=float))
    t = report["throughput"]
    print(f"\nshards identical with 1 and 2 workers: {t['same_shards_1w_2w']}; " + "; ".join(t["notes"]))
    if "interpolation" in report:
        print("per-video irreducible frames/s by interpolation:")
        for name, per in report["interpolation"]["per_video"].items():
            print(f"  {name:14s} " + "  ".join(f"{k} {v:.0f}" for k, v in per.items()))
        print("jpeg PSNR per video: " + ", ".join(f"{k} {v:.1f} dB"
                                                  for k, v in report["storage"]["jpeg"]["psnr"].items()))
    print(f"load average (1 min) before / after: {load_before[0]:.2f} / {report['load_average']['after'][0]:.2f} "
          f"on {os.cpu_count()} cores; the run took {report['seconds']:.0f} s")
    if max(load_before[0], report["load_average"]["after"][0]) > 0.5 * (os.cpu_count() or 1):
        print("WARNING: other processes were using the CPUs: the 2-worker figures (and the rest, less so) "
              "are lower than on an idle machine.")
    print()
    print(markdown(report))
    print(f"\nMade with: `{report['command'].strip()}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
