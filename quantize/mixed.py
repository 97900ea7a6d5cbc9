"""Automatic mixed precision: which few layers stay float, chosen from label-free head error.

Start from every eligible layer in int8; keep the ``k`` most sensitive layers (per-layer ranking from
:mod:`sensitivity`) in float. Two stopping rules pick ``k``; nothing here looks at annotations:

* ``knee`` (:func:`search_knee`, the default): every ``k`` from 0 to a cap (by default 10% of the Conv
  layers, so >= 90% of them stay int8) is measured on the calibration images, and ``k`` is the fewest
  float layers that reach most (``1 - KNEE_TOLERANCE``) of the head-error reduction the cap can give:
  past that point each extra float layer buys little. It adapts to the model: a model whose error sits in
  one layer stops at 1, one whose error is spread out uses the cap;
* ``budget`` (:func:`search_mixed_precision`): the smallest ``k`` whose whole-model head error is within
  a fixed budget, found by bisection (error falls roughly monotonically with ``k``). On mb3 the 0.02
  budget kept 91-94 of 111 layers float: int8 in name only.

Every evaluated point is kept as the accuracy side of the speed/accuracy curve.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from centernet_edge.runtime.atomic import atomic_write_text

from .head_error import HeadError, HeadProbe
from .placement import Placement
from .qdq import build_qdq_model
from .sensitivity import LayerSensitivity

__all__ = ["DEFAULT_BUDGET", "DEFAULT_FLOAT_SHARE", "KNEE_TOLERANCE", "MixedResult", "default_max_float",
           "knee_point", "precision_table", "search_knee", "search_mixed_precision", "write_precision"]

# Head error = 1 - score-weighted detection agreement with fp32 (see head_error). 0.02 asks the int8
# model to reproduce 98% of fp32's confidence-weighted detections (same class, box overlap, score). The
# value is fixed a priori, never fitted to annotated accuracy.
DEFAULT_BUDGET = 0.02
# The knee rule's cap: at most this share of the Conv layers kept float (>= 90% of them int8, which is
# what makes an int8 engine an int8 engine), and the share of the reachable head-error reduction it may
# leave on the table. Both fixed a priori, not fitted to annotated accuracy.
DEFAULT_FLOAT_SHARE = 0.10
KNEE_TOLERANCE = 0.10


@dataclass
class MixedResult:
    """The chosen float layers (most sensitive first), their error, and every point evaluated."""

    budget: float
    float_layers: list[str]
    error: HeadError
    curve: list[tuple[int, HeadError]] = field(default_factory=list)
    met_budget: bool = True
    rule: str = "budget"  # or "knee" (budget is then NaN) or "none" (every eligible layer int8)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "budget": self.budget if self.budget == self.budget and abs(self.budget) != float("inf") else None,
            "met_budget": self.met_budget,
            "float_layers": list(self.float_layers),
            "error": self.error.to_dict(),
            "curve": [{"float_layers": k, **e.to_dict()} for k, e in self.curve],
        }


def search_mixed_precision(
    model: onnx.ModelProto,
    placement: Placement,
    amax: Mapping[str, float],
    ranking: Sequence[LayerSensitivity],
    probe: HeadProbe,
    budget: float = DEFAULT_BUDGET,
    max_float: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> MixedResult:
    """Smallest prefix of ``ranking`` kept float so the whole-model head error is <= ``budget``.

    ``max_float`` caps how many layers may stay float; when even the cap misses the budget the cap is
    returned with ``met_budget=False``.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0; got {budget}")
    order = [item.layer for item in ranking]
    unknown = set(order) - set(placement.names())
    if unknown:
        raise ValueError(f"ranking names layers the placement does not have: {sorted(unknown)[:3]}")
    limit = len(order) if max_float is None else max(0, min(max_float, len(order)))
    evaluated: dict[int, HeadError] = {}

    def error_at(k: int) -> HeadError:
        if k not in evaluated:
            layers = placement.select(order[:k])
            evaluated[k] = probe.measure(build_qdq_model(model, layers, amax))
            if progress:
                progress(f"{k} float layer(s): head error {evaluated[k].head_error:.5f}")
        return evaluated[k]

    if error_at(0).head_error <= budget:
        chosen = 0
    elif error_at(limit).head_error > budget:
        chosen = limit
    else:
        lo, hi = 0, limit  # invariant: error(lo) > budget >= error(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if error_at(mid).head_error <= budget:
                hi = mid
            else:
                lo = mid
        chosen = hi
    curve = sorted(evaluated.items())
    final = evaluated[chosen]
    return MixedResult(budget, order[:chosen], final, curve, final.head_error <= budget)


def default_max_float(placement: Placement, share: float = DEFAULT_FLOAT_SHARE) -> int:
    """The knee rule's cap: ``share`` of the eligible Conv layers (at least 1 when there is any layer)."""
    convs = sum(1 for layer in placement.layers if layer.op_type in ("Conv", "ConvTranspose"))
    return max(1 if placement.layers else 0, int(share * convs))


def knee_point(errors: Sequence[float], tolerance: float = KNEE_TOLERANCE) -> int:
    """Fewest float layers ``k`` (``errors[k]`` = head error with ``k`` float) that reach all but
    ``tolerance`` of the reduction from ``errors[0]`` to the best error in ``errors``."""
    if not errors:
        raise ValueError("knee_point needs at least the all-int8 error")
    if not 0 <= tolerance <= 1:
        raise ValueError(f"tolerance must be in [0, 1]; got {tolerance}")
    best = min(errors)
    target = best + tolerance * (errors[0] - best)
    return next(k for k, e in enumerate(errors) if e <= target)


def search_knee(
    model: onnx.ModelProto,
    placement: Placement,
    amax: Mapping[str, float],
    ranking: Sequence[LayerSensitivity],
    probe: HeadProbe,
    max_float: int | None = None,
    tolerance: float = KNEE_TOLERANCE,
    progress: Callable[[str], None] | None = None,
) -> MixedResult:
    """The knee rule (module docstring): measure ``k`` = 0..cap float layers, keep :func:`knee_point`.

    ``max_float`` is the cap (default :func:`default_max_float`).
    """
    order = [item.layer for item in ranking]
    unknown = set(order) - set(placement.names())
    if unknown:
        raise ValueError(f"ranking names layers the placement does not have: {sorted(unknown)[:3]}")
    cap = default_max_float(placement) if max_float is None else max_float
    cap = max(0, min(cap, len(order)))
    curve: list[tuple[int, HeadError]] = []
    for k in range(cap + 1):
        error = probe.measure(build_qdq_model(model, placement.select(order[:k]), amax))
        curve.append((k, error))
        if progress:
            progress(f"{k} float layer(s): head error {error.head_error:.5f}")
    chosen = knee_point([e.head_error for _, e in curve], tolerance)
    return MixedResult(float("nan"), order[:chosen], curve[chosen][1], curve, True, "knee")


def precision_table(placement: Placement, float_layers: Sequence[str]) -> dict[str, dict[str, str]]:
    """Final precision of every node: eligible layers int8/float, the rest float with the reason."""
    keep = set(float_layers)
    table: dict[str, dict[str, str]] = {}
    for layer in placement.layers:
        if layer.name in keep:
            table[layer.name] = {"op": layer.op_type, "precision": "float",
                                 "reason": "kept float by mixed precision"}
        else:
            table[layer.name] = {"op": layer.op_type, "precision": "int8", "reason": "eligible"}
    for name, reason in placement.excluded.items():
        table[name] = {"op": "", "precision": "float", "reason": reason}
    return table


def write_precision(path: str | Path, placement: Placement, result: MixedResult | None,
                    ops: Mapping[str, str] | None = None, meta: Mapping[str, Any] | None = None) -> None:
    """precision.json: per-node precision plus the search summary."""
    table = precision_table(placement, result.float_layers if result else [])
    for name, entry in table.items():
        if not entry["op"] and ops and name in ops:
            entry["op"] = ops[name]
    doc = {
        "meta": dict(meta or {}),
        "int8_layers": [n for n, e in table.items() if e["precision"] == "int8"],
        "float_layers": list(result.float_layers) if result else [],
        "search": result.to_dict() if result else None,
        "nodes": table,
    }
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
