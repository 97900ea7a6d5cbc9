"""Label-free agreement between a model and a baseline on the same images.

No ground truth needed: it says how far a quantized or ported model drifts from its reference, which is
the number to watch when the annotation set is small and AP differences are within noise. Detections are
matched greedily (baseline by descending score, each to the unmatched same-class candidate of highest
IoU >= ``iou_threshold``). Counts and errors cover detections scoring at least ``min_score`` (the long
tail of a top-100 list reorders under any perturbation and would drown the signal), but partners may
score down to a lower ``floor``, so a detection sliding from 0.31 to 0.29 is drift, not a miss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from centernet_edge.runtime.detections import Detections, box_iou
from centernet_edge.runtime.postprocess import heatmap_probabilities

__all__ = [
    "AgreementAccumulator",
    "AgreementStats",
    "MatchResult",
    "heatmap_probabilities",
    "match_detections",
]


@dataclass
class MatchResult:
    """Greedy pairs between the two detection lists of one image (both cut at ``floor``).

    Counts and errors consider only detections scoring at least ``min_score``; the lower ``floor`` lets
    a confident detection find its partner just below the threshold (0.31 vs 0.29 is agreement).
    """

    pairs: list[tuple[int, int]]
    ious: np.ndarray  # per pair
    base_scores: np.ndarray
    other_scores: np.ndarray
    min_score: float

    def _matched(self) -> tuple[np.ndarray, np.ndarray]:
        base = np.zeros(len(self.base_scores), dtype=bool)
        other = np.zeros(len(self.other_scores), dtype=bool)
        for i, j in self.pairs:
            base[i] = other[j] = True
        return base, other

    def _confident_pairs(self) -> np.ndarray:
        return np.array([self.base_scores[i] >= self.min_score or self.other_scores[j] >= self.min_score
                         for i, j in self.pairs], dtype=bool)

    @property
    def n_base(self) -> int:
        return int((self.base_scores >= self.min_score).sum())

    @property
    def n_other(self) -> int:
        return int((self.other_scores >= self.min_score).sum())

    @property
    def base_matched(self) -> int:
        """Confident baseline detections the model reproduced (at any score >= floor)."""
        return int((self._matched()[0] & (self.base_scores >= self.min_score)).sum())

    @property
    def other_matched(self) -> int:
        return int((self._matched()[1] & (self.other_scores >= self.min_score)).sum())

    @property
    def pair_ious(self) -> np.ndarray:
        return self.ious[self._confident_pairs()] if self.pairs else np.zeros(0)

    @property
    def score_errors(self) -> np.ndarray:
        """|score_other - score_base| of the pairs where either side is confident."""
        if not self.pairs:
            return np.zeros(0)
        errors = np.array([abs(self.other_scores[j] - self.base_scores[i]) for i, j in self.pairs])
        return errors[self._confident_pairs()]

    @property
    def disagreement(self) -> float:
        """Score mass that does not agree: confident misses on either side plus score drift of pairs."""
        base, other = self._matched()
        missed = self.base_scores[~base & (self.base_scores >= self.min_score)].sum()
        extra = self.other_scores[~other & (self.other_scores >= self.min_score)].sum()
        return float(missed + extra + self.score_errors.sum())


def _filtered(dets: Detections, min_score: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scores = np.asarray(dets.scores, dtype=np.float64).reshape(-1)
    keep = scores >= min_score
    return (np.asarray(dets.boxes, dtype=np.float64).reshape(-1, 4)[keep], scores[keep],
            np.asarray(dets.labels, dtype=np.int64).reshape(-1)[keep])


def match_detections(
    base: Detections,
    other: Detections,
    iou_threshold: float = 0.5,
    min_score: float = 0.3,
    floor: float | None = None,
) -> MatchResult:
    """Greedy same-class matching of ``other`` onto ``base`` (see module docstring).

    ``floor`` (default ``min_score / 3``) is the lowest score that can serve as a partner.
    """
    floor = min_score / 3.0 if floor is None else min(floor, min_score)
    b_boxes, b_scores, b_labels = _filtered(base, floor)
    o_boxes, o_scores, o_labels = _filtered(other, floor)
    ious = box_iou(b_boxes, o_boxes)
    ious[b_labels[:, None] != o_labels[None, :]] = -1.0
    taken = np.zeros(len(o_boxes), dtype=bool)
    pairs: list[tuple[int, int]] = []
    for i in np.argsort(-b_scores, kind="stable"):
        if not len(o_boxes):
            break
        row = np.where(taken, -1.0, ious[i])
        j = int(np.argmax(row))
        if row[j] >= iou_threshold:
            taken[j] = True
            pairs.append((int(i), j))
    pair_ious = np.array([ious[i, j] for i, j in pairs], dtype=np.float64)
    return MatchResult(pairs, pair_ious, b_scores, o_scores, min_score)



@dataclass
class AgreementStats:
    """Agreement of one model with the baseline, over all images seen."""

    iou_threshold: float
    min_score: float
    images: int = 0
    base_detections: int = 0  # baseline detections >= min_score
    other_detections: int = 0  # the model's detections >= min_score
    base_matched: int = 0
    other_matched: int = 0
    mean_iou: float | None = None
    mean_score_error: float | None = None
    max_score_error: float | None = None
    heatmap_mae: float | None = None
    heatmap_max_error: float | None = None
    heatmap_images: int = 0
    note: str = ""

    @property
    def recall(self) -> float | None:
        """Share of confident baseline detections the model reproduced."""
        return self.base_matched / self.base_detections if self.base_detections else None

    @property
    def precision(self) -> float | None:
        """Share of the model's confident detections that the baseline also has."""
        return self.other_matched / self.other_detections if self.other_detections else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "recall": self.recall, "precision": self.precision}


@dataclass
class AgreementAccumulator:
    """Feeds one image at a time, so heatmaps are compared and dropped instead of kept for the dataset."""

    iou_threshold: float = 0.5
    min_score: float = 0.3
    per_image: dict[int, float] = field(default_factory=dict)  # image id -> disagreement
    _ious: list[np.ndarray] = field(default_factory=list)
    _errors: list[np.ndarray] = field(default_factory=list)
    _counts: np.ndarray = field(default_factory=lambda: np.zeros(4, dtype=np.int64))
    _heat_abs_sum: float = 0.0
    _heat_count: int = 0
    _heat_max: float = 0.0
    _heat_images: int = 0
    _heat_skipped: str = ""

    def add(
        self,
        image_id: int,
        base: Detections,
        other: Detections,
        base_heat: np.ndarray | None = None,
        other_heat: np.ndarray | None = None,
    ) -> MatchResult:
        result = match_detections(base, other, self.iou_threshold, self.min_score)
        self.per_image[int(image_id)] = result.disagreement
        self._ious.append(result.pair_ious)
        self._errors.append(result.score_errors)
        self._counts += (result.n_base, result.n_other, result.base_matched, result.other_matched)
        if base_heat is not None and other_heat is not None:
            if base_heat.shape != other_heat.shape:
                self._heat_skipped = f"heatmap shapes differ ({base_heat.shape} vs {other_heat.shape})"
            else:
                diff = np.abs(base_heat.astype(np.float64) - other_heat.astype(np.float64))
                self._heat_abs_sum += float(diff.sum())
                self._heat_count += diff.size
                self._heat_max = max(self._heat_max, float(diff.max(initial=0.0)))
                self._heat_images += 1
        return result

    def result(self, note: str = "") -> AgreementStats:
        ious = np.concatenate(self._ious) if self._ious else np.zeros(0)
        errors = np.concatenate(self._errors) if self._errors else np.zeros(0)
        notes = [n for n in (note, self._heat_skipped) if n]
        n_base, n_other, base_matched, other_matched = (int(c) for c in self._counts)
        return AgreementStats(
            iou_threshold=self.iou_threshold,
            min_score=self.min_score,
            images=len(self.per_image),
            base_detections=n_base,
            other_detections=n_other,
            base_matched=base_matched,
            other_matched=other_matched,
            mean_iou=float(ious.mean()) if ious.size else None,
            mean_score_error=float(errors.mean()) if errors.size else None,
            max_score_error=float(errors.max()) if errors.size else None,
            heatmap_mae=self._heat_abs_sum / self._heat_count if self._heat_count else None,
            heatmap_max_error=self._heat_max if self._heat_count else None,
            heatmap_images=self._heat_images,
            note="; ".join(notes),
        )

    def most_disagreeing(self, count: int) -> list[int]:
        """Image ids with the largest disagreement (ties: lower id first); images in full agreement never."""
        ranked = sorted(self.per_image.items(), key=lambda kv: (-kv[1], kv[0]))
        return [image_id for image_id, score in ranked[:count] if score > 0.0]
