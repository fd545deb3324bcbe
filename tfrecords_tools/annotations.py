"""Source stage: the annotation files of standard video datasets -> the same `Item`s as a CSV gives.

Read from the user's local copies (nothing is downloaded); the videos lie in
a folder beside them. `read_annotations("FORMAT:PATH", videos, fold)` knows:

- `kinetics:PATH`: the Kinetics CSVs (`label,youtube_id,time_start,time_end,split[,is_cc]`; PATH a CSV
  or a folder of them). A trimmed clip named `ID_START_END.*` (START, END zero-padded 6-digit seconds,
  the downloaders' layout) is the item; otherwise a full video `ID.*` gives the segment
  `time_start..time_end`.
- `ucf101:PATH`: the `ucfTrainTestlist` folder: `classInd.txt` (`1 ApplyEyeMakeup`),
  `trainlist0N.txt` (`Class/v_X.avi 1`) and `testlist0N.txt` (`Class/v_X.avi`) of fold N.
- `hmdb51:PATH`: the folder of split files `<class>_test_split<N>.txt`, lines `video.avi 0|1|2`
  (1 train, 2 test, 0 not in this fold: left out).
- `ssv2:PATH`: Something-Something v2's folder with `labels.json` (`{name: "index"}`) and
  `train.json` / `validation.json` (lists of `{"id", "label", "template", "placeholders"}`); the
  class is the `template` with its brackets removed; videos `ID.webm`.
- `charades:PATH`: the folder with `Charades_v1_train.csv` / `Charades_v1_test.csv` (`id,...,actions`,
  actions `c092 11.90 21.20;c147 0.00 12.60`) and optionally `Charades_v1_classes.txt`
  (`c000 Holding some clothes`): one multi-label item per video (the classes of all its actions), as
  Charades' classification benchmark scores it.

A video is found by its path below the videos folder, else by its file name
anywhere below it (any video extension). An annotation line whose video is
missing or whose class is unknown is an `Item` with an `error`, like a bad CSV row.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from typing import Dict, Iterable, List, Optional, Tuple

from tfrecords_tools.sources import DEFAULT_SPLIT, Item, Source, SourceError, listed_id, walk_videos

FORMATS = ("kinetics", "ucf101", "hmdb51", "ssv2", "charades")
_TRIMMED = re.compile(r"^(?P<id>.+)_(?P<start>\d{6})_(?P<end>\d{6})$")


class _Videos:
    """The videos below a folder, found by relative path (any case) or by file name with or without extension."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        if not os.path.isdir(self.root):
            raise SourceError(f"{root}: expected the folder of the dataset's videos")
        self.by_rel: Dict[str, str] = {}
        self.by_name: Dict[str, str] = {}
        for path in walk_videos(self.root):
            rel = os.path.relpath(path, self.root).replace(os.sep, "/")
            name = os.path.basename(path)
            self.by_rel.setdefault(rel.lower(), path)
            self.by_name.setdefault(name.lower(), path)
            self.by_name.setdefault(os.path.splitext(name)[0].lower(), path)

    def find(self, *names: str) -> Optional[str]:
        for name in names:
            key = name.replace("\\", "/").lower()
            path = self.by_rel.get(key) or self.by_name.get(os.path.basename(key))
            if path:
                return path
        return None

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.root).replace(os.sep, "/")


def read_annotations(annotations: str, videos: str, fold: int = 1) -> Source:
    """`FORMAT:PATH` -> the `Source` of the videos in `videos` that the files at PATH describe."""
    fmt, sep, path = annotations.partition(":")
    fmt = fmt.strip().lower()
    if not sep or fmt not in FORMATS:
        raise SourceError(f"--annotations {annotations!r}: expected FORMAT:PATH with FORMAT one of "
                          f"{', '.join(FORMATS)}")
    if not os.path.exists(path):
        raise SourceError(f"--annotations {annotations!r}: {path} not found")
    if fmt in ("ucf101", "hmdb51") and fold not in (1, 2, 3):
        raise SourceError(f"--fold {fold}: {fmt} has folds 1, 2 and 3")
    found = _Videos(videos)
    reader = {"kinetics": _kinetics, "ucf101": _ucf101, "hmdb51": _hmdb51, "ssv2": _ssv2,
              "charades": _charades}[fmt]
    items, labels, mode = reader(path, found, fold)
    if not items:
        raise SourceError(f"--annotations {annotations!r}: no videos listed")
    return Source(tuple(items), tuple(labels), mode)


def _missing(where: str, names: Iterable[str], found: _Videos) -> str:
    return f"{where}: no video {' or '.join(names)} below {found.root}"


def _item(found: _Videos, names: List[str], label: str, split: str, where: str, line: int, **extra) -> Item:
    path = found.find(*names)
    if path is None:
        vid = listed_id(names[0], extra.get("start"), extra.get("end"))
        return Item(vid, os.path.join(found.root, names[0]), label, split, _missing(where, names, found), line,
                    origin=where, **extra)
    return Item(listed_id(found.rel(path), extra.get("start"), extra.get("end")), path, label, split, "", line,
                origin=where, **extra)


def _unknown(item: Item, label: str, labels: Iterable[str]) -> Item:
    if item.error:
        return item
    return dataclasses.replace(item, error=f"{item.origin}: unknown class {label!r}; expected one of the "
                                           f"{len(list(labels))} in the class list")


# --- Kinetics ------------------------------------------------------------------------------------


def _kinetics(path: str, found: _Videos, fold: int):
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(".csv")) \
        if os.path.isdir(path) else [path]
    items = []
    for file in files:
        with open(file, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in reader.fieldnames or []]
            if not {"youtube_id", "time_start", "time_end"} <= set(fields):
                raise SourceError(f"{file}: expected Kinetics columns label,youtube_id,time_start,time_end,split; "
                                  f"received {fields}")
            for n, row in enumerate(reader, start=2):
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                where = f"{file}:{n}"
                split = {"validate": "val", "validation": "val"}.get(row.get("split", ""), row.get("split", ""))
                split = split or DEFAULT_SPLIT
                vid, label = row["youtube_id"], row.get("label", "")
                try:
                    start, end = float(row["time_start"]), float(row["time_end"])
                except ValueError:
                    items.append(Item(vid, "", label, split, f"{where}: time_start and time_end must be seconds; "
                                      f"received {row['time_start']!r}, {row['time_end']!r}", n, origin=where))
                    continue
                trimmed = f"{vid}_{int(start):06d}_{int(end):06d}"
                path_ = found.find(trimmed)
                if path_ is not None:  # the downloaders' clip of just that segment: the whole file
                    items.append(Item(found.rel(path_), path_, label, split, "", n, origin=where))
                    continue
                if end <= start:
                    items.append(Item(vid, "", label, split, f"{where}: an empty or reversed interval: "
                                      f"time_start={start:g}, time_end={end:g}", n, origin=where))
                    continue
                item = _item(found, [vid], label, split, where, n, start=start, end=end)
                if item.error:
                    item = Item(item.id, item.path, label, split, _missing(where, [trimmed, vid], found), n,
                                origin=where)
                items.append(item)
    labels = sorted({i.label for i in items if i.label})
    return items, labels, "single" if labels else "none"


# --- UCF101 --------------------------------------------------------------------------------------


def _lines(path: str) -> Iterable[Tuple[int, List[str]]]:
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, start=1):
            parts = line.split()
            if parts:
                yield n, parts


def _ucf101(path: str, found: _Videos, fold: int):
    def need(name: str) -> str:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise SourceError(f"{file}: not found; expected UCF101's classInd.txt, trainlist0N.txt and testlist0N.txt")
        return file

    classes = {}
    class_file = need("classInd.txt")
    for n, parts in _lines(class_file):
        if len(parts) != 2 or not parts[0].isdigit():
            raise SourceError(f"{class_file}:{n}: expected `INDEX NAME` (e.g. `1 ApplyEyeMakeup`); received "
                              f"{' '.join(parts)!r}")
        classes[int(parts[0])] = parts[1]
    labels = [classes[k] for k in sorted(classes)]
    by_lower = {name.lower(): name for name in labels}
    items = []
    for split, name in (("train", f"trainlist0{fold}.txt"), ("test", f"testlist0{fold}.txt")):
        file = need(name)
        for n, parts in _lines(file):
            where = f"{file}:{n}"
            rel = parts[0]
            folder = rel.split("/")[0]
            if len(parts) > 1 and parts[1].isdigit():
                label = classes.get(int(parts[1]), "")
                if not label:
                    items.append(Item(rel, "", "", split, f"{where}: class index {parts[1]} is not in "
                                      f"{class_file}", n, origin=where))
                    continue
            else:  # test lists name the class only by the folder (its case differs for a few classes)
                label = by_lower.get(folder.lower(), folder)
            item = _item(found, [rel, rel.split("/")[-1]], label, split, where, n)
            items.append(item if label in by_lower.values() else _unknown(item, label, labels))
    return items, labels, "single"


# --- HMDB51 --------------------------------------------------------------------------------------


def _hmdb51(path: str, found: _Videos, fold: int):
    pattern = re.compile(rf"^(?P<cls>.+)_test_split{fold}\.txt$")
    files = sorted(f for f in os.listdir(path) if pattern.match(f)) if os.path.isdir(path) else []
    if not files:
        raise SourceError(f"{path}: no split files <class>_test_split{fold}.txt (HMDB51's testTrainMulti_7030_splits)")
    items = []
    labels = sorted(pattern.match(f).group("cls") for f in files)
    for name in files:
        cls = pattern.match(name).group("cls")
        file = os.path.join(path, name)
        for n, parts in _lines(file):
            where = f"{file}:{n}"
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                items.append(Item(parts[0], "", cls, "train", f"{where}: expected `VIDEO 0|1|2`; received "
                                  f"{' '.join(parts)!r}", n, origin=where))
                continue
            if parts[1] == "0":  # not in this fold's train or test set
                continue
            split = "train" if parts[1] == "1" else "test"
            items.append(_item(found, [f"{cls}/{parts[0]}", parts[0]], cls, split, where, n))
    return items, labels, "single"


# --- Something-Something v2 ----------------------------------------------------------------------


def _template_class(template: str) -> str:
    return template.replace("[", "").replace("]", "")


def _ssv2(path: str, found: _Videos, fold: int):
    label_file = os.path.join(path, "labels.json")
    if not os.path.isfile(label_file):
        raise SourceError(f"{label_file}: not found; expected Something-Something v2's labels.json, train.json "
                          "and validation.json")
    with open(label_file, encoding="utf-8") as f:
        index = {name: int(i) for name, i in json.load(f).items()}
    labels = [name for name, _ in sorted(index.items(), key=lambda kv: kv[1])]
    by_lower = {name.lower(): name for name in labels}
    items = []
    for split, name in (("train", "train.json"), ("val", "validation.json")):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        with open(file, encoding="utf-8") as f:
            entries = json.load(f)
        for n, entry in enumerate(entries, start=1):
            where = f"{file}[{n - 1}]"
            vid = str(entry.get("id", ""))
            template = entry.get("template", "")
            label = by_lower.get(_template_class(template).lower(), "")
            item = _item(found, [f"{vid}.webm", vid], label, split, where, n)
            items.append(item if label else _unknown(item, _template_class(template), labels))
    return items, labels, "single"


# --- Charades ------------------------------------------------------------------------------------


def _charades(path: str, found: _Videos, fold: int):
    classes: Dict[str, str] = {}
    class_file = os.path.join(path, "Charades_v1_classes.txt")
    if os.path.isfile(class_file):
        with open(class_file, encoding="utf-8-sig") as f:
            for line in f:
                code, _, name = line.strip().partition(" ")
                if code:
                    classes[code] = name.strip() or code
    items = []
    for split, name in (("train", "Charades_v1_train.csv"), ("test", "Charades_v1_test.csv")):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        with open(file, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not {"id", "actions"} <= set(reader.fieldnames or []):
                raise SourceError(f"{file}: expected Charades columns id,...,actions; received {reader.fieldnames}")
            for n, row in enumerate(reader, start=2):
                where = f"{file}:{n}"
                codes, problem = [], ""
                for action in filter(None, (a.strip() for a in (row["actions"] or "").split(";"))):
                    parts = action.split()
                    if len(parts) != 3:
                        problem = f"{where}: action {action!r}: expected `cNNN START END`"
                        break
                    codes.append(parts[0])
                unknown = [c for c in codes if classes and c not in classes]
                if unknown and not problem:
                    problem = f"{where}: unknown class {unknown[0]!r}; expected one of {class_file}'s codes"
                names = tuple(dict.fromkeys(classes.get(c, c) for c in codes))
                item = _item(found, [f"{row['id']}.mp4", row["id"]], ";".join(names), split, where, n, labels=names)
                if problem and not item.error:
                    item = dataclasses.replace(item, error=problem)
                items.append(item)
    if not items and not os.path.isdir(path):
        raise SourceError(f"{path}: expected the folder holding Charades_v1_train.csv and Charades_v1_test.csv")
    # Index = the code's number when the class list is there (c000 -> 0), else the codes found, sorted.
    labels = list(classes.values()) if classes else sorted({c for i in items for c in i.labels})
    return items, labels, "multi"
