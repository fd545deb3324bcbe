"""Report stage: the PNG figures of a run (training curves, confusion matrix), drawn with matplotlib.

Figures are made with matplotlib's object API on the Agg canvas (no pyplot, so no global figure
state and no display is needed), and the confusion matrix with scikit-learn's
`ConfusionMatrixDisplay`: the plots ML engineers read every day, with axis titles and legends.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from tfrecords_tools import outputs


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def draw_curves(history: Dict[str, List[float]], path: str) -> str:
    """One panel per metric (loss first), training and `val_` series together, epoch on x."""
    from matplotlib.ticker import MaxNLocator

    epochs = [int(e) + 1 for e in history.get("epoch", [])]
    names = [k for k in history if k != "epoch" and not k.startswith("val_") and k != "learning_rate"]
    names.sort(key=lambda k: (k != "loss", k))
    figure = _figure(4.6 * max(1, len(names)), 3.4)
    for i, name in enumerate(names):
        ax = figure.add_subplot(1, max(1, len(names)), i + 1)
        for series in (name, f"val_{name}"):
            if series in history:
                values = np.asarray(history[series], dtype=float)
                ax.plot(epochs[:len(values)], values, marker="o", markersize=3, label=series)
        ax.set_title(f"{name} per epoch")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    with outputs.atomic_file(path) as tmp:  # a reader (or a killed run) never sees half a PNG
        figure.savefig(tmp, format="png")
    return path


def draw_confusion(matrix: np.ndarray, labels: Sequence[str], path: str, title: str = "confusion") -> str:
    """Rows are true classes, columns predicted; each cell shows its count, shaded by the count."""
    from sklearn.metrics import ConfusionMatrixDisplay

    matrix = np.asarray(matrix)
    n = len(labels)
    side = max(3.5, min(12.0, 1.0 + 0.6 * n))
    figure = _figure(side + 1.0, side)
    ax = figure.add_subplot(1, 1, 1)
    display = ConfusionMatrixDisplay(confusion_matrix=matrix, display_labels=[str(label) for label in labels])
    display.plot(ax=ax, cmap="Blues", values_format="d", colorbar=True, xticks_rotation=45 if n > 4 else "horizontal")
    ax.set_title(title)
    with outputs.atomic_file(path) as tmp:  # a reader (or a killed run) never sees half a PNG
        figure.savefig(tmp, format="png")
    return path


def draw_reconstructions(original: np.ndarray, masked: np.ndarray, rebuilt: np.ndarray, path: str,
                         title: str = "") -> str:
    """A row per patch: its middle frame as it is, as the encoder saw it (hidden tubelets grey) and as the
    decoder rebuilt it. Inputs are float RGB in [0, 1], `[K, T, H, W, 3]`."""
    rows = len(original)
    figure = _figure(7.5, 2.4 * rows + 0.4)
    middle = original.shape[1] // 2
    for r in range(rows):
        columns = ((original, "input"), (masked, "masked input"), (rebuilt, "reconstruction"))
        for c, (images, name) in enumerate(columns):
            ax = figure.add_subplot(rows, 3, 3 * r + c + 1)
            ax.imshow(images[r, middle], vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name)
    if title:
        figure.suptitle(title)
    with outputs.atomic_file(path) as tmp:  # a reader (or a killed run) never sees half a PNG
        figure.savefig(tmp, format="png")
    return path


def draw_frame_strip(rows: Sequence[tuple], path: str, title: str = "", frame_numbers: Sequence[int] = ()) -> str:
    """Rows of frames side by side: `rows` holds `(name, uint8 [K, H, W, 3])` pairs (the same K frames of each
    video, e.g. a shaky input and its stabilized output), one row each, the name on the left; a thin grid
    of lines at fixed places shows how the picture moves against the frame."""
    count = len(rows[0][1])
    height, width = rows[0][1].shape[1:3]
    figure = _figure(1.6 * count + 0.6, 1.6 * height / width * len(rows) + 0.5)
    for r, (name, frames) in enumerate(rows):
        for c in range(count):
            ax = figure.add_subplot(len(rows), count, r * count + c + 1)
            ax.imshow(frames[c], interpolation="bilinear")
            for x in (width / 3, 2 * width / 3):
                ax.axvline(x, color="yellow", linewidth=0.5)
            for y in (height / 3, 2 * height / 3):
                ax.axhline(y, color="yellow", linewidth=0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0 and frame_numbers:
                ax.set_title(f"frame {frame_numbers[c]}", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    with outputs.atomic_file(path) as tmp:  # a reader (or a killed run) never sees half a PNG
        figure.savefig(tmp, format="png", dpi=80)  # small enough to keep in docs/
    return path
