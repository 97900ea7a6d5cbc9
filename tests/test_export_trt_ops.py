"""The TensorRT-parser compatibility checker on hand-built graphs (exported graphs are checked elsewhere)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from centernet_edge.export.trt_ops import TRT_SUPPORTED_OPS, assert_trt_compatible, check_trt_compatibility


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto] | None = None,
           in_type: int = TensorProto.FLOAT, out_type: int = TensorProto.FLOAT, opset: int = 19,
           outputs: tuple[str, ...] = ("y",)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", in_type, [1, 4, 8, 8])],
        [helper.make_tensor_value_info(o, out_type, None) for o in outputs], initializer=inits or [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _k(value: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array([value], dtype=np.int64), "k")


def _messages(model: onnx.ModelProto, **kw) -> list[str]:
    return [str(i) for i in check_trt_compatibility(model, **kw)]


def test_allowlist_covers_centernet_ops() -> None:
    needed = {"Conv", "ConvTranspose", "DeformConv", "BatchNormalization", "Relu", "MaxPool", "Sigmoid",
              "Ceil", "TopK", "GatherElements", "Gather", "Pad", "Round", "Clip", "Floor", "Cast", "Shape",
              "Tile", "Resize", "Upsample", "Concat", "Reshape", "Transpose", "Split"}
    assert needed <= TRT_SUPPORTED_OPS
    assert {"BitwiseOr", "Unique", "NonMaxSuppression"} - TRT_SUPPORTED_OPS == {"BitwiseOr", "Unique"}


def test_clean_graph_passes() -> None:
    model = _model([helper.make_node("Sigmoid", ["x"], ["s"]),
                    helper.make_node("Reshape", ["s", "shape"], ["r"]),
                    helper.make_node("TopK", ["r", "k"], ["y", "i"], axis=1)],
                   [_k(100), numpy_helper.from_array(np.array([1, -1], np.int64), "shape")])
    assert _messages(model) == []
    assert_trt_compatible(model)


def test_topk_limits() -> None:
    big = _model([helper.make_node("TopK", ["x", "k"], ["y", "i"], axis=3)], [_k(5000)])
    assert any("K=5000 must be < 3840" in m for m in _messages(big))
    unsorted = _model([helper.make_node("TopK", ["x", "k"], ["y", "i"], axis=3, sorted=0)], [_k(4)])
    assert any("sorted must be 1" in m for m in _messages(unsorted))
    dynamic = _model([helper.make_node("Shape", ["x"], ["k"]),
                      helper.make_node("TopK", ["x", "k"], ["y", "i"], axis=3)])
    assert any("must be a build-time constant" in m for m in _messages(dynamic))


def test_unsupported_and_custom_ops() -> None:
    model = _model([helper.make_node("Unique", ["x"], ["u"]),
                    helper.make_node("MMCVModulatedDeformConv2d", ["u"], ["y"], domain="mmdeploy")])
    msgs = _messages(model)
    assert any("Unique" in m and "not supported" in m for m in msgs)
    assert any("custom domain 'mmdeploy' needs a TensorRT plugin" in m for m in msgs)


def test_bool_and_uint8_tensors() -> None:
    model = _model([helper.make_node("MaxPool", ["x"], ["m"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                    helper.make_node("Equal", ["m", "x"], ["eq"]),
                    helper.make_node("Cast", ["eq"], ["y"], to=TensorProto.FLOAT)])
    assert any("produces bool tensor 'eq'" in m for m in _messages(model))
    assert _messages(model, allow_bool=True) == []
    u8 = _model([helper.make_node("Relu", ["x"], ["y"])], in_type=TensorProto.UINT8,
                out_type=TensorProto.UINT8)
    assert any("reads UINT8 tensor 'x'" in m for m in _messages(u8))
    cast_first = _model([helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT),
                         helper.make_node("Relu", ["f"], ["y"])], in_type=TensorProto.UINT8)
    assert _messages(cast_first) == []


def test_maxpool_indices_deformconv_pads_and_opset() -> None:
    pool = _model([helper.make_node("MaxPool", ["x"], ["y", "idx"], kernel_shape=[3, 3])],
                  outputs=("y", "idx"))
    assert any("Indices output is not supported" in m for m in _messages(pool))
    w = numpy_helper.from_array(np.zeros((4, 4, 3, 3), np.float32), "w")
    off = numpy_helper.from_array(np.zeros((1, 18, 8, 8), np.float32), "off")
    dcn = _model([helper.make_node("DeformConv", ["x", "w", "off"], ["y"], kernel_shape=[3, 3],
                                   pads=[1, 1, 2, 2])], [w, off])
    assert any("must be equal at the beginning and end" in m for m in _messages(dcn))
    old = _model([helper.make_node("Relu", ["x"], ["y"])], opset=8)
    assert any("opset 8 is outside" in m for m in _messages(old))
    with pytest.raises(ValueError, match="not importable by the TensorRT ONNX parser"):
        assert_trt_compatible(old)
