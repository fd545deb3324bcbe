"""Benchmark: TensorFlow's oneDNN CPU kernels on vs off, per model's training step, in one run.

TensorFlow turns oneDNN on by itself only on CPUs with AVX-512 VNNI/BF16 or AMX; `import stpkeras` sets
`TF_ENABLE_ONEDNN_OPTS=1` unless the user set it. This script measures what that default buys on the machine
it runs on: for each case, a fresh process per setting (the variable is read once, when TensorFlow loads)
builds the model with the same seed, trains `--steps` steps on the same random batch after two untimed
steps, and reports CPU seconds and wall seconds per step, the ratio off / on, and the loss after the
timed steps in both settings (the kernels compute the same thing in another order: the losses agree to
round-off, which this shows rather than assumes).

`--compare precision` measures instead, oneDNN on, float32 against the `mixed_bfloat16` policy that `stp
train` takes by default on a CPU that computes bfloat16 natively (AMX, AVX-512 BF16; `setup.native_bfloat16`):
the ratio float32 / bfloat16 per step, and both losses (bfloat16 rounds: they agree to 2-3 digits).

Cases: the default classifier (`stcnn`) and `r2plus1d` on 16x64x64 clips, batch 8; the enhancement
default (`dncnn3d`, 8x64x64, batch 8, L1); the segmenter of the suite's action-segmentation test
(`unet3d` filters [8,16], 1 conv per level, 8x32x32, batch 16, per-frame classes); `dncnn3d-crop32`, the
enhancement task's CPU-budget recipe (32x32 crops); `corrnet`, the motion classifier of
benchmarks/motion_classify.py (16x64x64, batch 32); `dncnn3d-crop32-phases2` the same denoiser on each frame's
2x2 pixel phases (`--model-option downscale=2`), `-f64` with 64 filters, `dncnn3d-crop64-phases2` on 64x64
crops; `dncnn3d-crop32-factorize` with each hidden layer split into space then time (`factorize=1`), and the
float32 recipe's batches of 4 (`-b4`) of both.

Run: TF_CPP_MIN_LOG_LEVEL=2 python benchmarks/cpu_kernels.py [--steps 5] [--cases stcnn,r2plus1d,...]
                                                             [--compare onednn|precision]
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
    "dncnn3d-crop32": dict(model="dncnn3d", spec=(8, 32, 32), batch=8, kind="enhance"),
    "corrnet": dict(model="corrnet", spec=(16, 64, 64), batch=32, kind="classify"),
    # The denoiser on its pixel phases (`--model-option downscale=2`, FFDNet's sub-images): 1/4 of the voxels a layer.
    "dncnn3d-crop32-phases2": dict(model="dncnn3d", spec=(8, 32, 32), batch=8, kind="enhance",
                                   options=dict(downscale=2)),
    "dncnn3d-crop32-phases2-f64": dict(model="dncnn3d", spec=(8, 32, 32), batch=8, kind="enhance",
                                       options=dict(downscale=2, filters=64)),
    "dncnn3d-crop64-phases2": dict(model="dncnn3d", spec=(8, 64, 64), batch=8, kind="enhance",
                                   options=dict(downscale=2)),
    # Each hidden layer as space (1x3x3) then time (3x1x1) (`--model-option factorize=1`, R(2+1)D's split).
    "dncnn3d-crop32-factorize": dict(model="dncnn3d", spec=(8, 32, 32), batch=8, kind="enhance",
                                     options=dict(factorize=1)),
    "dncnn3d-crop32-b4": dict(model="dncnn3d", spec=(8, 32, 32), batch=4, kind="enhance"),
    "dncnn3d-crop32-factorize-b4": dict(model="dncnn3d", spec=(8, 32, 32), batch=4, kind="enhance",
                                        options=dict(factorize=1)),
}


def _measure(case: dict, steps: int, policy: str = "float32") -> dict:
    """In this process (the caller set TF_ENABLE_ONEDNN_OPTS before TensorFlow loaded): one case's step, the
    model built under the Keras dtype `policy`."""
    import resource
    import time

    import keras
    import numpy as np

    from tfrecords_tools.spec import PatchSpec

    keras.mixed_precision.set_global_policy(policy)
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
            model = build_model(case["model"], spec, 3, **case.get("options", {}))
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
    parser.add_argument("--compare", choices=("onednn", "precision"), default="onednn",
                        help="oneDNN off vs on (float32), or float32 vs mixed_bfloat16 (oneDNN on)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--policy", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(CASES[args.child], args.steps, args.policy)))
        return 0
    names = [c for c in args.cases.split(",") if c]
    if args.compare == "precision":
        return _compare_precision(names, args.steps)
    print(f"{'case':16s} {'params':>8s} {'off: CPU s/step':>16s} {'on: CPU s/step':>15s} {'off/on (CPU)':>13s} "
          f"{'off/on (wall)':>14s} {'loss off':>10s} {'loss on':>10s}")
    for name in names:
        results = {}
        for setting in ("0", "1"):
            results[setting] = _child(name, args.steps, setting)
        off, on = results["0"], results["1"]
        print(f"{name:16s} {on['params']:8d} {off['cpu_s']:16.3f} {on['cpu_s']:15.3f} "
              f"{off['cpu_s'] / on['cpu_s']:12.1f}x {off['wall_s'] / on['wall_s']:13.1f}x "
              f"{off['loss']:10.4f} {on['loss']:10.4f}", flush=True)
    return 0


def _child(name: str, steps: int, onednn: str, policy: str = "float32") -> dict:
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name, "--steps", str(steps),
                          "--policy", policy], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _compare_precision(names, steps: int) -> int:
    from stpkeras.setup import native_bfloat16

    print(f"bfloat16 natively: {native_bfloat16() or 'no'} (`stp train --task enhance`'s default policy: "
          f"{'mixed_bfloat16' if native_bfloat16() else 'float32'} without a GPU; other tasks: float32)")
    print(f"{'case':16s} {'params':>8s} {'f32: CPU s/step':>16s} {'bf16: CPU s/step':>17s} {'f32/bf16 (CPU)':>15s} "
          f"{'f32/bf16 (wall)':>16s} {'loss f32':>10s} {'loss bf16':>10s}")
    for name in names:
        f32, bf16 = _child(name, steps, "1"), _child(name, steps, "1", "mixed_bfloat16")
        print(f"{name:16s} {f32['params']:8d} {f32['cpu_s']:16.3f} {bf16['cpu_s']:17.3f} "
              f"{f32['cpu_s'] / bf16['cpu_s']:14.1f}x {f32['wall_s'] / bf16['wall_s']:15.1f}x "
              f"{f32['loss']:10.4f} {bf16['loss']:10.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
