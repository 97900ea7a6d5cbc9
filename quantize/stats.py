"""Streaming activation statistics of an fp32 ONNX model in ONNX Runtime, for calibration.

Two passes over the images, nothing kept per image (memory depends on the model and the batch, never on
the number of images):

1. ranges: the graph is given, per calibrated tensor, in-graph ``ReduceMin(x)`` and ``ReduceMax(x)``
   outputs, so only scalars leave ONNX Runtime; they are min/max-accumulated, and ``absmax`` is
   ``max(-min, max)``, which equals ``max(|x|)`` exactly (an in-graph ``Abs`` would cost a full copy).
2. histograms: the tensors themselves become graph outputs and each batch is binned at once into
   ``num_bins`` bins of ``|x|`` over ``[0, absmax]`` (ncnn's rule: ``min(int(|x| * num_bins / absmax),
   num_bins - 1)`` in float32), exact zeros counted apart; the arrays are dropped before the next batch.

Only the part of the graph that the tensors depend on is run (decode tails and extra inputs are pruned
away). Counts are integers and maxima are order-independent, so results do not depend on batching nor on
how many batches run at once (``workers``, see :mod:`parallel`); with a fixed intra-op thread count ONNX
Runtime's CPU kernels are deterministic, which makes the statistics (and the caches built from them)
reproducible byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from centernet_edge.calib_data.batches import effective_batch_size, iter_batches, num_batches
from centernet_edge.calib_data.sources import CalibrationSet
from centernet_edge.runtime.atomic import atomic_path
from centernet_edge.runtime.hashing import file_sha256, text_sha256
from centernet_edge.runtime.images import ReadReport
from centernet_edge.runtime.onnx_graph import prune_to_outputs, tensor_types
from centernet_edge.runtime.onnx_session import create_session
from centernet_edge.runtime.spec import ModelSpec

from .parallel import consume, default_workers
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


def _single_input(model: onnx.ModelProto, input_name: str | None) -> str:
    inits = {i.name for i in model.graph.initializer}
    feeds = [i.name for i in model.graph.input if i.name not in inits]
    if input_name is not None and input_name not in feeds:
        raise ValueError(f"the calibrated tensors do not depend on input {input_name!r}; they need {feeds}")
    if len(feeds) != 1:
        raise ValueError(f"calibration feeds one image input, but the calibrated tensors need inputs {feeds}")
    return feeds[0]


def range_model(model: onnx.ModelProto, tensors: Sequence[str]) -> tuple[onnx.ModelProto, list[str]]:
    """Pass-1 model: for each tensor two scalar outputs, min and max (in that order)."""
    pruned = prune_to_outputs(model, tensors)
    types = tensor_types(pruned)
    g = pruned.graph
    outputs = []
    for i, name in enumerate(tensors):
        src = name
        if types.get(name, TensorProto.FLOAT) != TensorProto.FLOAT:
            # float16/64 activations are measured in float32, like the histograms
            src = f"{_PREFIX}f32_{i}"
            g.node.append(helper.make_node("Cast", [name], [src], to=TensorProto.FLOAT))
        lo, hi = (f"{_PREFIX}{kind}_{i}" for kind in ("min", "max"))
        g.node.extend([
            helper.make_node("ReduceMin", [src], [lo], keepdims=0),
            helper.make_node("ReduceMax", [src], [hi], keepdims=0),
        ])
        outputs.extend([lo, hi])
    del g.output[:]
    g.output.extend(onnx.ValueInfoProto(name=o) for o in outputs)
    return pruned, outputs


def histogram_model(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """Pass-2 model: the tensors themselves as outputs."""
    return prune_to_outputs(model, tensors)


# ---- collection -----------------------------------------------------------------------------------


def _session(model: onnx.ModelProto | bytes, threads: int | None, providers: Sequence[str] | None) -> Any:
    # Runs happen on worker threads: see create_session on mem_pattern.
    return create_session(model, threads=threads, providers=providers, mem_pattern=False)


def _progress(iterable: Iterable[Any], total: int | None, desc: str, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False)


# Elements binned per step. The float and index scratch (3 MB) stays in cache, so abs, scale, cast and
# bincount re-read cached data instead of streaming each activation from memory once per step; and the
# steps are long enough that workers rarely hand the GIL to each other (with 32K-element steps two
# workers lost ~15% of their time to GIL hand-offs; from 256K on it is negligible, measured on mb3).
_CHUNK = 1 << 18
# Memory the concurrent histogram runs may take, each counted as twice its outputs (ONNX Runtime's own
# working memory besides): bounds peak memory on many-core machines; mb3 at 512x512 (~340 MB of outputs
# per image) gets two concurrent images.
_HISTOGRAM_BYTES_IN_FLIGHT = 3 << 29


class _Binner:
    """Histogram of |x| into ``num_bins`` bins (index ``min(int(|x| * scale), num_bins - 1)``) plus the
    exact-zero count, chunk by chunk through fixed scratch buffers: nothing is allocated per tensor and
    the activation itself is only read. np.bincount dominates the cost."""

    def __init__(self, num_bins: int):
        self.num_bins = num_bins
        self._values = np.empty(_CHUNK, dtype=np.float32)
        self._index = np.empty(_CHUNK, dtype=np.intp)
        self._counts = np.zeros(num_bins + 2, dtype=np.int64)

    def add(self, x: np.ndarray, scale: np.float32, hist: np.ndarray) -> int:
        """Add the bins of ``x`` into ``hist`` (int64, ``num_bins``); returns the number of exact zeros."""
        flat = x.reshape(-1)
        counts = self._counts
        counts[:] = 0
        nonzero = 0
        for start in range(0, flat.size, _CHUNK):
            chunk = flat[start:start + _CHUNK]
            values = self._values[: chunk.size]
            if chunk.dtype == np.float32:
                np.abs(chunk, out=values)
            else:  # float16/64 activations are binned in float32, like the ranges
                np.copyto(values, chunk, casting="unsafe")
                np.abs(values, out=values)
            # |x| is +0.0 exactly when its bits are all zero; numpy counts integers faster than floats
            nonzero += int(np.count_nonzero(values.view(np.uint32)))
            values *= scale
            index = self._index[: chunk.size]
            np.copyto(index, values, casting="unsafe")  # float -> int truncates, i.e. floors values >= 0
            found = np.bincount(index, minlength=self.num_bins)
            if found.size > counts.size:
                raise ValueError("an activation outside the range measured in the first pass")
            counts[: found.size] += found
        # Clipping after counting instead of before (a float minimum per value): |x| <= absmax puts
        # int(|x| * scale) at num_bins at most, num_bins - 1 included, so this is the same clip.
        hist[: self.num_bins - 1] += counts[: self.num_bins - 1]
        hist[self.num_bins - 1] += int(counts[self.num_bins - 1:].sum())
        return flat.size - nonzero


class _Ranges:
    """One worker's session and running min/max (merged with min/max, so the split of images is
    irrelevant). Every worker has a session of its own: concurrent runs of one ONNX Runtime session
    were measured to re-fault ~30 MB of memory per run (tens of ms of system time per image)."""

    def __init__(self, n: int, session: Any):
        self.session = session
        self.lo = np.full(n, np.inf)
        self.hi = np.full(n, -np.inf)


class _Histograms:
    """One worker's session and integer counts (merged by addition, so the split of images is
    irrelevant; a session per worker for the reason given at :class:`_Ranges`)."""

    def __init__(self, n: int, num_bins: int, session: Any):
        self.session = session
        self.hists = np.zeros((n, num_bins), dtype=np.int64)
        self.zeros = np.zeros(n, dtype=np.int64)
        self.counts = np.zeros(n, dtype=np.int64)
        self.binner = _Binner(num_bins)


class _Counted:
    """Counts the images and batches an iterable yields (on the producing thread)."""

    def __init__(self, batches: Iterable[np.ndarray]):
        self._batches = batches
        self.images = 0
        self.batches = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        for batch in self._batches:
            self.images += int(batch.shape[0])
            self.batches += 1
            yield batch


def _measure_ranges(outputs: list[str], input_name: str, batch: np.ndarray, acc: _Ranges) -> None:
    vals = np.asarray(acc.session.run(outputs, {input_name: batch}), dtype=np.float64).reshape(-1, 2)
    np.minimum(acc.lo, vals[:, 0], out=acc.lo)
    np.maximum(acc.hi, vals[:, 1], out=acc.hi)


def _bin_batch(tensors: list[str], input_name: str, scales: list[np.float32], batch: np.ndarray,
               acc: _Histograms) -> None:
    outputs = acc.session.run(tensors, {input_name: batch})
    for i in range(len(tensors)):
        x = outputs[i]
        outputs[i] = None  # drop each activation once binned; nothing outlives the batch
        try:
            acc.zeros[i] += acc.binner.add(x, scales[i], acc.hists[i])
        except ValueError as exc:  # NaN casts to a negative index; an inf or a larger value to a huge one
            raise ValueError(f"non-finite or changed activations in {tensors[i]!r} (second pass)") from exc
        acc.counts[i] += x.size
    del outputs


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
    workers: int | None = None,
) -> CalibrationStats:
    """Two streaming passes (see the module doc). ``batches()`` must yield the same batches every call.

    ``workers`` batches are run at once (default: every available core), each in a single-threaded ONNX
    Runtime run; the per-worker results are merged order-independently, so they do not change the
    statistics. The histogram pass runs fewer at once when one batch's activations are large.
    """
    if num_bins < 2:
        raise ValueError(f"num_bins must be at least 2; got {num_bins}")
    if not tensors:
        raise ValueError("no tensors to calibrate")
    if len(set(tensors)) != len(tensors):
        raise ValueError("tensor names must be unique")
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    tensors = list(tensors)
    workers = max(1, workers or default_workers())

    ranged, range_outputs = range_model(proto, tensors)
    input_name = _single_input(ranged, None)
    n = len(tensors)
    if total_batches is not None:
        workers = max(1, min(workers, total_batches))
    first = _Counted(_progress(batches(), total_batches, "calibration ranges", progress))
    data = ranged.SerializeToString()
    ranges = [_Ranges(n, _session(data, intra_op_num_threads, providers)) for _ in range(workers)]
    consume(first, partial(_measure_ranges, range_outputs, input_name), ranges)
    for r in ranges:
        r.session = None  # freed before the histogram sessions are built
    if first.batches == 0:
        raise ValueError("the calibration data yielded no batches (no readable images?)")
    lo = np.min([r.lo for r in ranges], axis=0)
    hi = np.max([r.hi for r in ranges], axis=0)
    absmax = np.maximum(-lo, hi) + 0.0  # + 0.0 turns an all-zero tensor's -0.0 into the 0.0 that |x| gives
    bad = [tensors[i] for i in np.flatnonzero(~np.isfinite(absmax))]
    if bad:
        raise ValueError(f"non-finite activations (inf/NaN) in {len(bad)} tensor(s), e.g. {bad[0]!r}")

    scales = [np.float32(num_bins / a) if a > 0 else np.float32(0) for a in absmax]
    bin_batch = partial(_bin_batch, tensors, input_name, scales)
    data = histogram_model(proto, tensors).SerializeToString()
    second = _Counted(_progress(batches(), first.batches, "calibration histograms", progress))
    stream = iter(second)
    head = _Histograms(n, num_bins, _session(data, intra_op_num_threads, providers))
    accs = [head]
    batch = next(stream, None)
    if batch is not None:
        # The first batch, alone, tells how much one batch's activations weigh; that bounds the workers.
        bin_batch(batch, head)
        per_batch = int(head.counts.sum()) * 4 * 2  # float32 outputs, doubled as above
        del batch
        fit = max(1, _HISTOGRAM_BYTES_IN_FLIGHT // max(per_batch, 1))
        accs += [_Histograms(n, num_bins, _session(data, intra_op_num_threads, providers))
                 for _ in range(min(workers, fit, first.batches) - 1)]
        consume(stream, bin_batch, accs)
    for a in accs:
        a.session = None
    if second.images != first.images:
        raise ValueError(f"the calibration data changed between passes ({first.images} then {second.images} "
                         "images)")
    hists = np.sum([a.hists for a in accs], axis=0)
    zero_counts = np.sum([a.zeros for a in accs], axis=0)
    counts = np.sum([a.counts for a in accs], axis=0)
    hists[:, 0] -= zero_counts  # every exact zero landed in bin 0

    stats = {
        name: TensorStats(name, float(absmax[i]), float(lo[i]), float(hi[i]), int(counts[i]),
                          int(zero_counts[i]), hists[i].copy())
        for i, name in enumerate(tensors)
    }
    return CalibrationStats(stats, num_images=first.images, num_batches=first.batches,
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
    workers: int | None = None,
    strict: bool = False,
) -> CalibrationStats:
    """Statistics for ``model_path`` over ``calib_set``, fed exactly as deployment feeds it.

    ``tensors`` defaults to :func:`calibration_tensors`. With ``cache_dir`` the result is stored as
    ``calib-stats-<key>.npz`` keyed by model sha256, dataset hash, spec, tensors and binning, and reused
    when everything matches, so threshold methods can be compared without re-running the model.
    ``meta`` records the hashes and the read report (images skipped or converted, every skip with its
    reason); ``strict`` raises at the first unreadable image instead of skipping it.
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

    report = ReadReport(strict=strict)
    first_pass = [True]

    def batches() -> Iterable[np.ndarray]:
        # Only the first pass reports (and warns about) unreadable images; the second skips them silently.
        use = report if first_pass[0] else None
        first_pass[0] = False
        return iter_batches(calib_set, spec, size, report=use, drop_last=drop_last)

    stats = collect_statistics(
        model, batches, names, num_bins=num_bins,
        total_batches=num_batches(len(calib_set), size, drop_last), progress=progress,
        intra_op_num_threads=intra_op_num_threads, providers=providers, workers=workers,
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
