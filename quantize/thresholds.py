"""Per-tensor clipping thresholds (amax) from a histogram of |x| over [0, absmax].

All functions are pure and deterministic: ``hist`` holds counts per bin, ``bin_edges`` its ``len(hist)+1``
uniform edges starting at 0 (``numpy.linspace(0, absmax, num_bins + 1)``). Symmetric int8 then uses
``scale = amax / 127``.

``entropy`` follows the recommended spec in REFERENCE §2.2, i.e. TensorRT's published entropy recipe as
ncnn implements it: for every candidate ``t`` in ``[start_bin, num_bins)`` the reference P is
``hist[:t]`` with the outliers ``hist[t:]`` folded into its last bin; the candidate Q quantises
``hist[:t]`` (no outliers, as in the GTC pseudocode) into ``num_levels`` levels with fractional bin
splitting (level j covers ``[j*t/L, (j+1)*t/L)``), then expands each level's mass back over the bins it
covers: uniformly over the level's width (ncnn, ``expand="uniform"``) or only over its non-empty bins
(GTC / pytorch-quantization / ONNX Runtime, ``expand="nonempty"``, the default). P and Q are normalised,
``eps`` is added to every bin of both (ncnn's smoothing) and ``KL(P||Q)`` is taken; the first minimum
wins and ``amax = (t + 0.5) * bin_width``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol

import numpy as np

__all__ = [
    "DEFAULT_ZEROS",
    "METHODS",
    "ZERO_MODES",
    "compute_amaxes",
    "entropy_amax",
    "kl_divergences",
    "minmax_amax",
    "mse_amax",
    "percentile_amax",
    "tensor_amax",
]

METHODS = ("entropy", "minmax", "percentile", "mse")
ZERO_MODES = ("skip", "keep", "copy_next")
# ncnn skips exact zeros (ReLU's spike would otherwise dominate P); percentile and MSE describe the real
# value distribution, zeros included.
DEFAULT_ZEROS = {"entropy": "skip", "minmax": "keep", "percentile": "keep", "mse": "keep"}

Expand = Literal["nonempty", "uniform"]
_CHUNK = 128  # candidate thresholds evaluated together: bounds memory at ~chunk x num_bins float64s


def _validate(hist: np.ndarray, bin_edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h = np.asarray(hist)
    e = np.asarray(bin_edges, dtype=np.float64)
    if h.ndim != 1 or h.size == 0:
        raise ValueError(f"hist must be a non-empty 1-D array; got shape {h.shape}")
    if e.shape != (h.size + 1,):
        raise ValueError(f"bin_edges must have len(hist)+1 = {h.size + 1} entries; got {e.shape}")
    if np.any(h < 0):
        raise ValueError("hist must not contain negative counts")
    if e[0] != 0 or np.any(np.diff(e) < 0):
        raise ValueError("bin_edges must start at 0 and be non-decreasing (a histogram of |x|)")
    return h.astype(np.float64), e


def _interp_cumsum(cum: np.ndarray, values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Mass of ``values`` over [0, x) for fractional bin positions x (bin k spans [k, k+1))."""
    n = values.size
    whole = np.floor(x).astype(np.int64)
    frac = x - whole
    return cum[whole] + frac * values[np.minimum(whole, n - 1)]


def kl_divergences(
    hist: np.ndarray,
    *,
    start_bin: int = 128,
    num_levels: int = 128,
    expand: Expand = "nonempty",
    eps: float = 1e-4,
) -> np.ndarray:
    """``KL(P_t || Q_t)`` for every candidate ``t = start_bin .. len(hist)-1`` (see the module doc)."""
    if expand not in ("nonempty", "uniform"):
        raise ValueError(f"expand must be 'nonempty' or 'uniform'; got {expand!r}")
    if num_levels < 1 or start_bin < num_levels:
        raise ValueError(f"need 1 <= num_levels <= start_bin; got num_levels={num_levels}, start_bin={start_bin}")
    h = np.asarray(hist, dtype=np.float64)
    n = h.size
    total = h.sum()
    if n <= start_bin:
        return np.zeros(0)
    if total <= 0:
        return np.zeros(n - start_bin)
    cum = np.concatenate(([0.0], np.cumsum(h)))
    nonempty = (h > 0).astype(np.float64)
    cum_nonempty = np.concatenate(([0.0], np.cumsum(nonempty)))
    levels = np.arange(num_levels + 1, dtype=np.float64)
    # KL(P||Q) = sum (p+eps) log(p+eps) - sum (p+eps) log(q+eps). P equals the normalised histogram except
    # in its last bin, so the first sum is a prefix sum plus one term and only the second one is 2-D.
    p_eps = h / total + eps
    p_self = np.concatenate(([0.0], np.cumsum(p_eps * np.log(p_eps))))
    p_cum = np.concatenate(([0.0], np.cumsum(p_eps)))
    log_eps = np.log(eps)
    out = np.empty(n - start_bin)
    for lo in range(start_bin, n, _CHUNK):
        t = np.arange(lo, min(lo + _CHUNK, n), dtype=np.int64)
        rows = np.arange(t.size)
        width = (t / num_levels)[:, None]                          # bins per level, >= 1
        bounds = levels[None, :] * width                           # level j covers [bounds_j, bounds_j+1)
        mass = np.diff(_interp_cumsum(cum, h, bounds), axis=1)
        if expand == "nonempty":
            spread = np.diff(_interp_cumsum(cum_nonempty, nonempty, bounds), axis=1)
        else:
            spread = np.broadcast_to(width, mass.shape)
        density = np.divide(mass, spread, out=np.zeros_like(mass), where=spread > 0)

        m = int(t.max())
        k = np.arange(m, dtype=np.float64)[None, :]
        # A bin [k, k+1) overlaps at most two levels because every level is at least one bin wide.
        j_lo = np.minimum(np.floor(k / width), num_levels - 1).astype(np.int64)
        j_hi = np.minimum(j_lo + 1, num_levels - 1)
        share_lo = np.clip((j_lo + 1) * width - k, 0.0, 1.0)
        q = (share_lo * np.take_along_axis(density, j_lo, axis=1)
             + (1.0 - share_lo) * np.take_along_axis(density, j_hi, axis=1))
        keep = k < t[:, None]
        if expand == "nonempty":
            keep = keep & (nonempty[None, :m] > 0)
        q = np.where(keep, q, 0.0)
        q_sum = q.sum(axis=1, keepdims=True)
        q *= np.divide(1.0, q_sum, out=np.zeros_like(q_sum), where=q_sum > 0)
        log_q = np.log(q + eps)

        # Bins k >= t hold q = 0, i.e. log(eps): take them back out of the matrix-vector product.
        cross = log_q @ p_eps[:m] - log_eps * (p_cum[m] - p_cum[t])
        p_last = (total - cum[t - 1]) / total + eps                # outliers folded into the last bin
        cross += (p_last - p_eps[t - 1]) * log_q[rows, t - 1]
        self_term = p_self[t - 1] + p_last * np.log(p_last)
        out[lo - start_bin: lo - start_bin + t.size] = self_term - cross
    return out


def entropy_amax(
    hist: np.ndarray,
    bin_edges: np.ndarray,
    *,
    start_bin: int = 128,
    num_levels: int = 128,
    expand: Expand = "nonempty",
    eps: float = 1e-4,
) -> float:
    """TensorRT-style entropy (KL) threshold; the full range when there are no candidates or no mass."""
    h, edges = _validate(hist, bin_edges)
    divergences = kl_divergences(h, start_bin=start_bin, num_levels=num_levels, expand=expand, eps=eps)
    if divergences.size == 0 or h.sum() <= 0:
        return float(edges[-1])
    best = start_bin + int(np.argmin(divergences))  # argmin returns the first minimum, like ncnn's strict <
    return float((best + 0.5) * (edges[1] - edges[0]))


def minmax_amax(hist: np.ndarray, bin_edges: np.ndarray) -> float:
    """The histogram's range, i.e. absmax."""
    _, edges = _validate(hist, bin_edges)
    return float(edges[-1])


def percentile_amax(hist: np.ndarray, bin_edges: np.ndarray, percentile: float = 99.99) -> float:
    """The value below which ``percentile`` % of the counts lie (linear within the crossing bin)."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100]; got {percentile}")
    h, edges = _validate(hist, bin_edges)
    total = h.sum()
    if total <= 0:
        return float(edges[-1])
    cum = np.cumsum(h)
    target = total * (percentile / 100.0)
    i = min(int(np.searchsorted(cum, target, side="left")), h.size - 1)
    below = cum[i - 1] if i > 0 else 0.0
    frac = min(max((target - below) / h[i], 0.0), 1.0) if h[i] > 0 else 1.0
    return float(edges[i] + frac * (edges[i + 1] - edges[i]))


def mse_amax(hist: np.ndarray, bin_edges: np.ndarray, *, start_bin: int = 128, num_levels: int = 127) -> float:
    """The bin edge (from ``start_bin`` up) minimising the expected squared error of symmetric int8.

    Each bin's values are represented by its centre, quantised as ``min(round(c / s), num_levels) * s``
    with ``s = amax / num_levels``. Candidates start at ``start_bin`` because below ~128 bins the step
    ``s`` is narrower than a bin and the centre approximation stops being meaningful.
    """
    h, edges = _validate(hist, bin_edges)
    n = h.size
    if h.sum() <= 0 or edges[-1] <= 0:
        return float(edges[-1])
    centres = 0.5 * (edges[:-1] + edges[1:])
    first = min(max(start_bin, 1), n)
    candidates = edges[first:]
    errors = np.empty(candidates.size)
    for lo in range(0, candidates.size, _CHUNK):
        amax = candidates[lo: lo + _CHUNK, None]
        step = amax / num_levels
        quant = np.minimum(np.rint(centres[None, :] / step), num_levels) * step
        errors[lo: lo + amax.shape[0]] = ((centres[None, :] - quant) ** 2 * h[None, :]).sum(axis=1)
    return float(candidates[int(np.argmin(errors))])


class _HistogramStats(Protocol):
    absmax: float

    @property
    def bin_edges(self) -> np.ndarray: ...

    def histogram(self, zeros: str = "skip") -> np.ndarray: ...


def tensor_amax(stats: _HistogramStats, method: str, *, zeros: str | None = None, **options: Any) -> float:
    """amax for one tensor's collected statistics (:class:`centernet_edge.quantize.stats.TensorStats`).

    ``zeros`` picks how exact zeros enter the histogram (``skip`` like ncnn, ``keep``, or ``copy_next``:
    bin 0 replaced by bin 1 as pytorch-quantization does); the default depends on the method.
    ``options`` go to the method's function (e.g. ``percentile=99.9``, ``expand="uniform"``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "minmax":
        if options:
            raise TypeError(f"minmax takes no options; got {sorted(options)}")
        return float(stats.absmax)
    zeros = zeros or DEFAULT_ZEROS[method]
    if zeros not in ZERO_MODES:
        raise ValueError(f"zeros must be one of {', '.join(ZERO_MODES)}; got {zeros!r}")
    hist, edges = stats.histogram(zeros), stats.bin_edges
    if method == "entropy":
        return entropy_amax(hist, edges, **options)
    if method == "percentile":
        return percentile_amax(hist, edges, **options)
    return mse_amax(hist, edges, **options)


def compute_amaxes(tensors: Mapping[str, _HistogramStats], method: str, *, zeros: str | None = None,
                   **options: Any) -> dict[str, float]:
    """``{tensor name: amax}`` for every tensor, in the mapping's order."""
    return {name: tensor_amax(s, method, zeros=zeros, **options) for name, s in tensors.items()}
