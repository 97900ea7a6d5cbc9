"""Label-free sensitivity finds a deliberately fragile layer; mixed precision keeps it float."""

from __future__ import annotations

import json

import numpy as np
import pytest
from quant_synthetic import FRAGILE, quant_setup

from centernet_edge.quantize.head_error import (
    HeadError,
    HeadProbe,
    detection_agreement,
    peak_indices,
    significantly_lower,
)
from centernet_edge.quantize.mixed import (
    default_max_float,
    knee_point,
    precision_table,
    search_knee,
    search_mixed_precision,
    write_precision,
)
from centernet_edge.quantize.sensitivity import layer_sensitivity, write_sensitivity
from centernet_edge.runtime.detections import Detections


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    s = quant_setup(tmp_path_factory.mktemp("sens"), 6, image_seed=2)
    model, placement, amax = s.model, s.placement, s.amax
    probe = HeadProbe(s.spec, s.batches)
    probe.set_reference(model)
    return model, placement, amax, probe


def test_fp32_against_itself_has_zero_error(setup):
    model, _, _, probe = setup
    err = probe.measure(model)
    assert err.head_error == 0 and err.peak_overlap == 1 and err.heatmap_mse == 0 and err.images == 6


def test_fragile_layer_ranks_first(setup, tmp_path):
    model, placement, amax, probe = setup
    ranking = layer_sensitivity(model, placement.layers, amax, probe, progress=False)
    assert [r.layer for r in ranking][0] == FRAGILE
    top, second = ranking[0].error, ranking[1].error
    assert top.head_error > 2 * second.head_error
    assert top.heatmap_mse > second.heatmap_mse
    errors = [r.error.head_error for r in ranking]
    assert errors == sorted(errors, reverse=True)
    write_sensitivity(ranking, tmp_path / "s.json", tmp_path / "s.md", {"images": 6})
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["ranking"][0]["layer"] == FRAGILE and doc["meta"]["images"] == 6
    assert f"| 1 | `{FRAGILE}` |" in (tmp_path / "s.md").read_text()


def test_mixed_precision_keeps_the_fragile_layer_float(setup, tmp_path):
    model, placement, amax, probe = setup
    ranking = layer_sensitivity(model, placement.layers, amax, probe, progress=False)
    all_int8 = search_mixed_precision(model, placement, amax, ranking, probe, budget=1.0)
    assert all_int8.float_layers == []
    budget = min(0.5 * all_int8.error.head_error, ranking[1].error.head_error * 3)
    result = search_mixed_precision(model, placement, amax, ranking, probe, budget=budget)
    assert result.met_budget and result.error.head_error <= budget
    assert result.float_layers[0] == FRAGILE
    assert len(result.curve) >= 2 and result.curve[0][0] == 0
    table = precision_table(placement, result.float_layers)
    assert table[FRAGILE]["precision"] == "float" and table["peak_pool"]["reason"] == "decode tail"
    write_precision(tmp_path / "p.json", placement, result)
    doc = json.loads((tmp_path / "p.json").read_text())
    assert FRAGILE in doc["float_layers"] and FRAGILE not in doc["int8_layers"]
    capped = search_mixed_precision(model, placement, amax, ranking, probe, budget=0.0, max_float=0)
    assert not capped.met_budget and capped.float_layers == []


def test_knee_point_keeps_most_of_the_reachable_reduction():
    # 0.57 -> best 0.25: 90% of the reduction is reached at error <= 0.282
    assert knee_point([0.57, 0.39, 0.37, 0.33, 0.29, 0.28, 0.26, 0.25]) == 5
    assert knee_point([0.5, 0.1, 0.09, 0.09]) == 1  # error in one layer: one float layer
    assert knee_point([0.5, 0.1, 0.09, 0.09], tolerance=0.0) == 2
    assert knee_point([0.2, 0.3, 0.4]) == 0  # float layers that do not help are not kept
    assert knee_point([0.3]) == 0
    with pytest.raises(ValueError, match="tolerance"):
        knee_point([0.3, 0.2], tolerance=2)


def test_knee_rule_floats_the_fragile_layer_within_the_cap(setup):
    model, placement, amax, probe = setup
    ranking = layer_sensitivity(model, placement.layers, amax, probe.subset(2), progress=False)
    assert ranking[0].layer == FRAGILE  # two images are enough to rank the fragile layer first
    cap = default_max_float(placement)
    convs = sum(layer.op_type == "Conv" for layer in placement.layers)
    assert cap == max(1, int(0.1 * convs))
    result = search_knee(model, placement, amax, ranking, probe, max_float=3)
    assert result.rule == "knee" and [k for k, _ in result.curve] == [0, 1, 2, 3]
    assert result.float_layers[:1] == [FRAGILE] and len(result.float_layers) <= 3
    errors = [e.head_error for _, e in result.curve]
    assert result.error.head_error == errors[len(result.float_layers)]
    assert len(result.float_layers) == knee_point(errors)
    assert result.error.head_error < 0.5 * errors[0]
    assert result.to_dict()["budget"] is None and result.to_dict()["rule"] == "knee"


def test_lowest_top_k_score_is_the_smallest_kth_peak_of_the_reference(setup, tmp_path):
    model, _, _, probe = setup
    from centernet_edge.quantize.head_error import peak_indices

    lows = [float(peak_indices(ref.heat, probe.spec.decode.K, probe.spec.decode.peak_kernel)[1].min())
            for ref in probe._reference]
    assert probe.lowest_top_k_score() == pytest.approx(min(lows))
    fresh = HeadProbe(probe.spec, probe.batches)
    with pytest.raises(RuntimeError, match="set_reference"):
        fresh.lowest_top_k_score()


def test_probe_subset_shares_the_reference(setup):
    model, _, _, probe = setup
    part = probe.subset(2)
    assert part.images == 2 and part.measure(model).head_error == 0
    assert probe.subset(100).images == probe.images


def test_detection_agreement_weights_scores_and_classes():
    base = Detections(np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([0.9, 0.1]), np.array([1, 2]))
    assert detection_agreement(base, base) == pytest.approx(1.0)
    moved = Detections(np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), np.array([0.9, 0.1]), np.array([1, 2]))
    assert detection_agreement(base, moved) == pytest.approx(0.9)
    wrong_class = Detections(base.boxes, base.scores, np.array([0, 2]))
    assert detection_agreement(base, wrong_class) == pytest.approx(0.1)
    half_score = Detections(base.boxes, np.array([0.45, 0.1]), base.labels)
    assert detection_agreement(base, half_score) == pytest.approx((0.9 * 0.5 + 0.1) / 1.0)


def test_peak_indices_take_local_maxima_only():
    heat = np.zeros((2, 5, 5), np.float32)
    heat[0, 2, 2], heat[0, 2, 3] = 0.9, 0.8  # 0.8 is suppressed by its 3x3 neighbour
    heat[1, 0, 0] = 0.7
    idx, scores = peak_indices(heat, 2)
    assert idx.tolist() == [12, 25] and scores.tolist() == pytest.approx([0.9, 0.7])


def _full_selection(heat: np.ndarray, k: int, kernel: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The plain rule: partition the whole map with non-maxima set to 0, then sort by score, index."""
    pad = kernel // 2
    padded = np.pad(heat, ((0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    hmax = np.full_like(heat, -np.inf)
    for dy in range(kernel):
        for dx in range(kernel):
            np.maximum(hmax, padded[:, dy:dy + heat.shape[1], dx:dx + heat.shape[2]], out=hmax)
    peaks = np.where(heat == hmax, heat, 0.0).ravel()
    k = min(k, peaks.size)
    idx = np.argpartition(-peaks, k - 1)[:k]
    idx = idx[np.lexsort((idx, -peaks[idx]))]
    return idx, peaks[idx]


@pytest.mark.parametrize("kind", ["random", "ties", "negative", "few peaks"])
def test_peak_indices_equal_the_full_selection(kind):
    rng = np.random.default_rng(3)
    for _ in range(20):
        heat = rng.random((3, 9, 11)).astype(np.float32)
        if kind == "ties":
            heat = np.round(heat * 3) / 3
        elif kind == "negative":
            heat -= 0.5
        elif kind == "few peaks":
            heat[:] = 0
            heat[0, 4, 4] = 0.5
        heat = heat.astype(np.float32)
        for k in (1, 5, 40, 400):
            idx, scores = peak_indices(heat, k)
            ref_idx, ref_scores = _full_selection(heat, k)
            np.testing.assert_array_equal(idx, ref_idx)
            np.testing.assert_array_equal(scores, ref_scores)
            assert scores.dtype == ref_scores.dtype


def test_worker_count_does_not_change_the_measurements(setup):
    model, placement, amax, probe = setup
    layers = placement.layers[:4]
    one = layer_sensitivity(model, layers, amax, probe, progress=False, workers=1)
    two = layer_sensitivity(model, layers, amax, probe, progress=False, workers=2)
    assert [r.to_dict() for r in one] == [r.to_dict() for r in two]
    assert probe.measure(model, workers=3) == probe.measure(model, workers=1)


def _head_error(per_image: list[float]) -> HeadError:
    mean = float(np.mean(per_image))
    return HeadError(mean, 1.0 - mean, None, None, None, None, len(per_image), tuple(per_image))


def test_fitted_weights_need_an_improvement_beyond_the_probe_noise() -> None:
    rng = np.random.default_rng(0)
    before = rng.uniform(0.2, 0.8, 32)
    # The same images, each a little better: a consistent paired improvement, kept.
    assert significantly_lower(_head_error(list(before - 0.02)), _head_error(list(before)))
    # A lower mean that comes from a few images while the rest scatter: within the noise, dropped.
    scatter = before + rng.normal(0.0, 0.05, 32)
    scatter[:2] -= 0.3
    after = _head_error(list(scatter))
    assert after.head_error < _head_error(list(before)).head_error
    assert not significantly_lower(after, _head_error(list(before)))
    # Worse is never kept; unpaired measurements are refused.
    assert not significantly_lower(_head_error(list(before + 0.02)), _head_error(list(before)))
    with pytest.raises(ValueError, match="same probe images"):
        significantly_lower(_head_error([0.1, 0.2]), _head_error([0.1, 0.2, 0.3]))
    assert "per_image" not in _head_error([0.1, 0.2]).to_dict()
