"""Per-channel scaling of depthwise inputs: which sites are found and how, the fp32 function unchanged,
the channels evened out, and the int8 rounding error at the depthwise conv reduced."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from quant_synthetic import _Builder

from centernet_edge.quantize.channel_scaling import (
    MAX_STRETCH,
    apply_channel_scaling,
    channel_ranges,
    depthwise_input_sites,
    site_factors,
)

CH = 8
# Channel gains spanning 200x: the narrow channels are what one per-tensor int8 range rounds away.
GAINS = np.array([20.0, 0.1, 5.0, 0.3, 1.0, 0.05, 8.0, 0.5], np.float32)


def _hardswish(b: _Builder, y: str, name: str) -> str:
    """TensorFlow's hard-swish as mb3 has it: (y * 0.16663) * Clip(y + 3, 0, 6)."""
    linear = b.node("Mul", [y, b.const(f"{name}_k", np.array(0.1666259765625, np.float32))], name=f"{name}_mul")[0]  # noqa: E501
    shifted = b.node("Add", [y, b.const(f"{name}_3", np.array(3.0, np.float32))], name=f"{name}_add")[0]
    gate = b.node("Clip", [shifted, b.const(f"{name}_lo", np.array(0.0, np.float32)),
                           b.const(f"{name}_hi", np.array(6.0, np.float32))], name=f"{name}_relu6")[0]
    return b.node("Mul", [linear, gate], name=f"{name}_out")[0]


def _model(kind: str) -> onnx.ModelProto:
    """stem conv -> [f] -> depthwise -> pointwise, f chosen by ``kind``."""
    b = _Builder(0)
    stem = b.conv("x", 3, CH, name="stem", out_scale=GAINS)
    if kind == "relu":
        act = b.relu(stem)
    elif kind == "hardswish":
        act = _hardswish(b, stem, "hs")
    elif kind == "relu6":
        act = b.node("Clip", [stem, b.const("lo", np.array(0.0, np.float32)),
                              b.const("hi", np.array(6.0, np.float32))], name="relu6")[0]
    elif kind == "residual":  # the stem's hard-swish is also the skip input of a residual Add
        act = _hardswish(b, stem, "hs")
    else:
        raise ValueError(kind)
    dw = b.relu(b.conv(act, CH, CH, group=CH, name="depthwise"))
    out = b.conv(dw, CH, CH, k=1, name="pointwise")
    if kind == "residual":
        out = b.node("Add", [out, act], name="residual_add")[0]
    out = b.conv(out, CH, 4, k=1, name="head")
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _batches(n: int = 4, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32) for _ in range(n)]


def _run(model: onnx.ModelProto, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    from centernet_edge.runtime.onnx_graph import prune_to_outputs

    if outputs:
        model = prune_to_outputs(model, outputs)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, {"x": x})


def _scaled(model: onnx.ModelProto):
    sites = depthwise_input_sites(model)
    ranges = channel_ranges(model, [t for s in sites for t in s.measured], _batches(), "x")
    factors = {s.tensor: site_factors(s, ranges) for s in sites}
    return sites, factors, apply_channel_scaling(model, sites, factors)


@pytest.mark.parametrize("kind, expected", [("relu", "folded"), ("hardswish", "hardswish"),
                                            ("relu6", "split"), ("residual", "split")])
def test_sites_are_found_and_the_fp32_function_is_kept(kind, expected):
    model = _model(kind)
    sites, factors, scaled = _scaled(model)
    assert [(s.depthwise, s.kind) for s in sites] == [("depthwise", expected)]
    assert not np.all(factors[sites[0].tensor] == 1.0)  # the gains above leave room to stretch
    for x in _batches(3, seed=7):
        before, after = _run(model, x)[0], _run(scaled, x)[0]
        assert np.max(np.abs(after - before)) <= 1e-5 * max(1.0, float(np.max(np.abs(before))))
    if expected == "split":
        muls = [n for n in scaled.graph.node if n.op_type == "Mul" and n.output[0].endswith("_scaled_input")]
        assert len(muls) == 1 and muls[0].input[0] == sites[0].tensor
    if expected == "hardswish":  # the gate reads y' * s, the linear branch y'
        gate_inputs = [n for n in scaled.graph.node if n.name.endswith("_gate_input")]
        assert len(gate_inputs) == 1


def _depthwise_input(model: onnx.ModelProto) -> str:
    return next(n.input[0] for n in model.graph.node if n.name == "depthwise")


def _int8_round_trip(x: np.ndarray) -> np.ndarray:
    amax = float(np.max(np.abs(x)))
    step = amax / 127.0
    return np.clip(np.round(x / step), -127, 127) * step


@pytest.mark.parametrize("kind", ["relu", "hardswish", "relu6", "residual"])
def test_channels_are_evened_out_and_the_depthwise_rounding_error_drops(kind):
    """What the step targets: per-tensor int8 rounding of the depthwise input, measured at the depthwise
    output (relative to each channel's own signal) before and after scaling."""
    model = _model(kind)
    _, _, scaled = _scaled(model)

    def spread_and_error(m: onnx.ModelProto) -> tuple[float, float]:
        name = _depthwise_input(m)
        node = next(n for n in m.graph.node if n.name == "depthwise")
        weight = next(onnx.numpy_helper.to_array(i) for i in m.graph.initializer if i.name == node.input[1])
        x = np.concatenate([_run(m, b, [name])[0] for b in _batches()])
        per_channel = np.abs(x).max(axis=(0, 2, 3))
        # depthwise with its own weights, fp32 input vs int8-rounded input (bias cancels out)
        import torch

        def conv(v: np.ndarray) -> np.ndarray:
            return torch.nn.functional.conv2d(torch.from_numpy(v.copy()), torch.from_numpy(weight.copy()),
                                              padding=1, groups=CH).numpy()
        exact, rounded = conv(x), conv(_int8_round_trip(x).astype(np.float32))
        rel = np.sqrt(((rounded - exact) ** 2).mean(axis=(0, 2, 3)) / ((exact ** 2).mean(axis=(0, 2, 3)) + 1e-30))
        return float(per_channel.min() / per_channel.max()), float(rel.mean())

    spread_before, error_before = spread_and_error(model)
    spread_after, error_after = spread_and_error(scaled)
    assert spread_after > 4 * spread_before
    assert error_after < 0.5 * error_before


def test_factors_respect_every_tensor_the_region_divides_and_the_stretch_cap():
    from centernet_edge.quantize.channel_scaling import ScalingSite

    site = ScalingSite("x", "dw", ("x", "sum"), (), ("dw",))
    ranges = {"x": np.array([10.0, 1.0, 0.001, 0.0]), "sum": np.array([10.0, 5.0, 0.001, 0.0])}
    factors = site_factors(site, ranges)
    # channel 1 is pinned by the sum (5 of 10), channel 2 hits the cap, channel 3 is dead (left alone)
    np.testing.assert_allclose(factors, [1.0, 0.5, 1.0 / MAX_STRETCH, 1.0])
    assert np.all(site_factors(site, {"x": np.array([4.0, 3.0]), "sum": np.array([4.0, 2.5])}) == 1.0)


def test_scaling_is_deterministic_and_skips_what_it_cannot_scale():
    model = _model("hardswish")
    first, second = _scaled(model)[2], _scaled(model)[2]
    assert first.SerializeToString() == second.SerializeToString()
    # a depthwise conv reading the graph input has no producer to fold into and nothing to split from
    b = _Builder(0)
    out = b.conv("x", 3, 3, group=3, name="depthwise_on_input")
    graph = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], b.inits)
    assert depthwise_input_sites(helper.make_model(graph)) == []


def test_undoing_split_sites_restores_the_depthwise_conv_and_keeps_folded_ones():
    from centernet_edge.quantize.channel_scaling import undo_split_sites

    model = _model("residual")
    sites, _, scaled = _scaled(model)
    undone = undo_split_sites(scaled, sites)
    assert not [n for n in undone.graph.node if n.output[0].endswith("_scaled_input")]
    original = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    restored = {i.name: onnx.numpy_helper.to_array(i) for i in undone.graph.initializer}
    np.testing.assert_allclose(restored["depthwise_w"], original["depthwise_w"], rtol=1e-6)
    x = _batches(1, seed=3)[0]
    np.testing.assert_allclose(_run(undone, x)[0], _run(model, x)[0], rtol=1e-5, atol=1e-5)
    folded_sites, _, folded = _scaled(_model("relu"))
    assert undo_split_sites(folded, folded_sites).SerializeToString() == folded.SerializeToString()
