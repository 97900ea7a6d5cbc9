"""The one place an ONNX Runtime session is built.

Every stage that runs an ONNX graph (runners, export verification, calibration statistics, head-error
probes, the quantized-peak check, benchmarks) asks here, so threads, providers, optimisation level and
logging are decided once.

Caveat for quantized graphs: ONNX Runtime's ``WeightBiasQuantization`` transformer (basic optimisation
level, on by default since 1.21) rewrites the weights of a *float* Conv/Gemm that reads a per-tensor
``DequantizeLinear`` to int8 with one scale for the whole tensor, at session load. An artifact that must
behave the same in any user's ONNX Runtime cannot rely on a session option, so the CPU int8 builder avoids
the pattern in the graph itself (``quantize/float_layers.py``); ``disabled_optimizers`` is here for
measurements that want to see the difference.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["OPTIMIZATION_LEVELS", "PROVIDER_ALIASES", "SessionError", "create_session", "resolve_providers"]


class SessionError(RuntimeError):
    """The session cannot be built as asked (missing provider, unreadable model)."""


PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def resolve_providers(requested: Sequence[str] | None = None, *, prefer_gpu: bool = True) -> list[str]:
    """Full ONNX Runtime provider names, CPU always last as the fallback.

    ``requested`` may use aliases (cpu, cuda, tensorrt); ``None`` means CUDA when this installation has it
    (and ``prefer_gpu``), else CPU. A requested provider the installation lacks is an error, not a silent
    CPU run.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not requested:
        chosen = ["CUDAExecutionProvider"] if prefer_gpu and "CUDAExecutionProvider" in available else []
    else:
        chosen = [PROVIDER_ALIASES.get(p.lower(), p) for p in requested]
        missing = [p for p in chosen if p not in available]
        if missing:
            raise SessionError(
                f"ONNX Runtime providers not available in this installation: {', '.join(missing)} "
                f"(available: {', '.join(available)})"
            )
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def create_session(
    model: Any,
    *,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    optimization: str = "all",
    mem_pattern: bool = True,
    disabled_optimizers: Sequence[str] = (),
    quiet: bool = True,
    profile_prefix: str | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for a path, serialized bytes or an ``onnx.ModelProto``.

    ``threads`` fixes the intra-op pool (one inter-op thread) so timings and measurements compare;
    ``None`` leaves ONNX Runtime's default. ``providers`` defaults to CPU only: internal tools measure on
    the CPU unless asked otherwise (runners pass :func:`resolve_providers`' choice).
    ``mem_pattern=False`` suits sessions run off the main thread: there ONNX Runtime's planned memory
    block was measured to be mapped afresh on every run (page faults costing up to a third of the run);
    the plan only decides where intermediate tensors live, not what is computed. ``profile_prefix``
    turns on ONNX Runtime's per-node profiler (benchmarks).
    """
    import onnxruntime as ort

    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}, not {optimization!r}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.enable_mem_pattern = bool(mem_pattern)
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if quiet:
        options.log_severity_level = 3  # pruned probe graphs make ONNX Runtime chat about unused initializers
    if hasattr(model, "SerializeToString"):
        data: Any = model.SerializeToString()
    elif isinstance(model, (str, os.PathLike)):
        data = str(Path(model))
    else:
        data = model
    kwargs: dict[str, Any] = {}
    if disabled_optimizers:
        kwargs["disabled_optimizers"] = list(disabled_optimizers)
    return ort.InferenceSession(data, options, providers=list(providers or ["CPUExecutionProvider"]), **kwargs)
