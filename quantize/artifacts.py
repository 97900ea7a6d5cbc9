"""Writing calibration artifacts: atomic ONNX saves that carry the model spec with their precision.

Every derived model keeps the original's input/output names and meaning, so the spec is copied with
only ``provenance`` updated (``precision`` is what the evaluator prints as the row label). Foreign
models described by a side-car JSON also get a side-car next to each artifact (``<artifact>.json``), so
they can be evaluated exactly like the original (``--model-spec``) or without it (embedded copy).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from centernet_edge.runtime.atomic import atomic_path, atomic_write_text
from centernet_edge.runtime.spec import ModelSpec

__all__ = ["PRECISIONS", "derived_spec", "save_model", "sidecar_path"]

PRECISIONS = ("fp32", "fp16", "int8", "int8-mixed")


def derived_spec(spec: ModelSpec, precision: str, extra: Mapping[str, Any] | None = None) -> ModelSpec:
    """A copy of ``spec`` labelled ``precision`` (one of :data:`PRECISIONS`) plus provenance ``extra``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    out = copy.deepcopy(spec)
    # A recorded file hash describes the source model, not this artifact: keep it under a clear name.
    inherited = {k: v for k, v in spec.provenance.items() if k != "sha256"}
    if "sha256" in spec.provenance:
        inherited["source_model_sha256"] = spec.provenance["sha256"]
    out.provenance = {**inherited, **dict(extra or {}), "precision": precision}
    return out.validate()


def sidecar_path(model_path: str | Path) -> Path:
    p = Path(model_path)
    return p.with_suffix(".json")


def save_model(model: onnx.ModelProto, path: str | Path, spec: ModelSpec, *, sidecar: bool = False) -> Path:
    """Embed ``spec`` in ``model`` and write it (and optionally the side-car) atomically."""
    spec.write_to_onnx(model)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    if sidecar:
        atomic_write_text(sidecar_path(path), spec.to_json() + "\n")
    return path
