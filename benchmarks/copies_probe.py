"""Benchmark probe: copies of letterboxed and cropped queries, with the bars stripped and the gallery cropped.

Reads what `benchmarks/copies.py --work WORK` left (its gallery, queries and `run-*` embeddings) and scores
every query against every gallery segment in four ways, for the 8x8 thumbnail and for each trained run read
through `--pool` mean, grid:4 and grid:8:

  - `strip`: the query's black bars (rows whose brightest value over the whole video stays under 20) are cut
    away before embedding (a letterboxed copy then shows only its picture, as its source does);
  - `views`: every gallery segment is also embedded as central crops of `SCALES` (default 1, 0.85, 0.7: not
    the queries' 0.8), and a segment scores its best view (database-side views);
  - `mean` (the cosine of the mean vectors) or `windows` (Chamfer over windows), both centred on the mean of
    every gallery view, as `stpkeras.index` centres.

A query counts when its own segment scores highest among the gallery. Each run answers only the queries of
the fold it did not train on (the run's name says which fold it is for).

    python benchmarks/copies.py --work /tmp/copies ...      # makes the data and the runs first
    SCALES=1,0.85,0.7 python benchmarks/copies_probe.py /tmp/copies
"""

from __future__ import annotations

import glob
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import copies  # noqa: E402
from copies import read_frames, write_video  # noqa: E402

SCALES = [float(s) for s in os.environ.get("SCALES", "1,0.85,0.7").split(",")]
BAR = 20   # a row whose brightest value over the video stays under this is a black bar


def crop_file(src: str, out: str, scale: float) -> str:
    """The central `scale` of every frame of `src`, written once to `out` (libx264 crf 18)."""
    dst = os.path.join(out, os.path.basename(src)[:-4] + f"-c{int(scale * 100)}.mp4")
    if not os.path.exists(dst):
        frames, rate = read_frames(src)
        h, w = frames[0].shape[:2]
        ch, cw = 2 * int(h * scale / 2), 2 * int(w * scale / 2)
        t, left = (h - ch) // 2, (w - cw) // 2
        write_video(dst, [f[t:t + ch, left:left + cw] for f in frames], rate, crf=18)
    return dst


def strip_file(src: str, out: str) -> str:
    """`src` without its black bars top and bottom, written once to `out` (crf 0: no further loss)."""
    dst = os.path.join(out, "stripped-" + os.path.basename(src))
    if not os.path.exists(dst):
        frames, rate = read_frames(src)
        rows = np.max([f.mean(axis=(1, 2)) for f in frames], axis=0)
        keep = np.nonzero(rows > BAR)[0]
        top, bottom = 2 * ((keep[0] + 1) // 2), 2 * ((keep[-1] + 1) // 2)
        write_video(dst, [f[top:bottom] for f in frames], rate, crf=0)
    return dst


def main(work: str) -> None:
    from stpkeras.index import _normalize, chamfer_scores, embed_video_windows, load_embedder

    out = os.path.join(work, "probe")
    os.makedirs(out, exist_ok=True)
    gallery = {os.path.basename(p)[:-4]: p for p in sorted(glob.glob(os.path.join(work, "gallery", "*.mp4")))}
    views = {k: [p if s == 1 else crop_file(p, out, s) for s in SCALES] for k, p in gallery.items()}
    queries = sorted(glob.glob(os.path.join(work, "queries", "*.mp4")))
    embedders = {"thumbnail 8x8": (None, None)}
    for run in sorted(glob.glob(os.path.join(work, "run-*"))):
        for pool in ("mean", "grid:4", "grid:8"):
            embedders[f"{os.path.basename(run)}, pool {pool}"] = (run, pool)
    for name, (run, pool) in embedders.items():
        embedder = copies.thumbnail_embedder() if run is None else load_embedder(run, pool)
        fold = next((f for f in copies.FOLDS if run and f"run-{f}-" in run), None)
        stems = [os.path.splitext(n)[0] for n in copies.FOLDS[fold]] if fold else None
        asked = [q for q in queries if stems is None or os.path.basename(q).split(".")[0].rsplit("-", 1)[0] in stems]
        embedded = {k: [embed_video_windows(embedder, p).windows for p in ps] for k, ps in views.items()}
        center = np.concatenate([w for ws in embedded.values() for w in ws]).mean(0)
        # Each segment's views, centred and normalised as `stpkeras.index` does: (windows, their mean's direction).
        prepared = {k: [(g, _normalize(g.mean(0))) for g in (_normalize(w - center) for w in ws)]
                    for k, ws in embedded.items()}
        for strip in (False, True):
            asked_windows = {q: _normalize(embed_video_windows(embedder, strip_file(q, out) if strip else q).windows
                                           - center) for q in asked}
            for aggregate in ("mean", "windows"):
                for count in (1, len(SCALES)):
                    found, missed = 0, []
                    for q, qw in asked_windows.items():
                        direction = _normalize(qw.mean(0))
                        scores = {k: max(float(direction @ m) if aggregate == "mean"
                                         else float(chamfer_scores(qw, g, np.array([0, len(g)]))[0])
                                         for g, m in segment[:count])
                                  for k, segment in prepared.items()}
                        if max(scores, key=scores.get) == os.path.basename(q).split(".")[0]:
                            found += 1
                        else:
                            missed.append(os.path.basename(q))
                    print(f"{name:<52} strip {int(strip)}  {aggregate:<8} gallery views {count}  "
                          f"{found}/{len(asked)}  missed: {', '.join(missed) or '-'}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/stp-copies")
