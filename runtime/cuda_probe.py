"""Is there an NVIDIA GPU, and is TensorRT installed? Answered without touching TensorRT itself.

TensorRT's (lean) runtime crashes the process when it is used on a machine without a GPU, so every
caller asks :func:`gpu_devices` first and only then imports ``tensorrt``. The probe tries PyTorch's CUDA
build, then cuda-python's ``cudaGetDeviceCount`` (which returns an error code, not a crash, without a
driver).
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

__all__ = ["GpuProbe", "gpu_devices", "gpu_name", "tensorrt_installed", "torch_cuda_available"]


@dataclass(frozen=True)
class GpuProbe:
    """How many CUDA devices were seen, and by which library (``how`` says why when none)."""

    count: int
    how: str

    @property
    def found(self) -> bool:
        return self.count > 0


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # a broken driver install raises instead of returning False
        return False


def _cuda_python_count() -> tuple[int, str]:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python layout
        except ImportError:
            return 0, "cuda-python not installed"
    try:
        error, count = cudart.cudaGetDeviceCount()
    except Exception as exc:  # no driver library at all
        return 0, f"cuda-python: {type(exc).__name__}"
    if int(error) != 0:
        return 0, f"cuda-python: cudaGetDeviceCount returned error {int(error)}"
    return int(count), "cuda-python"


def gpu_devices() -> GpuProbe:
    """CUDA devices visible to this process; never imports TensorRT."""
    if torch_cuda_available():
        import torch

        return GpuProbe(int(torch.cuda.device_count()), "torch")
    count, how = _cuda_python_count()
    if count > 0:
        return GpuProbe(count, how)
    return GpuProbe(0, f"torch.cuda: none; {how}")


def tensorrt_installed() -> bool:
    """Whether ``import tensorrt`` can succeed (checked without importing it)."""
    if "tensorrt" in sys.modules:
        return sys.modules["tensorrt"] is not None
    try:
        return importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):
        return False


def gpu_name(index: int = 0) -> str | None:
    """The device's marketing name, for the engine side-car (engines are built per GPU model)."""
    if torch_cuda_available():
        import torch

        return str(torch.cuda.get_device_name(index))
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    try:
        error, props = cudart.cudaGetDeviceProperties(index)
    except Exception:
        return None
    if int(error) != 0:
        return None
    name = props.name
    return name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)
