"""Pair stage: the clean target of a degraded video, cut into patches aligned with the video's own.

A CSV with columns `path,target` names a degraded video (e.g. a heavily
compressed copy) and its clean original. The target is decoded under the
*video's* read plan (timing, frame count, size) and cut on the same grid, so
target patch i lines up with video patch i; `convert` stores it in the same
record (`schema.TARGET`). A target whose frame size or frame count differs
raises `VideoError` naming both files, and the pair is a failed item.

Both sides of a pair are decoded with the exact YUV -> RGB conversion (`COLOUR`; `tfrecords_tools.video`'s
docstring), not FFmpeg's default one: the default is 0.8-1.5 grey levels darker than the formula, and where one
side was never YUV (the lossless RGB copy `--pairs` writes, an RGB original) that offset would sit in every
pair and be learnt as part of the restoration (issue 20: it was; 1.0-1.3 levels per channel between the sides
of crf 0 pairs of bikes.mp4, up to 1.65 in crf 37-45 data). A model trained on such pairs then brightens the
footage it restores by as much.
"""

from __future__ import annotations

from typing import Iterator

from tfrecords_tools.patches import Grid, Patch, PatchCutter
from tfrecords_tools.spec import PatchSpec
from tfrecords_tools.video import DEFAULT_MAX_PIXELS, FrameStream, Plan, Replan, VideoError, probe

COLOUR = "exact"   # how both sides of a pair become RGB (`tfrecords_tools.video.COLOURS`)


def target_patches(path: str, video: str, spec: PatchSpec, plan: Plan, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                   threads: int = 1, colour: str = COLOUR) -> Iterator[Patch]:
    """The patches of the target video `path` under `plan`, the read plan of the degraded `video`."""
    info = probe(path, max_pixels)
    source = probe(video, max_pixels)
    if (info.width, info.height) != (source.width, source.height):
        raise VideoError(video, f"its target {path} has frames of {info.width}x{info.height}, the video "
                                f"{source.width}x{source.height}; a pair must have the same frame size")
    cutter = PatchCutter(spec, Grid.for_video(spec, plan.frames, plan.height, plan.width))
    try:
        for frame, t in FrameStream(info, spec, plan, threads, colour=colour):
            yield from cutter.add(frame, t)
        yield from cutter.finish()
    except Replan as e:
        raise VideoError(video, f"its target {path} has {e.plan.frames} frames under the video's timing, the "
                                f"video {plan.frames}; a pair must have the same frame count and timing") from e
