"""Cross-layer equalization keeps the fp32 function and balances the paired channel ranges; on official
res_18 (random weights) the weight fitting runs too."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from test_export_models import save_checkpoint

from centernet_edge.export.onnx_export import ExportOptions, export_checkpoint
from centernet_edge.export.verify import synthetic_images
from centernet_edge.quantize.equalize import equalizable_pairs, equalize
from centernet_edge.quantize.placement import plan_placement
from centernet_edge.quantize.sequential import FitOptions, fit_layers
from centernet_edge.runtime.onnx_graph import initializers, prune_to_outputs
from centernet_edge.runtime.onnx_session import create_session
from centernet_edge.runtime.preprocess import prepare_batch
from centernet_edge.runtime.spec import ModelSpec


@pytest.fixture(scope="module")
def res18(tmp_path_factory) -> onnx.ModelProto:
    ckpt = save_checkpoint("res_18", tmp_path_factory.mktemp("cle") / "res_18.pth")
    return export_checkpoint(ckpt, options=ExportOptions(input_size=(128, 128))).model


def _run(model: onnx.ModelProto, feed: np.ndarray) -> list[np.ndarray]:
    session = create_session(model.SerializeToString(), threads=1)
    return session.run(None, {session.get_inputs()[0].name: feed})


def test_res18_function_unchanged_and_ranges_balanced(res18):
    pairs = equalizable_pairs(res18)
    assert len(pairs) >= 8 and all(p.activation in ("Relu", "") for p in pairs)
    equalized, applied = equalize(res18)
    assert applied == pairs
    spec = ModelSpec.from_onnx(res18)
    images = [img for _, img in synthetic_images(2, seed=3)]
    feed, _ = prepare_batch(images[:1], spec)
    before, after = _run(res18, feed), _run(equalized, feed)
    outputs = [o.name for o in res18.graph.output]
    for name, a, b in zip(outputs, before, after, strict=True):
        if name == spec.graph.outputs["detections"].name:  # boxes/scores/classes of the same peaks
            np.testing.assert_allclose(b[..., 4], a[..., 4], atol=1e-5)
            np.testing.assert_array_equal(b[..., 5], a[..., 5])
            np.testing.assert_allclose(b[..., :4], a[..., :4], rtol=1e-5, atol=1e-3)
        else:
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(a).max())))
    inits, original = initializers(equalized.graph), initializers(res18.graph)
    nodes = {n.name: n for n in equalized.graph.node}
    spread_before, spread_after = [], []
    for pair in pairs:
        w1 = numpy_helper.to_array(inits[nodes[pair.first].input[1]])
        w2 = numpy_helper.to_array(inits[nodes[pair.second].input[1]])
        r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
        r2 = np.abs(w2).transpose(1, 0, 2, 3).reshape(w2.shape[1], -1).max(axis=1)
        np.testing.assert_allclose(r1, r2, rtol=1e-3)  # the paired channels share one range
        o1 = np.abs(numpy_helper.to_array(original[nodes[pair.first].input[1]])).reshape(w1.shape[0], -1).max(1)
        spread_before.append(o1.max() / o1.min())
        spread_after.append(r1.max() / r1.min())
    assert np.median(spread_after) <= np.median(spread_before)


def test_res18_weight_fitting_runs_and_never_loses_to_nearest(res18):
    equalized, _ = equalize(res18)
    spec = ModelSpec.from_onnx(equalized)
    placement = plan_placement(equalized)
    images = [img for _, img in synthetic_images(2, seed=5)]
    feeds = [prepare_batch([img], spec)[0] for img in images]
    tensors = placement.activation_tensors()
    session = create_session(prune_to_outputs(equalized, tensors).SerializeToString(), threads=1)
    values = [session.run(tensors, {session.get_inputs()[0].name: f}) for f in feeds]
    amax = {t: max(float(np.abs(v[i]).max()) for v in values) for i, t in enumerate(tensors)}
    options = FitOptions(rounding="adaround", bias_correction=True, samples=256, iterations=30)
    fitted, report = fit_layers(equalized, placement.layers, amax, feeds, spec.graph.input.name, options)
    assert len(report.layers) >= 15  # the ResNet convs and the head convs
    for row in report.layers:
        assert row.error <= row.nearest_error * (1 + 1e-6) and row.shift_after <= row.shift_before + 1e-9


def _chain(activation: str) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = (rng.normal(size=(4, 3, 1, 1)) * np.array([1, 10, 0.1, 3])[:, None, None, None]).astype(np.float32)
    w2 = rng.normal(size=(2, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1")]
    if activation == "Clip":
        nodes.append(helper.make_node("Clip", ["a", "lo", "hi"], ["b"], name="act"))
    else:
        nodes.append(helper.make_node(activation, ["a"], ["b"], name="act"))
    nodes.append(helper.make_node("Conv", ["b", "w2"], ["y"], name="c2"))
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("activation", "expected"), [("Relu", 1), ("Identity", 1), ("Clip", 0),
                                                      ("Sigmoid", 0), ("HardSwish", 0)])
def test_only_scaling_commuting_activations_are_equalized(activation, expected):
    model = _chain(activation)
    assert len(equalizable_pairs(model)) == expected
    equalized, _ = equalize(model)
    x = np.random.default_rng(1).normal(size=(1, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(equalized, x)[0], _run(model, x)[0], rtol=1e-5, atol=1e-6)


def test_res18_has_no_depthwise_input_for_channel_scaling(res18):
    """Official ResNets have no depthwise convs: channel scaling finds nothing and leaves the model as it is
    (calibration then writes no rescaled model and the cache describes the model given)."""
    from centernet_edge.quantize.channel_scaling import apply_channel_scaling, depthwise_input_sites

    assert depthwise_input_sites(res18) == []
    assert apply_channel_scaling(res18, [], {}).SerializeToString() == res18.SerializeToString()
