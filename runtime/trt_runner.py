"""A :class:`~.runners.Runner` for TensorRT engines built by ``centernet-build``.

Same pre/post-processing and Detections as the ONNX Runtime runner; the engine's inputs and outputs are
bound by name, device buffers are torch CUDA tensors (no pycuda), shapes are set per call within the
engine's optimisation profile, and inference is timed with CUDA events. The engine's side-car
(``model.engine.json``) supplies the spec and is checked first: a swapped engine (sha256), an engine from
another TensorRT version (unless version-compatible) or a spec that disagrees with it is refused before
TensorRT deserializes anything. ``tensorrt`` and ``torch.cuda`` are imported only once a GPU is known
to be there.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cuda_probe import tensorrt_installed, torch_cuda_available
from .detections import Detections
from .engine_meta import EngineMeta, read_engine_meta, verify_engine
from .runners import RunnerBase, RunnerError, StageTimes, fill_fixed_batch
from .spec import ModelSpec

__all__ = ["TensorRTRunner", "check_spec_matches"]

_MAX_CHUNK = 16
_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "INT8": "int8",
                 "UINT8": "uint8", "BOOL": "bool"}


def check_spec_matches(meta: EngineMeta, spec: ModelSpec | None) -> ModelSpec:
    """The spec to run with: the side-car's, or a given one that agrees with it (provenance aside)."""
    if spec is None:
        return meta.spec
    ours, theirs = meta.spec.to_dict(), spec.to_dict()
    ours.pop("provenance"), theirs.pop("provenance")
    differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differing:
        raise RunnerError(f"the given model spec disagrees with the engine's side-car in {', '.join(differing)}; "
                          "the engine was built for the side-car's")
    return spec


def _same_line(built: str, running: str) -> bool:
    return built.split(".")[:3] == running.split(".")[:3]


class TensorRTRunner(RunnerBase):
    """Runs a serialized TensorRT engine on the current CUDA device."""

    backend = "trt"

    def __init__(self, engine_path: str | Path, spec: ModelSpec | None = None, *, device: str | None = None,
                 keep_raw: bool = False) -> None:
        super().__init__()
        self.model_path = Path(engine_path)
        self.meta = read_engine_meta(self.model_path)
        verify_engine(self.model_path, self.meta)
        self.spec = check_spec_matches(self.meta, spec)
        self.precision = str(self.spec.provenance.get("precision", self.meta.precision))
        self.keep_raw = keep_raw
        self.last_engine_ms: float | None = None
        if not tensorrt_installed():
            raise RunnerError("TensorRT is not installed; the trt backend needs it on the machine with the GPU")
        if not torch_cuda_available():  # probed before tensorrt is imported: its runtime crashes without a GPU
            raise RunnerError("the trt backend needs an NVIDIA GPU and a CUDA build of torch; none is visible")
        import tensorrt as trt
        import torch

        running = str(trt.__version__)
        if not self.meta.version_compatible and not _same_line(self.meta.tensorrt_version, running):
            raise RunnerError(f"{self.model_path.name} was built with TensorRT {self.meta.tensorrt_version}; this is "
                              f"{running}. Rebuild it here, or build it --version-compatible")
        self._trt, self._torch = trt, torch
        self.device = torch.device(device or "cuda")
        self._logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self._logger, "")
        self._runtime = trt.Runtime(self._logger)
        if self.meta.version_compatible:
            self._runtime.engine_host_code_allowed = True
        self.engine = self._runtime.deserialize_cuda_engine(self.model_path.read_bytes())
        if self.engine is None:
            raise RunnerError(f"TensorRT could not deserialize {self.model_path.name} (see its messages above)")
        self.context = self.engine.create_execution_context()
        self._inputs, self._outputs = self._bind()
        self._stream = torch.cuda.Stream(self.device)

    def _bind(self) -> tuple[list[str], dict[str, str]]:
        trt = self._trt
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = {n for n in names if n not in inputs}
        graph = self.spec.graph
        if inputs != [graph.input.name]:
            raise RunnerError(f"{self.model_path.name}: engine inputs {inputs}, the model spec names "
                              f"{graph.input.name!r}")
        missing = {role: t.name for role, t in graph.outputs.items() if t.name not in outputs}
        if missing:
            raise RunnerError(f"{self.model_path.name}: the engine lacks outputs the spec names: {missing}")
        roles = graph.outputs
        if not self.keep_raw and "detections" in roles:
            roles = {"detections": roles["detections"]}
        return inputs, {role: info.name for role, info in roles.items()}

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "providers": [f"TensorRT {self._trt.__version__}", str(self.device)],
                "precision": self.precision}

    def _profile_limits(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        lo, _, hi = self.engine.get_tensor_profile_shape(self._inputs[0], 0)
        return tuple(lo), tuple(hi)

    def _torch_dtype(self, name: str) -> Any:
        key = str(self.engine.get_tensor_dtype(name)).rsplit(".", 1)[-1]
        return getattr(self._torch, _TORCH_DTYPES[key])

    def _infer(self, feed: np.ndarray) -> tuple[dict[str, np.ndarray], float, float]:
        torch = self._torch
        lo, hi = self._profile_limits()
        shape = tuple(feed.shape)
        if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi, strict=True)):
            raise RunnerError(f"{self.model_path.name}: input {list(shape)} is outside the engine's profile "
                              f"{list(lo)}..{list(hi)}; rebuild with centernet-build --min-size/--max-size/--batch")
        name = self._inputs[0]
        with torch.cuda.stream(self._stream):
            start, before_run, after_run, end = (torch.cuda.Event(enable_timing=True) for _ in range(4))
            start.record(self._stream)
            device_in = torch.from_numpy(np.ascontiguousarray(feed)).to(self.device, self._torch_dtype(name),
                                                                        non_blocking=False)
            self.context.set_input_shape(name, shape)
            self.context.set_tensor_address(name, device_in.data_ptr())
            buffers = {}
            for tensor in [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]:
                if tensor == name:
                    continue
                out_shape = tuple(self.context.get_tensor_shape(tensor))
                buffers[tensor] = torch.empty(out_shape, dtype=self._torch_dtype(tensor), device=self.device)
                self.context.set_tensor_address(tensor, buffers[tensor].data_ptr())
            before_run.record(self._stream)
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise RunnerError(f"{self.model_path.name}: TensorRT execution failed")
            after_run.record(self._stream)
            host = {role: buffers[tensor].float().cpu().numpy() for role, tensor in self._outputs.items()}
            end.record(self._stream)
        end.synchronize()
        return host, start.elapsed_time(end), before_run.elapsed_time(after_run)

    def run_raw(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """The engine's outputs by role for a prepared input batch (a fixed batch is filled, then cut)."""
        self._check_open()
        values, _, _ = self._infer(fill_fixed_batch(inputs, self.spec.graph.batch))
        return {role: value[: len(inputs)] for role, value in values.items()}

    def run(self, images: Sequence[np.ndarray]) -> list[Detections]:
        from .postprocess import finalize
        from .preprocess import prepare_batch

        self._check_open()
        _, hi = self._profile_limits()
        varying = self.spec.graph.preprocess == "warp" or self.spec.preprocess.resize == "keep_res"
        size = self.spec.graph.batch or (1 if varying else max(1, min(hi[0], _MAX_CHUNK)))
        results: list[Detections] = []
        pre = infer = post = engine_ms = 0.0
        raw: dict[str, list[np.ndarray]] = {}
        for i in range(0, len(images), size):
            t0 = time.perf_counter()
            feed, geoms = prepare_batch(list(images[i:i + size]), self.spec)
            t1 = time.perf_counter()
            values, gpu_ms, run_ms = self._infer(fill_fixed_batch(feed, self.spec.graph.batch))
            t2 = time.perf_counter()
            by_role = {role: value[: len(geoms)] for role, value in values.items()}
            results.extend(finalize(by_role, self.spec, geoms))
            t3 = time.perf_counter()
            pre, infer, post, engine_ms = pre + t1 - t0, infer + gpu_ms / 1e3, post + t3 - t2, engine_ms + run_ms
            if self.keep_raw:
                for role, value in by_role.items():
                    raw.setdefault(role, []).append(value)
        # Inference time is the CUDA-event span of copy-in, execution and copy-out (what ORT's run covers).
        self.last_engine_ms = engine_ms
        same_shape = all(len({v.shape[1:] for v in values}) == 1 for values in raw.values())
        self.raw_outputs = ({r: np.concatenate(v) for r, v in raw.items()}
                            if self.keep_raw and same_shape else None)
        self._record(StageTimes(pre * 1e3, infer * 1e3, post * 1e3, len(images)))
        return results

    def close(self) -> None:
        self.context = None
        self.engine = None
        super().close()
