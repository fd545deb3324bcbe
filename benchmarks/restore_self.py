"""Benchmark: H.264 restoration learnt from the compressed footage itself, against the compressed input.

A user with compressed videos and no clean originals can still make pairs: `stp convert COMPRESSED/ OUT
--pairs h264:37-45` re-encodes each compressed video at crf 37-45 (PyAV's libx264) and keeps the compressed
video itself as the clean target. `stp train OUT --task enhance --minutes 15` then learns to undo one more
round of the same codec on exactly this content, and `stp enhance RUN COMPRESSED.mp4` applies it to the
compressed video. No clean frame is ever seen.

Here the "user's" videos are the sample videos of one kind (camera: bikes, tree; or animation: bigbuckbunny,
Megamind, `--fold`) compressed at crf 37 (`tfrecords_tools.codec.write_copies`, as `stp convert --pairs h264:37`
makes them); the measure is PSNR/SSIM of the model's output against the pristine originals on every 8x64x64
patch (`stp convert --pairs h264:37` of the originals, `stp evaluate`), next to the compressed input's, in the
same run. The model trained on the other kind's clean pairs is the earlier recipe (docs/benchmarks.md).

    python benchmarks/restore_self.py [--fold camera|animation] [--minutes 15] [--clock cpu] [--out DIR]
                                      [--source KIND@SCALE:CRFS ...] [--loss l1|l2] [--seed 0] [--tta]
                                      [--leaves 8] [--lr LR] [--model-option KEY=INT ...]
                                      [--crop N] [--crf 37]

`--source` (repeatable) chooses what the pairs are made of, all in one training set: `self@1:37-45` (the
default: the compressed videos re-encoded at crf 37-45 at their own size, as `stp convert --pairs h264:37-45`
makes them), `self@0.5:37-45` (the compressed videos scaled to half size first, losslessly, then encoded: a
cleaner target of the same content, as zero-shot super-resolution trains on a smaller copy of its input),
`self@1:auto` (each compressed video at its own level to 2 above, read by `codec.footage_level`, as `stp
convert --pairs h264:auto` makes them), `clean@1:23-40` (the other kind's pristine originals at crf 23-40, the earlier
recipe of benchmarks/enhance.py),
`leaves@1:23-40` (synthetic dead-leaves videos, `benchmarks/dead_leaves.py`, at crf 23-40: clean pairs that
carry no real footage's content; `--leaves N` of them).

`--crf` is the level the "user's" videos (and the test patches) are compressed at (default 37); a level other
than 37 names its folders (`compressed-camera-crf28`, ...), so the crf 37 runs' commands reproduce as they were.

`--lr` sets the peak learning rate (at the CPU recipe's 32x32 crops); left out, paired data trains at the task's
default x0.2 (`Enhance.PAIRED_LR_SCALE`: 2e-4 under the CPU recipe). `--tta` measures the output averaged over 8
flips as well. A run folder per training set, loss, budget and seed;
a finished one is measured again, not retrained (the leaves do not depend on `--fold`: one run serves both).

`--clock cpu` counts the budget in CPU time over the cores (for a machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FOLDS = {"camera": ("bikes.mp4", "tree.avi"), "animation": ("bigbuckbunny.mp4", "Megamind_bugy.avi")}
CRF = 37
KINDS = ("self", "clean", "leaves")


def parse_source(text: str):
    """`KIND@SCALE:CRFS` -> (kind, scale, crfs), e.g. `self@0.5:37-45` -> ('self', 0.5, '37-45')."""
    try:
        kind, rest = text.split("@", 1)
        scale, crfs = rest.split(":", 1)
        if kind not in KINDS or not 0 < float(scale) <= 1:
            raise ValueError
    except ValueError:
        raise SystemExit(f"--source: expected KIND@SCALE:CRFS, KIND one of {', '.join(KINDS)}, 0 < SCALE <= 1 "
                         f"(e.g. self@1:37-45). Received {text!r}") from None
    return kind, float(scale), crfs


def other_fold(fold: str) -> str:
    return next(k for k in FOLDS if k != fold)


def short_side(path: str) -> int:
    from tfrecords_tools.video import probe
    info = probe(path)
    return min(info.height, info.width)


def even(value: float) -> int:
    return max(2, int(round(value / 2)) * 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", default=os.path.join(ROOT, "..", "shared", "data", "videos"))
    parser.add_argument("--fold", choices=sorted(FOLDS), default="camera")
    parser.add_argument("--out", default="/tmp/stp-restore-self")
    parser.add_argument("--source", action="append", default=None, metavar="KIND@SCALE:CRFS",
                        help="pairs to train on (repeatable; default self@1:37-45): self (the compressed videos) or "
                             "clean (the other kind's originals), scaled by SCALE, encoded at crf CRFS")
    parser.add_argument("--loss", choices=("l1", "l2"), default="l1", help="the pixel loss (`stp train --loss`)")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tta", action="store_true", help="also measure the output averaged over 8 flips (--tta)")
    parser.add_argument("--leaves", type=int, default=8, help="synthetic videos for a leaves source (64 frames each)")
    parser.add_argument("--lr", type=float, default=None,
                        help="the peak learning rate (`stp train --lr`; default: the task's), at crop 32")
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=INT",
                        help="an option of the default model dncnn3d (`stp train --model-option`), e.g. downscale=4; "
                             "repeatable")
    parser.add_argument("--crop", type=int, default=None,
                        help="train on crops of this size (`stp train --task-option crop=N`; 64: whole patches; "
                             "default: the task's CPU recipe, 32)")
    parser.add_argument("--crf", type=int, default=CRF,
                        help="the crf the user's videos and the test patches are compressed at (default 37)")
    args = parser.parse_args(argv)
    model_options = tuple((k, int(v)) for k, v in (o.split("=", 1) for o in args.model_option))
    args.source = args.source or ["self@1:37-45"]
    for source in args.source:
        parse_source(source)

    from stpkeras.evaluate import EvalConfig, evaluate
    from stpkeras.tasks import Enhance
    from stpkeras.train import TrainConfig, train
    from tfrecords_tools.codec import CodecPairs, parse_pairs, write_copies
    from tfrecords_tools.convert import ConvertConfig, convert
    from tfrecords_tools.spec import PatchSpec

    if args.clock == "cpu":
        from stpkeras import budget as budget_lib
        cores = os.cpu_count() or 1
        budget_lib.CLOCK = lambda: time.process_time() / cores
    out = os.path.abspath(args.out)
    crf = args.crf
    level = "" if crf == CRF else f"-crf{crf}"  # the crf 37 runs keep their folder names
    compressed, originals = os.path.join(out, f"compressed-{args.fold}{level}"), os.path.join(out, "originals")
    os.makedirs(originals, exist_ok=True)
    for name in FOLDS[args.fold]:
        stem = os.path.splitext(name)[0]
        write_copies(os.path.join(args.videos, name), PatchSpec(8, 64, 64), CodecPairs("h264", (crf,)),
                     os.path.join(out, "copies"), stem)
        os.makedirs(compressed, exist_ok=True)
        link = os.path.join(compressed, f"{stem}-crf{crf}.mp4")
        if not os.path.lexists(link):
            os.symlink(os.path.join(out, "copies", f"{stem}-crf{crf}.mp4"), link)
        if not os.path.lexists(os.path.join(originals, name)):
            os.symlink(os.path.abspath(os.path.join(args.videos, name)), os.path.join(originals, name))
    # What is measured: the originals compressed at the crf against themselves (the test patches).
    test = os.path.join(out, f"data-test-{args.fold}{level}")
    if not os.path.isdir(test):
        csv = os.path.join(out, f"test-{args.fold}{level}.csv")
        with open(csv, "w") as f:
            f.write("path,split\n" + "".join(f"{os.path.join(originals, n)},test\n" for n in FOLDS[args.fold]))
        convert(ConvertConfig(src=csv, out=test, pairs=f"h264:{crf}", workers=2, spec=PatchSpec(8, 64, 64)))
    # What is trained on: pairs of each source, in one path,target conversion (`stp convert` of a CSV).
    # Sources of real footage depend on the fold; the synthetic leaves do not, and one run serves both folds.
    name = "+".join(args.source).replace(":", "_").replace("@", "s")
    kinds = {parse_source(s)[0] for s in args.source}
    if kinds - {"leaves"}:
        name = f"{args.fold}{level}-{name}"
    if "leaves" in kinds and args.leaves != 8:
        name = f"{name}-n{args.leaves}"
    data = os.path.join(out, "data-" + name)
    if not os.path.isdir(data):
        rows = []
        for source in args.source:
            kind, scale, crfs = parse_source(source)
            if kind == "self":
                videos = [os.path.join(compressed, n) for n in sorted(os.listdir(compressed))]
            elif kind == "clean":
                videos = [os.path.join(args.videos, n) for n in FOLDS[other_fold(args.fold)]]
            else:
                from dead_leaves import write_videos
                videos = write_videos(os.path.join(out, "leaves"), videos=args.leaves)
            for video in videos:
                stem = f"{kind}-{scale:g}-{os.path.splitext(os.path.basename(video))[0]}"
                spec = PatchSpec(8, 64, 64, short_side=None if scale == 1 else even(short_side(video) * scale))
                clean, copies = write_copies(video, spec, parse_pairs(f"h264:{crfs}"), os.path.join(out, "pairs"), stem)
                rows += [(copy, clean) for copy in copies]
        csv = os.path.join(out, "pairs", os.path.basename(data) + ".csv")
        with open(csv, "w") as f:
            f.write("path,target,split\n" + "".join(f"{os.path.basename(c)},{os.path.basename(t)},train\n"
                                                    for c, t in rows))
        m = convert(ConvertConfig(src=csv, out=data, workers=2,
                                  spec=PatchSpec(8, 64, 64, stride_height=64, stride_width=64)))
        print(f"{m['splits']['train']['records']} pairs: {', '.join(args.source)}", flush=True)
    # One run per training set, loss, budget and seed: a finished run is measured again, not retrained.
    run = os.path.join(out, "run-" + os.path.basename(data)[len("data-"):] + f"-{args.loss}-seed{args.seed}"
                       + ("" if args.minutes == 15 else f"-{args.minutes:g}min")
                       + ("" if args.lr is None else f"-lr{args.lr:g}")
                       + "".join(f"-{k}{v}" for k, v in model_options)
                       + ("" if args.crop is None else f"-crop{args.crop}"))
    previous = {}
    if os.path.exists(os.path.join(run, "run.json")):
        with open(os.path.join(run, "run.json")) as f:
            previous = json.load(f)
    if previous.get("status") == "done":
        steps = previous["metrics"]["optimizer_steps"]  # finished: measured again, not retrained
    else:
        # A given lr or model option drops the CPU-budget defaults (`stp train`): their task options (the crop)
        # are kept here unless `--crop` chooses another.
        crop = (("crop", args.crop),) if args.crop is not None else ()
        recipe_dropped = args.lr is not None or bool(model_options)
        options = (("pixel_loss", args.loss),
                   *(crop or (Enhance.CPU_BUDGET_TASK_OPTIONS if recipe_dropped else ())))
        result = train(TrainConfig(data=data, out=run, task="enhance", minutes=args.minutes, epochs=1000,
                                   model_options=model_options,
                                   task_options=options, val_split="none", seed=args.seed, lr=args.lr,
                                   verbose=0, resume=os.path.exists(run)),
                       echo=print)
        steps = result["metrics"]["optimizer_steps"]
    scores = evaluate(EvalConfig(model=run, data=test, split="test", batch_size=32, baselines=False))
    report = {"fold": args.fold, "source": args.source, "loss": args.loss, "crf": crf, "clock": args.clock,
              "minutes": args.minutes, "lr": args.lr, "model_options": dict(model_options),
              "crop": args.crop,
              "steps": steps, "patches": scores["patches"],
              "input": scores["input"], "output": scores["output"], "gain_db": scores["gain_db"]["over_input"]}
    if args.tta:
        flipped = evaluate(EvalConfig(model=run, data=test, split="test", batch_size=32, baselines=False, tta=True))
        report.update(output_tta=flipped["output"], gain_db_tta=flipped["gain_db"]["over_input"])
    print(f"{args.fold}: {scores['patches']} patches at crf {crf}: PSNR {scores['input']['psnr']:.3f} -> "
          f"{scores['output']['psnr']:.3f} dB ({report['gain_db']:+.3f}), SSIM {scores['input']['ssim']:.4f} -> "
          f"{scores['output']['ssim']:.4f}; {report['steps']} steps on {' + '.join(args.source)}"
          + (f"; with --tta {report['gain_db_tta']:+.3f} dB" if args.tta else ""),
          flush=True)
    with open(os.path.join(out, f"restore_self-{args.fold}-{os.path.basename(run)[len('run-'):]}.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
