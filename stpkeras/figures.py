"""Report stage: the PNG figures of a run (training curves, confusion matrix), drawn with Pillow.

Pillow is already a dependency; matplotlib would add a large one for two plots.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tfrecords_tools import outputs

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _font():
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, count: int = 5) -> List[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi - lo < 1e-12:
        hi = lo + 1.0
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _panel(draw: ImageDraw.ImageDraw, box, title: str, series: Dict[str, Sequence[float]], xs: Sequence[int]):
    left, top, right, bottom = box
    font = _font()
    draw.text((left, top - 18), title, fill="black", font=font)
    draw.rectangle(box, outline="black")
    values = [v for s in series.values() for v in s if v is not None and math.isfinite(v)]
    if not values or not xs:
        return
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 or 0.5
    lo, hi = lo - pad, hi + pad
    x_lo, x_hi = min(xs), max(max(xs), min(xs) + 1)

    def px(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top))

    for tick in _nice_ticks(lo, hi):
        _, y = px(x_lo, tick)
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((left - 50, y - 7), f"{tick:.3g}", fill="black", font=font)
    for tick in _nice_ticks(x_lo, x_hi):
        if float(tick).is_integer():
            x, _ = px(tick, lo)
            draw.line([(x, bottom), (x, bottom + 4)], fill="black")
            draw.text((x - 4, bottom + 6), f"{int(tick)}", fill="black", font=font)
    for i, (name, ys) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        points = [px(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        draw.text((right - 110, top + 6 + 15 * i), name, fill=color, font=font)


def draw_curves(history: Dict[str, List[float]], path: str) -> str:
    """One panel per metric (loss first), training and `val_` series together, epoch on x."""
    epochs = [int(e) + 1 for e in history.get("epoch", [])]
    names = [k for k in history if k != "epoch" and not k.startswith("val_") and k != "learning_rate"]
    names.sort(key=lambda k: (k != "loss", k))
    width, height = 460 * max(1, len(names)), 340
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for i, name in enumerate(names):
        series = {name: history[name]}
        if f"val_{name}" in history:
            series[f"val_{name}"] = history[f"val_{name}"]
        _panel(draw, (i * 460 + 70, 40, i * 460 + 440, height - 40), f"{name} per epoch", series, epochs)
    with outputs.atomic_file(path) as tmp:  # a reader (or a killed run) never sees half a PNG
        image.save(tmp)
    return path


def draw_confusion(matrix: np.ndarray, labels: Sequence[str], path: str, title: str = "confusion") -> str:
    """Rows are true classes, columns predicted; cells shaded by the row-normalised share, with counts."""
    matrix = np.asarray(matrix)
    n = len(labels)
    font = _font()
    cell = max(28, min(64, 640 // max(n, 1)))
    margin = 12 + 7 * max((len(str(l)) for l in labels), default=1)
    width, height = margin + n * cell + 20, margin + n * cell + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 4), f"{title} (rows: true, columns: predicted)", fill="black", font=font)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    top = 24 + margin - 12
    for i in range(n):
        draw.text((4, top + i * cell + cell // 2 - 7), str(labels[i]), fill="black", font=font)
        for j in range(n):
            shade = int(255 - 200 * share[i, j])
            x0, y0 = margin + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell, y0 + cell], fill=(shade, shade, 255), outline="gray")
            draw.text((x0 + 4, y0 + cell // 2 - 7), str(int(matrix[i, j])),
                      fill="white" if share[i, j] > 0.6 else "black", font=font)
    for j in range(n):
        draw.text((margin + j * cell + 2, top - 14), str(labels[j])[:cell // 7], fill="black", font=font)
    with outputs.atomic_file(path) as tmp:  # a reader (or a killed run) never sees half a PNG
        image.save(tmp)
    return path
