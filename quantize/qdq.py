"""Q/DQ ONNX for TensorRT explicit quantization (the TensorRT 11 path, also usable with 10.x).

Symmetric int8 everywhere (zero point 0, range -127..127 for weights as TensorRT expects):

* activations: one per-tensor scale ``amax / 127`` from calibration, one QuantizeLinear/DequantizeLinear
  pair per tensor shared by all quantized consumers; consumers left in float keep reading the float tensor;
* weights: stored as int8 initializers with per-output-channel scales ``max|W_c| / 127`` and a
  DequantizeLinear (axis 0 for Conv, 1 for ConvTranspose). Biases stay float; TensorRT folds them.

The same graph runs in ONNX Runtime, where it simulates the int8 arithmetic exactly up to float
accumulation order: that is how its accuracy is measured without TensorRT.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from centernet_edge.runtime.onnx_graph import default_opset, initializers, topological_sort, unique_name

from .placement import QuantLayer

__all__ = ["MIN_QDQ_OPSET", "QdqError", "build_qdq_model", "quantize_weight_per_channel"]

MIN_QDQ_OPSET = 13  # per-axis DequantizeLinear
# An all-zero calibration range would give scale 0, which Q/DQ forbid; any tiny positive scale maps
# such a tensor to exactly 0 anyway.
_MIN_AMAX = 1e-12


class QdqError(ValueError):
    """The model or the calibration ranges cannot be turned into a Q/DQ graph."""


def quantize_weight_per_channel(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel int8: returns (int8 weights in -127..127, float32 scales along ``axis``)."""
    w = np.asarray(weight, dtype=np.float32)
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    amax = np.abs(moved).max(axis=1) if moved.size else np.zeros(w.shape[axis], np.float32)
    # All-zero channels quantize to 0 with any scale; 1.0 keeps the scale valid for TensorRT.
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scales.reshape(shape)), -127, 127).astype(np.int8)
    return q, scales


def build_qdq_model(
    model: onnx.ModelProto,
    layers: Sequence[QuantLayer],
    amax: Mapping[str, float],
) -> onnx.ModelProto:
    """A copy of ``model`` with Q/DQ for ``layers`` (from :func:`plan_placement`) using ``amax`` ranges.

    Raises :class:`QdqError` when the opset is too old, a range is missing, or the model already holds
    Q/DQ nodes (quantizing twice would stack scales).
    """
    if default_opset(model) < MIN_QDQ_OPSET:
        raise QdqError(
            f"Q/DQ with per-channel weights needs opset >= {MIN_QDQ_OPSET}; the model uses opset "
            f"{default_opset(model)} (re-export with a newer opset)"
        )
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise QdqError("the model already contains QuantizeLinear/DequantizeLinear nodes")
    missing = sorted({t for layer in layers for t in layer.inputs if t not in amax})
    if missing:
        raise QdqError(
            f"no calibrated range for {len(missing)} tensor(s), e.g. {missing[:3]}; calibrate these tensors"
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    by_name = {n.name: n for n in graph.node}
    inits = initializers(graph)
    taken = {o for n in graph.node for o in n.output} | set(inits) | {i.name for i in graph.input}
    new_nodes: list[onnx.NodeProto] = []
    act_dq: dict[str, str] = {}
    weight_dq: dict[tuple[str, int], str] = {}

    def fresh(base: str) -> str:
        return unique_name(base, taken)

    def activation(tensor: str) -> str:
        if tensor not in act_dq:
            value = max(float(amax[tensor]), _MIN_AMAX)
            scale = fresh(f"{tensor}_scale")
            zero = fresh(f"{tensor}_zero_point")
            graph.initializer.extend([
                numpy_helper.from_array(np.array(value / 127.0, dtype=np.float32), scale),
                numpy_helper.from_array(np.array(0, dtype=np.int8), zero),
            ])
            q_out, dq_out = fresh(f"{tensor}_QuantizeLinear"), fresh(f"{tensor}_DequantizeLinear")
            new_nodes.append(helper.make_node("QuantizeLinear", [tensor, scale, zero], [q_out], name=q_out))
            new_nodes.append(helper.make_node("DequantizeLinear", [q_out, scale, zero], [dq_out],
                                              name=dq_out))
            act_dq[tensor] = dq_out
        return act_dq[tensor]

    def weight(name: str, axis: int) -> str:
        key = (name, axis)
        if key not in weight_dq:
            q, scales = quantize_weight_per_channel(numpy_helper.to_array(inits[name]), axis)
            q_name, s_name = fresh(f"{name}_int8"), fresh(f"{name}_scale")
            z_name = fresh(f"{name}_zero_point")
            graph.initializer.extend([
                numpy_helper.from_array(q, q_name),
                numpy_helper.from_array(scales, s_name),
                numpy_helper.from_array(np.zeros_like(scales, dtype=np.int8), z_name),
            ])
            dq_out = fresh(f"{name}_DequantizeLinear")
            new_nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq_out],
                                              name=dq_out, axis=axis))
            weight_dq[key] = dq_out
        return weight_dq[key]

    for layer in layers:
        node = by_name.get(layer.name)
        if node is None:
            raise QdqError(f"layer {layer.name!r} is not a node of this model")
        for i, tensor in enumerate(node.input):
            if tensor in layer.inputs:
                node.input[i] = activation(tensor)
        if layer.weight is not None and layer.weight_axis is not None:
            if node.input[1] != layer.weight:
                raise QdqError(f"layer {layer.name!r}: weight {layer.weight!r} is not its second input")
            node.input[1] = weight(layer.weight, layer.weight_axis)

    graph.node.extend(new_nodes)
    _drop_unused_initializers(graph, {name for name, _ in weight_dq})
    topological_sort(graph)
    return out


def _drop_unused_initializers(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Remove float weights now only reachable through their int8 copy (keeps the file int8-sized)."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in used or init.name not in candidates]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)
