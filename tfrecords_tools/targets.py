"""Target stage: segmentation targets cut on the patch grid: per-voxel masks and per-frame labels.

A video's CSV row may name
- `mask`: a mask video (lossless: class ids must survive the codec) or a folder
  of PNG masks, one per frame of the converted video (after `--fps`
  resampling), sorted by name. The class id is the first channel (grey or red);
  masks are resized with nearest-neighbour sampling, so ids never blend.
- `intervals`: a CSV `start,end,label` in seconds from the video's start. A frame
  takes the label of the interval holding its start time, -1 (unlabelled) when
  none does; padded frames are -1 too.

Both are cut by the same `Grid` and `PatchCutter` as the pixels, so mask patch i
lines up with pixel patch i.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from tfrecords_tools.patches import Grid, Patch, PatchCutter
from tfrecords_tools.sources import Item, read_intervals
from tfrecords_tools.spec import PatchSpec
from tfrecords_tools.video import Plan, VideoError, video_patches

UNLABELLED = -1
PNG = (".png",)


def resolve_frame_labels(items: Sequence[Item], names: Sequence[str] = ()) -> Tuple[List[Item], Tuple[str, ...]]:
    """Reads every item's intervals file: returns the items (an unreadable file or an unknown label becomes
    that item's error) and the frame class names, `names` if given, else every label found, sorted."""
    found, out, allowed = set(), [], set(names)
    for item in items:
        if item.intervals and not item.error:
            try:
                labels = {label for _, _, label in read_intervals(item.intervals)}
            except (OSError, ValueError) as e:
                item = dataclasses.replace(item, error=f"{item.path}: intervals: {e}")
            else:
                if names and not labels <= allowed:
                    item = dataclasses.replace(item, error=f"{item.intervals}: labels {sorted(labels - allowed)} are "
                                                           f"not among the frame labels {list(names)}")
                found |= labels
        out.append(item)
    return out, tuple(names) if names else tuple(sorted(found))


def frame_intervals(item: Item, names: Sequence[str]) -> Optional[List[Tuple[float, float, int]]]:
    """The item's intervals with label indices into `names`, or None when it has none."""
    if not item.intervals:
        return None
    index = {name: i for i, name in enumerate(names)}
    return [(start, end, index[label]) for start, end, label in read_intervals(item.intervals)]


def frame_labels(patch: Patch, plan: Plan, intervals: Sequence[Tuple[float, float, int]], frames: int) -> List[int]:
    """The class of each of the patch's `frames` frames (-1 outside every interval and for padding).

    Frame j of the converted video starts at `j x duration / frame count`
    seconds from the video's start (exact for constant-rate and resampled videos).
    """
    period = (plan.end - plan.start) / max(1, plan.frames)
    out = []
    for i in range(frames):
        label = UNLABELLED
        if i < patch.valid[0]:
            # A thousandth of a period later: a start time computed in floats (7 x 0.1 = 0.7000000000000001,
            # 0.79999 for 8 x (3.4 / 34)) must not fall before an interval boundary it sits on.
            t = (patch.offset[0] + i + 1e-3) * period
            for start, end, index in intervals:
                if start <= t < end:
                    label = index  # a later interval wins where they overlap
        out.append(label)
    return out


def _to_ids(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """A decoded mask frame (grey `[H, W]` or `[H, W, C]`) -> uint8 ids `[height, width, 1]`, nearest resize."""
    ids = frame if frame.ndim == 2 else frame[..., 0]
    if ids.shape != (height, width):
        from PIL import Image
        ids = np.asarray(Image.fromarray(np.ascontiguousarray(ids, np.uint8)).resize((width, height), Image.NEAREST))
    return np.ascontiguousarray(ids, np.uint8)[..., None]


def _png_masks(folder: str, spec: PatchSpec, plan: Plan) -> Iterator[Patch]:
    from PIL import Image

    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(PNG) and not n.startswith("."))
    if len(names) != plan.frames:
        raise VideoError(folder, f"holds {len(names)} PNG masks; expected one per frame of the converted "
                                 f"video ({plan.frames} frames)")
    cutter = PatchCutter(spec, Grid.for_video(spec, plan.frames, plan.height, plan.width))
    for i, name in enumerate(names):
        with Image.open(os.path.join(folder, name)) as image:
            # Palette ('P') PNGs hold class ids as indices: keep them, never map them to colours.
            frame = np.asarray(image if image.mode in ("L", "P", "I;16", "I") else image.convert("RGB"))
        if frame.max(initial=0) > 255:
            raise VideoError(os.path.join(folder, name), f"class id {int(frame.max())} > 255 (masks are uint8)")
        yield from cutter.add(_to_ids(frame.astype(np.uint8), plan.height, plan.width), float(i))
    yield from cutter.finish()


def _video_masks(path: str, spec: PatchSpec, plan: Plan, max_pixels: int) -> Iterator[Patch]:
    reads = 0
    for event in video_patches(path, spec, max_pixels=max_pixels, interpolation="POINT"):
        if isinstance(event, Plan):
            reads += 1
            if reads > 1:
                raise VideoError(path, "the mask video's timestamps or frame count changed while reading; "
                                       "write it with regular timestamps (e.g. one PNG per frame instead)")
            if (event.frames, event.height, event.width) != (plan.frames, plan.height, plan.width):
                raise VideoError(path, f"the mask video gives {event.frames} frames of {event.height}x{event.width}, "
                                       f"the video {plan.frames} frames of {plan.height}x{plan.width}")
            continue
        yield event


def mask_patches(item: Item, spec: PatchSpec, plan: Plan, max_pixels: int) -> Iterator[np.ndarray]:
    """`uint8 [T, H, W]` class ids for each patch of the video read under `plan`, in grid order."""
    if not os.path.exists(item.mask):
        raise VideoError(item.mask, "mask not found")
    source = (_png_masks(item.mask, spec, plan) if os.path.isdir(item.mask)
              else _video_masks(item.mask, spec, plan, max_pixels))
    for patch in source:
        pixels = patch.pixels
        yield np.ascontiguousarray(pixels[..., 0] if pixels.ndim == 4 else pixels)


class Targets:
    """The targets of one video's read: `extras(patch)` -> the `encode_patch` keyword arguments."""

    def __init__(self, item: Item, spec: PatchSpec, plan: Plan, frame_names: Sequence[str], max_pixels: int,
                 stats: Optional[Dict[str, int]] = None):
        self.item = item
        self.spec = spec
        self.plan = plan
        self.masks = mask_patches(item, spec, plan, max_pixels) if item.mask else None
        self.intervals = frame_intervals(item, frame_names)
        self.stats = stats if stats is not None else {}

    def extras(self, patch: Patch) -> dict:
        out = {}
        if self.masks is not None:
            mask = next(self.masks, None)
            if mask is None:
                raise VideoError(self.item.mask, f"ran out of mask patches at patch {patch.index}")
            out["mask"] = mask
            self.stats["mask_max"] = max(self.stats.get("mask_max", -1), int(mask.max(initial=0)))
        if self.intervals is not None:
            out["frame_labels"] = frame_labels(patch, self.plan, self.intervals, self.spec.frames)
        return out
