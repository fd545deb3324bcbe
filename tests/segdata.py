"""Test data for segmentation, made from real footage: camouflaged moving objects with known masks, and
videos whose content changes at known times.

Camouflage: the background is a still crop of a real frame; the object is a disk
cut out of that background where it starts and carried across it (a
kinematogram with real texture). A single frame shows the same real texture
everywhere: frame 0 is the background itself, later frames hold a displaced
copy of a piece of it. Only the disk's motion (its texture moves with it, the
background does not) tells where it is. A per-frame 2D model cannot find it; a
spacetime model can.
"""

from __future__ import annotations

import csv
import os
from typing import List, Sequence, Tuple

import av
import numpy as np

from videos import write_video


def real_frames(path: str, count: int, step: int = 7) -> List[np.ndarray]:
    """`count` decoded RGB frames of a real video, every `step`-th (uint8 [H, W, 3])."""
    out = []
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % step == 0:
                out.append(frame.to_ndarray(format="rgb24"))
                if len(out) == count:
                    break
    return out


def _crop(frame: np.ndarray, size: int, rng) -> np.ndarray:
    """A random square crop of a real frame, resized to `size` x `size` (area averaging)."""
    from PIL import Image

    h, w = frame.shape[:2]
    side = int(rng.integers(min(h, w) // 3, min(h, w) // 2 + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return np.asarray(Image.fromarray(frame[y:y + side, x:x + side]).resize((size, size), Image.BOX), np.float32)


def camouflage_video(background: np.ndarray, frames: int, rng, radius: Tuple[float, float] = (7.0, 10.0),
                     speed: Tuple[float, float] = (1.5, 3.0), feather: float = 1.0) -> Tuple[np.ndarray, np.ndarray]:
    """A disk cut out of a still `background` (float [S, S, 3]) gliding over it:
    `(uint8 [T, S, S, 3], uint8 [T, S, S])`.

    The disk carries the background's pixels from where it started (integer
    shifts, so no resampling blur), so it is textured exactly like the
    background: frame 0 equals the background, and every later frame is the
    background with a displaced copy of a piece of itself. Its radius and
    speed (pixels per frame) are drawn from the given ranges; it bounces off the
    borders so it stays whole in the frame; its edge is antialiased over
    `feather` pixels. The mask is 1 where the disk covers a pixel (alpha >= 0.5).
    """
    size = background.shape[0]
    radius = float(rng.uniform(*radius))
    angle = rng.uniform(0, 2 * np.pi)
    velocity = rng.uniform(*speed) * np.array([np.sin(angle), np.cos(angle)])
    start = rng.uniform(radius + 1, size - radius - 1, size=2)
    room = size - 2 * radius
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    video = np.empty((frames, size, size, 3), np.uint8)
    mask = np.empty((frames, size, size), np.uint8)
    for t in range(frames):
        # Bounce off the borders: the position folds back into [radius, size - radius].
        cy, cx = radius + np.abs((start + velocity * t - radius) % (2 * room) - room)
        alpha = np.clip((radius - np.hypot(yy - cy, xx - cx)) / feather + 0.5, 0.0, 1.0)[..., None]
        # Under the disk, x - shift stays inside the starting disk: no wrapped seam shows.
        carried = np.roll(background, (int(round(cy - start[0])), int(round(cx - start[1]))), axis=(0, 1))
        video[t] = np.clip(alpha * carried + (1 - alpha) * background, 0, 255).round().astype(np.uint8)
        mask[t] = (alpha[..., 0] >= 0.5).astype(np.uint8)
    return video, mask


def camouflage_pool(samples: Sequence[str]) -> List[np.ndarray]:
    """The real frames backgrounds are cropped from: 6 frames of each sample video."""
    return [f for path in samples for f in real_frames(path, 6)]


def camouflage_clip(pool: Sequence[np.ndarray], frames: int, size: int, rng) -> Tuple[np.ndarray, np.ndarray]:
    """One camouflage video on a random crop of a random frame of `pool` (see `camouflage_video`)."""
    return camouflage_video(_crop(pool[int(rng.integers(len(pool)))], size, rng), frames, rng)


def write_camouflage_source(root: str, samples: Sequence[str], videos: int, frames: int = 16, size: int = 32,
                            seed: int = 0, val_every: int = 4) -> str:
    """Writes `videos` camouflage videos (lossless) and their masks, alternately as a lossless mask video and
    as a folder of PNGs, and a CSV `path,mask,split` (every `val_every`-th video in 'val'); returns the CSV path.

    `camouflage_clip(camouflage_pool(samples), frames, size, rng)` with
    `rng = np.random.default_rng(seed)`, called `videos` times, makes the same videos.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = camouflage_pool(samples)
    os.makedirs(root, exist_ok=True)
    rows = []
    for i in range(videos):
        video, mask = camouflage_clip(pool, frames, size, rng)
        name = f"v{i:03d}"
        write_video(os.path.join(root, name + ".mp4"), video, lossless=True)
        if i % 2:
            os.makedirs(os.path.join(root, name + "_mask"), exist_ok=True)
            for t, m in enumerate(mask):
                Image.fromarray(m).save(os.path.join(root, name + "_mask", f"{t:04d}.png"))
            mask_path = name + "_mask"
        else:
            mask_path = name + "_mask.mp4"
            write_video(os.path.join(root, mask_path), np.repeat(mask[..., None], 3, axis=-1), lossless=True)
        rows.append({"path": name + ".mp4", "mask": mask_path, "split": "val" if i % val_every == 0 else "train"})
    csv_path = os.path.join(root, "videos.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "mask", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def write_scene_changes(root: str, samples: Sequence[str], videos: int, size: int = 32, fps: float = 10.0,
                        seed: int = 0) -> str:
    """Videos that cut between the sample videos at known times, with an `intervals` CSV each.

    Each video is 3 to 4 segments of 6 to 14 frames, each from one sample video
    (its label: the sample's name); returns the CSV `path,intervals`.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = {os.path.splitext(os.path.basename(p))[0]: [
        np.asarray(Image.fromarray(f).resize((size, size), Image.BOX)) for f in real_frames(p, 40, step=2)]
        for p in samples}
    names = sorted(sources)
    os.makedirs(root, exist_ok=True)
    rows = []
    for i in range(videos):
        frames, intervals, t = [], [], 0
        previous = None
        for _ in range(int(rng.integers(3, 5))):
            label = names[int(rng.integers(len(names)))]
            while label == previous:
                label = names[int(rng.integers(len(names)))]
            previous = label
            length = int(rng.integers(6, 15))
            first = int(rng.integers(0, len(sources[label]) - length))
            frames.extend(sources[label][first:first + length])
            intervals.append((t / fps, (t + length) / fps, label))
            t += length
        name = f"scene{i:03d}"
        write_video(os.path.join(root, name + ".mp4"), np.stack(frames), fps=fps)
        with open(os.path.join(root, name + ".csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["start", "end", "label"])
            writer.writerows([(f"{a:.3f}", f"{b:.3f}", c) for a, b, c in intervals])
        rows.append({"path": name + ".mp4", "intervals": name + ".csv", "split": "val" if i % 4 == 0 else "train"})
    csv_path = os.path.join(root, "videos.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "intervals", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path
