"""TensorRT 10 calibrators: one that serves our calibration cache, one that feeds live batches.

The cache calibrator is how an int8 engine is built from ``centernet-calibrate``'s calibration.cache
without images on the build machine: TensorRT asks ``read_calibration_cache`` first and, given ranges,
never asks for a batch. Its base class must match the cache header's algorithm (an EntropyCalibration2
cache is served by an ``IInt8EntropyCalibrator2``). A cache whose header names another TensorRT version
would be ignored (and TensorRT would then ask for batches it cannot get), so :func:`cache_bytes_for`
re-labels the header for the running version; the ranges themselves do not depend on it.

The classes are made by factories taking the ``tensorrt`` module, so they import nothing themselves and
can be checked against a stand-in with the documented method names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from centernet_edge.quantize.trt_cache import parse_cache, render_cache, trt_version_int

__all__ = ["BASE_CLASSES", "cache_bytes_for", "make_batch_calibrator", "make_cache_calibrator"]

log = logging.getLogger("centernet_edge.engine")

# cache header algorithm -> (TensorRT base class, CalibrationAlgoType member)
BASE_CLASSES = {
    "EntropyCalibration2": ("IInt8EntropyCalibrator2", "ENTROPY_CALIBRATION_2"),
    "EntropyCalibration": ("IInt8EntropyCalibrator", "ENTROPY_CALIBRATION"),
    "MinMaxCalibration": ("IInt8MinMaxCalibrator", "MINMAX_CALIBRATION"),
}


def cache_bytes_for(cache_path: str | Path, trt_version: str) -> tuple[bytes, str]:
    """The bytes to serve for ``cache_path`` on TensorRT ``trt_version`` and the header's algorithm.

    The file's own bytes when its header names this version; otherwise the same ranges under this
    version's header (with a warning)."""
    raw = Path(cache_path).read_bytes()
    cache = parse_cache(raw.decode("utf-8"), source=Path(cache_path).name)
    if cache.algorithm not in BASE_CLASSES:
        raise ValueError(f"{Path(cache_path).name}: TensorRT cannot serve a {cache.algorithm} cache through a "
                         f"calibrator here; expected one of {', '.join(BASE_CLASSES)}")
    running = trt_version_int(trt_version)
    if cache.version == running:
        return raw, cache.algorithm
    log.warning("%s was written for TensorRT %d; serving its ranges under the header of %d",
                Path(cache_path).name, cache.version, running)
    text = render_cache(cache.amaxes, algorithm=cache.algorithm, trt_version=running)
    return text.encode("utf-8"), cache.algorithm


def _base(trt: ModuleType, algorithm: str) -> tuple[type, Any]:
    if algorithm not in BASE_CLASSES:
        raise ValueError(f"unsupported calibration algorithm {algorithm!r}; one of {', '.join(BASE_CLASSES)}")
    class_name, algo_name = BASE_CLASSES[algorithm]
    return getattr(trt, class_name), getattr(trt.CalibrationAlgoType, algo_name)


def make_cache_calibrator(trt: ModuleType, cache: bytes, algorithm: str = "EntropyCalibration2") -> Any:
    """A calibrator that returns exactly ``cache`` and never a batch."""
    base, algo = _base(trt, algorithm)

    class CacheCalibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)  # the bindings need the base initialised explicitly
            self.batch_requests = 0

        def get_algorithm(self) -> Any:
            return algo

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> None:
            # Reached only if TensorRT rejected the cache; None ends calibration instead of inventing data.
            self.batch_requests += 1
            return None

        def read_calibration_cache(self) -> bytes:
            return cache

        def write_calibration_cache(self, data: Any) -> None:
            return None  # ours is the reference; TensorRT's copy of it is not written back

    return CacheCalibrator()


def make_batch_calibrator(
    trt: ModuleType,
    feeds: Iterator[np.ndarray],
    batch_size: int,
    to_device: Callable[[np.ndarray], Any],
    cache_out: str | Path | None = None,
    algorithm: str = "EntropyCalibration2",
) -> Any:
    """A calibrator that runs TensorRT's own calibration on live batches.

    ``feeds`` yields graph-input batches (``prepare_batch`` output); ``to_device`` copies one to device
    memory and returns an object with ``data_ptr()`` (a torch CUDA tensor), kept alive until the next
    batch. TensorRT's resulting cache goes to ``cache_out`` when given.
    """
    base, algo = _base(trt, algorithm)

    class BatchCalibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)
            self._current: Any = None
            self.batches_served = 0

        def get_algorithm(self) -> Any:
            return algo

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(feeds, None)
            if batch is None:
                self._current = None
                return None
            self._current = to_device(np.ascontiguousarray(batch))
            self.batches_served += 1
            return [int(self._current.data_ptr())]

        def read_calibration_cache(self) -> None:
            return None  # always calibrate: a reused cache would be ours, served by the other class

        def write_calibration_cache(self, data: Any) -> None:
            if cache_out is not None:
                from centernet_edge.runtime.atomic import atomic_write_bytes

                atomic_write_bytes(cache_out, bytes(data))

    return BatchCalibrator()
