"""Test helper: writes a converted folder (shards + `dataset.json`) from in-memory patches.

Uses the one schema (`schema.encode_patch`) and `manifest.write_manifest`, so
the folder is what `stp convert` writes, without needing videos. Tests that
need real videos use the real converter instead.
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from tfrecords_tools import manifest, schema
from tfrecords_tools.spec import PatchSpec

# (pixels uint8 [T, H, W, 3], label index, video id)
Item = Tuple[np.ndarray, int, str]


def write_converted(root: str, splits: Dict[str, Sequence[Item]], labels: Sequence[str], *,
                    encoding: str = "raw", shards: int = 2, compression: str = "none",
                    masks: Optional[Dict[str, Sequence[np.ndarray]]] = None, mask_classes: int = 0,
                    multi_hot: Optional[Dict[str, Sequence[Sequence[int]]]] = None,
                    values: Optional[Dict[str, Sequence[Sequence[float]]]] = None,
                    value_names: Sequence[str] = ()) -> dict:
    """Writes `splits` as `{split}-{i:05d}-of-{n:05d}.tfrecord` shards and the manifest; returns it.

    `masks`, when given, holds a `uint8 [T, H, W]` mask of class ids (< `mask_classes`) per item of each split;
    `multi_hot` a `[C]` row of 0/1 per item (multi-label data: label -1, `label_mode` "multi"), `values` a
    `[K]` row per item, named `value_names`.
    """
    os.makedirs(root, exist_ok=True)
    first = next(iter(splits.values()))[0][0]
    t, h, w, _ = first.shape
    spec = PatchSpec(frames=t, height=h, width=w)
    options = tf.io.TFRecordOptions(compression_type={"none": "", "gzip": "GZIP", "zlib": "ZLIB"}[compression])
    data = {"format": manifest.FORMAT, "schema_version": schema.SCHEMA_VERSION, "spec": spec.to_dict(),
            "encoding": encoding, "quality": 90, "compression": compression, "labels": list(labels),
            "splits": {}, "videos": [], "counts": {}, "command": "tests/converted.py", "versions": {},
            "created": "", "seconds": 0.0}
    if masks is not None:
        data["mask_classes"] = mask_classes
    if multi_hot is not None:
        data["label_mode"] = "multi"
    if values is not None:
        data["value_names"] = list(value_names)
    videos: Dict[str, dict] = {}
    for split, items in splits.items():
        per_shard: List[List[bytes]] = [[] for _ in range(shards)]
        counts: Dict[str, int] = {}
        for i, (pixels, label, video_id) in enumerate(items):
            name = labels[label] if label >= 0 else ""
            if multi_hot is not None:
                name = ";".join(n for n, on in zip(labels, multi_hot[split][i]) if on)
            record = schema.encode_patch(
                pixels, encoding=encoding, video_id=video_id, video_size=pixels.shape[:3],
                index=(i, 0, 0), offset=(i * t, 0, 0), valid=pixels.shape[:3], timestamp=float(i),
                label=label, label_name=name, split=split, mask=masks[split][i] if masks is not None else None,
                multi_hot=[int(v) for v in multi_hot[split][i]] if multi_hot is not None else None,
                values=values[split][i] if values is not None else None)
            # Patches of one video go to one shard, as the converter writes them.
            per_shard[int(hashlib.md5(video_id.encode()).hexdigest(), 16) % shards].append(record)
            counts[name] = counts.get(name, 0) + 1
            video = videos.setdefault(video_id, {"id": video_id, "split": split, "label": name, "status": "ok",
                                                 "reason": "", "patches": 0, "frames": 0, "height": h,
                                                 "width": w, "source": {}})
            video["patches"] += 1
        entries = []
        for i, records in enumerate(per_shard):
            file = f"{split}-{i:05d}-of-{shards:05d}.tfrecord"
            path = os.path.join(root, file)
            with tf.io.TFRecordWriter(path, options) as writer:
                for record in records:
                    writer.write(record)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            entries.append({"file": file, "records": len(records), "bytes": os.path.getsize(path), "sha256": digest})
        data["splits"][split] = {"records": len(items), "videos": len({v for _, _, v in items}),
                                 "label_counts": counts, "shards": entries}
    data["videos"] = list(videos.values())
    total = sum(len(items) for items in splits.values())
    data["counts"] = {"videos": len(videos), "ok": len(videos), "failed": 0, "skipped": 0, "patches": total}
    manifest.write_manifest(root, data)
    return data


def random_items(n: int, shape=(4, 8, 8, 3), num_classes: int = 3, videos: int = 6, seed: int = 0) -> List[Item]:
    """`n` random patches; patch i belongs to video i % videos, whose label is its index % num_classes."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, shape, dtype=np.uint8), (i % videos) % num_classes, f"v{i % videos}.mp4")
            for i in range(n)]
