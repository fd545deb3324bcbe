"""Benchmark: video enhancement on held-out real footage, against classical baselines run in the same process.

Claims measured (issues 5 and 20):
1. Denoising, Gaussian noise sigma 25 (0-255 units): the default model (`dncnn3d`), trained by `stp train
   --task enhance --degrade noise --minutes 15` (level-blind: sigma drawn in 0-50 per patch; the task's
   batch 8, and on CPUs alone with this budget its CPU-budget defaults: 32x32 crops at lr 1e-3), gains >= 3 dB
   over the best classical baseline (3D Gaussian, temporal median 3/5,
   OpenCV non-local means; each with its parameter chosen on the test data itself, in their favour) on
   footage of another kind than it trained on. Measured on the test split's Tx64x64 patches (`stp
   evaluate`: every method sees each patch alone, borders included), on the test videos whole (`stp
   enhance`, overlapping patches; the baselines on the full frames), which is what a user gets, and, for
   the training style, on the first frames of the training videos themselves.
   `--degrade blur --test-degrade blur:1.5` measures deblurring the same way on the held-out test patches,
   against the sharpeners (unsharp masking, Wiener deconvolution; `stpkeras.baselines.for_degradations`),
   each tuned on the test patches; the whole-video rows are denoising's only.
2. Restoring compression: trained on `stp convert --pairs h264:23-40` pairs (each training video at 4 crf
   levels, its lossless original as target), the model's output has a higher PSNR than the compressed
   input on the held-out videos compressed at crf 37.

Train on the animated bigbuckbunny.mp4 + Megamind_bugy.avi, test on the camera footage of bikes.mp4 +
tree.avi (the sample videos of ../shared/data/videos); `--swap` the other way round. Every number comes
from the library's own functions (`convert`, `train`, `evaluate`, `enhance_video`); the script prints
them and writes OUT/enhance.json. On a machine shared with other jobs, `--clock cpu` makes the budget
count this process's CPU seconds / cores (the wall time of the same work on quiet cores).

    python benchmarks/enhance.py [--videos DIR] [--out DIR] [--minutes 15] [--pair-minutes 15] [--clock cpu]
                                 [--swap] [--skip-denoise] [--skip-pairs] [--model NAME] [--train-size 64]
                                 [--train-stride 128] [--crop N] [--soften SHARE] [--augment LIST] [--seed 0]
                                 [--tta] [--degrade KIND] [--test-degrade KIND:LEVEL]

`--tta` measures the same trained denoiser also with `stp enhance --tta` (8 flips averaged), a row of its own.

A finished run of the same budget in OUT is measured again, not retrained (delete OUT to train again).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import stpkeras  # noqa: F401  (first, before TensorFlow loads: it turns TensorFlow's oneDNN CPU kernels on)

import numpy as np

DEFAULT_VIDEOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "videos")
TRAIN = ("bigbuckbunny.mp4", "Megamind_bugy.avi")
TEST = ("bikes.mp4", "tree.avi")
SIGMA = 25
CRF = 37


def log(text: str) -> None:
    print(text, flush=True)


def write_csv(path: str, rows) -> str:
    with open(path, "w") as f:
        f.write("\n".join([",".join(rows[0])] + [",".join(r) for r in rows[1:]]) + "\n")
    return path


def decoded(path: str) -> tuple:
    """All frames the converter's decoder gives for `path` (uint8 [N, H, W, 3]) and its declared rate."""
    from tfrecords_tools.video import read_frames
    return read_frames(path)


def write_frames(path: str, frames: np.ndarray, fps: float, *, lossless: bool, crf: int = 18) -> str:
    from tfrecords_tools.video import VideoWriter

    with VideoWriter(path, fps, crf=crf, lossless=lossless) as w:
        for f in frames:
            w.write(f)
    return path


def video_psnr(pred: np.ndarray, clean: np.ndarray) -> float:
    """Mean over frames of each frame's PSNR, as `stp enhance --reference` reports it."""
    from stpkeras.enhance import frame_psnr
    return float(np.mean([frame_psnr(a, b) for a, b in zip(pred, clean)]))


def whole_videos(run_dir: str, src: str, out: str, names, seed: int = 0, limit: int = 0, tta: bool = False) -> dict:
    """The held-out videos whole, as a user denoises them: each clean video with seeded Gaussian noise
    (written losslessly), through `enhance_video` (overlapping patches, overlap-add), and through every
    classical baseline on the full frames (no patch borders for them either). Each baseline's parameter is
    one for all the videos, chosen on them (in its favour): every value of its grid on every frame for the
    3D Gaussian and the temporal medians, on every 10th frame for non-local means (0.1-0.2 s a frame).
    PSNR: mean over frames of the frame PSNR; the figure for all videos weights each video by its frames.
    `limit`: only the first `limit` frames of each video (0: all). `tta`: also the same model with `stp enhance
    --tta` (each patch averaged over its flips), a row of its own.
    """
    from stpkeras import baselines as baselines_lib
    from stpkeras.enhance import enhance_video, load_enhancer

    enhancers = {"model": load_enhancer(run_dir)}
    if tta:
        enhancers["model --tta"] = load_enhancer(run_dir, tta=True)
    methods = baselines_lib.available()
    videos = []
    for i, name in enumerate(names):
        clean, fps = decoded(os.path.join(src, name))
        if limit:
            clean = clean[:limit]
        rng = np.random.default_rng(seed + i)
        noisy = np.clip(np.rint(clean + rng.normal(0, SIGMA, clean.shape)), 0, 255).astype(np.uint8)
        stem = os.path.splitext(name)[0]
        clean_path = write_frames(os.path.join(out, f"{stem}-clean.mp4"), clean, fps, lossless=True)
        noisy_path = write_frames(os.path.join(out, f"{stem}-noisy.mp4"), noisy, fps, lossless=True)
        video = {"name": name, "clean": clean, "noisy": noisy, "frames": len(clean),
                 "size": f"{clean.shape[2]}x{clean.shape[1]}", "seconds": {}}
        for label, enhancer in enhancers.items():
            suffix = "-tta" if label != "model" else ""
            result = enhance_video(enhancer, noisy_path, os.path.join(out, f"{stem}-denoised{suffix}.mp4"),
                                   lossless=True, reference=clean_path,
                                   frame_png=os.path.join(out, f"{stem}-denoised{suffix}.png"), batch_size=16)
            video.update({label: result.output_psnr, "input": result.input_psnr})
            video["seconds"][label] = result.seconds
            log(f"  {name}: {len(clean)} frames of {clean.shape[2]}x{clean.shape[1]}, {label} "
                f"{result.output_psnr:.2f} dB (noisy {result.input_psnr:.2f}) in {result.seconds:.0f}s")
        videos.append(video)

    def run(fn, video, param, every=1):
        if fn is baselines_lib.nlmeans:
            frames = video["noisy"][::every]
            return video_psnr(fn(frames[None], param)[0], video["clean"][::every])
        return video_psnr(fn(video["noisy"][None], param)[0], video["clean"])

    baselines = {}
    for name, fn in methods.items():
        every = 10 if fn is baselines_lib.nlmeans else 1
        weights = np.array([len(v["clean"][::every]) for v in videos], np.float64)
        grid = {p: float(np.average([run(fn, v, p, every) for v in videos], weights=weights))
                for p in baselines_lib.GRIDS[name]}
        param = max(grid, key=grid.get)
        per_video = [run(fn, v, param) for v in videos]
        baselines[name] = {"param": param, "per_video": per_video}
    frames = np.array([v["frames"] for v in videos], np.float64)
    table = {"noisy": [v["input"] for v in videos], **{k: b["per_video"] for k, b in baselines.items()},
             **{label: [v[label] for v in videos] for label in enhancers}}
    overall = {k: float(np.average(v, weights=frames)) for k, v in table.items()}
    best = max(baselines, key=lambda k: overall[k])
    return {"videos": [{k: v[k] for k in ("name", "frames", "size", "seconds")} for v in videos],
            "psnr_per_video": table, "psnr": overall,
            "params": {k: b["param"] for k, b in baselines.items()}, "best_baseline": best,
            "gain_db": {"over_input": overall["model"] - overall["noisy"],
                        "over_best_baseline": overall["model"] - overall[best],
                        **({"tta_over_best_baseline": overall["model --tta"] - overall[best]} if tta else {})}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", default=DEFAULT_VIDEOS)
    parser.add_argument("--out", default="/tmp/stp-bench-enhance")
    parser.add_argument("--minutes", type=float, default=15.0,
                        help="denoising training budget (`stp train --minutes`): the issue's goal is <= 15 minutes")
    parser.add_argument("--epochs", type=int, default=1000, help="the most denoising epochs within the budget")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="what the budget counts: wall time (what `stp train --minutes` counts), or this "
                             "process's CPU seconds / cores (the wall time of the same work on quiet cores, for a "
                             "machine shared with other jobs)")
    parser.add_argument("--degrade", default="noise",
                        help="training degradation (default: `noise`, sigma drawn in 0-50 per patch, level-blind)")
    parser.add_argument("--test-degrade", default=f"noise:{SIGMA}",
                        help=f"the held-out test patches' degradation, one level (default noise:{SIGMA}; e.g. "
                             "blur:1.5); the whole-video rows are measured for noise:25 only")
    parser.add_argument("--swap", action="store_true",
                        help="train on the camera footage (bikes, tree), test on the animated videos")
    parser.add_argument("--test-frames", type=int, default=0,
                        help="whole held-out videos: only the first N frames of each (0: all)")
    parser.add_argument("--skip-patches", action="store_true",
                        help="skip the held-out test patches (`stp evaluate`): only the whole held-out videos "
                             "(with --test-frames, a short exploring run)")
    parser.add_argument("--seen-frames", type=int, default=48,
                        help="training-style figure: the first N frames of each training video, whole (0: skip)")
    parser.add_argument("--pairs", default="h264:23-40", help="`stp convert --pairs` of the training videos")
    parser.add_argument("--pair-minutes", type=float, default=15.0, help="restoration training budget")
    parser.add_argument("--pair-short-side", type=int, default=0,
                        help="restoration data: frames scaled to this short side before encoding (0: native)")
    parser.add_argument("--skip-denoise", action="store_true")
    parser.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
                        help="default: the task's (bfloat16 where the CPU has bfloat16 units, AMX or avx512_bf16, "
                             "else float32; on an AVX2-only AMD EPYC a dncnn3d step took 8.2x the CPU time of "
                             "float32, docs/benchmarks.md); --no-mixed-precision: float32")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the enhance task's (8)")
    parser.add_argument("--frames", type=int, default=8, help="frames per denoising patch (patches are Tx64x64)")
    parser.add_argument("--train-size", type=int, default=64,
                        help="training patches are T x SIZE x SIZE (test patches stay 64)")
    parser.add_argument("--train-stride", type=int, default=0,
                        help="pixels between training patches (default 2 x SIZE; SIZE is `stp convert`'s own default)")
    parser.add_argument("--lr", type=float, default=None,
                        help="default: the enhance task's (2e-3; 1e-3 with its CPU-budget defaults)")
    parser.add_argument("--model", default=None, help="enhancement model (default: the library's default)")
    parser.add_argument("--crop", type=int, default=None,
                        help="`stp train --crop N` (default: the task's; 32 under its CPU-budget defaults)")
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=INT",
                        help="a model option (`stp train --model-option`), e.g. filters=16; repeatable")
    parser.add_argument("--skip-pairs", action="store_true")
    parser.add_argument("--augment", type=lambda t: tuple(t.split(",")), default=("flip",),
                        help="the denoiser's training augmentations (default flip)")
    parser.add_argument("--soften", type=float, default=None,
                        help="the denoiser's `soften` share (default: the task's, 0.5; 0: none, the recipe before)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the denoiser's training seed (the test noise stays seed 0)")
    parser.add_argument("--tta", action="store_true",
                        help="also measure the same denoiser with test-time flips (`stp enhance --tta`, 8x the work)")
    args = parser.parse_args(argv)

    train_names, test_names = (TEST, TRAIN) if args.swap else (TRAIN, TEST)
    model_options = tuple((k, int(v)) for k, v in (o.split("=", 1) for o in args.model_option))
    missing = [n for n in TRAIN + TEST if not os.path.isfile(os.path.join(args.videos, n))]
    if missing:
        log(f"skipped: sample videos {missing} not found in {args.videos} (see ../shared/data/videos/README.md)")
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from stpkeras.baselines import param_text
    from stpkeras.evaluate import EvalConfig, evaluate
    from stpkeras.train import TrainConfig, train
    from tfrecords_tools.convert import ConvertConfig, convert
    from tfrecords_tools.spec import PatchSpec

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    src = os.path.abspath(args.videos)
    report = {"cpu_threads": {"intra": tf.config.threading.get_intra_op_parallelism_threads(),
                              "cores": os.cpu_count()}, "sigma": SIGMA}
    log(f"cores: {os.cpu_count()}; TensorFlow {tf.__version__}")

    # --- 1. denoising ----------------------------------------------------------------------------
    # Training patches every 128 pixels by default (Tx64x64, every T frames; `--train-stride`): fewer, more varied
    # patches than a dense grid, so several epochs fit the time budget. Test patches: the dense grid of the
    # held-out videos.
    t0 = time.perf_counter()
    # CSV paths stay inside the CSV's folder: link the samples there.
    videos = os.path.join(out, "videos")
    os.makedirs(videos, exist_ok=True)
    for name in TRAIN + TEST:
        if not os.path.lexists(os.path.join(videos, name)):
            os.symlink(os.path.join(src, name), os.path.join(videos, name))
    if args.clock == "cpu":
        from stpkeras import budget as budget_lib
        cores = os.cpu_count() or 1
        budget_lib.CLOCK = lambda: time.process_time() / cores
    if not args.skip_denoise:
        train_csv = write_csv(os.path.join(videos, "train.csv"),
                              [("path", "split")] + [(n, "train") for n in train_names])
        test_csv = write_csv(os.path.join(videos, "test.csv"), [("path", "split")] + [(n, "test") for n in test_names])
        train_data, test_data = os.path.join(out, "data-train"), os.path.join(out, "data-test")
        size, stride = args.train_size, args.train_stride or 2 * args.train_size
        m_train = convert(ConvertConfig(src=train_csv, out=train_data, spec=PatchSpec(args.frames, size, size,
                                                                                       stride_height=stride,
                                                                                       stride_width=stride),
                                        workers=2))
        m_test = None if args.skip_patches else convert(ConvertConfig(src=test_csv, out=test_data,
                                                                       spec=PatchSpec(args.frames, 64, 64), workers=2))
        for m in (m_train, m_test or m_train):
            if m["counts"]["failed"]:
                raise SystemExit(f"conversion failed: {[v['reason'] for v in m['videos'] if v['status'] != 'ok']}")
        log(f"converted: {m_train['counts']['patches']} training patches ({', '.join(train_names)}), "
            f"{m_test['counts']['patches'] if m_test else 'no'} test patches ({', '.join(test_names)}) "
            f"in {time.perf_counter() - t0:.0f}s")

        run_dir = os.path.join(out, "run-denoise")
        config = TrainConfig(data=train_data, out=run_dir, model=args.model, model_options=model_options,
                             task="enhance",
                             task_options=(("degrade", (args.degrade,)),
                                           *((("crop", args.crop),) if args.crop is not None else ()),
                                           *((("soften", args.soften),) if args.soften is not None else ())),
                             epochs=args.epochs, minutes=args.minutes,
                             batch_size=args.batch_size, lr=args.lr, augment=args.augment, val_split="none",
                             mixed_precision=args.mixed_precision, seed=args.seed, verbose=2,
                             resume=os.path.exists(run_dir))
        model = config.model  # the task's default (dncnn3d) unless --model
        done = os.path.join(run_dir, "run.json")
        previous = json.load(open(done)) if os.path.exists(done) else {}
        if previous.get("status") == "done" and previous.get("config", {}).get("minutes") == args.minutes \
                and previous["config"].get("model") == model and previous["config"].get("epochs") == args.epochs:
            run = previous  # a finished run of these epochs in OUT is measured again, not retrained
            log(f"reusing the finished run in {run_dir} (delete it to train again)")
        else:
            run = train(config, echo=log)
        train_s = run["seconds"]
        budget = run.get("budget") or {}
        log(f"trained {model} ({run['params']:,} parameters) on {run['task_options'].get('degrade')}: "
            f"{run['metrics']['epochs']} epochs, {run['metrics']['optimizer_steps']} steps, "
            f"{budget.get('train_seconds', train_s) / 60:.1f} min of training (budget {args.minutes:g}), "
            f"{train_s / 60:.1f} min in all")
        report["denoise"] = {"clock": args.clock, "train": train_names, "test": test_names,
                             "degrade": run["task_options"].get("degrade"),
                             "train_patches": m_train["counts"]["patches"], "params": run["params"],
                             "train_minutes": train_s / 60, "budget": budget, "epochs": run["metrics"]["epochs"],
                             "steps": run["metrics"]["optimizer_steps"], "goals": {"under_15_min": train_s < 900}}
        if not args.skip_patches:
            test_degrade = (args.test_degrade,)
            result = evaluate(EvalConfig(model=run_dir, data=test_data, split="test", batch_size=32, seed=0,
                                         degrade=test_degrade))
            best = result["best_baseline"]
            log(f"\nheld-out test ({result['patches']} patches of {args.frames}x64x64 from {', '.join(test_names)}), "
                f"{args.test_degrade}:")
            log(f"{'':<11} {'PSNR dB':>8} {'SSIM':>7}")
            rows = [("input", result["input"])] + list(result["baselines"].items()) + [(model, result["output"])]
            for name, v in rows:
                log(f"{name:<11} {v['psnr']:>8.2f} {v['ssim']:>7.4f}"
                    + (f"  (param {param_text(v['param'])})" if "param" in v else ""))
            gain, over = result["gain_db"]["over_input"], result["gain_db"]["over_best_baseline"]
            log(f"gain: {gain:+.2f} dB over the input, {over:+.2f} dB over {best} (goal >= +3); "
                f"trained {train_s / 60:.1f} min on {os.cpu_count()} cores (goal < 15)")
            report["denoise"]["eval"] = result
            if args.tta:
                flipped = evaluate(EvalConfig(model=run_dir, data=test_data, split="test", batch_size=32, seed=0,
                                              degrade=test_degrade, baselines=False, tta=True))
                log(f"{model + ' --tta':<11} {flipped['output']['psnr']:>8.2f} {flipped['output']['ssim']:>7.4f}  "
                    f"({flipped['output']['psnr'] - result['baselines'][best]['psnr']:+.2f} dB over {best})")
                report["denoise"]["eval_tta"] = flipped
            report["denoise"]["goals"].update(gain_over_noisy=gain >= 10, gain_over_best_baseline=over >= 3.5)

        # The held-out videos whole, through `enhance_video`, against the baselines on the same full frames; then
        # the training style: the first frames of the training videos themselves (seen footage), the same way.
        sets = [("held-out", test_names, args.test_frames)] if args.test_degrade == f"noise:{SIGMA}" else []
        if args.seen_frames and sets:
            sets.append(("seen", train_names, args.seen_frames))
        for label, names, limit in sets:
            log(f"\nwhole {label} videos ({', '.join(names)}{f', first {limit} frames' if limit else ''}), "
                f"noise sigma {SIGMA}:")
            whole = whole_videos(run_dir, src, out, names, limit=limit, tta=args.tta)
            log(f"{'':<12} " + " ".join(f"{n[:12]:>12}" for n in names) + f" {'all frames':>12}")
            for name, values in whole["psnr_per_video"].items():
                param = whole["params"].get(name)
                log(f"{name:<12} " + " ".join(f"{v:>12.2f}" for v in values) + f" {whole['psnr'][name]:>12.2f}"
                    + (f"  (param {param_text(param)})" if param is not None else ""))
            w_gain, w_over = whole["gain_db"]["over_input"], whole["gain_db"]["over_best_baseline"]
            tta_over = whole["gain_db"].get("tta_over_best_baseline")
            log(f"whole {label} videos: {w_gain:+.2f} dB over noisy, {w_over:+.2f} dB over {whole['best_baseline']}"
                + (f" ({tta_over:+.2f} with --tta)" if tta_over is not None else "")
                + " (goal on held-out footage >= +3)")
            key = "whole_videos" if label == "held-out" else "seen_videos"
            report["denoise"][key] = whole
            report["denoise"]["goals"][key] = {"gain_over_noisy": w_gain >= 10, "gain_over_best_baseline": w_over >= 3}

    # --- 2. compressed / clean pairs (`stp convert --pairs`) -----------------------------------------
    # Pairs made by the converter from the clean training videos at several crf levels; tested on the held-out
    # videos compressed at crf CRF, against the compressed input.
    if not args.skip_pairs:
        pair_train = os.path.join(out, "data-pairs-train")
        pair_test = os.path.join(out, "data-pairs-test")
        spec = dict(short_side=args.pair_short_side) if args.pair_short_side else {}
        m_pairs = convert(ConvertConfig(src=write_csv(os.path.join(videos, "pairs-train.csv"), [("path", "split")]
                                                      + [(n, "train") for n in train_names]),
                                        out=pair_train, pairs=args.pairs, workers=2,
                                        spec=PatchSpec(8, 64, 64, stride_height=128, stride_width=128, **spec)))
        m_pairs_test = convert(ConvertConfig(src=write_csv(os.path.join(videos, "pairs-test.csv"), [("path", "split")]
                                                           + [(n, "test") for n in test_names]),
                                             out=pair_test, pairs=f"h264:{CRF}", workers=2,
                                             spec=PatchSpec(8, 64, 64, **spec)))
        for m in (m_pairs, m_pairs_test):
            if m["counts"]["failed"]:
                raise SystemExit(f"conversion failed: {[v['reason'] for v in m['videos'] if v['status'] != 'ok']}")
        pair_run = os.path.join(out, "run-pairs")
        run = train(TrainConfig(data=pair_train, out=pair_run, model=args.model, model_options=model_options,
                                task="enhance",
                                task_options=(("crop", args.crop),) if args.crop is not None else (),
                                minutes=args.pair_minutes, epochs=args.epochs, batch_size=args.batch_size,
                                lr=args.lr, augment=("flip",),
                                val_split="none", mixed_precision=args.mixed_precision, seed=0, verbose=2,
                                resume=os.path.exists(pair_run)), echo=log)
        pairs = evaluate(EvalConfig(model=pair_run, data=pair_test, split="test", batch_size=32, baselines=False))
        budget = run.get("budget") or {}
        log(f"\ncompressed (H.264 crf {CRF}) / clean pairs of {', '.join(test_names)}, {pairs['patches']} patches: "
            f"PSNR {pairs['input']['psnr']:.3f} -> {pairs['output']['psnr']:.3f} dB "
            f"({pairs['gain_db']['over_input']:+.3f}), SSIM {pairs['input']['ssim']:.4f} -> "
            f"{pairs['output']['ssim']:.4f}; trained {budget.get('train_seconds', run['seconds']) / 60:.1f} min "
            f"({run['metrics']['optimizer_steps']} steps) on {m_pairs['splits']['train']['records']} pairs of "
            f"{', '.join(train_names)} at {args.pairs}")
        report["pairs"] = {"crf": CRF, "train": train_names, "test": test_names, "pairs": args.pairs,
                           "train_minutes": run["seconds"] / 60, "budget": budget,
                           "steps": run["metrics"]["optimizer_steps"], "eval": pairs,
                           "goals": {"above_compressed_input": pairs["gain_db"]["over_input"] > 0}}

    with open(os.path.join(out, "enhance.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    log(f"wrote {os.path.join(out, 'enhance.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
