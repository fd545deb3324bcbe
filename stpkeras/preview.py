"""Preview stage: a PNG of sample patches, so a user can see what was cut.

One row per patch (its frames left to right, a 2-pixel gap between frames),
patches taken evenly across the shards of one split.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np


def sample_patches(data: str, count: int = 8, split: Optional[str] = None):
    """Returns up to `count` parsed records spread evenly over `split` (numpy dicts, see schema.parse_patch_numpy)."""
    import tensorflow as tf

    from tfrecords_tools import manifest as mf
    from tfrecords_tools.schema import parse_patch_numpy

    m = mf.read_manifest(data)
    split = split or next(iter(m["splits"]), None)
    if split is None or m["splits"].get(split, {}).get("records", 0) == 0:
        raise mf.UnknownSplit(f"{data}: split {split!r} holds no patches. Available: "
                         f"{ {k: v['records'] for k, v in m['splits'].items()} }")
    total = m["splits"][split]["records"]
    wanted = set(np.linspace(0, total - 1, num=min(count, total)).round().astype(int).tolist())
    out, i = [], 0
    for path in mf.shard_files(data, m, split):
        for record in tf.data.TFRecordDataset(path, compression_type=mf.compression_type(m)):
            if i in wanted:
                out.append(parse_patch_numpy(record.numpy()))
            i += 1
        if len(out) == len(wanted):
            break
    return out


def patch_strip(pixels: np.ndarray, gap: int = 2, scale: int = 1) -> np.ndarray:
    """`uint8 [T, H, W, 3]` -> `uint8 [H*scale, T*(W*scale+gap)-gap, 3]`: frames side by side."""
    t, h, w, _ = pixels.shape
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    strip = np.full((h, t * (w + gap) - gap, 3), 255, np.uint8)
    for i in range(t):
        strip[:, i * (w + gap):i * (w + gap) + w] = pixels[i]
    return strip


def write_preview(data: str, out_png: str, count: int = 8, split: Optional[str] = None, scale: int = 2) -> List[str]:
    """Writes the preview PNG (whole or not at all); returns one line of description per row.

    An `out_png` that is the manifest or a shard of `data` raises `outputs.OutputIsInputError`; a record
    that fails to read, `verify.DamagedRecords`.
    """
    from PIL import Image

    from tfrecords_tools import manifest as mf
    from tfrecords_tools import outputs
    from tfrecords_tools import schema
    from tfrecords_tools.pixels import to_rgb
    from tfrecords_tools.verify import reading_records

    m = mf.read_manifest(data)
    outputs.check_not_input(out_png, [mf.manifest_path(data)]
                            + [f for split in m["splits"] for f in mf.shard_files(data, m, split)])
    spec = mf.spec_of(m)
    with reading_records(data):  # a damaged shard: one line naming it (exit 3)
        records = sample_patches(data, count, split)
    strips = [patch_strip(to_rgb(spec, r[schema.PATCH]), scale=scale) for r in records]
    gap = 4
    height = sum(s.shape[0] for s in strips) + gap * (len(strips) - 1)
    width = max(s.shape[1] for s in strips)
    canvas = np.full((height, width, 3), 255, np.uint8)
    y = 0
    for s in strips:
        canvas[y:y + s.shape[0], :s.shape[1]] = s
        y += s.shape[0] + gap
    with outputs.atomic_file(out_png) as tmp:
        Image.fromarray(canvas).save(tmp)
    return [f"{r[schema.VIDEO_ID]} t={r[schema.OFFSET][0]} y={r[schema.OFFSET][1]} x={r[schema.OFFSET][2]} "
            f"({r[schema.TIMESTAMP]:.2f}s) label={r.get(schema.LABEL_NAME) or '-'}" for r in records]
