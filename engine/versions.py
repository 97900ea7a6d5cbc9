"""Which TensorRT line a build targets, and what that line accepts.

TensorRT 11 made every network strongly typed: the FP16/INT8 builder flags, calibrators and trtexec's
``--fp16/--int8/--best/--calib`` are gone, so fp16 must come from an fp16 ONNX and int8 from Q/DQ nodes.
TensorRT 10 (the last line JetPack ships) still has the implicit path: an fp32 ONNX plus FP16/INT8 flags
and a calibration cache.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata

from centernet_edge.runtime.cuda_probe import tensorrt_installed

__all__ = ["SUPPORTED_MAJORS", "TrtTarget", "installed_tensorrt_version", "parse_trt_version"]

SUPPORTED_MAJORS = (10, 11)
# pip distributions that provide the ``tensorrt`` module (JetPack's apt package has no pip metadata).
_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-lean", "tensorrt-cu12-bindings",
                  "tensorrt-cu13-bindings")


@dataclass(frozen=True)
class TrtTarget:
    """A TensorRT version as far as the build cares: its major line and the full string when known."""

    major: int
    version: str

    @property
    def implicit_precision(self) -> bool:
        """Whether FP16/INT8 builder flags and calibration caches exist (TensorRT 10)."""
        return self.major < 11


def parse_trt_version(text: str) -> TrtTarget:
    """``"10"``, ``"10.16.1"``, ``"11.4.0.106"`` -> a target; only the supported major lines."""
    match = re.fullmatch(r"(\d+)(?:\.\d+)*", text.strip())
    if not match:
        raise ValueError(f"not a TensorRT version: {text!r} (expected 10, 11 or e.g. 10.16.1)")
    major = int(match.group(1))
    if major not in SUPPORTED_MAJORS:
        raise ValueError(f"TensorRT {text} is not supported; centernet-build targets TensorRT 10.x and 11.x")
    return TrtTarget(major, text.strip())


def installed_tensorrt_version() -> str | None:
    """The installed TensorRT's version, or None. Importing ``tensorrt`` is safe without a GPU; only
    creating a builder or runtime is not."""
    for name in _DISTRIBUTIONS:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if not tensorrt_installed():
        return None
    import tensorrt

    return str(tensorrt.__version__)
