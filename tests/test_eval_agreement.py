"""Label-free agreement metrics and the baseline result cache."""

from __future__ import annotations

import numpy as np
import pytest

from centernet_edge.eval.agreement import (
    AgreementAccumulator,
    heatmap_probabilities,
    match_detections,
)
from centernet_edge.eval.cache import CachedRun, ResultCache, cache_key
from centernet_edge.runtime.detections import Detections, box_iou
from centernet_edge.runtime.spec import GraphIO, ModelSpec, Preprocess, TensorInfo, source_decode


def _dets(rows: list[list[float]]) -> Detections:
    return Detections.from_array(np.asarray(rows, np.float32).reshape(-1, 6))


def test_box_iou_known_values() -> None:
    a = np.array([[0, 0, 10, 10]], float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]], float)
    assert box_iou(a, b)[0] == pytest.approx([1.0, 50 / 150, 0.0, 0.0])


def test_identical_detections_agree_fully() -> None:
    d = _dets([[0, 0, 10, 10, 0.9, 1], [20, 20, 40, 40, 0.5, 2], [0, 0, 5, 5, 0.05, 3]])
    m = match_detections(d, d)
    assert (m.n_base, m.base_matched, m.n_other, m.other_matched) == (2, 2, 2, 2)
    assert m.pair_ious.tolist() == [1.0, 1.0] and m.score_errors.tolist() == [0.0, 0.0]
    assert m.disagreement == 0.0


def test_class_iou_and_threshold_crossing() -> None:
    base = _dets([[0, 0, 10, 10, 0.9, 1], [50, 50, 60, 60, 0.31, 4], [100, 100, 110, 110, 0.8, 5]])
    other = _dets([
        [0, 0, 10, 10, 0.9, 2],  # same box, other class: no match
        [51, 50, 61, 60, 0.29, 4],  # just under the threshold: still the same detection
        [105, 100, 115, 110, 0.8, 5],  # IoU 1/3 < 0.5: no match
    ])
    m = match_detections(base, other, iou_threshold=0.5, min_score=0.3)
    assert m.n_base == 3 and m.n_other == 2
    assert m.base_matched == 1 and m.other_matched == 0
    assert m.pair_ious == pytest.approx([9 * 10 / (11 * 10)])
    assert m.score_errors == pytest.approx([0.02], abs=1e-6)
    # Unmatched confident mass: base 0.9 + 0.8, other 0.9 + 0.8, plus the pair's drift.
    assert m.disagreement == pytest.approx(0.9 + 0.8 + 0.9 + 0.8 + 0.02, abs=1e-6)


def test_greedy_prefers_highest_iou_partner() -> None:
    base = _dets([[0, 0, 10, 10, 0.9, 0]])
    other = _dets([[2, 0, 12, 10, 0.8, 0], [1, 0, 11, 10, 0.5, 0]])
    m = match_detections(base, other)
    assert m.pairs == [(0, 1)]


def test_accumulator_totals_and_heatmap_error() -> None:
    acc = AgreementAccumulator(min_score=0.3)
    same = _dets([[0, 0, 10, 10, 0.9, 0]])
    heat = np.zeros((1, 2, 4, 4), np.float32)
    shifted = heat.copy()
    shifted[0, 1, 2, 2] = 0.5
    acc.add(1, same, same, heat, heat)
    acc.add(2, same, _dets([]), heat, shifted)
    stats = acc.result()
    assert (stats.images, stats.base_detections, stats.base_matched, stats.other_detections) == (2, 2, 1, 1)
    assert stats.recall == 0.5 and stats.precision == 1.0
    assert stats.heatmap_mae == pytest.approx(0.5 / (2 * heat.size)) and stats.heatmap_max_error == 0.5
    assert acc.most_disagreeing(5) == [2]


def test_heatmap_probabilities_follow_layout_and_activation() -> None:
    def spec(layout: str, activation: str) -> ModelSpec:
        dec = source_decode("official")
        dec.heatmap_activation = activation
        outputs = {"detections": TensorInfo("d", "float32", [1, 100, 6]),
                   "heatmap": TensorInfo("h", "float32", [1, 4, 4, 3], layout)}
        return ModelSpec("m", "foreign", "x", 3, ["a", "b", "c"], Preprocess(), dec, GraphIO(outputs=outputs))

    nhwc = np.zeros((1, 4, 4, 3), np.float32)
    nhwc[0, 1, 2, 0] = 0.7
    probs = heatmap_probabilities(nhwc, spec("NHWC", "sigmoid"))
    assert probs.shape == (1, 3, 4, 4) and probs[0, 0, 1, 2] == pytest.approx(0.7)
    logits = heatmap_probabilities(np.zeros((1, 3, 4, 4), np.float32), spec("NCHW", "logits"))
    assert np.all(logits == 0.5)


def test_cache_round_trip_and_key_sensitivity(tmp_path) -> None:
    cache = ResultCache(tmp_path / "c")
    key = cache_key("sha", "data", {"resize": "affine"}, None)
    assert key != cache_key("sha", "data", {"resize": "keep_res"}, None)
    assert key != cache_key("sha", "data", {"resize": "affine"}, 10)
    assert key != cache_key("sha2", "data", {"resize": "affine"}, None)
    assert cache.load(key) is None
    dets = {3: _dets([[0, 0, 1, 2, 0.5, 7], [1, 1, 3, 3, 0.25, 0]]), 9: Detections.empty()}
    cache.store(key, CachedRun(dets, {"runner": {"backend": "ort"}}))
    back = cache.load(key)
    assert back is not None and sorted(back.detections) == [3, 9]
    np.testing.assert_array_equal(back.detections[3].boxes, dets[3].boxes)
    np.testing.assert_array_equal(back.detections[3].scores, dets[3].scores)
    assert back.detections[3].labels.tolist() == [7, 0] and len(back.detections[9]) == 0
    assert back.meta["runner"]["backend"] == "ort"
    with np.load(tmp_path / "c" / f"{key}.npz") as stored:  # accuracy only: no latency is ever cached
        assert "timings" not in stored.files
    (tmp_path / "c" / f"{key}.npz").write_bytes(b"damaged")
    assert cache.load(key) is None  # a damaged entry is a miss
