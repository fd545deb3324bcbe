"""Benchmark: de-shaking a real clip shaken by a known path: `stp stabilize` against FFmpeg's vid.stab and deshake.

    python benchmarks/stabilize.py --quick [--video CLIP] [--run RUN_DIR [--motion-size N]] [--noise 0.1,0.2]

The clip (by default Big Buck Bunny, the animation: footage a model trained on camera footage has not seen;
`--video` another, e.g. tree.avi, camera footage for a model trained on animation) is scaled to 320x180 and
shaken with `stpkeras.shake` (seeded: translation, rotation, tremor frequencies) at full frame size. Every
method's output is then measured the same way, by phase correlation (`stabilize.phase_shift`, no model)
between consecutive frames' central 3/4 (`MEASURED`):

- residual jitter (px): RMS over frames of (the output's frame-to-frame shift - the clean clip's), in the
  output's pixels; also the median of its absolute value, and the RMS measured on the central half (the
  measure of before: on Big Buck Bunny one pair of the true-motion output, frames 34-35, gave a false peak
  of (3.05, -8.03) px there, which alone made 0.81 px of RMS; the other 58 pairs were within 0.3 px);
- stability: Liu et al.'s score of the path summed from those shifts (translation only);
- cropping ratio: from the warps for the stp rows; for vid.stab, 1 / its "Final zoom" (its log, optzoom 1:
  one zoom for the whole clip); deshake does not zoom (it fills the borders: 1.00); distortion: stp rows only;
- frames/s: wall clock of the whole method (both passes for vid.stab).

Rows: the shaken input; `stp stabilize` with the true motion as its "model" (the path machinery alone:
the best a motion estimate can do), with `--crop auto` and with `--crop` at each vid.stab row's cropping
ratio (the windowed path: the comparisons at a cropping no worse; a ratio beyond stp's 1.5x zoom is left
out); with `--noise`, the true motion plus white noise on dx, dy at the defaults' crop (what accuracy a
model needs); `stp stabilize` with the model of `--run` at the same crops, when given (and its motion
estimate of the shaken clip against the true motion: correlation, mean absolute error and gain of dx, dy in
frame pixels); vid.stab with defaults (shakiness 5, accuracy 15, smoothing 15 as this FFmpeg's log shows),
tuned (shakiness 8, accuracy 15, smoothing 25, optzoom 1) and with its detection's contrast threshold
lowered (mincontrast 0.05, for low-contrast footage); deshake.

The commands behind the figures on docs/stabilization.md (a softmotion trained on camera footage, tested
on the animation; one trained on the animation, tested on camera footage):

    stp convert CAMERA_VIDEOS/ data-cam --patch 4x96x96 --stride 2x24x24 --short-side 96
    stp train data-cam --out runs-cam --task stabilize --shake 1.0,1.5,2 --epochs 30 --batch-size 16 \
        --lr 2e-3 --seed 0 --minutes 10
    python benchmarks/stabilize.py --quick --run runs-cam --motion-size 180 --strip docs/stabilization-strip.png
    python benchmarks/stabilize.py --quick --run runs-anim --motion-size 180 --video ../shared/data/videos/tree.avi
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import stpkeras  # noqa: F401  (first, before TensorFlow loads: it turns TensorFlow's oneDNN CPU kernels on)

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from stpkeras import shake  # noqa: E402
from stpkeras.camera_paths import MAX_ZOOM  # noqa: E402
from stpkeras.stabilize import (CameraMotion, camera_path, estimate_motion, load_motion_model,  # noqa: E402
                                phase_shift, render, stability_score, stabilize_video)
from videos import decode_all, write_video  # noqa: E402

VIDEO = "/work/shared/data/videos/bigbuckbunny.mp4"


MEASURED = 0.75   # the share of the frame's height and width (central) that the frame-to-frame shift is measured on


def shifts(frames: np.ndarray, share: float = MEASURED) -> np.ndarray:
    """`[N - 1, 2]` shifts between consecutive frames' central `share` (phase correlation, Hann-windowed: the
    window already fades the edges, where borders of a method's warp would show)."""
    h, w = frames.shape[1:3]
    top, left = int(round(h * (1 - share) / 2)), int(round(w * (1 - share) / 2))
    centre = frames[:, top:h - top, left:w - left]
    return np.array([phase_shift(a, b) for a, b in zip(centre[:-1], centre[1:])])


def measure(path: str, clean: dict, seconds: float, frames: int, extra=None) -> dict:
    """`clean`: {share: `shifts`} of the clean clip at the shaken clip's zoom, for `MEASURED` and 0.5 (its own
    motion is subtracted; measured once for every row)."""
    out, _ = decode_all(path)
    s = shifts(out)
    n = min(len(s), len(clean[MEASURED]))
    error = s[:n] - clean[MEASURED][:n]
    half = shifts(out, 0.5)[:n] - clean[0.5][:n]
    row = {"jitter_px": float(np.sqrt(np.mean(error ** 2))), "jitter_median_px": float(np.median(np.abs(error))),
           "jitter_half_px": float(np.sqrt(np.mean(half ** 2))),
           "stability": stability_score(np.concatenate([camera_path(np.pad(s, ((0, 0), (0, 2))))[:, :2],
                                                        np.zeros((len(s) + 1, 1))], 1))["stability_translation"],
           "cropping": None, "distortion": None, "fps": frames / seconds if seconds else None}
    row.update(extra or {})
    return row


def ffmpeg(args, cwd, loglevel: str = "error") -> str:
    """Runs ffmpeg; returns its log (stderr). A failure raises with the command, its code and its log."""
    done = subprocess.run(["ffmpeg", "-y", "-loglevel", loglevel, *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(done.args)} exited with {done.returncode}: {done.stderr[-2000:]}")
    return done.stderr


def vidstab_cropping(log: str) -> float:
    """1 / the zoom vidstabtransform reports ("Final zoom: 18.47", percent) in its verbose log."""
    match = re.search(r"Final zoom: (-?[0-9.]+)", log)
    if match is None:
        raise RuntimeError(f"vidstabtransform's log has no 'Final zoom' line; expected one at -loglevel verbose. "
                           f"Received: {log[-500:]}")
    return 1.0 / (1.0 + float(match.group(1)) / 100.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 frames instead of the whole 132")
    parser.add_argument("--run", default=None, help="a stp train --task stabilize run folder")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--motion-size", type=int, default=None, metavar="PIXELS",
                        help="stp stabilize --motion-size for the --run model (default: the size it was trained at)")
    parser.add_argument("--video", default=VIDEO,
                        help="the clean clip to shake (default: Big Buck Bunny, the animation; e.g. "
                             "../shared/data/videos/tree.avi for camera footage, against a model trained on animation)")
    parser.add_argument("--noise", type=lambda v: [float(x) for x in v.split(",") if x], default=[],
                        metavar="STD,...", help="also the true motion plus white noise of these deviations (frame "
                                                "pixels, dx and dy) at vid.stab's cropping: the accuracy a model needs")
    parser.add_argument("--strip", default=None, metavar="PNG",
                        help="also draw a few frames of the shaken input and of the stp output (the model's when "
                             "--run is given) into this PNG (docs/stabilization-strip.png)")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="stab-bench-")
    try:
        clean, _ = decode_all(args.video, size=(180, 320))
        clean = clean[:60] if args.quick else clean
        n = len(clean)
        path = shake.random_path(tf.constant([args.seed, 5], tf.int64), n, 180, 320,
                                 shake.ShakeLimits(shift=1.0, degrees=1.0, zoom_percent=0.0))
        shaken = shake.shake_patch(tf.constant(clean), path).numpy()
        rel = shake.relative_motion(path, 320).numpy()
        truth = np.concatenate([rel[:, :2], rel[:, 2:] / shake.motion_units(320)], 1).astype(np.float32)
        # The clean clip at the same zoom as the shaken one (shake.ZOOM), so its own motion compares.
        still_path = tf.zeros_like(path)
        clean_zoomed = shake.shake_patch(tf.constant(clean), still_path).numpy()
        clean_shifts = {share: shifts(clean_zoomed, share) for share in (MEASURED, 0.5)}
        src = write_video(os.path.join(tmp, "shaky.mp4"), shaken)
        rows = {"shaken input": measure(src, clean_shifts, 0, n, {"cropping": 1.0, "distortion": 1.0})}

        baselines = {}
        for name, detect, transform in [
                ("vid.stab defaults", "vidstabdetect", "vidstabtransform"),
                ("vid.stab tuned", "vidstabdetect=shakiness=8:accuracy=15",
                 "vidstabtransform=smoothing=25:optzoom=1"),
                # Its detection keeps only fields of contrast >= 0.25 by default; low-contrast footage (tree.avi:
                # 0-4 fields a frame) needs this lower. The defaults otherwise.
                ("vid.stab mincontrast 0.05", "vidstabdetect=mincontrast=0.05", "vidstabtransform")]:
            t = time.perf_counter()
            detect += (":" if "=" in detect else "=") + "result=t.trf"
            transform += (":" if "=" in transform else "=") + "input=t.trf"
            ffmpeg(["-i", "shaky.mp4", "-vf", detect, "-f", "null", "-"], tmp)
            out = f"vidstab{len(baselines)}.mp4"   # vidstab0.mp4: the defaults (drawn in --strip)
            log = ffmpeg(["-i", "shaky.mp4", "-vf", transform, "-c:v", "libx264", "-crf", "18", out], tmp,
                         loglevel="verbose")
            baselines[name] = measure(os.path.join(tmp, out), clean_shifts,
                                      time.perf_counter() - t, n, {"cropping": vidstab_cropping(log)})
        t = time.perf_counter()
        ffmpeg(["-i", "shaky.mp4", "-vf", "deshake", "-c:v", "libx264", "-crf", "18", "deshake.mp4"], tmp)
        baselines["deshake"] = measure(os.path.join(tmp, "deshake.mp4"), clean_shifts, time.perf_counter() - t, n,
                                       {"cropping": 1.0})
        # stp at vid.stab's own cropping ratios: the comparisons at "cropping no worse".
        vidstab_crops = sorted({round(row["cropping"], 4): row["cropping"] for name, row in baselines.items()
                                if "vid.stab" in name}.values(), reverse=True)   # each once, exact
        crops = [("auto", "")] + [(c, f", crop {c:.3f}") for c in vidstab_crops
                                  if 1 / MAX_ZOOM <= c <= 1]   # vid.stab may zoom past what stp allows (bikes)
        # The noise rows at the defaults' cropping, or at stp's own (auto) where that is beyond stp's zoom.
        matched = baselines["vid.stab defaults"]["cropping"]
        matched, matched_label = (matched, f"{matched:.3f}") if 1 / MAX_ZOOM <= matched <= 1 else ("auto", "auto")

        def stp_row(name, render_fn, out):
            t = time.perf_counter()
            r = render_fn(out)
            rows[name] = measure(r.out, clean_shifts, time.perf_counter() - t, n,
                                 {"cropping": r.output["cropping"], "distortion": r.output["distortion"]})

        motion = CameraMotion(truth, 25.0, 180, 320)
        for crop, label in crops:
            stp_row(f"stp, true motion{label}", lambda out: render(src, out, motion, smoothing=1.0, crop=crop),
                    os.path.join(tmp, "true.mp4" if crop == "auto" else "true-crop.mp4"))
        # The accuracy a motion estimate needs: the true motion plus seeded white noise on dx, dy (frame pixels).
        noise_rng = np.random.default_rng(args.seed)
        for sigma in args.noise:
            noisy = truth.copy()
            noisy[:, :2] += noise_rng.normal(0.0, sigma, noisy[:, :2].shape)
            mae = float(np.abs(noisy[:, :2] - truth[:, :2]).mean())
            stp_row(f"stp, true + noise MAE {mae:.2f} px, crop {matched_label}",
                    lambda out: render(src, out, CameraMotion(noisy, 25.0, 180, 320), smoothing=1.0, crop=matched),
                    os.path.join(tmp, f"noise{sigma}.mp4"))
        report = {}
        if args.run:
            model = load_motion_model(args.run, args.motion_size)
            for crop, label in crops:
                stp_row(f"stp, model{label}",
                        lambda out: stabilize_video(model, src, out, smoothing=1.0, crop=crop),
                        os.path.join(tmp, "model.mp4" if crop == "auto" else "model-crop.mp4"))
            # The model's motion estimate of the shaken clip against the true motion (frame pixels).
            estimate = estimate_motion(model, src).motions
            report["model motion estimate"] = {
                name: {"r": float(np.corrcoef(estimate[:, k], truth[:, k])[0, 1]),
                       "mae_px": float(np.abs(estimate[:, k] - truth[:, k]).mean()),
                       # the gain: a model's must be within ~3% of 1 (docs/stabilization.md)
                       "slope": float(np.polyfit(truth[:, k], estimate[:, k], 1)[0]),
                       "mean_abs_true_px": float(np.abs(truth[:, k]).mean())}
                for k, name in enumerate(("dx", "dy"))}
        rows.update(baselines)
        if args.strip:
            from stpkeras.figures import draw_frame_strip

            picked = np.linspace(10, n - 11, 4).astype(int)
            out_frames, _ = decode_all(os.path.join(tmp, "model.mp4" if args.run else "true.mp4"))
            label = "stp stabilize\n(model)" if args.run else "stp stabilize\n(true motion)"
            vidstab, _ = decode_all(os.path.join(tmp, "vidstab0.mp4"))
            draw_frame_strip([("shaken\ninput", shaken[picked]), (label, out_frames[picked]),
                              ("vid.stab\ndefaults", vidstab[picked])], args.strip, frame_numbers=list(picked),
                             title=f"{os.path.basename(args.video)} shaken by a known path (320x180)")
        print(json.dumps({"video": args.video, "frames": n, "size": "320x180", "rows": rows, **report}, indent=1))
        print(f"{'method':42s} {'jitter px':>9s} {'median':>7s} {'half':>7s} {'stability':>9s} {'cropping':>8s} "
              f"{'distortion':>10s} {'fps':>7s}")
        for name, row in rows.items():
            def fmt(v, f):
                return format(v, f) if v is not None else "-"
            print(f"{name:42s} {fmt(row['jitter_px'], '9.3f')} {fmt(row['jitter_median_px'], '7.3f')} "
                  f"{fmt(row['jitter_half_px'], '7.3f')} {fmt(row['stability'], '9.3f')} "
                  f"{fmt(row['cropping'], '8.3f')} {fmt(row['distortion'], '10.3f')} {fmt(row['fps'], '7.1f')}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
