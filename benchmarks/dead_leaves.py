"""Synthetic clean videos with natural-image statistics, for restoration training that learns no one's content.

A dead-leaves scene (Matheron; used as a training prior for image restoration by Achddou et al., 2021): discs
and rectangles with a power-law size distribution (radius density ~ r^-3, scale invariant as natural images
are), occluding each other, some flat (as animation is), some with a 1/f texture (as camera footage's grain,
foliage and gravel are), each video optionally rendered at twice its size and reduced (soft edges) or blurred
(a camera's focus), and moving: every leaf at its depth's share of a camera pan plus a drift of its own, so the
codec meets occlusions, parallax and motion compensation as it does in footage. Written losslessly
(`libx264rgb`, qp 0); nothing of any real video is in them.

    python benchmarks/dead_leaves.py OUT_DIR [--videos 8] [--frames 64] [--size 256x320] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def pink_texture(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A [size, size] texture with a 1/f amplitude spectrum, unit standard deviation."""
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    f = np.hypot(fy, fx)
    f[0, 0] = 1.0
    spectrum = (rng.standard_normal((size, size)) + 1j * rng.standard_normal((size, size))) / f
    spectrum[0, 0] = 0.0
    tex = np.real(np.fft.ifft2(spectrum))
    return (tex / tex.std()).astype(np.float32)


def render(rng: np.random.Generator, frames: int, height: int, width: int) -> np.ndarray:
    """The video as `uint8 [frames, height, width, 3]` (a few MB: synthetic data of a chosen size)."""
    from scipy.ndimage import gaussian_filter

    scale = 2 if rng.random() < 0.5 else 1  # rendered at twice the size and reduced: soft, anti-aliased edges
    h, w = height * scale, width * scale
    pan = rng.uniform(-3, 3, size=2) * scale  # px a frame at the nearest depth
    margin = int(np.ceil(np.abs(pan).max() * frames)) + 1
    r_min, r_max = 2.0 * scale, 0.35 * min(h, w)
    # Radii with density ~ r^-alpha between r_min and r_max (inverse CDF): alpha 3 is scale invariant; below it
    # large flat leaves take more of the frame (as animation does). Enough leaves to cover the frame ~4 times.
    alpha = rng.uniform(2.4, 3.1)
    a, b = r_min ** (1 - alpha), r_max ** (1 - alpha)
    u = rng.random(200_000)
    radii = (a - u * (a - b)) ** (1 / (1 - alpha))
    count = int(np.searchsorted(np.cumsum(np.pi * radii ** 2), 4 * (h + 2 * margin) * (w + 2 * margin))) + 1
    radii = radii[:count]
    depth = rng.random(count)  # 0 far .. 1 near; painted far to near
    order = np.argsort(depth)
    radii, depth = radii[order], depth[order]
    cy = rng.uniform(-margin, h + margin, count)
    cx = rng.uniform(-margin, w + margin, count)
    drift = rng.normal(0, 0.5 * scale, size=(count, 2)) * (rng.random(count) < 0.3)[:, None]
    # Colours as footage has them: mostly low saturation, any brightness (HSV, then RGB).
    hue, sat, val = rng.random(count), rng.beta(1.5, 4.0, count), rng.uniform(0.08, 1.0, count)
    k = (np.array([5.0, 3.0, 1.0]) + hue[:, None] * 6) % 6
    colours = (255 * val[:, None] * (1 - sat[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1))).astype(np.float32)
    shade = rng.normal(0, 0.6, size=(count, 2)) * (rng.random(count) < 0.5)[:, None]  # grey levels a px
    rect = rng.random(count) < 0.3
    aspect = np.exp(rng.normal(0, 0.4, count))
    textures = [pink_texture(rng) for _ in range(4)]
    textured = rng.random(count) < 0.5
    amplitude = rng.uniform(5, 40, count)
    which = rng.integers(0, len(textures), count)
    blur = rng.choice([0.0, 0.0, 0.7, 1.2])
    grain = rng.choice([0.0, 0.0, 1.5, 3.0])
    video = np.empty((frames, height, width, 3), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for t in range(frames):
        canvas = np.empty((h, w, 3), np.float32)
        canvas[:] = colours[0]
        for i in range(count):
            speed = 0.2 + 0.8 * depth[i]
            y0 = cy[i] + t * (pan[0] * speed + drift[i, 0])
            x0 = cx[i] + t * (pan[1] * speed + drift[i, 1])
            ry, rx = radii[i] * aspect[i], radii[i] / aspect[i]
            top, bottom = int(max(0, y0 - ry)), int(min(h, y0 + ry + 1))
            left, right = int(max(0, x0 - rx)), int(min(w, x0 + rx + 1))
            if top >= bottom or left >= right:
                continue
            dy = yy[top:bottom, left:right] - y0
            dx = xx[top:bottom, left:right] - x0
            mask = (np.abs(dy) <= ry) & (np.abs(dx) <= rx) if rect[i] else (dy / ry) ** 2 + (dx / rx) ** 2 <= 1
            if not mask.any():
                continue
            patch = np.broadcast_to(colours[i], mask.shape + (3,))
            if shade[i].any():  # smooth shading across the leaf
                patch = patch + ((dy * shade[i, 0] + dx * shade[i, 1]) / scale)[..., None]
            if textured[i]:
                tex = textures[which[i]]
                n = tex.shape[0]
                ty = (np.round(dy).astype(int) + 7 * i) % n
                tx = (np.round(dx).astype(int) + 13 * i) % n
                patch = patch + amplitude[i] * tex[ty, tx][..., None]
            canvas[top:bottom, left:right][mask] = patch[mask]
        if scale == 2:
            canvas = canvas.reshape(height, 2, width, 2, 3).mean(axis=(1, 3))
        if blur:
            canvas = gaussian_filter(canvas, sigma=(blur, blur, 0))
        if grain:
            canvas = canvas + rng.normal(0, grain, canvas.shape)
        video[t] = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return video


def write_videos(out_dir: str, *, videos: int = 8, frames: int = 64, height: int = 256, width: int = 320,
                 seed: int = 0, fps: float = 25.0) -> List[str]:
    """Writes `leaves-SEED-K.mkv` (lossless) into `out_dir`; files already there are kept. Returns their paths."""
    from tfrecords_tools.outputs import atomic_file
    from tfrecords_tools.video import VideoWriter

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for k in range(videos):
        path = os.path.join(out_dir, f"leaves-{seed}-{k}.mkv")
        paths.append(path)
        if os.path.exists(path):
            continue
        video = render(np.random.default_rng([seed, k]), frames, height, width)
        with atomic_file(path) as partial:  # a failed write leaves no half video behind
            writer = VideoWriter(partial, fps, lossless=True)
            for frame in video:
                writer.write(frame)
            writer.close()
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", default="256x320", help="HxW")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.split("x"))
    for path in write_videos(args.out, videos=args.videos, frames=args.frames, height=height, width=width,
                             seed=args.seed):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
