"""Automatic mixed precision: the fewest float layers that keep the heads within a label-free budget.

Start from every eligible layer in int8; keep the ``k`` most sensitive layers (per-layer ranking from
:mod:`sensitivity`) in float; find the smallest ``k`` whose whole-model head error on the calibration
images is within the budget. Error falls roughly monotonically with ``k``, so ``k`` is found by bisection
(about log2(layers) whole-model evaluations); every evaluated point is kept as the accuracy side of the
speed/accuracy curve. Nothing here looks at annotations.
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

__all__ = ["DEFAULT_BUDGET", "MixedResult", "precision_table", "search_mixed_precision", "write_precision"]

# Head error = 1 - score-weighted detection agreement with fp32 (see head_error). 0.02 asks the int8
# model to reproduce 98% of fp32's confidence-weighted detections (same class, box overlap, score). The
# value is fixed a priori, never fitted to annotated accuracy.
DEFAULT_BUDGET = 0.02


@dataclass
class MixedResult:
    """The chosen float layers (most sensitive first), their error, and every point evaluated."""

    budget: float
    float_layers: list[str]
    error: HeadError
    curve: list[tuple[int, HeadError]] = field(default_factory=list)
    met_budget: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
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
