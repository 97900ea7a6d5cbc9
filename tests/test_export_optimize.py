"""Graph rewrites (export/optimize.py): same outputs as the traced graph, fewer or cheaper nodes."""

from __future__ import annotations

import copy
import io
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from centernet_edge.export.models import build_model
from centernet_edge.export.onnx_export import ExportOptions, build_spec, export_onnx, expose_heads
from centernet_edge.export.optimize import deconv_to_conv, fold_batchnorm, fuse_sibling_convs, optimize_graph
from centernet_edge.export.trt_ops import check_trt_compatibility
from centernet_edge.export.verify import synthetic_images


class _Neck(nn.Module):
    """Conv, ConvTranspose + BN + ReLU, then three sibling heads (3x3 + ReLU + 1x1) like CenterNet's."""

    def __init__(self, kernel: int | tuple[int, int], stride: int | tuple[int, int], pad: int | tuple[int, int],
                 bias: bool, relu: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, kernel, stride=stride, padding=pad, bias=bias)
        self.bn = nn.BatchNorm2d(6)
        self.relu = relu
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, n, 1)) for n in (5, 2, 2))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # non-trivial BN statistics, so a wrong fold shows
            self.bn.running_mean.copy_(torch.randn(6, generator=gen))
            self.bn.running_var.copy_(torch.rand(6, generator=gen) + 0.5)
            self.bn.weight.copy_(torch.randn(6, generator=gen))
            self.bn.bias.copy_(torch.randn(6, generator=gen))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feat = self.bn(self.up(torch.relu(self.stem(x))))
        if self.relu:
            feat = torch.relu(feat)
        return tuple(head(feat) for head in self.heads)


def _export(module: nn.Module, shape: tuple[int, ...], outputs: int = 3) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(shape),), buf, dynamo=False, opset_version=19,
                          input_names=["x"], output_names=["a", "b", "c"][:outputs],
                          dynamic_axes={"x": {0: "N"}})
    return onnx.load_from_string(buf.getvalue())


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def _assert_close(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))


@pytest.mark.parametrize(("kernel", "stride", "pad"), [
    (4, 2, 1),          # CenterNet's upsampling
    (2, 2, 0),          # one tap per phase
    (6, 3, 2),          # stride 3
    (4, 2, 3),          # padding wider than the stride: whole phase rows cropped
    ((4, 3), (2, 1), (1, 1)),  # anisotropic, stride 1 on one axis
])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
def test_deconv_rewrite_matches_traced_graph(kernel, stride, pad, relu: bool) -> None:
    module = _Neck(kernel, stride, pad, bias=not relu, relu=relu)
    model = _export(module, (1, 3, 9, 11))
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 11)).astype(np.float32)
    want = _run(model, x)
    with torch.no_grad():
        traced = [t.numpy() for t in module(torch.from_numpy(x))]
    _assert_close(want, traced)

    rewritten = copy.deepcopy(model)
    assert fold_batchnorm(rewritten) == 1
    assert deconv_to_conv(rewritten) == 1
    onnx.checker.check_model(rewritten, full_check=True)
    ops = _ops(rewritten)
    assert "BatchNormalization" not in ops
    (interleave,) = [n for n in rewritten.graph.node if n.op_type == "ConvTranspose"]
    assert onnx.helper.get_attribute_value(next(a for a in interleave.attribute if a.name == "group")) == 6
    # The ReLU runs before the interleave (fused into the Conv by ORT); the node count does not grow.
    producer = {o: n for n in rewritten.graph.node for o in n.output}
    assert (producer[interleave.input[0]].op_type == "Relu") == relu
    assert len(rewritten.graph.node) == len(model.graph.node)
    assert not check_trt_compatibility(rewritten)
    _assert_close(_run(rewritten, x), want)


def test_deconv_rewrite_skips_unsupported_configurations() -> None:
    rng = np.random.default_rng(0)
    for kwargs in ({"groups": 2}, {"output_padding": 1}, {"dilation": 2}, {"kernel_size": 3}):
        params = {"kernel_size": 4, "stride": 2, "padding": 1, **kwargs}
        up = nn.ConvTranspose2d(4, 4, **params)
        model = _export(nn.Sequential(up, nn.ReLU()), (1, 4, 5, 5), outputs=1)
        before = model.SerializeToString()
        assert deconv_to_conv(model) == 0, kwargs
        assert model.SerializeToString() == before
        _run(model, rng.standard_normal((1, 4, 5, 5)).astype(np.float32))


def test_sibling_conv_fusion_matches_and_shrinks() -> None:
    module = _Neck(4, 2, 1, bias=False, relu=True)
    model = _export(module, (1, 3, 8, 8))
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    want = _run(model, x)
    fused = copy.deepcopy(model)
    assert fuse_sibling_convs(fused) == 1
    onnx.checker.check_model(fused, full_check=True)
    # Three 3x3 Conv + ReLU pairs became one Conv, one ReLU and a Split; the outputs keep their names.
    assert len(fused.graph.node) == len(model.graph.node) - 3
    ops, before = _ops(fused), _ops(model)
    assert ops["Conv"] == before["Conv"] - 2 and ops["Relu"] == before["Relu"] - 2 and ops["Split"] == 1
    assert [o.name for o in fused.graph.output] == ["a", "b", "c"]
    assert not check_trt_compatibility(fused)
    _assert_close(_run(fused, x), want)


def test_exported_res18_is_rewritten_and_unchanged_in_value() -> None:
    torch.manual_seed(0)
    network = build_model("res_18").eval()
    graphs = {}
    for optimize in (False, True):
        options = ExportOptions(input_size=(128, 128), optimize=optimize)
        spec = build_spec(arch="res_18", source="official", num_classes=80, options=options)
        graphs[optimize] = (export_onnx(network, spec, options), spec)
    plain, optimized = graphs[False][0], graphs[True][0]
    assert "graph_rewrites" not in graphs[False][1].provenance
    assert graphs[True][1].provenance["graph_rewrites"] == {"fold_batchnorm": 3, "deconv_to_conv": 3}
    assert _ops(plain)["ConvTranspose"] == 3 and _ops(plain)["BatchNormalization"] == 3
    assert "BatchNormalization" not in _ops(optimized)
    assert all(any(a.name == "group" and a.i > 1 for a in n.attribute)
               for n in optimized.graph.node if n.op_type == "ConvTranspose")
    assert not check_trt_compatibility(optimized)
    # Same contract, same values: heads to float rounding, detections row for row.
    assert [(i.name, i.type) for i in optimized.graph.input] == [(i.name, i.type) for i in plain.graph.input]
    assert [(o.name, o.type) for o in optimized.graph.output] == [(o.name, o.type) for o in plain.graph.output]
    img = synthetic_images(1)[0][1][None]
    runs = []
    for model in (plain, optimized):
        session = ort.InferenceSession(expose_heads(model), providers=["CPUExecutionProvider"])
        runs.append(session.run(None, {"image": img}))
    _assert_close(runs[1][1:], runs[0][1:])
    np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-5, atol=1e-3)


def test_optimize_graph_reports_counts_per_rewrite() -> None:
    model = _export(_Neck(4, 2, 1, bias=False, relu=True), (1, 3, 8, 8))
    counts = optimize_graph(model, ("fold_batchnorm", "deconv_to_conv", "fuse_sibling_convs"))
    assert counts == {"fold_batchnorm": 1, "deconv_to_conv": 1, "fuse_sibling_convs": 1}
    assert optimize_graph(model, ("fold_batchnorm", "deconv_to_conv")) == {"fold_batchnorm": 0,
                                                                          "deconv_to_conv": 0}
