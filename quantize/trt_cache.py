"""TensorRT calibration cache files: rendering, parsing and the header TensorRT reads.

Cache format (REFERENCE §0 item 9, §2.3): line 1 ``TRT-<version>-<Algorithm>``, then ``<tensor>: <hex>``
where ``<hex>`` is the big-endian IEEE-754 float32 bit pattern of ``scale = amax / 127`` in lowercase hex
without ``0x`` (``0`` for a zero range). ``<version>`` is ``NV_TENSORRT_VERSION``: TensorRT 10+ uses
``major*10000 + minor*100 + patch`` (10.16.1 -> 101601), TensorRT 8 ``major*1000 + minor*100 + patch``
(8.6.1 -> 8601). Tensor names are ONNX value names (what TensorRT's ONNX parser calls its tensors).
Lines are sorted by name so equal inputs give byte-identical files.

The cache cannot say what it was computed from; the run's manifest (``quantize/manifest.py``) records that.
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from centernet_edge.runtime.atomic import atomic_write_text

__all__ = [
    "ALGORITHMS",
    "DEFAULT_TRT_VERSION",
    "METHOD_ALGORITHM",
    "CacheFormatError",
    "CalibrationCache",
    "amax_to_hex",
    "cache_header_note",
    "hex_to_amax",
    "parse_cache",
    "read_cache",
    "render_cache",
    "trt_version_int",
    "write_cache",
]

log = logging.getLogger("centernet_edge.quantize")

DEFAULT_TRT_VERSION = 101601  # TensorRT 10.16.1, the last release line that still reads calibration caches
ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
# TensorRT has no percentile/MSE calibrator; their ranges are used as-is under the entropy-v2 header,
# which is what trtexec --calib and Polygraphy's default calibrator expect.
METHOD_ALGORITHM = {"entropy": "EntropyCalibration2", "minmax": "MinMaxCalibration",
                    "percentile": "EntropyCalibration2", "mse": "EntropyCalibration2",
                    "downstream": "EntropyCalibration2"}
_INT8_MAX = 127.0
_HEADER = re.compile(r"^TRT-(\d+)-([A-Za-z0-9]+)$")
_HEX = re.compile(r"^[0-9a-fA-F]{1,8}$")


class CacheFormatError(ValueError):
    """A calibration cache file is malformed."""


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
