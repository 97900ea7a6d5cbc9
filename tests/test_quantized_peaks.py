"""Peak NMS over quantized heatmap logits: rewritten for uint8 kernels, with the same detections."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from centernet_edge.quantize.quantized_peaks import mask_peaks_on_quantized_logits, pool_quantized_logits

RNG = np.random.default_rng(0)
SHAPE_NCHW = [1, 5, 12, 12]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _peak_model(perms: tuple[tuple[int, ...], ...] = ((0, 3, 1, 2),), mask: str = "equal", scale: float = 0.0625,
                zero_point: int = 200) -> onnx.ModelProto:
    """x -> Q -> DQ -> Sigmoid -> NHWC -> ``perms`` -> MaxPool 3x3 -> NHWC -> peak mask, as a TensorFlow
    export writes it (``mask="equal"``: ``heat * Cast(heat == hmax)``) or ours (``"ceil"``:
    ``heat * (1 - Ceil(hmax - heat))``). With the default perms the transposes around the pool cancel."""
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "scale"),
             numpy_helper.from_array(np.array(zero_point, np.uint8), "zp"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["logits_q"], name="quantize"),
        helper.make_node("DequantizeLinear", ["logits_q", "scale", "zp"], ["logits"], name="dequantize"),
        helper.make_node("Sigmoid", ["logits"], ["heat_nchw"], name="sigmoid"),
        helper.make_node("Transpose", ["heat_nchw"], ["heat"], name="to_nhwc", perm=[0, 2, 3, 1]),
    ]
    current = "heat"
    for i, perm in enumerate(perms):
        nodes.append(helper.make_node("Transpose", [current], [f"t{i}"], name=f"t{i}", perm=list(perm)))
        current = f"t{i}"
    nodes += [
        helper.make_node("MaxPool", [current], ["pooled"], name="peak_pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["pooled"], ["hmax"], name="pooled_nhwc", perm=[0, 2, 3, 1]),
    ]
    if mask == "equal":
        nodes += [helper.make_node("Equal", ["heat", "hmax"], ["is_peak"], name="equal"),
                  helper.make_node("Cast", ["is_peak"], ["peak_mask"], name="cast", to=TensorProto.FLOAT)]
    else:
        nodes += [helper.make_node("Sub", ["hmax", "heat"], ["gap"], name="gap"),
                  helper.make_node("Ceil", ["gap"], ["not_peak"], name="ceil"),
                  helper.make_node("Sub", ["one", "not_peak"], ["peak_mask"], name="peak_mask")]
    nodes.append(helper.make_node("Mul", ["heat", "peak_mask"], ["peaks"], name="mask"))
    nhwc = [SHAPE_NCHW[0], *SHAPE_NCHW[2:], SHAPE_NCHW[1]]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, nhwc) for n in ("heat", "peaks")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE_NCHW)],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _plateaus(scale: float = 0.0625, centre: float = -3.0) -> np.ndarray:
    """Few distinct levels: many plateaus and ties, where a wrong rewrite would show."""
    return RNG.integers(-6, 6, SHAPE_NCHW).astype(np.float32) * scale * 2 + centre


def test_peak_pooling_on_uint8_logits_is_bit_identical():
    model = _peak_model()
    x = _plateaus()
    before = _run(model, {"x": x})
    assert pool_quantized_logits(model) == 1
    onnx.checker.check_model(model)
    after = _run(model, {"x": x})
    for a, b in zip(before, after, strict=True):
        assert np.array_equal(a, b)
    pools = [n for n in model.graph.node if n.op_type == "MaxPool"]
    assert len(pools) == 1 and pools[0].input[0] == "logits_q"
    assert "t0" not in {o for n in model.graph.node for o in n.output}  # the dead transpose went away
    assert before[1].astype(bool).sum() > 0  # there are peaks to compare


def test_peak_pooling_needs_identity_transposes_and_quantized_logits():
    swapped = _peak_model(((0, 3, 2, 1),))  # NHWC -> N C W H: pooling would see a transposed map
    assert pool_quantized_logits(swapped) == 0
    float_logits = _peak_model()
    dq = next(n for n in float_logits.graph.node if n.op_type == "DequantizeLinear")
    float_logits.graph.node.remove(dq)
    sigmoid = next(n for n in float_logits.graph.node if n.op_type == "Sigmoid")
    sigmoid.input[0] = "x"
    assert pool_quantized_logits(float_logits) == 0


@pytest.mark.parametrize("mask", ["equal", "ceil"])
def test_peak_mask_on_uint8_logits_is_bit_identical(mask):
    model = _peak_model(mask=mask)
    x = _plateaus()
    before = _run(model, {"x": x})
    assert pool_quantized_logits(model) == 1
    assert mask_peaks_on_quantized_logits(model) == 1
    onnx.checker.check_model(model)
    after = _run(model, {"x": x})
    for a, b in zip(before, after, strict=True):
        assert np.array_equal(a, b)
    equal = next(n for n in model.graph.node if n.op_type == "Equal")
    producer = {o: n for n in model.graph.node for o in n.output}
    compared = sorted(producer[name].input[0] for name in equal.input)  # each through one NHWC transpose
    assert compared == ["logits_q", "pooled_uint8"]  # the integers are compared, not the floats
    assert [n.op_type for n in model.graph.node].count("Sigmoid") == 1  # the pooled map stays uint8
    assert not {"Ceil", "Sub"} & {n.op_type for n in model.graph.node}
    peaks = before[1] > 0
    assert 0 < peaks.sum() < peaks.size // 2  # plateaus: some cells are peaks, most are not


def test_peak_mask_keeps_transposed_layouts():
    # the NHWC heat compared with a pooled map behind the same (non-identity) transpose
    model = _peak_model()
    x = _plateaus()
    before = _run(model, {"x": x})
    pool_quantized_logits(model)
    assert mask_peaks_on_quantized_logits(model) == 1
    transposes = [n for n in model.graph.node if n.op_type == "Transpose"]
    assert {tuple(helper.get_attribute_value(t.attribute[0])) for t in transposes} == {(0, 2, 3, 1)}
    assert all(np.array_equal(a, b) for a, b in zip(before, _run(model, {"x": x}), strict=True))


def test_rewrites_refuse_levels_a_float_sigmoid_cannot_order():
    # logits up to (255 - 100) * 0.25 = 38.75: the sigmoid is 1.0 for every level above ~17 (float32
    # cannot hold anything between 1 - 2**-24 and 1), so comparing integers would split plateaus the float
    # model merges, and ONNX Runtime's sigmoid is not even monotonic there
    saturating = _peak_model(mask="equal", scale=0.25, zero_point=100)
    before = saturating.SerializeToString()
    assert pool_quantized_logits(saturating) == 0
    assert mask_peaks_on_quantized_logits(saturating) == 0
    assert saturating.SerializeToString() == before
    # the same levels, every one scoring below a floor above 1: nothing above the floor to keep in order
    x = _plateaus(0.25, 20.0)
    reference = _run(saturating, {"x": x})
    assert pool_quantized_logits(saturating, score_floor=1.5) == 1
    assert mask_peaks_on_quantized_logits(saturating, score_floor=1.5) == 1
    assert not np.array_equal(reference[1], _run(saturating, {"x": x})[1])  # why the floor matters


def test_peak_mask_needs_one_scale_and_a_pool_for_the_ceil_form():
    model = _peak_model()
    pool_quantized_logits(model)
    other = numpy_helper.from_array(np.array(0.07, np.float32), "other_scale")
    model.graph.initializer.append(other)
    pooled_dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] != "logits_q")
    pooled_dq.input[1] = "other_scale"
    assert mask_peaks_on_quantized_logits(model) == 0
    unpooled = _peak_model(mask="ceil", scale=0.0625, zero_point=200)  # pool left on the float map
    assert mask_peaks_on_quantized_logits(unpooled) == 0
