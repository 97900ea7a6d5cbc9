"""A calibration run's manifest: which files a run writes, the ``summary.json`` that ties them to the exact
model, images and method they came from, and refusing to reuse a cache made from something else.

Every consumer of a calibration folder (``centernet-build``, ``centernet-bundle``, a rerun of
``centernet-calibrate``) finds the files by :data:`ARTIFACTS` and checks them through the summary; no file
name is spelled anywhere else. Summaries carry no timestamps: equal inputs give equal files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from centernet_edge.runtime.atomic import atomic_write_text
from centernet_edge.runtime.spec import toolkit_version

__all__ = [
    "ARTIFACTS",
    "INT8_ARTIFACTS",
    "SUMMARY_FORMAT",
    "StaleCacheError",
    "calibration_summary",
    "check_reusable",
    "read_summary",
    "summary_path_for",
    "write_summary",
]

log = logging.getLogger("centernet_edge.quantize")

SUMMARY_FORMAT = 1

ARTIFACTS = {
    "cache": "calibration.cache",
    # The fp32 model the cache's ranges refer to when calibration rescaled channels (same function as the
    # source, other tensor values): TensorRT 10's implicit int8 builds it with the cache.
    "rescaled": "model_fp32_rescaled.onnx",
    "qdq": "model_int8_qdq.onnx",
    "cpu": "model_int8_cpu.onnx",
    "fp16": "model_fp16.onnx",
    "sensitivity_json": "sensitivity.json",
    "sensitivity_md": "sensitivity.md",
    "precision": "precision.json",
    "summary": "summary.json",
    "timings": "timings.json",
    "layer_error_json": "layer_error.json",
    "layer_error_md": "layer_error.md",
    "weight_fit": "weight_fit.json",
}
# What only an int8 run writes (a rerun without int8 removes stale ones).
INT8_ARTIFACTS = ("qdq", "cpu", "sensitivity_json", "sensitivity_md", "precision", "layer_error_json",
                  "layer_error_md", "weight_fit")


class StaleCacheError(RuntimeError):
    """An existing cache/summary was made for another model, calibration set or method."""


def summary_path_for(cache_path: str | os.PathLike[str]) -> Path:
    """Where the summary of a cache lives by default: ``<cache>.json``."""
    p = Path(cache_path)
    return p.with_name(p.name + ".json")


def calibration_summary(
    *,
    model_sha256: str,
    dataset_hash: str,
    method: str,
    amaxes: Mapping[str, float],
    method_options: Mapping[str, Any] | None = None,
    num_images: int | None = None,
    trt_header: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The provenance record of one calibration (no timestamps: equal inputs give equal files)."""
    summary: dict[str, Any] = {
        "format": SUMMARY_FORMAT,
        "toolkit_version": toolkit_version(),
        "model_sha256": model_sha256,
        "dataset_hash": dataset_hash,
        "method": method,
        "method_options": dict(method_options or {}),
        "num_images": num_images,
        "trt_cache_header": trt_header,
        "amax": {name: float(amaxes[name]) for name in sorted(amaxes)},
    }
    if extra:
        clash = sorted(set(extra) & set(summary))
        if clash:
            raise ValueError(f"extra summary fields clash with standard ones: {clash}")
        summary.update(extra)
    return summary


def write_summary(path: str | os.PathLike[str], summary: Mapping[str, Any]) -> Path:
    return atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=True) + "\n")


def read_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise StaleCacheError(f"calibration summary {p.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise StaleCacheError(f"calibration summary {p.name} is not a JSON object")
    return data


def _short(key: str, value: Any) -> Any:
    return value[:12] if isinstance(value, str) and key.endswith(("sha256", "hash")) else value


def check_reusable(
    cache_path: str | os.PathLike[str],
    *,
    model_sha256: str,
    dataset_hash: str,
    method: str,
    method_options: Mapping[str, Any] | None = None,
    summary_path: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> bool:
    """Whether an existing cache may be reused for this model, calibration set and method.

    True: it exists and its summary matches. False: there is nothing to reuse, or ``force`` is set (the
    caller recalibrates and overwrites). Raises :class:`StaleCacheError` when a cache exists but was
    made from something else, or cannot be verified because its summary is missing or unreadable.
    ``method_options`` (e.g. the percentile) are compared only when given.
    """
    cache = Path(cache_path)
    summary_file = Path(summary_path) if summary_path is not None else summary_path_for(cache)
    if not cache.exists():
        return False
    if force:
        log.warning("recalibrating over existing cache %s (forced)", cache)
        return False
    if not summary_file.is_file():
        raise StaleCacheError(
            f"calibration cache {cache.name} exists but has no summary ({summary_file.name}), so it cannot "
            "be checked against this model and calibration set; delete it or pass --force to recalibrate"
        )
    recorded = read_summary(summary_file)
    current: dict[str, Any] = {"model_sha256": model_sha256, "dataset_hash": dataset_hash, "method": method}
    if method_options is not None:
        current["method_options"] = dict(method_options)
    differences = []
    for key, now in current.items():
        was = recorded.get(key)
        if was != now:
            differences.append(f"{key} {_short(key, was)!r} (now {_short(key, now)!r})")
    if differences:
        raise StaleCacheError(
            f"calibration cache {cache.name} is stale: it was made for " + "; ".join(differences)
            + ". Delete it or pass --force to recalibrate."
        )
    return True
