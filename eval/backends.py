"""Which runner runs a model file: an explicit choice among the known backends, no registry.

Each backend's module is imported only when it is chosen, so evaluating an ONNX file never imports
torch's model zoo and a missing optional dependency (TensorRT) is one clear error, not an import failure
at start-up. A new backend is one more entry in :data:`BACKENDS` and one more branch in
:func:`open_runner` (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from centernet_edge.runtime.runners import RunnerError

if TYPE_CHECKING:
    from centernet_edge.runtime.runners import Runner, RunnerOptions
    from centernet_edge.runtime.spec import ModelSpec

__all__ = ["BACKENDS", "default_backend", "open_runner", "spec_for", "spec_for_checkpoint", "spec_for_engine"]

BACKENDS: dict[str, str] = {
    "ort": "ONNX Runtime (.onnx; CPU, CUDA when installed)",
    "torch": "PyTorch reference (.pth/.pt/.ckpt checkpoints)",
    "trt": "TensorRT engine (.engine/.plan; needs tensorrt and a GPU)",
}

_EXTENSIONS = {
    ".onnx": "ort",
    ".pth": "torch", ".pt": "torch", ".ckpt": "torch",
    ".engine": "trt", ".plan": "trt",
}


def default_backend(model_path: str | Path) -> str:
    """The backend for a model file by its extension."""
    ext = Path(model_path).suffix.lower()
    if ext not in _EXTENSIONS:
        known = ", ".join(f"{e} -> {b}" for e, b in sorted(_EXTENSIONS.items()))
        raise RunnerError(f"no default backend for {Path(model_path).name!r} (known: {known}); use --backend")
    return _EXTENSIONS[ext]


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise RunnerError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")


def spec_for(path: Path, backend: str, description: str | Path | None = None) -> ModelSpec | None:
    """A model file's spec: its side-car description, its ONNX metadata, an engine's side-car or a
    checkpoint's architecture; None for a backend whose runner supplies it."""
    from centernet_edge.runtime.spec import SpecError, load_spec

    if description is not None or path.suffix.lower() == ".onnx":
        try:
            return load_spec(path, description)
        except (SpecError, OSError):
            raise
        except Exception as exc:  # protobuf decode errors and the like: not an ONNX file at all
            raise SpecError(f"cannot read {path.name} as ONNX: {exc}") from exc
    if backend == "trt":
        return spec_for_engine(path)
    if backend == "torch":
        return spec_for_checkpoint(path)
    return None


def spec_for_engine(path: Path) -> ModelSpec:
    """The spec an engine's side-car carries (the runner re-checks the engine's sha256 against it)."""
    from centernet_edge.runtime.engine_meta import read_engine_meta

    return read_engine_meta(path).spec


def spec_for_checkpoint(path: Path) -> ModelSpec:
    """The reference spec of a checkpoint file (export's architectures describe it)."""
    from centernet_edge.export.checkpoints import CheckpointError, inspect_checkpoint
    from centernet_edge.export.torch_runner import checkpoint_spec

    try:
        return checkpoint_spec(inspect_checkpoint(path))
    except CheckpointError as exc:
        raise RunnerError(str(exc)) from exc


def open_runner(
    backend: str, model_path: str | Path, spec: ModelSpec | None = None, options: RunnerOptions | None = None
) -> Runner:
    """Build ``backend``'s runner for a model file; the caller closes it (or uses ``with``).

    Every failure that is about the user's files or options comes out as :class:`RunnerError`.
    """
    from centernet_edge.runtime.runners import OnnxRuntimeRunner, RunnerOptions

    _check_backend(backend)
    options = options or RunnerOptions()
    path = Path(model_path)
    if backend == "ort":
        return OnnxRuntimeRunner(
            path, spec, providers=options.providers, intra_op_threads=options.threads, keep_raw=options.keep_raw
        )
    if backend == "torch":
        from centernet_edge.export.checkpoints import CheckpointError
        from centernet_edge.export.torch_runner import TorchReferenceRunner

        try:
            return TorchReferenceRunner(
                path, spec, device=options.device, fp16=options.fp16, threads=options.threads,
                keep_raw=options.keep_raw,
            )
        except CheckpointError as exc:
            raise RunnerError(str(exc)) from exc
    try:
        from centernet_edge.runtime.trt_runner import TensorRTRunner
    except ImportError as exc:
        raise RunnerError(f"the trt backend is not available in this installation: {exc}") from exc
    return TensorRTRunner(path, spec, device=options.device, keep_raw=options.keep_raw)
