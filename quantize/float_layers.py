"""Keep float layers float when ONNX Runtime loads a quantized graph.

ONNX Runtime's ``WeightBiasQuantization`` graph transformer (basic level, on by default) takes every
Conv / ConvTranspose / Gemm whose input comes from a ``DequantizeLinear`` with a per-tensor scale and whose
weight is a float initializer, and quantizes that weight to int8 with **one** scale for the whole tensor
(and the bias to int32), so that the layer fuses into an integer kernel. A layer deliberately kept float
in a quantized model is exactly such a layer: a depthwise conv kept float because it is sensitive came
out worse than quantizing it per channel (mb3: heatmap error x4; the "float" heads of the CPU model were
int8 with per-tensor weights).

:func:`shield_float_layers` gives each such layer its own ``DequantizeLinear`` with a per-channel scale
(the same value repeated over the channel axis). It computes the same floats, and the transformer, which
only takes per-tensor inputs, leaves the layer alone. Models built for TensorRT need no shield (the
Q/DQ builder never feeds a float layer from a DequantizeLinear; TensorRT does not requantize them anyway).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from centernet_edge.runtime.onnx_graph import default_opset, initializers, producers, unique_name

__all__ = ["shield_float_layers"]

_WEIGHTED = ("Conv", "ConvTranspose", "Gemm")


def shield_float_layers(model: onnx.ModelProto) -> list[str]:
    """Give float weighted layers fed by a per-tensor DequantizeLinear a private per-channel one (in place).

    Returns the names of the layers shielded. Needs opset >= 13 (per-axis DequantizeLinear); older
    models are returned unchanged.
    """
    if default_opset(model) < 13:
        return []
    inits = initializers(model.graph)
    prod = producers(model.graph)
    taken = {n.name for n in model.graph.node} | set(inits) | {o for n in model.graph.node for o in n.output}
    shielded = []
    for index, node in reversed(list(enumerate(model.graph.node))):
        channels = _input_channels(node, inits)
        dq = prod.get(node.input[0]) if channels else None
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 2:
            continue
        scale = _per_tensor(dq.input[1], inits)
        zero_point = _per_tensor(dq.input[2], inits) if len(dq.input) > 2 and dq.input[2] else None
        if scale is None or (len(dq.input) > 2 and dq.input[2] and zero_point is None):
            continue
        base = f"{node.name}_input"
        names = [unique_name(f"{base}_scale", taken)]
        model.graph.initializer.append(numpy_helper.from_array(np.full(channels, scale, scale.dtype), names[0]))
        if zero_point is not None:
            names.append(unique_name(f"{base}_zero_point", taken))
            model.graph.initializer.append(
                numpy_helper.from_array(np.full(channels, zero_point, zero_point.dtype), names[-1]))
        dequantized = unique_name(f"{base}_dequantized", taken)
        model.graph.node.insert(index, helper.make_node(
            "DequantizeLinear", [dq.input[0], *names], [dequantized], axis=_channel_axis(node),
            name=unique_name(f"{base}_dequantize", taken)))
        node.input[0] = dequantized
        shielded.append(node.name)
    return shielded[::-1]


def _input_channels(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> int | None:
    """Channels along the input's channel axis of a weighted layer with a float initializer weight."""
    if node.op_type not in _WEIGHTED or len(node.input) < 2 or node.input[1] not in inits:
        return None
    weight = inits[node.input[1]]
    if weight.data_type != onnx.TensorProto.FLOAT or len(weight.dims) < 2:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Conv":
        return int(weight.dims[1]) * int(attrs.get("group", 1))
    if node.op_type == "ConvTranspose":
        return int(weight.dims[0])
    return int(weight.dims[1] if attrs.get("transB", 0) else weight.dims[0])  # Gemm: K


def _channel_axis(node: onnx.NodeProto) -> int:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return 0 if node.op_type == "Gemm" and attrs.get("transA", 0) else 1


def _per_tensor(name: str, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    if name not in inits:
        return None
    value = numpy_helper.to_array(inits[name])
    return value.reshape(()) if value.size == 1 else None
