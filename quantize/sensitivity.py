"""Label-free per-layer sensitivity: quantize one eligible layer at a time and watch the heads.

Each candidate is the fp32 graph with Q/DQ for that single layer (its activation input(s) and weights),
run in ONNX Runtime, which simulates the int8 rounding exactly; the error is measured against fp32 on the
calibration images only (see :mod:`head_error`). The ranked table tells which layers int8 hurts most and
is what the mixed-precision search consumes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from centernet_edge.runtime.atomic import atomic_write_text

from .head_error import HeadError, HeadProbe
from .parallel import map_ordered
from .placement import QuantLayer
from .qdq import build_qdq_model

__all__ = ["LayerSensitivity", "layer_sensitivity", "sensitivity_markdown", "write_sensitivity"]


@dataclass(frozen=True)
class LayerSensitivity:
    layer: str
    op_type: str
    error: HeadError

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "op_type": self.op_type, **self.error.to_dict()}


def _sort_key(item: LayerSensitivity) -> tuple[float, float, str]:
    mse = item.error.heatmap_mse if item.error.heatmap_mse is not None else 0.0
    return (-item.error.head_error, -mse, item.layer)


def layer_sensitivity(
    model: onnx.ModelProto,
    layers: Sequence[QuantLayer],
    amax: Mapping[str, float],
    probe: HeadProbe,
    progress: bool = True,
    workers: int = 1,
) -> list[LayerSensitivity]:
    """Head error with only one layer in int8, for every layer; most sensitive first.

    ``probe`` must already hold the fp32 reference (:meth:`HeadProbe.set_reference`). ``workers``
    candidates are built and measured at once (each measurement is independent of the others, so the
    ranking does not depend on it).
    """
    from tqdm import tqdm

    inner = 1 if workers > 1 else None  # layers in parallel already: each one's images in sequence

    def one(layer: QuantLayer) -> LayerSensitivity:
        candidate = build_qdq_model(model, [layer], amax)
        return LayerSensitivity(layer.name, layer.op_type, probe.measure(candidate, workers=inner))

    measured = map_ordered(one, list(layers), workers)
    results = list(tqdm(measured, total=len(layers), desc="sensitivity", unit="layer", disable=not progress,
                        leave=False))
    return sorted(results, key=_sort_key)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def sensitivity_markdown(results: Sequence[LayerSensitivity], top: int | None = None) -> str:
    """The ranked table (most sensitive first) as Markdown."""
    lines = [
        "| rank | layer | op | head error | det. agreement | peak overlap | weighted peak recall | "
        "heatmap MSE | heatmap max abs |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for rank, item in enumerate(results[:top] if top else results, 1):
        e = item.error
        lines.append(
            f"| {rank} | `{item.layer}` | {item.op_type} | {e.head_error:.5f} | "
            f"{e.detection_agreement:.4f} | "
            f"{_fmt(e.peak_overlap, '.3f')} | {_fmt(e.weighted_peak_recall, '.4f')} | "
            f"{_fmt(e.heatmap_mse, '.3e')} | {_fmt(e.heatmap_max_abs, '.4f')} |"
        )
    return "\n".join(lines) + "\n"


def write_sensitivity(results: Sequence[LayerSensitivity], json_path: str | Path, md_path: str | Path,
                      meta: Mapping[str, Any] | None = None) -> None:
    """sensitivity.json (all numbers, ranked) and sensitivity.md (the same table for people)."""
    doc = {"meta": dict(meta or {}), "ranking": [item.to_dict() for item in results]}
    atomic_write_text(json_path, json.dumps(doc, indent=2, sort_keys=False) + "\n")
    header = "# Per-layer int8 sensitivity (label-free, vs fp32 on calibration images)\n\n"
    if meta:
        header += "".join(f"- {k}: {v}\n" for k, v in meta.items()) + "\n"
    atomic_write_text(md_path, header + sensitivity_markdown(results))
