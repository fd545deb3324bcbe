"""Benchmark: is the input pipeline ever the bottleneck of training? Steps/s of `Model.fit` fed by `make_dataset`
vs the same batches cached in memory, in one run.

On records converted (by the real converter) from the sample videos (16x112x112 clips, raw), `stcnn` (the
default widths) is trained with `fit`, batch 32, in two ways:

  streamed: `make_dataset(training=True, augment=..., repeat=True)`, reading, shuffling, decoding and
            augmenting while the model trains (the threads share the CPU cores with the model);
  cached:   the same number of batches taken from the same pipeline beforehand and held in memory
            (`Dataset.cache()` filled once), so feeding a step costs nothing.

The goal is streamed / cached >= 0.95 (input never the bottleneck). Rounds alternate streamed and cached
fits of `--steps` steps on the same model (compiled and traced once), and the ratio is taken per round,
between measurements seconds apart, because other jobs share the machine; the CPU time per step (model
and input together) shows the input's share of the work, which other jobs disturb less. Each fit starts a new iterator
of its dataset; its first two steps are not timed.

Run: TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/train_input.py [--videos DIR] [--steps 6] [--rounds 5]
     [--augment crop,color] [--pixels rgb|yuv440]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from typing import Tuple

import stpkeras  # noqa: F401  (first, before TensorFlow loads: it turns TensorFlow's oneDNN CPU kernels on)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import pipeline as pipeline_bench  # noqa: E402  (benchmarks/pipeline.py: the converted sample videos)

BATCH = pipeline_bench.BATCH


def benchmark_config(data: str, out: str, task: str, model: str, model_options, batch_size: int, seed: int,
                     accelerator: bool = False, **overrides):
    """The `TrainConfig` of a benchmark's training run, as `stp train` would make it: quiet, seeded, mixed
    precision and XLA on an accelerator (`gpu.py`, `label_efficiency.py`); `overrides` are other fields."""
    from stpkeras.setup import TrainConfig

    settings = dict(task=task, model=model, model_options=tuple(dict(model_options).items()), batch_size=batch_size,
                    seed=seed, verbose=0, mixed_precision=accelerator, jit=accelerator)
    settings.update(overrides)
    return TrainConfig(data=data, out=out, **settings)


def fit_steps_per_second(model, dataset, steps: int, skip: int = 2) -> Tuple[float, float]:
    """Steps/s of `fit` over `steps` steps, after `skip` steps that absorb the start of the dataset's iterator
    (each `fit` call starts a new one: the shuffle buffer refills), and the CPU seconds per step of the
    process meanwhile (model and input together)."""
    import keras

    times = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch in (skip - 1, skip + steps - 1):
                times.append((time.perf_counter(), time.process_time()))

    model.fit(dataset, steps_per_epoch=skip + steps, epochs=1, verbose=0, callbacks=[Clock()])
    (wall0, cpu0), (wall1, cpu1) = times
    return steps / (wall1 - wall0), (cpu1 - cpu0) / steps


def main() -> int:
    if "--default-malloc" not in sys.argv:
        from stpkeras.allocator import one_malloc_arena
        one_malloc_arena()  # as `stp train` does, before TensorFlow starts threads
    from stpkeras import augment as augment_lib

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", default=pipeline_bench.DEFAULT_VIDEOS)
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per fit and round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating streamed/cached fits")
    parser.add_argument("--augment", default=",".join(augment_lib.DEFAULT_AUGMENT),
                        help="make_dataset's augment (default: the default of `stp train`)")
    parser.add_argument("--model", default="stcnn")
    parser.add_argument("--pixels", default="rgb", choices=["rgb", "yuv440"], help="records' pixel format")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default malloc arenas (default: one arena, as `stp train` runs)")
    args = parser.parse_args()
    if not all(os.path.exists(os.path.join(args.videos, f)) for f in pipeline_bench.FILES):
        print(f"sample videos {pipeline_bench.FILES} not found in {args.videos}", file=sys.stderr)
        return 2
    import keras
    import tensorflow as tf

    from stpkeras.models import build_model
    from stpkeras.pipeline import load_info, make_dataset

    command = " ".join(["TF_CPP_MIN_LOG_LEVEL=2", "python", "benchmarks/train_input.py",
                        *map(shlex.quote, sys.argv[1:])])
    work = tempfile.mkdtemp(prefix="stp-bench-train-")
    try:
        raw = pipeline_bench.convert_samples(args.videos, work, "raw", pixels=args.pixels)
        info = load_info(raw)
        keras.utils.set_random_seed(0)
        model = build_model(args.model, info.spec, info.num_classes)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

        def streamed():
            return make_dataset(info, "all", batch_size=BATCH, training=True, augment=args.augment, seed=0,
                                repeat=True)

        # The same batches, in memory: `steps` batches of the pipeline, cached on a first pass.
        cached = streamed().take(args.steps).cache()
        for _ in cached:
            pass
        cached = cached.repeat()
        stream = streamed()
        for ds in (stream, cached):  # warm up: trace the train step, fill the pipeline's buffers
            model.fit(ds, steps_per_epoch=2, epochs=1, verbose=0)

        rates = {"streamed": [], "cached": []}
        cpu = {"streamed": [], "cached": []}
        for _ in range(args.rounds):
            for name, ds in (("streamed", stream), ("cached", cached)):
                rate, cpu_s = fit_steps_per_second(model, ds, args.steps)
                rates[name].append(rate)
                cpu[name].append(cpu_s)
        ratio = [a / b for a, b in zip(rates["streamed"], rates["cached"])]

        print(f"`{command}`\n")
        print(f"{args.model} ({model.count_params()} parameters) on {info.num_records('all')} clips of "
              f"{'x'.join(map(str, info.spec.rgb_shape))} ({info.spec.pixels}), batch {BATCH}, "
              f"augment {args.augment or 'none'}; "
              f"{os.cpu_count()} CPU cores; TF {tf.__version__}, Keras {keras.__version__}; {args.rounds} rounds "
              f"of {args.steps} steps each way.\n")
        print("| fit fed by | steps/s (median) | range over rounds | CPU s per step (median) |\n|---|---:|---:|---:|")
        for name, r in rates.items():
            print(f"| {name} | {statistics.median(r):.3f} | {min(r):.3f}-{max(r):.3f} | "
                  f"{statistics.median(cpu[name]):.2f} |")
        print(f"\nstreamed / cached: {statistics.median(ratio):.3f}x (median of rounds; range "
              f"{min(ratio):.3f}-{max(ratio):.3f}; goal >= 0.95x). The input's share of the CPU time: "
              f"{1 - statistics.median(cpu['cached']) / statistics.median(cpu['streamed']):.1%} (on a GPU host "
              f"the model's share moves to the GPU; here model and input share {os.cpu_count()} cores).")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
