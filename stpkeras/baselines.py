"""Baseline stage: classical video denoisers to measure an enhancement model against (SciPy; OpenCV optional).

Each baseline maps `uint8 [B, T, H, W, C]` patches to uint8 patches of the
same shape and has one parameter, picked per evaluation from a small grid
(`GRIDS`) on a few patches of the split being measured: an oracle choice
that favours the baseline, so a model's gain over it is not overstated.

- `gaussian3d`: SciPy's separable Gaussian filter over time and space, spatial
  sigma s and temporal sigma s/2 (edges mirrored);
- `median3`, `median5`: the temporal median over 3 or 5 frames (edges repeated);
- `nlmeans`: OpenCV's per-frame non-local means (`cv2.fastNlMeansDenoisingColored`,
  template 7, search 21), when `opencv-python-headless` is installed
  (`pip install 'stpkeras[baselines]'`).
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

import numpy as np

# Parameter grids: gaussian3d's spatial sigma in pixels; nlmeans' filter strength h.
GRIDS: Dict[str, Sequence[float]] = {"gaussian3d": (0.6, 0.8, 1.0, 1.3, 1.7, 2.2, 2.8), "median3": (3,),
                                     "median5": (5,), "nlmeans": (6.0, 9.0, 12.0, 15.0, 20.0)}


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


def has_opencv() -> bool:
    try:
        import cv2  # noqa: F401
    except ImportError:
        return False
    return True


def available() -> Dict[str, Callable[[np.ndarray, float], np.ndarray]]:
    """The baselines this installation can run, by name."""
    found = {"gaussian3d": gaussian3d, "median3": temporal_median, "median5": temporal_median}
    if has_opencv():
        found["nlmeans"] = nlmeans
    return found
