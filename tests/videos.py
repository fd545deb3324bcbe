"""Test helper: small real videos (H.264 via PyAV's libx264) with known content, and direct PyAV decoding.

The converter's results are checked against what these helpers know
independently: the frames that went into a lossless file, the timestamps
written into a variable-frame-rate file, or the frames PyAV itself decodes.
"""

from __future__ import annotations

import fractions
import os
from typing import List, Optional, Sequence, Tuple

import av
import numpy as np

from tfrecords_tools.video import VideoWriter

# The variable-frame-rate test file: frame i is shown from VFR_PTS_MS[i] milliseconds (irregular gaps).
VFR_PTS_MS = (0, 40, 100, 110, 300, 310, 320, 500, 740, 1000)
# The folder-of-classes source (conftest's `classes_src`): these classes, PER_CLASS videos each.
CLASSES = ("circle", "square", "stripe")
PER_CLASS = 4


def pattern_frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """`uint8 [count, height, width, 3]`: a smooth texture that slides one pixel a frame and brightens.

    Smooth so lossy H.264 keeps it close; every frame differs from every other
    (the brightness ramp), so a decoded frame can be matched to its source.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width + count].astype(np.float32)
    base = np.zeros((height, width + count, 3), np.float32)
    for _ in range(4):
        fy, fx = rng.uniform(-0.3, 0.3, size=2)
        base += np.sin(fy * yy + fx * xx + rng.uniform(0, 6.3))[..., None] * rng.uniform(0.2, 1.0, size=3)
    base = (base - base.min()) / max(1e-6, float(base.max() - base.min())) * 180.0
    out = np.empty((count, height, width, 3), np.uint8)
    for t in range(count):
        out[t] = np.clip(base[:, t:t + width] + 2.0 * t, 0, 255).astype(np.uint8)
    return out


def write_video(path: str, frames: np.ndarray, fps: float = 25.0, lossless: bool = False) -> str:
    """Encodes `uint8 [T, H, W, 3]` frames with the project's `VideoWriter`; returns `path`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with VideoWriter(path, fps, lossless=lossless) as writer:
        for frame in frames:
            writer.write(frame)
    return path


def write_timed_video(path: str, frames: np.ndarray, pts: Sequence[int],
                      time_base: fractions.Fraction = fractions.Fraction(1, 1000), rate: int = 25) -> str:
    """A lossless H.264 file whose frame i is shown from `pts[i] * time_base` seconds.

    Written with PyAV directly (each frame's pts set by hand), since
    `VideoWriter` only writes constant rates; `rate` is what the stream declares.
    """
    container = av.open(path, mode="w")
    stream = container.add_stream("libx264rgb", rate=rate)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "rgb24"
    stream.time_base = time_base
    stream.codec_context.time_base = time_base
    stream.options = {"qp": "0", "preset": "veryfast"}
    stream.thread_count = 1
    for frame, p in zip(frames, pts):
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        vf.pts = int(p)
        vf.time_base = time_base
        for packet in stream.encode(vf):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def write_audio_only(path: str, seconds: float = 1.0, rate: int = 16000) -> str:
    """An AAC file with one audio stream and no video stream."""
    container = av.open(path, mode="w")
    stream = container.add_stream("aac", rate=rate)
    stream.layout = "mono"
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for i in range(0, len(wave), 1024):
        frame = av.AudioFrame.from_ndarray(wave[None, i:i + 1024], format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = i
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def write_yuv_window(path: str, source: str, frames: int, rows: int, cols: int) -> str:
    """A lossless yuv420p H.264 video of the first `frames` frames of `source` (a yuv420p video), each a `rows` x
    `cols` window of its stored planes from a quarter of the way in: real YUV pixels that never passed through an
    RGB conversion. `rows`, `cols` even (4:2:0 chroma stays aligned). Returns `path`."""
    with av.open(source) as container:
        planes = [f.to_ndarray(format="yuv420p") for _, f in zip(range(frames), container.decode(video=0))]
    h, w = planes[0].shape[0] * 2 // 3, planes[0].shape[1]
    top, left = h // 4 // 2 * 2, w // 4 // 2 * 2

    def window(p):
        y, u, v = p[:h], p[h:h + h // 4].reshape(h // 2, w // 2), p[h + h // 4:].reshape(h // 2, w // 2)
        c = (slice(top // 2, (top + rows) // 2), slice(left // 2, (left + cols) // 2))
        return np.concatenate([y[top:top + rows, left:left + cols], u[c].reshape(-1, cols), v[c].reshape(-1, cols)])

    with av.open(path, "w") as container:   # lossless YUV: what is stored is exactly these planes
        stream = container.add_stream("libx264", rate=25)
        stream.pix_fmt, stream.height, stream.width, stream.options = "yuv420p", rows, cols, {"qp": "0"}
        for p in planes:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(window(p)),
                                                                   format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def yuv_planes(path: str, frames: int) -> np.ndarray:
    """The first `frames` frames' yuv420p planes as stored (`float64 [frames, H * 3 / 2, W]`), no conversion to
    RGB."""
    with av.open(path) as container:
        got = [f.to_ndarray(format="yuv420p").astype(np.float64) for _, f in zip(range(frames),
                                                                                 container.decode(video=0))]
    return np.stack(got)


def assert_planes_written_back(stored: str, written: str, frames: int, rows: int) -> None:
    """The first `frames` frames of `written` hold `stored`'s own yuv420p planes (`rows` luma rows), as a lossless
    write-back of unchanged pixels should: luma within 0.05 on the mean and 0.1 per pixel, chroma within 0.1 and 1.0
    (4:2:0 chroma is resampled on the way through RGB)."""
    a, b = yuv_planes(stored, frames), yuv_planes(written, frames)
    luma, chroma = b[:, :rows] - a[:, :rows], b[:, rows:] - a[:, rows:]
    assert abs(luma.mean()) < 0.05 and np.abs(luma).mean() < 0.1, (luma.mean(), np.abs(luma).mean())
    assert abs(chroma.mean()) < 0.1 and np.abs(chroma).mean() < 1.0, (chroma.mean(), np.abs(chroma).mean())


def decode_all(path: str, size: Optional[Tuple[int, int]] = None,
               interpolation: str = "AREA") -> Tuple[np.ndarray, List[float]]:
    """Every frame PyAV decodes, in decoder order: (`uint8 [N, H, W, 3]`, seconds of each frame).

    `size` (H, W) resizes with FFmpeg's scaler, as the converter does.
    """
    frames, times = [], []
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        for frame in container.decode(stream):
            if size is None:
                frames.append(frame.to_ndarray(format="rgb24"))
            else:
                frames.append(frame.to_ndarray(format="rgb24", height=size[0], width=size[1],
                                               interpolation=interpolation))
            times.append(frame.time)
    return np.stack(frames), times


def cut(frames: np.ndarray, t: int, y: int, x: int, size: Tuple[int, int, int], pad: str) -> np.ndarray:
    """The patch at (t, y, x) of an in-memory video, cut and padded by hand (`edge` or `zero`)."""
    pt, ph, pw = size
    block = frames[t:t + pt, y:y + ph, x:x + pw]
    out = np.zeros((pt, ph, pw, 3), np.uint8)
    vt, vh, vw = block.shape[:3]
    out[:vt, :vh, :vw] = block
    if pad == "edge":
        out[:vt, :vh, vw:] = block[:, :, vw - 1:vw]       # repeat the last column
        out[:vt, vh:, :] = out[:vt, vh - 1:vh, :]          # then the last row (corner included)
        out[vt:] = out[vt - 1:vt]                          # then the last frame
    return out


# Display matrices as (a, b, c, d) of FFmpeg's layout (libavutil/display.h), in units of 1, and what a
# player shows for each: a portrait phone clip (coded landscape, turned 90 degrees clockwise), the
# other right angles, and a mirror.
DISPLAY_TURNS = {
    "phone_portrait": ((0, 1, -1, 0), lambda f: np.rot90(f, -1, axes=(-3, -2))),
    "ccw_90": ((0, -1, 1, 0), lambda f: np.rot90(f, 1, axes=(-3, -2))),
    "upside_down": ((-1, 0, 0, -1), lambda f: np.rot90(f, 2, axes=(-3, -2))),
    "mirrored": ((-1, 0, 0, 1), lambda f: f[..., ::-1, :]),
}


def set_display_matrix(path: str, abcd: Tuple[float, float, float, float]) -> str:
    """Writes a display matrix into the `tkhd` box of a one-track MP4, as a phone does for a portrait clip.

    The box holds a, b, u, c, d, v, x, y, w as big-endian 32-bit numbers (16.16 fixed point, u, v, w
    2.30); FFmpeg reads them as the stream's display matrix. Patched in the bytes so that any PyAV
    version can make such a file.
    """
    import struct

    data = bytearray(open(path, "rb").read())
    at = data.find(b"tkhd")
    assert at > 0 and data.find(b"tkhd", at + 4) < 0, f"{path}: expected one tkhd box"
    offset = at + 4 + 4 + (32 if data[at + 4] == 1 else 20) + 8 + 8  # version/flags, times, reserved, layer..volume
    identity = struct.pack(">9i", 1 << 16, 0, 0, 0, 1 << 16, 0, 0, 0, 1 << 30)
    assert bytes(data[offset:offset + 36]) == identity, f"{path}: tkhd matrix not found where expected"
    a, b, c, d = (int(round(v * (1 << 16))) for v in abcd)
    data[offset:offset + 36] = struct.pack(">9i", a, b, 0, c, d, 0, 0, 0, 1 << 30)
    with open(path, "wb") as f:
        f.write(bytes(data))
    return path


def write_size_changing_ts(path: str, segments: Sequence[np.ndarray], fps: int = 25) -> str:
    """Concatenated MPEG-TS segments, each `uint8 [T, H, W, 3]` encoded on its own (lossy H.264), as a
    broadcast recording or `cat a.ts b.ts` gives: the frame size changes where a segment starts."""
    import io

    data = b""
    for frames in segments:
        buffer = io.BytesIO()
        container = av.open(buffer, mode="w", format="mpegts")
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12", "preset": "veryfast"}
        stream.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        container.close()
        data += buffer.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    return path


def checkerboard(count: int, height: int, width: int, cell: int) -> np.ndarray:
    """`uint8 [count, height, width, 3]` black and white squares of `cell` pixels: a stretch makes them oblong."""
    yy, xx = np.mgrid[0:height, 0:width]
    board = (((yy // cell) + (xx // cell)) % 2 * 255).astype(np.uint8)
    return np.repeat(np.repeat(board[None, :, :, None], 3, axis=3), count, axis=0)
