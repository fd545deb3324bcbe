"""Benchmark: H.264 restoration against the classical post-filters for compressed video, on whole files.

A user with H.264 footage has had post-filters for block and ringing artifacts for twenty years: FFmpeg's
`spp` (the "simple post-processing" filter: each block re-quantized in the DCT domain at every shift of the
grid and the results averaged), `fspp` and `pp7` (faster variants of the same idea), `deblock`, and the
denoiser `hqdn3d`. Those are the baseline a restoration model has to beat, measured here on the same
files the model restores and against the same clean originals, in one run.

Each filter's parameters are chosen per video on that video's own clean original (the best luma PSNR over
a small grid: an oracle choice, in the filter's favour). FFmpeg 5.1's filters cannot read H.264's quantizer
tables (`spp` with `-export_side_data venc_params` fails: "Function not implemented"; they read MPEG-style
tables only), so each is given a fixed quantizer from the grid, which is what the grid tunes.

With `--run RUN` (a `stp train --task enhance` run on the footage's re-encodings, as
`benchmarks/restore_self.py` trains them), the model's output is measured beside them: `stp enhance RUN
VIDEO --lossless` (what the model computes, not blurred by a second encode), with `--written` the same at the
crf a user gets by default (crf 10 for a model trained on pairs), and the lossless output then post-filtered by
the best `spp` (do the two remove the same error?).

PSNR is FFmpeg's (`psnr` filter) on 4:4:4 YUV of the whole video against the lossless copy of the original
(`codec.write_copies`' `*-clean.mkv`), as docs/benchmarks.md's earlier "through `stp enhance`" figures.
The files are `benchmarks/restore_self.py`'s: its `--out` folder holds `copies/STEM-crfN.mp4` and
`copies/STEM-clean.mkv` of each video of the fold.

    python benchmarks/restore_self.py --fold camera --clock cpu --source self@1:auto --seed 1 --out WORK
    python benchmarks/codec_postfilters.py --fold camera --work WORK [--run WORK/run-... [--written]] [--crf 37]

Needs `ffmpeg` on PATH (Debian's package: a baseline, not a dependency of stpkeras).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
FOLDS = {"camera": ("bikes", "tree"), "animation": ("bigbuckbunny", "Megamind_bugy")}

# Each family's grid; the parameters are FFmpeg's (ffmpeg -h filter=NAME). spp/fspp/pp7's `qp` is an
# MPEG-style quantizer (1-63): how strong a DCT coefficient must be to survive.
GRIDS = {
    "spp": [f"spp=quality={q}:qp={p}" for q in (3, 6) for p in (2, 3, 4, 5, 6, 8, 10, 12, 16, 20)],
    "fspp": [f"fspp=qp={p}" for p in (2, 3, 4, 6, 8, 12)],
    "pp7": [f"pp7=qp={p}" for p in (2, 3, 4, 6, 8, 12, 16)],
    "deblock": [f"deblock=filter={f}:block={b}" for f in ("weak", "strong") for b in (4, 8)],
    "hqdn3d": [f"hqdn3d={s}:{s * 0.75:g}:{t}:{t * 0.75:g}" for s in (0.5, 1, 2, 4) for t in (0, 1.5, 3)],
}
_PSNR = re.compile(r"PSNR y:([\d.inf]+) u:([\d.inf]+) v:([\d.inf]+) average:([\d.inf]+)")


def psnr(video: str, clean: str, chain: str = "") -> dict:
    """FFmpeg's PSNR of `video` (through the filter `chain`, if any) against `clean`, on 4:4:4 YUV."""
    graph = f"[0:v]{chain + ',' if chain else ''}format=yuv444p[a];[1:v]format=yuv444p[b];[a][b]psnr"
    proc = subprocess.run(["ffmpeg", "-hide_banner", "-nostats", "-threads", "1", "-i", video, "-i", clean,
                           "-lavfi", graph, "-f", "null", "-"], capture_output=True, text=True)
    found = _PSNR.findall(proc.stderr)
    if proc.returncode or not found:
        raise RuntimeError(f"ffmpeg failed on {video} with {chain!r}: {proc.stderr.strip().splitlines()[-1:]}")
    y, u, v, mean = (float(x) for x in found[-1])
    return {"y": y, "u": u, "v": v, "mean": mean}


def best_of(video: str, clean: str, chains) -> tuple:
    """The chain with the best luma PSNR, and its scores (the oracle choice)."""
    scored = [(psnr(video, clean, c), c) for c in chains]
    score, chain = max(scored, key=lambda s: s[0]["y"])
    return chain, score


def children_cpu() -> float:
    """CPU seconds of this process's finished children (FFmpeg, `stp enhance`), where the work is."""
    t = os.times()
    return t.children_user + t.children_system


def enhance(run: str, video: str, out: str, extra) -> str:
    if not os.path.exists(out):
        subprocess.run([sys.executable, "-m", "stpkeras.cli", "enhance", run, video, "--out", out, *extra],
                       check=True, cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                       stdout=subprocess.DEVNULL)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fold", choices=sorted(FOLDS), default="camera")
    parser.add_argument("--work", required=True, help="benchmarks/restore_self.py's --out folder")
    parser.add_argument("--stems", default=None, help="the videos' names, comma-separated (default: the fold's)")
    parser.add_argument("--crf", type=int, default=37, help="the level of the compressed copies")
    parser.add_argument("--run", default=None, help="a restoration run to measure beside the filters")
    parser.add_argument("--written", action="store_true",
                        help="also measure the run's output as `stp enhance` writes it by default")
    parser.add_argument("--json", default=None, help="write the figures here too")
    args = parser.parse_args(argv)
    if shutil.which("ffmpeg") is None:
        parser.error("needs ffmpeg on PATH (apt-get install ffmpeg)")
    copies = os.path.join(args.work, "copies")
    results = {}
    for stem in args.stems.split(",") if args.stems else FOLDS[args.fold]:
        video = os.path.join(copies, f"{stem}-crf{args.crf}.mp4")
        clean = os.path.join(copies, f"{stem}-clean.mkv")
        for path in (video, clean):
            if not os.path.exists(path):
                parser.error(f"expected {path}: run benchmarks/restore_self.py --fold {args.fold} "
                             f"--crf {args.crf} --out {args.work} first")
        rows = {"input": ("", psnr(video, clean))}
        started = children_cpu()
        for family, chains in GRIDS.items():
            rows[family] = best_of(video, clean, chains)
            print(f"{stem}: {family} {rows[family][0]} {rows[family][1]['y']:.3f}", flush=True)
        if args.run:
            name = os.path.basename(os.path.normpath(args.run))
            lossless = enhance(args.run, video, os.path.join(args.work, f"{stem}-crf{args.crf}-{name}-lossless.mp4"),
                               ["--lossless"])
            rows["model, lossless"] = ("", psnr(lossless, clean))
            if args.written:
                written = enhance(args.run, video, os.path.join(args.work, f"{stem}-crf{args.crf}-{name}.mp4"), [])
                rows["model, as written (default crf)"] = ("", psnr(written, clean))
            rows["model, lossless, then spp"] = best_of(lossless, clean, GRIDS["spp"])
        results[stem] = {k: {"chain": c, **s} for k, (c, s) in rows.items()}
        print(f"{stem}: {children_cpu() - started:.0f} CPU s of FFmpeg and `stp enhance`")
    print(f"\n| {args.fold}, crf {args.crf}: Y dB (mean of Y, U, V) | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    base = {stem: r["input"] for stem, r in results.items()}
    for key in next(iter(results.values())):
        cells = []
        for stem, r in results.items():
            s = r[key]
            gain = "" if key == "input" else f" ({s['y'] - base[stem]['y']:+.3f})"
            cells.append(f"{s['y']:.3f}{gain} ({s['mean']:.3f}) {('`' + s['chain'] + '`') if s['chain'] else ''}")
        print(f"| {key} | " + " | ".join(cells) + " |")
    if args.json:
        from tfrecords_tools import outputs

        outputs.write_text(args.json, json.dumps({"fold": args.fold, "crf": args.crf, "run": args.run,
                                                  "videos": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
