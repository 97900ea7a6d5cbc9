"""Range choice by the reading layer's output error: replay parity with ONNX Runtime and an argmin oracle."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper
from quant_synthetic import FRAGILE, quant_setup, tensor_values

from centernet_edge.quantize.qdq import quantize_weight_per_channel
from centernet_edge.quantize.range_search import conv_attributes, fake_quant, replay_conv, search_ranges


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    s = quant_setup(tmp_path_factory.mktemp("rs"), 3, image_seed=3)
    return s.model, s.placement, s.amax, s.inputs


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def test_replayed_conv_matches_onnx_runtime(setup):
    model, _, _, batches = setup
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for name in ("stem", "depthwise", "down", FRAGILE):
        node = _node(model, name)
        got = tensor_values(model, [node.input[0], node.output[0]], [{"image": batches[0]}])[0]
        bias = inits[node.input[2]] if len(node.input) > 2 else None
        y = replay_conv(got[node.input[0]], inits[node.input[1]], bias, conv_attributes(node))
        np.testing.assert_allclose(y, got[node.output[0]], rtol=1e-4, atol=1e-4)


def test_choice_is_the_argmin_of_the_reading_layers_error(setup):
    model, placement, absmax, batches = setup
    candidates = {"full": absmax, "half": {t: a / 2 for t, a in absmax.items()},
                  "tiny": {t: a / 1000 for t, a in absmax.items()}}
    choice = search_ranges(model, placement.layers, candidates, iter(batches), "image")
    assert set(choice.amax) == set(placement.activation_tensors())
    node = _node(model, FRAGILE)
    # Clipping at 0.1 % of the range is never the best, except for the fragile conv's input, where it
    # clips the one boosted channel and keeps the resolution of all the others.
    assert {t for t, label in choice.chosen.items() if label == "tiny"} <= {node.input[0]}
    # Oracle for the fragile conv's input: its only reader is the fragile conv.
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    w, b = inits[node.input[1]], inits[node.input[2]]
    q, s = quantize_weight_per_channel(w, 0)
    wq = (q * s.reshape(-1, 1, 1, 1)).astype(np.float32)
    attrs = conv_attributes(node)
    xs = [v[node.input[0]] for v in tensor_values(model, [node.input[0]], [{"image": x} for x in batches])]
    errors = {}
    for label, amax in candidates.items():
        num = den = 0.0
        for x in xs:
            y = replay_conv(x, w, b, attrs)
            num += float(((replay_conv(fake_quant(x, amax[node.input[0]]), wq, b, attrs) - y) ** 2).sum())
            den += float((y.astype(np.float64) ** 2).sum())
        errors[label] = num / den
    assert choice.errors[node.input[0]] == pytest.approx(errors, rel=1e-5)
    assert choice.chosen[node.input[0]] == min(errors, key=errors.get)


def test_missing_candidate_is_an_error(setup):
    model, placement, absmax, batches = setup
    partial = dict(list(absmax.items())[:-1])
    with pytest.raises(ValueError, match="no candidate range"):
        search_ranges(model, placement.layers, {"a": partial}, iter(batches), "image")
