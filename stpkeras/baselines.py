"""Baseline stage: classical video restorers to measure an enhancement model against (SciPy; OpenCV and
scikit-image optional).

Each baseline maps `uint8 [B, T, H, W, C]` patches to uint8 patches of the
same shape and has one parameter (a number or a tuple of them), picked per evaluation from a small grid
(`GRIDS`) on a few patches of the split being measured: an oracle choice
that favours the baseline, so a model's gain over it is not overstated. Which
ones run depends on the degradation (`for_degradations`): denoisers for noise, codecs and pairs,
sharpeners for blur, and a deblocker as well for codecs and paired data.

Denoisers:
- `gaussian3d`: SciPy's separable Gaussian filter over time and space, spatial
  sigma s and temporal sigma s/2 (edges mirrored);
- `median3`, `median5`: the temporal median over 3 or 5 frames (edges repeated);
- `nlmeans`: OpenCV's per-frame non-local means (`cv2.fastNlMeansDenoisingColored`,
  template 7, search 21), when `opencv-python-headless` is installed
  (`pip install 'stpkeras[baselines]'`).

Deblocker (`jpeg` and paired data, e.g. `stp convert --pairs h264:...`):
- `shifted_dct`: re-application of the block transform's quantizer (Nosratinia, "Enhancement of JPEG-compressed
  images by re-application of JPEG", 2001; FFmpeg's `spp` filter): every frame's 8x8 block DCT at 16
  shifts of the block grid (every second pixel each way), coefficients smaller than a threshold zeroed (the DC
  kept), transformed back and averaged over the shifts; per RGB channel; parameter: the threshold, in units of
  an orthonormal DCT of 0-255 pixels. On whole H.264 files FFmpeg's `spp` was the best of FFmpeg's
  post-filters (`benchmarks/codec_postfilters.py`); this is the same method on patches, so `stp evaluate`
  measures a restoration against it in the same run.

Sharpeners (`blur`, `motion`):
- `unsharp`: unsharp masking of every frame, `x + amount * (x - gaussian(x, radius))` (SciPy's Gaussian,
  edges mirrored); parameter (radius, amount);
- `wiener`: Wiener deconvolution of every frame by a Gaussian point-spread function
  (`skimage.restoration.wiener`, edges mirrored by twice the PSF's reach first); parameter (PSF sigma,
  balance), when `scikit-image` is installed (`pip install 'stpkeras[baselines]'`).
"""

from __future__ import annotations

import itertools
from typing import Callable, Dict, Sequence, Union

import numpy as np

Param = Union[float, tuple]

# Parameter grids: gaussian3d's spatial sigma in pixels; nlmeans' filter strength h; unsharp's (radius in
# pixels, amount); wiener's (PSF sigma in pixels, balance: the noise-to-signal ratio it assumes).
GRIDS: Dict[str, Sequence[Param]] = {
    "gaussian3d": (0.6, 0.8, 1.0, 1.3, 1.7, 2.2, 2.8), "median3": (3,), "median5": (5,),
    "nlmeans": (6.0, 9.0, 12.0, 15.0, 20.0),
    "unsharp": tuple(itertools.product((0.5, 0.7, 1.0, 1.5, 2.0, 3.0), (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0))),
    "wiener": tuple(itertools.product((0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5), (0.003, 0.01, 0.03, 0.1))),
    "shifted_dct": (2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0),
}
# Degradations a sharpener undoes; every other kind (and paired data) is measured against the denoisers.
BLURS = ("blur", "motion")
# Degradations (besides paired data, kinds `()`) that a deblocker undoes as well.
CODECS = ("jpeg",)


def gaussian3d(patches: np.ndarray, sigma: float) -> np.ndarray:
    """3D Gaussian: spatial `sigma`, temporal `sigma / 2` (frames change faster than pixels in motion)."""
    from scipy import ndimage

    # Kernels reach 3 sigma; "reflect" mirrors the edges (d c b a | a b c d).
    x = ndimage.gaussian_filter(patches.astype(np.float32), sigma=(0, sigma / 2.0, sigma, sigma, 0),
                                mode="reflect", truncate=3.0)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def temporal_median(patches: np.ndarray, window: int) -> np.ndarray:
    """Median over `window` frames centred on each frame (edge frames repeated)."""
    r = int(window) // 2
    padded = np.pad(patches, [(0, 0), (r, r), (0, 0), (0, 0), (0, 0)], mode="edge")
    t = patches.shape[1]
    stack = np.stack([padded[:, i:i + t] for i in range(2 * r + 1)], axis=0)
    return np.median(stack, axis=0).round().astype(np.uint8)


def nlmeans(patches: np.ndarray, h: float) -> np.ndarray:
    """OpenCV non-local means on every frame (RGB treated as colour; `h` for luma and chroma)."""
    import cv2

    out = np.empty_like(patches)
    for b in range(patches.shape[0]):
        for t in range(patches.shape[1]):
            out[b, t] = cv2.fastNlMeansDenoisingColored(np.ascontiguousarray(patches[b, t]), None, h, h, 7, 21)
    return out


def unsharp(patches: np.ndarray, param: Param) -> np.ndarray:
    """Unsharp masking of every frame: `x + amount * (x - gaussian(x, radius))`, spatial only."""
    from scipy import ndimage

    radius, amount = param
    x = patches.astype(np.float32)
    smooth = ndimage.gaussian_filter(x, sigma=(0, 0, radius, radius, 0), mode="reflect", truncate=3.0)
    return np.clip(np.rint(x + amount * (x - smooth)), 0, 255).astype(np.uint8)


def gaussian_psf(sigma: float) -> np.ndarray:
    """A normalised 2D Gaussian kernel reaching 3 sigma (at least 1 pixel)."""
    r = max(1, int(np.ceil(3 * sigma)))
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = np.outer(g, g)
    return k / k.sum()


def wiener(patches: np.ndarray, param: Param) -> np.ndarray:
    """Wiener deconvolution of every frame by a Gaussian PSF (`skimage.restoration.wiener`), per channel; the
    frames are mirrored by twice the PSF's reach first, so the FFT's wrap-around does not ring at the borders."""
    from skimage.restoration import wiener as skimage_wiener

    sigma, balance = param
    psf = gaussian_psf(sigma)
    r = psf.shape[0] // 2 * 2
    x = np.pad(patches.astype(np.float64) / 255.0, [(0, 0), (0, 0), (r, r), (r, r), (0, 0)], mode="reflect")
    # Every frame of every patch in one call: the PSF and the regulariser (the frame's Laplacian, as the
    # function's default is in 2D) have no extent in batch or time.
    laplacian = np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], np.float64)[None, None]
    out = np.empty_like(x)
    for c in range(x.shape[-1]):
        out[..., c] = skimage_wiener(x[..., c], psf[None, None], balance, reg=laplacian, clip=False)
    out = out[:, :, r:r + patches.shape[2], r:r + patches.shape[3]]
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def shifted_dct(patches: np.ndarray, threshold: float, block: int = 8, step: int = 2) -> np.ndarray:
    """Every frame's `block` x `block` DCT at each shift of the grid by `step` pixels, coefficients with
    |c| < `threshold` zeroed (the DC kept), back and averaged over the shifts (see the module's docstring):
    `stpkeras.models.layers.block_shrink`, the enhancers' deblocking stage, on uint8 patches."""
    from stpkeras.models.layers import block_shrink

    out = block_shrink(patches.astype(np.float32), threshold, block=block, step=step).numpy()
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def param_text(param: Param) -> str:
    """A parameter as the CLI prints it: `1.7`, `(1.5, 0.01)` -> `1.5,0.01`."""
    if isinstance(param, (tuple, list)):
        return ",".join(f"{p:g}" for p in param)
    return f"{param:g}"


def tune(name: str, degraded: np.ndarray, clean: np.ndarray, chunk: int = 32) -> Param:
    """The parameter of `GRIDS[name]` whose output has the best mean PSNR against `clean` (the oracle choice
    `stp evaluate` makes on a few hundred patches of the split it measures). The baseline runs on `chunk`
    patches at a time: Wiener's float64 FFTs of 256 patches of 8x64x64 would hold about a gigabyte."""
    from stpkeras.quality import psnr

    fn = {**DENOISERS, **SHARPENERS, **DEBLOCKERS}[name]

    def score(param) -> float:
        return float(np.mean(np.concatenate([np.asarray(psnr(fn(degraded[i:i + chunk], param), clean[i:i + chunk]))
                                             for i in range(0, len(degraded), chunk)])))

    scores = {p: score(p) for p in GRIDS[name]}
    return max(scores, key=scores.get)


def has_skimage() -> bool:
    try:
        import skimage.restoration  # noqa: F401
    except ImportError:
        return False
    return True


def has_opencv() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


DENOISERS = {"gaussian3d": gaussian3d, "median3": temporal_median, "median5": temporal_median, "nlmeans": nlmeans}
SHARPENERS = {"unsharp": unsharp, "wiener": wiener}
DEBLOCKERS = {"shifted_dct": shifted_dct}
# The baselines that need an optional package: the check, and the package.
_NEEDS = {"nlmeans": (has_opencv, "opencv-python-headless"), "wiener": (has_skimage, "scikit-image")}


def _wanted(kinds: Sequence[str]) -> Dict[str, Callable[[np.ndarray, Param], np.ndarray]]:
    """The sharpeners where every kind is a blur, the denoisers otherwise (noise, a codec, pairs: `()`), both
    where blur comes with noise, and the deblocker for a codec or pairs; whether or not their packages are
    installed."""
    blur = [k for k in kinds if k in BLURS]
    found = {} if blur and len(blur) == len(kinds) else dict(DENOISERS)
    if blur:
        found.update(SHARPENERS)
    if not kinds or any(k in CODECS for k in kinds):
        found.update(DEBLOCKERS)
    return found


def _installed(name: str) -> bool:
    return name not in _NEEDS or _NEEDS[name][0]()


def available() -> Dict[str, Callable[[np.ndarray, Param], np.ndarray]]:
    """The denoisers this installation can run, by name."""
    return {name: fn for name, fn in DENOISERS.items() if _installed(name)}


def for_degradations(kinds: Sequence[str]) -> Dict[str, Callable[[np.ndarray, Param], np.ndarray]]:
    """The baselines this installation can run against degradations of `kinds` (e.g. `("blur",)`; `_wanted`)."""
    return {name: fn for name, fn in _wanted(kinds).items() if _installed(name)}


def missing(kinds: Sequence[str]) -> Dict[str, str]:
    """The baselines `for_degradations(kinds)` leaves out for want of a package, and which one."""
    return {name: f"needs {_NEEDS[name][1]} (pip install 'stpkeras[baselines]')"
            for name in _wanted(kinds) if not _installed(name)}
