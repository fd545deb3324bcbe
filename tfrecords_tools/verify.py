"""Verify stage: read every record of every shard and check it against the manifest.

Checks, per shard: the file exists, its size and sha256 match the manifest,
every record's CRCs hold (TF's reader checks them), the record count
matches, and every patch parses and decodes to the spec's shape with the
manifest's encoding, split and label map. Problems name the shard and the
record index.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Callable, Iterator, List, Optional

from tfrecords_tools import manifest as mf
from tfrecords_tools import outputs
from tfrecords_tools import schema
from tfrecords_tools.errors import BadData
from tfrecords_tools.shards import sha256_file


@dataclasses.dataclass
class VerifyReport:
    shards: int = 0
    records: int = 0
    problems: List[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(root: str, on_shard: Optional[Callable[[str, int], None]] = None) -> VerifyReport:
    """Checks the converted folder `root`; never raises for bad data, reports it.

    Holds `root` for reading (`outputs.reading`): a folder being written raises `OutputBusyError`.
    """
    with outputs.reading(root):
        return _verify(root, on_shard)


def _verify(root: str, on_shard: Optional[Callable[[str, int], None]]) -> VerifyReport:
    import tensorflow as tf

    report = VerifyReport()
    data = mf.read_manifest(root)
    spec = mf.spec_of(data)
    labels = data["labels"]
    encoding = data["encoding"]
    gfile = tf.io.gfile
    for split, info in data["splits"].items():
        for entry in info["shards"]:
            report.shards += 1
            name = entry["file"]
            path = mf.join(root, name)
            if not gfile.exists(path):
                report.problems.append(f"{name}: missing")
                continue
            size = gfile.stat(path).length
            if size != entry["bytes"]:
                report.problems.append(f"{name}: {size} bytes, the manifest says {entry['bytes']}")
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                report.problems.append(f"{name}: sha256 {digest[:16]}..., the manifest says {entry['sha256'][:16]}...")
            count = 0
            dataset = tf.data.TFRecordDataset(path, compression_type=mf.compression_type(data))
            iterator = iter(dataset)
            while True:
                try:
                    record = next(iterator)
                except StopIteration:
                    break
                except (tf.errors.DataLossError, tf.errors.OutOfRangeError, tf.errors.InvalidArgumentError) as e:
                    report.problems.append(f"{name}: record {count}: unreadable (corrupt or truncated): "
                                           f"{e.message.splitlines()[0] if hasattr(e, 'message') else e}")
                    break
                problem = _check_record(record.numpy(), spec, encoding, split, labels, mf.label_mode(data),
                                        len(mf.value_names(data)))
                if problem:
                    report.problems.append(f"{name}: record {count}: {problem}")
                count += 1
            report.records += count
            if count != entry["records"]:
                report.problems.append(f"{name}: {count} readable records, the manifest says {entry['records']}")
            if on_shard:
                on_shard(name, count)
    return report


def find_damaged_shard(root: str) -> str:
    """The first shard of `root` whose file is missing or differs from the manifest (size, then sha256).

    A quick look for the culprit after the input pipeline failed: no record is
    parsed, and it stops at the first bad shard. Returns the problem, naming the
    shard's path (as `verify` words it), or '' when every shard matches.
    """
    import tensorflow as tf

    data = mf.read_manifest(root)
    entries = [entry for info in data["splits"].values() for entry in info["shards"]]
    gfile = tf.io.gfile
    for entry in entries:  # sizes first: a truncated shard is found without reading anything
        path = mf.join(root, entry["file"])
        if not gfile.exists(path):
            return f"{path}: missing"
        size = gfile.stat(path).length
        if size != entry["bytes"]:
            return f"{path}: {size} bytes, the manifest says {entry['bytes']}"
    for entry in entries:
        path = mf.join(root, entry["file"])
        if sha256_file(path) != entry["sha256"]:
            return f"{path}: its sha256 differs from the manifest's (the file changed after conversion)"
    return ""


class DamagedRecords(BadData):
    """Records of a converted folder that failed to read in an input pipeline; the message names the shard."""


@contextlib.contextmanager
def reading_records(root: str) -> Iterator[None]:
    """Turns a failure of an input pipeline on `root`'s records into a `DamagedRecords` naming the shard (exit 3).

    TensorFlow's errors name no file ("corrupted record at 149544"), so the
    shards are checked against the manifest (sizes, then sha256) to find the
    culprit. An error that did not come from reading records is a bug: it keeps
    its traceback.
    """
    import tensorflow as tf

    try:
        yield
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.FailedPreconditionError) as e:
        if not isinstance(e, tf.errors.DataLossError) and "IteratorGetNext" not in (e.message or ""):
            raise
        raise DamagedRecords(_damage(root, e)) from e


def _damage(root: str, error) -> str:
    # TensorFlow's first line, without its "{{function_node ...}}" and "[Op:...]" wrapping:
    # "corrupted record at 149544".
    reason = (error.message or str(error)).strip().splitlines()[0]
    reason = re.sub(r"\s*\[Op:[^\]]*\].*$", "", re.sub(r"\{\{[^}]*\}\}\s*", "", reason)).strip()
    try:
        shard = find_damaged_shard(root)
    except Exception:  # noqa: BLE001  the first error is the one to report
        shard = ""
    if shard:
        return (f"{shard}; reading it failed ({reason}). Run `stp verify {root}` to list every problem, "
                "then convert again or restore the shard.")
    return (f"{root}: a record failed to read ({reason}), though every shard matches the manifest's size and "
            f"sha256. Run `stp verify {root}` to check every record.")


def _check_record(record: bytes, spec, encoding: str, split: str, labels: list, label_mode: str = "single",
                  values: int = 0) -> str:
    try:
        f = schema.parse_patch_numpy(record, spec.shape)
    except Exception as e:  # any parse/decode failure is a finding, not a crash
        return f"does not decode: {e}"
    if f[schema.ENCODING] != encoding:
        return f"encoding {f[schema.ENCODING]!r}, the manifest says {encoding!r}"
    if f.get(schema.SPLIT, split) != split:
        return f"split {f[schema.SPLIT]!r} in a shard of split {split!r}"
    if values and len(f.get(schema.VALUES, [])) != values:
        return f"{len(f.get(schema.VALUES, []))} values, the manifest names {values}"
    label = f.get(schema.LABEL, schema.UNLABELLED)
    if label_mode == "multi":
        hot = f.get(schema.MULTI_HOT, [])
        if len(hot) != len(labels):
            return f"a multi-hot vector of {len(hot)} classes, the label map has {len(labels)}"
        names = schema.MULTI_LABEL_SEPARATOR.join(n for n, h in zip(labels, hot) if h)
        if f.get(schema.LABEL_NAME) != names:
            return f"labels named {f.get(schema.LABEL_NAME)!r}, its multi-hot vector says {names!r}"
        return ""
    if labels:
        if not 0 <= label < len(labels):
            return f"label index {label} outside the label map of {len(labels)} classes"
        if f.get(schema.LABEL_NAME) != labels[label]:
            return f"label {label} named {f.get(schema.LABEL_NAME)!r}, the label map says {labels[label]!r}"
    return ""
