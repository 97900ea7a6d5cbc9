"""The TensorRT Q/DQ graph follows TensorRT's explicit-quantization placement rules, stays close to fp32."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from quant_synthetic import FRAGILE, build_synthetic_model, feeds, synthetic_spec, tensor_values, write_images

from centernet_edge.quantize.placement import graph_regions, plan_placement
from centernet_edge.quantize.qdq import QdqError, build_qdq_model, quantize_weight_per_channel
from centernet_edge.runtime.onnx_graph import ensure_node_names, producers, topological_sort


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return ensure_node_names(build_synthetic_model(seed=0))


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    folder = write_images(tmp_path_factory.mktemp("qdq_images"), 6)
    return feeds(synthetic_spec(), folder, 6)


def _absmax(model: onnx.ModelProto, tensors: list[str], batches) -> dict[str, float]:
    values = tensor_values(model, tensors, [{"image": x} for x, _ in batches])
    return {t: max(float(np.abs(v[t]).max()) for v in values) for t in tensors}


@pytest.fixture(scope="module")
def qdq(model, batches):
    placement = plan_placement(model)
    amax = _absmax(model, placement.activation_tensors(), batches)
    return placement, amax, build_qdq_model(model, placement.layers, amax)


def test_regions_split_preprocess_network_decode(model):
    regions = graph_regions(model)
    assert regions.preprocess == {"pre_cast", "pre_transpose", "pre_sub", "pre_div"}
    for name in ("heatmap", "peak_pool", "peak_equal", "topk", "detections_concat", "x1", "cls_div"):
        assert regions.region_of(name) == "decode", name
    for name in ("stem", "residual_add", "dcn", "se_sigmoid", "upsample", "hm_head_1", "wh_head_1"):
        assert regions.region_of(name) == "network", name


def test_placement_follows_tensorrt_rules(model):
    placement = plan_placement(model)
    by_name = {layer.name: layer for layer in placement.layers}
    assert "dcn" not in by_name and "DeformConv" in placement.excluded["dcn"]
    assert by_name["upsample"].weight_axis == 1 and by_name["stem"].weight_axis == 0
    assert by_name["pool"].op_type == "MaxPool" and by_name["se_pool"].op_type == "GlobalAveragePool"
    # the residual Add quantizes its skip input (the older branch), not the conv it fuses into
    skip = by_name["residual_add"].inputs
    assert len(skip) == 1 and producers(model.graph)[skip[0]].op_type == "Relu"
    assert "heatmap" not in by_name and "peak_pool" not in by_name  # decode tail stays float
    assert placement.excluded["peak_pool"] == "decode tail"


def test_qdq_graph_matches_tensorrt_placement(model, qdq):
    placement, amax, q = qdq
    onnx.checker.check_model(q, full_check=True)
    graph = q.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    prod = producers(graph)
    regions = graph_regions(model)
    nodes = {n.name: n for n in graph.node}

    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scale, zero = inits[node.input[1]], inits[node.input[2]]
            assert zero.dtype == np.int8 and not zero.any(), f"{node.name}: zero point must be int8 0"
            assert (scale > 0).all()
            if node.op_type == "QuantizeLinear":
                assert scale.ndim == 0, "activations are per-tensor"
    # every Conv/ConvTranspose weight: int8 per-channel DQ with symmetric scales, on the output-channel axis
    for layer in placement.layers:
        node = nodes[layer.name]
        if layer.weight is None:
            continue
        dq = prod[node.input[1]]
        assert dq.op_type == "DequantizeLinear"
        w_int8 = inits[dq.input[0]]
        axis = next(a.i for a in dq.attribute if a.name == "axis")
        assert w_int8.dtype == np.int8 and np.abs(w_int8.astype(int)).max() <= 127
        assert axis == (1 if node.op_type == "ConvTranspose" else 0)
        assert inits[dq.input[1]].shape == (w_int8.shape[axis],)
        # activation input comes through Q -> DQ with the calibrated scale
        act_dq = prod[node.input[0]]
        assert act_dq.op_type == "DequantizeLinear" and prod[act_dq.input[0]].op_type == "QuantizeLinear"
        assert inits[act_dq.input[1]] == pytest.approx(amax[layer.inputs[0]] / 127, rel=1e-6)
    # nothing quantized in pre-processing, decode, or on DeformConv inputs
    for node in graph.node:
        if node.name in regions.preprocess or node.name in regions.decode or node.op_type == "DeformConv":
            for name in node.input:
                assert name not in prod or prod[name].op_type != "DequantizeLinear", (node.name, name)
    assert nodes["dcn"].input[0] == "se_mul_out"
    quantized = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert "image" not in quantized and "pre_sub_out" not in quantized and "heatmap" not in quantized
    # the float weights that went int8 are gone (the file is int8-sized)
    assert "stem_w" not in inits and "dcn_w" in inits


def test_qdq_runs_in_ort_close_to_fp32(model, qdq, batches):
    _, _, q = qdq
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    sim = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    for x, _ in batches[:3]:
        h_ref = ref.run(["heatmap"], {"image": x})[0]
        h_q = sim.run(["heatmap"], {"image": x})[0]
        assert np.abs(h_q - h_ref).max() < 0.02
        assert np.abs(h_q - h_ref).max() > 0  # it really is quantized
    names = [o.name for o in q.graph.output]
    assert names == ["detections", "heatmap"]


def test_per_channel_weight_quantization_is_symmetric_and_exact_at_the_max():
    w = np.array([[[[1.0, -0.5]]], [[[0.0, 0.0]]], [[[-2.0, 0.25]]]], np.float32)  # (3, 1, 1, 2)
    q, scales = quantize_weight_per_channel(w, 0)
    assert scales.tolist() == pytest.approx([1 / 127, 1.0, 2 / 127])
    assert q[0, 0, 0].tolist() == [127, -64] and q[2, 0, 0, 0] == -127 and not q[1].any()


def test_missing_range_and_old_opset_are_clear_errors(model):
    placement = plan_placement(model)
    with pytest.raises(QdqError, match="no calibrated range"):
        build_qdq_model(model, placement.layers, {})
    old = onnx.ModelProto()
    old.CopyFrom(model)
    old.opset_import[0].version = 11
    with pytest.raises(QdqError, match="opset >= 13"):
        build_qdq_model(old, placement.layers, {})
    q = build_qdq_model(model, placement.layers[:1], {placement.layers[0].inputs[0]: 1.0})
    with pytest.raises(QdqError, match="already contains"):
        build_qdq_model(q, placement.layers[:1], {placement.layers[0].inputs[0]: 1.0})


def test_float_layers_keep_reading_float_tensors(model, qdq):
    placement, amax, _ = qdq
    keep = [FRAGILE] if FRAGILE in placement.names() else ["block_a"]
    q = build_qdq_model(model, placement.select(keep), amax)
    node = next(n for n in q.graph.node if n.name == keep[0])
    prod = producers(q.graph)
    assert prod[node.input[0]].op_type != "DequantizeLinear"
    assert node.input[1] in {i.name for i in q.graph.initializer}  # float weight kept
    with pytest.raises(KeyError, match="not eligible"):
        placement.select(["peak_pool"])


def test_topological_sort_restores_a_valid_order(model):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    before = [n.name for n in copy.graph.node]
    topological_sort(copy.graph)
    assert [n.name for n in copy.graph.node] == before  # an ordered graph is left as it is
    nodes = list(copy.graph.node)
    del copy.graph.node[:]
    copy.graph.node.extend(reversed(nodes))
    topological_sort(copy.graph)
    seen = {i.name for i in copy.graph.input} | {i.name for i in copy.graph.initializer} | {""}
    for node in copy.graph.node:
        assert all(name in seen for name in node.input), node.name
        seen.update(node.output)


def test_ort_ranges_are_uint8_friendly():
    from centernet_edge.quantize.ort_cpu_int8 import ort_ranges

    ranges = ort_ranges(
        {"relu": 4.0, "signed": 2.0, "unseen": 1.0, "clipped": 1.0},
        {"relu": (0.0, 6.0), "signed": (-0.5, 1.5), "clipped": (0.2, 3.0)},
    )
    assert ranges == {"relu": (0.0, 4.0), "signed": (-0.5, 1.5), "unseen": (-1.0, 1.0), "clipped": (0.0, 1.0)}


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_ort_cpu_int8_model(model, qdq, batches, fmt):
    from centernet_edge.quantize.ort_cpu_int8 import (
        CpuInt8Config,
        build_ort_cpu_int8,
        ort_ranges,
        quantized_node_count,
    )

    placement, _, _ = qdq
    tensors = sorted(
        {
            t
            for n in model.graph.node
            for t in list(n.input) + list(n.output)
            if n.name in placement.regions.network and t and not t.endswith(("_w", "_b"))
        }
    )
    floats = [t for t in tensors if t in _float_tensors(model)]
    values = tensor_values(model, floats, [{"image": x} for x, _ in batches])
    lo = {t: min(0.0, *(float(v[t].min()) for v in values)) for t in floats}
    hi = {t: max(0.0, *(float(v[t].max()) for v in values)) for t in floats}
    amax = {t: max(-lo[t], hi[t]) for t in floats}
    cpu = build_ort_cpu_int8(
        model,
        ort_ranges(amax, {t: (lo[t], hi[t]) for t in floats}),
        keep_float=["block_b"],
        config=CpuInt8Config(fmt=fmt, float_head_outputs=True),
        regions=placement.regions,
    )
    onnx.checker.check_model(cpu)
    counts = quantized_node_count(cpu)
    if fmt == "qdq":
        assert counts.get("QuantizeLinear", 0) > 5 and counts.get("DequantizeLinear", 0) > 5
    else:
        assert counts.get("QLinearConv", 0) > 5 and "QLinearAdd" in counts
    inits = {i.name: numpy_helper.to_array(i) for i in cpu.graph.initializer}
    prod = producers(cpu.graph)
    for node in cpu.graph.node:
        if node.op_type in ("QuantizeLinear", "QLinearConv"):
            zero_point = node.input[2]  # y_zero_point of Q, x_zero_point of QLinearConv
            assert inits[zero_point].dtype == np.uint8  # uint8 activations for ORT's fast kernels
        # decode tail inputs (head logits) and deformable offsets/mask stay float in both formats
        checked = [2, 4] if node.op_type == "DeformConv" else []
        if node.name in placement.regions.decode:
            checked = list(range(len(node.input)))
        for i in checked:
            source = prod.get(node.input[i])
            assert source is None or source.op_type not in ("DequantizeLinear",), (node.name, i)
    # block_b reads relu(block_a); the quantizer folds that Relu into block_a's uint8 output range
    # (it renames block_a's output to the Relu's name): the float block_b must keep the clamped DQ copy
    block_b = next(n for n in cpu.graph.node if n.name == "block_b")
    assert prod[block_b.input[0]].op_type in ("Relu", "DequantizeLinear")
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    run = ort.InferenceSession(cpu.SerializeToString(), providers=["CPUExecutionProvider"])
    for x, _ in batches[:2]:
        h_ref, h_cpu = ref.run(["heatmap"], {"image": x})[0], run.run(["heatmap"], {"image": x})[0]
        diff = np.abs(h_cpu - h_ref)
        assert 0 < diff.max() < 0.1 and diff.mean() < 0.01  # more ops are int8 here than in Q/DQ


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    from centernet_edge.runtime.onnx_graph import tensor_types

    return {name for name, t in tensor_types(model).items() if t == onnx.TensorProto.FLOAT}
