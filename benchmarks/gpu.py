"""Benchmark: on a GPU, is training input-bound? Steps/s and clips/s of `stcnn`, `r2plus1d` and the pretraining
ViT (`--task pretrain`, `vivit`) fed by the real input pipeline vs the same batches cached, and GPU utilisation.

For each model, set up as `stp train` does (`setup.compile_model` under `setup.make_strategy("auto")`:
MirroredStrategy over the GPUs, mixed precision on GPUs, XLA), rounds alternate the same compiled train
step (Keras's own: `strategy.run(model.train_step)` in one `tf.function`, XLA when the model compiles with
it) fed two ways:

  streamed: the next batch of `make_dataset(training=True, ..., repeat=True)` with the task's element and
            augmentation, distributed as `fit` distributes it (`experimental_distribute_dataset`): reading,
            decoding, augmenting and the copy to the device happen while the model trains;
  cached:   the first `--steps` batches of that same pipeline, materialised once per replica on the
            replica's own device (a `strategy.run` identity: the tensors live in device memory), then fed
            in turn: feeding costs nothing, not even the host-to-device copy.

streamed / cached is the input-bound ratio (goal >= 0.95: the input never holds the accelerator back).
While the streamed steps run, `nvidia-smi` is sampled every 0.2 s for the GPU's utilisation (n/a without
it). `--smoke` runs tiny sizes on any machine, CPU included (the test of this script).

Run: TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/gpu.py [--smoke] [--models stcnn,r2plus1d,pretrain]
     [--batch 32] [--steps 20] [--rounds 3] [--devices N]
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import stpkeras  # noqa: F401  (first, before TensorFlow loads: it turns TensorFlow's oneDNN CPU kernels on)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import numpy as np  # noqa: E402

from train_input import benchmark_config  # noqa: E402  (benchmarks/train_input.py)

MODELS = {  # name -> (task, model, model options for full size, for --smoke)
    "stcnn": ("classify", "stcnn", {}, {"filters": 4}),
    "r2plus1d": ("classify", "r2plus1d", {}, {"widths": (4, 8)}),
    "pretrain": ("pretrain", "vivit", {"tubelet": (2, 16, 16), "dim": 384, "depth": 6, "heads": 6, "mlp_dim": 1536},
                 {"tubelet": (2, 4, 4), "dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32}),
}


class Utilisation:
    """Samples `nvidia-smi`'s GPU utilisation (%) in a thread between `start` and `stop`."""

    def __init__(self):
        self.tool = shutil.which("nvidia-smi")
        self.samples, self._stop = [], threading.Event()

    def _sample(self):
        while not self._stop.wait(0.2):
            out = subprocess.run([self.tool, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split()
            if out:
                self.samples.append(statistics.mean(float(v) for v in out))

    def __enter__(self):
        if self.tool:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.tool:
            self._stop.set()
            self._thread.join()

    def describe(self) -> str:
        return f"{statistics.mean(self.samples):.0f}%" if self.samples else "n/a"


def write_data(root: str, shape, count: int) -> str:
    """`count` random patches of `shape` in 4 classes (`tests/converted.py`): what the pipeline reads and decodes
    is the same work as for real patches of that size (raw encoding)."""
    from converted import write_converted

    rng = np.random.default_rng(0)
    items = [(rng.integers(0, 256, shape, dtype=np.uint8), i % 4, f"v{i // 16}.mp4") for i in range(count)]
    write_converted(root, {"train": items}, ("a", "b", "c", "d"), shards=4)
    return root


def train_step(model, strategy):
    """Keras's own step as `fit` compiles it: `strategy.run(model.train_step)`, the losses reduced, one
    `tf.function` (XLA when the model was compiled with `jit_compile`); it returns the reduced logs."""
    import tensorflow as tf

    def one_step(data):
        outputs = strategy.run(model.train_step, args=(data,))
        return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), outputs)

    return tf.function(one_step, jit_compile=bool(model.jit_compile), reduce_retracing=True)


def steps_per_second(step, feed, steps: int, skip: int = 2) -> float:
    """Steps/s of `step(feed())` over `steps` steps after `skip` untimed ones; each end waits for the device
    (a reduced loss read back), so the steps that were queued are counted where they ran."""
    def run(n):
        logs = None
        for _ in range(n):
            logs = step(feed())
        float(np.asarray(next(iter(logs.values()))))

    run(skip)
    started = time.perf_counter()
    run(steps)
    return steps / (time.perf_counter() - started)


def on_device(strategy, dataset, count: int) -> list:
    """The first `count` distributed batches of `dataset`, each replica's part materialised on that replica's
    device (`strategy.run` of an identity runs where the replica runs; its outputs stay there)."""
    import tensorflow as tf

    batches, iterator = [], iter(strategy.experimental_distribute_dataset(dataset))
    for _ in range(count):
        batches.append(strategy.run(lambda b: tf.nest.map_structure(tf.identity, b), args=(next(iterator),)))
    return batches


def measure(name: str, data: str, args, strategy) -> dict:
    import keras
    import tensorflow as tf

    from stpkeras import pipeline
    from stpkeras.setup import compile_model
    from stpkeras.tasks import get_task

    task_name, model_name, full, smoke = MODELS[name]
    gpu = bool(strategy.extended.worker_devices and "GPU" in strategy.extended.worker_devices[0])
    config = benchmark_config(data, os.devnull, task_name, model_name, smoke if args.smoke else full, args.batch,
                              seed=0, accelerator=gpu)
    info = pipeline.load_info(data)
    task = get_task(task_name).for_data(info)
    labels = tuple(task.class_names(info))
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model, _ = compile_model(config, task, info.spec, labels, total_steps=10_000)
    element = task.element_fn(info, config.augment, training=True)

    def streamed():
        return pipeline.make_dataset(info, "train", batch_size=args.batch, training=True, strategy=strategy,
                                     augment=None if element is not None else config.augment, element_fn=element,
                                     seed=0, repeat=True)

    # The optimizer's variables, made here under the strategy (the metrics' are made by the step's first trace).
    # A 2-step `fit` made them before: it traced the whole model once more, in `fit`'s own function, which the
    # timed step below does not use (~12 s a model on a CPU: most of the time of `--smoke`).
    with strategy.scope():
        model.optimizer.build(model.trainable_variables)
    step = train_step(model, strategy)
    cached = on_device(strategy, streamed(), args.steps)
    stream = iter(strategy.experimental_distribute_dataset(streamed()))
    turn = iter(range(1 << 62))
    feeds = {"streamed": lambda: next(stream), "cached": lambda: cached[next(turn) % len(cached)]}
    rates = {"streamed": [], "cached": []}
    utilisation = Utilisation()
    for _ in range(args.rounds):
        with utilisation:
            rates["streamed"].append(steps_per_second(step, feeds["streamed"], args.steps))
        rates["cached"].append(steps_per_second(step, feeds["cached"], args.steps))
    ratios = [a / b for a, b in zip(rates["streamed"], rates["cached"])]
    placed = sorted({t.device for part in strategy.experimental_local_results(cached[0])
                     for t in tf.nest.flatten(part)})
    global_batch = args.batch * strategy.num_replicas_in_sync
    streamed_rate, cached_rate = statistics.median(rates["streamed"]), statistics.median(rates["cached"])
    return {"model": f"{name} ({model_name}, {model.count_params():,} parameters)", "streamed": streamed_rate,
            "cached": cached_rate, "clips": streamed_rate * global_batch, "ratio": statistics.median(ratios),
            "range": (min(ratios), max(ratios)), "gpu": utilisation.describe(), "placed": placed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny patches and models: runs on a CPU in seconds")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=None, help="per replica (default 32; 4 with --smoke)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per fit (default 20; 3 with --smoke)")
    parser.add_argument("--rounds", type=int, default=None, help="streamed/cached rounds (default 3; 1 with --smoke)")
    parser.add_argument("--devices", type=int, default=None,
                        help="the first N GPUs, or N logical CPU devices without one (as `stp train --devices`)")
    args = parser.parse_args()
    args.batch = args.batch or (4 if args.smoke else 32)
    args.steps = args.steps or (3 if args.smoke else 20)
    args.rounds = args.rounds or (1 if args.smoke else 3)
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        print(f"--models: unknown {unknown}; expected some of {sorted(MODELS)}", file=sys.stderr)
        return 2
    import tensorflow as tf

    from stpkeras.setup import configure_devices, make_strategy

    configure_devices(args.devices)
    strategy = make_strategy("auto")
    shape = (4, 16, 16, 3) if args.smoke else (16, 112, 112, 3)
    work = tempfile.mkdtemp(prefix="stp-bench-gpu-")
    try:
        data = write_data(os.path.join(work, "data"), shape, 64 if args.smoke else 1024)
        rows = [measure(name, data, args, strategy) for name in names]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    devices = strategy.extended.worker_devices
    print("`" + shlex.join(["TF_CPP_MIN_LOG_LEVEL=2", "python", "benchmarks/gpu.py", *sys.argv[1:]]) + "`\n")
    print(f"{type(strategy).__name__} over {len(devices)} device(s) {list(devices)}; patches {shape}, batch "
          f"{args.batch} per replica; {args.rounds} round(s) of {args.steps} steps each way; "
          f"TF {tf.__version__}; {os.cpu_count()} CPU cores.\n")
    print("| model | streamed steps/s | cached steps/s | clips/s (streamed) | streamed / cached | GPU util |\n"
          "|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['streamed']:.2f} | {r['cached']:.2f} | {r['clips']:.0f} | {r['ratio']:.3f} "
              f"({r['range'][0]:.2f}-{r['range'][1]:.2f}) | {r['gpu']} |")
    print(f"\ncached batches held on: {', '.join(sorted({d for r in rows for d in r['placed']}))} "
          f"(the replicas' devices: {', '.join(devices)})")
    print("goal: streamed / cached >= 0.95 (the input pipeline never holds the accelerator back)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
