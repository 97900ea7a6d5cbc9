"""Streaming activation statistics of an fp32 ONNX model in ONNX Runtime, for calibration.

Two passes over the images, nothing kept per image (memory depends on the model and the batch, never on
the number of images):

1. ranges: the graph is given, per calibrated tensor, in-graph ``ReduceMax(Abs(x))``, ``ReduceMin(x)`` and
   ``ReduceMax(x)`` outputs, so only scalars leave ONNX Runtime; they are max/min-accumulated.
2. histograms: the tensors themselves become graph outputs and each batch is binned at once into
   ``num_bins`` bins of ``|x|`` over ``[0, absmax]`` (ncnn's rule: ``min(int(|x| * num_bins / absmax),
   num_bins - 1)`` in float32), exact zeros counted apart; the arrays are dropped before the next batch.

Only the part of the graph that the tensors depend on is run (decode tails and extra inputs are pruned
away). Counts are integers and maxima are order-independent, so results do not depend on batching; with
a fixed thread count ONNX Runtime's CPU kernels are deterministic, which makes the statistics (and the
caches built from them) reproducible byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from centernet_edge.calib_data.batches import effective_batch_size, iter_batches, num_batches
from centernet_edge.calib_data.images import ReadReport
from centernet_edge.calib_data.provenance import file_sha256, text_sha256
from centernet_edge.calib_data.sources import CalibrationSet
from centernet_edge.runtime.atomic import atomic_path
from centernet_edge.runtime.spec import ModelSpec

from .tensors import calibration_tensors

__all__ = [
    "DEFAULT_NUM_BINS",
    "CalibrationStats",
    "TensorStats",
    "collect_calibration_stats",
    "collect_statistics",
    "histogram_model",
    "load_stats",
    "prune_to_outputs",
    "range_model",
    "save_stats",
    "stats_cache_key",
]

log = logging.getLogger("centernet_edge.quantize")

DEFAULT_NUM_BINS = 2048
STATS_FORMAT = 1
_PREFIX = "__centernet_calib__"


@dataclass
class TensorStats:
    """What calibration knows about one tensor. ``hist`` counts |x| over [0, absmax], exact zeros excluded
    (they are in ``zero_count``), so ``hist.sum() + zero_count == count``."""

    name: str
    absmax: float
    min: float
    max: float
    count: int
    zero_count: int
    hist: np.ndarray

    @property
    def num_bins(self) -> int:
        return int(self.hist.size)

    @property
    def bin_edges(self) -> np.ndarray:
        return np.linspace(0.0, self.absmax, self.num_bins + 1)

    def histogram(self, zeros: str = "skip") -> np.ndarray:
        """The histogram with exact zeros ``skip``-ped (ncnn), ``keep``-t in bin 0, or ``copy_next``
        (bin 0 := bin 1, pytorch-quantization's way of removing the ReLU spike)."""
        h = self.hist.astype(np.int64, copy=True)
        if zeros == "skip":
            return h
        if zeros == "keep":
            h[0] += self.zero_count
            return h
        if zeros == "copy_next":
            if h.size > 1:
                h[0] = h[1]
            return h
        raise ValueError(f"zeros must be skip, keep or copy_next; got {zeros!r}")


@dataclass
class CalibrationStats:
    """Statistics for all calibrated tensors plus provenance (``meta``: model/dataset hashes etc.)."""

    tensors: dict[str, TensorStats]
    num_images: int
    num_batches: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.tensors)


# ---- graph surgery --------------------------------------------------------------------------------


def _needed_inputs(node: onnx.NodeProto) -> list[str]:
    names = [i for i in node.input if i]
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            for sub in g.node:
                names.extend(_needed_inputs(sub))
    return names


def prune_to_outputs(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` computing only ``outputs`` (unused nodes, initializers and inputs removed)."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output if o}
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | set(producer)
    missing = [o for o in outputs if o not in known]
    if missing:
        raise ValueError(f"tensors not in the graph: {', '.join(missing[:5])}")
    needed, keep_nodes, stack = set(), set(), list(outputs)
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in keep_nodes:
            keep_nodes.add(id(node))
            stack.extend(_needed_inputs(node))
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    g = pruned.graph
    kept = [n for n in graph.node if id(n) in keep_nodes]
    del g.node[:]
    g.node.extend(kept)
    inits = [i for i in graph.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    inputs = [i for i in graph.input if i.name in needed]
    del g.input[:]
    g.input.extend(inputs)
    del g.output[:]
    g.output.extend(onnx.ValueInfoProto(name=o) for o in outputs)
    return pruned


def _single_input(model: onnx.ModelProto, input_name: str | None) -> str:
    inits = {i.name for i in model.graph.initializer}
    feeds = [i.name for i in model.graph.input if i.name not in inits]
    if input_name is not None and input_name not in feeds:
        raise ValueError(f"the calibrated tensors do not depend on input {input_name!r}; they need {feeds}")
    if len(feeds) != 1:
        raise ValueError(f"calibration feeds one image input, but the calibrated tensors need inputs {feeds}")
    return feeds[0]


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # types only decide whether a Cast is needed; a Cast is always safe
        return {}
    return {vi.name: vi.type.tensor_type.elem_type
            for vi in list(inferred.graph.value_info) + list(inferred.graph.input)
            if vi.type.HasField("tensor_type")}


def range_model(model: onnx.ModelProto, tensors: Sequence[str]) -> tuple[onnx.ModelProto, list[str]]:
    """Pass-1 model: for each tensor three scalar outputs, absmax, min and max (in that order)."""
    pruned = prune_to_outputs(model, tensors)
    types = _elem_types(pruned)
    g = pruned.graph
    outputs = []
    for i, name in enumerate(tensors):
        src = name
        if types.get(name, TensorProto.FLOAT) != TensorProto.FLOAT:
            # float16/64 activations are measured in float32, like the histograms
            src = f"{_PREFIX}f32_{i}"
            g.node.append(helper.make_node("Cast", [name], [src], to=TensorProto.FLOAT))
        absx, amax, lo, hi = (f"{_PREFIX}{kind}_{i}" for kind in ("abs", "absmax", "min", "max"))
        g.node.extend([
            helper.make_node("Abs", [src], [absx]),
            helper.make_node("ReduceMax", [absx], [amax], keepdims=0),
            helper.make_node("ReduceMin", [src], [lo], keepdims=0),
            helper.make_node("ReduceMax", [src], [hi], keepdims=0),
        ])
        outputs.extend([amax, lo, hi])
    del g.output[:]
    g.output.extend(onnx.ValueInfoProto(name=o) for o in outputs)
    return pruned, outputs


def histogram_model(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """Pass-2 model: the tensors themselves as outputs."""
    return prune_to_outputs(model, tensors)


# ---- collection -----------------------------------------------------------------------------------


def _session(model: onnx.ModelProto, threads: int | None, providers: Sequence[str] | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # pruning leaves nothing unused, but ORT still chats about initializers
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=list(providers or ["CPUExecutionProvider"]))


def _progress(iterable: Iterable[Any], total: int | None, desc: str, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


class _Binner:
    """Histogram of |x| into ``num_bins`` bins (index ``int(|x| * scale)``, clipped) plus exact-zero count.

    Works in place on the activation (ONNX Runtime hands us a private copy) and reuses one index buffer,
    so binning allocates nothing per tensor; np.bincount dominates the cost.
    """

    def __init__(self, num_bins: int):
        self.num_bins = num_bins
        self._index = np.empty(0, dtype=np.intp)

    def __call__(self, x: np.ndarray, scale: np.float32) -> tuple[np.ndarray, int]:
        if x.dtype != np.float32 or not x.flags.writeable or not x.flags.c_contiguous:
            x = np.array(x, dtype=np.float32, order="C", copy=True)
        a = x.reshape(-1)
        np.abs(a, out=a)
        zeros = a.size - int(np.count_nonzero(a))
        a *= scale
        np.minimum(a, np.float32(self.num_bins - 1), out=a)
        if self._index.size < a.size:
            self._index = np.empty(a.size, dtype=np.intp)
        index = self._index[: a.size]
        np.copyto(index, a, casting="unsafe")  # float -> int truncates, i.e. floors non-negative values
        return np.bincount(index, minlength=self.num_bins), zeros


def collect_statistics(
    model: onnx.ModelProto | str | os.PathLike[str],
    batches: Callable[[], Iterable[np.ndarray]],
    tensors: Sequence[str],
    *,
    num_bins: int = DEFAULT_NUM_BINS,
    total_batches: int | None = None,
    progress: bool = True,
    intra_op_num_threads: int | None = 1,
    providers: Sequence[str] | None = None,
) -> CalibrationStats:
    """Two streaming passes (see the module doc). ``batches()`` must yield the same batches every call."""
    if num_bins < 2:
        raise ValueError(f"num_bins must be at least 2; got {num_bins}")
    if not tensors:
        raise ValueError("no tensors to calibrate")
    if len(set(tensors)) != len(tensors):
        raise ValueError("tensor names must be unique")
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    tensors = list(tensors)

    ranged, range_outputs = range_model(proto, tensors)
    input_name = _single_input(ranged, None)
    sess = _session(ranged, intra_op_num_threads, providers)
    n = len(tensors)
    absmax = np.zeros(n, dtype=np.float64)
    lo = np.full(n, np.inf)
    hi = np.full(n, -np.inf)
    images = batch_count = 0
    for batch in _progress(batches(), total_batches, "calibration ranges", progress):
        vals = np.asarray(sess.run(range_outputs, {input_name: batch}), dtype=np.float64).reshape(n, 3)
        np.maximum(absmax, vals[:, 0], out=absmax)
        np.minimum(lo, vals[:, 1], out=lo)
        np.maximum(hi, vals[:, 2], out=hi)
        images += int(batch.shape[0])
        batch_count += 1
    del sess
    if batch_count == 0:
        raise ValueError("the calibration data yielded no batches (no readable images?)")
    bad = [tensors[i] for i in np.flatnonzero(~np.isfinite(absmax))]
    if bad:
        raise ValueError(f"non-finite activations (inf/NaN) in {len(bad)} tensor(s), e.g. {bad[0]!r}")

    scales = [np.float32(num_bins / a) if a > 0 else np.float32(0) for a in absmax]
    hists = np.zeros((n, num_bins), dtype=np.int64)
    zero_counts = np.zeros(n, dtype=np.int64)
    counts = np.zeros(n, dtype=np.int64)
    sess = _session(histogram_model(proto, tensors), intra_op_num_threads, providers)
    binner = _Binner(num_bins)
    images_again = 0
    for batch in _progress(batches(), batch_count, "calibration histograms", progress):
        images_again += int(batch.shape[0])
        outputs = sess.run(tensors, {input_name: batch})
        for i in range(n):
            x = outputs[i]
            outputs[i] = None  # drop each activation once binned; nothing outlives the batch
            h, zeros = binner(x, scales[i])
            hists[i] += h
            zero_counts[i] += zeros
            counts[i] += x.size
        del outputs
    del sess
    if images_again != images:
        raise ValueError(f"the calibration data changed between passes ({images} then {images_again} images)")
    hists[:, 0] -= zero_counts  # every exact zero landed in bin 0

    stats = {
        name: TensorStats(name, float(absmax[i]), float(lo[i]), float(hi[i]), int(counts[i]),
                          int(zero_counts[i]), hists[i].copy())
        for i, name in enumerate(tensors)
    }
    return CalibrationStats(stats, num_images=images, num_batches=batch_count,
                            meta={"num_bins": num_bins, "format": STATS_FORMAT})


# ---- persistence ----------------------------------------------------------------------------------


def stats_cache_key(model_sha256: str, dataset_hash: str, spec: ModelSpec, tensors: Sequence[str],
                    num_bins: int, batch_size: int) -> str:
    """Everything the statistics depend on: model bytes, images, pre-processing, tensor set, binning."""
    payload = json.dumps({
        "format": STATS_FORMAT, "model_sha256": model_sha256, "dataset_hash": dataset_hash,
        "spec_sha256": text_sha256(spec.to_json()), "tensors": list(tensors), "num_bins": num_bins,
        "batch_size": batch_size,
    }, sort_keys=True)
    return text_sha256(payload)


def save_stats(stats: CalibrationStats, path: str | os.PathLike[str]) -> Path:
    """Write ``stats`` to an .npz file (atomically; plain arrays, no pickles)."""
    names = stats.names
    arrays = {
        "names": np.array(names, dtype=np.str_),
        "hist": np.stack([stats.tensors[n].hist for n in names]).astype(np.int64),
        "absmax": np.array([stats.tensors[n].absmax for n in names], dtype=np.float64),
        "min": np.array([stats.tensors[n].min for n in names], dtype=np.float64),
        "max": np.array([stats.tensors[n].max for n in names], dtype=np.float64),
        "count": np.array([stats.tensors[n].count for n in names], dtype=np.int64),
        "zero_count": np.array([stats.tensors[n].zero_count for n in names], dtype=np.int64),
        "info": np.array(json.dumps({"num_images": stats.num_images, "num_batches": stats.num_batches,
                                     "meta": stats.meta}, sort_keys=True)),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return Path(path)


def load_stats(path: str | os.PathLike[str]) -> CalibrationStats:
    with np.load(path, allow_pickle=False) as data:
        info = json.loads(str(data["info"]))
        if info.get("meta", {}).get("format") != STATS_FORMAT:
            found = info.get("meta", {}).get("format")
            raise ValueError(f"{Path(path).name}: unsupported statistics format {found!r}")
        tensors = {
            str(name): TensorStats(str(name), float(data["absmax"][i]), float(data["min"][i]),
                                   float(data["max"][i]), int(data["count"][i]), int(data["zero_count"][i]),
                                   data["hist"][i].astype(np.int64))
            for i, name in enumerate(data["names"])
        }
    return CalibrationStats(tensors, info["num_images"], info["num_batches"], info["meta"])


def collect_calibration_stats(
    model_path: str | os.PathLike[str],
    spec: ModelSpec,
    calib_set: CalibrationSet,
    *,
    tensors: Sequence[str] | None = None,
    batch_size: int | None = None,
    num_bins: int = DEFAULT_NUM_BINS,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    intra_op_num_threads: int | None = 1,
    providers: Sequence[str] | None = None,
) -> CalibrationStats:
    """Statistics for ``model_path`` over ``calib_set``, fed exactly as deployment feeds it.

    ``tensors`` defaults to :func:`calibration_tensors`. With ``cache_dir`` the result is stored as
    ``calib-stats-<key>.npz`` keyed by model sha256, dataset hash, spec, tensors and binning, and reused
    when everything matches, so threshold methods can be compared without re-running the model.
    ``meta`` records the hashes and the read report (images skipped or converted).
    """
    model = onnx.load(str(model_path))
    names = list(tensors) if tensors is not None else calibration_tensors(model, spec)
    size = effective_batch_size(spec, batch_size)
    drop_last = spec.graph.batch is not None
    model_sha = file_sha256(model_path)
    key = stats_cache_key(model_sha, calib_set.dataset_hash, spec, names, num_bins, size)
    cache_file = Path(cache_dir) / f"calib-stats-{key[:24]}.npz" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        cached = load_stats(cache_file)
        if cached.meta.get("cache_key") == key:
            log.info("reusing calibration statistics %s", cache_file)
            return cached
        log.warning("ignoring %s: it was collected for different inputs", cache_file)

    report = ReadReport()
    first_pass = [True]

    def batches() -> Iterable[np.ndarray]:
        # Only the first pass reports (and warns about) unreadable images; the second skips them silently.
        use = report if first_pass[0] else None
        first_pass[0] = False
        return iter_batches(calib_set, spec, size, report=use, drop_last=drop_last)

    stats = collect_statistics(
        model, batches, names, num_bins=num_bins,
        total_batches=num_batches(len(calib_set), size, drop_last), progress=progress,
        intra_op_num_threads=intra_op_num_threads, providers=providers,
    )
    stats.meta.update({
        "cache_key": key, "model_sha256": model_sha, "dataset_hash": calib_set.dataset_hash,
        "spec_sha256": text_sha256(spec.to_json()), "batch_size": size, "read_report": report.as_dict(),
        "calibration_set": calib_set.summary(),
    })
    if report.skipped:
        log.warning("%d of %d calibration image(s) could not be read and were skipped",
                    report.skipped, len(calib_set))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        save_stats(stats, cache_file)
    return stats
