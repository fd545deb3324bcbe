"""Codec pairs stage: compressed/clean pairs made from any clean video, for restoration (`stp convert --pairs`).

`--pairs h264:23-40` turns every video of the source into `levels` pairs (default 4: crf 23, 29, 34, 40,
evenly spaced over the range; `h264:30,37` names them): the video is decoded as the converter reads it
(the spec's resize and frame rate), written once losslessly (`libx264rgb`, qp 0: the clean target, every RGB
value kept) and once per crf with PyAV's libx264 (yuv420p, the chroma subsampling and the artefacts of a
real encode), all at one constant rate, so that both sides of a pair have the same frames. Each copy then
converts as a `path,target` pair does (`tfrecords_tools.pairs`): the records hold the compressed patch and,
under `target/data`, the clean one, for `stp train --task enhance`; both sides are decoded with the exact
YUV -> RGB conversion (`tfrecords_tools.pairs`), as the clean copy never was YUV. The copies live in the
conversion's work folder and go with it.

A video that is already a pair (a `target` column), or has masks or frame labels, is refused: one kind of
target per record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import List, Tuple

import numpy as np

from tfrecords_tools.outputs import atomic_file
from tfrecords_tools.spec import PatchSpec
from tfrecords_tools.video import DEFAULT_MAX_PIXELS, VideoError, VideoWriter, fold_frames, probe

CODECS = {"h264": "libx264"}
CRF_RANGE = (0, 51)
DEFAULT_LEVELS = 4
_SPEC = re.compile(r"^\s*([a-z0-9]+)\s*:\s*(?:crf\s*=\s*)?([\d\s,\-]+)$")


@dataclasses.dataclass(frozen=True)
class CodecPairs:
    """The codec and the crf of each compressed copy."""

    codec: str
    crfs: Tuple[int, ...]

    def __post_init__(self):
        if self.codec not in CODECS:
            raise ValueError(f"Invalid value for argument `pairs`. Expected a codec in {sorted(CODECS)}. "
                             f"Received codec={self.codec!r}")
        lo, hi = CRF_RANGE
        if not self.crfs or any(not lo <= c <= hi for c in self.crfs) or len(set(self.crfs)) != len(self.crfs):
            raise ValueError(f"Invalid value for argument `pairs`. Expected distinct crf values in [{lo}, {hi}]. "
                             f"Received crfs={list(self.crfs)}")

    def __str__(self) -> str:
        return f"{self.codec}:{','.join(map(str, self.crfs))}"


def parse_pairs(text: str, levels: int = DEFAULT_LEVELS) -> CodecPairs:
    """`h264:23-40` (`levels` crf values evenly spaced over the range), `h264:crf=23-40`, `h264:30,37`, `h264:37`."""
    m = _SPEC.match(str(text).lower())
    if not m:
        raise ValueError("Invalid value for argument `pairs`. Expected CODEC:CRF, CODEC:LOW-HIGH or CODEC:CRF,CRF,... "
                         f"e.g. h264:23-40. Received {text!r}")
    body = m.group(2).replace(" ", "")
    try:
        if "-" in body:
            low, high = (int(v) for v in body.split("-"))
            if low > high:
                raise ValueError
            crfs = tuple(sorted({int(round(v)) for v in np.linspace(low, high, max(1, min(levels, high - low + 1)))}))
        else:
            crfs = tuple(int(v) for v in body.split(","))
    except ValueError:
        raise ValueError(f"Invalid value for argument `pairs`. Expected integer crf values, LOW <= HIGH. "
                         f"Received {text!r}") from None
    return CodecPairs(m.group(1), crfs)


def write_copies(path: str, spec: PatchSpec, pairs: CodecPairs, out_dir: str, stem: str, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[str, List[str]]:
    """Writes `path` as the converter reads it under `spec`: `STEM-clean.mkv` (lossless) and `STEM-crfN.mp4` per
    crf, into `out_dir`; returns (clean path, compressed paths in `pairs.crfs` order). Streams one frame at a
    time. Files already there (a resumed conversion) are kept; new ones appear whole (written under a
    temporary name, then renamed)."""
    clean = os.path.join(out_dir, f"{stem}-clean.mkv")
    copies = [os.path.join(out_dir, f"{stem}-crf{c}.mp4") for c in pairs.crfs]
    if all(os.path.exists(p) for p in [clean] + copies):
        return clean, copies
    os.makedirs(out_dir, exist_ok=True)
    info = probe(path, max_pixels)
    rate = spec.fps or info.rate
    writers: List[VideoWriter] = []

    def start() -> List[VideoWriter]:  # each read (a re-read after `Replan` too) writes the files from the start
        _close(writers)  # opening a file again truncates it
        writers.append(VideoWriter(partial[0], rate, lossless=True))
        writers.extend(VideoWriter(p, rate, codec=CODECS[pairs.codec], crf=c) for p, c in zip(partial[1:], pairs.crfs))
        return writers

    def add(writers: List[VideoWriter], frame: np.ndarray) -> None:
        if frame.shape[0] % 2 or frame.shape[1] % 2:
            raise VideoError(path, f"frames of {frame.shape[1]}x{frame.shape[0]} (as converted) cannot be "
                                   f"{pairs.codec}-encoded in 4:2:0; expected even sizes (set --short-side "
                                   "or --size to an even value)")
        for w in writers:
            w.write(frame)

    # Each file under a name of this process (`outputs.atomic_file`): a second process writing the same copies
    # writes its own; all are renamed when every one is whole, and removed on any failure.
    with contextlib.ExitStack() as files:
        partial = [files.enter_context(atomic_file(p)) for p in [clean] + copies]
        try:
            fold_frames(path, spec, start, add, max_pixels=max_pixels, info=info)
            while writers:
                writers.pop(0).close()
        finally:
            _close(writers)
    return clean, copies


def _close(writers: List[VideoWriter]) -> None:
    """Closes `writers` without finishing them (a half-written copy, removed or written again by the caller)."""
    for w in writers:
        try:
            w.container.close()
        except Exception:  # noqa: BLE001
            pass
    writers.clear()
