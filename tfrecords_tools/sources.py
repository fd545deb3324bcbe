"""Source stage: turn a folder or a CSV into the list of videos to convert, with labels and splits.

Three inputs are understood:
- a folder with one subfolder per class (labels = folder names, as Keras'
  `*_dataset_from_directory`), optionally below split folders
  (`train/`, `val/`, `test/`);
- a flat folder of videos (unlabelled);
- a CSV with columns `path,label[,split]` (or `path` alone; header in any
  case), paths relative to the CSV's folder or absolute inside it. Optional segmentation columns:
  `mask` (a lossless mask video or a folder of PNG masks, one per frame: class ids in the first
  channel) and `intervals` (a CSV `start,end,label` in seconds: a class per frame). Optional item
  columns: `start`, `end` (seconds; the row is that segment of its video, either may be empty:
  from the beginning / to the end; any number of rows per video), a `label` holding several
  `;`-separated names (a multi-label source), and `value` (or the columns named by `values`:
  numbers stored per item).

Standard dataset annotation files (Kinetics, UCF101, ...) are read by `annotations`, which gives
the same `Item`s.

Problems with one entry (an empty or unknown label, a path that escapes the
CSV's folder) do not stop the listing: they come back as `Item`s with an
`error`, so the converter reports them like any other failed video.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import math
from typing import List, Optional, Sequence, Tuple

from tfrecords_tools.errors import BadInput

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv",
                    ".ogv", ".3gp", ".ts", ".y4m", ".gif")
SPLIT_FOLDERS = ("train", "val", "validation", "test")
DEFAULT_SPLIT = "train"


class SourceError(BadInput, ValueError):
    """The source as a whole cannot be read (missing, empty, malformed CSV header)."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One video to convert. `error` is set when the entry itself is unusable."""

    id: str                 # path relative to the source root, with '/' separators
    path: str               # absolute path on disk
    label: str = ""         # class name, '' when unlabelled
    split: str = DEFAULT_SPLIT
    error: str = ""
    line: int = 0           # CSV line number (1-based, header = 1), 0 for folders
    mask: str = ""          # absolute path of its mask video or PNG folder ('' none)
    intervals: str = ""     # absolute path of its `start,end,label` CSV ('' none)
    target: str = ""        # absolute path of its clean original (a `target` column: paired data), '' none
    # A segment of the video (seconds; None: from the beginning / to the end). Both None: the whole video.
    start: Optional[float] = None
    end: Optional[float] = None
    labels: Tuple[str, ...] = ()     # the class names of an item of a multi-label source (`label` joins them)
    values: Tuple[float, ...] = ()   # the item's numbers, in the order of the source's `value_names`
    origin: str = ""                 # where it was listed (`list.csv:4`), for messages; '' for folders

    @property
    def is_segment(self) -> bool:
        return self.start is not None or self.end is not None

    @property
    def video(self) -> str:
        """The id of the video file (an item's `id` without its `#t=` segment)."""
        return self.id.partition("#t=")[0]

    @property
    def key(self) -> str:
        """A file-name-safe key, stable across runs and unique per entry (used for work files and results).

        The CSV line is part of it: two rows naming the same video (the second
        reported as an error) must not share results.
        """
        return hashlib.sha1(f"{self.split}\0{self.id}\0{self.line}".encode()).hexdigest()[:20]


def _is_video(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith(".")


def walk_videos(root: str) -> List[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_video(f))
    return found


def _rel(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def assign_split(video_id: str, fractions: Sequence[Tuple[str, float]], default: str = DEFAULT_SPLIT) -> str:
    """Deterministic split by a hash of the id: the same video lands in the same split on every run."""
    u = int(hashlib.sha256(video_id.encode()).hexdigest()[:12], 16) / float(16 ** 12)
    acc = 0.0
    for name, fraction in fractions:
        acc += fraction
        if u < acc:
            return name
    return default


def list_folder(root: str) -> Tuple[List[Item], bool]:
    """Items of a folder; returns (items, labelled)."""
    root = os.path.abspath(root)
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    subdirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    loose = [e for e in entries if os.path.isfile(os.path.join(root, e)) and _is_video(e)]
    items: List[Item] = []
    if subdirs and not loose and all(d in SPLIT_FOLDERS for d in subdirs):
        # train/CLASS/video.mp4 ...: split folders above class folders.
        for split in subdirs:
            split_root = os.path.join(root, split)
            for cls in sorted(d for d in os.listdir(split_root)
                              if os.path.isdir(os.path.join(split_root, d)) and not d.startswith(".")):
                for path in walk_videos(os.path.join(split_root, cls)):
                    items.append(Item(_rel(path, root), path, cls, "val" if split == "validation" else split))
        return items, True
    class_videos = {cls: walk_videos(os.path.join(root, cls)) for cls in subdirs}
    if any(class_videos.values()):
        # Class folders. A video lying beside them has no class: report it rather than
        # silently treating the whole source as unlabelled.
        for cls, paths in class_videos.items():
            items.extend(Item(_rel(path, root), path, cls) for path in paths)
        for name in loose:
            path = os.path.join(root, name)
            items.append(Item(name, path, "", error=f"{path}: a video beside the class folders "
                                                    f"({', '.join(subdirs)}) has no class; move it into one"))
        return items, True
    for path in walk_videos(root):
        items.append(Item(_rel(path, root), path))
    return items, False


def list_csv(csv_path: str, labels: Optional[Sequence[str]] = None,
             values: Sequence[str] = ()) -> Tuple[List[Item], bool]:
    """Items of a CSV with a header `path[,label][,split][,start,end][,value]`; returns (items, labelled).

    `values` names the numeric columns to keep (default: `value` when the CSV has one); a multi-label
    CSV (a `label` with `;`) gives every item its `labels`.
    """
    root = os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]  # `Path,Label` is `path,label`
        if "path" not in fields:
            raise SourceError(f"{csv_path}: expected a header with a `path` column "
                              f"(path,label[,split]); received columns {fields}")
        labelled = "label" in fields
        value_names = [v.strip().lower() for v in values] or (["value"] if "value" in fields else [])
        absent = [v for v in value_names if v not in fields]
        if absent:
            raise SourceError(f"{csv_path}: expected value columns {absent} (--values); received columns {fields}")
        allowed = set(labels) if labels else None
        items: List[Item] = []
        rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
        multi = labelled and any(";" in row.get("label", "") for row in rows)
        for n, row in enumerate(rows, start=2):
            rel = row.get("path", "")
            label = row.get("label", "") if labelled else ""
            names = split_labels(label) if multi else ()
            if multi:
                label = ";".join(names)
            split = row.get("split", "") or DEFAULT_SPLIT
            where = f"{csv_path}:{n}"
            start, problem = parse_seconds(row.get("start", ""), "start")
            end, end_problem = parse_seconds(row.get("end", ""), "end")
            problem = problem or end_problem or check_interval(start, end)
            numbers, value_problem = parse_values(row, value_names)
            problem = problem or value_problem
            extra = {"start": start, "end": end, "labels": names, "values": numbers, "origin": where}
            if not rel:
                items.append(Item(f"<line {n}>", "", label, split, f"{where}: empty path", n, **extra))
                continue
            path = os.path.normpath(os.path.join(root, rel))
            vid = _rel(path, root)
            if vid.startswith("../") or vid == "..":  # an absolute path is fine when it lies in the folder
                items.append(Item(rel, path, label, split,
                                  f"{where}: path {rel!r} escapes the CSV's folder {root}", n, **extra))
                continue
            vid = listed_id(vid, start, end)
            if problem:
                items.append(Item(vid, path, label, split, f"{where}: {problem}", n, **extra))
                continue
            if labelled and not label:
                items.append(Item(vid, path, label, split, f"{where}: empty label", n, **extra))
                continue
            unknown = [x for x in (names or (label,)) if x not in allowed] if allowed is not None and labelled else []
            if unknown:
                items.append(Item(vid, path, label, split,
                                  f"{where}: unknown label {unknown[0]!r}; expected one of {sorted(allowed)}", n,
                                  **extra))
                continue
            extras = dict(extra)
            for column in ("mask", "intervals", "target"):
                if row.get(column):
                    extra = os.path.normpath(os.path.join(root, row[column]))
                    if _rel(extra, root).startswith("../"):
                        problem = f"{where}: {column} {row[column]!r} escapes the CSV's folder {root}"
                    extras[column] = extra
            if (start is not None or end is not None) and any(extras.get(c) for c in ("mask", "intervals", "target")):
                problem = problem or (f"{where}: a segment (start/end) of a video with mask, intervals or target "
                                      "columns is not supported; list the whole video")
            items.append(Item(vid, path, label, split, problem, n, **extras))
    return items, labelled


@dataclasses.dataclass(frozen=True)
class Source:
    """What a source lists: its items sorted by (split, id), the class names (index order), whether an
    item holds one class (`single`), several (`multi`) or none (`none`), and the names of its values."""

    items: Tuple[Item, ...]
    labels: Tuple[str, ...]
    label_mode: str = "single"
    value_names: Tuple[str, ...] = ()


def listed_id(video: str, start: Optional[float], end: Optional[float]) -> str:
    """An item's id: the video's, with `#t=START,END` for a segment (END empty until the video is read)."""
    if start is None and end is None:
        return video
    from tfrecords_tools.schema import format_seconds

    return f"{video}#t={format_seconds(start or 0.0)},{'' if end is None else format_seconds(end)}"


def parse_seconds(text: str, column: str) -> Tuple[Optional[float], str]:
    """A `start`/`end` cell -> (seconds or None when empty, problem)."""
    if not text:
        return None, ""
    try:
        value = float(text)
    except ValueError:
        return None, f"{column} must be seconds; received {text!r}"
    if not math.isfinite(value) or value < 0:
        return None, f"{column} must be seconds >= 0; received {text!r}"
    return value, ""


def check_interval(start: Optional[float], end: Optional[float]) -> str:
    """The problem with a segment's bounds ('' none): an empty or reversed interval."""
    if start is not None and end is not None and end <= start:
        kind = "an empty" if end == start else "a reversed"
        return f"{kind} interval: start={start:g}s, end={end:g}s; expected start < end"
    return ""


def split_labels(text: str) -> Tuple[str, ...]:
    """`a;b; c` -> ('a', 'b', 'c'): a multi-label cell, blanks and repeats dropped, order kept."""
    from tfrecords_tools.schema import MULTI_LABEL_SEPARATOR

    return tuple(dict.fromkeys(n.strip() for n in text.split(MULTI_LABEL_SEPARATOR) if n.strip()))


def parse_values(row: dict, names: Sequence[str]) -> Tuple[Tuple[float, ...], str]:
    """The numbers of `names` in a row -> (values, problem)."""
    values = []
    for name in names:
        text = row.get(name, "")
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            what = "is empty" if not text else f"is {text!r}"
            return (), f"value column {name!r} {what}; expected a finite number"
        values.append(value)
    return tuple(values), ""


def label_clashes(names: Sequence[str]) -> List[str]:
    """Warnings for class names that differ only by case (`Left`, `left`): they are distinct classes."""
    groups = {}
    for name in names:
        groups.setdefault(name.casefold(), []).append(name)
    return [f"labels {' and '.join(repr(n) for n in group)} differ only by case: they are {len(group)} classes "
            f"(pass --labels to fix the set)" for group in groups.values() if len(group) > 1]


def read_intervals(path: str) -> List[Tuple[float, float, str]]:
    """A CSV `start,end,label` (seconds, end exclusive) -> its rows; raises `ValueError` naming the file and line."""
    out = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if not {"start", "end", "label"} <= set(fields):
            raise ValueError(f"{path}: expected a header start,end,label; received columns {fields}")
        for n, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            try:
                start, end = float(row["start"]), float(row["end"])
            except ValueError:
                raise ValueError(f"{path}:{n}: start and end must be seconds; received "
                                 f"{row['start']!r}, {row['end']!r}") from None
            if not 0 <= start < end or not row["label"]:
                raise ValueError(f"{path}:{n}: expected 0 <= start < end and a label; received "
                                 f"start={start}, end={end}, label={row['label']!r}")
            out.append((start, end, row["label"]))
    return out


def list_source(src: str, labels: Optional[Sequence[str]] = None,
                fractions: Sequence[Tuple[str, float]] = ()) -> Tuple[List[Item], List[str]]:
    """All items of `src` (folder or CSV), sorted by (split, id); and the label names (sorted).

    `fractions`, e.g. [('val', 0.2)], moves that share of the videos of the
    default split into other splits, deterministically by id.
    """
    source = read_source(src, labels, fractions)
    return list(source.items), list(source.labels)


def read_source(src: str, labels: Optional[Sequence[str]] = None, fractions: Sequence[Tuple[str, float]] = (),
                values: Sequence[str] = (), annotations: str = "", fold: int = 1) -> Source:
    """The `Source` of `src`: a folder, a CSV, or (with `annotations` `FORMAT:PATH`) a folder of videos
    described by a standard dataset's annotation files (`tfrecords_tools.annotations`).

    `values` names a CSV's numeric columns to store (default: its `value` column, if any).
    """
    if annotations:
        from tfrecords_tools.annotations import read_annotations

        listed = read_annotations(annotations, src, fold)
        items, labelled, value_names = list(listed.items), bool(listed.labels), ()
        if labels:
            allowed = set(labels)
            items = [dataclasses.replace(i, error=f"{i.id}: unknown label {bad[0]!r}; expected one of "
                                                  f"{sorted(allowed)}")
                     if not i.error and (bad := [x for x in (i.labels or (i.label,)) if x not in allowed]) else i
                     for i in items]
        return _finish(src, items, labels or listed.labels, labelled, fractions, listed.label_mode == "multi", ())
    if not os.path.exists(src):
        raise SourceError(f"{src}: not found. Expected a folder of videos or a CSV file.")
    if os.path.isdir(src):
        items, labelled = list_folder(src)
        if labels:
            allowed = set(labels)
            items = [dataclasses.replace(i, error=f"{i.path}: unknown label {i.label!r}; expected one of "
                                                  f"{sorted(allowed)}") if i.label not in allowed else i
                     for i in items]
    elif src.lower().endswith(".csv"):
        items, labelled = list_csv(src, labels, values)
    else:
        raise SourceError(f"{src}: expected a folder of videos or a .csv file, received a file of another kind")
    if values and not src.lower().endswith(".csv"):
        raise SourceError(f"{src}: --values needs a CSV source with those columns; received a folder")
    value_names = tuple(v.strip().lower() for v in values)
    if not value_names and src.lower().endswith(".csv") and any(i.values for i in items):
        value_names = ("value",)
    return _finish(src, items, labels, labelled, fractions, any(i.labels for i in items), value_names)


def _finish(src: str, items: List[Item], labels: Optional[Sequence[str]], labelled: bool,
            fractions: Sequence[Tuple[str, float]], multi: bool, value_names: Tuple[str, ...]) -> Source:
    """Splits by fraction, reports repeats, sorts, and names the classes."""
    if not items:
        raise SourceError(f"{src}: no videos found (looked for {', '.join(VIDEO_EXTENSIONS)})")
    if fractions:
        items = [dataclasses.replace(i, split=assign_split(i.id, fractions)) if i.split == DEFAULT_SPLIT else i
                 for i in items]
    seen = {}
    unique = []
    for item in items:
        k = (item.split, item.id)
        if k in seen and not item.error:
            first = seen[k]
            where = f"{src}:{item.line}: " if item.line else ""
            also = f" (first on line {first.line})" if first.line else ""
            what = item.path + item.id[len(item.video):]  # a segment: its `#t=` too
            item = dataclasses.replace(item, error=f"{where}{what}: listed twice in split {item.split!r}{also}")
            k = (item.split, f"{item.id}#dup{item.line}")
        seen[k] = item
        unique.append(item)
    unique.sort(key=lambda i: (i.split, i.id, i.line))
    if labels:
        names = list(labels)
    elif multi:
        names = sorted({n for i in unique if not i.error for n in i.labels})
    elif labelled:
        names = sorted({i.label for i in unique if i.label and not i.error})
    else:
        names = []
    mode = "multi" if multi else "single" if labelled or labels else "none"
    return Source(tuple(unique), tuple(names), mode, value_names)
