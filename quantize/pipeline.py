"""``centernet-calibrate`` as a Python API: one calibration run -> one output folder.

Order of work: calibration set -> streaming statistics -> per-tensor amax (TensorRT cache + summary) ->
[int8] label-free sensitivity and mixed precision (only when float layers are allowed) -> TensorRT Q/DQ
model + ONNX Runtime CPU int8 model -> [fp16] fp16 model. Every decision (method in ``auto`` mode, which
layers stay float) uses only the calibration images; annotations are never read here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from centernet_edge.calib_data.batches import effective_batch_size
from centernet_edge.calib_data.sources import CalibrationSet, load_calibration_set
from centernet_edge.runtime.atomic import atomic_write_text, staged_dir
from centernet_edge.runtime.cli_common import check_output_dir
from centernet_edge.runtime.hashing import file_sha256
from centernet_edge.runtime.images import UnreadableImageError, read_bgr
from centernet_edge.runtime.onnx_graph import ensure_node_names
from centernet_edge.runtime.preprocess import prepare_batch
from centernet_edge.runtime.spec import ModelSpec, load_spec

from .artifacts import derived_spec, save_model, sidecar_path
from .channel_scaling import (
    ScalingSite,
    apply_channel_scaling,
    channel_ranges,
    depthwise_input_sites,
    site_factors,
    undo_split_sites,
)
from .equalize import equalize
from .fp16 import convert_fp16
from .head_error import HeadError, HeadProbe, significantly_lower
from .layer_error import compare_tensors, write_layer_errors
from .manifest import ARTIFACTS, INT8_ARTIFACTS, calibration_summary, check_reusable, read_summary, write_summary
from .mixed import DEFAULT_BUDGET, MixedResult, search_knee, search_mixed_precision, write_precision
from .ort_cpu_int8 import CpuInt8Config, build_ort_cpu_int8_with_report, decode_input_ranges, ort_ranges
from .parallel import default_workers
from .placement import Placement, QuantLayer, plan_placement
from .qdq import build_qdq_model
from .range_search import search_ranges
from .sensitivity import layer_sensitivity, write_sensitivity
from .sequential import ROUNDINGS, FitOptions, fit_layers
from .stats import CalibrationStats, collect_calibration_stats
from .tensors import calibration_tensors
from .thresholds import METHODS, compute_amaxes
from .trt_cache import DEFAULT_TRT_VERSION, cache_header_note, render_cache, trt_version_int, write_cache

__all__ = [
    "CalibrateOptions",
    "CalibrateResult",
    "CalibrationRun",
    "Ranges",
    "build_cpu_model",
    "calibrate",
    "compute_ranges",
    "fp16_artifact",
    "int8_artifacts",
    "prepare_run",
    "rescaled_artifact",
    "write_run_summary",
]

log = logging.getLogger("centernet_edge.quantize")

# "downstream": per tensor, the histogram candidate whose int8 round trip changes the reading layer's
# output least (quantize/range_search.py).
DOWNSTREAM = "downstream"
METHOD_CHOICES = (*METHODS, DOWNSTREAM, "auto")
MIXED_RULES = ("knee", "budget", "none")
# Candidate ranges the downstream search chooses from, per tensor.
DOWNSTREAM_CANDIDATES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("percentile", {"percentile": 99.99}), ("percentile_99.9", {"percentile": 99.9}),
    ("percentile_99.999", {"percentile": 99.999}), ("mse", {}), ("entropy", {}), ("minmax", {}),
)


@dataclass
class CalibrateOptions:
    model: Path
    images: Path
    out_dir: Path
    model_spec: Path | None = None
    images_dir: Path | None = None
    num_images: int | None = 500
    seed: int = 0
    int8: bool = True
    fp16: bool = True
    equalize: bool = False  # cross-layer equalization before statistics (quantize/equalize.py)
    # Per-channel scaling of depthwise-conv inputs before statistics (quantize/channel_scaling.py): on mb3
    # it took the all-int8 Q/DQ head error on calibration images from 0.57 to 0.31.
    channel_scaling: bool = True
    scaling_images: int = 32  # calibration images whose per-channel ranges set the factors
    method: str = "auto"
    percentile: float = 99.99
    # Which layers stay float: "knee" (default; see mixed.search_knee), "budget" (the smallest set within
    # ``budget``), "none" (every eligible layer int8, no sensitivity analysis at all).
    mixed: str = "knee"
    budget: float | None = None  # a number selects the budget rule (default budget when None)
    max_float: int | None = None  # knee: the cap (default 10% of the Conv layers); budget: an upper bound
    sensitivity_images: int = 32  # images that score the mixed-precision candidates
    ranking_images: int = 8  # images of the one-layer-at-a-time ranking (a subset of the above)
    cpu_float: str = "none"  # "mixed": the CPU model keeps the mixed-precision float layers too
    cpu_format: str = "qoperator"  # or "qdq" (see CpuInt8Config)
    cpu_float_heads: bool = False  # keep the head convs float in the CPU model (slower, closer to fp32)
    trt_version: str | int = DEFAULT_TRT_VERSION
    force: bool = False
    threads: int = 1
    workers: int | None = None  # ONNX Runtime runs at once (default: cores / threads); results do not depend on it
    batch_size: int | None = None
    stats_cache: Path | None = None  # keep/reuse the activation statistics (.npz) here
    range_images: int = 4  # calibration images replayed by --method downstream
    layer_report_images: int = 2  # images of the per-layer int8-vs-fp32 comparison; 0 = no layer_error.*
    # AdaRound by default: on mb3 it lowered the all-int8 head error on calibration images (0.553 ->
    # 0.495, 100 images); a fit whose improvement is within the probe's noise is dropped (_fit_weights).
    rounding: str = "adaround"  # or "nearest" (quantize/adaround.py)
    bias_correction: bool = False  # empirical per-channel bias correction (quantize/bias_correction.py)
    fit_images: int = 8  # calibration images the weight fitting replays (after the probe images)
    progress: bool = True
    strict: bool = False  # an unreadable calibration image fails the run instead of being skipped


@dataclass
class CalibrateResult:
    out_dir: Path
    method: str
    amax: dict[str, float]
    artifacts: dict[str, Path] = field(default_factory=dict)
    mixed: MixedResult | None = None
    method_errors: dict[str, float] = field(default_factory=dict)
    reused_cache: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    cpu_int8: dict[str, Any] | None = None
    written: list[str] = field(default_factory=list)  # every file this run put into out_dir
    header_note: str = ""  # which calibrator the cache header names, and where the ranges came from


def _say(options: CalibrateOptions, message: str) -> None:
    log.info(message)
    if options.progress:
        print(f"[centernet-calibrate] {message}", flush=True)


def _workers(options: CalibrateOptions) -> int:
    # By default the cores are shared out between runs, not oversubscribed by multi-threaded runs.
    return options.workers or max(1, default_workers() // max(1, options.threads))


def _method_options(options: CalibrateOptions, method: str) -> dict[str, Any]:
    """What the ranges depend on besides model and images (recorded; a cache made otherwise is stale)."""
    out: dict[str, Any] = {"percentile": options.percentile} if method == "percentile" else {}
    if options.equalize:
        out["equalize"] = True  # ranges of the equalized model
    if options.channel_scaling:
        out["channel_scaling"] = options.scaling_images  # ranges of the rescaled model
    return out


def _amaxes(stats: CalibrationStats, method: str, options: CalibrateOptions) -> dict[str, float]:
    kwargs = {"percentile": options.percentile} if method == "percentile" else {}
    return compute_amaxes(stats.tensors, method, **kwargs)


def _downstream_amaxes(model: onnx.ModelProto, spec: ModelSpec, placement: Placement, stats: CalibrationStats,
                       calib: CalibrationSet, options: CalibrateOptions) -> dict[str, float]:
    """Histogram ranges for every calibrated tensor (percentile), replaced for the quantized layers'
    inputs by the candidate their readers prefer (see range_search)."""
    candidates = {label: compute_amaxes(stats.tensors, label.split("_")[0], **opts)
                  for label, opts in DOWNSTREAM_CANDIDATES}
    batches = (x for x, _ in _probe_batches(calib, spec, options.range_images))
    choice = search_ranges(model, placement.layers, candidates, batches, spec.graph.input.name,
                           threads=options.threads)
    counts: dict[str, int] = {}
    for label in choice.chosen.values():
        counts[label] = counts.get(label, 0) + 1
    _say(options, "downstream ranges chosen: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return {**candidates["percentile"], **choice.amax}


def _probe_batches(calib: CalibrationSet, spec: ModelSpec, count: int
                   ) -> list[tuple[np.ndarray, list[Any]]]:
    """The first ``count`` readable calibration images as graph-input batches (label-free probe set)."""
    size = effective_batch_size(spec, None)
    images: list[np.ndarray] = []
    for path in calib.paths:
        img = read_bgr(path)
        if img is not None:
            images.append(img)
        if len(images) >= count:
            break
    usable = len(images) - len(images) % size
    if usable == 0:
        raise ValueError(f"no readable calibration image batch of {size} for the sensitivity probe")
    return [prepare_batch(images[i:i + size], spec) for i in range(0, usable, size)]


def _choose_method(model: onnx.ModelProto, placement: Placement, stats: CalibrationStats, probe: HeadProbe,
                   options: CalibrateOptions) -> tuple[str, dict[str, float]]:
    """``auto``: the method whose all-int8 model drifts least from fp32 on the probe images."""
    errors: dict[str, float] = {}
    for method in METHODS:
        amax = _amaxes(stats, method, options)
        errors[method] = probe.measure(build_qdq_model(model, placement.layers, amax)).head_error
        _say(options, f"method {method}: all-int8 head error {errors[method]:.4f}")
    best = min(METHODS, key=lambda m: (errors[m], METHODS.index(m)))
    return best, errors


def calibrate(options: CalibrateOptions) -> CalibrateResult:
    """Run one calibration (see module docstring) and write the artifacts into ``options.out_dir``.

    The TensorRT cache and summary are always written (they are what calibration produces); ``int8`` and
    ``fp16`` choose which models are written besides them. Everything is written into a temporary folder
    beside ``out_dir`` and moved into place at the end, so a failed or interrupted run leaves ``out_dir``
    as it was (no empty folder, no cache without its summary).
    """
    if options.method not in METHOD_CHOICES:
        raise ValueError(f"unknown method {options.method!r}; choose one of {', '.join(METHOD_CHOICES)}")
    if not (options.int8 or options.fp16):
        raise ValueError("nothing to do: enable --int8 and/or --fp16")
    if options.mixed not in MIXED_RULES:
        raise ValueError(f"unknown mixed-precision rule {options.mixed!r}; choose one of {', '.join(MIXED_RULES)}")
    if options.rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {options.rounding!r}; choose one of {', '.join(ROUNDINGS)}")
    if options.cpu_float not in ("none", "mixed"):
        raise ValueError(f"cpu_float must be 'none' or 'mixed'; got {options.cpu_float!r}")
    model_path = Path(options.model)
    if model_path.is_dir():
        raise FileNotFoundError(f"model {model_path} is a directory; pass the .onnx file inside it")
    if not model_path.is_file():
        raise FileNotFoundError(f"model not found: {model_path}")
    out = check_output_dir(options.out_dir)
    if options.stats_cache is not None:
        check_output_dir(options.stats_cache)
    spec = load_spec(model_path, options.model_spec)
    # Outputs of the kinds this run makes that it did not make this time are stale: removed at the move.
    stale: set[str] = set()
    with staged_dir(out, keep=lambda name: name not in stale, last=(ARTIFACTS["summary"],)) as stage:
        result = _calibrate_into(options, model_path, spec, out, stage)
        produced = {p.name for p in stage.iterdir()}
        result.written = sorted(produced)
        if ARTIFACTS["rescaled"] not in produced:
            stale |= {ARTIFACTS["rescaled"], sidecar_path(ARTIFACTS["rescaled"]).name}
        if options.int8:
            int8_outputs = [ARTIFACTS[k] for k in INT8_ARTIFACTS]
            stale |= {n for n in int8_outputs + [sidecar_path(n).name for n in int8_outputs if n.endswith(".onnx")]
                      if n not in produced}
    result.artifacts = {key: out / path.name for key, path in result.artifacts.items()}
    return result


@dataclass
class CalibrationRun:
    """What every stage of one calibration shares, decided before any statistics are collected.

    Built by :func:`prepare_run`; a benchmark or a notebook can run the stages one at a time on it:
    ``ranges = compute_ranges(run)``, ``int8_artifacts(run, ranges)``, ``fp16_artifact(run)``,
    ``write_run_summary(run, ranges, result)``."""

    options: CalibrateOptions
    model_path: Path
    spec: ModelSpec
    out: Path  # the final folder (an earlier run's files there are read for reuse)
    paths: dict[str, Path]  # this run's files, in the staging folder moved into place at the end
    source: onnx.ModelProto  # the model as given, node names made unique
    model: onnx.ModelProto  # the model quantized: ``source``, equalized and/or channel-scaled
    model_sha256: str
    placement: Placement
    calib: CalibrationSet
    trt_version: int
    clock: _Clock
    probe: HeadProbe | None = None
    scaling_sites: list[ScalingSite] = field(default_factory=list)  # the channel-scaling sites applied

    @property
    def scaling(self) -> list[dict[str, str]]:
        """The channel-scaling sites as summary.json records them."""
        return [{"depthwise": s.depthwise, "tensor": s.tensor, "kind": s.kind} for s in self.scaling_sites]

    @property
    def rescaled(self) -> bool:
        """The quantized model's tensors differ from the source's (its ranges and cache refer to it)."""
        return self.model is not self.source

    @property
    def foreign(self) -> bool:
        """A described foreign model: derived artifacts get side-car descriptions."""
        return self.options.model_spec is not None

    @property
    def final(self) -> dict[str, Path]:
        return {key: self.out / name for key, name in ARTIFACTS.items()}

    def head_probe(self) -> HeadProbe:
        """The label-free head-error probe (fp32 reference on calibration images), built on first use."""
        if self.probe is None:
            self.probe = _make_probe(self.model, self.spec, self.calib, self.options)
        return self.probe


@dataclass
class Ranges:
    """The statistics stage's result: per-tensor int8 ranges and where they came from."""

    method: str  # the method that made ``amax`` (``auto`` resolved)
    amax: dict[str, float]
    observed: dict[str, tuple[float, float]]  # min/max seen per tensor (the CPU model's asymmetric ranges)
    reads: dict[str, Any]  # the image reader's report (skipped files and why)
    method_errors: dict[str, float] = field(default_factory=dict)  # ``auto``: all-int8 head error per method
    reused: bool = False  # taken from an earlier run's summary
    stats: CalibrationStats | None = None  # None when reused

    def provenance(self, run: CalibrationRun) -> dict[str, Any]:
        """What every derived artifact's spec records about its calibration."""
        return {"calibration_method": self.method, "calibration_images": len(run.calib),
                "calibration_dataset_hash": run.calib.dataset_hash, "source_model_sha256": run.model_sha256}


def prepare_run(options: CalibrateOptions, model_path: Path, spec: ModelSpec, out: Path, stage: Path
                ) -> CalibrationRun:
    """Load and name the model, equalize and channel-scale it when asked, plan the int8 placement, choose
    the images."""
    clock = _Clock()
    source = model = ensure_node_names(onnx.load(str(model_path)))
    if options.equalize:
        model, pairs = equalize(model)
        _say(options, f"cross-layer equalization: {len(pairs)} conv pair(s) rescaled")
    calib = load_calibration_set(options.images, images_dir=options.images_dir,
                                 num_images=options.num_images, seed=options.seed)
    sites: list[ScalingSite] = []
    if options.channel_scaling:
        model, sites = _scale_channels(model, spec, calib, options)
    placement = plan_placement(model)
    _say(options, f"{len(placement.layers)} int8-eligible layers; calibrating on {len(calib)} image(s)")
    paths = {key: stage / name for key, name in ARTIFACTS.items()}
    return CalibrationRun(options, model_path, spec, out, paths, source, model, file_sha256(model_path),
                          placement, calib, trt_version_int(options.trt_version), clock, scaling_sites=sites)


def _scale_channels(model: onnx.ModelProto, spec: ModelSpec, calib: CalibrationSet, options: CalibrateOptions
                    ) -> tuple[onnx.ModelProto, list[ScalingSite]]:
    """Depthwise inputs rescaled by factors from the first ``scaling_images`` calibration images."""
    sites = depthwise_input_sites(model)
    if not sites:
        return model, []
    batches = (x for x, _ in _probe_batches(calib, spec, options.scaling_images))
    ranges = channel_ranges(model, [t for site in sites for t in site.measured], batches, spec.graph.input.name,
                            threads=options.threads)
    factors = {site.tensor: site_factors(site, ranges) for site in sites}
    applied = [site for site in sites if not np.all(factors[site.tensor] == 1.0)]
    if not applied:
        return model, []
    kinds = {kind: sum(site.kind == kind for site in applied) for kind in ("folded", "hardswish", "split")}
    _say(options, f"channel scaling: {len(applied)} of {len(sites)} depthwise input(s) rescaled "
                  f"({kinds['folded']} folded, {kinds['hardswish']} through hard-swish, {kinds['split']} split)")
    return apply_channel_scaling(model, applied, factors), applied


def compute_ranges(run: CalibrationRun) -> Ranges:
    """Streaming statistics -> per-tensor ranges by the chosen method (or an earlier identical run's),
    and the TensorRT cache written from them."""
    options, model, spec = run.options, run.model, run.spec
    reused = check_reusable(run.final["cache"], model_sha256=run.model_sha256, dataset_hash=run.calib.dataset_hash,
                            method=options.method, method_options=_method_options(options, options.method),
                            summary_path=run.final["summary"], force=options.force)
    if reused:
        recorded = read_summary(run.final["summary"])
        ranges = Ranges(str(recorded.get("selected_method", options.method)),
                        {k: float(v) for k, v in recorded["amax"].items()},
                        {k: tuple(v) for k, v in recorded.get("observed_range", {}).items()},
                        dict(recorded.get("image_reads") or {}), reused=True)
        _say(options, f"reusing calibration in {run.out} (same model, images and method)")
    else:
        tensors = list(dict.fromkeys(calibration_tensors(model, spec) + run.placement.activation_tensors()))
        stats_path = run.model_path
        if run.rescaled:  # the statistics must be those of the model that is quantized
            stats_path = run.paths["summary"].parent / ".rescaled.onnx.tmp"
            onnx.save(model, str(stats_path))
        try:
            stats = collect_calibration_stats(stats_path, spec, run.calib, tensors=tensors,
                                              batch_size=options.batch_size, cache_dir=options.stats_cache,
                                              progress=options.progress, intra_op_num_threads=options.threads,
                                              workers=_workers(options), strict=options.strict)
        finally:
            if stats_path != run.model_path:
                stats_path.unlink(missing_ok=True)
        method, method_errors = options.method, {}
        if method == "auto":
            method, method_errors = _choose_method(model, run.placement, stats, run.head_probe(), options)
            _say(options, f"auto method: {method}")
        if method == DOWNSTREAM:
            amax = _downstream_amaxes(model, spec, run.placement, stats, run.calib, options)
        else:
            amax = _amaxes(stats, method, options)
        ranges = Ranges(method, amax, {n: (s.min, s.max) for n, s in stats.tensors.items()},
                        dict(stats.meta.get("read_report") or {}), method_errors, stats=stats)
    reads = ranges.reads
    if options.strict and reads.get("skipped"):
        first = sorted((reads.get("skip_reasons") or {}).items())[:1]
        named = f": {first[0][0]} ({first[0][1]})" if first else ""
        raise UnreadableImageError(f"{reads['skipped']} calibration image(s) could not be read{named} (--strict)")
    # Rewritten even when reused: equal ranges give equal bytes, and --trt-version may have changed.
    write_cache(run.paths["cache"], ranges.amax, method=ranges.method, trt_version=run.trt_version)
    run.clock.lap("statistics_and_ranges")
    return ranges


def rescaled_artifact(run: CalibrationRun, ranges: Ranges) -> Path:
    """model_fp32_rescaled.onnx: the fp32 model whose tensors the cache's ranges describe (written only
    when calibration rescaled channels; the same function as the model given)."""
    path = run.paths["rescaled"]
    save_model(run.model, path, derived_spec(run.spec, "fp32", ranges.provenance(run)), sidecar=run.foreign)
    return path


def fp16_artifact(run: CalibrationRun, ranges: Ranges) -> Path:
    """model_fp16.onnx from the model as given (fp16 needs no equalization)."""
    _say(run.options, "writing fp16 model")
    fp16 = convert_fp16(run.source, run.placement.regions)
    path = run.paths["fp16"]
    save_model(fp16, path, derived_spec(run.spec, "fp16", ranges.provenance(run)), sidecar=run.foreign)
    run.clock.lap("fp16")
    return path


def write_run_summary(run: CalibrationRun, ranges: Ranges, result: CalibrateResult) -> None:
    """summary.json (the run's manifest, no wall times: equal inputs give equal bytes) and timings.json."""
    options, paths = run.options, run.paths
    extra = {
        "selected_method": ranges.method,
        "cache_header_note": result.header_note,
        "method_head_errors": ranges.method_errors,
        "calibration_set": run.calib.summary(),
        "image_reads": ranges.reads,
        "model_spec_name": run.spec.name,
        "observed_range": {k: [float(v[0]), float(v[1])] for k, v in sorted(ranges.observed.items())},
        "float_layers": list(result.mixed.float_layers) if result.mixed else [],
        "int8_head_error": result.mixed.error.to_dict() if result.mixed else None,
        "cpu_int8": result.cpu_int8,
        "channel_scaling": run.scaling,
        # TensorRT 10 + cache builds this fp32 model (see engine/selection.py); None: the model as given.
        "cache_model": ARTIFACTS["rescaled"] if run.rescaled else None,
        "cache_model_sha256": file_sha256(paths["rescaled"]) if run.rescaled else None,
        "artifacts": {key: p.name for key, p in sorted(result.artifacts.items())},
    }
    summary = calibration_summary(
        model_sha256=run.model_sha256, dataset_hash=run.calib.dataset_hash, method=options.method,
        amaxes=ranges.amax, method_options=_method_options(options, options.method), num_images=len(run.calib),
        trt_header=render_cache({}, method=ranges.method, trt_version=run.trt_version).strip(), extra=extra,
    )
    write_summary(paths["summary"], summary)
    result.artifacts["summary"] = paths["summary"]
    result.timings = run.clock.laps
    timing_doc = {"seconds": run.clock.laps, "images": len(run.calib)}
    atomic_write_text(paths["timings"], json.dumps(timing_doc, indent=2) + "\n")
    result.artifacts["timings"] = paths["timings"]


def _calibrate_into(options: CalibrateOptions, model_path: Path, spec: ModelSpec, out: Path, stage: Path
                    ) -> CalibrateResult:
    run = prepare_run(options, model_path, spec, out, stage)
    ranges = compute_ranges(run)
    result = CalibrateResult(out, ranges.method, ranges.amax, {"cache": run.paths["cache"]}, None,
                             ranges.method_errors, ranges.reused)
    result.header_note = cache_header_note(ranges.method, run.trt_version)
    if run.rescaled:
        result.artifacts["rescaled"] = rescaled_artifact(run, ranges)
    if options.int8:
        result.mixed, result.cpu_int8 = int8_artifacts(run, ranges)
        for key in INT8_ARTIFACTS:
            if run.paths[key].exists():
                result.artifacts[key] = run.paths[key]
    if options.fp16:
        result.artifacts["fp16"] = fp16_artifact(run, ranges)
    write_run_summary(run, ranges, result)
    return result


class _Clock:
    """Wall time per pipeline stage."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now


def _make_probe(model: onnx.ModelProto, spec: ModelSpec, calib: CalibrationSet, options: CalibrateOptions
                ) -> HeadProbe:
    probe = HeadProbe(spec, _probe_batches(calib, spec, options.sensitivity_images), threads=options.threads,
                      workers=_workers(options))
    probe.set_reference(model)
    return probe


def int8_artifacts(run: CalibrationRun, ranges: Ranges) -> tuple[MixedResult, dict[str, Any] | None]:
    """Mixed precision, weight fitting and the int8 models: model_int8_qdq.onnx (TensorRT) and
    model_int8_cpu.onnx (ONNX Runtime CPU), with precision.json, weight_fit.json and layer_error.*."""
    options, spec, placement, paths, clock = run.options, run.spec, run.placement, run.paths, run.clock
    model, amax, method, probe = run.model, ranges.amax, ranges.method, run.head_probe()
    mixed = _mixed_precision(model, placement, amax, probe, options, paths, method)
    clock.lap("sensitivity_and_mixed_precision")
    paths["weight_fit"].unlink(missing_ok=True)
    int8_layers = placement.select(mixed.float_layers)

    def qdq_error(weights: onnx.ModelProto) -> HeadError:
        return probe.measure(build_qdq_model(weights, int8_layers, amax))

    fitted, qdq_fit, fitted_error, qdq_candidate = _fit_weights(run, ranges, int8_layers, qdq_error, mixed.error,
                                                                "TensorRT Q/DQ model")
    if qdq_fit is not None and qdq_fit["kept"]:
        mixed.error = fitted_error
    cpu_float = mixed.float_layers if options.cpu_float == "mixed" else []
    cpu_builds: dict[int, _CpuBuild | None] = {}  # by weights model: each CPU graph is built and scored once

    def cpu_built(weights: onnx.ModelProto) -> _CpuBuild | None:
        if id(weights) not in cpu_builds:
            cpu_builds[id(weights)] = _build_cpu_candidate(run, ranges, weights, cpu_float)
        return cpu_builds[id(weights)]

    cpu_source, cpu_fit = model, None
    plain_cpu = cpu_built(model) if qdq_fit is not None else None
    if plain_cpu is not None:
        # Judged on the CPU graph itself: it quantizes more tensors and keeps others float than the Q/DQ
        # graph, so a fit that helps one can hurt the other (mb3, 100 images: CPU 0.34 -> 0.46).
        def cpu_error(weights: onnx.ModelProto) -> HeadError:
            return (cpu_built(weights) or plain_cpu).error  # a graph the quantizer rejects is no improvement

        shared = cpu_float == mixed.float_layers  # the same int8 layers: the Q/DQ fit is the candidate
        cpu_source, cpu_fit, _, _ = _fit_weights(
            run, ranges, placement.select(cpu_float), cpu_error, plain_cpu.error, "CPU model",
            candidate=(qdq_candidate, qdq_fit) if shared else None)
    if qdq_fit is not None:
        doc = {"qdq": qdq_fit, "cpu": cpu_fit}
        atomic_write_text(paths["weight_fit"], json.dumps(doc, indent=2) + "\n")
    clock.lap("weight_fitting")
    _say(options, f"{len(mixed.float_layers)} layer(s) kept float; head error {mixed.error.head_error:.4f}")
    ops = {n.name: n.op_type for n in model.graph.node}
    meta = {"method": method, "probe_images": probe.images, "layers": len(placement.layers),
            "rule": mixed.rule}
    write_precision(paths["precision"], placement, mixed, ops, meta)
    precision = "int8-mixed" if mixed.float_layers else "int8"
    extra = {**ranges.provenance(run), "float_layers": len(mixed.float_layers),
             "head_error": round(mixed.error.head_error, 6)}
    qdq = build_qdq_model(fitted, int8_layers, amax)
    save_model(qdq, paths["qdq"], derived_spec(spec, precision, {**extra, "int8_format": "qdq-tensorrt"}),
               sidecar=run.foreign)
    if options.layer_report_images > 0:
        _layer_report(model, cpu_source if not cpu_float else model, spec, placement, amax, probe, options,
                      paths, method)
    cpu_info = _cpu_artifact(run, ranges, cpu_built(cpu_source), cpu_float)
    clock.lap("int8_artifacts")
    return mixed, cpu_info


def _fit_weights(run: CalibrationRun, ranges: Ranges, layers: list[QuantLayer],
                 measure: Callable[[onnx.ModelProto], HeadError], baseline: HeadError, label: str,
                 candidate: tuple[onnx.ModelProto, dict[str, Any]] | None = None
                 ) -> tuple[onnx.ModelProto, dict[str, Any] | None, HeadError, onnx.ModelProto]:
    """The model whose weights an int8 artifact quantizes: ``model`` itself, or with AdaRound levels
    and/or corrected biases (quantize/sequential.py) fitted for exactly the int8 ``layers`` of that
    artifact (fitted weights compensate the error of the quantized layers upstream; with a different set
    of float layers they would compensate the wrong error). The fit replays ``fit_images`` calibration
    images taken after the probe images, and is kept only when it lowers that configuration's head error
    on the probe images (``measure``: the artifact's own graph) below ``baseline`` by more than the
    probe's sampling noise (:func:`significantly_lower`, paired over the probe images): a per-layer
    objective need not help the heads, and an improvement within the noise is no evidence that it does.
    ``candidate``: an already fitted model and its report to judge instead of fitting again. Returns the
    model, the report entry (None when no fit was asked for), the head error of the returned model and
    the fitted model whether kept or not."""
    options, spec, model, amax, probe = run.options, run.spec, run.model, ranges.amax, run.head_probe()
    fit = FitOptions(rounding=options.rounding, bias_correction=options.bias_correction, seed=options.seed)
    if not fit.active():
        return model, None, baseline, model
    if candidate is not None:
        fitted, fit_doc = candidate[0], {k: v for k, v in candidate[1].items()
                                          if k not in ("head_error", "kept", "guard")}
    else:
        # Images after the probe's, so the guard judges the fit on images it was not fitted on (when the
        # calibration set has that many).
        batches = [x for x, _ in _probe_batches(run.calib, spec, probe.images + options.fit_images)]
        batches = batches[len(probe.batches):] or batches
        _say(options, f"fitting int8 weights for the {label} ({options.rounding} rounding, bias correction "
                      f"{'on' if options.bias_correction else 'off'}) on {sum(b.shape[0] for b in batches)} "
                      "image(s)")
        fitted, report = fit_layers(model, layers, amax, batches, spec.graph.input.name, fit,
                                    threads=options.threads)
        fit_doc = {"int8_layers": len(layers), **report.to_dict()}
    after = measure(fitted)
    kept = significantly_lower(after, baseline)
    _say(options, f"weight fitting ({label}): head error {baseline.head_error:.4f} -> {after.head_error:.4f}; "
                  f"{'kept' if kept else 'dropped (no improvement beyond the probe noise)'}")
    doc = {"head_error": {"before": round(baseline.head_error, 6), "after": round(after.head_error, 6)},
           "kept": kept, "guard": "paired over the probe images: mean improvement > 2 standard errors",
           **fit_doc}
    return (fitted, doc, after, fitted) if kept else (model, doc, baseline, fitted)


def _mixed_rule(options: CalibrateOptions) -> str:
    """An explicit budget selects the budget rule; otherwise ``options.mixed``."""
    if options.mixed == "knee" and options.budget is not None:
        return "budget"
    return options.mixed


def _mixed_precision(model: onnx.ModelProto, placement: Placement, amax: dict[str, float], probe: HeadProbe,
                     options: CalibrateOptions, paths: dict[str, Path], method: str) -> MixedResult:
    """The float layers by the chosen rule. The sensitivity ranking runs only when layers may stay float,
    on ``ranking_images`` of the probe images (the ranking only orders candidates; the stopping rule then
    scores whole models on every probe image)."""
    rule = _mixed_rule(options)
    for stale in ("sensitivity_json", "sensitivity_md"):
        paths[stale].unlink(missing_ok=True)  # never a ranking left from an earlier run beside new models
    if rule == "none" or options.max_float == 0:
        all_int8 = probe.measure(build_qdq_model(model, placement.layers, amax))
        return MixedResult(float("nan"), [], all_int8, [(0, all_int8)], True, "none")
    ranker = probe.subset(options.ranking_images)
    _say(options, f"sensitivity of {len(placement.layers)} layers on {ranker.images} calibration image(s)")
    ranking = layer_sensitivity(model, placement.layers, amax, ranker, progress=options.progress,
                                workers=_workers(options))
    meta = {"method": method, "probe_images": ranker.images, "layers": len(placement.layers)}
    write_sensitivity(ranking, paths["sensitivity_json"], paths["sensitivity_md"], meta)

    def report(message: str) -> None:
        _say(options, message)

    if rule == "knee":
        return search_knee(model, placement, amax, ranking, probe, options.max_float, progress=report)
    budget = DEFAULT_BUDGET if options.budget is None else options.budget
    mixed = search_mixed_precision(model, placement, amax, ranking, probe, budget, options.max_float,
                                   progress=report)
    if not mixed.met_budget:
        log.warning("head-error budget %.4f not met even with %d float layers (error %.4f)",
                    mixed.budget, len(mixed.float_layers), mixed.error.head_error)
    return mixed


def _layer_report(model: onnx.ModelProto, fitted: onnx.ModelProto, spec: ModelSpec, placement: Placement,
                  amax: dict[str, float], probe: HeadProbe, options: CalibrateOptions, paths: dict[str, Path],
                  method: str) -> None:
    """layer_error.json/.md: every network tensor of the all-int8 Q/DQ model against fp32 (where int8
    hurts, whatever mixed precision later keeps float)."""
    count = max(1, options.layer_report_images // max(1, len(probe.batches[0][1])))
    batches = [x for x, _ in probe.batches[:count]]
    _say(options, f"per-layer int8-vs-fp32 comparison on {sum(len(g) for _, g in probe.batches[:count])} image(s)")
    rows = compare_tensors(model, build_qdq_model(fitted, placement.layers, amax), batches,
                           spec.graph.input.name, threads=options.threads)
    meta = {"compared": "all eligible layers int8 (Q/DQ) vs fp32", "method": method,
            "images": sum(len(g) for _, g in probe.batches[:count])}
    write_layer_errors(rows, paths["layer_error_json"], paths["layer_error_md"], meta)


def build_cpu_model(run: CalibrationRun, ranges: Ranges, model: onnx.ModelProto, keep_float: list[str],
                    config: CpuInt8Config | None = None) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The ONNX Runtime CPU int8 graph of ``model`` (``run.model`` or its weight-fitted copy), as
    model_int8_cpu.onnx gets it: split channel-scaling sites undone (every tensor is int8 here, the split
    Mul's input included, so the Mul would only cost time), head outputs at their decode ranges."""
    options = run.options
    model = undo_split_sites(model, run.scaling_sites)
    cpu_ranges = decode_input_ranges(model, run.placement.regions, ort_ranges(ranges.amax, ranges.observed),
                                     ranges.observed, run.head_probe().lowest_top_k_score())
    config = config or CpuInt8Config(fmt=options.cpu_format, float_head_outputs=options.cpu_float_heads)
    return build_ort_cpu_int8_with_report(model, cpu_ranges, keep_float=keep_float, config=config,
                                          regions=run.placement.regions)


@dataclass
class _CpuBuild:
    model: onnx.ModelProto
    graph_changes: dict[str, int]
    error: HeadError


def _build_cpu_candidate(run: CalibrationRun, ranges: Ranges, weights: onnx.ModelProto, keep_float: list[str]
                         ) -> _CpuBuild | None:
    """:func:`build_cpu_model` and its head error; None (with a warning) where ONNX Runtime's quantizer
    rejects the graph: the TensorRT artifacts stand without it."""
    try:
        cpu, graph_changes = build_cpu_model(run, ranges, weights, keep_float)
    except Exception as exc:
        log.warning("ONNX Runtime CPU int8 model not written: %s: %s", type(exc).__name__, exc)
        return None
    return _CpuBuild(cpu, graph_changes, run.head_probe().measure(cpu))


def _cpu_artifact(run: CalibrationRun, ranges: Ranges, built: _CpuBuild | None, keep_float: list[str]
                  ) -> dict[str, Any] | None:
    """model_int8_cpu.onnx from its build (None: not written). By default every eligible op is int8: ONNX
    Runtime's CPU speed comes only from long integer chains, and float islands cost more in Q/DQ
    transitions than they return (measured on mb3: keeping layers float made the CPU model slower than
    fp32 without recovering its accuracy, which is lost in the quantized elementwise ops around them).
    Its head error is recorded so the accuracy cost is visible."""
    options, spec = run.options, run.spec
    if built is None:
        return None
    _say(options, "writing ONNX Runtime CPU int8 model")
    cpu, graph_changes, error = built.model, built.graph_changes, built.error.head_error
    info = {"float_layers": len(keep_float), "format": options.cpu_format,
            "float_head_outputs": options.cpu_float_heads, "head_error": round(error, 6),
            "graph_changes": graph_changes}
    label = "int8-mixed" if keep_float else "int8"
    extra = {**ranges.provenance(run), **info, "int8_format": f"ort-cpu-u8s8-{options.cpu_format}"}
    save_model(cpu, run.paths["cpu"], derived_spec(spec, label, extra), sidecar=run.foreign)
    applied = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(graph_changes.items()) if v) or "none"
    _say(options, f"CPU int8 model: {len(keep_float)} layer(s) float, head error {error:.4f}; graph changes: {applied}")
    return info

