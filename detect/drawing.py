"""Boxes, class names and scores drawn onto a BGR image (OpenCV only, so video frames stay cheap)."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import cv2
import numpy as np

from centernet_edge.runtime.detections import Detections

__all__ = ["class_color", "draw_detections"]


def class_color(index: int) -> tuple[int, int, int]:
    """A BGR colour per class: hues spaced by the golden ratio, so neighbouring classes differ."""
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def draw_detections(image: np.ndarray, dets: Detections, class_names: Sequence[str]) -> np.ndarray:
    """A copy of ``image`` with each detection's box and a "name score" label; lowest score drawn first so
    the best boxes stay on top."""
    canvas = image.copy()
    h, w = canvas.shape[:2]
    thickness = max(1, round(min(h, w) / 300))
    font_scale = max(0.35, min(h, w) / 1000)
    for i in np.argsort(dets.scores, kind="stable"):
        label = int(dets.labels[i])
        x1, y1, x2, y2 = (int(round(float(v))) for v in np.clip(dets.boxes[i], 0, [w - 1, h - 1, w - 1, h - 1]))
        color = class_color(label)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness, cv2.LINE_AA)
        name = class_names[label] if 0 <= label < len(class_names) else f"class {label}"
        text = f"{name} {float(dets.scores[i]):.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        # Label above the box, or inside it when the box touches the top edge.
        top = y1 - th - base - 2 if y1 - th - base - 2 >= 0 else y1
        cv2.rectangle(canvas, (x1, top), (x1 + tw + 2, top + th + base + 2), color, -1)
        cv2.putText(canvas, text, (x1 + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return canvas
