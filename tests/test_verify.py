"""Export verification decides on detections against a float64 reference and a measured noise floor.

Near-ties that float32 noise can flip are explained, not failed; a graph that really computes something
else fails however its heads happen to compare with a fixed threshold.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from test_export_models import condition_heads

from centernet_edge.export.models import build_model
from centernet_edge.export.onnx_export import ExportOptions, build_spec, export_onnx
from centernet_edge.export.verify import (
    Tolerances,
    compare_detections,
    synthetic_images,
    tied_peaks,
    verify_export,
)
from centernet_edge.runtime.detections import Detections
from centernet_edge.runtime.geometry import compute_geometry

BAND = 1e-6


def _dets(rows: list[tuple[float, float, float, int]]) -> Detections:
    """Rows (x, y, score, label) as 10x10 boxes centred at (x, y)."""
    arr = np.array(rows, dtype=np.float64)
    boxes = np.stack([arr[:, 0] - 5, arr[:, 1] - 5, arr[:, 0] + 5, arr[:, 1] + 5], axis=1).astype(np.float32)
    return Detections(boxes, arr[:, 2].astype(np.float32), arr[:, 3].astype(np.int64))


REF = [(10, 10, 0.9, 0), (50, 10, 0.8, 1), (90, 10, 0.7, 0), (10, 50, 0.6, 2), (50, 50, 0.5, 1)]


def test_identical_detections_match_fully() -> None:
    a = compare_detections(_dets(REF), _dets(REF), BAND)
    assert (a.matched, a.tied, a.unexplained_got, a.score_err, a.box_err) == (1.0, 0.0, 0, 0.0, 0.0)


def test_a_peak_moved_to_a_tied_neighbour_is_explained() -> None:
    got = list(REF)
    got[1] = (54, 10, 0.8, 1)  # the neighbouring cell won: both cells are near-ties in the reference
    tied = _dets([(50, 10, 0.8, 1), (54, 10, 0.8 - BAND / 2, 1)])
    a = compare_detections(_dets(REF), _dets(got), BAND, tied)
    assert a.matched == pytest.approx(0.8) and a.tied == pytest.approx(0.2) and a.unexplained_got == 0


def test_a_moved_peak_that_is_no_tie_is_not_explained() -> None:
    got = list(REF)
    got[1] = (54, 10, 0.8, 1)
    for tied in (None, _dets([(50, 10, 0.8, 1)]), _dets([(50, 10, 0.8, 2), (54, 10, 0.8, 2)])):
        a = compare_detections(_dets(REF), _dets(got), BAND, tied)  # no tie, one side only, other class
        assert a.matched + a.tied < 1.0 or a.unexplained_got == 1


def test_only_the_top_k_boundary_may_swap_classes() -> None:
    at_boundary = REF[:-1] + [(70, 70, 0.5 - BAND / 2, 3)]  # the K-th row replaced by a tied candidate
    a = compare_detections(_dets(REF), _dets(at_boundary), BAND)
    assert a.matched + a.tied == 1.0 and a.unexplained_got == 0
    mid = list(REF)
    mid[2] = (70, 70, 0.7, 3)  # a row well above the boundary replaced by another class
    a = compare_detections(_dets(REF), _dets(mid), BAND)
    assert a.matched + a.tied == pytest.approx(0.8) and a.unexplained_got == 1


def test_tied_peaks_finds_plateau_cells_only() -> None:
    spec = build_spec(arch="res_18", source="official", num_classes=2, options=ExportOptions(input_size=(32, 32)))
    heat = np.full((1, 2, 8, 8), 0.1)
    heat[0, 0, 2, 2], heat[0, 0, 2, 3] = 0.6, 0.6 - BAND / 2  # a near-tie of two neighbours
    heat[0, 1, 5, 5] = 0.7  # a clear peak
    heads = {"heatmap": heat, "wh": np.full((1, 2, 8, 8), 2.0), "reg": np.zeros((1, 2, 8, 8))}
    geom = compute_geometry(32, 32, spec.preprocess)
    tied = tied_peaks(heads, spec, geom, BAND)
    cells = {(int(c), float(s)) for c, s in zip(tied.labels, tied.scores, strict=True)}
    # Both cells of the near-tie; the clear peak is not a tie (the flat background is, and cannot win).
    assert (0, float(np.float32(0.6))) in cells and (0, float(np.float32(0.6 - BAND / 2))) in cells
    assert not any(c == 1 and s > 0.5 for c, s in cells), cells
    centre = (tied.boxes[:, :2] + tied.boxes[:, 2:]) / 2
    i = int(np.flatnonzero(tied.scores == np.float32(0.6))[0])
    assert np.allclose(centre[i], [2 * 4 + 0, 2 * 4 + 0], atol=1e-4)  # cell (2, 2) at stride 4, no reg


@pytest.fixture(scope="module")
def small_export():
    torch.manual_seed(0)
    model = build_model("res_18").eval()
    images = synthetic_images(2, sizes=((96, 128), (120, 90)))
    condition_heads(model, "official", [img for _, img in images], size=64)
    options = ExportOptions(input_size=(64, 64))
    spec = build_spec(arch="res_18", source="official", num_classes=80, options=options)
    return export_onnx(model, spec, options), model, spec, images


def _last_conv_before(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    producers = {out: node for node in model.graph.node for out in node.output}
    frontier = [tensor]
    while frontier:
        node = producers.get(frontier.pop())
        if node is None:
            continue
        if node.op_type == "Conv" and len(node.input) == 3:
            return node
        frontier.extend(node.input)
    raise AssertionError(f"no biased Conv feeds {tensor}")


def _scaled(model: onnx.ModelProto, name: str, factor: float, offset: float = 0.0) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, init in enumerate(out.graph.initializer):
        if init.name == name:
            value = numpy_helper.to_array(init).astype(np.float64) * factor + offset
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
            return out
    raise AssertionError(f"initializer {name} not found")


def test_the_float64_reference_and_noise_floor_are_reported(small_export) -> None:
    onnx_model, model, spec, images = small_export
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = verify_export(onnx_model, model, spec, images, threads=1)
    assert report.passed, report.table()
    for check in report.checks:
        assert set(check.head_err) == set(check.noise_floor) == {"heatmap", "wh", "reg"}
        assert 0 < max(check.noise_floor.values()) < 1e-5 and max(check.head_err.values()) < 1e-5
        assert check.tie_band >= 2 * check.noise_floor["heatmap"]
    summary = report.summary()
    assert summary["passed"] and summary["images"] == 2
    assert summary["head_error_vs_float64"]["heatmap"] == max(c.head_err["heatmap"] for c in report.checks)
    # The float64 pass converts the model in place and back: the caller's weights are bit-identical.
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert "err/floor" in report.table() and "verification PASSED" in report.table()


def test_noise_level_weight_change_passes(small_export) -> None:
    onnx_model, model, spec, images = small_export
    conv = _last_conv_before(onnx_model, "heatmap")
    # One float32 ulp-scale change of a head's weights: what a different summation order does.
    nudged = _scaled(onnx_model, conv.input[1], 1.0 + 2.0 ** -22)
    assert verify_export(nudged, model, spec, images, threads=1).passed


@pytest.mark.parametrize("factor, offset", [(1.0, 0.05), (1.02, 0.0)], ids=["bias+0.05", "weights*1.02"])
def test_a_graph_that_computes_something_else_fails(small_export, factor: float, offset: float) -> None:
    onnx_model, model, spec, images = small_export
    conv = _last_conv_before(onnx_model, "heatmap")
    broken = _scaled(onnx_model, conv.input[2] if offset else conv.input[1], factor, offset)
    report = verify_export(broken, model, spec, images, threads=1)
    assert not report.passed, report.table()
    assert any("score error" in f or "matched or tied" in f or "does not have" in f for f in report.failures)


def test_an_explicit_head_tolerance_still_applies(small_export) -> None:
    onnx_model, model, spec, images = small_export
    report = verify_export(onnx_model, model, spec, images, Tolerances(head=1e-12), threads=1)
    assert not report.passed and "head error" in report.failures[0]
