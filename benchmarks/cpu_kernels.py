"""Benchmark: TensorFlow's oneDNN CPU kernels on vs off, per model's training step, in one run.

TensorFlow turns oneDNN on by itself only on CPUs with AVX-512 VNNI/BF16 or AMX; `import stpkeras` sets
`TF_ENABLE_ONEDNN_OPTS=1` unless the user set it. This script measures what that default buys on the machine
it runs on: for each case, a fresh process per setting (the variable is read once, when TensorFlow loads)
builds the model with the same seed, trains `--steps` steps on the same random batch after two untimed
steps, and reports CPU seconds and wall seconds per step, the ratio off / on, and the loss after the
timed steps in both settings (the kernels compute the same thing in another order: the losses agree to
round-off, which this shows rather than assumes).

Cases: the default classifier (`stcnn`) and `r2plus1d` on 16x64x64 clips, batch 8; the enhancement
default (`dncnn3d`, 8x64x64, batch 8, L1); the segmenter of the suite's action-segmentation test
(`unet3d` filters [8,16], 1 conv per level, 8x32x32, batch 16, per-frame classes).

Run: TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/cpu_kernels.py [--steps 5] [--cases stcnn,r2plus1d,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

CASES = {
    "stcnn": dict(model="stcnn", spec=(16, 64, 64), batch=8, kind="classify"),
    "r2plus1d": dict(model="r2plus1d", spec=(16, 64, 64), batch=8, kind="classify"),
    "dncnn3d": dict(model="dncnn3d", spec=(8, 64, 64), batch=8, kind="enhance"),
    "unet3d-segment": dict(model="unet3d", spec=(8, 32, 32), batch=16, kind="segment"),
}


def _measure(case: dict, steps: int) -> dict:
    """In this process (the caller set TF_ENABLE_ONEDNN_OPTS before TensorFlow loaded): one case's step."""
    import resource
    import time

    import keras
    import numpy as np

    from tfrecords_tools.spec import PatchSpec

    keras.utils.set_random_seed(0)
    spec = PatchSpec(*case["spec"])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (case["batch"],) + tuple(case["spec"]) + (3,), dtype=np.uint8)
    if case["kind"] == "segment":
        from stpkeras.models.segmentation import SegmentationLoss, build_segmenter

        model = build_segmenter("unet3d", spec, 3, kind="frames", filters=[8, 16], convs=1)
        loss, y = SegmentationLoss(dice=0.0), rng.integers(0, 3, (case["batch"], spec.frames))
    else:
        from stpkeras.models import build_model

        if case["kind"] == "enhance":
            model = build_model(case["model"], spec, 3)
            loss, y = "mean_absolute_error", x.astype(np.float32)
            x = np.clip(x + rng.normal(0, 25, x.shape), 0, 255).astype(np.uint8)
        else:
            model = build_model(case["model"], spec, 5)
            loss, y = keras.losses.SparseCategoricalCrossentropy(from_logits=True), rng.integers(0, 5, case["batch"])
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=loss)

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    for _ in range(2):
        model.train_on_batch(x, y)
    wall, used = time.perf_counter(), cpu()
    for _ in range(steps):
        value = model.train_on_batch(x, y)
    wall, used = time.perf_counter() - wall, cpu() - used
    return {"cpu_s": used / steps, "wall_s": wall / steps, "loss": float(np.ravel(value)[0]),
            "params": int(model.count_params())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(CASES[args.child], args.steps)))
        return 0
    names = [c for c in args.cases.split(",") if c]
    print(f"{'case':16s} {'params':>8s} {'off: CPU s/step':>16s} {'on: CPU s/step':>15s} {'off/on (CPU)':>13s} "
          f"{'off/on (wall)':>14s} {'loss off':>10s} {'loss on':>10s}")
    for name in names:
        results = {}
        for setting in ("0", "1"):
            env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=setting, TF_CPP_MIN_LOG_LEVEL="2")
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, "--steps",
                                  str(args.steps)], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
            results[setting] = json.loads(out.stdout.strip().splitlines()[-1])
        off, on = results["0"], results["1"]
        print(f"{name:16s} {on['params']:8d} {off['cpu_s']:16.3f} {on['cpu_s']:15.3f} "
              f"{off['cpu_s'] / on['cpu_s']:12.1f}x {off['wall_s'] / on['wall_s']:13.1f}x "
              f"{off['loss']:10.4f} {on['loss']:10.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
