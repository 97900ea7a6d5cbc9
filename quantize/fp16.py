"""fp16 ONNX: the network in half precision, everything that decides detections in fp32.

* graph inputs and outputs keep their names and dtypes (Casts at the borders), so the model spec and
  every runner work unchanged;
* pre-processing (uint8 casts, mean/std: values up to 255 lose bits in fp16) and the decode tail (sigmoid,
  peak NMS, TopK, box maths) stay fp32;
* inside the network only ops on an allow-list go fp16; reductions (global pooling, Reduce*), Exp/Log/
  Softmax, and DeformConv (sampling coordinates need more than fp16's 11 bits) stay fp32;
* fp16 weights are stored once; a tensor crossing between precisions gets exactly one Cast.

ONNX Runtime's CPU provider runs such a graph by casting around ops that lack an fp16 kernel and then
removes most of the fp16 round trips between neighbouring ops, so its results are closer to fp32 than a
GPU's would be. :func:`simulate_fp16` builds the honest stand-in for measuring fp16 accuracy on CPU: the
fp32 graph with fp16-rounded weights and every fp16 op's result rounded to fp16 (fp32 math inside an op,
fp16 between ops, as TensorRT's fp16 kernels do).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from centernet_edge.runtime.onnx_graph import consumers, initializers, tensor_types, topological_sort, unique_name

from .placement import GraphRegions, graph_regions

__all__ = ["FP16_OPS", "KEEP_FP32_OPS", "convert_fp16", "fp16_nodes", "simulate_fp16"]

# Op -> indices of inputs that take the float data type T (None: all inputs). Other inputs (Resize
# scales, shapes, axes) keep their own types.
FP16_OPS: dict[str, tuple[int, ...] | None] = {
    "Conv": None, "ConvTranspose": None, "MatMul": None, "Gemm": None, "BatchNormalization": None,
    "Add": None, "Sub": None, "Mul": None, "Div": None, "Max": None, "Min": None,
    "Relu": None, "LeakyRelu": None, "PRelu": None, "Clip": None, "HardSigmoid": None, "HardSwish": None,
    "Sigmoid": None, "Tanh": None, "Neg": None, "Abs": None,
    "MaxPool": None, "AveragePool": None, "Concat": None, "Identity": None,
    "Resize": (0,), "Upsample": (0,), "Reshape": (0,), "Transpose": (0,), "Flatten": (0,),
    "Squeeze": (0,), "Unsqueeze": (0,), "Slice": (0,), "Split": (0,), "Expand": (0,), "Tile": (0,),
    "Pad": (0, 2), "Gather": (0,), "Where": (1, 2),
}
# Documented, not consulted: anything off FP16_OPS stays fp32; these are the ones that matter.
KEEP_FP32_OPS = frozenset({
    "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2", "Exp", "Log",
    "Softmax", "LogSoftmax", "Pow", "Sqrt", "TopK", "DeformConv", "Cast", "Constant",
})


def fp16_nodes(model: onnx.ModelProto, regions: GraphRegions | None = None,
               keep_fp32: Iterable[str] = ()) -> set[str]:
    """Names of the nodes that run in fp16: allow-listed ops of the network region on float32 data."""
    regions = regions or graph_regions(model)
    types = tensor_types(model)
    keep = set(keep_fp32)
    chosen = set()
    for node in model.graph.node:
        if node.name not in regions.network or node.name in keep or node.op_type not in FP16_OPS:
            continue
        data = _data_inputs(node)
        if data and all(types.get(node.input[i]) == TensorProto.FLOAT for i in data) and all(
            types.get(o) == TensorProto.FLOAT for o in node.output if o
        ):
            chosen.add(node.name)
    return chosen


def _data_inputs(node: onnx.NodeProto) -> list[int]:
    indices = FP16_OPS[node.op_type]
    candidates = range(len(node.input)) if indices is None else indices
    return [i for i in candidates if i < len(node.input) and node.input[i]]


def convert_fp16(model: onnx.ModelProto, regions: GraphRegions | None = None,
                 keep_fp32: Iterable[str] = ()) -> onnx.ModelProto:
    """A copy of ``model`` whose network runs in fp16 (see module docstring); IO names/dtypes unchanged."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    half = fp16_nodes(out, regions or graph_regions(out), keep_fp32)
    inits = initializers(graph)
    cons = consumers(graph)
    graph_outputs = {o.name for o in graph.output}
    taken = {o for n in graph.node for o in n.output} | set(inits) | {i.name for i in graph.input}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    half_init: dict[str, str] = {}
    to_half: dict[str, str] = {}
    renamed: dict[str, str] = {}

    # Outputs of fp16 nodes get new names; the old name is re-created by a Cast only where fp32 readers
    # (or the graph output) need it.
    for node in graph.node:
        if node.name not in half:
            continue
        for i, name in enumerate(node.output):
            if not name:
                continue
            new = unique_name(f"{name}__fp16", taken)
            renamed[name] = new
            node.output[i] = new
            if name in graph_outputs or any(c.name not in half for c in cons.get(name, [])):
                cast_name = unique_name(f"{name}__to_fp32", taken)
                new_nodes.append(helper.make_node("Cast", [new], [name], name=cast_name,
                                                  to=TensorProto.FLOAT))

    for node in graph.node:
        if node.name not in half:
            continue
        for i in _data_inputs(node):
            name = node.input[i]
            if name in renamed:
                node.input[i] = renamed[name]
            elif name in inits:
                if name not in half_init:
                    half_init[name] = unique_name(f"{name}__fp16", taken)
                    value = numpy_helper.to_array(inits[name]).astype(np.float16)
                    new_inits.append(numpy_helper.from_array(value, half_init[name]))
                node.input[i] = half_init[name]
            else:
                if name not in to_half:
                    to_half[name] = unique_name(f"{name}__to_fp16", taken)
                    new_nodes.append(helper.make_node("Cast", [name], [to_half[name]], name=to_half[name],
                                                      to=TensorProto.FLOAT16))
                node.input[i] = to_half[name]

    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    used = {n for node in graph.node for n in node.input}
    kept = [init for init in graph.initializer if init.name in used or init.name not in half_init]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    # Stale fp32 value_info for renamed tensors would contradict the new types; ORT re-infers them.
    del graph.value_info[:]
    topological_sort(graph)
    return out


def simulate_fp16(model: onnx.ModelProto, regions: GraphRegions | None = None,
                  keep_fp32: Iterable[str] = ()) -> onnx.ModelProto:
    """fp32 graph that rounds exactly where the fp16 model does (see module docstring); for measuring."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    half = fp16_nodes(out, regions or graph_regions(out), keep_fp32)
    inits = initializers(graph)
    taken = {o for n in graph.node for o in n.output} | set(inits) | {i.name for i in graph.input}
    rounded_inits: set[str] = set()
    rounded_inputs: dict[str, str] = {}
    produced_half = {o for n in graph.node if n.name in half for o in n.output if o}
    new_nodes: list[onnx.NodeProto] = []

    def round_trip(src: str, dst: str) -> None:
        mid = unique_name(f"{dst}__as_fp16", taken)
        new_nodes.append(helper.make_node("Cast", [src], [mid], name=mid, to=TensorProto.FLOAT16))
        new_nodes.append(helper.make_node("Cast", [mid], [dst], name=unique_name(f"{dst}__back", taken),
                                          to=TensorProto.FLOAT))

    for node in graph.node:
        if node.name not in half:
            continue
        for i in _data_inputs(node):
            name = node.input[i]
            if name in inits and name not in rounded_inits:
                value = numpy_helper.to_array(inits[name])
                rounded = value.astype(np.float16).astype(np.float32)
                inits[name].CopyFrom(numpy_helper.from_array(rounded, name))
                rounded_inits.add(name)
            elif name not in inits and name not in produced_half:
                # an fp32 tensor entering the fp16 region is rounded once, like the fp16 model's Cast
                if name not in rounded_inputs:
                    rounded_inputs[name] = unique_name(f"{name}__fp16_in", taken)
                    round_trip(name, rounded_inputs[name])
                node.input[i] = rounded_inputs[name]
        for i, name in enumerate(node.output):
            if name:
                raw = unique_name(f"{name}__fp32_raw", taken)
                node.output[i] = raw
                round_trip(raw, name)
    graph.node.extend(new_nodes)
    del graph.value_info[:]
    topological_sort(graph)
    return out
