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

`--pairs h264:auto` chooses each video's crf values from the video itself, for compressed footage whose own
re-encodings are the pairs (no clean originals). Its level (`footage_level`) is the crf at which this module's
encoder compresses the video's own first frames as hard as the video is compressed, by the mean quantizer
FFmpeg's H.264 decoder reports (`video.mean_quantizer`): a trial encode of those frames at a first guess (the
footage's quantizer less `QUANTIZER_ABOVE_CRF`, libx264's median offset) gives this content's own offset (the
trial's quantizer less its crf), and the level is the footage's quantizer less that offset and less
`SECOND_GENERATION`. Its copies are at that level to `AUTO_SPAN` above it (`auto_crfs`), the range that
restored best (docs/enhancement.md). Why a trial: libx264's offset depends on the content (on the four sample
videos at crf 28 and 37: -0.3 to +3.9; Megamind's 0.1 at crf 37, read 3 low by the median alone); with the
trial, 7 of the 8 came out at their crf and one 2 above (`benchmarks/level_read.py`). Footage of another
codec fails with the reason (name its crf values).

A video that is already a pair (a `target` column), or has masks or frame labels, is refused: one kind of
target per record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
from typing import List, Tuple

import numpy as np

from tfrecords_tools.outputs import atomic_file
from tfrecords_tools.spec import PatchSpec
from tfrecords_tools.video import (DEFAULT_MAX_PIXELS, QUANTIZER_FRAMES, VideoError, VideoWriter, fold_frames,
                                   mean_quantizer, probe)

CODECS = {"h264": "libx264"}
CRF_RANGE = (0, 51)
DEFAULT_LEVELS = 4
AUTO = "auto"
# libx264's mean quantizer sits this far above its crf (the median over 4 sample videos x crf 23, 30, 37, 45):
# the trial encode's first guess.
QUANTIZER_ABOVE_CRF = 3
# A trial encode of already compressed frames is quantized more finely than the footage's own encode was at the
# same crf (what the first encode took away, the second does not spend bits on): the level it reads is this much
# high (the median over the 4 sample videos at crf 28 and 37: +0.1 to +2.3; `benchmarks/level_read.py`).
SECOND_GENERATION = 0.7
AUTO_SPAN = 2   # `h264:auto`: from the footage's level to this many crf steps above it
_SPEC = re.compile(r"^\s*([a-z0-9]+)\s*:\s*(?:crf\s*=\s*)?([\d\s,\-]+|auto)$")


@dataclasses.dataclass(frozen=True)
class CodecPairs:
    """The codec and the crf of each compressed copy."""

    codec: str
    crfs: Tuple[int, ...]
    # The crf values are each video's own (`resolve`): `crfs` is then empty.
    auto: bool = False

    def __post_init__(self):
        if self.codec not in CODECS:
            raise ValueError(f"Invalid value for argument `pairs`. Expected a codec in {sorted(CODECS)}. "
                             f"Received codec={self.codec!r}")
        if self.auto:
            if self.crfs:
                raise ValueError(f"Invalid value for argument `pairs`. Expected no crf values with {AUTO}. "
                                 f"Received crfs={list(self.crfs)}")
            return
        lo, hi = CRF_RANGE
        if not self.crfs or any(not lo <= c <= hi for c in self.crfs) or len(set(self.crfs)) != len(self.crfs):
            raise ValueError(f"Invalid value for argument `pairs`. Expected distinct crf values in [{lo}, {hi}]. "
                             f"Received crfs={list(self.crfs)}")

    def __str__(self) -> str:
        return f"{self.codec}:{AUTO if self.auto else ','.join(map(str, self.crfs))}"

    @property
    def crfs_text(self) -> str:
        return str(self).split(":", 1)[1]

    def resolve(self, path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> "CodecPairs":
        """The crf values for `path`: these pairs' own, or (`auto`) those of the video's level (`auto_crfs`).
        Raises `VideoError` where the level cannot be read."""
        if not self.auto:
            return self
        return CodecPairs(self.codec, auto_crfs(footage_level(path, self.codec, max_pixels=max_pixels)))


def _clamped_crf(value: float, top: int = CRF_RANGE[1]) -> int:
    return int(min(max(round(value), CRF_RANGE[0]), top))


def auto_crfs(level: float, levels: int = DEFAULT_LEVELS) -> Tuple[int, ...]:
    """`h264:auto`'s crf values for footage at `level` (`footage_level`): the level to `AUTO_SPAN` above it,
    `levels` of them at most (one per crf step), inside the encoder's range; e.g. 37.2 -> (37, 38, 39)."""
    level = _clamped_crf(level, CRF_RANGE[1] - AUTO_SPAN)
    return _spread(level, level + AUTO_SPAN, levels)


def footage_level(path: str, codec: str = "h264", frames: int = QUANTIZER_FRAMES, *,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> float:
    """The crf at which `codec`'s encoder here (the copies' own settings, `VideoWriter`) compresses `path`'s first
    `frames` frames as hard as `path` is compressed, by their mean quantizers (`video.mean_quantizer`).

    One trial encode at a guess (the footage's quantizer q less `QUANTIZER_ABOVE_CRF`) gives this content's own
    offset (the trial's quantizer less the guess); the level is q less that offset, less `SECOND_GENERATION`.
    The trial is written to a temporary folder outside any output, and removed. Raises `VideoError` where the
    quantizer cannot be read (another codec)."""
    quantizer = mean_quantizer(path, frames, max_pixels=max_pixels)
    guess = _clamped_crf(quantizer - QUANTIZER_ABOVE_CRF)
    with tempfile.TemporaryDirectory(prefix="stp-level-") as folder:
        trial = encode_first(path, os.path.join(folder, "trial.mp4"), guess, frames, codec=codec,
                             max_pixels=max_pixels)
        offset = mean_quantizer(trial, frames, max_pixels=max_pixels) - guess
    return quantizer - offset - SECOND_GENERATION


def _spread(low: int, high: int, levels: int) -> Tuple[int, ...]:
    return tuple(sorted({int(round(v)) for v in np.linspace(low, high, max(1, min(levels, high - low + 1)))}))


def parse_pairs(text: str, levels: int = DEFAULT_LEVELS) -> CodecPairs:
    """`h264:23-40` (`levels` crf values evenly spaced over the range), `h264:crf=23-40`, `h264:30,37`, `h264:37`,
    `h264:auto` (each video's own, `auto_crfs`)."""
    m = _SPEC.match(str(text).lower())
    if not m:
        raise ValueError("Invalid value for argument `pairs`. Expected CODEC:CRF, CODEC:LOW-HIGH, CODEC:CRF,CRF,... "
                         f"or CODEC:auto, e.g. h264:23-40. Received {text!r}")
    body = m.group(2).replace(" ", "")
    if body == AUTO:
        return CodecPairs(m.group(1), (), auto=True)
    try:
        if "-" in body:
            low, high = (int(v) for v in body.split("-"))
            if low > high:
                raise ValueError
            crfs = _spread(low, high, levels)
        else:
            crfs = tuple(int(v) for v in body.split(","))
    except ValueError:
        raise ValueError(f"Invalid value for argument `pairs`. Expected integer crf values, LOW <= HIGH. "
                         f"Received {text!r}") from None
    return CodecPairs(m.group(1), crfs)


def write_copies(path: str, spec: PatchSpec, pairs: CodecPairs, out_dir: str, stem: str, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[str, List[str]]:
    """Writes `path` as the converter reads it under `spec`: `STEM-clean.mkv` (lossless) and `STEM-crfN.mp4` per
    crf, into `out_dir`; returns (clean path, compressed paths in `pairs.crfs` order; `auto`: the video's own,
    `CodecPairs.resolve`). Streams one frame at a
    time. Files already there (a resumed conversion) are kept; new ones appear whole (written under a
    temporary name, then renamed)."""
    pairs = pairs.resolve(path, max_pixels)
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


def encode_first(path: str, out: str, crf: int, frames: int, *, codec: str = "h264",
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """Writes `path`'s first `frames` frames, as the converter decodes them at their own size and rate (cropped
    to even sides for 4:2:0), to `out` with `codec`'s encoder at `crf` (the copies' own settings); returns `out`."""
    info = probe(path, max_pixels)
    writers: List[VideoWriter] = []

    def start() -> List[VideoWriter]:  # a re-read after `Replan` writes the file from the start
        _close(writers)
        writers.append(VideoWriter(out, info.rate, codec=CODECS[codec], crf=crf))
        return writers

    def add(writers: List[VideoWriter], frame: np.ndarray) -> None:
        writers[0].write(frame[: frame.shape[0] // 2 * 2, : frame.shape[1] // 2 * 2])

    try:
        fold_frames(path, PatchSpec(1, 1, 1), start, add, max_pixels=max_pixels, info=info, limit=frames)
        writers.pop().close()
    finally:
        _close(writers)
    return out


def _close(writers: List[VideoWriter]) -> None:
    """Closes `writers` without finishing them (a half-written copy, removed or written again by the caller)."""
    for w in writers:
        try:
            w.container.close()
        except Exception:  # noqa: BLE001
            pass
    writers.clear()
