"""The report's figures: Matplotlib plots of the batch and images drawn over the film.

Plots are drawn on Matplotlib's Agg canvas with its bundled DejaVu fonts and returned as
PNG ``data:`` URIs; drawings on the film (boxes, heat maps) use OpenCV and return pixels.
Nothing here reads a file or runs a model.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from kneepipe import KL_GRADES
from kneepipe.joints import STATUS_OK

SIDE_COLOURS = {"R": (255, 140, 0), "L": (0, 200, 255)}  # BGR: blue-ish right, amber left


def figure_uri(figure) -> str:
    """A Matplotlib figure as a PNG ``data:`` URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def grade_distribution_plot(predicted: Sequence[int], true: Sequence[int] | None = None) -> str:
    """Bars of the predicted (and true) knees per KL grade, side by side."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.6, 3.0))
    axes = figure.add_subplot()
    x = np.arange(len(KL_GRADES))
    width = 0.4 if true is not None else 0.6
    offset = width / 2 if true is not None else 0.0
    bars = axes.bar(x - offset, predicted, width, label="predicted", color="#3a78c2")
    axes.bar_label(bars, fontsize=8)
    if true is not None:
        bars = axes.bar(x + offset, true, width, label="true", color="#9aa5b1")
        axes.bar_label(bars, fontsize=8)
        axes.legend(frameon=False, fontsize=9)
    axes.set_xticks(x, [f"KL{g}" for g in KL_GRADES])
    axes.set_ylabel("knees")
    axes.set_title("Grade distribution", fontsize=11)
    axes.spines[["top", "right"]].set_visible(False)
    axes.margins(y=0.15)
    return figure_uri(figure)


def group_distribution_plot(groups: dict[str, dict[str, Any]]) -> str:
    """Share of knees per predicted KL grade in each file-name group."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.6, 3.0))
    axes = figure.add_subplot()
    x = np.arange(len(KL_GRADES))
    width = 0.8 / max(1, len(groups))
    colours = ["#3a78c2", "#c2553a", "#4a9a5b", "#8a63b8", "#b89a3a"]
    for i, (group, tally) in enumerate(groups.items()):
        counts = np.asarray(tally["grade_counts"], dtype=float)
        share = counts / counts.sum() if counts.sum() else counts
        axes.bar(
            x - 0.4 + width * (i + 0.5),
            share,
            width,
            label=f"{group} ({int(counts.sum())} knees)",
            color=colours[i % len(colours)],
        )
    axes.set_xticks(x, [f"KL{g}" for g in KL_GRADES])
    axes.set_ylabel("share of knees")
    axes.set_title("Predicted grade distribution per group", fontsize=11)
    axes.legend(frameon=False, fontsize=8)
    axes.spines[["top", "right"]].set_visible(False)
    return figure_uri(figure)


def confusion_plot(metrics: dict[str, Any]) -> str:
    """Confusion matrix (true rows, predicted columns) with the detection failures as a last column."""
    from matplotlib.figure import Figure

    matrix = np.asarray(metrics["confusion_matrix"], dtype=int)
    failures = np.asarray(metrics["failures_by_true_grade"], dtype=int)[:, None]
    full = np.hstack([matrix, failures])
    figure = Figure(figsize=(5.2, 4.0))
    axes = figure.add_subplot()
    shown = full / np.maximum(full.sum(axis=1, keepdims=True), 1)
    axes.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(full):
        colour = "white" if shown[i, j] > 0.5 else "black"
        axes.text(j, i, str(value), ha="center", va="center", fontsize=9, color=colour)
    axes.set_xticks(range(full.shape[1]), [f"KL{g}" for g in KL_GRADES] + ["missed /\nwrong side"], fontsize=8)
    axes.set_yticks(range(full.shape[0]), [f"KL{g}" for g in KL_GRADES], fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title("Confusion matrix (row-normalised colour)", fontsize=11)
    return figure_uri(figure)


def gradcam_overlay(crop: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """A heat map blended over its gray crop (red where the grader looked hardest)."""
    heat8 = np.clip(heat * 255, 0, 255).astype(np.uint8)
    coloured = cv2.applyColorMap(heat8, cv2.COLORMAP_JET)
    base = cv2.cvtColor(crop, cv2.COLOR_GRAY2BGR)
    return cv2.addWeighted(base, 0.55, coloured, 0.45, 0)


def annotated_thumbnail(thumbnail: np.ndarray, scale: float, knees: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The radiograph thumbnail with each joint's box, side and grade drawn on it."""
    image = cv2.cvtColor(thumbnail, cv2.COLOR_GRAY2BGR)
    thickness = max(2, round(max(image.shape[:2]) / 300))
    font_scale = max(0.5, max(image.shape[:2]) / 900)
    for knee in knees:
        x1, y1, x2, y2 = (round(v * scale) for v in knee["box"])
        colour = SIDE_COLOURS.get(knee["side"], (0, 255, 0))
        cv2.rectangle(image, (x1, y1), (x2, y2), colour, thickness)
        grade = f"KL{knee['kl_grade']}" if knee["status"] == STATUS_OK else "error"
        label = f"{knee['side']} {grade}"
        (width, height), baseline = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        top = y1 - height - baseline - 4 if y1 - height - baseline - 4 > 0 else y1 + 2
        left = min(max(0, x1), max(0, image.shape[1] - width - 6))
        cv2.rectangle(image, (left, top), (left + width + 6, top + height + baseline + 4), colour, -1)
        cv2.putText(
            image,
            label,
            (left + 3, top + height + 2),
            cv2.FONT_HERSHEY_SIMPLEX,
            font_scale,
            (0, 0, 0),
            thickness,
            cv2.LINE_AA,
        )
    return image
