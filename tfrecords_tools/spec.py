"""Spec stage: the one frozen description of how a video is cut into spacetime patches.

A `PatchSpec` is built once (from CLI options or from a manifest), checked in
`__post_init__`, saved beside the shards as JSON and read back and checked by
every reader: the pipeline, the models, the exporter and the predictor.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Optional, Tuple

from tfrecords_tools import pixels as pixels_lib

PAD_MODES = ("drop", "edge", "zero")
ENCODINGS = ("raw", "jpeg", "png")
COMPRESSIONS = ("none", "gzip", "zlib")

_TRIPLE = re.compile(r"^\s*(\d+)\s*[xX,]\s*(\d+)\s*[xX,]\s*(\d+)\s*$")
_PAIR = re.compile(r"^\s*(\d+)\s*[xX,]\s*(\d+)\s*$")


def _invalid(name: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"Invalid value for argument `{name}`. Expected {expected}. Received {name}={value!r}")


def parse_triple(text: str, name: str = "patch") -> Tuple[int, int, int]:
    """Parses 'TxHxW' (e.g. '8x64x64') into three ints."""
    m = _TRIPLE.match(str(text))
    if not m:
        raise _invalid(name, "three integers written TxHxW, e.g. 8x64x64", text)
    return tuple(int(g) for g in m.groups())  # type: ignore[return-value]


def parse_pair(text: str, name: str = "resize") -> Tuple[int, int]:
    """Parses 'HxW' (e.g. '128x171') into two ints."""
    m = _PAIR.match(str(text))
    if not m:
        raise _invalid(name, "two integers written HxW, e.g. 128x171", text)
    return tuple(int(g) for g in m.groups())  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class PatchSpec:
    """How frames are resampled, resized and cut.

    Patches are `uint8 [frames, height, width, channels]` (RGB, channels=3),
    taken every `stride` frames/pixels on a regular grid. `pad` says what
    happens to a tail that does not fill a whole patch: `drop` it, or pad it
    by repeating the `edge` or with `zero`s (the valid extent is recorded in
    every record). `fps` resamples by frame timestamps before cutting;
    `resize` (H, W) or `short_side` resize every frame (never both).
    `pixels` is how records store a patch and models take it: `rgb`, or
    `yuv440` (2 bytes a pixel instead of 3; `tfrecords_tools.pixels`). It is
    the format's name (what the JSON holds; a `PixelFormat` passed in is stored
    as its name); `pixel_format` is the object that says what it means.
    """

    frames: int
    height: int
    width: int
    channels: int = 3
    stride_frames: Optional[int] = None
    stride_height: Optional[int] = None
    stride_width: Optional[int] = None
    pad: str = "drop"
    fps: Optional[float] = None
    resize: Optional[Tuple[int, int]] = None
    short_side: Optional[int] = None
    pixels: str = "rgb"

    def __post_init__(self):
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _invalid(name, "a strictly positive integer", value)
        if self.channels != 3:
            raise _invalid("channels", "3 (frames are converted to RGB)", self.channels)
        # Strides default to the patch size: non-overlapping patches.
        for name, default in (("stride_frames", self.frames), ("stride_height", self.height),
                              ("stride_width", self.width)):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, default)
            elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _invalid(name, "a strictly positive integer", value)
        if self.pad not in PAD_MODES:
            raise _invalid("pad", f"one of {PAD_MODES}", self.pad)
        if self.fps is not None:
            if not isinstance(self.fps, (int, float)) or not 0 < float(self.fps) <= 1000:
                raise _invalid("fps", "a frame rate in (0, 1000]", self.fps)
            object.__setattr__(self, "fps", float(self.fps))
        if self.resize is not None and self.short_side is not None:
            raise ValueError("Invalid arguments: `resize` and `short_side` are exclusive. "
                             f"Received resize={self.resize!r}, short_side={self.short_side!r}")
        if self.resize is not None:
            resize = tuple(self.resize)
            if len(resize) != 2 or not all(isinstance(v, int) and v >= 1 for v in resize):
                raise _invalid("resize", "(height, width), two strictly positive integers", self.resize)
            if resize[0] < self.height or resize[1] < self.width:
                raise _invalid("resize", f"a frame at least as large as the patch ({self.height}x{self.width})",
                               self.resize)
            object.__setattr__(self, "resize", resize)
        if self.short_side is not None:
            if not isinstance(self.short_side, int) or self.short_side < 1:
                raise _invalid("short_side", "a strictly positive integer", self.short_side)
        fmt = pixels_lib.get(self.pixels)
        object.__setattr__(self, "pixels", fmt.name)
        fmt.check_spec(self)

    # Derived values are properties, never stored copies that could drift.
    @property
    def pixel_format(self) -> pixels_lib.PixelFormat:
        """The `PixelFormat` named by `pixels`: its packing, its stored shape, what it refuses."""
        return pixels_lib.get(self.pixels)

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """The shape of a patch as records store it and models take it: `[T, H, W, 3]` for `rgb`,
        `[T, H/2, W, 4]` for `yuv440` (see `tfrecords_tools.pixels`)."""
        return self.pixel_format.record_shape(self.frames, self.height, self.width)

    @property
    def rgb_shape(self) -> Tuple[int, int, int, int]:
        """The shape of a patch as cut from a video, and of a model's first layer's output: `[T, H, W, 3]`."""
        return (self.frames, self.height, self.width, self.channels)

    @property
    def size(self) -> Tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def stride(self) -> Tuple[int, int, int]:
        return (self.stride_frames, self.stride_height, self.stride_width)

    @property
    def num_values(self) -> int:
        """Number of uint8 values in one stored patch."""
        t, h, w, c = self.shape
        return t * h * w * c

    def frame_size(self, height: int, width: int) -> Tuple[int, int]:
        """The (H, W) a decoded frame of `height x width` has after resizing."""
        if self.resize is not None:
            return self.resize
        if self.short_side is not None:
            scale = self.short_side / min(height, width)
            # Round to the nearest even size: codecs and chroma planes prefer it.
            h = max(2, int(round(height * scale / 2)) * 2)
            w = max(2, int(round(width * scale / 2)) * 2)
            if height <= width:
                h = self.short_side
            else:
                w = self.short_side
            return (h, w)
        return (height, width)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.pixel_format == pixels_lib.DEFAULT:
            del d["pixels"]  # the default: specs written before the field existed read back equal
        if d["resize"] is not None:
            d["resize"] = list(d["resize"])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "PatchSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Invalid PatchSpec: unknown keys {sorted(unknown)}. Expected only {sorted(known)}.")
        d = dict(d)
        if d.get("resize") is not None:
            d["resize"] = tuple(d["resize"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "PatchSpec":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_strings(cls, patch: str, stride: Optional[str] = None, **kwargs) -> "PatchSpec":
        """Builds a spec from CLI strings: patch='8x64x64', stride='4x32x32'."""
        t, h, w = parse_triple(patch, "patch")
        st = parse_triple(stride, "stride") if stride else (None, None, None)
        return cls(frames=t, height=h, width=w, stride_frames=st[0], stride_height=st[1],
                   stride_width=st[2], **kwargs)

    def describe(self) -> str:
        stride = "x".join(map(str, self.stride))
        text = f"patch {self.frames}x{self.height}x{self.width}, stride {stride}, pad {self.pad}"
        if self.fps:
            text += f", {self.fps:g} fps"
        if self.resize:
            text += f", resize {self.resize[0]}x{self.resize[1]}"
        if self.short_side:
            text += f", short side {self.short_side}"
        if self.pixel_format != pixels_lib.DEFAULT:
            text += f", pixels {self.pixels}"
        return text
