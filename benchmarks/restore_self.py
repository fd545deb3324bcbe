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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", default=os.path.join(ROOT, "..", "shared", "data", "videos"))
    parser.add_argument("--fold", choices=sorted(FOLDS), default="camera")
    parser.add_argument("--out", default="/tmp/stp-restore-self")
    parser.add_argument("--pairs", default="h264:37-45", help="`stp convert --pairs` of the compressed videos")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from stpkeras.evaluate import EvalConfig, evaluate
    from stpkeras.train import TrainConfig, train
    from tfrecords_tools.codec import CodecPairs, write_copies
    from tfrecords_tools.convert import ConvertConfig, convert
    from tfrecords_tools.spec import PatchSpec

    if args.clock == "cpu":
        from stpkeras import budget as budget_lib
        cores = os.cpu_count() or 1
        budget_lib.CLOCK = lambda: time.process_time() / cores
    out = os.path.abspath(args.out)
    compressed, originals = os.path.join(out, "compressed"), os.path.join(out, "originals")
    os.makedirs(originals, exist_ok=True)
    for name in FOLDS[args.fold]:
        stem = os.path.splitext(name)[0]
        write_copies(os.path.join(args.videos, name), PatchSpec(8, 64, 64), CodecPairs("h264", (CRF,)),
                     os.path.join(out, "copies"), stem)
        os.makedirs(compressed, exist_ok=True)
        link = os.path.join(compressed, f"{stem}-crf{CRF}.mp4")
        if not os.path.lexists(link):
            os.symlink(os.path.join(out, "copies", f"{stem}-crf{CRF}.mp4"), link)
        if not os.path.lexists(os.path.join(originals, name)):
            os.symlink(os.path.abspath(os.path.join(args.videos, name)), os.path.join(originals, name))
    # What is measured: the originals compressed at crf 37 against themselves (the test patches).
    test = os.path.join(out, "data-test")
    if not os.path.isdir(test):
        csv = os.path.join(out, "test.csv")
        with open(csv, "w") as f:
            f.write("path,split\n" + "".join(f"{os.path.join(originals, n)},test\n" for n in FOLDS[args.fold]))
        convert(ConvertConfig(src=csv, out=test, pairs=f"h264:{CRF}", workers=2, spec=PatchSpec(8, 64, 64)))
    # What is trained on: the compressed videos re-encoded, the compressed videos as the targets.
    data = os.path.join(out, "data-self")
    if not os.path.isdir(data):
        m = convert(ConvertConfig(src=compressed, out=data, pairs=args.pairs, workers=2,
                                  spec=PatchSpec(8, 64, 64, stride_height=64, stride_width=64)))
        print(f"{m['splits']['train']['records']} pairs of {len(FOLDS[args.fold])} compressed videos at {args.pairs}",
              flush=True)
    run = os.path.join(out, "run")
    result = train(TrainConfig(data=data, out=run, task="enhance", minutes=args.minutes, epochs=1000,
                               val_split="none", seed=args.seed, verbose=0, resume=os.path.exists(run)),
                   echo=print)
    scores = evaluate(EvalConfig(model=run, data=test, split="test", batch_size=32, baselines=False))
    report = {"fold": args.fold, "pairs": args.pairs, "crf": CRF, "clock": args.clock, "minutes": args.minutes,
              "steps": result["metrics"]["optimizer_steps"], "patches": scores["patches"],
              "input": scores["input"], "output": scores["output"], "gain_db": scores["gain_db"]["over_input"]}
    print(f"{args.fold}: {scores['patches']} patches at crf {CRF}: PSNR {scores['input']['psnr']:.3f} -> "
          f"{scores['output']['psnr']:.3f} dB ({report['gain_db']:+.3f}), SSIM {scores['input']['ssim']:.4f} -> "
          f"{scores['output']['ssim']:.4f}; {report['steps']} steps on re-encodings of the compressed videos only",
          flush=True)
    with open(os.path.join(out, "restore_self.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
