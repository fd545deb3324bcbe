"""Benchmark helper: a restoration run trained before the deblocking stage existed, given the stage as `stp train`
now ends a run on paired data.

`stp train` on paired data builds the enhancer with a deblocking stage after its output
(`layers.ResidualPixels(deblock=8)`: `layers.block_shrink`, FFmpeg's `spp` method, with a threshold of 0 while
training, so the stage changes nothing the model learns) and chooses the threshold at the end of the run on the
run's own patches (`tasks.Enhance.tune_model`). A run trained without it therefore differs only in that last
choice: this copies RUN to OUT, rebuilds each model file with the stage, the trained weights unchanged, and makes
the same choice with the same code, so that older runs measure what a run of today writes, without training
them again.

    python benchmarks/deblock_stage.py RUN OUT

Then `stp evaluate OUT DATA --split test` (patches) and `benchmarks/codec_postfilters.py --run OUT` (whole
files through `stp enhance`). Results: docs/benchmarks.md (issue 20, the deblocking stage).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from stpkeras import artifacts, pipeline  # noqa: E402
from stpkeras.artifacts import BEST, LAST, RUN_JSON  # noqa: E402
from stpkeras.models import build_model  # noqa: E402
from stpkeras.tasks import CODEC_BLOCK, Enhance  # noqa: E402
from tfrecords_tools import outputs  # noqa: E402
from tfrecords_tools.spec import PatchSpec  # noqa: E402


def add_stage(run_dir: str, out: str) -> dict:
    """Copies `run_dir` to `out` with the deblocking stage in its model files, tuned; returns `out`'s run.json."""
    run = artifacts.read_run(run_dir)
    if run.get("task") != "enhance" or not run.get("task_options", {}).get("paired"):
        raise SystemExit(f"{run_dir}: expected a run of --task enhance on paired data")
    if os.path.exists(out):
        raise SystemExit(f"{out}: exists; expected a new folder")
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("backup", "logs"))
    spec = PatchSpec.from_dict(run["spec"])
    options = {**run["config"].get("model_options", {}), "deblock": CODEC_BLOCK}
    info = pipeline.load_info(run["data"])
    split = run["splits"]["val"] or run["splits"]["train"]
    task = Enhance(paired=True)
    tuned = {}
    for name in (LAST, BEST):
        trained = artifacts.load_keras_model(os.path.join(run_dir, name))     # float32, as it predicts
        model = build_model(run["model"], spec, spec.channels, **options)
        for layer in trained.layers:
            if layer.weights:    # the output layer's only weight is the new threshold
                model.get_layer(layer.name).set_weights(layer.get_weights())
        tuned[name] = task.tune_model(model, info, split)
        with outputs.atomic_file(os.path.join(out, name)) as tmp:
            model.save(tmp)
        print(f"{name}: deblock_threshold {tuned[name]['deblock_threshold']} "
              f"(PSNR by threshold on {tuned[name]['patches']} patches: {tuned[name]['psnr_by_threshold']})")
    run["config"]["model_options"] = options
    run.update(tuned=tuned, out=out, deblock_stage_added_by="benchmarks/deblock_stage.py", source_run=run_dir)
    outputs.write_text(os.path.join(out, RUN_JSON), json.dumps(run, indent=2) + "\n")
    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a `stp train --task enhance` run on paired data")
    parser.add_argument("out", help="the new run folder")
    args = parser.parse_args(argv)
    return add_stage(args.run, args.out)


if __name__ == "__main__":
    main()
