"""The runner protocol and the ONNX Runtime runner: one object per (model, backend) that turns BGR images
into detections.

Every backend implements :class:`Runner` (this module's ONNX Runtime runner, the PyTorch runner in
``export/torch_runner.py``, the TensorRT runner in ``runtime/trt_runner.py``):

* ``run(images) -> list[Detections]``: raw BGR uint8 images in, detections in original pixels out, through
  the spec's pre-processing, the model and the one outputs -> detections path (``runtime/postprocess.py``);
* ``run_raw(inputs) -> dict[role, array]``: an already prepared graph input in, the model's outputs by role
  (``detections`` or ``heatmap``/``wh``/``reg``) out;
* a lifecycle: ``close()``, or use the runner as a context manager;
* timing: ``last_timing`` (pre/inference/post of the last ``run``) and ``add_timing_hook(fn)``, called with
  every run's :class:`StageTimes`;
* ``raw_outputs`` (outputs by role of the last ``run`` when built with ``keep_raw``) and ``describe()``.

Which backend runs a model file is chosen explicitly by the caller (``eval/backends.py``); the runtime
keeps no registry and imports nothing above itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .detections import Detections
from .onnx_session import SessionError, create_session, resolve_providers
from .spec import ModelSpec, load_spec

__all__ = [
    "OnnxRuntimeRunner",
    "Runner",
    "RunnerBase",
    "RunnerError",
    "RunnerOptions",
    "StageTimes",
    "fill_fixed_batch",
    "run_by_role",
    "runner_info",
    "session_roles",
]


class RunnerError(RuntimeError):
    """A runner cannot be built for this model/backend, or the model does not match its spec."""


@dataclass(frozen=True)
class StageTimes:
    """Wall-clock milliseconds of one ``run`` call, split by stage, for ``images`` images."""

    pre_ms: float
    infer_ms: float
    post_ms: float
    images: int

    @property
    def total_ms(self) -> float:
        return self.pre_ms + self.infer_ms + self.post_ms


@dataclass
class RunnerOptions:
    """Backend-neutral knobs; each backend reads the ones it understands."""

    providers: list[str] | None = None  # ORT execution providers; None = CUDA when available, else CPU
    threads: int | None = None  # intra-op threads (ORT session / torch)
    device: str | None = None  # torch device; None = cuda when available, else cpu
    fp16: bool = False  # torch only, and only on CUDA
    keep_raw: bool = False  # keep raw head outputs of the last run in ``raw_outputs``
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific settings


@runtime_checkable
class Runner(Protocol):
    """What the evaluator, the Python API and the quantization tools need from a backend."""

    backend: str
    spec: ModelSpec
    precision: str
    last_timing: StageTimes | None
    raw_outputs: dict[str, np.ndarray] | None

    def run(self, images: Sequence[np.ndarray]) -> list[Detections]: ...

    def run_raw(self, inputs: np.ndarray) -> dict[str, np.ndarray]: ...

    def describe(self) -> dict[str, Any]: ...

    def add_timing_hook(self, hook: Callable[[StageTimes], None]) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: object) -> None: ...


class RunnerBase:
    """The lifecycle and timing plumbing every runner shares; backends implement ``run``/``run_raw``."""

    backend = "base"
    spec: ModelSpec
    precision: str = "fp32"

    def __init__(self) -> None:
        self.last_timing: StageTimes | None = None
        self.raw_outputs: dict[str, np.ndarray] | None = None
        self._timing_hooks: list[Callable[[StageTimes], None]] = []
        self.closed = False

    def add_timing_hook(self, hook: Callable[[StageTimes], None]) -> None:
        self._timing_hooks.append(hook)

    def _record(self, times: StageTimes) -> None:
        self.last_timing = times
        for hook in self._timing_hooks:
            hook(times)

    def _check_open(self) -> None:
        if self.closed:
            raise RunnerError(f"{self.backend} runner is closed")

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "providers": [], "precision": self.precision}

    def close(self) -> None:
        """Release the session/model; further runs raise :class:`RunnerError`."""
        self.closed = True

    def __enter__(self) -> RunnerBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def runner_info(runner: Runner) -> dict[str, Any]:
    """``runner.describe()`` when the backend offers it, else what the protocol guarantees."""
    describe = getattr(runner, "describe", None)
    if callable(describe):
        return dict(describe())
    return {"backend": runner.backend, "providers": [], "precision": runner.precision}


def precision_of(spec: ModelSpec) -> str:
    """The precision a spec's provenance records (calibration artifacts say int8/fp16), fp32 otherwise."""
    return str(spec.provenance.get("precision", "fp32"))


def fill_fixed_batch(batch: np.ndarray, size: int | None) -> np.ndarray:
    """A graph with a fixed batch dimension takes exactly ``size`` rows: fill a short batch with copies of
    its last row (their results are discarded). Every inference path fills this way; calibration instead
    drops a partial batch, since copies would bias its statistics (``calib_data/batches.py``)."""
    if not size or len(batch) == size:
        return batch
    if len(batch) > size:
        raise RunnerError(f"a batch of {len(batch)} does not fit the graph's fixed batch of {size}")
    return np.concatenate([batch, np.repeat(batch[-1:], size - len(batch), axis=0)])


def session_roles(session: Any, spec: ModelSpec) -> dict[str, str]:
    """role -> output name for every output of an ONNX Runtime session: the spec's roles, and any other
    output (heads exposed for verification) under its own name."""
    role_of = {info.name: role for role, info in spec.graph.outputs.items()}
    return {role_of.get(o.name, o.name): o.name for o in session.get_outputs()}


def run_by_role(session: Any, spec: ModelSpec, inputs: np.ndarray,
                fetch: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """The one graph-outputs path: run a session on a prepared batch and key what it returns by role.

    ``fetch`` (role -> output name) defaults to :func:`session_roles`. A fixed-batch graph gets a filled
    batch (:func:`fill_fixed_batch`) and the filler rows are cut off again. Every caller then hands the
    result to :func:`centernet_edge.runtime.postprocess.finalize` for detections.
    """
    fetch = fetch if fetch is not None else session_roles(session, spec)
    feed = fill_fixed_batch(inputs, spec.graph.batch)
    values = session.run(list(fetch.values()), {spec.graph.input.name: feed})
    return {role: value[: len(inputs)] for role, value in zip(fetch, values, strict=True)}


# ---- ONNX Runtime ---------------------------------------------------------------------------------


_MAX_CHUNK = 16


def _chunks(items: Sequence[np.ndarray], size: int | None) -> list[list[np.ndarray]]:
    if not size:
        return [list(items)]
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


class OnnxRuntimeRunner(RunnerBase):
    """Runs a CenterNet ONNX (our export or a described foreign graph) with ONNX Runtime."""

    backend = "ort"

    def __init__(
        self,
        model_path: str | Path,
        spec: ModelSpec | None = None,
        *,
        description: str | Path | None = None,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        keep_raw: bool = False,
    ) -> None:
        super().__init__()
        self.model_path = Path(model_path)
        self.spec = spec if spec is not None else load_spec(self.model_path, description)
        self.precision = precision_of(self.spec)
        self.keep_raw = keep_raw
        try:
            chosen = resolve_providers(providers)
        except SessionError as exc:
            raise RunnerError(str(exc)) from exc
        self.session = create_session(self.model_path, threads=intra_op_threads, providers=chosen, quiet=False)
        self._input_name, self._fetch = self._bind()

    def _bind(self) -> tuple[str, dict[str, str]]:
        """Check the spec's tensor names against the graph: a wrong description fails here, not later."""
        graph = self.spec.graph
        inputs = [i.name for i in self.session.get_inputs()]
        if graph.input.name not in inputs:
            raise RunnerError(
                f"{self.model_path.name}: model spec names input {graph.input.name!r}, the graph has "
                f"{', '.join(inputs)}"
            )
        outputs = {o.name for o in self.session.get_outputs()}
        missing = {role: info.name for role, info in graph.outputs.items() if info.name not in outputs}
        if missing:
            raise RunnerError(
                f"{self.model_path.name}: model spec names outputs the graph lacks: {missing} "
                f"(graph outputs: {', '.join(sorted(outputs))})"
            )
        roles = graph.outputs
        if not self.keep_raw and "detections" in roles:
            # Fetching only what decoding needs keeps device-to-host copies out of the timing.
            roles = {"detections": roles["detections"]}
        return graph.input.name, {role: info.name for role, info in roles.items()}

    def _check_detections(self, value: np.ndarray) -> None:
        """Rows must be (x1, y1, x2, y2, score, class): a transposed or foreign layout is refused, not scored."""
        declared = self.spec.graph.outputs["detections"].shape
        got = list(np.shape(value))
        # The batch axis is left out: a padded fixed-batch run is cut back to the real images.
        fixed_ok = len(got) == len(declared) and all(
            not isinstance(d, int) or d == g for d, g in zip(declared[1:], got[1:], strict=True))
        if len(got) != 3 or got[2] != 6 or not fixed_ok:
            raise RunnerError(
                f"{self.model_path.name}: output {self.spec.graph.outputs['detections'].name!r} has shape {got}, "
                f"expected [N, K, 6] rows (x1, y1, x2, y2, score, class) as the model spec declares {declared}"
            )

    def _feed_error(self, feed: np.ndarray, exc: Exception) -> str:
        expected = self.session.get_inputs()[0]
        return (
            f"{self.model_path.name}: inference failed on a {feed.dtype} {list(feed.shape)} input; the graph "
            f"expects {expected.type} {expected.shape} (check the model spec's graph.preprocess, input size "
            f"and layout): {str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}"
        )

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "providers": self.providers, "precision": self.precision}

    def run_raw(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs by role for a prepared input batch (a fixed-batch graph's filler rows are
        cut off again)."""
        self._check_open()
        try:
            return run_by_role(self.session, self.spec, inputs, self._fetch)
        except RunnerError:
            raise
        except Exception as exc:  # ORT's own exception types are not importable in a stable way
            raise RunnerError(self._feed_error(inputs, exc)) from exc

    def run(self, images: Sequence[np.ndarray]) -> list[Detections]:
        from .postprocess import finalize
        from .preprocess import prepare_batch

        self._check_open()
        fixed = self.spec.graph.batch
        # Raw-image and keep_res inputs differ in size per image, so without a fixed batch they go one by
        # one; fixed-size inputs are batched, in bounded chunks to keep memory flat.
        varying = self.spec.graph.preprocess == "warp" or self.spec.preprocess.resize == "keep_res"
        size = fixed if fixed else (1 if varying else _MAX_CHUNK)
        results: list[Detections] = []
        pre = infer = post = 0.0
        raw: dict[str, list[np.ndarray]] = {}
        for chunk in _chunks(images, size):
            t0 = time.perf_counter()
            feed, geoms = prepare_batch(chunk, self.spec)
            t1 = time.perf_counter()
            by_role = self.run_raw(feed)
            t2 = time.perf_counter()
            if "detections" in by_role:
                self._check_detections(by_role["detections"])
            try:
                results.extend(finalize(by_role, self.spec, geoms))
            except ValueError as exc:  # outputs that do not fit the spec's description
                raise RunnerError(f"{self.model_path.name}: {exc}") from exc
            t3 = time.perf_counter()
            pre, infer, post = pre + t1 - t0, infer + t2 - t1, post + t3 - t2
            if self.keep_raw:
                for role, value in by_role.items():
                    raw.setdefault(role, []).append(value)
        self.raw_outputs = {r: np.concatenate(v) for r, v in raw.items()} if self.keep_raw else None
        self._record(StageTimes(pre * 1e3, infer * 1e3, post * 1e3, len(images)))
        return results

    def close(self) -> None:
        self.session = None
        super().close()
