"""Which ONNX graphs the TensorRT ONNX parser can import, checked without TensorRT.

The operator list is onnx/onnx-tensorrt ``docs/operators.md`` for TensorRT 10.15 (ops marked "Y"; opset
9..24). ``check_trt_compatibility`` also enforces the documented restrictions that matter for
CenterNet graphs (TopK's K a constant < 3840 with sorted output, MaxPool without Indices, DeformConv with
symmetric pads, UINT8 only at the graph boundary) and, by default, the absence of bool tensors: TensorRT
7.1 silently disabled INT8 calibration for networks holding one (PingoLH/CenterNet-HarDNet#4).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto, numpy_helper

from centernet_edge.runtime.onnx_graph import attribute, constants, tensor_types

__all__ = ["TRT_MAX_TOPK", "TRT_OPSET_RANGE", "TRT_SUPPORTED_OPS", "TrtIssue", "assert_trt_compatible",
           "check_trt_compatibility"]

TRT_OPSET_RANGE = (9, 24)
TRT_MAX_TOPK = 3839

TRT_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax
Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish
Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan
Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile TopK Transpose
Trilu Unsqueeze Upsample Where Xor
""".split())

# Inputs that must be build-time constants (op type -> input index).
_CONSTANT_INPUTS = {
    "TopK": 1,
    "Squeeze": 1,
    "Unsqueeze": 1,
    "CumSum": 1,
    "ReduceL1": 1, "ReduceL2": 1, "ReduceLogSum": 1, "ReduceLogSumExp": 1, "ReduceMax": 1, "ReduceMean": 1,
    "ReduceMin": 1, "ReduceProd": 1, "ReduceSum": 1, "ReduceSumSquare": 1,
}
_RESIZE_COORD_MODES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric",
                       "align_corners"}


@dataclass(frozen=True)
class TrtIssue:
    """One reason the TensorRT parser would refuse (or mis-handle) a graph."""

    node: str
    op_type: str
    message: str

    def __str__(self) -> str:
        return f"{self.op_type} node {self.node!r}: {self.message}"


def check_trt_compatibility(model: onnx.ModelProto, *, allow_bool: bool = False) -> list[TrtIssue]:
    """Every documented reason the TensorRT (10.x) ONNX parser would reject ``model``; empty when none."""
    issues: list[TrtIssue] = []
    graph = model.graph
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not TRT_OPSET_RANGE[0] <= opset.version <= TRT_OPSET_RANGE[1]:
            issues.append(TrtIssue("<model>", "opset", f"opset {opset.version} is outside TensorRT's "
                                   f"{TRT_OPSET_RANGE[0]}..{TRT_OPSET_RANGE[1]}"))
    known = constants(graph)
    types = tensor_types(model)
    boundary = {v.name for v in list(graph.input) + list(graph.output)}
    for node in graph.node:
        name = node.name or (node.output[0] if node.output else "?")
        op = node.op_type

        def bad(message: str, node_name: str = name, op_type: str = op) -> None:
            issues.append(TrtIssue(node_name, op_type, message))

        if node.domain not in ("", "ai.onnx"):
            bad(f"custom domain {node.domain!r} needs a TensorRT plugin")
            continue
        if op not in TRT_SUPPORTED_OPS:
            bad("not supported by the TensorRT ONNX parser")
            continue
        idx = _CONSTANT_INPUTS.get(op)
        if idx is not None and len(node.input) > idx and node.input[idx] and node.input[idx] not in known:
            bad(f"input {idx} ({node.input[idx]!r}) must be a build-time constant")
        if op == "TopK":
            k = known.get(node.input[1]) if len(node.input) > 1 else None
            if k is not None and int(numpy_helper.to_array(k).reshape(-1)[0]) > TRT_MAX_TOPK:
                bad(f"K={int(numpy_helper.to_array(k).reshape(-1)[0])} must be < 3840")
            if attribute(node, "sorted", 1) != 1:
                bad("sorted must be 1")
        elif op == "MaxPool":
            if len([o for o in node.output if o]) > 1:
                bad("the Indices output is not supported")
            if any(d != 1 for d in (attribute(node, "dilations") or [])):
                bad("dilations must be 1")
        elif op == "DeformConv":
            pads = list(attribute(node, "pads") or [])
            half = len(pads) // 2
            if pads and pads[:half] != pads[half:]:
                bad(f"pads {pads} must be equal at the beginning and end of each axis")
            kernel = attribute(node, "kernel_shape")
            if kernel is not None and len(kernel) > 2:
                bad("only 1-D or 2-D deformable convolution is supported")
        elif op == "Resize":
            mode = attribute(node, "coordinate_transformation_mode", b"half_pixel")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            if mode not in _RESIZE_COORD_MODES:
                bad(f"coordinate_transformation_mode {mode!r} is not supported")
            interp = attribute(node, "mode", b"nearest")
            interp = interp.decode() if isinstance(interp, bytes) else interp
            if interp not in ("nearest", "linear"):
                bad(f"mode {interp!r} is not supported")
            if attribute(node, "antialias", 0):
                bad("antialiasing is not supported")
        elif op == "Dropout" and len(node.input) > 2 and node.input[2]:
            bad("is_training must be absent (inference graph)")
        if op != "Cast":
            for tensor in node.input:
                if tensor and types.get(tensor) == TensorProto.UINT8:
                    bad(f"reads UINT8 tensor {tensor!r}; TensorRT accepts UINT8 only at the network "
                        "boundary (Cast it first)")
        for tensor in node.output:
            elem = types.get(tensor)
            if not allow_bool and elem == TensorProto.BOOL:
                bad(f"produces bool tensor {tensor!r} "
                    "(TensorRT 7.1 disables INT8 calibration for such graphs)")
            if elem == TensorProto.UINT8 and tensor not in boundary:
                bad(f"produces UINT8 tensor {tensor!r} inside the network")
            if elem == TensorProto.DOUBLE:
                bad(f"produces DOUBLE tensor {tensor!r}; TensorRT casts it to float32")
    return issues


def assert_trt_compatible(model: onnx.ModelProto, *, allow_bool: bool = False) -> None:
    """Raise ``ValueError`` listing every TensorRT-parser problem of ``model``."""
    issues = check_trt_compatibility(model, allow_bool=allow_bool)
    if issues:
        listed = "\n  ".join(str(i) for i in issues[:20])
        more = f"\n  ... and {len(issues) - 20} more" if len(issues) > 20 else ""
        raise ValueError(f"graph is not importable by the TensorRT ONNX parser:\n  {listed}{more}")
