"""Per-layer int8 weight fitting: sampled patches, AdaRound rounding, bias correction, the sequential driver."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from quant_synthetic import build_synthetic_model, quant_setup

from centernet_edge.quantize.adaround import adaround_layer, nearest_levels, reconstruction_error
from centernet_edge.quantize.bias_correction import ShiftAccumulator
from centernet_edge.quantize.layer_samples import conv_layers, grouped_output, sample_patches, sample_positions
from centernet_edge.quantize.placement import plan_placement
from centernet_edge.quantize.qdq import quantize_weight_per_channel
from centernet_edge.quantize.range_search import replay_conv
from centernet_edge.quantize.sequential import FitOptions, fit_layers
from centernet_edge.runtime.onnx_graph import ensure_node_names, initializers


def _conv_model(cin: int, cout: int, group: int, kernel: int, stride: int, pads: list[int]) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w = rng.normal(size=(cout, cin // group, kernel, kernel)).astype(np.float32)
    b = rng.normal(size=cout).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=group, strides=[stride, stride],
                            pads=pads, kernel_shape=[kernel, kernel])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("cin", "cout", "group", "kernel", "stride", "pads"), [
    (6, 4, 1, 3, 2, [1, 0, 1, 1]), (8, 8, 8, 3, 1, [1, 1, 1, 1]), (8, 4, 2, 1, 1, [0, 0, 0, 0])])
def test_sampled_patches_reproduce_the_conv(cin, cout, group, kernel, stride, pads):
    model = _conv_model(cin, cout, group, kernel, stride, pads)
    (layer,) = conv_layers(model, plan_placement(model).layers)
    x = np.random.default_rng(4).normal(size=(1, cin, 11, 9)).astype(np.float32)
    full = replay_conv(x, layer.weight, layer.bias, layer.attrs)
    rows, cols = sample_positions(layer, x.shape, 20, seed=0, image=0)
    assert len(rows) == 20 and len(set(zip(rows.tolist(), cols.tolist(), strict=True))) == 20
    again = sample_positions(layer, x.shape, 20, seed=0, image=0)
    assert np.array_equal(rows, again[0]) and np.array_equal(cols, again[1])
    other = sample_positions(layer, x.shape, 20, seed=0, image=1)
    assert not (np.array_equal(rows, other[0]) and np.array_equal(cols, other[1]))
    out = grouped_output(sample_patches(layer, x, (rows, cols)), layer.grouped_weight(), layer.grouped_bias())
    expected = full[0][:, rows, cols].T  # [P, Cout]
    np.testing.assert_allclose(out.reshape(len(rows), -1), expected, rtol=1e-5, atol=1e-5)
    everything = sample_positions(layer, x.shape, 10_000, seed=0, image=0)
    assert len(everything[0]) == full.shape[2] * full.shape[3]


def _layer_problem(seed: int, groups: int, out: int, k: int, samples: int = 600):
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(groups, out, k)).astype(np.float32)
    scale = np.abs(weight).max(axis=2, keepdims=True) / 127 * 16  # coarse levels: rounding matters
    # correlated inputs (like neighbouring pixels and channels): with white inputs nearest rounding is optimal
    mix = rng.normal(size=(groups, k, k)).astype(np.float32) + 2.0
    white = rng.normal(size=(samples, groups, k)).astype(np.float32)
    x = (np.einsum("pgk,gkj->pgj", white, mix) / np.sqrt(k)).astype(np.float32)
    bias = rng.normal(size=(groups, out)).astype(np.float32)
    y = grouped_output(x, weight, bias).astype(np.float32)
    return x, y, weight, scale.astype(np.float32), bias


@pytest.mark.parametrize(("groups", "out", "k"), [(1, 8, 24), (6, 1, 9)])
def test_adaround_never_increases_the_reconstruction_error(groups, out, k):
    x, y, weight, scale, bias = _layer_problem(1, groups, out, k)
    result = adaround_layer(x, y, weight, scale, bias, iterations=150, seed=0)
    nearest = nearest_levels(weight, scale)
    assert result.nearest_error == pytest.approx(reconstruction_error(x, y, nearest * scale, bias))
    assert result.error == pytest.approx(reconstruction_error(x, y, result.levels * scale, bias))
    assert result.error <= result.nearest_error
    assert np.array_equal(result.levels, np.rint(result.levels)) and np.abs(result.levels).max() <= 127
    # the largest weight of each channel keeps its level, so the per-channel scale is unchanged
    assert np.array_equal(np.abs(result.levels).max(axis=2), np.abs(nearest).max(axis=2))
    # zero optimisation steps fall back to nearest rounding exactly
    none = adaround_layer(x, y, weight, scale, bias, iterations=0)
    assert np.array_equal(none.levels, nearest) and not none.adaround_kept


def test_adaround_improves_a_dense_layer():
    x, y, weight, scale, bias = _layer_problem(2, 1, 16, 64, samples=2000)
    result = adaround_layer(x, y, weight, scale, bias, iterations=200, seed=0)
    assert result.adaround_kept and result.error < 0.5 * result.nearest_error


def test_shift_accumulator_streams_the_per_channel_mean():
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(3000, 2, 3)).astype(np.float32)
    offset = np.array([[0.5, -0.2, 0.0], [0.1, 0.0, -0.4]], np.float32)
    quantized = ref + offset + 0.01 * rng.normal(size=ref.shape).astype(np.float32)
    acc = ShiftAccumulator()
    for part in np.array_split(np.arange(3000), 7):
        acc.add(quantized[part], ref[part])
    np.testing.assert_allclose(acc.shift(), offset, atol=2e-3)
    assert acc.relative_shift() > 0.2
    after = ShiftAccumulator()
    after.add(quantized - acc.shift(), ref)
    assert after.relative_shift() < 1e-3
    with pytest.raises(ValueError, match="no samples"):
        ShiftAccumulator().shift()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    s = quant_setup(tmp_path_factory.mktemp("fit"), 4, image_seed=2)
    return s.model, s.placement, s.amax, s.inputs


def test_fit_layers_bias_correction_and_rounding(synthetic):
    model, placement, amax, batches = synthetic
    options = FitOptions(rounding="adaround", bias_correction=True, samples=512, iterations=60)
    fitted, report = fit_layers(model, placement.layers, amax, batches, "image", options)
    assert report.layers and report.images == len(batches)
    for row in report.layers:
        assert row.error <= row.nearest_error * (1 + 1e-6)  # rounding, then the mean removed: never worse
        assert row.shift_after <= row.shift_before + 1e-9 and row.shift_after < 1e-4
    assert any(row.shift_before > 1e-3 for row in report.layers)
    inits, original = initializers(fitted.graph), initializers(model.graph)
    kept = {row.layer for row in report.layers if row.adaround_kept}
    assert kept  # the synthetic convs gain from learned rounding
    for conv in conv_layers(fitted, placement.layers):
        w = numpy_helper.to_array(inits[conv.weight_name])
        if conv.name not in kept:
            assert np.array_equal(w, numpy_helper.to_array(original[conv.weight_name]))
            continue
        # baked levels: any per-channel int8 quantizer re-derives exactly these weights
        q, scales = quantize_weight_per_channel(w, 0)
        np.testing.assert_allclose(q.astype(np.float32) * scales.reshape(-1, 1, 1, 1), w, rtol=1e-6, atol=0)
    # the original is untouched; equal inputs give equal bytes
    assert model.SerializeToString() == ensure_node_names(
        build_synthetic_model(seed=1, fragile=True, deform=False)).SerializeToString()
    again, _ = fit_layers(model, placement.layers, amax, batches, "image", options)
    assert again.SerializeToString() == fitted.SerializeToString()


def test_fit_layers_is_a_no_op_when_nothing_is_asked(synthetic):
    model, placement, amax, batches = synthetic
    same, report = fit_layers(model, placement.layers, amax, batches, "image", FitOptions())
    assert same is model and report.layers == []
    with pytest.raises(ValueError, match="unknown rounding"):
        fit_layers(model, placement.layers, amax, batches, "image", FitOptions(rounding="up"))
