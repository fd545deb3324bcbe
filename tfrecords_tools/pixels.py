"""Pixel-format stage: how a patch's pixels are laid out in records and in a model's input (numpy only).

Two formats, chosen at conversion (`stp convert --pixels`) and kept in the `PatchSpec`:

- `rgb` (the default): `uint8 [T, H, W, 3]`, 3 bytes a pixel.
- `yuv440`: the same patch as luma and chroma, 2 bytes a pixel, packed in one
  `uint8 [T, H/2, W, 4]` tensor: for each pair of rows and each column, the
  luma of the top row, the luma of the bottom row, then U and V averaged over
  the two rows (BT.601 full range, as JPEG). Chroma keeps the full horizontal
  resolution and half the vertical one (4:4:0), more colour than the 4:2:0 of
  the source videos and of JPEG frames, in two thirds of the bytes of RGB.

Why that layout: every stage of the input pipeline costs in proportion to the
bytes of a clip (the record's CRC, parsing, decoding, shuffling, the flip), and
packed this way a horizontal flip is still one reverse along the width axis
(each column keeps its own chroma) and a crop is still two gathers, with no
slicing of planes. The model turns the packed pixels back into RGB in its
first layer (`stpkeras.models.layers.Normalize`), on the accelerator.

Each format is a frozen `PixelFormat` (`PIXEL_FORMATS[name]`, `get(name)`)
that owns what it means: its stored shape, what it asks of a spec and of an
encoding, its packing (`to_record`) and unpacking (`to_rgb`), and whether its
stored pixels are aligned with the video's (what enhancement and segmentation
need). Only its name travels in JSON (`PatchSpec.pixels`, manifests, run.json,
exports); code compares formats through the object, never by name
(`tests/test_pixels.py` checks). The tensor side (the model's conversion to RGB,
the colour augmentation) is `stpkeras.pixel_formats`, keyed by the same names.

`to_record(spec, rgb)` is the one way pixels cut from a video become what a
record stores and a model takes; `to_rgb` inverts it (previews, tests).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple, Union

import numpy as np

# BT.601 full range (JFIF): rows give Y, U - 128, V - 128 from R, G, B.
RGB_TO_YUV = np.array([[0.299, 0.587, 0.114],
                       [-0.168736, -0.331264, 0.5],
                       [0.5, -0.418688, -0.081312]], np.float32)
# Its inverse, rows give R, G, B from Y, U - 128, V - 128 (the model's first layer uses the same numbers).
YUV_TO_RGB = np.array([[1.0, 0.0, 1.402],
                       [1.0, -0.344136, -0.714136],
                       [1.0, 1.772, 0.0]], np.float32)


def _uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def pack_yuv440(rgb: np.ndarray) -> np.ndarray:
    """`uint8 [..., H, W, 3]` RGB (H even) -> `uint8 [..., H/2, W, 4]` (Y top, Y bottom, U, V).

    In 16-bit fixed point (`RGB_TO_YUV` x 65536, each row's integers summing to
    65536 or 0), rounded half up: 1.1 ms for a 16x112x112 patch, against 3.6 ms for
    the same sums in float32 (conversion runs it on every patch).
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim < 3 or rgb.shape[-1] != 3 or rgb.shape[-3] % 2:
        raise ValueError(f"Expected uint8 RGB pixels [..., H, W, 3] with an even H. "
                         f"Received dtype={rgb.dtype}, shape={list(rgb.shape)}")
    *lead, height, width, _ = rgb.shape
    pairs = rgb.reshape(*lead, height // 2, 2, width, 3)
    r, g, b = (pairs[..., c].astype(np.int32) for c in range(3))        # [..., H/2, 2, W]
    luma = (19595 * r + 38470 * g + 7471 * b + (1 << 15)) >> 16
    r, g, b = (v[..., 0, :] + v[..., 1, :] for v in (r, g, b))           # the two rows summed
    out = np.empty((*lead, height // 2, width, 4), np.uint8)
    out[..., 0] = luma[..., 0, :]
    out[..., 1] = luma[..., 1, :]
    for channel, (cr, cg, cb) in ((2, (-11058, -21710, 32768)), (3, (32768, -27439, -5329))):
        c = (cr * r + cg * g + cb * b + (1 << 16)) >> 17
        c += 128
        out[..., channel] = np.clip(c, 0, 255, out=c)
    return out


def unpack_yuv440(packed: np.ndarray) -> np.ndarray:
    """Inverse of `pack_yuv440` (up to rounding and the averaged chroma): `[..., H/2, W, 4]` -> `[..., H, W, 3]`."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim < 3 or packed.shape[-1] != 4:
        raise ValueError(f"Expected packed yuv440 pixels uint8 [..., H/2, W, 4]. "
                         f"Received dtype={packed.dtype}, shape={list(packed.shape)}")
    x = packed.astype(np.float32)
    luma = np.moveaxis(x[..., :2], -1, -2)                           # [..., H/2, 2, W]
    luma = luma.reshape(*luma.shape[:-3], luma.shape[-3] * 2, luma.shape[-1])
    chroma = np.repeat(x[..., 2:] - 128.0, 2, axis=-3)               # [..., H, W, 2]
    yuv = np.concatenate([luma[..., None], chroma], axis=-1)
    return _uint8(yuv @ YUV_TO_RGB.T)


@dataclasses.dataclass(frozen=True)
class PixelFormat:
    """What one pixel format means. Subclasses give the packing; the fields give the rest.

    - `name`: the value in `PatchSpec.pixels` and in every JSON file.
    - `channels`: values a stored pixel has (the last axis of a record's patch).
    - `rows_per_row`: video rows one stored row holds. Stored columns are the
      video's columns in every format, so a flip (a reverse along the width) and
      a crop (gathers of stored rows and columns) need no per-format code; on a
      format with 2 rows a row, a crop moves by two video rows at a time.
    - `raw_only`: records hold raw bytes only (JPEG and PNG hold RGB frames).
    - `pixel_aligned`: a stored pixel is one pixel of the video, so a model's
      output can be aligned pixel for pixel with its input (enhancement,
      segmentation, targets cut from a clean video or a mask).
    """

    name: str
    channels: int
    rows_per_row: int = 1
    raw_only: bool = False
    pixel_aligned: bool = True

    def record_shape(self, frames: int, height: int, width: int) -> Tuple[int, int, int, int]:
        """The stored / model-input shape of a `frames x height x width` patch."""
        return (frames, height // self.rows_per_row, width, self.channels)

    def check_spec(self, spec) -> None:
        """Raises `ValueError` when a `PatchSpec`'s sizes do not fit the format."""

    def check_encoding(self, encoding: str) -> None:
        """Raises `ValueError` when records of this format cannot be stored with `encoding`."""
        if self.raw_only and encoding != "raw":
            raise ValueError(f"Invalid arguments: pixels={self.name!r} is stored raw (JPEG and PNG hold RGB "
                             f"frames). Received encoding={encoding!r}")

    def to_record(self, rgb: np.ndarray) -> np.ndarray:
        """RGB pixels cut from a video (`uint8 [..., T, H, W, 3]`) -> this format's layout."""
        raise NotImplementedError

    def to_rgb(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels in this format's layout -> `uint8 [..., T, H, W, 3]` RGB."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Rgb(PixelFormat):
    """`uint8 [T, H, W, 3]`, 3 bytes a pixel: what a video decodes to, stored as it is."""

    name: str = "rgb"
    channels: int = 3

    def to_record(self, rgb: np.ndarray) -> np.ndarray:
        return rgb

    def to_rgb(self, pixels: np.ndarray) -> np.ndarray:
        return pixels


@dataclasses.dataclass(frozen=True)
class Yuv440(PixelFormat):
    """`uint8 [T, H/2, W, 4]`, 2 bytes a pixel: `pack_yuv440` (the module docstring has the layout)."""

    name: str = "yuv440"
    channels: int = 4
    rows_per_row: int = 2
    raw_only: bool = True
    pixel_aligned: bool = False

    def check_spec(self, spec) -> None:
        if spec.height % self.rows_per_row:
            raise ValueError(f"Invalid value for argument `height`. Expected an even patch height with "
                             f"pixels={self.name!r} (chroma covers pairs of rows). Received height={spec.height!r}")

    def to_record(self, rgb: np.ndarray) -> np.ndarray:
        return pack_yuv440(rgb)

    def to_rgb(self, pixels: np.ndarray) -> np.ndarray:
        return unpack_yuv440(pixels)


RGB = Rgb()
YUV440 = Yuv440()
DEFAULT = RGB  # left out of a spec's JSON, so specs written before the field existed read back equal
PIXEL_FORMATS: Dict[str, PixelFormat] = {f.name: f for f in (RGB, YUV440)}


def get(pixels: Union[str, PixelFormat]) -> PixelFormat:
    """A format's name (or the format itself) -> its `PixelFormat`; `ValueError` for an unknown name."""
    if isinstance(pixels, PixelFormat):
        return pixels
    if isinstance(pixels, str) and pixels in PIXEL_FORMATS:
        return PIXEL_FORMATS[pixels]
    raise ValueError(f"Invalid value for argument `pixels`. Expected one of {tuple(PIXEL_FORMATS)}. "
                     f"Received pixels={pixels!r}")


def to_record(spec, rgb: np.ndarray) -> np.ndarray:
    """RGB pixels cut from a video (`uint8 [..., T, H, W, 3]`) -> the layout of `spec.pixels`."""
    return get(spec.pixels).to_record(rgb)


def to_rgb(spec, pixels: np.ndarray) -> np.ndarray:
    """Pixels as records store them -> `uint8 [..., T, H, W, 3]` RGB."""
    return get(spec.pixels).to_rgb(pixels)
