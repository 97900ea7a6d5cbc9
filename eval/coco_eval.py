"""COCO bbox evaluation with pycocotools, under the official CenterNet protocol.

Protocol (REFERENCE §5.1): no score threshold, at most 100 detections per image across classes (the
highest scoring), boxes as xywh in original pixels. Unlike upstream's ``convert_eval_format`` scores
are *not* rounded to 2 decimals: rounding creates ties whose order depends on the backend, which would
show up as a fake precision delta.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from centernet_edge.runtime.detections import Detections

__all__ = ["MAX_DETS", "STAT_NAMES", "CocoMetrics", "evaluate_coco", "to_coco_results"]

MAX_DETS = 100
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(
    detections: Mapping[int, Detections], category_ids: Sequence[int], max_dets: int = MAX_DETS
) -> list[dict[str, Any]]:
    """COCO result records (``image_id``, ``category_id``, xywh ``bbox``, ``score``) for each image.

    ``category_ids[label]`` is the annotation category of 0-based class index ``label``.
    """
    cat_lookup = np.asarray(category_ids, dtype=np.int64)
    records: list[dict[str, Any]] = []
    for image_id, dets in detections.items():
        scores = np.asarray(dets.scores, dtype=np.float64).reshape(-1)
        if scores.size == 0:
            continue
        labels = np.asarray(dets.labels, dtype=np.int64).reshape(-1)
        if labels.min() < 0 or labels.max() >= len(cat_lookup):
            bad = labels.max() if labels.max() >= len(cat_lookup) else labels.min()
            raise ValueError(f"image {image_id}: class index {bad} outside 0..{len(cat_lookup) - 1}")
        boxes = np.asarray(dets.boxes, dtype=np.float64).reshape(-1, 4)
        # Stable sort keeps the model's own order among equal scores.
        keep = np.argsort(-scores, kind="stable")[:max_dets]
        for i in keep:
            x1, y1, x2, y2 = boxes[i]
            records.append({
                "image_id": int(image_id),
                "category_id": int(cat_lookup[labels[i]]),
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "score": float(scores[i]),
            })
    return records


@dataclass
class CocoMetrics:
    """The 12 COCO stats (0..1), per-category AP (None where the category has no ground truth) and
    the precision-recall curves (101 recall points, area all, 100 dets) averaged over categories."""

    stats: dict[str, float]
    per_class_ap: dict[int, float | None]
    per_class_ap50: dict[int, float | None]
    pr_curve: dict[str, list[float]] = field(default_factory=dict)  # "iou_50_95", "iou_50"
    num_images: int = 0
    num_detections: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "stats": dict(self.stats),
            "per_class_ap": {str(k): v for k, v in self.per_class_ap.items()},
            "per_class_ap50": {str(k): v for k, v in self.per_class_ap50.items()},
            "pr_curve": {k: list(v) for k, v in self.pr_curve.items()},
            "num_images": self.num_images,
            "num_detections": self.num_detections,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CocoMetrics:
        return cls(
            stats={k: float(v) for k, v in data["stats"].items()},
            per_class_ap={int(k): v for k, v in data["per_class_ap"].items()},
            per_class_ap50={int(k): v for k, v in data["per_class_ap50"].items()},
            pr_curve={k: list(v) for k, v in data.get("pr_curve", {}).items()},
            num_images=int(data.get("num_images", 0)),
            num_detections=int(data.get("num_detections", 0)),
        )


def _masked_mean(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def _curve(precision: np.ndarray) -> list[float]:
    """precision[..., R, K] -> mean over everything but recall, ignoring -1 (no ground truth)."""
    moved = np.moveaxis(precision, -2, 0).reshape(precision.shape[-2], -1)
    out = []
    for row in moved:
        valid = row[row > -1]
        out.append(float(valid.mean()) if valid.size else float("nan"))
    return out


def _empty_dt(gt: Any) -> Any:
    from pycocotools.coco import COCO

    dt = COCO()
    dt.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                  "annotations": []}
    dt.createIndex()
    return dt


def evaluate_coco(gt: Any, results: list[dict[str, Any]], image_ids: Sequence[int]) -> CocoMetrics:
    """Score COCO result records against ``gt`` (a pycocotools COCO) on ``image_ids`` only."""
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary
        dt = gt.loadRes(results) if results else _empty_dt(gt)
        coco_eval = COCOeval(gt, dt, "bbox")
        coco_eval.params.imgIds = list(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    precision = coco_eval.eval["precision"]  # [T, R, K, A, M]; A=0 all areas, M=-1 maxDets=100
    cat_ids = list(coco_eval.params.catIds)
    per_class = {cid: _masked_mean(precision[:, :, k, 0, -1]) for k, cid in enumerate(cat_ids)}
    per_class50 = {cid: _masked_mean(precision[0, :, k, 0, -1]) for k, cid in enumerate(cat_ids)}
    stats = {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats, strict=True)}
    curves = {"iou_50_95": _curve(precision[:, :, :, 0, -1]), "iou_50": _curve(precision[0, :, :, 0, -1])}
    kept = set(image_ids)
    return CocoMetrics(
        stats=stats,
        per_class_ap=per_class,
        per_class_ap50=per_class50,
        pr_curve={k: [v if not math.isnan(v) else 0.0 for v in c] for k, c in curves.items()},
        num_images=len(kept),
        num_detections=sum(1 for r in results if r["image_id"] in kept),
    )
