"""The fp16 model keeps its IO, runs in ONNX Runtime CPU, and keeps pre-processing/decode/fragile ops fp32."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto
from quant_synthetic import build_synthetic_model, feeds, synthetic_spec, write_images

from centernet_edge.quantize.fp16 import convert_fp16, fp16_nodes
from centernet_edge.quantize.placement import graph_regions
from centernet_edge.runtime.onnx_graph import ensure_node_names, producers, tensor_types


@pytest.fixture(scope="module")
def models():
    model = ensure_node_names(build_synthetic_model(seed=3))
    return model, convert_fp16(model)


def _io(model: onnx.ModelProto) -> list[tuple[str, int]]:
    return [
        (v.name, v.type.tensor_type.elem_type) for v in list(model.graph.input) + list(model.graph.output)
    ]


def test_io_names_and_dtypes_unchanged(models):
    model, half = models
    onnx.checker.check_model(half, full_check=True)
    assert _io(half) == _io(model)
    assert _io(half)[0] == ("image", TensorProto.UINT8)


def test_network_is_fp16_and_the_rest_stays_fp32(models):
    model, half = models
    chosen = fp16_nodes(model)
    regions = graph_regions(model)
    assert {"stem", "block_a", "upsample", "hm_head_1", "residual_add", "se_sigmoid"} <= chosen
    # pre-processing, decode tail, reductions and DeformConv stay fp32
    assert not chosen & (regions.preprocess | regions.decode)
    assert "se_pool" not in chosen and "dcn" not in chosen and "heatmap" not in chosen
    types = tensor_types(half)
    nodes = {n.name: n for n in half.graph.node}
    inits = {i.name: i for i in half.graph.initializer}
    assert inits[nodes["stem"].input[1]].data_type == TensorProto.FLOAT16
    assert types[nodes["heatmap"].input[0]] == TensorProto.FLOAT  # sigmoid reads an fp32 cast
    assert producers(half.graph)[nodes["heatmap"].input[0]].op_type == "Cast"
    assert types[nodes["dcn"].input[1]] == TensorProto.FLOAT
    assert all(types[i] == TensorProto.FLOAT for i in nodes["pre_div"].input)
    # each crossing gets a single Cast
    cast_inputs = [n.input[0] for n in half.graph.node if n.op_type == "Cast" and n.name.endswith("to_fp16")]
    assert len(cast_inputs) == len(set(cast_inputs))


def test_fp16_runs_in_ort_and_matches_fp32(models, tmp_path):
    model, half = models
    folder = write_images(tmp_path / "img", 3, seed=5)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    run = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    for x, _ in feeds(synthetic_spec(), folder, 3):
        h_ref, d_ref = ref.run(["heatmap", "detections"], {"image": x})
        h_half, d_half = run.run(["heatmap", "detections"], {"image": x})
        assert h_half.dtype == np.float32 and d_half.shape == d_ref.shape
        assert np.abs(h_half - h_ref).max() < 2e-3
        # top detection: same class, same place
        assert d_half[0, 0, 5] == d_ref[0, 0, 5]
        assert np.abs(d_half[0, 0, :4] - d_ref[0, 0, :4]).max() < 0.5


def test_keep_fp32_overrides(models):
    model, _ = models
    half = convert_fp16(model, keep_fp32=["stem"])
    nodes = {n.name: n for n in half.graph.node}
    inits = {i.name: i for i in half.graph.initializer}
    assert inits[nodes["stem"].input[1]].data_type == TensorProto.FLOAT
    assert inits[nodes["block_a"].input[1]].data_type == TensorProto.FLOAT16


def test_simulation_rounds_like_fp16_and_stays_close(models, tmp_path):
    from centernet_edge.quantize.fp16 import simulate_fp16

    model, half = models
    sim = simulate_fp16(model)
    onnx.checker.check_model(sim)
    assert _io(sim) == _io(model)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in sim.graph.initializer}
    w = inits["stem_w"]
    assert w.dtype == np.float32 and np.array_equal(w, w.astype(np.float16).astype(np.float32))
    folder = write_images(tmp_path / "img", 2, seed=6)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    run = ort.InferenceSession(sim.SerializeToString(), providers=["CPUExecutionProvider"])
    for x, _ in feeds(synthetic_spec(), folder, 2):
        h_ref = ref.run(["heatmap"], {"image": x})[0]
        h_sim = run.run(["heatmap"], {"image": x})[0]
        assert 0 < np.abs(h_sim - h_ref).max() < 5e-3
