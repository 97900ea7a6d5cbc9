"""Threshold methods on histograms: a slow pure-Python KL oracle, known distributions, edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from centernet_edge.quantize.thresholds import (
    compute_amaxes,
    entropy_amax,
    kl_divergences,
    minmax_amax,
    mse_amax,
    percentile_amax,
    tensor_amax,
)


def kl_oracle(hist: list[int], start_bin: int, num_levels: int, expand: str, eps: float = 1e-4) -> list[float]:
    """The entropy loop written out bin by bin, ncnn style (left_upper / right_lower fractional edges)."""
    n, total, out = len(hist), float(sum(hist)), []
    for t in range(start_bin, n):
        p = [float(v) for v in hist[:t]]
        p[t - 1] += float(sum(hist[t:]))
        per_level = t / num_levels
        q = [0.0] * t
        for j in range(num_levels):
            start, end = j * per_level, (j + 1) * per_level
            left_upper, right_lower = math.ceil(start), math.floor(end)
            parts = []
            if left_upper - start > 0:
                parts.append((left_upper - 1, left_upper - start))
            parts.extend((k, 1.0) for k in range(left_upper, right_lower))
            if end - right_lower > 0 and right_lower < t:
                parts.append((right_lower, end - right_lower))
            mass = sum(w * hist[k] for k, w in parts)
            if expand == "nonempty":
                spread = sum(w for k, w in parts if hist[k] > 0)
            else:
                spread = end - start
            density = mass / spread if spread > 0 else 0.0
            for k, w in parts:
                if expand == "uniform" or hist[k] > 0:
                    q[k] += w * density
        q_total = sum(q)
        p = [v / total for v in p]
        q = [v / q_total if q_total > 0 else 0.0 for v in q]
        out.append(sum((a + eps) * math.log((a + eps) / (b + eps)) for a, b in zip(p, q, strict=True)))
    return out


def edges_for(hist: np.ndarray, absmax: float) -> np.ndarray:
    return np.linspace(0.0, absmax, hist.size + 1)


def abs_hist(values: np.ndarray, bins: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    a = np.abs(values)
    absmax = float(a.max())
    idx = np.minimum((a * (bins / absmax)).astype(np.int64), bins - 1)
    hist = np.bincount(idx, minlength=bins)
    return hist, edges_for(hist, absmax)


@pytest.mark.parametrize("expand", ["nonempty", "uniform"])
def test_vectorised_kl_matches_pure_python_oracle(expand):
    rng = np.random.default_rng(7)
    for _ in range(25):
        n = int(rng.integers(12, 70))
        levels = int(rng.choice([2, 3, 4, 5, 8]))
        start = int(rng.integers(levels, n))
        hist = rng.integers(0, 40, n) * (rng.random(n) > 0.35)
        hist[0] += 1
        expected = np.array(kl_oracle(hist.tolist(), start, levels, expand))
        got = kl_divergences(hist, start_bin=start, num_levels=levels, expand=expand)
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
        assert int(np.argmin(got)) == int(np.argmin(expected))


def test_vectorised_kl_matches_oracle_at_full_size_prefix():
    # real 128 levels, candidates 128..299 of a gaussian |x| histogram
    hist, _ = abs_hist(np.random.default_rng(1).standard_normal(200_000))
    expected = np.array(kl_oracle(hist[:300].tolist(), 128, 128, "nonempty"))
    np.testing.assert_allclose(kl_divergences(hist[:300]), expected, rtol=1e-9)


def test_threshold_is_t_plus_half_bin():
    # All mass inside the first 128 bins: t=128 reproduces P exactly (KL 0), so amax = 128.5 bin widths.
    hist = np.zeros(2048, dtype=np.int64)
    hist[:128] = np.random.default_rng(2).integers(1, 100, 128)
    edges = edges_for(hist, 2048.0)
    assert kl_divergences(hist)[0] == pytest.approx(0.0, abs=1e-12)
    assert entropy_amax(hist, edges) == 128.5


def test_entropy_on_known_distributions():
    rng = np.random.default_rng(0)
    gauss = rng.standard_normal(1_000_000)
    hist, edges = abs_hist(gauss)
    amax = entropy_amax(hist, edges)
    assert 3.0 < amax < edges[-1]  # clips the tail, keeps a few sigma
    uniform = rng.uniform(-3.0, 3.0, 1_000_000)
    hist, edges = abs_hist(uniform)
    assert entropy_amax(hist, edges) > 0.97 * edges[-1]
    # rare huge outliers: the threshold ignores them
    spiky = np.concatenate([rng.standard_normal(500_000), [200.0, -150.0]])
    hist, edges = abs_hist(spiky)
    assert entropy_amax(hist, edges) < 0.1 * edges[-1]


def test_entropy_expand_modes_and_small_histograms():
    hist, edges = abs_hist(np.random.default_rng(3).laplace(size=300_000))
    a = entropy_amax(hist, edges, expand="nonempty")
    b = entropy_amax(hist, edges, expand="uniform")
    assert 0 < a < edges[-1] and 0 < b < edges[-1]
    small = np.array([5, 3, 0, 1])
    assert entropy_amax(small, edges_for(small, 4.0)) == 4.0  # fewer bins than start_bin: full range
    empty = np.zeros(2048, dtype=np.int64)
    assert entropy_amax(empty, edges_for(empty, 0.0)) == 0.0
    with pytest.raises(ValueError, match="expand"):
        kl_divergences(hist, expand="spread")


def test_minmax_is_absmax_and_percentile_is_monotonic():
    values = np.random.default_rng(4).standard_normal(200_000)
    hist, edges = abs_hist(values)
    assert minmax_amax(hist, edges) == float(np.abs(values).max())
    ps = [50, 90, 99, 99.9, 99.99, 100]
    amaxes = [percentile_amax(hist, edges, p) for p in ps]
    assert amaxes == sorted(amaxes) and amaxes[-1] == edges[-1]
    # the histogram's percentile agrees with the exact one to about a bin
    assert abs(percentile_amax(hist, edges, 99.0) - np.percentile(np.abs(values), 99.0)) < 2 * edges[1]
    with pytest.raises(ValueError, match="percentile"):
        percentile_amax(hist, edges, 0)


def test_mse_on_known_distributions():
    rng = np.random.default_rng(5)
    hist, edges = abs_hist(rng.standard_normal(1_000_000))
    amax = mse_amax(hist, edges)
    assert 2.5 < amax < edges[-1]
    hist, edges = abs_hist(rng.uniform(-1, 1, 1_000_000))
    assert mse_amax(hist, edges) > 0.95 * edges[-1]
    # a candidate grid starting at bin 128 never goes below 128 bins
    assert mse_amax(hist, edges) >= edges[128]


def test_histogram_validation_errors():
    with pytest.raises(ValueError, match="len\\(hist\\)\\+1"):
        entropy_amax(np.ones(10), np.linspace(0, 1, 10))
    with pytest.raises(ValueError, match="negative"):
        percentile_amax(np.array([1, -1, 2]), np.linspace(0, 1, 4))
    with pytest.raises(ValueError, match="start at 0"):
        mse_amax(np.ones(3), np.array([1.0, 2.0, 3.0, 4.0]))


class FakeStats:
    """The protocol tensor_amax needs (what quantize.stats.TensorStats provides)."""

    def __init__(self, hist: np.ndarray, zero_count: int, absmax: float):
        self.hist, self.zero_count, self.absmax = hist, zero_count, absmax

    @property
    def bin_edges(self) -> np.ndarray:
        return edges_for(self.hist, self.absmax)

    def histogram(self, zeros: str = "skip") -> np.ndarray:
        h = self.hist.copy()
        if zeros == "keep":
            h[0] += self.zero_count
        elif zeros == "copy_next":
            h[0] = h[1]
        return h


def test_tensor_amax_dispatch_and_zero_modes():
    rng = np.random.default_rng(6)
    relu = np.maximum(rng.standard_normal(400_000), 0)
    nonzero = relu[relu > 0]
    hist, edges = abs_hist(nonzero)
    stats = FakeStats(hist, int((relu == 0).sum()), float(edges[-1]))
    assert tensor_amax(stats, "minmax") == stats.absmax
    assert tensor_amax(stats, "entropy") == entropy_amax(hist, edges)
    keep = stats.histogram("keep")
    assert tensor_amax(stats, "percentile", percentile=99.0) == percentile_amax(keep, edges, 99.0)
    # zeros pull the percentile down: half of the values are exactly 0
    assert tensor_amax(stats, "percentile", zeros="skip", percentile=99.0) > percentile_amax(keep, edges, 99.0)
    assert tensor_amax(stats, "entropy", zeros="copy_next") > 0
    result = compute_amaxes({"b": stats, "a": stats}, "mse")
    assert list(result) == ["b", "a"] and result["a"] == mse_amax(keep, edges)
    with pytest.raises(ValueError, match="unknown calibration method"):
        tensor_amax(stats, "kl")
    with pytest.raises(ValueError, match="zeros must be"):
        tensor_amax(stats, "entropy", zeros="drop")
    with pytest.raises(TypeError, match="minmax takes no options"):
        tensor_amax(stats, "minmax", percentile=99.0)


def test_thresholds_are_deterministic():
    hist, edges = abs_hist(np.random.default_rng(8).standard_normal(100_000))
    assert entropy_amax(hist, edges) == entropy_amax(hist.copy(), edges.copy())
    assert mse_amax(hist, edges) == mse_amax(hist, edges)
