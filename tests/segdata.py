"""Test data for segmentation, made from real footage: camouflaged moving objects with known masks, and
videos whose content changes at known times.

Camouflage: the background is a still crop of a real frame; the object is a disk
textured with another crop of the same frame, its edge feathered over a few
pixels so no seam marks it. A single frame shows real texture everywhere; only
the disk's motion (its texture moves with it, the background does not) tells
where it is. A per-frame 2D model cannot find it; a spacetime model can.
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


def camouflage_video(background: np.ndarray, texture: np.ndarray, frames: int, rng,
                     radius: float = 7.0, speed: float = 1.5, feather: float = 2.5) -> Tuple[np.ndarray, np.ndarray]:
    """A disk textured with `texture` gliding over a still `background` (both float [S, S, 3]).

    Returns `(uint8 [T, S, S, 3] frames, uint8 [T, S, S] mask)` (1 = the disk's pixels, alpha >= 0.5).
    The texture moves with the disk, wrapping around.
    """
    size = background.shape[0]
    angle = rng.uniform(0, 2 * np.pi)
    velocity = speed * np.array([np.sin(angle), np.cos(angle)])
    start = rng.uniform(radius + 2, size - radius - 2, size=2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    video = np.empty((frames, size, size, 3), np.uint8)
    mask = np.empty((frames, size, size), np.uint8)
    for t in range(frames):
        cy, cx = start + velocity * t
        # Bounce off the borders so the disk stays whole in the frame.
        cy = radius + abs((cy - radius) % (2 * (size - 2 * radius)) - (size - 2 * radius))
        cx = radius + abs((cx - radius) % (2 * (size - 2 * radius)) - (size - 2 * radius))
        alpha = np.clip((radius - np.hypot(yy - cy, xx - cx)) / feather + 0.5, 0.0, 1.0)[..., None]
        shifted = np.roll(texture, (int(round(cy - start[0])), int(round(cx - start[1]))), axis=(0, 1))
        video[t] = np.clip(alpha * shifted + (1 - alpha) * background, 0, 255).round().astype(np.uint8)
        mask[t] = (alpha[..., 0] >= 0.5).astype(np.uint8)
    return video, mask


def write_camouflage_source(root: str, samples: Sequence[str], videos: int, frames: int = 16, size: int = 32,
                            seed: int = 0, val_every: int = 4) -> str:
    """Writes `videos` camouflage videos (lossless) and their masks, alternately as a lossless mask video and
    as a folder of PNGs, and a CSV `path,mask,split` (every `val_every`-th video in 'val'); returns the CSV path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = [f for path in samples for f in real_frames(path, 6)]
    os.makedirs(root, exist_ok=True)
    rows = []
    for i in range(videos):
        frame = pool[int(rng.integers(len(pool)))]
        video, mask = camouflage_video(_crop(frame, size, rng), _crop(frame, size, rng), frames, rng)
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
