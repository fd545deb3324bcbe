"""Decode stage: open and probe a video, then stream its frames as RGB uint8, resampled and resized.

Frames come in the order the decoder returns them, which is presentation
order. Their times come from the frame timestamps when those increase
strictly; some files carry wrong ones (a re-muxed AVI can hold timestamps
that jump back and forth while the decoded order is right), and re-sorting or
resampling by them scrambles the video. Such files fall back to
`index / declared rate`, and `FrameStream.timing` says which was used.

Frames come out the way a player shows them: a display matrix (the rotation
a phone writes into a portrait clip, with or without a mirror) is applied to
every frame, and sizes (`VideoInfo`, `Plan`, `--short-side`, `--max-pixels`)
are in that display orientation. A matrix that is not a multiple of 90
degrees fails the video. A stream whose frame size changes part-way (a
concatenated or broadcast `.ts`) keeps the output size set by its first
frames: a later frame is resized to `--resize HxW` like every frame, or
otherwise scaled to cover the output size and centre-cropped, never
stretched; `FrameStream.report()` lists the changes.

Colour: YUV frames become RGB as FFmpeg's own tools make them (`colour="ffmpeg"`, the default: swscale's
fast table converter, the pixels `ffmpeg -pix_fmt rgb24` and PyAV's `to_ndarray` give, so what a model
trained on these frames sees matches what other tools decode). That converter is darker than the BT.601
formula by 0.8-1.5 grey levels on average (per channel, on the three YUV sample videos; `benchmarks/colour.py`);
`colour="exact"` (accurate rounding, chroma interpolated: within 0.02 of the formula, 1.1-2.4x the read's
CPU) is what paired data reads with (`tfrecords_tools.convert`), where the two sides of a pair are compared
pixel for pixel and one of them may never have been YUV, and what commands that write the frames back to a
video read with (`REWRITE_COLOUR`: `stp enhance`, `stp stabilize`): the encoder converts RGB to YUV by the
formula, so a pixel read with the fast converter and written back unchanged comes out darker. Measured on
30 frames of each YUV sample video written back losslessly (`python benchmarks/colour.py --frames 30`): luma
0.85-1.21 grey levels darker with `ffmpeg`, within 0.02 of the source's with `exact`.

Guards raise `VideoError`, which names the file and the reason.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable, Iterator, List, Optional, Tuple, Union

import numpy as np

from tfrecords_tools.errors import BadInput
from tfrecords_tools.patches import Grid, Patch, PatchCutter
from tfrecords_tools.spec import PatchSpec

# An 8K frame (7680x4320). Larger declared sizes are refused before any frame
# is decoded: a decompression-bomb guard.
DEFAULT_MAX_PIXELS = 7680 * 4320
# How a YUV frame becomes RGB (the module's docstring): swscale flags added to the scaling algorithm.
COLOURS = ("ffmpeg", "exact")
DEFAULT_COLOUR = "ffmpeg"
REWRITE_COLOUR = "exact"   # frames that go back into a video: an unchanged pixel is written back as it was
_EPS = 1e-6
# Size changes a read lists one by one (a stream could change size every frame); the rest are counted.
MAX_SIZE_CHANGES = 20
# An output time that would show the last frame for less than this fraction of
# a frame period is not a frame: it absorbs rounding in time bases such as 66667/1e6 s.
_TAIL = 0.01


class VideoError(BadInput):
    """A video that cannot be converted. `str()` names the file and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# A display matrix's 2x2 part maps a coded pixel (x, y) to the shown one: x' = a*x + c*y,
# y' = b*x + d*y (FFmpeg's libavutil/display.h; y points down). Each right-angle matrix,
# written (a, b, c, d) in units of 1, is one of these (rotation counter-clockwise, mirrored
# left-right before rotating). The same turns as `ffmpeg`'s autorotate and players.
_RIGHT_ANGLES = {
    (1, 0, 0, 1): (0, False), (0, -1, 1, 0): (90, False), (-1, 0, 0, -1): (180, False), (0, 1, -1, 0): (270, False),
    (-1, 0, 0, 1): (0, True), (0, 1, 1, 0): (90, True), (1, 0, 0, -1): (180, True), (0, -1, -1, 0): (270, True),
}


@dataclasses.dataclass(frozen=True)
class Orientation:
    """How a decoded frame is turned to be shown: mirrored left-right when `mirrored`, then rotated
    `rotation` degrees counter-clockwise (0, 90, 180 or 270)."""

    rotation: int = 0
    mirrored: bool = False

    @classmethod
    def from_matrix(cls, matrix: np.ndarray) -> "Orientation":
        """From FFmpeg's display matrix (`int32 [9]`, 16.16 fixed point); `ValueError` for another angle."""
        a, b, _, c, d = (float(v) / 65536.0 for v in matrix[:5])
        scale = max(abs(a), abs(b), abs(c), abs(d))
        if scale == 0:  # a degenerate matrix (a broken header): players ignore it
            return cls()
        unit = tuple(int(round(v / scale)) for v in (a, b, c, d))
        if unit in _RIGHT_ANGLES and all(abs(v / scale - u) < 0.01 for v, u in zip((a, b, c, d), unit)):
            rotation, mirrored = _RIGHT_ANGLES[unit]
            return cls(rotation, mirrored)
        angle = -math.degrees(math.atan2(b, a))  # as av_display_rotation_get reports it
        raise ValueError(f"its display matrix turns frames by {angle:.1f} degrees (matrix "
                         f"{[int(v) for v in matrix]}); only multiples of 90 degrees, mirrored or not, are supported")

    @property
    def transposed(self) -> bool:
        """True when rows become columns (90 or 270 degrees)."""
        return self.rotation in (90, 270)

    def shown_size(self, height: int, width: int) -> Tuple[int, int]:
        """The (H, W) a coded frame of `height x width` is shown at."""
        return (width, height) if self.transposed else (height, width)

    def apply(self, frame: np.ndarray) -> np.ndarray:
        """Turns a coded `[H, W, C]` frame into the shown one (a contiguous copy unless nothing turns)."""
        if self == Orientation():
            return frame
        if self.mirrored:
            frame = frame[:, ::-1]
        return np.ascontiguousarray(np.rot90(frame, self.rotation // 90))

    def to_dict(self) -> dict:
        """What the manifest records: `rotation`, and `mirrored` only when true."""
        return {"rotation": self.rotation, **({"mirrored": True} if self.mirrored else {})}


def side_data(frame) -> list:
    """The side data of a decoded PyAV frame, as a list, on every PyAV this package supports.

    `frame.side_data` is a `Mapping` whose iteration yielded the entries up to PyAV 18.1.0 and yields
    their `Type` keys from 18.1.1 on (iterating it then raised "'Type' object has no attribute 'type'"
    here); indexing by position gives the entries on both (checked on 14.0.1, 18.1.0 and 18.1.1).
    """
    data = frame.side_data
    return [data[i] for i in range(len(data))]


def orientation_of(frame, path: str) -> Orientation:
    """The `Orientation` of a decoded PyAV frame, from its `DISPLAYMATRIX` side data.

    FFmpeg's decoder attaches the stream's display matrix (an MP4/MOV `tkhd`
    matrix, an H.264/HEVC display-orientation SEI) to every frame. PyAV's
    `frame.rotation` keeps only the angle (a mirror reads as -180), so the
    matrix is read whole.
    """
    for data in side_data(frame):
        if data.type.name == "DISPLAYMATRIX":
            try:
                return _orientation(bytes(data))
            except ValueError as e:
                raise VideoError(path, str(e)) from e
    return Orientation()


class OrientationReader:
    """`orientation_of` for the frames of one stream, reading the side data only when it may have changed.

    Reading `frame.side_data` ties the frame and its side-data container in a reference cycle, so the
    frame's pixel buffers wait for Python's cyclic garbage collector: read on every frame, that held
    hundreds of decoded frames at a time (peak RSS 690 MB -> 1.58 GB converting 64 videos in one
    process). The angle FFmpeg derives from the matrix (`frame.rotation`) costs no such cycle, so the
    whole matrix is read on the first frame and again only when that angle changes.
    """

    def __init__(self, path: str):
        self.path = path
        self._angle: Optional[float] = None
        self._turn = Orientation()

    def __call__(self, frame) -> Orientation:
        angle = frame.rotation
        if angle != self._angle:
            self._angle, self._turn = angle, orientation_of(frame, self.path)
        return self._turn


@functools.lru_cache(maxsize=16)
def _orientation(matrix: bytes) -> Orientation:
    # Every frame of a stream carries the same matrix: read it once (native-endian int32, as FFmpeg keeps it).
    return Orientation.from_matrix(np.frombuffer(matrix, dtype=np.int32))


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What a probe tells about a video stream: its packets (demuxed, not decoded) and its first frame.

    `width` and `height` are as shown (after `orientation`): a portrait phone
    clip coded 1920x1080 with a 90 degree display matrix is 1920 rows high.
    """

    path: str
    codec: str
    width: int
    height: int
    rate: float          # declared frames per second
    packets: int         # coded frames (packets holding data)
    start: float         # seconds of the earliest frame
    end: float           # seconds at which the last frame stops showing
    orientation: Orientation = Orientation()  # how frames are turned to be shown (first frame's display matrix)

    @property
    def duration(self) -> float:
        return max(0.0, self.end - self.start)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a video will be read: the timing source and the frame count that results."""

    timing: str          # "pts" (frame timestamps) or "index" (frame index / declared rate)
    frames: int          # frames the stream yields after resampling
    height: int          # frame size after resizing
    width: int
    start: float
    end: float
    # The part of every frame that is read, `(top, left, height, width)` in pixels of the frame as shown;
    # None: all of it. It is what is resized to `height x width` (`tfrecords_tools.borders`: inside black bars).
    region: Optional[Tuple[int, int, int, int]] = None


def _open(path: str):
    import av

    if not os.path.exists(path):
        raise VideoError(path, "file not found")
    if os.path.isdir(path):
        raise VideoError(path, "is a folder, expected a video file")
    if os.path.getsize(path) == 0:
        raise VideoError(path, "empty file (0 bytes)")
    try:
        container = av.open(path, metadata_errors="ignore")
    except av.error.FFmpegError as e:
        raise VideoError(path, f"FFmpeg could not open it: {e}") from e
    if not container.streams.video:
        kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
        container.close()
        raise VideoError(path, f"no video stream (streams found: {kinds})")
    return container


def _check_pixels(path: str, width: int, height: int, max_pixels: int) -> None:
    """The decompression-bomb guard: a declared frame size above `max_pixels` is refused before decoding."""
    if width * height > max_pixels:
        raise VideoError(path, f"declared frame size {width}x{height} = {width * height} pixels exceeds "
                               f"the limit of {max_pixels} (--max-pixels)")


def _rate(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate and float(rate) > 0:
            return float(rate)
    return 25.0


def probe(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> VideoInfo:
    """Reads a video's stream header and packets, and decodes its first frame for the display matrix:
    size as shown, rate, coded frames, time span, orientation."""
    return _probe(path, max_pixels, keep_open=False)[0]


class _Rewound:
    """The probe's open container, sought back to its first packet, for the first read to decode from.

    Opening a file costs as much as decoding a few frames (FFmpeg probes the
    stream), so the first read reuses the probe's container. It is trusted only
    if the first packet it yields is the probe's first packet; else the read
    opens the file afresh.
    """

    def __init__(self, container, first: Tuple, threads: int):
        self.container = container
        self.first = first
        self.threads = threads  # its decoder is set up (and may be open) for this many threads

    def close(self):
        self.container.close()


def _packet_id(packet) -> Tuple:
    return packet.pts, packet.dts, packet.pos, packet.size


def _probe(path: str, max_pixels: int, keep_open: bool, threads: int = 1) -> Tuple[VideoInfo, Optional[_Rewound]]:
    import av

    container = _open(path)
    kept = None
    try:
        # Configured as the read will be: the first read decodes with this container's decoder.
        stream = _configure_decoder(container, threads)
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise VideoError(path, f"the video stream declares no frame size ({width}x{height})")
        _check_pixels(path, width, height, max_pixels)
        rate = _rate(stream)
        tb = float(stream.time_base) if stream.time_base else 1.0 / rate
        packets, start, end, first = 0, math.inf, -math.inf, None
        # The display matrix reaches Python only on decoded frames (PyAV has no stream side data),
        # so the first packets are decoded until a frame comes out; the seek below resets the decoder.
        orientation: Optional[Orientation] = None
        try:
            for packet in container.demux(stream):
                if first is None:
                    first = _packet_id(packet)
                if packet.size == 0:
                    continue
                if orientation is None:
                    orientation = _first_orientation(path, stream, packet)
                packets += 1
                if packet.pts is not None:
                    t = packet.pts * tb
                    start = min(start, t)
                    end = max(end, t + (packet.duration * tb if packet.duration else 1.0 / rate))
        except av.error.FFmpegError as e:
            raise VideoError(path, f"FFmpeg failed while reading packets after {packets}: {e}") from e
        if packets == 0:
            raise VideoError(path, "the video stream holds no frames")
        if not math.isfinite(start):
            start, end = 0.0, packets / rate
        declared = _declared_duration(container, stream)
        # A file cut short (a copy that stopped, a broken upload) often still opens: streamable
        # containers (Matroska, WebM, MPEG-TS) just end early. The header still says how long it was.
        if declared and (end - start) < 0.9 * declared - 2.0 / rate:
            raise VideoError(path, f"truncated: its frames end at {end - start:.2f}s but the file declares "
                                   f"{declared:.2f}s ({packets} frames read)")
        if orientation is None:  # no frame yet: the decoder holds it until told that the packets ended
            orientation = _first_orientation(path, stream, None) or Orientation()
        height, width = orientation.shown_size(height, width)
        info = VideoInfo(path, stream.codec_context.name, width, height, rate, packets, start, end, orientation)
        if keep_open and first is not None and first[1] is not None:
            try:  # back to the first packet (its decode timestamp), as a fresh open would start
                container.seek(first[1], stream=stream, backward=True)
                kept = _Rewound(container, first, threads)
            except av.error.FFmpegError:
                pass
        return info, kept
    finally:
        if kept is None:
            container.close()


def _first_orientation(path: str, stream, packet) -> Optional[Orientation]:
    """The orientation of the first frame that decoding `packet` (None: end of packets) gives; None when
    none comes out yet. A decoding error gives the default: the read reports it where it happens."""
    import av

    try:
        frames = stream.decode(packet)
    except av.error.FFmpegError:
        return Orientation()
    return orientation_of(frames[0], path) if frames else None


def _configure_decoder(container, threads: int):
    """The container's video stream, its decoder set to `threads` (before it opens)."""
    stream = container.streams.video[0]
    if threads > 1:
        stream.thread_type = "AUTO"
        stream.thread_count = threads
    else:
        stream.thread_count = 1
    return stream


def _declared_duration(container, stream) -> Optional[float]:
    """Seconds the video stream (or a video-only container) declares; None when it does not say.

    A container's duration covers every stream, so with audio beside the video it is not used.
    """
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration and len(container.streams) == 1:
        return container.duration / 1e6
    return None


def count_resampled(start: float, end: float, fps: float) -> int:
    """Frames at times start + k/fps that fall before `end` (the resampled frame count)."""
    return max(0, math.ceil((end - start) * fps - _TAIL))


def make_plan(info: VideoInfo, spec: PatchSpec, timing: str = "pts", frames: Optional[int] = None,
              start: Optional[float] = None, end: Optional[float] = None,
              region: Optional[Tuple[int, int, int, int]] = None) -> Plan:
    """The plan for reading `info` under `spec`; later attempts pass what decoding found. `region`
    (`Plan.region`) is the part of the frame read: `spec` sizes it as it would a whole frame."""
    if region is not None:
        region = tuple(int(v) for v in region)
        if len(region) != 4 or not (0 <= region[0] and 0 <= region[1] and 0 < region[2] and 0 < region[3]
                                    and region[0] + region[2] <= info.height and region[1] + region[3] <= info.width):
            raise ValueError(f"Invalid value for argument `region`. Expected (top, left, height, width) inside the "
                             f"{info.height}x{info.width} frame of {info.path}. Received region={region!r}")
        if region == (0, 0, info.height, info.width):
            region = None
    height, width = spec.frame_size(*(region[2:] if region else (info.height, info.width)))
    if timing == "index":
        start, end = 0.0, (frames if frames is not None else info.packets) / info.rate
    else:
        start = info.start if start is None else start
        end = info.end if end is None else end
    if spec.fps:
        count = count_resampled(start, end, spec.fps)
    else:
        count = frames if frames is not None else info.packets
    return Plan(timing, count, height, width, start, end, region)


class Replan(Exception):
    """Decoding found that the plan was wrong (timestamps or frame count); read again with `plan`."""

    def __init__(self, plan: Plan, why: str):
        super().__init__(why)
        self.plan = plan
        self.why = why


@functools.lru_cache(maxsize=None)
def _scaler_accepts_threads() -> bool:
    """PyAV >= 17 scales with several threads unless told otherwise; older versions use one and lack the argument."""
    import av

    return int(av.__version__.split(".")[0]) >= 17


@functools.lru_cache(maxsize=None)
def _exact(interpolation: str):
    """`interpolation` (a swscale algorithm's name) with accurate rounding and full chroma interpolation."""
    from av.video.reformatter import Interpolation

    return Interpolation[interpolation] | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT


def _scaler_threads(threads: int) -> dict:
    return {"threads": threads} if _scaler_accepts_threads() else {}


class FrameStream:
    """Iterates `(uint8 [H, W, 3] RGB frame, seconds)` for a video under a plan.

    Holds one decoded frame at a time (two when resampling). Frames are turned
    as each one's display matrix says. A frame shown at another size than the
    probe's first frame is fitted to the plan's size (`--resize`: resized like
    every frame; otherwise scaled to cover it and centre-cropped) and noted in
    `size_changes`. Raises `Replan` when decoding shows that timestamps are
    unusable or that the frame count differs from the plan, and `VideoError`
    when FFmpeg fails or a display matrix is not a right angle.
    """

    def __init__(self, info: VideoInfo, spec: PatchSpec, plan: Plan, threads: int = 1,
                 interpolation: str = "AREA", rewound: Optional[_Rewound] = None, colour: str = DEFAULT_COLOUR):
        if colour not in COLOURS:
            raise ValueError(f"Invalid value for argument `colour`. Expected one of {COLOURS}. Received {colour!r}")
        self.info = info
        self.colour = colour
        self._rewound = rewound
        self.spec = spec
        self.plan = plan
        self.threads = threads
        self.interpolation = interpolation
        self.decoded = 0
        self._scaler = None
        self._shown = (info.height, info.width)  # the size the frames are shown at so far
        self.size_changes: List[dict] = []  # the first MAX_SIZE_CHANGES of them
        self.size_change_count = 0

    def _fit(self, shown: Tuple[int, int]) -> Tuple[str, int, int]:
        """(how, H, W): a frame shown at `shown` is scaled to H x W, then centre-cropped to the plan's size."""
        height, width = self.plan.height, self.plan.width
        if self.spec.resize is not None:
            return "resize", height, width
        scale = max(height / shown[0], width / shown[1])
        cover = (max(height, int(round(shown[0] * scale))), max(width, int(round(shown[1] * scale))))
        return ("scale" if cover == (height, width) else "cover"), cover[0], cover[1]

    def _fit_region(self, shown: Tuple[int, int]) -> Tuple[int, int, Tuple[int, int]]:
        """(H, W, (top, left)): a frame shown at `shown` is scaled to H x W so that the plan's region
        (of the probe's frame size; a frame of another size has it in proportion) becomes the plan's
        size, then cut at (top, left)."""
        top, left, height, width = self.plan.region
        fy, fx = shown[0] / self.info.height, shown[1] / self.info.width
        sy, sx = self.plan.height / (height * fy), self.plan.width / (width * fx)
        full_h = max(self.plan.height, int(round(shown[0] * sy)))
        full_w = max(self.plan.width, int(round(shown[1] * sx)))
        return full_h, full_w, (min(int(round(top * fy * sy)), full_h - self.plan.height),
                                min(int(round(left * fx * sx)), full_w - self.plan.width))

    def _note_size(self, shown: Tuple[int, int]) -> None:
        if shown == self._shown:
            return
        if len(self.size_changes) < MAX_SIZE_CHANGES:
            self.size_changes.append({"frame": self.decoded - 1, "from": list(self._shown), "to": list(shown),
                                      "fit": self._fit(shown)[0]})
        self.size_change_count += 1
        self._shown = shown

    def report(self) -> dict:
        """What the manifest records about the read: the orientation and any frame size changes."""
        out = self.info.orientation.to_dict()
        if self.size_change_count:
            out["size_changes"] = self.size_change_count
            out["size_change_list"] = list(self.size_changes)
        return out

    def _to_rgb(self, frame, turn: Orientation) -> np.ndarray:
        # One scaler for the whole stream, as single-threaded as the decoder. `frame.to_ndarray(width=...)`
        # makes a scaler per frame, so swscale is set up again for every frame and (PyAV >= 17,
        # threads=0) starts a thread pool per frame: 1.4x to 4x slower on the sample videos, and
        # those threads compete with the other workers. The pixels are the same.
        if self._scaler is None:
            from av.video.reformatter import VideoReformatter

            self._scaler = VideoReformatter()
        shown = turn.shown_size(frame.height, frame.width)
        if self.plan.region is not None:
            height, width, crop = self._fit_region(shown)
        elif shown == (self.info.height, self.info.width):  # every frame of an ordinary video
            crop, (height, width) = None, (self.plan.height, self.plan.width)
        else:
            _, height, width = self._fit(shown)
            crop = (height - self.plan.height) // 2, (width - self.plan.width) // 2
        coded = (width, height) if turn.transposed else (height, width)  # the scaler works before turning
        size = {} if (frame.height, frame.width) == coded else {
            "width": coded[1], "height": coded[0], "interpolation": self.interpolation}
        if self.colour == "exact":
            size["interpolation"] = _exact(size.get("interpolation", "BILINEAR"))
        rgb = turn.apply(self._scaler.reformat(frame, format="rgb24", **size,
                                               **_scaler_threads(self.threads)).to_ndarray())
        if crop is not None and rgb.shape[:2] != (self.plan.height, self.plan.width):
            top, left = crop
            rgb = np.ascontiguousarray(rgb[top:top + self.plan.height, left:left + self.plan.width])
        return rgb

    def convert(self, frame, turn: Orientation = Orientation()) -> np.ndarray:
        """One decoded PyAV frame -> `uint8 [H, W, 3]` RGB at the plan's size, turned and fitted like every
        frame of `__iter__`: for readers that decode a source themselves (a live stream has no probe)."""
        return self._to_rgb(frame, turn)

    def _open(self):
        """(container, its video packets from the first on): the probe's container when it rewound right."""
        import itertools

        rewound, self._rewound = self._rewound, None
        if rewound is not None:
            import av

            try:
                if rewound.threads == self.threads:
                    packets = rewound.container.demux(rewound.container.streams.video[0])
                    first = next(packets, None)
                    if first is not None and _packet_id(first) == rewound.first:
                        return rewound.container, itertools.chain([first], packets)
            except av.error.FFmpegError:
                pass
            rewound.close()
        container = _open(self.info.path)
        return container, container.demux(_configure_decoder(container, self.threads))

    def _decoded(self) -> Iterator[Tuple[object, Orientation, float, float]]:
        """Yields (frame, orientation, seconds, duration) in decoder order; checks timestamps and notes
        size changes on the way."""
        import av

        container, packets = self._open()
        orientation = OrientationReader(self.info.path)
        try:
            rate = self.info.rate
            last = -math.inf
            try:
                for frame in (f for packet in packets for f in packet.decode()):
                    i = self.decoded
                    self.decoded += 1
                    turn = orientation(frame)
                    self._note_size(turn.shown_size(frame.height, frame.width))
                    if self.plan.timing == "index":
                        yield frame, turn, i / rate, 1.0 / rate
                        continue
                    t = frame.time
                    if t is None or t <= last + _EPS:
                        why = (f"frame {i} has timestamp {t} after {last:.4f}s: timestamps do not increase, "
                               "so frames are timed by index / declared rate")
                        raise Replan(make_plan(self.info, self.spec, timing="index", region=self.plan.region), why)
                    last = t
                    duration = (frame.duration * float(frame.time_base)
                                if getattr(frame, "duration", None) and frame.time_base else 1.0 / rate)
                    yield frame, turn, t, duration
            except av.error.FFmpegError as e:
                raise VideoError(self.info.path, f"FFmpeg failed decoding frame {self.decoded}: {e}") from e
        finally:
            container.close()

    def __iter__(self) -> Iterator[Tuple[np.ndarray, float]]:
        plan = self.plan
        fps = self.spec.fps
        emitted = 0
        if not fps:
            for frame, turn, t, duration in self._decoded():
                if emitted >= plan.frames:
                    emitted += 1  # counted, not converted: the plan is wrong and will be redone
                    continue
                yield self._to_rgb(frame, turn), t
                emitted += 1
            if emitted != plan.frames:
                raise Replan(make_plan(self.info, self.spec, plan.timing, frames=self.decoded, region=plan.region),
                             f"decoded {self.decoded} frames, the container's packets said {plan.frames}")
            return
        # Resampling: output frame k shows the latest frame whose time is <= start + k / fps, give or
        # take _TAIL of a period: a time base such as 66667/1e6 s puts a 15 fps file's frame n at
        # n * 66667 us, a little after n / 15 s, and an exact comparison would show frame n - 1 there.
        step = 1.0 / fps
        start = None
        shown = None  # (frame, orientation, rgb or None)
        end = None
        for frame, turn, t, duration in self._decoded():
            if start is None:
                start = t
            while shown is not None and start + emitted * step < t - _TAIL * step:
                if emitted < plan.frames:
                    if shown[2] is None:
                        shown = (shown[0], shown[1], self._to_rgb(shown[0], shown[1]))
                    yield shown[2], start + emitted * step
                emitted += 1
            shown = (frame, turn, None)
            end = t + duration
        if shown is None:
            raise VideoError(self.info.path, "the decoder returned no frames")
        while start + emitted * step < end - _TAIL * step:
            if emitted < plan.frames:
                if shown[2] is None:
                    shown = (shown[0], shown[1], self._to_rgb(shown[0], shown[1]))
                yield shown[2], start + emitted * step
            emitted += 1
        if emitted != plan.frames:
            raise Replan(make_plan(self.info, self.spec, plan.timing, frames=self.decoded, start=start, end=end,
                                   region=plan.region),
                         f"resampled to {emitted} frames, the container's packets said {plan.frames}")


def video_patches(path: str, spec: PatchSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                  threads: int = 1, interpolation: str = "AREA", colour: str = DEFAULT_COLOUR,
                  report: Optional[dict] = None, cutter: Optional[Callable[[Plan], object]] = None,
                  region: Optional[Tuple[int, int, int, int]] = None) -> Iterator[Union[Plan, Patch, object]]:
    """Streams the patches of one video: the single place where decoding meets cutting.

    Yields a `Plan` at the start of every read, then that read's `Patch`es in
    grid order (t, then y, then x). A second `Plan` means the first read was
    wrong (timestamps or frame count): the consumer drops what it received
    since the previous `Plan`. Converter, predictor and enhancer all use this,
    so they cut the same patches from the same video. `report`, when given,
    receives `FrameStream.report()` of the read that finished (orientation and
    size changes: what the manifest records).

    `cutter(plan)`, when given, makes the object that cuts a read's frames instead of one `PatchCutter`
    over the whole grid: anything with `add(frame, t)` and `finish()` yielding what this generator
    yields (`sampling.ItemsCutter`: the patches of several segments, cut from one decode). When it has
    a true `done` before the video ends, the rest of the video is not decoded.

    `region` (`Plan.region`): only that part of every frame is read, e.g. the picture inside black bars.
    `colour`: how YUV becomes RGB (`COLOURS`; the module's docstring).
    """
    info, rewound = _probe(path, max_pixels, keep_open=True, threads=threads)
    try:
        plan = make_plan(info, spec, region=region)
        for _ in range(3):
            yield plan
            if cutter is None:
                cut = PatchCutter(spec, Grid.for_video(spec, plan.frames, plan.height, plan.width))
            else:
                cut = cutter(plan)
            try:
                # The first read decodes from the probe's container; a second one opens the file again.
                frames = FrameStream(info, spec, plan, threads, interpolation, rewound=rewound, colour=colour)
                stream = iter(frames)
                for frame, t in stream:
                    yield from cut.add(frame, t)
                    if getattr(cut, "done", False):
                        stream.close()  # every item has its frames: the rest is not decoded
                        break
                if report is not None:
                    report.update(frames.report())
                yield from cut.finish()
                return
            except Replan as r:
                plan = r.plan
            finally:
                rewound = None
    finally:
        if rewound is not None:  # the consumer stopped before the first read
            rewound.close()
    raise VideoError(path, "decoding gave a different frame count on each of 3 reads")


def fold_frames(path: str, spec: PatchSpec, start: Callable[[], object], add: Callable[[object, np.ndarray], None],
                *, region: Optional[Tuple[int, int, int, int]] = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                info: Optional[VideoInfo] = None, colour: str = DEFAULT_COLOUR, limit: Optional[int] = None) -> object:
    """Streams every frame of `path` under `spec` (and `region`, `Plan.region`) into `add(state, frame)`,
    one frame at a time, `state` made by `start()`; returns the state. When decoding shows the plan was
    wrong (`Replan`) the fold starts again from a fresh state, as `video_patches` reads again. `limit`: only
    the first `limit` frames (the rest is not decoded, nor the end-of-video checks made)."""
    info = info or probe(path, max_pixels)
    plan = make_plan(info, spec, region=region)
    for _ in range(3):
        state = start()
        try:
            for count, (frame, _) in enumerate(FrameStream(info, spec, plan, colour=colour), 1):
                add(state, frame)
                if limit is not None and count >= limit:
                    break
            return state
        except Replan as r:
            plan = r.plan
    raise VideoError(path, "decoding gave a different frame count on each of 3 reads")


def read_frames(path: str, spec: Optional[PatchSpec] = None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                colour: str = DEFAULT_COLOUR) -> Tuple[np.ndarray, float]:
    """Every frame the converter's decoder gives for `path` under `spec` (default: native size, the
    container's rate) as uint8 `[N, H, W, C]`, and the rate; re-read as `video_patches` does when decoding
    shows the plan was wrong (`Replan`). Whole clips in memory: for benchmarks and tests."""
    spec = spec or PatchSpec(1, 1, 1)
    info = probe(path, max_pixels)
    frames = fold_frames(path, spec, list, lambda kept, frame: kept.append(frame), info=info, colour=colour)
    return np.stack(frames), (spec.fps or info.rate)


# Frames `mean_quantizer` reads by default: about 10 s at 30 fps, several GOPs of any common encoder.
QUANTIZER_FRAMES = 300


def mean_quantizer(path: str, frames: int = QUANTIZER_FRAMES, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> float:
    """The mean quantizer (QP, 0-51) of an H.264 video's first `frames` frames, as its own decoder reports it.

    FFmpeg's H.264 decoder exports each frame's quantizer per macroblock when asked (`export_side_data
    venc_params`); the mean over macroblocks and frames says how hard the footage was compressed, whatever
    encoder made it (x264, a camera's hardware encoder). Nothing is converted to RGB. Raises `VideoError` for
    another codec or a decoder that reports no quantizer."""
    import av

    container = _open(path)
    try:
        stream = container.streams.video[0]
        name = stream.codec_context.name
        if name != "h264":
            raise VideoError(path, f"its video is {name}, expected H.264 for a quantizer reading (name the crf "
                                   "values instead, e.g. h264:37-41)")
        width, height = stream.codec_context.width, stream.codec_context.height
        _check_pixels(path, width, height, max_pixels)
        stream.codec_context.options = {"export_side_data": "venc_params"}
        kind = getattr(getattr(av, "sidedata", None), "sidedata", None)
        kind = getattr(getattr(kind, "Type", None), "VIDEO_ENC_PARAMS", None)
        total, blocks, seen = 0.0, 0, 0
        try:
            for frame in container.decode(stream):
                for data in side_data(frame):
                    if kind is not None and data.type == kind and hasattr(data, "qp_map"):
                        qp = np.asarray(data.qp_map(), np.float64)
                        total, blocks = total + float(qp.sum()), blocks + qp.size
                seen += 1
                if seen >= frames:
                    break
        except av.error.FFmpegError as e:
            raise VideoError(path, f"FFmpeg failed while decoding frame {seen} for its quantizer: {e}") from e
        if not blocks:
            raise VideoError(path, f"its decoder reported no quantizer in {seen} frames (PyAV {av.__version__}: "
                                   "needs VideoEncParams side data; name the crf values instead, e.g. h264:37-41)")
        return total / blocks
    finally:
        container.close()


class VideoWriter:
    """Writes `uint8 [H, W, 3]` RGB frames to a video file with PyAV, one frame at a time.

    `codec="libx264"` (yuv420p, `crf` for quality) is the default; `lossless=True`
    writes `libx264rgb` with qp 0, which keeps every RGB value.
    """

    def __init__(self, path: str, fps: float, *, codec: str = "libx264", crf: int = 18, lossless: bool = False,
                 options: Optional[dict] = None):
        import fractions

        import av

        self.path = path
        self.container = av.open(path, mode="w")
        rate = fractions.Fraction(fps).limit_denominator(1001)
        if lossless:
            self.stream = self.container.add_stream("libx264rgb", rate=rate)
            self.stream.pix_fmt = "rgb24"
            self.stream.options = {"qp": "0", "preset": "veryfast", **(options or {})}
        else:
            self.stream = self.container.add_stream(codec, rate=rate)
            self.stream.pix_fmt = "yuv420p"
            opts = {"crf": str(crf), "preset": "veryfast"} if codec.startswith("libx264") else {}
            self.stream.options = {**opts, **(options or {})}
        self.stream.thread_count = 1  # deterministic output for the same frames
        self._sized = False

    def write(self, frame: np.ndarray) -> None:
        import av

        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"Expected a uint8 [H, W, 3] frame. Received dtype={frame.dtype}, shape={frame.shape}")
        if not self._sized:
            self.stream.height, self.stream.width = frame.shape[:2]
            self._sized = True
        for packet in self.stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
