"""Benchmark: the distributed engines against their one-machine counterparts, on the same work.

  1. Conversion, frames/s: the local converter (`stp convert`, 1 and 2 worker processes) vs the same
     conversion as a Beam pipeline on the DirectRunner (in-process, and 2 worker processes), on copies
     of the sample videos. The Beam shards are checked to be byte-identical to the local ones.
  2. Input, clips/s at the trainer: `make_dataset` in the trainer's process (all cores, and one tf.data
     thread: the per-core figure) vs the tf.data service (`make_service_dataset`, what
     `stp train --data-service` reads) with 1 and 2 worker processes, on the records converted in 1.

Every configuration is measured `--rounds` times, the rounds interleaved, so that a ratio is taken
between measurements a few seconds apart (other jobs share the machine); the table gives the median
and the range over rounds. Frames/s counts the decoded frames of the videos (the manifest's `frames`)
over the wall time of the whole run, start-up included: what a user waits for.

Both the local and the Beam runs need apache-beam, so run it in the Beam environment:

  TF_CPP_MIN_LOG_LEVEL=2 /work/venv-beam/bin/python benchmarks/distributed.py [--videos DIR] \\
      [--copies 2] [--seconds 8] [--rounds 2]

On a machine with few cores (the development box has 2, shared) the service cannot beat the
in-process pipeline: its workers and the trainer share the same cores, so what it shows is its
overhead (graph shipping, gRPC, one more copy of each batch); its gain needs CPUs the trainer lacks.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import stpkeras  # noqa: F401  (first, before TensorFlow loads: it turns TensorFlow's oneDNN CPU kernels on)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_VIDEOS = os.path.join(HERE, "..", "..", "shared", "data", "videos")
FILES = ("bikes.mp4", "bigbuckbunny.mp4", "Megamind_bugy.avi")
BATCH = 32


def spec():
    from tfrecords_tools.spec import PatchSpec
    return PatchSpec(16, 112, 112, stride_frames=8, short_side=224)


def make_source(videos: str, work: str, copies: int) -> str:
    """`copies` links to each sample video, one class folder per video (a file is one work item)."""
    src = os.path.join(work, "src")
    for i, name in enumerate(FILES):
        os.makedirs(os.path.join(src, f"class{i}"), exist_ok=True)
        stem, ext = os.path.splitext(name)
        for k in range(copies):
            os.symlink(os.path.abspath(os.path.join(videos, name)), os.path.join(src, f"class{i}", f"{stem}-{k}{ext}"))
    return src


# --- 1. conversion ------------------------------------------------------------------------------

def run_convert(src: str, out: str, runner: str, workers: int) -> tuple:
    """(seconds, frames decoded, sha256 of each shard) of one conversion into a fresh `out`."""
    from tfrecords_tools.convert import ConvertConfig, convert
    shutil.rmtree(out, ignore_errors=True)
    cfg = ConvertConfig(src=src, out=out, spec=spec(), workers=workers if runner == "local" else 1,
                        shard_size_mb=64)
    started = time.perf_counter()
    if runner == "local":
        manifest = convert(cfg)
    else:
        from tfrecords_tools.beam import convert_beam
        options = ["--runner=DirectRunner", f"--direct_num_workers={workers}"]
        if workers > 1:
            options.append("--direct_running_mode=multi_processing")
        manifest = convert_beam(cfg, options)
    seconds = time.perf_counter() - started
    frames = sum(v["frames"] for v in manifest["videos"] if v["status"] == "ok")
    shards = sorted(e["sha256"] for split in manifest["splits"].values() for e in split["shards"])
    return seconds, frames, shards


# --- 2. input -----------------------------------------------------------------------------------

def clips_per_second(ds, seconds: float) -> float:
    """Clips/s the trainer receives from `ds` (batches of `(patch, label)`), after two warm-up batches."""
    it = iter(ds)
    for _ in range(2):
        next(it)
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        n += int(next(it)[1].shape[0])
    return n / (time.perf_counter() - started)


def in_process(root: str, seconds: float, threads: int = 0) -> float:
    import tensorflow as tf

    from stpkeras.pipeline import make_dataset
    ds = make_dataset(root, "all", batch_size=BATCH, training=True, augment="flip", repeat=True, seed=0)
    if threads:
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        ds = ds.with_options(options)
    return clips_per_second(ds, seconds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def through_service(root: str, seconds: float, workers: int) -> float:
    """A dispatcher in this process, `workers` worker processes (`stp data-service worker`) on 127.0.0.1."""
    from stpkeras import pipeline
    from stpkeras.data_service import make_service_dataset, start_dispatcher
    dispatcher = start_dispatcher(free_port())
    address = dispatcher.target
    procs = [subprocess.Popen([sys.executable, "-m", "stpkeras.cli", "data-service", "worker", "--dispatcher",
                               address[len("grpc://"):], "--port", str(free_port()), "--host", "127.0.0.1"],
                              stderr=subprocess.DEVNULL)
             for _ in range(workers)]
    try:
        # Wait until every worker has registered, so the figure is for `workers` of them.
        deadline = time.time() + 120
        while dispatcher._num_workers() < workers:
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"{workers} tf.data service worker(s) did not register with {address}")
            time.sleep(0.2)
        ds = make_service_dataset(pipeline.load_info(root), "all", address, batch_size=BATCH, augment=("flip",),
                                  seed=0).repeat()
        return clips_per_second(ds, seconds)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        dispatcher._stop()


# --- report -------------------------------------------------------------------------------------

def summary(values):
    return statistics.median(values), min(values), max(values)


def table(title: str, unit: str, results: dict, base: str) -> str:
    base_median = statistics.median(results[base])
    lines = [f"| {title} | {unit} (median) | range over rounds | vs {base} |", "|---|---:|---:|---:|"]
    for name, values in results.items():
        med, lo, hi = summary(values)
        lines.append(f"| {name} | {med:,.1f} | {lo:,.1f} - {hi:,.1f} | {med / base_median:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", default=DEFAULT_VIDEOS, help="folder with the sample videos")
    parser.add_argument("--copies", type=int, default=2, help="copies of each sample video to convert")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per input measurement")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per configuration")
    parser.add_argument("--part", choices=("all", "convert", "input"), default="all")
    args = parser.parse_args(argv)
    missing = [f for f in FILES if not os.path.exists(os.path.join(args.videos, f))]
    if missing:
        sys.exit(f"--videos {args.videos}: missing {', '.join(missing)}")
    work = tempfile.mkdtemp(prefix="stp-bench-distributed-")
    command = "TF_CPP_MIN_LOG_LEVEL=2 " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    out = [f"Command: `{command}`", f"CPU cores visible: {os.cpu_count()}"]
    try:
        src = make_source(args.videos, work, args.copies)
        data = os.path.join(work, "local-1")
        if args.part in ("all", "convert"):
            configs = [("local converter, 1 process", "local", 1), ("local converter, 2 processes", "local", 2),
                       ("Beam DirectRunner, in-process", "beam", 1),
                       ("Beam DirectRunner, 2 processes", "beam", 2)]
            results = {name: [] for name, _, _ in configs}
            shards, frames = {}, None
            for r in range(args.rounds):
                for name, runner, workers in configs:
                    seconds, frames, shards[name] = run_convert(
                        src, os.path.join(work, f"{runner}-{workers}"), runner, workers)
                    results[name].append(frames / seconds)
                    print(f"round {r + 1}: {name}: {frames} frames in {seconds:.1f} s", file=sys.stderr, flush=True)
            same = all(s == shards[configs[0][0]] for s in shards.values())
            out += ["", f"Conversion of {args.copies} copies of {', '.join(FILES)} ({frames} frames, "
                        f"{spec().frames}x{spec().height}x{spec().width} raw patches, short side "
                        f"{spec().short_side}); shards byte-identical across runners: {same}", "",
                    table("conversion", "frames/s", results, configs[0][0])]
        elif not os.path.exists(data):
            run_convert(src, data, "local", 2)
        if args.part in ("all", "input"):
            from stpkeras.pipeline import load_info
            clips = load_info(data).num_records("all")
            configs = [("make_dataset in-process, all cores", lambda: in_process(data, args.seconds)),
                       ("make_dataset in-process, 1 tf.data thread", lambda: in_process(data, args.seconds, 1)),
                       ("tf.data service, 1 worker", lambda: through_service(data, args.seconds, 1)),
                       ("tf.data service, 2 workers", lambda: through_service(data, args.seconds, 2))]
            results = {name: [] for name, _ in configs}
            for r in range(args.rounds):
                for name, measure in configs:
                    results[name].append(measure())
                    print(f"round {r + 1}: {name}: {results[name][-1]:.1f} clips/s", file=sys.stderr, flush=True)
            out += ["", f"Input: {clips} raw clips of {spec().frames}x{spec().height}x{spec().width}, batch {BATCH}, "
                        f"flip + shuffle, {args.seconds:g} s per measurement, dispatcher and workers on 127.0.0.1",
                    "", table("input", "clips/s", results, configs[0][0])]
        print("\n".join(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
