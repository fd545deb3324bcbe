"""Manifest stage: `dataset.json`, the description of a converted folder, read, written and checked.

Layout (every reader relies on it; `validate` enforces it):

    {
      "format": "stpkeras.patches", "schema_version": 1,
      "spec": {PatchSpec as a dict}, "encoding": "raw|jpeg|png", "quality": 90,
      "compression": "none|gzip|zlib",
      "labels": ["class_a", "class_b"],          # label index = position; [] when unlabelled
      "label_mode": "single|multi|none",         # multi: records carry `label/multi_hot` [len(labels)]
      "value_names": ["speed"],                  # records carry `value/data` [len(value_names)]; [] when none
      "splits": {"train": {"records": N, "videos": V, "label_counts": {"class_a": n},
                           "shards": [{"file": "train-00000-of-00002.tfrecord",
                                       "records": n, "bytes": b, "sha256": "..."}]}},
      "videos": [{"id": "class_a/x.mp4", "split": "train", "label": "class_a",
                  "status": "ok|failed|skipped", "reason": "", "patches": n,
                  "segment": [start, end],              # seconds of the source video, for segments
                  "sampled": {"clips": n, "max_patches": n, "of": n},  # when patches were sampled
                  "frames": n, "height": h, "width": w, "source": {...},
                  "rotation": 0, "mirrored": true,       # display matrix applied; mirrored only when true
                  "size_changes": n, "size_change_list": [{"frame": i, "from": [h, w], "to": [h, w],
                                                            "fit": "resize|scale|cover"}]}],  # when any
      "counts": {"videos": V, "ok": n, "failed": n, "skipped": n, "patches": N},
      "command": "stp convert ...", "versions": {...}, "created": "...", "seconds": s
    }
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Dict, List

from tfrecords_tools.errors import BadData, BadInput
from tfrecords_tools.spec import COMPRESSIONS, ENCODINGS, PatchSpec

MANIFEST_NAME = "dataset.json"
FORMAT = "stpkeras.patches"


class ManifestError(BadData, ValueError):
    """A `dataset.json` that is missing, unreadable or inconsistent: the folder is not valid data (exit 3)."""


class UnknownSplit(BadInput, ManifestError):
    """A split the manifest does not have: the data is fine, the command asked for the wrong split (exit 2)."""


def _gfile():
    import tensorflow as tf  # gfile gives gs:// (and s3:// with tensorflow-io) paths
    return tf.io.gfile


def join(root: str, name: str) -> str:
    """Joins paths the way gfile expects (posix separators also for gs://)."""
    if "://" in root:
        return posixpath.join(root, name)
    return os.path.join(root, name)


def manifest_path(root: str) -> str:
    return join(root, MANIFEST_NAME)


def read_manifest(root: str) -> dict:
    """Reads and validates `ROOT/dataset.json`; raises `ManifestError` naming the file."""
    from tfrecords_tools.storage import check_path, is_remote

    path = manifest_path(check_path(root))
    # A local manifest is read without TensorFlow, so commands that only read it (`stp inspect`) start at once.
    local = not is_remote(path)
    if not (os.path.isfile(path) if local else _gfile().exists(path)):
        raise ManifestError(f"{path}: no manifest. Expected a folder written by `stp convert`.")
    try:
        if local:
            with open(path, encoding="utf-8") as f:
                data = json.loads(f.read())
        else:
            with _gfile().GFile(path, "r") as f:
                data = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from e
    validate(data, path)
    return data


def write_manifest(root: str, data: dict) -> str:
    """Writes the manifest atomically (temporary name, then rename)."""
    validate(data, manifest_path(root))
    path = manifest_path(root)
    tmp = path + ".tmp"
    gfile = _gfile()
    with gfile.GFile(tmp, "w") as f:
        f.write(json.dumps(data, indent=1, sort_keys=False) + "\n")
    gfile.rename(tmp, path, overwrite=True)
    return path


def validate(data: dict, where: str = MANIFEST_NAME) -> None:
    from tfrecords_tools.schema import SCHEMA_VERSION

    def fail(msg):
        raise ManifestError(f"{where}: {msg}")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        fail(f"format is {data.get('format') if isinstance(data, dict) else data!r}, expected {FORMAT!r}")
    if data.get("schema_version") != SCHEMA_VERSION:
        fail(f"schema version {data.get('schema_version')!r}; this stpkeras reads version {SCHEMA_VERSION}. "
             "Convert the videos again with this version.")
    try:
        PatchSpec.from_dict(data["spec"])
    except (KeyError, TypeError, ValueError) as e:
        fail(f"bad spec: {e}")
    if data.get("encoding") not in ENCODINGS:
        fail(f"encoding {data.get('encoding')!r}, expected one of {ENCODINGS}")
    if data.get("compression") not in COMPRESSIONS:
        fail(f"compression {data.get('compression')!r}, expected one of {COMPRESSIONS}")
    if not isinstance(data.get("labels"), list):
        fail("labels must be a list of class names")
    if data.get("label_mode", "single") not in LABEL_MODES:
        fail(f"label_mode {data.get('label_mode')!r}, expected one of {LABEL_MODES}")
    if not isinstance(data.get("value_names", []), list):
        fail("value_names must be a list of names")
    splits = data.get("splits")
    if not isinstance(splits, dict):
        fail("splits must be an object")
    for name, split in splits.items():
        shards = split.get("shards")
        if not isinstance(shards, list):
            fail(f"split {name!r} has no shard list")
        total = sum(s.get("records", 0) for s in shards)
        if total != split.get("records"):
            fail(f"split {name!r} says {split.get('records')} records but its shards hold {total}")


LABEL_MODES = ("single", "multi", "none")


def label_mode(data: dict) -> str:
    """`single`, `multi` or `none` (manifests written before the key: single when it has labels)."""
    return data.get("label_mode") or ("single" if data.get("labels") else "none")


def value_names(data: dict) -> List[str]:
    """The names of the values in `value/data`, in order; [] when the records carry none."""
    return list(data.get("value_names") or [])


def spec_of(data: dict) -> PatchSpec:
    return PatchSpec.from_dict(data["spec"])


def split_names(data: dict) -> List[str]:
    return list(data["splits"])


def shard_files(root: str, data: dict, split: str) -> List[str]:
    """Full paths of the shards of `split`, in order."""
    if split not in data["splits"]:
        raise UnknownSplit(f"{manifest_path(root)}: no split {split!r}. Available: {sorted(data['splits'])}")
    return [join(root, s["file"]) for s in data["splits"][split]["shards"]]


def num_records(data: dict, split: str) -> int:
    return int(data["splits"][split]["records"])


def compression_type(data: dict) -> str:
    """The `compression_type` argument for `tf.data.TFRecordDataset` ('' | 'GZIP' | 'ZLIB')."""
    return {"none": "", "gzip": "GZIP", "zlib": "ZLIB"}[data["compression"]]


def label_counts(data: dict) -> Dict[str, Dict[str, int]]:
    return {name: dict(split.get("label_counts", {})) for name, split in data["splits"].items()}
