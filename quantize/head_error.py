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

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx

from centernet_edge.runtime.detections import Detections
from centernet_edge.runtime.geometry import InputGeometry
from centernet_edge.runtime.postprocess import finalize
from centernet_edge.runtime.spec import ModelSpec

__all__ = ["HeadError", "HeadProbe", "detection_agreement", "peak_indices", "session_for"]


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

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def session_for(model: onnx.ModelProto | bytes | str, threads: int = 1,
                providers: Sequence[str] | None = None) -> Any:
    """An ORT CPU session (fixed thread count so measurements compare) for a proto, bytes or path."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, options, providers=list(providers or ["CPUExecutionProvider"]))


def _local_max_mask(heat: np.ndarray, kernel: int) -> np.ndarray:
    """heat == maxpool(heat) over a kernel x kernel window (ties survive, as in CenterNet's _nms)."""
    pad = kernel // 2
    padded = np.pad(heat, ((0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    hmax = np.full_like(heat, -np.inf)
    h, w = heat.shape[1:]
    for dy in range(kernel):
        for dx in range(kernel):
            np.maximum(hmax, padded[:, dy:dy + h, dx:dx + w], out=hmax)
    return heat == hmax


def peak_indices(heat_chw: np.ndarray, k: int, kernel: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Flat (class-major) indices and scores of the top-``k`` local maxima of one (C, H, W) heatmap."""
    peaks = np.where(_local_max_mask(heat_chw, kernel), heat_chw, 0.0).ravel()
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
    lt = np.maximum(b[:, None, :2], o[None, :, :2])
    rb = np.minimum(b[:, None, 2:], o[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    area_o = (o[:, 2:] - o[:, :2]).prod(-1)
    union = area_b[:, None] + area_o[None, :] - inter
    # Degenerate (zero-area) boxes match only themselves; they occur with untrained or clipped heads.
    same = np.all(b[:, None, :] == o[None, :, :], axis=-1)
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), same.astype(np.float64))
    sb, so = base.scores.astype(np.float64)[:, None], other.scores.astype(np.float64)[None, :]
    hi = np.maximum(sb, so)
    ratio = np.where(hi > 0, np.minimum(sb, so) / np.where(hi > 0, hi, 1.0), 1.0)
    match = np.where(base.labels[:, None] == other.labels[None, :], iou * ratio, 0.0).max(axis=1)
    return float((weights * match).sum() / weights.sum())


def _heatmap_probs(raw: np.ndarray, spec: ModelSpec) -> np.ndarray:
    heat = np.asarray(raw, dtype=np.float32)
    info = spec.graph.outputs.get("heatmap")
    if info is not None and info.layout == "NHWC":
        heat = heat.transpose(0, 3, 1, 2)
    if spec.decode.heatmap_activation == "logits":
        heat = 1.0 / (1.0 + np.exp(-heat))
    return np.ascontiguousarray(heat)


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
                 threads: int = 1) -> None:
        if not batches:
            raise ValueError("the head probe needs at least one calibration batch")
        self.spec = spec
        self.batches = list(batches)
        self.threads = threads
        self.roles = dict(spec.graph.outputs.items())
        self._reference: list[_ImageRef] | None = None

    @property
    def images(self) -> int:
        return sum(len(g) for _, g in self.batches)

    def _outputs(self, model: onnx.ModelProto | bytes | str) -> Iterable[tuple[dict[str, np.ndarray], list]]:
        session = session_for(model, self.threads)
        names = [info.name for info in self.roles.values()]
        for x, geoms in self.batches:
            values = session.run(names, {self.spec.graph.input.name: x})
            yield {role: v[: len(geoms)] for role, v in zip(self.roles, values, strict=True)}, geoms

    def _image_refs(self, model: onnx.ModelProto | bytes | str) -> Iterable[_ImageRef]:
        k, kernel = self.spec.decode.K, self.spec.decode.peak_kernel
        for by_role, geoms in self._outputs(model):
            dets = finalize(by_role, self.spec, geoms)
            heat = _heatmap_probs(by_role["heatmap"], self.spec) if "heatmap" in by_role else None
            for i, det in enumerate(dets):
                if heat is None:
                    yield _ImageRef(det, None, None, None)
                else:
                    idx, scores = peak_indices(heat[i], k, kernel)
                    yield _ImageRef(det, heat[i], idx, scores)

    def set_reference(self, model: onnx.ModelProto | bytes | str) -> None:
        self._reference = list(self._image_refs(model))

    def measure(self, model: onnx.ModelProto | bytes | str) -> HeadError:
        if self._reference is None:
            raise RuntimeError("call set_reference(fp32 model) before measure()")
        agree, overlap, wrecall, mse, maxabs = [], [], [], [], []
        for ref, cand in zip(self._reference, self._image_refs(model), strict=True):
            agree.append(detection_agreement(ref.detections, cand.detections))
            if ref.heat is not None and cand.heat is not None:
                diff = cand.heat.astype(np.float64) - ref.heat
                mse.append(float(np.mean(diff * diff)))
                maxabs.append(float(np.abs(diff).max()))
                shared = np.isin(ref.peaks, cand.peaks)
                overlap.append(float(shared.mean()))
                total = float(ref.peak_scores.sum())
                wrecall.append(float(ref.peak_scores[shared].sum() / total) if total > 0 else 1.0)
        mean_agree = float(np.mean(agree))
        return HeadError(
            head_error=1.0 - mean_agree,
            detection_agreement=mean_agree,
            peak_overlap=float(np.mean(overlap)) if overlap else None,
            weighted_peak_recall=float(np.mean(wrecall)) if wrecall else None,
            heatmap_mse=float(np.mean(mse)) if mse else None,
            heatmap_max_abs=float(np.max(maxabs)) if maxabs else None,
            images=len(agree),
        )
