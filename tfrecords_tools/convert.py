"""Convert stage: videos -> per-video record chunks (in worker processes) -> shards + `dataset.json`.

The work is split so that a conversion can be killed at any moment and run
again: every finished video leaves a committed chunk and a small JSON
result in `OUT/.stp-work/`; a rerun of the same command skips those videos,
then assembles all shards anew (atomically) and writes the manifest last.
The records do not depend on the number of workers: each video is cut by
the same code into its own chunk, and chunks are assembled in (split, id)
order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from tfrecords_tools import manifest as mf
from tfrecords_tools import outputs
from tfrecords_tools.codec import parse_pairs, write_copies
from tfrecords_tools.errors import BadInput, NotNow, Stopped
from tfrecords_tools.pixels import to_record
from tfrecords_tools.sampling import ItemsCutter, Sampling, SegmentError, select
from tfrecords_tools.schema import MULTI_LABEL_SEPARATOR, SCHEMA_VERSION, UNLABELLED, encode_patch, segment_id
from tfrecords_tools.shards import Chunk, ChunkWriter, list_shard_files, write_shards
from tfrecords_tools.sources import Item, Source, label_clashes, read_source
from tfrecords_tools.pairs import COLOUR as PAIR_COLOUR
from tfrecords_tools.pairs import target_patches
from tfrecords_tools.targets import Targets, resolve_frame_labels
from tfrecords_tools.spec import COMPRESSIONS, ENCODINGS, PatchSpec
from tfrecords_tools.storage import check_path, is_remote, scheme
from tfrecords_tools.video import DEFAULT_COLOUR, DEFAULT_MAX_PIXELS, Plan, VideoError, video_patches

WORK_DIR = ".stp-work"


class ConvertError(BadInput, RuntimeError):
    """The conversion as a whole cannot go on as asked (exit 2): an OUT written with another spec, a remote
    OUT without a local --work-dir, data the pixel format refuses."""


class StrictFailure(Stopped, ConvertError):
    """--strict: the first video that failed stops the job, with no manifest (exit 1, as a failed video)."""


class WriteError(NotNow, ConvertError):
    """Writing chunks or shards failed for lack of space or permission: the machine's problem, not a video's.

    The job stops; what was half-written is removed or never trusted (no
    manifest), and the same command run again after freeing space resumes
    with the videos already converted. `errno` is the OS's error number.
    """

    def __init__(self, message: str, errno_: int):
        super().__init__(message)
        self.errno = errno_


# Errors of the disk, not of a video (disk full, quota, file size limit, read-only or forbidden folder).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NO_WRITE = (errno.EACCES, errno.EPERM, errno.EROFS)


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """Everything that decides the records written (plus how the work is run)."""

    src: str
    out: str
    spec: PatchSpec
    encoding: str = "raw"
    quality: int = 90
    compression: str = "none"
    shard_size_mb: float = 256.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    labels: Tuple[str, ...] = ()
    split_fractions: Tuple[Tuple[str, float], ...] = ()
    # Classes of the `intervals` labels (per-frame targets), in index order; () = all found, sorted.
    frame_labels: Tuple[str, ...] = ()
    # Per item (a video, or a segment of one): N evenly spaced clips instead of the whole temporal grid
    # (0: all), then at most this many patches, evenly spread (0: no cap).
    clips_per_video: int = 0
    max_patches_per_video: int = 0
    # Which numeric CSV columns to store under `value/data` (): the `value` column, if any.
    values: Tuple[str, ...] = ()
    # Standard annotation files `FORMAT:PATH` describing the videos in `src` (`annotations`), and the fold.
    annotations: str = ""
    fold: int = 1
    # Compressed/clean pairs made from each (clean) video: `codec.parse_pairs`, e.g. "h264:23-40" ('' none).
    pairs: str = ""
    # How the work runs; never changes the records.
    work_dir: Optional[str] = None  # local folder for per-video chunks; None: OUT/.stp-work (OUT must be local)
    workers: int = 1
    decode_threads: int = 1
    overwrite: bool = False
    strict: bool = False
    command: str = ""

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise ValueError(f"Invalid value for argument `encoding`. Expected one of {ENCODINGS}. "
                             f"Received encoding={self.encoding!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"Invalid value for argument `compression`. Expected one of {COMPRESSIONS}. "
                             f"Received compression={self.compression!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"Invalid value for argument `quality`. Expected 1..100. Received quality={self.quality}")
        if self.shard_size_mb <= 0:
            raise ValueError(f"Invalid value for argument `shard_size_mb`. Expected a positive size. "
                             f"Received shard_size_mb={self.shard_size_mb}")
        if self.workers < 1:
            raise ValueError(f"Invalid value for argument `workers`. Expected >= 1. Received workers={self.workers}")
        self.spec.pixel_format.check_encoding(self.encoding)
        if self.pairs:
            from tfrecords_tools.codec import parse_pairs
            object.__setattr__(self, "pairs", str(parse_pairs(self.pairs)))   # canonical: h264:23,29,34,40
        for name in ("clips_per_video", "max_patches_per_video"):
            if getattr(self, name) < 0:
                raise ValueError(f"Invalid value for argument `{name}`. Expected >= 0 (0: no sampling). "
                                 f"Received {name}={getattr(self, name)}")

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.clips_per_video, self.max_patches_per_video)

    def fingerprint(self) -> dict:
        """The settings that decide the bytes of the records; an existing OUT must match them."""
        return {"spec": self.spec.to_dict(), "encoding": self.encoding,
                "quality": self.quality if self.encoding == "jpeg" else None,
                "compression": self.compression, "schema_version": SCHEMA_VERSION,
                "max_pixels": self.max_pixels,
                # Only data with frame labels has the key: other conversions keep their fingerprint.
                **({"frame_labels": list(self.frame_labels)} if self.frame_labels else {}),
                **({"clips_per_video": self.clips_per_video} if self.clips_per_video else {}),
                **({"max_patches_per_video": self.max_patches_per_video} if self.max_patches_per_video else {}),
                # How the pairs' sides were decoded (`tfrecords_tools.pairs.COLOUR`): a work folder of `--pairs`
                # made before the exact conversion (no key) is not resumed into the same data.
                **({"pairs": self.pairs, "pair_colour": PAIR_COLOUR} if self.pairs else {})}

    @property
    def shard_bytes(self) -> int:
        return int(self.shard_size_mb * 1e6)

    def work_path(self) -> str:
        """The local folder of this conversion's chunks and per-video results.

        Chunks are written, re-read and deleted many times: they stay on local
        disk even when OUT is remote, where only the finished shards go. Under a
        user's `work_dir` each OUT gets its own subfolder, so one folder can
        serve several conversions and removing it at the end removes only ours.
        """
        if self.work_dir is None:
            if is_remote(self.out):
                raise ConvertError(f"{self.out} is remote: pass a local work folder (--work-dir) for the "
                                   "per-video chunks; only the finished shards and dataset.json go to OUT.")
            return os.path.join(self.out, WORK_DIR)
        if is_remote(self.work_dir):
            raise ConvertError(f"--work-dir {self.work_dir}: expected a local folder, received a "
                               f"{scheme(self.work_dir)}:// URL")
        return os.path.join(self.work_dir, "stp-work-" + hashlib.sha1(self.out.encode()).hexdigest()[:12])


def codec_items(cfg: ConvertConfig, items: Sequence[Item], work: str) -> Tuple[List[Item], dict]:
    """`cfg.pairs`: each clean video -> one pair item per crf (`PATH#crf=N`, the compressed copy with the clean
    copy as its target, in the same split), and {pair key: (the video's item, clean copy path, stem, its
    `CodecPairs`)}. The copies are written later, for the items still to convert (`codec.write_copies`).
    `h264:auto` reads each video's level here (`CodecPairs.resolve`); one that cannot be read is one failed item."""
    pairs = parse_pairs(cfg.pairs)
    for item in items:
        has = ("a target" if item.target else "masks or frame labels" if item.mask or item.intervals
               else "a segment" if item.is_segment else "")
        if has and not item.error:
            raise ConvertError(f"{cfg.src}: --pairs makes compressed/clean pairs of whole clean videos; {item.id} "
                               f"has {has}. Expected a folder or a CSV of plain videos")
    # `auto`: each video's own crf values, from its quantizer, read here so that each pair has its name.
    resolved = _resolve_pairs(cfg, pairs, [i for i in items if not i.error])
    out, copies = [], {}
    for item in items:
        if item.error:
            out.append(item)
            continue
        own = resolved[item.key]
        if isinstance(own, str):   # a video whose level cannot be read fails with the reason
            out.append(dataclasses.replace(item, id=f"{item.id}#crf={pairs.crfs_text}", error=own))
            continue
        folder = os.path.join(work, "pairs", item.key)
        clean = os.path.join(folder, "v-clean.mkv")
        for crf in own.crfs:
            pair = dataclasses.replace(item, id=f"{item.id}#crf={crf}", path=os.path.join(folder, f"v-crf{crf}.mp4"),
                                       target=clean)
            out.append(pair)
            copies[pair.key] = (item, clean, "v", own)
    return out, copies


def _resolve_pairs(cfg: ConvertConfig, pairs, items: Sequence[Item]) -> dict:
    """{item key: its `CodecPairs`, or why its level could not be read}. `auto` reads the videos' levels
    (`CodecPairs.resolve`, `codec.footage_level`: up to 300 frames each read twice and encoded once, 1-2.5 s of
    CPU for 640x272 to 1280x720) in `cfg.workers` threads (FFmpeg decodes and encodes outside the GIL). Nothing
    is written in OUT (this runs before OUT is checked; the trial encodes go to a temporary folder); a resumed
    conversion reads them again."""
    if not pairs.auto:
        return {item.key: pairs for item in items}

    def one(item: Item):
        try:
            return pairs.resolve(item.path, cfg.max_pixels)
        except Exception as e:  # noqa: BLE001  (a broken video: its pairs fail with the reason, as any video)
            return failure_reason(item, e)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, min(cfg.workers, len(items)))) as pool:
        return dict(zip((item.key for item in items), pool.map(one, items)))


def check_pixels(cfg: ConvertConfig, items: Sequence[Item]) -> None:
    """Targets aligned pixel for pixel (a clean `target` video, a `mask`, `intervals`) need rgb records
    (a pixel-aligned format)."""
    if cfg.spec.pixel_format.pixel_aligned:
        return
    item = next((i for i in items if i.target or i.mask or i.intervals), None)
    if item is not None:
        column = "target" if item.target else "mask" if item.mask else "intervals"
        raise ConvertError(f"{cfg.src}: {item.id} has a {column!r} column (enhancement/segmentation data), which "
                           f"needs --pixels rgb. Received pixels={cfg.spec.pixels!r}")


# ---------------------------------------------------------------------------------------------
# One video (runs in a worker process)


def item_fields(item: Item, source: Source) -> dict:
    """The `encode_patch` keyword arguments an item's records carry for its classes and values.

    A multi-label item gets `label=UNLABELLED`, a multi-hot vector over the source's classes and
    `label_name` its names joined by `;` in class order; values only when the source has them.
    """
    index = {name: i for i, name in enumerate(source.labels)}
    values = {"values": list(item.values)} if source.value_names and item.values else {}
    if source.label_mode == "multi":
        hot = [0] * len(source.labels)
        for name in item.labels:
            if name in index:
                hot[index[name]] = 1
        names = MULTI_LABEL_SEPARATOR.join(n for n, h in zip(source.labels, hot) if h)
        return {"label": UNLABELLED, "label_name": names, "multi_hot": hot, **values}
    return {"label": index.get(item.label, UNLABELLED), "label_name": item.label, **values}


def video_records(item: Item, fields: dict, cfg: ConvertConfig,
                  stats: Optional[dict] = None) -> Iterator[Union[Plan, bytes]]:
    """Streams the serialized records of one whole video with aligned targets (mask, intervals, target).

    Same contract as `video.video_patches`: a `Plan` at the start of every
    read, then that read's records (`tf.train.Example` bytes) in grid order; a
    second `Plan` means the records since the previous one must be dropped.
    Raises `VideoError` (or anything else a broken file provokes); the callers
    turn that into the video's result. A video with a `mask` or `intervals`
    gets those targets in its records (`tfrecords_tools.targets`); `stats`
    receives `mask_max`, the largest class id of its masks, and the read's
    orientation and size changes (`FrameStream.report`). A video with a
    `target` (its clean original) gets the target's aligned patch in each record
    (`tfrecords_tools.pairs`).
    """
    plan: Optional[Plan] = None
    targets: Optional[Targets] = None
    clean: Optional[Iterator] = None
    segmented = bool(item.mask or item.intervals)
    for event in video_patches(item.path, cfg.spec, max_pixels=cfg.max_pixels, threads=cfg.decode_threads,
                               report=stats, colour=PAIR_COLOUR if item.target else DEFAULT_COLOUR):
        if isinstance(event, Plan):
            plan = event
            if segmented:
                targets = Targets(item, cfg.spec, plan, cfg.frame_labels, cfg.max_pixels, stats)
            if item.target:
                # Decoded in lockstep under this plan, so memory stays at one patch length of each video.
                clean = target_patches(item.target, item.path, cfg.spec, plan, max_pixels=cfg.max_pixels,
                                       threads=cfg.decode_threads, colour=PAIR_COLOUR)
            yield event
            continue
        yield encode_patch(
            to_record(cfg.spec, event.pixels), encoding=cfg.encoding, quality=cfg.quality, video_id=item.id,
            video_size=(plan.frames, plan.height, plan.width), index=event.index, offset=event.offset,
            valid=event.valid, timestamp=event.timestamp, split=item.split, **fields,
            **(targets.extras(event) if targets is not None else {}),
            **({"target": _aligned(next(clean, None), event, item)} if clean is not None else {}))


def has_targets(item: Item) -> bool:
    """A video with aligned targets (mask, intervals, clean target) is read on its own."""
    return bool(item.mask or item.intervals or item.target)


def group_items(items: Sequence[Item]) -> List[List[int]]:
    """Indices of `items` by the video they read: one group per file (its segments, its rows in several
    splits), in order of first appearance; items with aligned targets or errors alone."""
    groups: Dict[str, List[int]] = {}
    out: List[List[int]] = []
    for i, item in enumerate(items):
        if item.error or has_targets(item):
            out.append([i])
            continue
        if item.path not in groups:
            groups[item.path] = []
            out.append(groups[item.path])
        groups[item.path].append(i)
    return out


def group_records(items: Sequence[Item], fields: Sequence[dict], cfg: ConvertConfig,
                  stats: Sequence[dict]) -> Iterator[Union[Plan, Tuple[int, bytes]]]:
    """Streams the records of several items of one video (its segments, or the whole video), decoded once.

    Yields a `Plan` at the start of every read (records since the previous
    one are dropped), then `(i, record)` for item `items[i]`, each item's
    records in its grid order. On each read, `stats[i]` receives the item's
    `id`, its `segment` and `frames`, what was `sampled`, the read's
    orientation, and `segment_error` when the video cannot give that item
    (past its end, shorter than a patch): that item has no records, the others go on.
    """
    if len(items) == 1 and has_targets(items[0]):
        for event in video_records(items[0], fields[0], cfg, stats[0]):
            yield event if isinstance(event, Plan) else (0, event)
        return
    selections: dict = {}

    def cutter(plan: Plan) -> ItemsCutter:
        selections.clear()
        chosen = []
        for i, item in enumerate(items):
            for key in ("segment_error", "segment", "sampled"):
                stats[i].pop(key, None)
            try:
                selection = select(cfg.spec, plan.frames, plan.height, plan.width, plan.end - plan.start,
                                   item.start, item.end, cfg.sampling)
            except SegmentError as e:
                stats[i]["segment_error"] = f"{item.origin}: {item.path}: {e}" if item.origin else f"{item.path}: {e}"
                continue
            video_id = item.id
            if selection.interval is not None:
                video_id = segment_id(item.video, *selection.interval)
                stats[i]["segment"] = [round(v, 6) for v in selection.interval]
            if selection.sampled:
                stats[i]["sampled"] = selection.sampled
            stats[i].update(id=video_id, frames=selection.frames)
            selections[i] = (selection, video_id)
            chosen.append((i, selection))
        return ItemsCutter(cfg.spec, chosen, plan.frames)

    report: dict = {}
    plan: Optional[Plan] = None
    for event in video_patches(items[0].path, cfg.spec, max_pixels=cfg.max_pixels, threads=cfg.decode_threads,
                               report=report, cutter=cutter):
        if isinstance(event, Plan):
            plan = event
            yield event
            continue
        i, patch = event
        selection, video_id = selections[i]
        yield i, encode_patch(
            to_record(cfg.spec, patch.pixels), encoding=cfg.encoding, quality=cfg.quality, video_id=video_id,
            video_size=(selection.frames, plan.height, plan.width), index=patch.index, offset=patch.offset,
            valid=patch.valid, timestamp=patch.timestamp, split=items[i].split, **fields[i],
            **({"interval": selection.interval} if selection.interval is not None else {}))
    for s in stats:
        s.update(report)


def _aligned(target, patch, item: Item):
    if target is None or target.offset != patch.offset:
        raise VideoError(item.path, f"its target {item.target} gave no patch at {patch.offset}")
    return target.pixels


def new_result(item: Item, fields: Optional[dict] = None) -> dict:
    """A video's result before any work: `failed` until proven otherwise."""
    label = fields["label_name"] if fields and "multi_hot" in fields else item.label
    return {"id": item.id, "split": item.split, "label": label, "status": "failed", "reason": "",
            "patches": 0, "key": item.key}


def finish_result(result: dict, item: Item, cfg: ConvertConfig, plan: Plan, reads: int, sizes: Sequence[int],
                  seconds: float) -> dict:
    """Fills in `result` for a video (or segment) that was read: `ok`, `skipped` when no patch fits, or
    `failed` when the video cannot give the segment."""
    if "segment_error" in result:
        result.update(status="failed", reason=result.pop("segment_error"), patches=0)
        return result
    frames = result.get("frames", plan.frames)
    result.update(frames=frames, height=plan.height, width=plan.width, timing=plan.timing,
                  seconds=round(seconds, 4), reads=reads)
    if not sizes:
        result["status"] = "skipped"
        result["reason"] = (f"{item.path}: no patch fits: {frames} frames of {plan.height}x{plan.width} "
                            f"after resampling/resizing, patch {cfg.spec.frames}x{cfg.spec.height}x"
                            f"{cfg.spec.width} with pad={cfg.spec.pad}")
        return result
    result.update(status="ok", patches=len(sizes), sizes=list(sizes))
    return result


def failure_reason(item: Item, error: Exception) -> str:
    if isinstance(error, VideoError):
        return str(error)
    # A bug or an unexpected library error: still name the file, keep going.
    return f"{item.path}: unexpected {type(error).__name__}: {error}"


def convert_group(items: Sequence[Item], fields: Sequence[dict], cfg: ConvertConfig,
                  chunk_paths: Sequence[str]) -> List[dict]:
    """Cuts the items of one video into records, each in its chunk; returns their results (never raises
    for bad input). The video is decoded once, whatever the number of items."""
    results = [new_result(item, f) for item, f in zip(items, fields)]
    live = []
    for i, item in enumerate(items):
        if item.error:
            results[i]["reason"] = item.error
        else:
            live.append(i)
    if not live:
        return results
    start = time.perf_counter()
    writers: Dict[int, ChunkWriter] = {}
    try:
        for i in live:
            writers[i] = ChunkWriter(chunk_paths[i])
        plan: Optional[Plan] = None
        reads = 0
        for event in group_records([items[i] for i in live], [fields[i] for i in live], cfg,
                                   [results[i] for i in live]):
            if isinstance(event, Plan):
                plan = event
                reads += 1
                if reads > 1:
                    for w in writers.values():
                        w.reset()
                continue
            j, record = event
            writers[live[j]].write(record)
        seconds = time.perf_counter() - start
        for i in live:
            finish_result(results[i], items[i], cfg, plan, reads, writers[i].sizes, seconds)
            if results[i]["status"] == "ok":
                writers.pop(i).commit()
        for w in writers.values():
            w.abort()
        return results
    except Exception as e:  # noqa: BLE001  every failure becomes the video's result
        if isinstance(e, OSError) and e.errno in NO_SPACE:  # the disk's failure, not the video's: stop the job
            for w in writers.values():
                _discard(w)
            raise OSError(e.errno, e.strerror, e.filename or chunk_paths[live[0]]) from e
        for i in live:
            results[i].update(status="failed", reason=failure_reason(items[i], e), patches=0)
            results[i].pop("sizes", None)
    for w in writers.values():
        w.abort()
    return results


def convert_video(item: Item, fields: dict, cfg: ConvertConfig, chunk_path: str) -> dict:
    """Cuts one video into records in `chunk_path`; returns its result (never raises for bad input)."""
    return convert_group([item], [fields], cfg, [chunk_path])[0]


def _discard(writer: ChunkWriter) -> None:
    """Removes a chunk being written, even when closing it fails again (a full disk)."""
    try:
        writer.abort()
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(writer.tmp)


def _worker_init():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _worker_task(args) -> List[dict]:
    items, fields, cfg, chunk_paths, result_paths = args
    results = convert_group(items, fields, cfg, chunk_paths)
    for result, path in zip(results, result_paths):
        _write_json_atomic(path, result)
    return results


def _write_json_atomic(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The whole job


@dataclasses.dataclass
class Progress:
    """What the converter reports after each video (for a progress bar)."""

    total: int
    done: int = 0
    failed: int = 0
    patches: int = 0
    frames: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)


def _versions() -> dict:
    import av
    import numpy
    import tensorflow as tf

    from importlib import metadata
    try:
        stp_version = metadata.version("stpkeras")
    except metadata.PackageNotFoundError:  # running from a source tree that was not installed
        stp_version = "unknown"
    return {"stpkeras": stp_version, "tensorflow": tf.__version__, "numpy": numpy.__version__,
            "av": av.__version__, "ffmpeg": ".".join(map(str, av.library_versions.get("libavcodec", ()))),
            "python": platform.python_version()}


def _check_existing(cfg: ConvertConfig, work: str) -> Optional[dict]:
    """Refuses an OUT written with other settings; returns its manifest if complete and matching."""
    existing = None
    fingerprint_path = os.path.join(work, "config.json")
    if _gfile().exists(mf.manifest_path(cfg.out)):
        try:
            existing = mf.read_manifest(cfg.out)
        except mf.ManifestError:
            existing = None
        if existing is not None:
            theirs = existing.get("fingerprint")
            if theirs != cfg.fingerprint():
                raise ConvertError(f"{cfg.out} holds a conversion with other settings "
                                   f"({_diff(theirs, cfg.fingerprint())}). "
                                   "Use another OUT or --overwrite to replace it.")
    if os.path.exists(fingerprint_path):
        with open(fingerprint_path) as f:
            theirs = json.load(f)
        if theirs != cfg.fingerprint():
            raise ConvertError(f"{cfg.out} holds an unfinished conversion with other settings "
                               f"({_diff(theirs, cfg.fingerprint())}). Use --overwrite to start again.")
    return existing


def _diff(a: Optional[dict], b: dict) -> str:
    if not isinstance(a, dict):
        return "no recorded settings"
    keys = sorted(set(a) | set(b))
    return "; ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} asked" for k in keys if a.get(k) != b.get(k))


def convert(cfg: ConvertConfig, on_progress: Optional[Callable[[Progress, dict], None]] = None) -> dict:
    """Runs the whole conversion; returns the manifest (also written to `OUT/dataset.json`).

    Bad videos never stop the job: each gets status `failed` (or `skipped`
    when no patch fits) with its reason in the manifest. With `strict`,
    the first failure raises `ConvertError` and no manifest is written.
    OUT is held for writing (`outputs.writing`) from start to end: a second
    conversion, or a reader (`stp train`, `stp verify`) of OUT, is refused.
    """
    check_path(cfg.out)
    outputs.check_not_input(cfg.out, [cfg.src])
    with disk_errors(cfg.out), outputs.writing(cfg.out, command=cfg.command or None):
        return _convert(cfg, on_progress)


@contextlib.contextmanager
def disk_errors(out: str):
    """A full disk or a forbidden folder met outside `_writing` (creating OUT, its lock, the work folder):
    `WriteError`."""
    try:
        yield
    except OSError as e:
        if e.errno not in NO_SPACE + NO_WRITE:
            raise
        raise WriteError(f"{e.filename or out}: {e.strerror}", e.errno) from e


def _convert(cfg: ConvertConfig, on_progress: Optional[Callable[[Progress, dict], None]]) -> dict:
    started = time.perf_counter()
    gfile = _gfile()
    source = read_source(cfg.src, cfg.labels or None, cfg.split_fractions, cfg.values, cfg.annotations, cfg.fold)
    items = list(source.items)
    check_pixels(cfg, items)
    if any(item.intervals for item in items):
        items, frame_names = resolve_frame_labels(items, cfg.frame_labels)
        cfg = dataclasses.replace(cfg, frame_labels=frame_names)
        source = dataclasses.replace(source, items=tuple(items))
    work = cfg.work_path()
    copies = {}
    if cfg.pairs:
        items, copies = codec_items(cfg, items, work)
        source = dataclasses.replace(source, items=tuple(items))
    if cfg.overwrite:
        remove_outputs(cfg.out)
        shutil.rmtree(work, ignore_errors=True)
    fresh = not os.path.exists(work)
    # Checked before anything is written: a refused run must leave OUT as it was.
    existing = _check_existing(cfg, work)
    if existing is not None and fresh and _same_items(existing, items):
        # Finished earlier with the same settings and inputs: nothing to redo.
        existing["up_to_date"] = True
        return existing
    os.makedirs(work, exist_ok=True)
    gfile.makedirs(cfg.out)
    _write_json_atomic(os.path.join(work, "config.json"), cfg.fingerprint())
    for name in os.listdir(work):  # half-written chunks of a killed run
        if name.endswith(".tmp"):
            os.remove(os.path.join(work, name))

    results: Dict[str, dict] = {}  # by Item.key: one CSV can list a video twice, or many segments of it
    left = []
    for item in items:
        result_path = os.path.join(work, item.key + ".json")
        chunk_path = os.path.join(work, item.key + ".tfrecord")
        if os.path.exists(result_path):
            with open(result_path) as f:
                done = json.load(f)
            # Finished videos are kept; failed ones are tried again (the file may have been fixed).
            if (done.get("status") == "ok" and os.path.exists(chunk_path)) or done.get("status") == "skipped":
                results[item.key] = done
                continue
        left.append(item)
    made: Dict[str, str] = {}   # a source video's clean copy -> '' or why its copies could not be made
    for n, item in enumerate(left):
        if item.key not in copies:
            continue
        # The compressed and clean copies this pair converts from, made once per source video (each in its own
        # folder of the work folder, under the same stem: keyed by the clean copy's path).
        original, clean_path, stem, own = copies[item.key]
        if clean_path not in made:
            try:
                write_copies(original.path, cfg.spec, own, os.path.dirname(clean_path), stem,
                             max_pixels=cfg.max_pixels)
                made[clean_path] = ""
            except Exception as e:  # noqa: BLE001  (a broken video: its pairs fail with the reason, as any video)
                made[clean_path] = failure_reason(original, e)
        if made[clean_path]:
            left[n] = dataclasses.replace(item, error=made[clean_path])
    # One task per video file: its items (segments) are cut from one decode.
    todo = []
    for group in group_items(left):
        chosen = [left[i] for i in group]
        todo.append((chosen, [item_fields(i, source) for i in chosen], cfg,
                     [os.path.join(work, i.key + ".tfrecord") for i in chosen],
                     [os.path.join(work, i.key + ".json") for i in chosen]))

    progress = Progress(total=len(items), done=len(results))
    for r in results.values():
        progress.patches += r.get("patches", 0)

    def record(result):
        results[result["key"]] = result
        progress.done += 1
        progress.patches += result.get("patches", 0)
        progress.frames += result.get("frames", 0) if result["status"] == "ok" else 0
        if result["status"] != "ok":
            progress.failed += 1
            if cfg.strict:
                raise StrictFailure(f"--strict: {result['reason']}")
        if on_progress:
            on_progress(progress, result)

    with _writing(cfg, work, results, len(items), "writing the per-video chunks", work):
        for group in _run(todo, cfg.workers):
            for result in group:
                record(result)

    with _writing(cfg, work, results, len(items), "assembling the shards", cfg.out):
        manifest = _assemble(cfg, source, results, work)
    manifest["seconds"] = round(time.perf_counter() - started, 3)
    mf.write_manifest(cfg.out, manifest)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


@contextlib.contextmanager
def _writing(cfg: ConvertConfig, work: str, results: Dict[str, dict], videos: int, doing: str, folder: str):
    """Turns a full disk or a forbidden folder met while `doing` into one `WriteError` saying where and how much.

    Assembly copies the chunks into shards before the chunks are removed: at
    its peak, a conversion holds about twice the dataset's size on disk.
    """
    try:
        yield
    except OSError as e:
        if e.errno not in NO_SPACE + NO_WRITE:
            raise
        where = e.filename or folder
        again = "run the same command again: the videos already converted are kept."
        if e.errno in NO_WRITE:
            raise WriteError(f"{where}: {e.strerror} while {doing}. Make the folder writable (or choose another "
                             f"OUT or --work-dir) and {again}", e.errno) from e
        done = [r for r in results.values() if r.get("status") == "ok"]
        chunks = sum(sum(r.get("sizes", ())) for r in done)
        if doing.startswith("assembling"):
            need = f"the shards need about {_mb(chunks)} beside the {_mb(chunks)} of chunks in {work}"
        elif done:
            need = (f"{len(done)} of {videos} videos took {_mb(chunks)} of chunks; the whole conversion needs "
                    f"about {_mb(2 * chunks * videos / len(done))} (the chunks, then as much again for the shards)")
        else:
            need = "a conversion needs about twice the dataset's size (the chunks, then the shards)"
        raise WriteError(f"{where}: {e.strerror} while {doing}: {need}{_free(folder)}. Free space and {again}",
                         e.errno) from e


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _free(folder: str) -> str:
    if is_remote(folder):
        return ""
    try:
        return f"; {_mb(shutil.disk_usage(folder).free)} free there now"
    except OSError:
        return ""


def _gfile():
    import tensorflow as tf  # gfile: OUT may be gs:// (or s3:// with tensorflow-io)
    return tf.io.gfile


def remove_outputs(out: str) -> None:
    """Removes the shards and manifest of an earlier conversion in `out` (--overwrite)."""
    gfile = _gfile()
    for name in list_shard_files(out) + [mf.MANIFEST_NAME]:
        path = mf.join(out, name)
        if gfile.exists(path):
            gfile.remove(path)


def _same_items(manifest: dict, items: Sequence[Item]) -> bool:
    # A segment open at its end is listed as `PATH#t=START,` and recorded with the end the video gave.
    listed = {(v["split"], v.get("listed", v["id"])) for v in manifest.get("videos", [])}
    def names(label: str) -> tuple:  # a multi-label item's names, whatever their order
        return tuple(sorted(label.split(MULTI_LABEL_SEPARATOR)))

    labels = sorted(names(v.get("label", "")) for v in manifest.get("videos", []))
    return (listed == {(i.split, i.id) for i in items} and labels == sorted(names(i.label) for i in items)
            and manifest["counts"]["failed"] == 0)


def _ready() -> bool:
    """A pool child's first call: it returns once the child has imported this module (and TensorFlow)."""
    return True


def _run(todo: Sequence[tuple], workers: int) -> Iterable[List[dict]]:
    """Runs the tasks (one per video file) in `workers` processes, this one included; yields each task's
    results as it finishes."""
    if workers <= 1 or len(todo) <= 1:
        for task in todo:
            yield _worker_task(task)
        return
    import collections
    import multiprocessing as mp
    import queue

    # This process is one of the workers: it has TensorFlow loaded and starts at once, while a
    # spawned child spends 2-3 s (CPU) importing it; with only children, that start-up was paid
    # before any video and this process sat idle. A child gets a video only after answering
    # `_ready`, so no video waits in the queue of a child that is still starting.
    # Longest first keeps every process busy to the end; the output order does not depend on it.
    order = collections.deque(sorted(todo, key=lambda t: -_size(t[0][0].path)))
    finished: "queue.SimpleQueue" = queue.SimpleQueue()
    children = min(workers, len(todo)) - 1
    # spawn, not fork: TensorFlow and FFmpeg hold threads and locks that fork would copy mid-use.
    ctx = mp.get_context("spawn")
    with ctx.Pool(processes=children, initializer=_worker_init, maxtasksperchild=64) as pool:

        def give(_=None):  # runs in the pool's result thread: hands the child its next video
            try:
                task = order.popleft()
            except IndexError:
                return
            pool.apply_async(_worker_task, (task,), callback=done, error_callback=finished.put)

        def done(result):
            finished.put(result)
            give()

        for _ in range(children):
            pool.apply_async(_ready, callback=give, error_callback=finished.put)
        left = len(todo)
        while left:
            try:
                result = finished.get(block=not order)
            except queue.Empty:  # no child has finished: take the next video here
                try:
                    task = order.popleft()
                except IndexError:  # a child took the last one meanwhile
                    continue
                result = _worker_task(task)
            if isinstance(result, BaseException):
                raise result
            left -= 1
            yield result


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _assemble(cfg: ConvertConfig, source: Source, results: Dict[str, dict], work: str) -> dict:
    # The manifest goes first: a run killed while shards are replaced leaves no folder that looks complete.
    if _gfile().exists(mf.manifest_path(cfg.out)):
        _gfile().remove(mf.manifest_path(cfg.out))
    # Shards of an earlier run with another layout would be read as data: remove them first.
    for name in list_shard_files(cfg.out):
        _gfile().remove(mf.join(cfg.out, name))

    def write(split: str, ok: List[Item]) -> List[dict]:
        chunks = [Chunk(os.path.join(work, i.key + ".tfrecord"), tuple(results[i.key]["sizes"])) for i in ok]
        return write_shards(cfg.out, split, chunks, cfg.shard_bytes, cfg.compression,
                            # Threads, not processes: copying and hashing release the GIL. Four
                            # keep the cores busy even when the shards do not divide evenly among them.
                            threads=max(4, cfg.workers))

    return build_manifest(cfg, source, results, write)


def build_manifest(cfg: ConvertConfig, source: Source, results: Dict[str, dict],
                   shards_of: Callable[[str, List[Item]], List[dict]]) -> dict:
    """The manifest of a conversion from its per-video results (by `Item.key`).

    `shards_of(split, ok_items)` writes (local runner) or looks up (Beam) the
    shard entries of a split whose converted videos are `ok_items`, in shard order.
    """
    items, labels = source.items, source.labels
    splits: Dict[str, dict] = {}
    videos = []
    for item in items:  # items are sorted by (split, id): the shard order
        r = results[item.key]
        entry = {k: r[k] for k in ("id", "split", "label", "status", "reason", "patches") if k in r}
        if entry["id"] != item.id:
            entry["listed"] = item.id
        if item.is_segment:
            entry["segment"] = r.get("segment", [item.start or 0.0, item.end])
        for k in ("frames", "height", "width", "timing", "sampled", "rotation", "mirrored", "size_changes",
                  "size_change_list"):
            if k in r:
                entry[k] = r[k]
        if item.values:
            entry["values"] = list(item.values)
        videos.append(entry)
        split = splits.setdefault(item.split, {"ok": [], "label_counts": {}})
        if r["status"] == "ok":
            split["ok"].append(item)
            # A multi-label item counts its patches for each of its classes.
            for name in (item.labels if source.label_mode == "multi" else (item.label,) if item.label else ()):
                split["label_counts"][name] = split["label_counts"].get(name, 0) + r["patches"]
    out_splits = {}
    for name in sorted(splits):
        s = splits[name]
        shards = shards_of(name, s["ok"])
        out_splits[name] = {"records": sum(e["records"] for e in shards), "videos": len(s["ok"]),
                            "label_counts": dict(sorted(s["label_counts"].items())), "shards": shards}
    counts = {"videos": len(videos), "ok": sum(v["status"] == "ok" for v in videos),
              "failed": sum(v["status"] == "failed" for v in videos),
              "skipped": sum(v["status"] == "skipped" for v in videos),
              "patches": sum(s["records"] for s in out_splits.values())}
    # Segmentation targets, when the records carry them: mask classes 0..N-1 and the frame classes.
    mask_max = max((results[i.key].get("mask_max", -1) for i in items if results[i.key]["status"] == "ok"),
                   default=-1)
    targets = {}
    if mask_max >= 0:
        targets["mask_classes"] = max(2, mask_max + 1)
    if cfg.frame_labels:
        targets["frame_labels"] = list(cfg.frame_labels)
    if any(i.target for i in items):
        targets["paired"] = True  # records carry `schema.TARGET`: clean/degraded pairs for --task enhance
    warnings = label_clashes(labels)
    return {
        **targets, **({"warnings": warnings} if warnings else {}),
        "format": mf.FORMAT, "schema_version": SCHEMA_VERSION, "spec": cfg.spec.to_dict(),
        "encoding": cfg.encoding, "quality": cfg.quality, "compression": cfg.compression,
        "labels": list(labels), "label_mode": source.label_mode if labels else "none",
        "value_names": list(source.value_names),
        "splits": out_splits, "videos": videos, "counts": counts,
        "fingerprint": cfg.fingerprint(), "source": os.path.abspath(cfg.src),
        "command": cfg.command or " ".join(sys.argv), "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
