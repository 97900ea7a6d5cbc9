"""Report figures (PNG): per-class AP deltas, PR curves, side-by-side disagreements.

Figures are built as bare ``matplotlib.figure.Figure`` objects and saved through the Agg renderer, never
through pyplot: no window, no global backend switch, nothing left open between calls.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from centernet_edge.runtime.detections import Detections

from .coco_eval import CocoMetrics
from .dataset import CocoDataset

__all__ = ["plot_disagreements", "plot_per_class_delta", "plot_pr_curves", "safe_name"]

_DPI = 110


def safe_name(label: str) -> str:
    """A label usable in a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "model"


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, format="png")
    return path


def plot_per_class_delta(
    base: CocoMetrics, other: CocoMetrics, names: Mapping[int, str], title: str, path: str | Path
) -> Path:
    """Horizontal bars of per-class AP (IoU .5:.95) change vs the baseline, worst at the top."""
    rows = [
        ((other.per_class_ap[cid] - base.per_class_ap[cid]) * 100.0, names.get(cid, str(cid)), cid)
        for cid in base.per_class_ap
        if base.per_class_ap[cid] is not None and other.per_class_ap.get(cid) is not None
    ]
    rows.sort(key=lambda r: (r[0], r[2]))
    deltas = np.array([r[0] for r in rows])
    labels = [r[1] for r in rows]
    fig = Figure(figsize=(8, max(3.0, 0.19 * len(rows) + 1.4)), layout="constrained")
    ax = fig.subplots()
    colors = np.where(deltas < 0, "#c0392b", "#27ae60")
    ax.barh(np.arange(len(rows)), deltas, color=colors, height=0.75)
    ax.set_yticks(np.arange(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()  # the largest drop first, where the eye starts
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("ΔAP (IoU .5:.95, points) vs baseline")
    mean = float(deltas.mean()) if len(deltas) else 0.0
    ax.set_title(f"{title}\nmean per-class ΔAP {mean:+.2f} over {len(rows)} classes", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    return _save(fig, Path(path))


def plot_pr_curves(metrics: Mapping[str, CocoMetrics], path: str | Path) -> Path:
    """Precision-recall curves (area all, 100 dets, mean over classes) for every model, overlaid."""
    recall = np.linspace(0.0, 1.0, 101)
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, title, stat in ((axes[0], "iou_50_95", "IoU .50:.95 (mean)", "AP"),
                                 (axes[1], "iou_50", "IoU .50", "AP50")):
        for label, m in metrics.items():
            curve = np.asarray(m.pr_curve.get(key, []), dtype=float)
            if curve.size == recall.size:
                ax.plot(recall, curve, linewidth=1.6, label=f"{label} ({stat} {m.stats[stat] * 100:.1f})")
        ax.set_title(title)
        ax.set_xlabel("recall")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[0].set_ylabel("precision (mean over classes)")
    return _save(fig, Path(path))


def _draw(ax: Axes, image_rgb: np.ndarray, boxes: np.ndarray, texts: Sequence[str], color: str,
          title: str) -> None:
    ax.imshow(image_rgb)
    for (x1, y1, x2, y2), text in zip(boxes, texts, strict=True):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.4))
        ax.text(x1, y1, text, fontsize=6, color="white", va="bottom",
                bbox={"facecolor": color, "alpha": 0.75, "pad": 1, "edgecolor": "none"})
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def plot_disagreements(
    dataset: CocoDataset,
    image_ids: Sequence[int],
    panels: Sequence[tuple[str, Mapping[int, Detections]]],
    class_names: Sequence[str],
    path: str | Path,
    min_score: float = 0.3,
) -> Path:
    """One row per image: ground truth, then each (title, detections) panel at score >= ``min_score``."""
    cats = dataset.category_names
    colors = ("#2980b9", "#e67e22", "#8e44ad", "#16a085")
    ncols = 1 + len(panels)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * len(image_ids)), layout="constrained")
    axes = fig.subplots(len(image_ids), ncols, squeeze=False)
    for r, image_id in enumerate(image_ids):
        rgb = dataset.load_image(image_id)[:, :, ::-1]
        anns = dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=[image_id], iscrowd=None))
        gt = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                       for a in anns]).reshape(-1, 4)
        _draw(axes[r, 0], rgb, gt, [cats.get(a["category_id"], "?") for a in anns], "#27ae60",
              f"image {image_id}: ground truth ({len(anns)})")
        for c, (title, detections) in enumerate(panels, start=1):
            dets = detections[image_id]
            keep = dets.scores >= min_score
            texts = [f"{class_names[int(lab)] if 0 <= lab < len(class_names) else lab} {s:.2f}"
                     for lab, s in zip(dets.labels[keep], dets.scores[keep], strict=True)]
            _draw(axes[r, c], rgb, dets.boxes[keep], texts, colors[(c - 1) % len(colors)],
                  f"{title} ({int(keep.sum())} >= {min_score})")
    return _save(fig, Path(path))
