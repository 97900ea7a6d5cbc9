"""Label-free error of a modified model's heads against the fp32 model on the same calibration images.

The quantization search may not look at annotations (accuracy is verified on images it never sees), so it
judges a candidate by how far its outputs drift from fp32:

* ``head_error`` (the number budgets and rankings use): ``1 - detection agreement``. For each fp32
  detection j (score s_j), m_j = best same-class candidate of IoU(b_j, b) * min(s_j, s)/max(s_j, s); the
  agreement is the score-weighted mean of m_j. It sees heatmap, box and score drift in one number in
  [0, 1], and weights confident detections (those that carry AP) most;
* ``peak_overlap``: share of the fp32 top-K heatmap peaks (after the 3x3 peak NMS) also in the
  candidate's top-K, and ``weighted_peak_recall`` (the same, weighted by fp32 peak score);
* ``heatmap_mse`` / ``heatmap_max_abs`` on the sigmoid heatmap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
import onnx

from centernet_edge.runtime.decode import local_max_mask
from centernet_edge.runtime.detections import Detections, box_iou
from centernet_edge.runtime.geometry import InputGeometry
from centernet_edge.runtime.onnx_session import create_session
from centernet_edge.runtime.postprocess import finalize, heatmap_probabilities
from centernet_edge.runtime.runners import run_by_role
from centernet_edge.runtime.spec import ModelSpec

from .parallel import map_ordered

__all__ = ["HeadError", "HeadProbe", "detection_agreement", "peak_indices", "significantly_lower"]

R = TypeVar("R")


@dataclass(frozen=True)
class HeadError:
    """Mean over images; ``head_error`` is what rankings and budgets use (lower is better)."""

    head_error: float
    detection_agreement: float
    peak_overlap: float | None
    weighted_peak_recall: float | None
    heatmap_mse: float | None
    heatmap_max_abs: float | None
    images: int
    # 1 - detection agreement of each probe image, in probe order (for paired comparisons; not reported).
    per_image: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def to_dict(self) -> dict[str, float | int | None]:
        data = asdict(self)
        data.pop("per_image")
        return data


def significantly_lower(after: HeadError, before: HeadError, z: float = 2.0) -> bool:
    """Whether ``after`` has a lower head error than ``before`` beyond the probe's sampling noise.

    The two were measured on the same probe images, so the per-image differences are paired: the mean
    improvement must exceed ``z`` standard errors of those differences (one-sided, about 98 % for z = 2).
    A change within that noise is no evidence either way, and the simpler model is kept."""
    if len(after.per_image) != len(before.per_image) or len(after.per_image) < 2:
        raise ValueError("paired head errors need the same probe images (two or more)")
    diff = np.asarray(before.per_image, np.float64) - np.asarray(after.per_image, np.float64)
    spread = float(diff.std(ddof=1)) / np.sqrt(diff.size)
    return bool(diff.mean() > z * spread)


def _clear_top_peaks(heat: np.ndarray, mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The top-``k`` peaks taken among the local maxima alone, when that is provably what the full
    selection picks: the k-th score strictly above every other entry (other maxima, and the zeros that
    stand for non-maxima). Otherwise None, and ties at the cut are left to the full selection."""
    cand = np.flatnonzero(mask)
    if not 0 < k < cand.size:
        return None
    vals = heat.reshape(-1)[cand]
    part = np.argpartition(-vals, k)
    top, after = vals[part[:k]], vals[part[k]]
    if not (after >= 0 and top.min() > after):
        return None
    idx = cand[part[:k]]
    order = np.lexsort((idx, -top))
    return idx[order], top[order]


def peak_indices(heat_chw: np.ndarray, k: int, kernel: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Flat (class-major) indices and scores of the top-``k`` local maxima of one (C, H, W) heatmap."""
    mask = local_max_mask(heat_chw, kernel)
    # The local maxima are a few percent of the heatmap; selecting among them alone skips a partition
    # of the whole map when the answer cannot differ.
    clear = _clear_top_peaks(heat_chw, mask, min(k, heat_chw.size))
    if clear is not None:
        return clear
    peaks = np.where(mask, heat_chw, 0.0).ravel()
    k = min(k, peaks.size)
    idx = np.argpartition(-peaks, k - 1)[:k]
    order = np.lexsort((idx, -peaks[idx]))  # by score, then index: deterministic with ties
    idx = idx[order]
    return idx, peaks[idx]


def _canonical(boxes: np.ndarray) -> np.ndarray:
    """xyxy with x1 <= x2 and y1 <= y2 (a head may predict negative sizes; drift should still compare)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])], axis=1)


def detection_agreement(base: Detections, other: Detections) -> float:
    """Score-weighted soft agreement of ``other`` with ``base`` (see module docstring); 1.0 = identical."""
    if len(base) == 0:
        return 1.0
    weights = np.clip(base.scores.astype(np.float64), 0.0, None)
    if weights.sum() <= 0:
        return 1.0
    if len(other) == 0:
        return 0.0
    b, o = _canonical(base.boxes), _canonical(other.boxes)
    # Degenerate (zero-area) boxes match only themselves; they occur with untrained or clipped heads.
    iou = box_iou(b, o, identical_degenerate=True)
    sb, so = base.scores.astype(np.float64)[:, None], other.scores.astype(np.float64)[None, :]
    hi = np.maximum(sb, so)
    ratio = np.where(hi > 0, np.minimum(sb, so) / np.where(hi > 0, hi, 1.0), 1.0)
    match = np.where(base.labels[:, None] == other.labels[None, :], iou * ratio, 0.0).max(axis=1)
    return float((weights * match).sum() / weights.sum())



@dataclass
class _ImageRef:
    detections: Detections
    heat: np.ndarray | None
    peaks: np.ndarray | None
    peak_scores: np.ndarray | None


class HeadProbe:
    """Runs candidates on fixed calibration batches and scores them against the fp32 outputs.

    ``batches`` are (graph input, geometries) pairs as ``prepare_batch`` returns them. The fp32 results
    are computed once (:meth:`set_reference`) and kept in memory: a few MB per image.
    """

    def __init__(self, spec: ModelSpec, batches: Sequence[tuple[np.ndarray, list[InputGeometry]]],
                 threads: int = 1, workers: int = 1) -> None:
        if not batches:
            raise ValueError("the head probe needs at least one calibration batch")
        self.spec = spec
        self.batches = list(batches)
        self.threads = threads
        self.workers = workers  # batches run at once (see parallel); the numbers do not depend on it
        self.fetch = {role: info.name for role, info in spec.graph.outputs.items()}
        self._reference: list[_ImageRef] | None = None
        self._offsets = np.cumsum([0] + [len(g) for _, g in self.batches[:-1]]).tolist()

    @property
    def images(self) -> int:
        return sum(len(g) for _, g in self.batches)

    def _batch_refs(self, session: Any, index: int) -> list[_ImageRef]:
        x, geoms = self.batches[index]
        by_role = run_by_role(session, self.spec, x, self.fetch)
        dets = finalize(by_role, self.spec, geoms)
        if "heatmap" not in by_role:
            return [_ImageRef(det, None, None, None) for det in dets]
        heat = np.ascontiguousarray(heatmap_probabilities(by_role["heatmap"], self.spec))
        k, kernel = self.spec.decode.K, self.spec.decode.peak_kernel
        refs = []
        for i, det in enumerate(dets):
            idx, scores = peak_indices(heat[i], k, kernel)
            refs.append(_ImageRef(det, heat[i], idx, scores))
        return refs

    def _per_batch(self, model: onnx.ModelProto | bytes | str, fn: Callable[[int, list[_ImageRef]], R],
                   workers: int | None) -> list[R]:
        """``fn(batch index, image refs)`` for every probe batch, in batch order. The batches are split
        into ``workers`` contiguous runs, each with a session of its own (concurrent runs of one session
        re-fault their memory every time). ``fn`` runs on the worker, so a batch's heatmaps are reduced
        to numbers there and never pile up."""
        count = len(self.batches)
        groups = max(1, min(workers or self.workers, count))
        data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model

        def task(group: int) -> list[R]:
            session = create_session(data, threads=self.threads, mem_pattern=False)
            indices = range(group * count // groups, (group + 1) * count // groups)
            return [fn(index, self._batch_refs(session, index)) for index in indices]

        return [r for part in map_ordered(task, range(groups), groups) for r in part]

    def subset(self, images: int) -> HeadProbe:
        """A probe on the first batches holding at least ``images`` images (all when fewer), sharing this
        probe's fp32 reference (no fp32 rerun)."""
        count = 0
        batches = []
        for batch in self.batches:
            if count >= max(1, images):
                break
            batches.append(batch)
            count += len(batch[1])
        probe = HeadProbe(self.spec, batches, threads=self.threads, workers=self.workers)
        if self._reference is not None:
            probe._reference = self._reference[:count]
        return probe

    def lowest_top_k_score(self) -> float | None:
        """The smallest score that still makes an image's top-K peaks in the fp32 reference (over all
        probe images); None without a heatmap."""
        if self._reference is None:
            raise RuntimeError("call set_reference(fp32 model) first")
        lows = [float(ref.peak_scores.min()) for ref in self._reference
                if ref.peak_scores is not None and ref.peak_scores.size]
        return min(lows) if lows else None

    def set_reference(self, model: onnx.ModelProto | bytes | str) -> None:
        batches = self._per_batch(model, lambda _, refs: refs, None)
        self._reference = [ref for refs in batches for ref in refs]

    def measure(self, model: onnx.ModelProto | bytes | str, workers: int | None = None) -> HeadError:
        """Drift of ``model``'s heads from the reference; ``workers`` overrides the probe's own count
        (callers that already run several models at once pass 1)."""
        reference = self._reference
        if reference is None:
            raise RuntimeError("call set_reference(fp32 model) before measure()")

        def compare(index: int, cands: list[_ImageRef]) -> list[_ImageScores]:
            start = self._offsets[index]
            return [_compare(reference[start + i], cand) for i, cand in enumerate(cands)]

        rows = [row for batch in self._per_batch(model, compare, workers) for row in batch]
        if len(rows) != len(reference):
            raise ValueError(f"the candidate gave {len(rows)} images for {len(reference)} reference images")
        agree = [row.agreement for row in rows]
        heat_rows = [row for row in rows if row.mse is not None]
        overlap = [row.overlap for row in heat_rows]
        wrecall = [row.weighted_recall for row in heat_rows]
        mse = [row.mse for row in heat_rows]
        maxabs = [row.max_abs for row in heat_rows]
        mean_agree = float(np.mean(agree))
        return HeadError(
            head_error=1.0 - mean_agree,
            detection_agreement=mean_agree,
            peak_overlap=float(np.mean(overlap)) if overlap else None,
            weighted_peak_recall=float(np.mean(wrecall)) if wrecall else None,
            heatmap_mse=float(np.mean(mse)) if mse else None,
            heatmap_max_abs=float(np.max(maxabs)) if maxabs else None,
            images=len(agree),
            per_image=tuple(1.0 - a for a in agree),
        )


@dataclass(frozen=True)
class _ImageScores:
    agreement: float
    overlap: float | None = None
    weighted_recall: float | None = None
    mse: float | None = None
    max_abs: float | None = None


def _compare(ref: _ImageRef, cand: _ImageRef) -> _ImageScores:
    agreement = detection_agreement(ref.detections, cand.detections)
    if ref.heat is None or cand.heat is None or ref.peaks is None or ref.peak_scores is None:
        return _ImageScores(agreement)
    # The same float64 differences as ``cand.astype(float64) - ref``, squared in place after the extremes
    # are read: one temporary instead of four, and identical numbers.
    diff = np.subtract(cand.heat, ref.heat, dtype=np.float64)
    max_abs = max(float(diff.max()), -float(diff.min())) + 0.0  # + 0.0: never a -0.0 that abs would not give
    np.multiply(diff, diff, out=diff)
    shared = np.isin(ref.peaks, cand.peaks, kind="sort")  # the default builds a table as long as the map
    total = float(ref.peak_scores.sum())
    return _ImageScores(
        agreement,
        overlap=float(shared.mean()),
        weighted_recall=float(ref.peak_scores[shared].sum() / total) if total > 0 else 1.0,
        mse=float(np.mean(diff)),
        max_abs=max_abs,
    )
