"""Backend runners: one object per (model, backend) that turns BGR images into detections.

Every runner follows :class:`Runner`: ``run(images) -> list[Detections]`` with the time split into
pre-processing, inference and post-processing (``last_timing``), and, when asked for with
``keep_raw``, the raw graph outputs by role (``raw_outputs``) so the evaluator can compare heatmaps.
Backends plug in by name through :func:`register_backend`; ``ort`` and ``torch`` are built in, a
TensorRT runner registers itself the same way.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .detections import Detections
from .spec import ModelSpec, load_spec

__all__ = [
    "OnnxRuntimeRunner",
    "Runner",
    "RunnerError",
    "RunnerOptions",
    "StageTimes",
    "TorchReferenceRunner",
    "available_backends",
    "backend_for_path",
    "checkpoint_spec",
    "create_runner",
    "register_backend",
    "resolve_providers",
    "runner_info",
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
    extra: dict[str, Any] = field(default_factory=dict)  # for plug-in backends


@runtime_checkable
class Runner(Protocol):
    """What the evaluator and the quantization tools need from a backend.

    Optional extras, read with ``getattr``: ``raw_outputs`` (dict role -> array of the last ``run``, or
    None) and ``describe()`` (backend, providers, precision, for reports); see :func:`runner_info`.
    """

    backend: str
    spec: ModelSpec
    precision: str
    last_timing: StageTimes | None

    def run(self, images: Sequence[np.ndarray]) -> list[Detections]: ...


def runner_info(runner: Runner) -> dict[str, Any]:
    """``runner.describe()`` when the backend offers it, else what the protocol guarantees."""
    describe = getattr(runner, "describe", None)
    if callable(describe):
        return dict(describe())
    return {"backend": runner.backend, "providers": [], "precision": runner.precision}


def _precision_of(spec: ModelSpec) -> str:
    return str(spec.provenance.get("precision", "fp32"))


# ---- ONNX Runtime ---------------------------------------------------------------------------------

_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


def resolve_providers(requested: Sequence[str] | None = None) -> list[str]:
    """Full ORT provider names; aliases (cpu, cuda, tensorrt) accepted, CPU always last as fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if not requested:
        chosen = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
    else:
        chosen = [_PROVIDER_ALIASES.get(p.lower(), p) for p in requested]
        missing = [p for p in chosen if p not in available]
        if missing:
            raise RunnerError(
                f"ONNX Runtime providers not available in this installation: {', '.join(missing)} "
                f"(available: {', '.join(available)})"
            )
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


_MAX_CHUNK = 16


def _chunks(items: Sequence[np.ndarray], size: int | None) -> list[list[np.ndarray]]:
    if not size:
        return [list(items)]
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


class OnnxRuntimeRunner:
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
        import onnxruntime as ort

        self.model_path = Path(model_path)
        self.spec = spec if spec is not None else load_spec(self.model_path, description)
        self.precision = _precision_of(self.spec)
        self.keep_raw = keep_raw
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = int(intra_op_threads)
            options.inter_op_num_threads = 1
        chosen = resolve_providers(providers)
        self.session = ort.InferenceSession(str(self.model_path), options, providers=chosen)
        self.last_timing: StageTimes | None = None
        self.raw_outputs: dict[str, np.ndarray] | None = None
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

    def run(self, images: Sequence[np.ndarray]) -> list[Detections]:
        from .postprocess import finalize
        from .preprocess import prepare_batch

        fixed = self.spec.graph.batch
        # Raw-image and keep_res inputs differ in size per image, so without a fixed batch they go one by
        # one; fixed-size inputs are batched, in bounded chunks to keep memory flat.
        varying = self.spec.graph.preprocess == "warp" or self.spec.preprocess.resize == "keep_res"
        size = fixed if fixed else (1 if varying else _MAX_CHUNK)
        results: list[Detections] = []
        pre = infer = post = 0.0
        raw: dict[str, list[np.ndarray]] = {}
        for chunk in _chunks(images, size):
            real = len(chunk)
            if fixed and real < fixed:
                chunk = chunk + [chunk[-1]] * (fixed - real)  # pad a fixed-batch graph, drop extras below
            t0 = time.perf_counter()
            feed, geoms = prepare_batch(chunk, self.spec)
            t1 = time.perf_counter()
            try:
                values = self.session.run(list(self._fetch.values()), {self._input_name: feed})
            except Exception as exc:  # ORT's own exception types are not importable in a stable way
                raise RunnerError(self._feed_error(feed, exc)) from exc
            t2 = time.perf_counter()
            by_role = {role: value[:real] for role, value in zip(self._fetch, values, strict=True)}
            if "detections" in by_role:
                self._check_detections(by_role["detections"])
            try:
                results.extend(finalize(by_role, self.spec, geoms[:real])[:real])
            except ValueError as exc:  # outputs that do not fit the spec's description
                raise RunnerError(f"{self.model_path.name}: {exc}") from exc
            t3 = time.perf_counter()
            pre, infer, post = pre + t1 - t0, infer + t2 - t1, post + t3 - t2
            if self.keep_raw:
                for role, value in by_role.items():
                    raw.setdefault(role, []).append(value)
        self.last_timing = StageTimes(pre * 1e3, infer * 1e3, post * 1e3, len(images))
        self.raw_outputs = {r: np.concatenate(v) for r, v in raw.items()} if self.keep_raw else None
        return results


# ---- PyTorch reference ----------------------------------------------------------------------------


def checkpoint_spec(info: Any, keep_res: bool = False) -> ModelSpec:
    """The reference spec of a checkpoint (its ``CheckpointInfo``): the same spec an export of it carries,
    for the plain network (normalised float input, raw heads out).

    Used when a .pth comes without ``--model-spec``; COCO class names and ids when it has 80 classes.
    """
    from dataclasses import replace

    from centernet_edge.export.models import ARCHITECTURES
    from centernet_edge.export.onnx_export import ExportOptions, build_spec

    options = ExportOptions(keep_res=keep_res, preprocess="none", decode=False)
    spec = build_spec(
        arch=info.arch, source=info.source, num_classes=int(info.num_classes), options=options,
        keep_res_pad=ARCHITECTURES[info.arch].keep_res_pad, class_names=getattr(info, "class_names", None),
        name=Path(info.path).stem, provenance={"checkpoint_sha256": info.sha256, "precision": "fp32"},
    )
    # The PyTorch modules return heatmap logits; an exported graph applies the sigmoid itself.
    spec.decode = replace(spec.decode, heatmap_activation="logits")
    return spec.validate()


class TorchReferenceRunner:
    """The PyTorch model from a checkpoint through the reference pre/post-processing.

    fp16 is offered only on CUDA: CPU half-precision kernels are slow and not what any edge target runs.
    """

    backend = "torch"

    def __init__(
        self,
        checkpoint_path: str | Path,
        spec: ModelSpec | None = None,
        *,
        device: str | None = None,
        fp16: bool = False,
        threads: int | None = None,
        keep_raw: bool = False,
    ) -> None:
        import torch

        from centernet_edge.export.checkpoints import load_checkpoint

        from .reference import ReferenceDetector

        self.model_path = Path(checkpoint_path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if fp16 and self.device.type != "cuda":
            raise RunnerError("torch fp16 is only supported on CUDA; drop fp16 or run on a GPU")
        if threads:
            torch.set_num_threads(int(threads))
        loaded = load_checkpoint(self.model_path)
        spec = spec if spec is not None else checkpoint_spec(loaded.info)
        # The PyTorch modules return heatmap logits for both sources, whatever an exported graph's spec
        # (which has sigmoid in-graph) says; decode must apply the sigmoid here.
        logits = dataclasses.replace(spec.decode, heatmap_activation="logits")
        self.spec = dataclasses.replace(spec, decode=logits)
        if self.spec.num_classes != loaded.num_classes:
            raise RunnerError(
                f"{self.model_path.name}: model spec has num_classes={self.spec.num_classes}, "
                f"the checkpoint {loaded.num_classes}"
            )
        self.dtype = torch.float16 if fp16 else torch.float32
        model = loaded.model.eval().to(self.device, dtype=self.dtype)
        self.precision = "fp16" if fp16 else "fp32"
        self.keep_raw = keep_raw
        self.detector = ReferenceDetector(model, self.spec, device=self.device)
        self.last_timing: StageTimes | None = None
        self.raw_outputs: dict[str, np.ndarray] | None = None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "providers": [str(self.device)], "precision": self.precision}

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, images: Sequence[np.ndarray]) -> list[Detections]:
        import torch

        from .decode import decode_torch, project_boxes
        from .reference import split_heads

        t0 = time.perf_counter()
        inputs, geoms = self.detector.preprocess(images)
        pre = time.perf_counter() - t0
        infer = post = 0.0
        results: list[Detections | None] = [None] * len(inputs)
        raw: dict[str, list[np.ndarray]] = {}
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(inputs):  # same-size inputs share a forward (keep_res sizes vary)
            groups.setdefault(x.shape, []).append(i)
        for members in groups.values():
            t1 = time.perf_counter()
            batch = torch.from_numpy(np.stack([inputs[i] for i in members])).to(self.device, self.dtype)
            with torch.no_grad():
                out = split_heads(self.detector.model(batch))
            heads = [h.float() if h is not None else None for h in out]
            self._sync()
            t2 = time.perf_counter()
            decoded = decode_torch(heads[0], heads[1], heads[2], self.spec.decode)
            boxes, scores = decoded.boxes.cpu().numpy(), decoded.scores.cpu().numpy()
            classes = decoded.classes.cpu().numpy()
            for j, i in enumerate(members):
                projected = project_boxes(boxes[j], geoms[i], self.spec.decode, frame="output")
                results[i] = Detections(projected, scores[j], classes[j])
            t3 = time.perf_counter()
            infer, post = infer + t2 - t1, post + t3 - t2
            if self.keep_raw:
                for role, head in zip(("heatmap", "wh", "reg"), heads, strict=True):
                    if head is not None:
                        raw.setdefault(role, []).append(head.cpu().numpy())
        self.last_timing = StageTimes(pre * 1e3, infer * 1e3, post * 1e3, len(images))
        # Mixed-size groups cannot be concatenated; keep raw heads only when they share one shape.
        self.raw_outputs = (
            {r: np.concatenate(v) for r, v in raw.items()} if self.keep_raw and len(groups) == 1 else None
        )
        return [r for r in results if r is not None]


# ---- registry -------------------------------------------------------------------------------------

RunnerFactory = Callable[[Path, "ModelSpec | None", RunnerOptions], Runner]
_BACKENDS: dict[str, RunnerFactory] = {}
_EXTENSIONS: dict[str, str] = {}


def register_backend(
    name: str, factory: RunnerFactory, *, extensions: Sequence[str] = (), replace: bool = False
) -> None:
    """Make ``factory(model_path, spec_or_None, options)`` available as backend ``name``.

    ``extensions`` (".engine") makes the backend the default for such files.
    """
    if name in _BACKENDS and not replace:
        raise ValueError(f"backend {name!r} is already registered")
    _BACKENDS[name] = factory
    for ext in extensions:
        _EXTENSIONS[ext.lower()] = name


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def backend_for_path(model_path: str | Path) -> str:
    """The default backend for a model file, by extension."""
    ext = Path(model_path).suffix.lower()
    if ext not in _EXTENSIONS:
        known = ", ".join(f"{e} -> {b}" for e, b in sorted(_EXTENSIONS.items()))
        raise RunnerError(f"no default backend for {Path(model_path).name!r} (known: {known}); use --backend")
    return _EXTENSIONS[ext]


def create_runner(
    backend: str, model_path: str | Path, spec: ModelSpec | None = None, options: RunnerOptions | None = None
) -> Runner:
    """Build the named backend's runner for a model file."""
    if backend not in _BACKENDS:
        raise RunnerError(f"unknown backend {backend!r}; available: {', '.join(available_backends())}")
    return _BACKENDS[backend](Path(model_path), spec, options or RunnerOptions())


def _ort_factory(path: Path, spec: ModelSpec | None, options: RunnerOptions) -> Runner:
    return OnnxRuntimeRunner(
        path, spec, providers=options.providers, intra_op_threads=options.threads, keep_raw=options.keep_raw
    )


def _torch_factory(path: Path, spec: ModelSpec | None, options: RunnerOptions) -> Runner:
    return TorchReferenceRunner(
        path, spec, device=options.device, fp16=options.fp16, threads=options.threads,
        keep_raw=options.keep_raw,
    )


register_backend("ort", _ort_factory, extensions=(".onnx",))
register_backend("torch", _torch_factory, extensions=(".pth", ".pt", ".ckpt"))
