"""Benchmark: classifying camera motion (pan left, right, up, down, or still) on footage never trained on.

Clips: from each source video (default: the sample videos), `--clips` clips per class and source of a
64x64 window over the video (short side scaled to 180) that pans left, right, up or down at one of
`SPEEDS` pixels a frame over `--frames` consecutive frames, or stays put (`still`; the scene's own
motion remains), written with libx264 at crf 18 into a folder per class. A clip's picture says nothing
about its class: only motion does.

Held-out footage, as in `benchmarks/copies.py`: the sources split by kind (camera: bikes, tree;
animation: bigbuckbunny, Megamind). Each direction trains on one kind's clips and tests on the other
kind's (camera -> animation and animation -> camera), so only motion carries over.

Methods, measured in the same run:
  - baseline: the global shift between consecutive frames by phase correlation (numpy FFT of the grey
    frames, a Hann window, the peak of the normalised cross-power spectrum), averaged over the clip:
    a (dy, dx) per clip, classified by the nearest class mean of the training clips;
  - the product: `stp convert` (patch `--frames-per-patch` x S x S, stride 8 frames, frames resized to
    S = `--size`), `stp train` with its defaults under `--minutes` (or `--epochs`), and `stp evaluate
    --split test --json`'s video-level accuracy (the mean of a clip's patch logits); `--variant
    NAME=ARGS` adds runs with other `stp train` arguments (one change at a time), `--mirror` adds the
    training clips mirrored (left<->right, up<->down) with their labels swapped. A variant trained with
    `--flip-labels` is also evaluated with `--tta` (each patch's logits averaged over its label-swapped
    flips), the same run, so the two figures differ only at test time; `--tta-flip-labels` evaluates every
    run once more with `--tta` over flips it did not train with as well (time reversal: a left pan played
    backwards is a right pan).

Training is timed in wall seconds and in CPU seconds of the `stp train` process (the machine is shared).

Clips whose scene moves on its own (the bikes camera follows the riders; Megamind has cuts) carry a label
that is not all the motion the picture shows: each test clip's own scene motion is measured (the same
window position in consecutive source frames) and the figures are also given on the clips where it is
under half the slowest pan. `--steady-scene` cuts every clip (training and test) at such a place.

Run: python benchmarks/motion_classify.py [--work /tmp/stp-motion-classify] [--size 32] [--minutes 3]
       [--variant NAME='--augment none'] [--skip-default] [--steady-scene] [--clock cpu]
       [--tta-flip-labels t:left=right --tta-flip-labels t:up=down]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from copies import FOLDS, read_frames, write_video  # noqa: E402

CLASSES = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0), "still": (0, 0)}
MIRRORED = {"left": "right", "right": "left", "up": "down", "down": "up", "still": "still"}
SPEEDS = (1, 2, 3)   # pixels a frame in the 64x64 window (half that at --size 32)
WINDOW = 64
STEADY_TRIES = 200   # draws of a clip's place for `--steady-scene`


def make_clips(videos: str, work: str, per_class: int, frames: int, seed: int, own: dict = None,
               steady: bool = False) -> dict:
    """-> {fold: [(path, class), ...]}; clips are written once. Speeds cycle through `SPEEDS`.

    `own`, if given, is filled with each clip's path -> the scene's own motion inside its window, `(dy, dx)`
    pixels a frame at 64x64 (`source_motion`): what the picture does apart from the window's pan.
    `steady`: each clip's place (start frame, window) is drawn again until the scene's own motion there is
    under half the slowest pan (at most `STEADY_TRIES` draws; then the steadiest), so that the window's pan
    is the motion the picture shows and the label says it."""
    rng = np.random.default_rng(seed)
    out = {}
    for fold, names in FOLDS.items():
        out[fold] = []
        for name in names:
            source, rate = read_frames(os.path.join(videos, name), short_side=180)
            h, w = source[0].shape[:2]
            for label, (dy, dx) in CLASSES.items():
                folder = os.path.join(work, "clips", fold, label)
                os.makedirs(folder, exist_ok=True)
                for i in range(per_class):
                    step = SPEEDS[i % len(SPEEDS)] if (dy or dx) else 0
                    travel = step * (frames - 1)
                    best = moves = None
                    for _ in range(STEADY_TRIES if steady else 1):
                        t0 = int(rng.integers(0, len(source) - frames + 1))
                        y0 = int(rng.integers(travel if dy < 0 else 0, h - WINDOW - (travel if dy > 0 else 0) + 1))
                        x0 = int(rng.integers(travel if dx < 0 else 0, w - WINDOW - (travel if dx > 0 else 0) + 1))
                        if not steady:
                            break
                        moves = source_motion(source, t0, y0, x0, dy * step, dx * step, frames)
                        if best is None or np.abs(moves).max() < np.abs(best[0]).max():
                            best = (moves, t0, y0, x0)
                        if np.abs(best[0]).max() < 0.5 * min(SPEEDS):
                            break
                    if steady:
                        moves, t0, y0, x0 = best
                    path = os.path.join(folder, f"{os.path.splitext(name)[0]}-{i}-s{step}.mp4")
                    if not os.path.exists(path):
                        clip = [source[t0 + k][y0 + dy * step * k: y0 + dy * step * k + WINDOW,
                                               x0 + dx * step * k: x0 + dx * step * k + WINDOW]
                                for k in range(frames)]
                        write_video(path, clip, rate, crf=18)
                    if own is not None:   # measured already where the place was drawn for a steady scene
                        own[path] = moves if moves is not None else source_motion(source, t0, y0, x0, dy * step,
                                                                                   dx * step, frames)
                    out[fold].append((path, label))
    return out


def source_motion(source, t0: int, y0: int, x0: int, vy: int, vx: int, frames: int) -> np.ndarray:
    """The scene's own mean motion `(dy, dx)` (pixels a frame) inside a clip's window: each pair of
    consecutive source frames cut at the same window position (where the window is at the first of
    them), so the window's own pan is not in it. Measured like the baseline (phase correlation, grey)."""
    shifts = []
    for k in range(frames - 1):
        y, x = y0 + vy * k, x0 + vx * k
        a, b = (source[t0 + j][y:y + WINDOW, x:x + WINDOW].astype(np.float64).mean(axis=-1) for j in (k, k + 1))
        shifts.append(phase_shift(a, b))
    # In `phase_shift`'s convention: how the picture moves (opposite to a pan that would make it move so).
    return np.mean(shifts, axis=0)


def mirror_clips(clips, work: str) -> list:
    """The clips flipped (left/right pans left-right, up/down pans and still clips top-bottom), labels swapped."""
    import av

    out = []
    for path, label in clips:
        target = MIRRORED[label]
        mirrored = os.path.join(os.path.dirname(os.path.dirname(path)) + "-mirrored", target,
                                os.path.basename(path))
        if not os.path.exists(mirrored):
            os.makedirs(os.path.dirname(mirrored), exist_ok=True)
            with av.open(path) as c:
                rate = float(c.streams.video[0].average_rate)
                frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
            axis = 1 if label in ("left", "right") else 0
            write_video(mirrored, [np.flip(f, axis) for f in frames], rate, crf=18)
        out.append((mirrored, target))
    return out


# --- the baseline -------------------------------------------------------------------------------------

def grey_clip(path: str, size: int) -> np.ndarray:
    """float64 [T, size, size]: the clip's grey frames at the size the models see."""
    import av

    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="gray", width=size, height=size).astype(np.float64)
                         for f in c.decode(video=0)])


def phase_shift(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(dy, dx) by which frame `b` is `a` moved, to a pixel, by phase correlation (Hann-windowed)."""
    window = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    fa, fb = np.fft.fft2((a - a.mean()) * window), np.fft.fft2((b - b.mean()) * window)
    cross = fb * np.conj(fa)
    surface = np.real(np.fft.ifft2(cross / (np.abs(cross) + 1e-9)))
    peak = np.array(np.unravel_index(np.argmax(surface), surface.shape), np.float64)
    size = np.array(surface.shape)
    return np.where(peak > size / 2, peak - size, peak)


def shift_features(clips, size: int) -> np.ndarray:
    """[N, 2]: each clip's mean shift between consecutive frames."""
    feats = []
    for path, _ in clips:
        g = grey_clip(path, size)
        feats.append(np.mean([phase_shift(g[t], g[t + 1]) for t in range(len(g) - 1)], axis=0))
    return np.array(feats)


def baseline_accuracy(train, test, size: int, x_test: np.ndarray) -> np.ndarray:
    """Nearest class mean of the training clips' mean shifts -> whether each test clip is right (`x_test`: the
    test clips' `shift_features`); its mean is the accuracy."""
    x_train = shift_features(train, size)
    y_train = np.array([label for _, label in train])
    names = sorted(set(y_train))
    means = np.stack([x_train[y_train == n].mean(axis=0) for n in names])
    guess = np.argmin(((x_test[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    return np.array([names[g] == label for g, (_, label) in zip(guess, test)])


def measured_class(shift: np.ndarray, still_below: float) -> str:
    """The class a clip's measured mean shift names: `still` under `still_below` pixels a frame (half the
    slowest pan at the size measured), else the direction of its larger component. The picture moves
    opposite to the window, so the window's motion is -shift."""
    motion = -np.asarray(shift, np.float64)
    if np.abs(motion).max() < still_below:
        return "still"
    axis = int(np.argmax(np.abs(motion)))
    step = [0, 0]
    step[axis] = int(np.sign(motion[axis]))
    return next(name for name, move in CLASSES.items() if move == tuple(step))


def wrong_clips(run: str, test, *flags: str) -> set:
    """The test clips `stp predict` (the mean of a clip's patch predictions) puts in another class."""
    rows = [json.loads(line) for line in stp("predict", run, *[p for p, _ in test], "--json", "--top-k", "1",
                                             *flags).splitlines() if line.strip()]
    truth = dict(test)
    return {r["video"] for r in rows if r.get("label") != truth[r["video"]]}


# --- the product --------------------------------------------------------------------------------------

def sources(clips) -> list:
    """The source videos' stems of `clips`, in order (a clip's file name starts with its source's)."""
    return list(dict.fromkeys(os.path.basename(p).rsplit("-", 2)[0] for p, _ in clips))


# `--clock cpu`: `stp train --minutes` counts the process's CPU seconds / cores instead of wall seconds (what
# the same work takes on quiet cores), so a run shared with other jobs gets the same work as one alone.
CPU_CLOCK = ("import os, time; from stpkeras import budget; "
             "budget.CLOCK = lambda: time.process_time() / (os.cpu_count() or 1); ")
CLOCK_PREFIX = ""


def add_training_arguments(parser) -> None:
    """`--minutes`, `--clock`, `--variant` and `--skip-default`: how this script and motion_retrieval.py train."""
    parser.add_argument("--minutes", type=float, default=None, help="stp train --minutes (default: --epochs).")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                        help="A run with these extra `stp train` arguments (repeatable).")
    parser.add_argument("--skip-default", action="store_true", help="Leave out the run with the defaults.")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="what --minutes counts: wall seconds, or the training process's CPU seconds / cores "
                             "(a fair budget on a machine shared with other jobs)")


def training_plan(args) -> tuple:
    """`(budget, variants)` of `add_training_arguments`' flags: the `stp train` budget arguments and the
    `(name, extra arguments)` of each run; sets the clock `stp` trains by."""
    global CLOCK_PREFIX
    CLOCK_PREFIX = CPU_CLOCK if args.clock == "cpu" else ""
    budget = ["--minutes", str(args.minutes), "--epochs", "1000"] if args.minutes else ["--epochs", str(args.epochs)]
    variants = ([] if args.skip_default else [("default", [])]) + [
        (v.split("=", 1)[0], shlex.split(v.split("=", 1)[1])) for v in args.variant]
    return budget, variants


def stp(*args, quiet: bool = True) -> str:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", CLOCK_PREFIX + "from stpkeras.cli import run; run()", *args],
                          check=True, env=env, stdout=subprocess.PIPE, text=True)
    return done.stdout


def convert(train, test, data: str, size: int, frames: int) -> None:
    if os.path.isdir(data):
        return
    csv = data + ".csv"
    with open(csv, "w") as f:
        f.write("path,label,split\n")
        f.writelines(f"{p},{label},{split}\n" for split, clips in (("train", train), ("test", test))
                     for p, label in clips)
    stp("convert", csv, data, "--patch", f"{frames}x{size}x{size}", "--stride", f"8x{size}x{size}",
        "--resize", f"{size}x{size}", "--labels", ",".join(CLASSES), "-q")


def test_time_flags(extra: list, tta_flip_labels: list) -> list:
    """The evaluations of a run: `(label suffix, stp evaluate/predict flags, folder of its eval-test.json under the
    run; None: the run's own)`, as it is first; with `--tta` when it trained with `--flip-labels`; with
    `--tta-flip-labels` when the benchmark names some."""
    out = [("", (), None)]
    if "--flip-labels" in extra:
        out.append((" --tta", ("--tta",), "tta"))
    if tta_flip_labels:
        axes = "+".join(dict.fromkeys(f.split(":")[0] for f in tta_flip_labels))
        out.append((f" --tta +{axes}", ("--tta", *[a for f in tta_flip_labels for a in ("--tta-flip-labels", f)]),
                    f"tta-plus-{axes}"))
    return out


def train_and_evaluate(data: str, run: str, budget: list, seed: int, extra: list, evaluations: list) -> dict:
    """Trains (once) and evaluates on the test split -> wall and CPU seconds, epochs, and `{suffix: (video
    accuracy, patch accuracy)}` for each of `evaluations` (`test_time_flags`)."""
    timing = os.path.join(run, "timing.json")
    if not os.path.isfile(timing):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        stp("train", data, "--out", run, "--seed", str(seed), "--val-split", "none", "--verbose", "0",
            *budget, *extra)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(timing, "w") as f:
            json.dump({"wall": time.perf_counter() - started,
                       "cpu": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime}, f)
    with open(timing) as f:
        seconds = json.load(f)
    with open(os.path.join(run, "run.json")) as f:
        epochs = json.load(f).get("metrics", {}).get("epochs", "?")
    out = {"epochs": epochs, **seconds, "accuracy": {}}
    for suffix, flags, folder in evaluations:
        where = () if folder is None else ("--out", os.path.join(run, folder))
        result = json.loads(stp("evaluate", run, data, "--split", "test", "--json", *flags, *where))
        out["accuracy"][suffix] = (result["video"]["accuracy"], result["patch"]["accuracy"])
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", default=os.path.join(ROOT, "..", "shared", "data", "videos"))
    parser.add_argument("--work", default="/tmp/stp-motion-classify")
    parser.add_argument("--clips", type=int, default=12, help="Clips per class and source video.")
    parser.add_argument("--frames", type=int, default=32, help="Frames per clip.")
    parser.add_argument("--frames-per-patch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="Frames resized to SIZE x SIZE for every method.")
    add_training_arguments(parser)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="stp train --seed.")
    parser.add_argument("--clip-seed", type=int, default=0,
                        help="Draws the clips' places. Separate from --seed: clips are written once per --work, "
                             "so a second training seed must measure the same clips (their scene motion too).")
    parser.add_argument("--mirror", action="store_true", help="Also train on the mirrored training clips.")
    parser.add_argument("--folds", default=",".join(FOLDS), help="Held-out kinds to test on.")
    parser.add_argument("--steady-scene", action="store_true",
                        help="Cut clips only where the scene itself holds still (under half the slowest pan), so that "
                             "every label is the motion the picture shows (use another --work).")
    parser.add_argument("--tta-flip-labels", action="append", default=[], metavar="AXIS:A=B",
                        help="Also evaluate every run with --tta over these flips besides its own (repeatable; "
                             "e.g. t:left=right and t:up=down, time reversal).")
    args = parser.parse_args(argv)
    budget, variants = training_plan(args)

    own = {}
    clips = make_clips(args.videos, args.work, args.clips, args.frames, args.clip_seed, own,
                       steady=args.steady_scene)
    print(f"{sum(len(c) for c in clips.values())} clips of {args.frames} frames, {len(CLASSES)} classes, "
          f"{args.size}x{args.size}, patches {args.frames_per_patch} frames; chance {1 / len(CLASSES):.2f}; "
          f"training {' '.join(budget[:2])}{' + mirrored clips' if args.mirror else ''}", flush=True)
    for fold in args.folds.split(","):
        test = clips[fold]
        train = [c for f, cs in clips.items() if f != fold for c in cs]
        if args.mirror:
            train = train + mirror_clips(train, args.work)
        direction = f"{'/'.join(f for f in FOLDS if f != fold)} -> {fold}"
        x_test = shift_features(test, args.size)
        # Clips whose scene moves on its own inside the window (a camera following riders, a cut) by half the
        # slowest pan or more: their label (the window's pan) is not all the motion the picture shows. The
        # figures on the other clips ("steady scene") say how much of the error those clips make.
        moving = {p for p, _ in test if np.abs(own[p]).max() >= 0.5 * min(SPEEDS)}
        steady = [p for p, _ in test if p not in moving]
        right = baseline_accuracy(train, test, args.size, x_test)
        on_steady = np.mean([r for r, (p, _) in zip(right, test) if p not in moving])
        print(f"{direction:<22} baseline (phase correlation, nearest class mean)  video acc "
              f"{right.mean():.3f}  ({len(train)} train clips, {len(test)} test); on the {len(steady)} test clips "
              f"whose scene is steady {on_steady:.3f}", flush=True)
        # Clips whose own picture moves like another class: the source's motion (a camera following riders,
        # a cut) outweighs the window's pan. Counted to tell the product's errors on them from the rest.
        still_below = 0.5 * min(SPEEDS) * args.size / WINDOW   # 0.5 px a frame at 64x64, 0.25 at 32x32
        other = {p for (p, label), x in zip(test, x_test) if measured_class(x, still_below) != label}
        print(f"{direction:<22} test clips whose measured global motion names another class: {len(other)}; "
              f"whose scene moves on its own by >= {0.5 * min(SPEEDS)} px a frame: {len(moving)} "
              f"({', '.join(f'{n} {sum(os.path.basename(p).startswith(n) for p in moving)}' for n in sources(test))})",
              flush=True)
        tag = f"{args.size}-p{args.frames_per_patch}-f{args.frames}-c{args.clips}{'-m' if args.mirror else ''}"
        data = os.path.join(args.work, f"data-{fold}-{tag}")
        convert(train, test, data, args.size, args.frames_per_patch)
        for name, extra in variants:
            length = f"m{args.minutes}" if args.minutes else f"e{args.epochs}"
            run = os.path.join(args.work, f"run-{fold}-{tag}-{name}-{length}-s{args.seed}")
            evaluations = test_time_flags(extra, args.tta_flip_labels)
            r = train_and_evaluate(data, run, budget, args.seed, extra, evaluations)
            for suffix, _, _ in evaluations:
                video, patch = r["accuracy"][suffix]
                print(f"{direction:<22} {name + suffix:<48} video acc {video:.3f}  patch acc {patch:.3f}  " +
                      (f"({r['epochs']} epochs, {r['wall']:.0f}s wall, {r['cpu']:.0f}s CPU)" if not suffix else
                       "(the same run, each patch averaged over its label-swapped flips)"), flush=True)
            for suffix, flags, _ in evaluations:
                label = name + suffix
                wrong = wrong_clips(run, test, *flags)
                print(f"{direction:<22} {label:<48} clips wrong (stp predict{' ' if flags else ''}"
                      f"{' '.join(flags)}): {len(wrong)}, of which {len(wrong & other)} among those whose measured "
                      f"motion names another class, {len(wrong & moving)} among those whose scene moves; "
                      f"accuracy on the {len(steady)} steady-scene clips "
                      f"{1 - len(wrong - moving) / len(steady):.3f}", flush=True)


if __name__ == "__main__":
    main()
