"""Benchmark: near-duplicate (copy) retrieval on real footage, against the mean colour thumbnail.

Gallery: every source video (default: the sample videos in ../shared/data/videos) cut into
`--segments` consecutive segments, each written with libx264 at crf 18 (short side at most 360).
The other segments of the same source are the same-scene distractors.

Queries, for every segment, made with PyAV's encoder as a copy would be:
  - `copy`:  trimmed (the first 25% and last 15% of its frames cut), border-cropped (10% off each
             side), downscaled to half size, re-encoded with libx264 at crf 35;
  - `copy+speed`: the same, played 1.5x faster (every third frame dropped) and letterboxed
             (black bars of 12% of the height above and below).
A query is found when its own segment is its rank-1 result.

Held-out footage: the sources are split in two folds by kind (camera: bikes, tree; animation:
bigbuckbunny, Megamind). For each fold an embedding is trained (`stp train --task embed`, default
copy views) on the *other* fold's whole videos only, and answers the queries of its fold; the
gallery holds every segment of both folds.

Methods, measured in the same run:
  - thumbnail (L2): each video's mean over frames of its 8x8 RGB thumbnail, nearest by Euclidean
    distance (the simplest thing that works, as the issue measured it);
  - thumbnail + index: the same 8x8 thumbnail as an embedder in `stpkeras.index` (frames squeezed
    to the patch), aggregated by `mean` and by `windows`;
  - embed (crop,color): `--task embed` with the views of the earlier release, by mean and by windows;
  - embed (copy views): the default views, by mean and by windows.
  - with `--copy-reading 1,0.85,0.7`: each of these indexed as `stp index --strip-bars --views 1,0.85,0.7`
    reads (every video inside its black bars; each gallery segment also as its central 85% and 70%);
  - with `--rerank N` as well: the first N results re-ordered by `stp search --rerank N` (the detail of
    the query's frames aligned to each segment's).
Each line also gives the closest call: the smallest lead of a found query's own segment over the next one,
in the score that ranked them (the cosine, or the frame match for re-ranked results).
Frame-level features of an ImageNet model are not measured: no weights are available offline
(checked: ~/.keras/models absent, no torch/timm/tensorflow_hub/open_clip in the environment, no
*.h5/*.pth/*.onnx weights on the machine); pass `--image-model` to add them where Keras can load
its application weights.

Run: python benchmarks/copies.py [--videos ../shared/data/videos] [--work /tmp/copies] [--epochs 6] [--skip-old-views]
         [--pool grid:8] [--copy-reading 1,0.85,0.7] [--rerank 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

FOLDS = {"camera": ("bikes.mp4", "tree.avi"), "animation": ("bigbuckbunny.mp4", "Megamind_bugy.avi")}
PATCH = "8x32x32"     # frames squeezed to 32x32: a copy's layout, not its detail (and cheap on 2 cores)
THUMB = 8


# --- making the gallery and the copies --------------------------------------------------------------

def read_frames(path: str, short_side: int = 360) -> tuple:
    """All frames of `path` in decoding order (RGB uint8), scaled so the short side is at most `short_side`."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        frames = []
        for frame in container.decode(stream):
            scale = min(1.0, short_side / min(frame.width, frame.height))
            w, h = 2 * int(frame.width * scale / 2), 2 * int(frame.height * scale / 2)
            frames.append(frame.to_ndarray(format="rgb24", width=w, height=h))
    return frames, rate


def write_video(path: str, frames, rate: float, crf: int) -> None:
    import av

    from tfrecords_tools import outputs

    h, w = frames[0].shape[:2]
    with outputs.atomic_file(path) as tmp:
        with av.open(tmp, "w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=round(rate))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"crf": str(crf), "preset": "veryfast"}
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)


def copy_frames(frames, speed: bool) -> list:
    """A segment's frames -> its copy's (module docstring)."""
    from PIL import Image

    n = len(frames)
    kept = frames[int(0.25 * n): n - int(0.15 * n)]
    if speed:
        kept = [f for i, f in enumerate(kept) if i % 3 != 2]
    h, w = kept[0].shape[:2]
    top, left = int(0.1 * h), int(0.1 * w)
    out = []
    for f in kept:
        small = Image.fromarray(f[top:h - top, left:w - left]).resize(
            (2 * ((w - 2 * left) // 4), 2 * ((h - 2 * top) // 4)), Image.BILINEAR)
        a = np.asarray(small)
        if speed:
            bar = 2 * int(0.06 * a.shape[0])
            a = np.pad(a, ((bar, bar), (0, 0), (0, 0)))
        out.append(a)
    return out


def make_data(videos: str, work: str, segments: int) -> dict:
    """-> {'gallery': {segment: path}, 'queries': {query: (segment, fold)}, 'sources': {fold: [paths]}}."""
    gallery, queries, sources = {}, {}, {}
    os.makedirs(os.path.join(work, "gallery"), exist_ok=True)
    os.makedirs(os.path.join(work, "queries"), exist_ok=True)
    for fold, names in FOLDS.items():
        sources[fold] = [os.path.join(videos, n) for n in names]
        for name in names:
            frames, rate = read_frames(os.path.join(videos, name))
            stem = os.path.splitext(name)[0]
            bounds = np.linspace(0, len(frames), segments + 1).astype(int)
            for s in range(segments):
                part = frames[bounds[s]:bounds[s + 1]]
                seg = os.path.join(work, "gallery", f"{stem}-{s}.mp4")
                if not os.path.exists(seg):
                    write_video(seg, part, rate, crf=18)
                gallery[f"{stem}-{s}"] = seg
                for kind, speed in (("copy", False), ("copy+speed", True)):
                    q = os.path.join(work, "queries", f"{stem}-{s}.{kind.replace('+', '-')}.mp4")
                    if not os.path.exists(q):
                        write_video(q, copy_frames(part, speed), rate, crf=35)
                    queries[q] = (f"{stem}-{s}", fold, kind)
    return {"gallery": gallery, "queries": queries, "sources": sources}


# --- the methods ------------------------------------------------------------------------------------

def thumbnail_l2(data: dict) -> dict:
    """Query -> its gallery segments, nearest first, by the L2 distance of mean 8x8 thumbnails."""
    from PIL import Image

    def thumb(path):
        frames, _ = read_frames(path)
        return np.mean([np.asarray(Image.fromarray(f).resize((THUMB, THUMB), Image.BOX), np.float32)
                        for f in frames], axis=0).ravel()

    names = list(data["gallery"])
    g = np.stack([thumb(data["gallery"][n]) for n in names])
    return {q: [names[j] for j in np.argsort(np.linalg.norm(g - thumb(q), axis=1))] for q in data["queries"]}


def thumbnail_embedder():
    from stpkeras.index import thumbnail_embedder as thumbnails
    from tfrecords_tools.spec import PatchSpec, parse_triple

    t, h, w = parse_triple(PATCH)
    return thumbnails(PatchSpec(t, h, w, resize=(h, w)), THUMB)


def ranked(embedder, data: dict, aggregate: str, queries, reading=None, rerank: int = 0) -> dict:
    """Index the gallery with `embedder` (read as `reading`, `stp index --strip-bars --views`), search
    `queries` (read as `stp search` reads them for that index; `rerank`: `stp search --rerank`) -> query:
    gallery names best first."""
    from stpkeras.index import Reading, VideoIndex, embed_video_windows, embed_videos, reranked_hits

    reading = reading or Reading()
    names = list(data["gallery"])
    embedded = embed_videos(embedder, [data["gallery"][n] for n in names], reading=reading)
    if embedded.failed:
        raise RuntimeError(f"gallery videos failed: {embedded.failed}")
    index = VideoIndex.build(embedded, aggregate=aggregate)
    by_path = {p: n for n, p in data["gallery"].items()}
    out = {}
    for q in queries:
        region, = reading.regions(q, indexed=False)
        hits = index.search_windows([embed_video_windows(embedder, q, region=region).windows], k=len(names))[0]
        if rerank:
            hits = reranked_hits(q, hits, rerank, region=region if reading.strip_bars else None)
        # (segment, the score it was ranked by: the frame match for the re-ranked ones, else the cosine)
        out[q] = [(by_path[h.video], h.score if h.matched is None else h.matched) for h in hits]
    return out


def stp(*args) -> None:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", "from stpkeras.cli import run; run()", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def train(sources, work: str, fold: str, name: str, augment: str, epochs: int, seed: int, model_args=(),
          patch: str = PATCH) -> tuple:
    """Converts the whole videos `sources` (once per fold and patch) and trains an embedding on them: (run, seconds)."""
    data = os.path.join(work, f"data-{fold}" + ("" if patch == PATCH else f"-{patch}"))
    run = os.path.join(work, f"run-{name}")
    if not os.path.isdir(data):
        folder = os.path.join(work, f"sources-{fold}")
        os.makedirs(folder, exist_ok=True)
        for s in sources:
            if not os.path.lexists(os.path.join(folder, os.path.basename(s))):
                os.symlink(os.path.abspath(s), os.path.join(folder, os.path.basename(s)))
        t, h, w = patch.split("x")
        stp("convert", folder, data, "--patch", patch, "--stride", f"2x{h}x{w}", "--resize", f"{h}x{w}")
    started = time.perf_counter()
    if not os.path.isfile(os.path.join(run, "best.keras")):
        stp("train", data, "--out", run, "--task", "embed", "--epochs", str(epochs), "--seed", str(seed),
            "--val-split", "none", "--verbose", "0", *(["--augment", augment] if augment else []), *model_args)
    return run, time.perf_counter() - started


def score(ranks: dict, data: dict, queries) -> dict:
    """`ranks[q]`: (segment, score) best first; a list of segments alone (the L2 thumbnail) has no margins.
    `margin`: the smallest lead of a query's own segment over the best other one, among the queries found."""
    found = {kind: [0, 0] for kind in ("copy", "copy+speed")}
    rr, misses, margins = [], [], []
    for q in queries:
        segment, _, kind = data["queries"][q]
        names = [r[0] if isinstance(r, tuple) else r for r in ranks[q]]
        rank = names.index(segment) + 1
        found[kind][0] += rank == 1
        found[kind][1] += 1
        rr.append(1.0 / rank)
        if rank > 1:
            misses.append(f"{os.path.basename(q)} at {rank} (1st {names[0]})")
        elif isinstance(ranks[q][0], tuple) and len(ranks[q]) > 1:
            margins.append(ranks[q][0][1] - ranks[q][1][1])
    total = sum(v[0] for v in found.values())
    return {"rank1": total, "of": len(queries), "mrr": float(np.mean(rr)), "misses": misses,
            "margin": float(min(margins)) if margins else None,
            **{kind: f"{v[0]}/{v[1]}" for kind, v in found.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", default=os.path.join(ROOT, "..", "shared", "data", "videos"))
    parser.add_argument("--work", default="/tmp/stp-copies")
    parser.add_argument("--segments", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-old-views", action="store_true", help="Do not train with the views crop,color.")
    parser.add_argument("--augment", action="append", default=[], metavar="LIST",
                        help="Also train with `stp train --augment LIST` (repeatable), e.g. the copy views "
                             "without color: shift,speed,crop,letterbox,rescale,reencode.")
    parser.add_argument("--model", default=None, help="`stp train --model` for the embedding (default: the task's).")
    parser.add_argument("--model-arg", action="append", default=[], help="`stp train --model-arg`, repeatable.")
    parser.add_argument("--patch", default=PATCH, help="The embedding's patch, TxHxW: frames squeezed to HxW "
                        f"(default {PATCH}).")
    parser.add_argument("--skip-thumbnails", action="store_true")
    parser.add_argument("--pool", action="append", default=[], metavar="mean|grid:N",
                        help="`stp index --pool` for the embedding's features, repeatable (default: mean).")
    parser.add_argument("--copy-reading", default=None, metavar="VIEWS",
                        help="Also measure every method indexed with `stp index --strip-bars --views VIEWS` "
                             "(e.g. 1,0.85,0.7; queries read inside their black bars, as `stp search` does).")
    parser.add_argument("--rerank", type=int, default=0, metavar="N",
                        help="Also measure every method with `stp search --rerank N` on top of --copy-reading "
                             "(or of the plain index without it).")
    args = parser.parse_args(argv)
    from stpkeras.index import Reading

    readings = [("", None, 0)]   # (suffix of the method's name, how the index reads, stp search --rerank)
    if args.copy_reading:
        readings.append((", bars+views", Reading(True, tuple(float(v) for v in args.copy_reading.split(","))), 0))
    if args.rerank:
        suffix, reading, _ = readings[-1]
        readings.append((f"{suffix}, rerank {args.rerank}", reading, args.rerank))

    t = time.perf_counter()
    data = make_data(args.videos, args.work, args.segments)
    print(f"{len(data['gallery'])} gallery segments, {len(data['queries'])} queries "
          f"({time.perf_counter() - t:.0f}s to make)", flush=True)
    everything = list(data["queries"])
    results = {}

    def report(name, ranks, queries=everything):
        results[name] = score(ranks, data, queries)
        r = results[name]
        print(f"{name:<34} rank-1 {r['rank1']:>2}/{r['of']}  (copy {r['copy']}, copy+speed {r['copy+speed']})  "
              f"MRR {r['mrr']:.3f}" + (f", closest call {r['margin']:+.4f}" if r["margin"] is not None else "")
              + (f"; missed: {', '.join(r['misses'])}" if r["misses"] else ""), flush=True)

    if not args.skip_thumbnails:
        report("thumbnail 8x8, mean, L2", thumbnail_l2(data))
        thumb = thumbnail_embedder()
        for suffix, reading, rerank in readings:
            for aggregate in ("mean", "windows"):
                report(f"thumbnail 8x8, index {aggregate}{suffix}",
                       ranked(thumb, data, aggregate, everything, reading, rerank))
    model_args = ((["--model", args.model] if args.model else [])
                  + [x for a in args.model_arg for x in ("--model-arg", a)])
    tag = "-".join([args.model or "default", *args.model_arg] + ([] if args.patch == PATCH else [args.patch]))
    tag = tag.replace("=", "").replace(",", "_")

    from stpkeras.index import load_embedder

    variants = ([("copy views", "")] + ([] if args.skip_old_views else [("crop,color", "crop,color")])
                + [(augment, augment) for augment in args.augment])
    for label, augment in variants:
        pools = args.pool or ["mean"]
        ranks = {(pool, aggregate, suffix): {} for pool in pools for suffix, _, _ in readings
                 for aggregate in ("mean", "windows")}
        seconds = []
        for fold, held in FOLDS.items():
            trained_on = [s for f, paths in data["sources"].items() if f != fold for s in paths]
            run, s = train(trained_on, args.work, fold, f"{fold}-{augment or 'copy'}-{tag}-e{args.epochs}", augment,
                           args.epochs, args.seed, model_args, args.patch)
            seconds.append(s)
            queries = [q for q in everything if data["queries"][q][1] == fold]
            for pool in pools:
                embedder = load_embedder(run, pool)
                for suffix, reading, rerank in readings:
                    for aggregate in ("mean", "windows"):
                        ranks[pool, aggregate, suffix].update(
                            ranked(embedder, data, aggregate, queries, reading, rerank))
        print(f"embed ({label}, {tag}): trained {args.epochs} epochs per fold in "
              f"{', '.join(f'{s:.0f}s' for s in seconds)} (wall, shared 2-core machine)", flush=True)
        for (pool, aggregate, suffix), r in ranks.items():
            report(f"embed ({label}), pool {pool}, index {aggregate}{suffix}", r)
    with open(os.path.join(args.work, f"results-{tag}-e{args.epochs}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
