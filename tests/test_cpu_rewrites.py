"""Kernel-friendly rewrites of the CPU int8 model change speed, not results."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from centernet_edge.quantize.cpu_rewrites import (
    affine_as_depthwise_convs,
    fold_constant_scaling,
    image_blocks,
    image_convolutions,
    pad_depthwise_channels,
)

RNG = np.random.default_rng(0)


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _weights(*shape: int) -> np.ndarray:
    return RNG.normal(0, 0.5, shape).astype(np.float32)


def _inverted_residual(channels: int = 18, dw_output: bool = False) -> onnx.ModelProto:
    """expand 1x1 -> ReLU -> depthwise 3x3 (bias computed by a Reshape) -> hard-swish -> squeeze-excite ->
    project 1x1, the MobileNetV3 block layout as TensorFlow exports it."""
    c = channels
    inits = [
        _init("w_expand", _weights(c, 8, 1, 1)), _init("b_expand", _weights(c)),
        _init("w_dw", _weights(c, 1, 3, 3)), _init("b_dw_flat", _weights(1, c)),
        _init("bias_shape", np.array([c], np.int64)),
        _init("sixth", np.array(1 / 6, np.float32)), _init("three", np.array(3, np.float32)),
        _init("zero", np.array(0, np.float32)), _init("six", np.array(6, np.float32)),
        _init("se_shape", np.array([1, c, 1, 1], np.int64)),
        _init("w_se_a", _weights(4, c, 1, 1)), _init("w_se_b", _weights(c, 4, 1, 1)),
        _init("w_project", _weights(8, c, 1, 1)), _init("b_project", _weights(8)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w_expand", "b_expand"], ["expanded"], name="expand"),
        helper.make_node("Relu", ["expanded"], ["expanded_relu"], name="expand_relu"),
        helper.make_node("Reshape", ["b_dw_flat", "bias_shape"], ["b_dw"], name="dw_bias"),
        helper.make_node("Conv", ["expanded_relu", "w_dw", "b_dw"], ["dw"], name="depthwise", group=c,
                         pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["dw", "sixth"], ["hs_scaled"], name="hs_mul"),
        helper.make_node("Add", ["dw", "three"], ["hs_shift"], name="hs_add"),
        helper.make_node("Clip", ["hs_shift", "zero", "six"], ["hs_relu6"], name="hs_clip"),
        helper.make_node("Mul", ["hs_scaled", "hs_relu6"], ["hs"], name="hs_mul_1"),
        helper.make_node("GlobalAveragePool", ["hs"], ["se_mean"], name="se_mean"),
        helper.make_node("Reshape", ["se_mean", "se_shape"], ["se_flat"], name="se_reshape"),
        helper.make_node("Conv", ["se_flat", "w_se_a"], ["se_a"], name="se_a"),
        helper.make_node("Relu", ["se_a"], ["se_a_relu"], name="se_relu"),
        helper.make_node("Conv", ["se_a_relu", "w_se_b"], ["se_b"], name="se_b"),
        helper.make_node("Sigmoid", ["se_b"], ["se_gate"], name="se_gate"),
        helper.make_node("Mul", ["hs", "se_gate"], ["excited"], name="se_mul"),
        helper.make_node("Conv", ["excited", "w_project", "b_project"], ["y"], name="project"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 40, 40])]
    if dw_output:
        outputs.append(helper.make_tensor_value_info("dw", TensorProto.FLOAT, [1, c, 40, 40]))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 40, 40])], outputs,
                  inits)


def test_depthwise_padding_is_exact_and_widens_the_whole_group():
    model = _inverted_residual(18)
    x = RNG.normal(0, 1, (1, 8, 40, 40)).astype(np.float32)
    before = _run(model, {"x": x})[0]
    assert pad_depthwise_channels(model) == ["depthwise"]
    onnx.checker.check_model(model)
    after = _run(model, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    shape = {name: inits[nodes[name].input[1]].shape for name in ("expand", "depthwise", "se_a", "se_b", "project")}
    assert shape == {"expand": (32, 8, 1, 1), "depthwise": (32, 1, 3, 3), "se_a": (4, 32, 1, 1),
                     "se_b": (32, 4, 1, 1), "project": (8, 32, 1, 1)}
    assert next(a.i for a in nodes["depthwise"].attribute if a.name == "group") == 32
    assert inits[nodes["se_reshape"].input[1]].tolist() == [1, 32, 1, 1]
    assert inits[nodes["depthwise"].input[2]].shape == (32,)  # the computed bias became a constant
    added = inits[nodes["project"].input[1]][:, 18:]
    assert not added.any()  # zero columns: the padded channels never reach the output


def test_depthwise_padding_leaves_groups_it_cannot_widen():
    aligned = _inverted_residual(32)
    assert pad_depthwise_channels(aligned) == []
    exposed = _inverted_residual(18, dw_output=True)  # a graph output must keep its channel count
    before = exposed.SerializeToString()
    assert pad_depthwise_channels(exposed) == []
    assert exposed.SerializeToString() == before
    small = _inverted_residual(18)
    assert pad_depthwise_channels(small, min_pixels=41 * 41) == []  # 40x40 output: not worth it


def _scaled_product(factor: float, product_is_output: bool = False) -> onnx.ModelProto:
    """x -> Q -> QLinearMul(x, factor) -> QLinearConv 1x1 -> DQ, as ONNX Runtime's QOperator writes it."""
    q_factor = np.array(255 if factor > 0 else 0, np.uint8)
    inits = [
        _init("x_scale", np.array(0.05, np.float32)), _init("x_zp", np.array(128, np.uint8)),
        _init("c_q", q_factor), _init("c_scale", np.array(abs(factor) / 255, np.float32)),
        _init("c_zp", np.array(0 if factor > 0 else 255, np.uint8)),
        _init("p_scale", np.array(0.05 * abs(factor), np.float32)), _init("p_zp", np.array(128, np.uint8)),
        _init("w", RNG.integers(-127, 128, (4, 4, 1, 1)).astype(np.int8)),
        _init("w_scale", np.array(0.01, np.float32)), _init("w_zp", np.array(0, np.int8)),
        _init("y_scale", np.array(0.02, np.float32)), _init("y_zp", np.array(128, np.uint8)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="quantize"),
        helper.make_node("QLinearMul", ["x_q", "x_scale", "x_zp", "c_q", "c_scale", "c_zp", "p_scale", "p_zp"],
                         ["p_q"], name="scale_mul", domain="com.microsoft"),
        helper.make_node("QLinearConv", ["p_q", "p_scale", "p_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp"],
                         ["y_q"], name="conv"),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["y"], name="dequantize"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if product_is_output:
        outputs.append(helper.make_tensor_value_info("p_q", TensorProto.UINT8, None))
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])], outputs, inits)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def test_constant_scaling_folds_into_the_readers_scale():
    model = _scaled_product(1 / 6)
    x = RNG.normal(0, 2, (1, 4, 6, 6)).astype(np.float32)
    before = _run(model, {"x": x})[0]
    assert fold_constant_scaling(model) == 1
    assert not [n for n in model.graph.node if n.op_type == "QLinearMul"]
    conv = next(n for n in model.graph.node if n.op_type == "QLinearConv")
    assert conv.input[0] == "x_q"
    scale = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == conv.input[1])
    assert float(scale) == pytest.approx(0.05 / 6, rel=1e-6)
    after = _run(model, {"x": x})[0]
    # one requantization fewer: at most one output step apart, and mostly identical
    assert np.abs(after - before).max() <= 0.02 + 1e-6
    assert (after == before).mean() > 0.5


def test_constant_scaling_keeps_negative_factors_and_graph_outputs():
    assert fold_constant_scaling(_scaled_product(-0.5)) == 0
    assert fold_constant_scaling(_scaled_product(0.5, product_is_output=True)) == 0


def test_image_convolutions_are_the_layers_reading_few_channels():
    inits = [_init("w_stem", _weights(8, 3, 3, 3)), _init("w_next", _weights(8, 8, 3, 3))]
    nodes = [helper.make_node("Conv", ["x", "w_stem"], ["a"], name="stem"),
             helper.make_node("Conv", ["a", "w_next"], ["y"], name="next")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    assert image_convolutions(model, {"stem", "next"}) == ["stem"]
    assert image_convolutions(model, {"next"}) == []
    assert image_convolutions(model, {"stem", "next"}, max_outputs=4) == []  # 8 outputs: integer GEMM wins


def _stem_then(reader: str) -> onnx.ModelProto:
    """image conv -> hard-swish -> ``reader`` ("depthwise" or "dense") -> a residual Add with the stem."""
    scalar = lambda name, v: _init(name, np.array(v, np.float32))  # noqa: E731
    inits = [_init("w_stem", _weights(8, 3, 3, 3)), scalar("k", 1 / 6), scalar("three", 3.0),
             scalar("lo", 0.0), scalar("hi", 6.0),
             _init("w_dw", _weights(8, 1, 3, 3)) if reader == "depthwise" else _init("w_dw", _weights(8, 8, 3, 3))]
    group = 8 if reader == "depthwise" else 1
    nodes = [helper.make_node("Conv", ["x", "w_stem"], ["y"], name="stem", pads=[1] * 4),
             helper.make_node("Mul", ["y", "k"], ["lin"], name="hs_mul"),
             helper.make_node("Add", ["y", "three"], ["sh"], name="hs_add"),
             helper.make_node("Clip", ["sh", "lo", "hi"], ["gate"], name="hs_clip"),
             helper.make_node("Mul", ["lin", "gate"], ["a"], name="hs_out"),
             helper.make_node("Conv", ["a", "w_dw"], ["b"], name="reader", group=group, pads=[1] * 4),
             helper.make_node("Add", ["a", "b"], ["out"], name="residual")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)


def test_image_blocks_extend_the_float_stem_to_the_depthwise_conv_reading_its_activation():
    model = _stem_then("depthwise")
    network = {n.name for n in model.graph.node}
    assert image_blocks(model, network, ["stem"]) == ["hs_mul", "hs_add", "hs_clip", "hs_out", "reader"]
    assert image_blocks(model, network, []) == []  # no float image conv: nothing to extend
    # a dense conv averages the stem's channels: no block, the activation stays int8
    assert image_blocks(_stem_then("dense"), network, ["stem"]) == []


def test_padding_the_real_mb3_model_changes_no_output(mb3_onnx):
    model = onnx.load(str(mb3_onnx))
    x = RNG.integers(0, 256, (1, 512, 512, 3)).astype(np.float32)
    name = model.graph.input[0].name
    before = _run(model, {name: x})
    widened = pad_depthwise_channels(model)
    assert len(widened) == 5
    after = _run(model, {name: x})
    np.testing.assert_allclose(after[1], before[1], atol=1e-5)  # heatmap
    np.testing.assert_allclose(after[0], before[0], atol=1e-3)  # box sizes (pixels)
    assert np.array_equal(after[2][..., 5], before[2][..., 5])  # same classes in the same order


def test_per_channel_affine_becomes_one_depthwise_conv_with_the_same_values():
    scale = np.array([0.02, 1.0, 0.5, 0.125], np.float32).reshape(1, 4, 1, 1)
    inits = [_init("s", scale), _init("three", np.array(3.0, np.float32))]
    nodes = [helper.make_node("Mul", ["x", "s"], ["scaled"], name="gate_scale"),
             helper.make_node("Add", ["scaled", "three"], ["shifted"], name="gate_add"),
             helper.make_node("Relu", ["shifted"], ["y"], name="relu")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    x = RNG.normal(0, 50, (1, 4, 5, 5)).astype(np.float32)
    before = _run(model, {"x": x})[0]
    skipped = onnx.ModelProto()
    skipped.CopyFrom(model)
    assert affine_as_depthwise_convs(skipped, skip={"gate_add"}) == 0
    assert affine_as_depthwise_convs(model) == 1
    conv = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(conv) == 1 and conv[0].output[0] == "shifted"  # the Add's output name (and range) is kept
    assert not [n for n in model.graph.node if n.op_type in ("Mul", "Add")]
    np.testing.assert_allclose(_run(model, {"x": x})[0], before, rtol=1e-6, atol=1e-5)


def test_depthwise_convs_are_recognised_once_for_every_caller():
    from centernet_edge.runtime.onnx_graph import is_depthwise_conv

    dims = {"dw": [8, 1, 3, 3], "mult": [16, 1, 3, 3], "grouped": [8, 2, 3, 3], "dense": [8, 8, 1, 1]}
    conv = lambda w, g: helper.make_node("Conv", ["x", w], ["y"], group=g)  # noqa: E731
    assert is_depthwise_conv(conv("dw", 8), dims)
    assert not is_depthwise_conv(conv("mult", 8), dims) and is_depthwise_conv(conv("mult", 8), dims, multiplier=True)
    assert not is_depthwise_conv(conv("grouped", 4), dims, multiplier=True)
    assert not is_depthwise_conv(conv("dense", 1), dims, multiplier=True)
    assert not is_depthwise_conv(conv("missing", 8), dims)
    assert not is_depthwise_conv(helper.make_node("Relu", ["x"], ["y"]), dims)
