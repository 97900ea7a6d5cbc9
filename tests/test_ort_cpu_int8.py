"""The ONNX Runtime CPU int8 model: concat inputs share the output's quantization, float layers stay float."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from quant_synthetic import tensor_values

from centernet_edge.quantize.float_layers import shield_float_layers
from centernet_edge.quantize.ort_cpu_int8 import CpuInt8Config, build_ort_cpu_int8, shared_concat_ranges
from centernet_edge.quantize.placement import GraphRegions

RNG = np.random.default_rng(3)


def _concat_model(activation: bool = True) -> onnx.ModelProto:
    """x -> conv_a (also read by conv_side) and conv_b -> Concat -> [Relu] -> conv_out."""
    def weights(*shape: int) -> np.ndarray:
        return RNG.normal(0, 0.4, shape).astype(np.float32)

    inits = [numpy_helper.from_array(v, n) for n, v in (
        ("w_a", weights(8, 4, 3, 3)), ("w_b", weights(8, 4, 3, 3)), ("w_side", weights(4, 8, 1, 1)),
        ("w_out", weights(6, 16, 1, 1)))]
    concat_out = "cat" if not activation else "cat_pre"
    nodes = [
        helper.make_node("Conv", ["x", "w_a"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w_b"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "w_side"], ["side"], name="conv_side"),
        helper.make_node("Concat", ["a", "b"], [concat_out], name="concat", axis=1),
    ]
    if activation:
        nodes.append(helper.make_node("Relu", ["cat_pre"], ["cat"], name="relu"))
    nodes.append(helper.make_node("Conv", ["cat", "w_out"], ["y"], name="conv_out"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16, 16])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "side")],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _observed_ranges(model: onnx.ModelProto, x: np.ndarray) -> dict[str, tuple[float, float]]:
    tensors = [o for n in model.graph.node for o in n.output]
    values = tensor_values(model, tensors, [{"x": x}])[0]
    return {t: (min(float(v.min()), 0.0), max(float(v.max()), 0.0)) for t, v in values.items()}


def test_concat_inputs_take_the_folded_activation_range():
    model = _concat_model(activation=True)
    ranges = {"a": (-3.0, 2.0), "b": (-1.0, 5.0), "cat_pre": (-3.0, 5.0), "cat": (0.0, 5.0),
              "side": (-1.0, 1.0), "y": (-2.0, 2.0)}
    shared = shared_concat_ranges(model, ranges)
    assert shared["b"] == shared["cat_pre"] == (0.0, 5.0)  # clamped exactly as the Relu would
    assert shared["a"] == (-3.0, 2.0)  # conv_side reads a's negatives too: left alone
    assert {k: v for k, v in shared.items() if k not in ("b", "cat_pre")} == {
        k: v for k, v in ranges.items() if k not in ("b", "cat_pre")}
    assert shared_concat_ranges(model, ranges, exclude=["concat"]) == ranges


def test_concat_without_activation_shares_the_union():
    model = _concat_model(activation=False)
    ranges = {"a": (-3.0, 2.0), "b": (-1.0, 5.0), "cat": (-2.5, 4.5), "side": (-1.0, 1.0), "y": (-2.0, 2.0)}
    shared = shared_concat_ranges(model, ranges)
    assert shared["a"] == shared["b"] == shared["cat"] == (-3.0, 5.0)
    assert shared["side"] == ranges["side"]


def test_qlinear_concat_reads_its_inputs_at_the_output_scale():
    model = _concat_model(activation=True)
    x = RNG.normal(0, 1, (1, 4, 16, 16)).astype(np.float32)
    ranges = _observed_ranges(model, x)
    regions = GraphRegions(preprocess=set(), network={n.name for n in model.graph.node}, decode=set(),
                           constant=set())
    outputs = {}
    for shared in (False, True):
        config = CpuInt8Config(shared_concat_ranges=shared, kernel_rewrites=False)
        cpu = build_ort_cpu_int8(model, ranges, config=config, regions=regions)
        inits = {i.name: numpy_helper.to_array(i) for i in cpu.graph.initializer}
        concat = next(n for n in cpu.graph.node if n.op_type == "QLinearConcat")
        out_scale, b_scale = inits[concat.input[0]], inits[concat.input[6]]  # Y_scale; (b, b_scale, b_zp)
        assert (out_scale == b_scale) == shared
        outputs[shared] = ort.InferenceSession(cpu.SerializeToString(),
                                               providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    reference = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["y"], {"x": x})[0]
    errors = {shared: float(np.abs(out - reference).mean()) for shared, out in outputs.items()}
    assert 0 < errors[True] < 0.05 * float(np.abs(reference).mean())
    assert errors[True] <= errors[False] * 1.5  # one rounding instead of two: no worse than requantizing


def _float_conv_after_dequantize(gemm: bool = False) -> onnx.ModelProto:
    """x -> Q -> DQ -> float Conv (or Gemm) -> Q -> DQ, the weights spanning 1e-3..1 across output channels
    (a float layer between quantized ones)."""
    magnitudes = np.logspace(-3, 0, 8).astype(np.float32)
    if gemm:
        weight = RNG.normal(0, 1, (16, 8)).astype(np.float32) * magnitudes[None, :]
        layer = helper.make_node("Gemm", ["x_dq", "w", "b"], ["y_float"], name="layer")
        shape, out_shape = [4, 16], [4, 8]
    else:
        weight = RNG.normal(0, 1, (8, 4, 3, 3)).astype(np.float32) * magnitudes[:, None, None, None]
        layer = helper.make_node("Conv", ["x_dq", "w", "b"], ["y_float"], name="layer", pads=[1, 1, 1, 1])
        shape, out_shape = [1, 4, 8, 8], [1, 8, 8, 8]
    bias = RNG.normal(0, 0.1, 8).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b"),
             numpy_helper.from_array(np.array(0.02, np.float32), "s"),
             numpy_helper.from_array(np.array(0.01, np.float32), "s_out"),
             numpy_helper.from_array(np.array(128, np.uint8), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x_dq"]), layer,
             helper.make_node("QuantizeLinear", ["y_float", "s_out", "z"], ["y_q"]),
             helper.make_node("DequantizeLinear", ["y_q", "s_out", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("gemm", [False, True])
def test_float_layers_stay_float_in_onnx_runtime(gemm):
    model = _float_conv_after_dequantize(gemm)
    x = RNG.normal(0, 1, [4, 16] if gemm else [1, 4, 8, 8]).astype(np.float32)

    def run(m: onnx.ModelProto, **kwargs) -> np.ndarray:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                    **kwargs).run(["y"], {"x": x})[0]

    float_weights = run(model, disabled_optimizers=["WeightBiasQuantization"])
    assert shield_float_layers(model) == ["layer"]
    onnx.checker.check_model(model)
    shielded = run(model)  # every default optimization on
    np.testing.assert_allclose(shielded, float_weights, rtol=1e-5, atol=1e-6)
    dq = next(n for n in model.graph.node if n.output[0] == "layer_input_dequantized")
    assert numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == dq.input[1])).shape == (
        16 if gemm else 4,)
    assert shield_float_layers(model) == []  # already per-channel: nothing left to do


def test_cpu_model_float_layers_are_shielded():
    model = _concat_model(activation=True)
    x = RNG.normal(0, 1, (1, 4, 16, 16)).astype(np.float32)
    regions = GraphRegions(preprocess=set(), network={n.name for n in model.graph.node}, decode=set(),
                           constant=set())
    cpu = build_ort_cpu_int8(model, _observed_ranges(model, x), keep_float=["conv_out"], regions=regions)
    producer = {o: n for n in cpu.graph.node for o in n.output}
    conv_out = next(n for n in cpu.graph.node if n.name == "conv_out")
    dq = producer[conv_out.input[0]]
    assert dq.op_type == "DequantizeLinear" and next(a.i for a in dq.attribute if a.name == "axis") == 1


def test_decode_inputs_keep_their_maximum_and_the_heatmap_logits_drop_scores_no_top_k_needs():
    """Head outputs read by the decode tail: the clipped top is restored (strong peaks, large boxes),
    the heatmap logits (read by the tail's Sigmoid) start at logit(score floor); others are untouched."""
    from centernet_edge.quantize.ort_cpu_int8 import decode_input_ranges

    nodes = [helper.make_node("Conv", ["x", "w"], ["feat"], name="body"),
             helper.make_node("Conv", ["feat", "w_hm"], ["logits"], name="hm_head"),
             helper.make_node("Conv", ["feat", "w_wh"], ["wh"], name="wh_head"),
             helper.make_node("Sigmoid", ["logits"], ["heat"], name="sigmoid"),
             helper.make_node("Mul", ["wh", "heat"], ["out"], name="decode_mul")]
    model = helper.make_model(helper.make_graph(nodes, "g", [], []))
    regions = GraphRegions(preprocess=frozenset(), network=frozenset({"body", "hm_head", "wh_head"}),
                           decode=frozenset({"sigmoid", "decode_mul"}), constant=frozenset())
    clipped = {"feat": (0.0, 4.0), "logits": (-14.8, 2.0), "wh": (-0.5, 20.0)}
    observed = {"feat": (0.0, 9.0), "logits": (-28.0, 2.7), "wh": (-0.5, 21.8)}
    out = decode_input_ranges(model, regions, clipped, observed, score_floor=0.01)
    assert out["feat"] == clipped["feat"]  # not a head output: its calibrated clip stays
    assert out["wh"] == (-0.5, 21.8)
    lo, hi = out["logits"]
    assert hi == 2.7 and lo == pytest.approx(np.log(0.01 / 0.99))
    assert decode_input_ranges(model, regions, clipped, observed)["logits"] == (-28.0, 2.7)  # no floor
