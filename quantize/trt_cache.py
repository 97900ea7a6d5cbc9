"""TensorRT calibration cache files, the JSON summary beside them, and refusing stale ones.

Cache format (REFERENCE §0 item 9, §2.3): line 1 ``TRT-<version>-<Algorithm>``, then ``<tensor>: <hex>``
where ``<hex>`` is the big-endian IEEE-754 float32 bit pattern of ``scale = amax / 127`` in lowercase hex
without ``0x`` (``0`` for a zero range). ``<version>`` is ``NV_TENSORRT_VERSION``: TensorRT 10+ uses
``major*10000 + minor*100 + patch`` (10.16.1 -> 101601), TensorRT 8 ``major*1000 + minor*100 + patch``
(8.6.1 -> 8601). Tensor names are ONNX value names (what TensorRT's ONNX parser calls its tensors).
Lines are sorted by name so equal inputs give byte-identical files.

The cache cannot say what it was computed from, so a JSON summary (model sha256, calibration-set hash,
method, per-tensor amax) is written next to it; :func:`check_reusable` compares it with the current run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from centernet_edge.runtime.atomic import atomic_write_text
from centernet_edge.runtime.spec import toolkit_version

__all__ = [
    "ALGORITHMS",
    "DEFAULT_TRT_VERSION",
    "METHOD_ALGORITHM",
    "CacheFormatError",
    "CalibrationCache",
    "StaleCacheError",
    "amax_to_hex",
    "cache_header_note",
    "calibration_summary",
    "check_reusable",
    "hex_to_amax",
    "parse_cache",
    "read_cache",
    "read_summary",
    "render_cache",
    "summary_path_for",
    "trt_version_int",
    "write_cache",
    "write_summary",
]

log = logging.getLogger("centernet_edge.quantize")

DEFAULT_TRT_VERSION = 101601  # TensorRT 10.16.1, the last release line that still reads calibration caches
ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
# TensorRT has no percentile/MSE calibrator; their ranges are used as-is under the entropy-v2 header,
# which is what trtexec --calib and Polygraphy's default calibrator expect.
METHOD_ALGORITHM = {"entropy": "EntropyCalibration2", "minmax": "MinMaxCalibration",
                    "percentile": "EntropyCalibration2", "mse": "EntropyCalibration2",
                    "downstream": "EntropyCalibration2"}
SUMMARY_FORMAT = 1
_INT8_MAX = 127.0
_HEADER = re.compile(r"^TRT-(\d+)-([A-Za-z0-9]+)$")
_HEX = re.compile(r"^[0-9a-fA-F]{1,8}$")


class CacheFormatError(ValueError):
    """A calibration cache file is malformed."""


class StaleCacheError(RuntimeError):
    """An existing cache/summary was made for another model, calibration set or method."""


@dataclass(frozen=True)
class CalibrationCache:
    version: int
    algorithm: str
    amaxes: dict[str, float]

    @property
    def header(self) -> str:
        return f"TRT-{self.version}-{self.algorithm}"


def trt_version_int(version: str | int) -> int:
    """``NV_TENSORRT_VERSION`` for a TensorRT version string (``"10.16.1"`` -> 101601, ``"8.6.1"`` -> 8601)."""
    if isinstance(version, int):
        if version <= 0:
            raise ValueError(f"TensorRT version must be positive; got {version}")
        return version
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?(?:\.\d+)*", version.strip())
    if not match:
        raise ValueError(f"not a TensorRT version: {version!r} (expected e.g. 10.16.1)")
    major, minor, patch = (int(g or 0) for g in match.groups())
    if minor > 99 or patch > 99:
        raise ValueError(f"TensorRT version {version!r}: minor and patch must be < 100")
    return major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch


def amax_to_hex(amax: float) -> str:
    """Cache hex for ``amax``: float32 bits of amax/127, big-endian, lowercase, no ``0x``."""
    if not math.isfinite(amax) or amax < 0:
        raise ValueError(f"amax must be finite and >= 0; got {amax}")
    if amax == 0:
        return "0"
    (bits,) = struct.unpack(">I", struct.pack(">f", amax / _INT8_MAX))
    return format(bits, "x")


def hex_to_amax(text: str) -> float:
    """Inverse of :func:`amax_to_hex` (exact for the float32 scale: returns ``scale * 127``)."""
    if not _HEX.fullmatch(text):
        raise ValueError(f"not a float32 hex pattern: {text!r}")
    (scale,) = struct.unpack(">f", struct.pack(">I", int(text, 16)))
    return float(scale) * _INT8_MAX


def render_cache(amaxes: Mapping[str, float], *, method: str = "entropy",
                 trt_version: str | int = DEFAULT_TRT_VERSION, algorithm: str | None = None) -> str:
    """The cache text. ``algorithm`` overrides the header's calibrator name chosen from ``method``."""
    if algorithm is None:
        if method not in METHOD_ALGORITHM:
            raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHOD_ALGORITHM)}")
        algorithm = METHOD_ALGORITHM[method]
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown TensorRT calibration algorithm {algorithm!r}; one of {', '.join(ALGORITHMS)}")
    lines = [f"TRT-{trt_version_int(trt_version)}-{algorithm}"]
    for name in sorted(amaxes):
        if not name or "\n" in name or "\r" in name:
            raise ValueError(f"tensor name cannot be written to a cache line: {name!r}")
        lines.append(f"{name}: {amax_to_hex(float(amaxes[name]))}")
    colon_names = [n for n in amaxes if ":" in n]
    if colon_names:
        # Our reader splits at the last colon; ONNX Runtime's TensorRT EP splits at the first one.
        log.warning("%d tensor name(s) contain ':' (e.g. %r); readers that split at the first ':' "
                    "(ONNX Runtime's TensorRT EP) will misread them", len(colon_names), colon_names[0])
    return "\n".join(lines) + "\n"


def cache_header_note(method: str, trt_version: str | int = DEFAULT_TRT_VERSION) -> str:
    """Say which calibrator the cache header names and where its ranges came from (they can differ)."""
    algorithm = METHOD_ALGORITHM[method]
    header = f"TRT-{trt_version_int(trt_version)}-{algorithm}"
    if algorithm == "EntropyCalibration2" and method != "entropy":
        return (f"header {header} (TensorRT has no {method} calibrator; its cache reader takes the ranges "
                f"as written), ranges from {method}")
    return f"header {header}, ranges from {method}"


def write_cache(path: str | os.PathLike[str], amaxes: Mapping[str, float], *, method: str = "entropy",
                trt_version: str | int = DEFAULT_TRT_VERSION, algorithm: str | None = None) -> Path:
    """Write a TensorRT calibration cache (atomically) and return its path."""
    return atomic_write_text(path, render_cache(amaxes, method=method, trt_version=trt_version,
                                                algorithm=algorithm))


def parse_cache(text: str, source: str = "calibration cache") -> CalibrationCache:
    """Parse cache text; raises :class:`CacheFormatError` naming the offending line."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise CacheFormatError(f"{source} is empty")
    header = _HEADER.fullmatch(lines[0].strip())
    if not header:
        raise CacheFormatError(f"{source} line 1: expected 'TRT-<version>-<Algorithm>', got {lines[0]!r}")
    amaxes: dict[str, float] = {}
    for number, line in enumerate(lines[1:], start=2):
        name, sep, value = line.rpartition(":")  # names may contain ':' (TF-style 'x:0'); hex never does
        name, value = name.strip(), value.strip()
        if not sep or not name:
            raise CacheFormatError(f"{source} line {number}: expected '<tensor>: <hex>', got {line!r}")
        if not _HEX.fullmatch(value):
            raise CacheFormatError(f"{source} line {number}: {value!r} is not a float32 hex pattern")
        if name in amaxes:
            raise CacheFormatError(f"{source} line {number}: tensor {name!r} appears twice")
        amax = hex_to_amax(value)
        if not math.isfinite(amax) or amax < 0:
            raise CacheFormatError(f"{source} line {number}: scale {value} is negative or not finite")
        amaxes[name] = amax
    return CalibrationCache(int(header.group(1)), header.group(2), amaxes)


def read_cache(path: str | os.PathLike[str]) -> CalibrationCache:
    p = Path(path)
    return parse_cache(p.read_text(encoding="utf-8"), source=p.name)


# ---- summary & staleness --------------------------------------------------------------------------


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
