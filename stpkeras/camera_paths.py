"""Path stage of stabilization: the steadiest camera path that a crop window leaves room for.

    steady = windowed_path(path, anchor, height, width, zoom=1 / 0.85)

After the L1-optimal path of Grundmann, Kwatra and Essa 2011 ("Auto-directed video stabilization with
robust L1 optimal camera paths"): among all paths whose corrections keep the zoomed output inside every
frame, the one with the least total squared velocity, |acceleration| and |jerk| (`WEIGHTS`), solved as one
linear programme (scipy's HiGHS; the square by its tangents). All three are counted relative to an anchor
path (the Gaussian-smoothed one): a pan that the Gaussian keeps costs nothing, so it is kept, and only
what the anchor path cannot do inside the window is traded off. The crop is chosen first and the path makes
the most of it, where a Gaussian's path decides the crop. `crop_zoom` is the smallest zoom a correction needs (what
`--crop auto` uses); `stpkeras.stabilize` imports from here, never the other way. The rotation's effect on the window is
linearised (|rotation x correction| is below a pixel for shakes of a few degrees and tens of pixels); the
rare excess is taken back by solving again in a window shrunk by it.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from stpkeras.shake import similarity
from tfrecords_tools.errors import BadInput

# velocity^2, |acceleration|, |jerk| per frame (pixels): Grundmann et al. weigh |velocity|, |acceleration|,
# |jerk| 10, 1, 100. The velocity is what a viewer sees as residual motion, and its square spreads a move
# that the window forces over more frames (a smaller RMS for the same distance); a jerk weight of 100 on top
# of it held the path's turns stiff enough to keep 0.30 px of RMS velocity where 10 left 0.25 and no path at
# all can go below 0.24 (docs/stabilization.md, the benchmark clip at vid.stab's cropping).
WEIGHTS = (10.0, 1.0, 10.0)
ANCHOR_WEIGHT = 0.01           # per pixel from the anchor path: breaks ties among equally steady paths
# v^2 >= 2 a |v| - a^2 at these a (pixels a frame; v counted from the anchor's velocity): the LP's slack for a
# velocity is v^2 to within 0.016 px^2 below 1 px a frame and 6% of it up to 8 px, and grows linearly beyond.
TANGENTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0)
STEERED = 3                    # x, y, rotation (log-scale is taken from the anchor)
MAX_ZOOM = 1.5                 # crop=auto zooms at most this much; borders may show on the frames that need more


class PathError(BadInput, ValueError):
    """No path fits the crop window (a zoom that leaves no room for the anchor's scale correction)."""


def inverse_maps(correction: np.ndarray, zoom: float):
    """Output -> input maps `(A [N, 2, 2], b [N, 2])` that move frame t's content by `correction[t]`
    (dx, dy, rotation, log-scale, about the centre) and zoom by `zoom`: p_in = e^-s R(-r) (p_out / zoom - d)."""
    c = np.asarray(correction, np.float64)
    a, _ = similarity(-c[:, 2], -c[:, 3], c[:, 0], c[:, 1], zoom=zoom)
    b = -zoom * np.einsum("nij,nj->ni", a, c[:, :2])
    return a, b


def crop_zoom(correction: np.ndarray, height: int, width: int, max_zoom: float = MAX_ZOOM) -> float:
    """The smallest zoom (<= `max_zoom`) at which every corrected frame covers the whole output."""
    half = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    corners = np.array([[-1, -1], [-1, 1], [1, -1], [1, 1]]) * half

    def covers(zoom):
        a, b = inverse_maps(correction, zoom)
        q = np.einsum("nij,kj->nki", a, corners) + b[:, None, :]
        return bool(np.all(np.abs(q) <= half + 1e-6))

    if covers(1.0):
        return 1.0
    if not covers(max_zoom):
        return float(max_zoom)
    lo, hi = 1.0, float(max_zoom)
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if covers(mid) else (mid, hi)
    return hi


def _differences(n: int, order: int):
    from scipy import sparse

    d = sparse.identity(n, format="csr")
    for _ in range(order):
        d = (d[1:] - d[:-1]).tocsr()
    return d


def window_constraints(path: np.ndarray, anchor: np.ndarray, height: int, width: int, zoom: float,
                       shrink: float = 0.0):
    """`(A, b)`, sparse `[16 N, 3 N]` and `[16 N]`: the path `P` (x, y pixels, rotation in pixels at the frame's
    edge, component-major) keeps the output inside every frame where `A P <= b`.

    Each output corner q (at the zoom), mapped back into frame t by the correction (d = P - path, r =
    rotation), stays inside the frame: |q_x - d_x + r q_y|, |q_y - d_y - r q_x| <= half the frame (times e^s,
    the anchor's scale correction; less `shrink` pixels), linear in P."""
    from scipy import sparse

    n = len(path)
    units = width / 2.0
    p = np.stack([path[:, 0], path[:, 1], path[:, 2] * units], 1)
    half = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    scale = np.exp(anchor[:, 3] - path[:, 3])
    t = np.arange(n)
    rows, bounds = [], []
    for qx, qy in np.array([[-1, -1], [-1, 1], [1, -1], [1, 1]]) * half / zoom:
        # x: -P_x + (q_y / u) P_r + (q_x + path_x - path_r q_y / u); y: -P_y - (q_x / u) P_r + (q_y + path_y +
        # path_r q_x / u), each within +-limit.
        for own, turn, base in ((0, qy / units, qx + p[:, 0] - p[:, 2] * qy / units),
                                (1, -qx / units, qy + p[:, 1] + p[:, 2] * qx / units)):
            coef = sparse.csr_matrix((np.r_[-np.ones(n), np.full(n, turn)],
                                      (np.r_[t, t], np.r_[own * n + t, 2 * n + t])), shape=(n, STEERED * n))
            limit = half[own] * scale - shrink
            rows += [coef, -coef]
            bounds += [limit - base, limit + base]
    return sparse.vstack(rows, format="csr"), np.concatenate(bounds)


def _solve(path: np.ndarray, anchor: np.ndarray, height: int, width: int, zoom: float, shrink: float,
           weights: Tuple[float, float, float], anchor_weight: float) -> np.ndarray:
    from scipy import sparse
    from scipy.optimize import linprog

    n = len(path)
    units = width / 2.0                        # rotation in pixels at the frame's edge, as the translations
    a = np.stack([anchor[:, 0], anchor[:, 1], anchor[:, 2] * units], 1)
    eye3 = sparse.identity(STEERED, format="csr")
    # Variables: the path (3n, component-major), then one slack per |difference| and per |path - anchor|.
    blocks = [sparse.kron(eye3, _differences(n, k), format="csr") for k in (1, 2, 3)]
    blocks.append(sparse.identity(STEERED * n, format="csr"))
    sizes = [b.shape[0] for b in blocks]
    total = STEERED * n + sum(sizes)
    cost = np.concatenate([np.zeros(STEERED * n)] + [np.full(s, w) for s, w in zip(sizes, (*weights, anchor_weight))])
    window, limits = window_constraints(path, anchor, height, width, zoom, shrink)
    rows = [sparse.hstack([window, sparse.csr_matrix((window.shape[0], total - STEERED * n))], format="csr")]
    bounds_hi = [limits]
    offset = STEERED * n
    for k, (block, size) in enumerate(zip(blocks, sizes)):
        slack = sparse.csr_matrix((np.ones(size), (np.arange(size), offset + np.arange(size))), shape=(size, total))
        lifted = sparse.hstack([block, sparse.csr_matrix((size, total - STEERED * n))], format="csr")
        target = block @ a.T.ravel()   # the anchor's differences: measured from the anchor, its pan costs nothing
        if k == 0:  # velocity: squared (see WEIGHTS)
            for tangent in TANGENTS:
                rows += [2 * tangent * lifted - slack, -2 * tangent * lifted - slack]
                bounds_hi += [tangent ** 2 + 2 * tangent * target, tangent ** 2 - 2 * tangent * target]
        else:
            rows += [lifted - slack, -lifted - slack]
            bounds_hi += [target, -target]
        offset += size
    result = linprog(cost, A_ub=sparse.vstack(rows, format="csr"), b_ub=np.concatenate(bounds_hi),
                     bounds=[(None, None)] * total, method="highs")
    if result.status != 0:
        raise PathError(f"no camera path fits a crop window of zoom {zoom:.3f} ({result.message}); expected a "
                        f"zoom that leaves room for the scale correction (at least "
                        f"{np.exp(np.max(path[:, 3] - anchor[:, 3])):.3f})")
    x = result.x[:STEERED * n].reshape(STEERED, n).T
    return np.stack([x[:, 0], x[:, 1], x[:, 2] / units, anchor[:, 3]], 1)


def windowed_path(path: np.ndarray, anchor: np.ndarray, height: int, width: int, zoom: float, *,
                  weights: Tuple[float, float, float] = WEIGHTS, anchor_weight: float = ANCHOR_WEIGHT) -> np.ndarray:
    """The steadiest path `float64 [N, 4]` (x, y pixels, rotation radians, log-scale) for the camera path
    `path [N, 4]` whose corrections keep an output zoomed by `zoom` inside every `height` x `width` frame.

    `anchor [N, 4]` (e.g. the Gaussian-smoothed path): its log-scale is taken as it is, velocity,
    acceleration and jerk are counted relative to its own, and among equally steady paths the LP picks the
    one nearest to it. Raises `PathError` where no path fits."""
    if zoom < 1.0:
        raise ValueError(f"Invalid value for argument `zoom`. Expected a value >= 1. Received zoom={zoom!r}")
    path, anchor = np.asarray(path, np.float64), np.asarray(anchor, np.float64)
    if path.shape != anchor.shape or path.ndim != 2 or path.shape[1] != 4:
        raise ValueError(f"Expected `path` and `anchor` of one shape [N, 4]. Received {path.shape} and {anchor.shape}")
    shrink = 0.0
    for _ in range(3):
        steady = _solve(path, anchor, height, width, zoom, shrink, weights, anchor_weight)
        needed = crop_zoom(steady - path, height, width, max_zoom=2 * zoom)
        if needed <= zoom * (1 + 1e-6):
            return steady
        # The linearised rotation let a corner out by this much (pixels at the frame's edge): shrink and again.
        shrink += (needed - zoom) / needed * max(height, width) / 2.0 + 0.05
    return steady
