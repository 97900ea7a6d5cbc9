"""Per-layer int8-vs-fp32 comparison: exact zero against itself, the fragile conv found, kinds by structure."""

from __future__ import annotations

import json

import numpy as np
import pytest
from quant_synthetic import FRAGILE, build_synthetic_model, quant_setup, tensor_values

from centernet_edge.quantize.layer_error import (
    compare_tensors,
    network_tensors,
    tensor_kinds,
    write_layer_errors,
)
from centernet_edge.quantize.qdq import build_qdq_model
from centernet_edge.runtime.onnx_graph import ensure_node_names


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    s = quant_setup(tmp_path_factory.mktemp("lerr"), 3, image_seed=2)
    return s.model, s.placement, s.amax, s.inputs


def test_model_against_itself_has_no_error(setup):
    model, _, _, batches = setup
    rows = compare_tensors(model, model, batches, "image")
    assert rows and all(r.rel_error == 0 and r.max_abs == 0 and r.mean_shift == 0 for r in rows)
    assert all(abs(r.cosine - 1) < 1e-9 for r in rows)


def test_matches_a_numpy_oracle_and_finds_the_fragile_conv(setup, tmp_path):
    model, placement, amax, batches = setup
    quantized = build_qdq_model(model, placement.layers, amax)
    rows = compare_tensors(model, quantized, batches, "image")
    by_producer = {r.producer: r for r in rows}
    tensor = by_producer[FRAGILE].tensor
    names = network_tensors(model)  # the same pruned graphs as the comparison, so the same float order
    ref = tensor_values(model, names, [{"image": x} for x in batches])
    cand = tensor_values(quantized, names, [{"image": x} for x in batches])
    f = np.concatenate([r[tensor].ravel() for r in ref]).astype(np.float64)
    q = np.concatenate([c[tensor].ravel() for c in cand]).astype(np.float64)
    assert by_producer[FRAGILE].rel_error == pytest.approx(((q - f) ** 2).sum() / (f ** 2).sum(), rel=1e-6)
    assert by_producer[FRAGILE].cosine == pytest.approx(f @ q / np.sqrt((f @ f) * (q @ q)), rel=1e-6)
    # The per-tensor scale of the boosted input wipes out the other channels: the largest error growth.
    ranked = sorted((r for r in rows if r.growth is not None), key=lambda r: -r.growth)
    assert ranked[0].producer == FRAGILE and ranked[0].growth > 10
    write_layer_errors(rows, tmp_path / "e.json", tmp_path / "e.md", {"images": 3})
    doc = json.loads((tmp_path / "e.json").read_text())
    assert len(doc["tensors"]) == len(rows) and "conv" in doc["kinds"]
    assert FRAGILE in (tmp_path / "e.md").read_text()


def test_kinds_follow_the_structure(setup):
    model = setup[0]
    kinds = tensor_kinds(model)
    producer = {o: n.name for n in model.graph.node for o in n.output}
    by_node = {producer[t]: k for t, k in kinds.items()}
    assert "depthwise conv" in by_node["depthwise"]
    assert "squeeze-excite scaled" in by_node["se_mul"]
    assert "residual add" in by_node["residual_add"]
    assert "head output" in by_node["hm_head_1"]
    assert set(kinds) == set(network_tensors(model))


def test_renamed_candidate_is_refused(setup):
    model, _, _, batches = setup
    other = ensure_node_names(build_synthetic_model(seed=1, fragile=True, deform=False))
    for node in other.graph.node:
        for i, name in enumerate(node.output):
            node.output[i] = "x_" + name
    with pytest.raises(ValueError, match="renamed every network tensor"):
        compare_tensors(model, other, batches, "image")
