"""One evaluation: several models (one of them the baseline) over one COCO image set.

Images are read once and fed to every model in turn, so the baseline's raw heatmap can be compared with
each candidate's on the spot and dropped (keeping heatmaps for a whole dataset would not fit in memory).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from centernet_edge.runtime.detections import Detections
from centernet_edge.runtime.hashing import file_sha256
from centernet_edge.runtime.images import ReadReport
from centernet_edge.runtime.runners import Runner, RunnerOptions, StageTimes, runner_info
from centernet_edge.runtime.spec import ModelSpec

from . import backends
from .agreement import AgreementAccumulator, AgreementStats, heatmap_probabilities
from .cache import CachedRun, ResultCache, cache_key
from .coco_eval import MAX_DETS, CocoMetrics, evaluate_coco, to_coco_results
from .dataset import CocoDataset, DatasetError, check_model_classes, model_category_ids

__all__ = [
    "EvaluationResult",
    "LatencyStats",
    "ModelEntry",
    "ModelRun",
    "evaluate_models",
    "protocol_differences",
    "protocol_of",
    "resolve_model",
]


def protocol_of(spec: ModelSpec, clip_boxes: bool = True) -> dict[str, Any]:
    """The settings that change AP without changing the network: input geometry, decode, eval rules.

    Two rows are comparable as a pure precision/backend delta only when these agree.
    """
    pre, dec = spec.preprocess, spec.decode
    keep_res = pre.resize == "keep_res"
    return {
        "resize": pre.resize,
        "input_size": None if keep_res else list(pre.input_size or ()),
        "pad": pre.pad if keep_res else None,
        "K": dec.K,
        "topk": dec.topk,
        "peak_kernel": dec.peak_kernel,
        "max_dets": MAX_DETS,
        "score_threshold": None,
        "score_rounding": None,
        # Boxes clipped to the image before scoring; upstream's evaluation does not clip (--no-clip).
        "clip_boxes": bool(clip_boxes),
    }


def protocol_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Human-readable ``key: a vs b`` for each protocol setting that differs."""
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def input_mode(spec: ModelSpec) -> str:
    pre = spec.preprocess
    if pre.resize == "keep_res":
        return f"keep_res (pad {pre.pad})"
    h, w = pre.input_size or (0, 0)
    return f"{pre.resize} {w}x{h}"


@dataclass
class ModelEntry:
    """A model to evaluate, resolved but not yet loaded."""

    label: str
    model_path: Path
    spec: ModelSpec | None  # None only for plug-in backends whose runner supplies it
    backend: str
    sha256: str
    warnings: list[str] = field(default_factory=list)
    fp16: bool = False  # backends that cast the model themselves (torch) run it in half precision

    @property
    def precision(self) -> str:
        return str(self.spec.provenance.get("precision", "fp32"))


def resolve_model(
    model_path: str | Path, description: str | Path | None, backend: str | None, label: str
) -> ModelEntry:
    """Find the backend and spec of a model file: side-car description, ONNX metadata, or checkpoint."""
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    backend = backend or backends.default_backend(path)
    spec = backends.spec_for(path, backend, description)
    return ModelEntry(label, path, spec, backend, file_sha256(path))


@dataclass
class LatencyStats:
    """Per-image milliseconds (batch 1), median and 90th percentile per stage, and images per second."""

    images: int
    median: dict[str, float]
    p90: dict[str, float]
    throughput: float

    @classmethod
    def from_timings(cls, timings: Sequence[StageTimes]) -> LatencyStats | None:
        if not timings:
            return None
        per_stage = {
            "pre": [t.pre_ms / t.images for t in timings],
            "infer": [t.infer_ms / t.images for t in timings],
            "post": [t.post_ms / t.images for t in timings],
            "total": [t.total_ms / t.images for t in timings],
        }
        total_ms = sum(t.total_ms for t in timings)
        images = sum(t.images for t in timings)
        return cls(
            images=images,
            median={k: float(statistics.median(v)) for k, v in per_stage.items()},
            p90={k: float(np.percentile(v, 90)) for k, v in per_stage.items()},
            throughput=images / (total_ms / 1e3) if total_ms > 0 else float("nan"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, "median_ms": self.median, "p90_ms": self.p90,
                "throughput_ips": self.throughput}


@dataclass
class ModelRun:
    """Everything measured for one model."""

    entry: ModelEntry
    runner_info: dict[str, Any]
    detections: dict[int, Detections]
    timings: list[StageTimes]
    metrics: CocoMetrics | None = None
    agreement: AgreementStats | None = None
    cached: bool = False

    @property
    def latency(self) -> LatencyStats | None:
        return LatencyStats.from_timings(self.timings)


@dataclass
class EvaluationResult:
    dataset: CocoDataset
    runs: list[ModelRun]
    baseline: int
    agreements: dict[str, AgreementAccumulator]
    options: dict[str, Any]
    reads: ReadReport = field(default_factory=ReadReport)  # images skipped as unreadable, with reasons
    image_ids: list[int] = field(default_factory=list)  # the images scored (the readable ones)

    @property
    def baseline_run(self) -> ModelRun:
        return self.runs[self.baseline]


def _cache_protocol(entry: ModelEntry, options: RunnerOptions, clip_boxes: bool) -> dict[str, Any]:
    spec = entry.spec.to_dict()
    spec.pop("provenance", None)  # free text (notes, dates) must not invalidate results
    return {"spec": spec, "eval": protocol_of(entry.spec, clip_boxes), "backend": entry.backend,
            "providers": options.providers, "fp16": entry.fp16 or options.fp16}


def evaluate_models(
    entries: Sequence[ModelEntry],
    dataset: CocoDataset,
    baseline: int = 0,
    options: RunnerOptions | None = None,
    cache: ResultCache | None = None,
    limit: int | None = None,
    progress: bool = True,
    agreement_iou: float = 0.5,
    agreement_min_score: float = 0.3,
    warmup: int = 1,
    runner_factory: Callable[[ModelEntry, RunnerOptions], Runner] | None = None,
    strict: bool = False,
    clip_boxes: bool = True,
) -> EvaluationResult:
    """Run every model over ``dataset`` (baseline restored from ``cache`` when possible) and score them.

    Unreadable images are skipped for every model and left out of the scoring (named in
    ``EvaluationResult.reads``); ``strict`` raises at the first one instead. Boxes are clipped to their
    image before anything is compared or scored.
    """
    from tqdm import tqdm

    options = options or RunnerOptions()
    factory = runner_factory or (lambda e, o: backends.open_runner(e.backend, e.model_path, e.spec, o))
    cached: CachedRun | None = None
    key = None
    base_entry = entries[baseline]
    if cache is not None and base_entry.spec is not None:
        key = cache_key(base_entry.sha256, dataset.fingerprint, _cache_protocol(base_entry, options, clip_boxes), limit)
        cached = cache.load(key)

    # Heatmaps are only worth fetching when a live baseline has someone to be compared with.
    keep_raw = options.keep_raw and cached is None and len(entries) > 1
    for entry in entries:  # fail on class tables before paying for any model load
        if entry.spec is not None:
            entry.warnings.extend(check_model_classes(entry.spec, dataset))
    runners: dict[int, Runner] = {}
    runs: list[ModelRun] = []
    for i, entry in enumerate(entries):
        if i == baseline and cached is not None:
            info = cached.meta.get("runner", {})
            # Accuracy only: a latency measured in another session is not comparable with fresh ones.
            runs.append(ModelRun(entry, info, cached.detections, [], cached=True))
            continue
        fp16 = entry.fp16 or options.fp16
        runner = factory(entry, dataclasses.replace(options, keep_raw=keep_raw, fp16=fp16))
        if entry.spec is None:  # plug-in backends may only know it once loaded
            entry.warnings.extend(check_model_classes(runner.spec, dataset))
        entry.spec = runner.spec
        runners[i] = runner
        runs.append(ModelRun(entry, runner_info(runner), {}, []))

    first = next((img for i in dataset.image_ids if (img := dataset.load_image(i)) is not None), None)
    if first is None:
        reads = ReadReport()
        for image_id in dataset.image_ids:
            dataset.load_image(image_id, reads)
        raise DatasetError(f"none of the {len(dataset.image_ids)} image(s) could be read: {reads.skip_line()}")
    if warmup and runners:
        for runner in runners.values():
            for _ in range(warmup):  # first calls pay for lazy allocation and kernel selection
                runner.run([first])

    agreements = {run.entry.label: AgreementAccumulator(agreement_iou, agreement_min_score)
                  for i, run in enumerate(runs) if i != baseline}
    desc = f"evaluating {len(entries)} model(s)"
    reads = ReadReport(strict=strict)
    scored: list[int] = []
    for image_id in tqdm(dataset.image_ids, desc=desc, unit="img", disable=not progress):
        image = dataset.load_image(image_id, reads)
        if image is None:
            continue
        scored.append(image_id)
        heat: dict[int, np.ndarray | None] = {}
        for i, runner in runners.items():
            dets = runner.run([image])[0]
            runs[i].detections[image_id] = dets.clipped(*image.shape[:2]) if clip_boxes else dets
            runs[i].timings.append(runner.last_timing)  # type: ignore[arg-type]
            raw = getattr(runner, "raw_outputs", None)
            heat[i] = heatmap_probabilities(raw["heatmap"], runner.spec) if raw and "heatmap" in raw else None
        base_dets = runs[baseline].detections[image_id]
        for i, run in enumerate(runs):
            if i != baseline:
                agreements[run.entry.label].add(image_id, base_dets, run.detections[image_id],
                                                heat.get(baseline), heat.get(i))
    for runner in runners.values():
        runner.close()

    note = "" if cached is None else "baseline restored from cache: no heatmap comparison (use --no-cache)"
    for i, run in enumerate(runs):
        detections = {image_id: run.detections[image_id] for image_id in scored}
        results = to_coco_results(detections, model_category_ids(run.entry.spec))
        run.metrics = evaluate_coco(dataset.coco, results, scored)
        if i != baseline:
            run.agreement = agreements[run.entry.label].result(note)

    if cache is not None and key is not None and cached is None:
        base = runs[baseline]
        cache.store(key, CachedRun(base.detections, {"runner": base.runner_info,
                                                     "model": base.entry.model_path.name}))
    opts = {"clip_boxes": clip_boxes, "providers": options.providers, "threads": options.threads,
            "warmup": warmup, "limit": limit, "agreement_iou": agreement_iou,
            "agreement_min_score": agreement_min_score}
    return EvaluationResult(dataset, runs, baseline, agreements, opts, reads, scored)
