"""Source stage: turn a folder or a CSV into the list of videos to convert, with labels and splits.

Three inputs are understood:
- a folder with one subfolder per class (labels = folder names, as Keras'
  `*_dataset_from_directory`), optionally below split folders
  (`train/`, `val/`, `test/`);
- a flat folder of videos (unlabelled);
- a CSV with columns `path,label[,split]` (or `path` alone; header in any
  case), paths relative to the CSV's folder or absolute inside it. Optional segmentation columns:
  `mask` (a lossless mask video or a folder of PNG masks, one per frame: class ids in the first
  channel) and `intervals` (a CSV `start,end,label` in seconds: a class per frame).

Problems with one entry (an empty or unknown label, a path that escapes the
CSV's folder) do not stop the listing: they come back as `Item`s with an
`error`, so the converter reports them like any other failed video.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
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


def list_csv(csv_path: str, labels: Optional[Sequence[str]] = None) -> Tuple[List[Item], bool]:
    """Items of a CSV with a header `path[,label][,split]`; returns (items, labelled)."""
    root = os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]  # `Path,Label` is `path,label`
        if "path" not in fields:
            raise SourceError(f"{csv_path}: expected a header with a `path` column "
                              f"(path,label[,split]); received columns {fields}")
        labelled = "label" in fields
        allowed = set(labels) if labels else None
        items: List[Item] = []
        for n, row in enumerate(reader, start=2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            rel = row.get("path", "")
            label = row.get("label", "") if labelled else ""
            split = row.get("split", "") or DEFAULT_SPLIT
            where = f"{csv_path}:{n}"
            if not rel:
                items.append(Item(f"<line {n}>", "", label, split, f"{where}: empty path", n))
                continue
            path = os.path.normpath(os.path.join(root, rel))
            vid = _rel(path, root)
            if vid.startswith("../") or vid == "..":  # an absolute path is fine when it lies in the folder
                items.append(Item(rel, path, label, split,
                                  f"{where}: path {rel!r} escapes the CSV's folder {root}", n))
                continue
            if labelled and not label:
                items.append(Item(vid, path, label, split, f"{where}: empty label", n))
                continue
            if allowed is not None and labelled and label not in allowed:
                items.append(Item(vid, path, label, split,
                                  f"{where}: unknown label {label!r}; expected one of {sorted(allowed)}", n))
                continue
            extras, problem = {}, ""
            for column in ("mask", "intervals", "target"):
                if row.get(column):
                    extra = os.path.normpath(os.path.join(root, row[column]))
                    if _rel(extra, root).startswith("../"):
                        problem = f"{where}: {column} {row[column]!r} escapes the CSV's folder {root}"
                    extras[column] = extra
            items.append(Item(vid, path, label, split, problem, n, **extras))
    return items, labelled


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
        items, labelled = list_csv(src, labels)
    else:
        raise SourceError(f"{src}: expected a folder of videos or a .csv file, received a file of another kind")
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
            item = dataclasses.replace(item, error=f"{where}{item.path}: listed twice in split {item.split!r}{also}")
            k = (item.split, f"{item.id}#dup{item.line}")
        seen[k] = item
        unique.append(item)
    unique.sort(key=lambda i: (i.split, i.id, i.line))
    if labels:
        names = list(labels)
    elif labelled:
        names = sorted({i.label for i in unique if i.label and not i.error})
    else:
        names = []
    return unique, names
