"""Benchmark: what a trained deblurrer does at blur levels other than its test's, against a Wiener filter
tuned at each, and how much of the lost detail each puts back.

For each run (an `stp train --task enhance --degrade blur...` folder) and each `--levels` sigma: `--patches`
test patches spread evenly over DATA's test split are blurred at that sigma (`stp evaluate`'s degradation and
seed), and restored by the run's model and by `baselines.wiener`, its (sigma, balance) tuned on those same
patches (`baselines.tune`, as `stp evaluate` tunes it). Reported per level:

  - PSNR (dB) of the blurred input, the model and the tuned Wiener filter, against the clean patches;
  - detail kept: the mean squared difference of neighbouring pixels (luma, both directions) of each, as a
    share of the clean patches' (1.00: as much fine detail as the clean footage; the blurred input's share is
    what the blur left). A model below the Wiener filter's share puts back less detail than it could.

    python benchmarks/deblur_levels.py DATA RUN [RUN ...] [--levels 1,1.5,2] [--patches 128] [--out FILE.json]

Results: docs/benchmarks.md (issue 20, deblurring).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def detail(patches: np.ndarray) -> float:
    """Mean squared difference of horizontally and vertically neighbouring luma values (a frame's fine detail)."""
    y = patches.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return float(np.mean(np.diff(y, axis=-1) ** 2) + np.mean(np.diff(y, axis=-2) ** 2))


def held_out_patches(data: str, level: float, count: int):
    """`count` test patches of `data` spread evenly over the split (`evaluate.spread_sample`, as `stp evaluate`
    tunes its baselines), blurred at `level` (seed 0): (input, clean)."""
    from stpkeras import pipeline
    from stpkeras.degrade import make_pairs
    from stpkeras.evaluate import spread_sample

    info = pipeline.load_info(data)
    info.resolve("test")
    element = make_pairs(info.encoding, info.spec, paired=False, degradations=[f"blur:{level:g}"])
    dataset = pipeline.make_dataset(info, "test", batch_size=count, training=False, element_fn=element, seed=0,
                                    deterministic=True)
    return spread_sample(dataset, info.num_records("test"), count)


def chunked(fn, x: np.ndarray, size: int = 32) -> np.ndarray:
    """`fn` over `x` `size` patches at a time (a model's activations and Wiener's FFTs of all of them at once
    would hold gigabytes)."""
    return np.concatenate([fn(x[i:i + size]) for i in range(0, len(x), size)])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="`stp convert` output with a test split (clean patches)")
    parser.add_argument("runs", nargs="+", help="enhancement run folders")
    parser.add_argument("--levels", default="1,1.5,2", help="test blur sigmas, comma-separated")
    parser.add_argument("--patches", type=int, default=128)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    from stpkeras import artifacts, baselines
    from stpkeras.quality import psnr

    models = {run: artifacts.load(run, compile=False).model for run in args.runs}
    results = {"data": args.data, "patches": args.patches, "levels": []}
    for level in (float(v) for v in args.levels.split(",")):
        x, y = held_out_patches(args.data, level, args.patches)
        param = baselines.tune("wiener", x, y)
        wiener = chunked(lambda c: baselines.wiener(c, param), x)
        outputs = {"input": x, f"wiener {baselines.param_text(param)}": wiener}
        for run, model in models.items():
            out = chunked(lambda c: np.asarray(model(c, training=False), np.float32), x)
            outputs[run] = np.clip(np.rint(out), 0, 255).astype(np.uint8)
        clean = detail(y)
        row = {"level": level, "wiener_param": list(param),
               "psnr": {k: float(np.mean(psnr(v, y))) for k, v in outputs.items()},
               "detail": {k: detail(v) / clean for k, v in outputs.items()}}
        results["levels"].append(row)
        print(f"blur {level:g} ({args.patches} patches):")
        for k in outputs:
            print(f"  {k:<60} PSNR {row['psnr'][k]:6.2f} dB   detail {row['detail'][k]:.2f}")
    if args.out:
        with open(args.out + ".part", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(args.out + ".part", args.out)
    return results


if __name__ == "__main__":
    main()
