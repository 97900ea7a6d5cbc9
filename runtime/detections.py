"""The per-image detection result every runtime and the evaluator exchange."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Detections", "box_iou"]


@dataclass
class Detections:
    """Detections of one image.

    boxes: (K, 4) float32 xyxy in original-image pixels (not clipped to the image, like upstream);
    scores: (K,) float32; labels: (K,) int64 0-based class index (not a COCO category id).
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        # Class indices may arrive as floats (a detections tensor row); round, don't truncate 2.9999 to 2.
        labels = np.asarray(self.labels)
        if labels.dtype.kind == "f":
            labels = np.rint(labels)
        self.labels = labels.astype(np.int64).reshape(-1)
        if not len(self.boxes) == len(self.scores) == len(self.labels):
            raise ValueError(
                f"boxes/scores/labels disagree in length: {len(self.boxes)}, {len(self.scores)}, "
                f"{len(self.labels)}"
            )

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def top(self, k: int) -> Detections:
        """The ``k`` highest-scoring detections, best first (stable: equal scores keep their order)."""
        order = np.argsort(-self.scores, kind="stable")[: max(int(k), 0)]
        return Detections(self.boxes[order], self.scores[order], self.labels[order])

    def clipped(self, height: int, width: int) -> Detections:
        """Boxes clipped to the image (x in [0, width], y in [0, height]), as scored by the evaluator."""
        boxes = self.boxes.copy()
        np.clip(boxes[:, 0::2], 0, width, out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0, height, out=boxes[:, 1::2])
        return Detections(boxes, self.scores, self.labels)

    def to_array(self) -> np.ndarray:
        """[K, 6] float32 rows (x1, y1, x2, y2, score, class_index) — the graph's detections layout."""
        return np.concatenate(
            [self.boxes, self.scores[:, None], self.labels[:, None].astype(np.float32)], axis=1
        ).astype(np.float32)

    @classmethod
    def from_array(cls, arr: np.ndarray) -> Detections:
        """Inverse of :meth:`to_array`; accepts [K, 6] (extra trailing columns are ignored)."""
        a = np.asarray(arr)
        if a.ndim != 2 or a.shape[1] < 6:
            raise ValueError(f"detections array must be [K, 6]; got shape {a.shape}")
        return cls(a[:, 0:4], a[:, 4], a[:, 5])


def box_iou(a: np.ndarray, b: np.ndarray, *, identical_degenerate: bool = False) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: (N, 4) x (M, 4) -> (N, M), in float64.

    Boxes with no area (untrained heads, clipping) have no IoU: 0, or 1 for an exactly identical pair
    when ``identical_degenerate`` (comparisons of one model with itself want that).
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    fallback = np.all(a[:, None, :] == b[None, :, :], axis=-1).astype(np.float64) if identical_degenerate else 0.0
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), fallback)
