"""The front door's ``calibrate`` and ``evaluate``: the command-line pipelines with keyword arguments.

They build the same option objects the CLIs build and call the same entry points
(:func:`centernet_edge.quantize.pipeline.calibrate`, :func:`centernet_edge.eval.evaluate.evaluate_models`),
so a script and a shell session give the same artifacts and numbers.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from centernet_edge.eval.evaluate import EvaluationResult
    from centernet_edge.quantize.pipeline import CalibrateResult

__all__ = ["calibrate", "evaluate"]

PathLike = str | os.PathLike[str]


def calibrate(model: PathLike, images: PathLike, output_dir: PathLike, **options: Any) -> CalibrateResult:
    """Calibrate an fp32 ONNX on ``images`` (a folder, a list file or a COCO json) into ``output_dir``.

    Writes what ``centernet-calibrate`` writes (calibration.cache, summary.json, int8 Q/DQ and CPU int8 and
    fp16 models, ...) and returns the :class:`~centernet_edge.quantize.pipeline.CalibrateResult`
    (``.artifacts`` maps each kind to its file). ``options`` are the fields of
    :class:`~centernet_edge.quantize.pipeline.CalibrateOptions`, e.g. ``num_images=500``, ``int8=True``,
    ``fp16=False``, ``method="auto"``, ``model_spec="foreign.json"``, ``progress=False``.
    """
    from centernet_edge.quantize.pipeline import CalibrateOptions
    from centernet_edge.quantize.pipeline import calibrate as run_calibration

    known = {f.name for f in dataclasses.fields(CalibrateOptions)} - {"model", "images", "out_dir"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown calibrate option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key in ("model_spec", "images_dir", "stats_cache"):
        if options.get(key) is not None:
            options[key] = Path(options[key])
    return run_calibration(CalibrateOptions(model=Path(model), images=Path(images), out_dir=Path(output_dir),
                                            **options))


def evaluate(
    models: PathLike | Sequence[PathLike],
    images: PathLike,
    annotations: PathLike,
    *,
    model_specs: PathLike | Sequence[PathLike | None] | None = None,
    baseline: int = 0,
    backend: str | None = None,
    limit: int | None = None,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    heatmaps: bool = True,
    cache_dir: PathLike | None = None,
    agreement_score: float = 0.3,
    warmup: int = 1,
    output_dir: PathLike | None = None,
    progress: bool = True,
    strict: bool = False,
) -> EvaluationResult:
    """COCO accuracy, agreement with the baseline and latency of ``models`` on ``images`` + ``annotations``.

    Returns the evaluator's :class:`~centernet_edge.eval.evaluate.EvaluationResult`: ``result.runs[i]`` per
    model with ``.metrics.stats["AP"]`` (0..1), ``.agreement``, ``.latency`` and ``.detections`` by image id.
    ``model_specs``: one description for all models or one per model (None = the model's own spec).
    ``output_dir``: also write report.md and report.json there, as ``centernet-eval`` does. The baseline is
    re-run unless ``cache_dir`` is given (the CLI caches by default). ``strict``: fail on an unreadable image
    instead of skipping it.
    """
    from centernet_edge.eval.cache import ResultCache
    from centernet_edge.eval.cli import _labels as unique_labels
    from centernet_edge.eval.dataset import load_coco_dataset
    from centernet_edge.eval.evaluate import evaluate_models, resolve_model
    from centernet_edge.runtime.runners import RunnerOptions

    paths = [Path(models)] if isinstance(models, (str, os.PathLike)) else [Path(m) for m in models]
    if not paths:
        raise ValueError("evaluate needs at least one model")
    if model_specs is None or isinstance(model_specs, (str, os.PathLike)):
        specs: list[PathLike | None] = [model_specs] * len(paths)
    else:
        specs = list(model_specs)
        if len(specs) != len(paths):
            raise ValueError(f"model_specs has {len(specs)} entries for {len(paths)} models")
    if not 0 <= baseline < len(paths):
        raise ValueError(f"baseline must index one of the {len(paths)} models; got {baseline}")
    labels = unique_labels(paths, [None] * len(paths))
    entries = [resolve_model(path, spec, backend, label) for path, spec, label in zip(paths, specs, labels,
                                                                                      strict=True)]
    dataset = load_coco_dataset(annotations, images, limit)
    options = RunnerOptions(providers=list(providers) if providers else None, threads=threads, keep_raw=heatmaps)
    cache = ResultCache(Path(cache_dir)) if cache_dir is not None else None
    result = evaluate_models(entries, dataset, baseline, options, cache=cache, limit=limit, progress=progress,
                             agreement_min_score=agreement_score, warmup=warmup, strict=strict)
    if output_dir is not None:
        from centernet_edge.eval.report import build_report, write_report

        write_report(build_report(result), Path(output_dir))
    return result
