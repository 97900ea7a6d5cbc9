"""Which nodes of a CenterNet graph may run in reduced precision, and where their Q/DQ pairs go.

The graph is split into three regions without looking at names (foreign exporters name nodes freely):

* pre-processing: nodes downstream of the graph input but upstream of every weighted op (uint8 casts,
  colour swap, mean/std, warps). Quantizing them would quantize the raw image itself;
* network: nodes that are both downstream of some weighted op and upstream of another one (or weighted
  themselves). Only these are candidates;
* decode tail: everything downstream of the last weighted ops: heatmap sigmoid, 3x3 peak NMS, TopK, box
  maths, head scaling. These decide which peaks survive and stay float.

Within the network, eligible layers follow TensorRT's explicit-quantization placement rules: Q/DQ on the
activation inputs and weights of Conv/ConvTranspose/MatMul/Gemm, on the input of pooling layers, and on the
residual (skip) input of a two-activation Add so the Add can fuse into the producing convolution.
DeformConv is never an eligible layer and never receives a Q/DQ input: TensorRT's plugin has no int8 path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx

from centernet_edge.runtime.onnx_graph import FLOAT_TYPES, consumers, initializers, producers, tensor_types

__all__ = [
    "FLOAT_ONLY_OPS",
    "GraphRegions",
    "Placement",
    "QuantLayer",
    "WEIGHTED_OPS",
    "graph_regions",
    "plan_placement",
]

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
POOL_OPS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool"})
RESIDUAL_OPS = frozenset({"Add"})
# Ops that anchor the network region but must stay float (and get no Q/DQ on their inputs).
FLOAT_ONLY_OPS = frozenset({"DeformConv"})
ANCHOR_OPS = WEIGHTED_OPS | FLOAT_ONLY_OPS


@dataclass(frozen=True)
class GraphRegions:
    """Node names per region; ``constant`` holds nodes that depend on no graph input (weight reshapes)."""

    preprocess: frozenset[str]
    network: frozenset[str]
    decode: frozenset[str]
    constant: frozenset[str]

    def region_of(self, node_name: str) -> str:
        for label in ("preprocess", "network", "decode", "constant"):
            if node_name in getattr(self, label):
                return label
        raise KeyError(node_name)


@dataclass(frozen=True)
class QuantLayer:
    """One quantizable node: the activation tensors that get a Q/DQ pair and its weight, if any.

    ``weight_axis`` is the output-channel axis of the weight (per-channel scales run along it).
    """

    name: str
    op_type: str
    inputs: tuple[str, ...]
    weight: str | None = None
    weight_axis: int | None = None


@dataclass
class Placement:
    """Eligible layers in graph order plus, for every other node, why it stays float."""

    layers: list[QuantLayer]
    excluded: dict[str, str] = field(default_factory=dict)
    regions: GraphRegions | None = None

    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def select(self, keep_float: Iterable[str] = ()) -> list[QuantLayer]:
        """The layers that go int8 when ``keep_float`` (layer names) stay in float."""
        keep = set(keep_float)
        unknown = sorted(keep - set(self.names()))
        if unknown:
            more = " ..." if len(unknown) > 5 else ""
            raise KeyError(f"not eligible layers: {', '.join(unknown[:5])}{more}")
        return [layer for layer in self.layers if layer.name not in keep]

    def activation_tensors(self, layers: Iterable[QuantLayer] | None = None) -> list[str]:
        """Activation tensors that need a calibrated range, in first-use order."""
        seen: dict[str, None] = {}
        for layer in self.layers if layers is None else layers:
            for name in layer.inputs:
                seen.setdefault(name, None)
        return list(seen)


def _walk(start: Iterable[str], edges: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    stack = list(start)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        stack.extend(edges.get(name, ()))
    return seen


def graph_regions(model: onnx.ModelProto) -> GraphRegions:
    """Split the graph's nodes into pre-processing / network / decode tail / constant (see module doc)."""
    graph = model.graph
    prod = producers(graph)
    cons = consumers(graph)
    down: dict[str, set[str]] = {n.name: {c.name for o in n.output for c in cons.get(o, [])}
                                 for n in graph.node}
    up: dict[str, set[str]] = {n.name: {prod[i].name for i in n.input if i in prod} for n in graph.node}
    anchors = [n.name for n in graph.node if n.op_type in ANCHOR_OPS]
    init_names = {i.name for i in graph.initializer}
    graph_inputs = [i.name for i in graph.input if i.name not in init_names]
    fed = _walk([c.name for name in graph_inputs for c in cons.get(name, [])], down)
    all_nodes = {n.name for n in graph.node}
    if not anchors:
        return GraphRegions(frozenset(), frozenset(), frozenset(fed), frozenset(all_nodes - fed))
    after = _walk(anchors, down)
    before = _walk(anchors, up)
    network = after & before
    preprocess = (before - after) & fed
    decode = (after - before) | (fed - before - after)
    constant = all_nodes - network - preprocess - decode
    return GraphRegions(frozenset(preprocess), frozenset(network), frozenset(decode), frozenset(constant))


def _weight_axis(node: onnx.NodeProto, rank: int) -> int | None:
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        # ConvTranspose weights are (C_in, C_out/group, k...): per-output-channel needs group == 1.
        return 1 if groups == 1 else None
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return rank - 1 if rank >= 2 else None
    return None


def plan_placement(model: onnx.ModelProto, regions: GraphRegions | None = None) -> Placement:
    """Eligible layers (in graph order) and exclusion reasons for a model with unique node names."""
    graph = model.graph
    regions = regions or graph_regions(model)
    inits = initializers(graph)
    prod = producers(graph)
    types = tensor_types(model)
    order = {n.name: i for i, n in enumerate(graph.node)}

    def is_activation(name: str) -> bool:
        return bool(name) and name not in inits and types.get(name) in FLOAT_TYPES and not (
            name in prod and prod[name].op_type == "Constant"
        )

    layers: list[QuantLayer] = []
    excluded: dict[str, str] = {}
    for node in graph.node:
        region = regions.region_of(node.name)
        if region != "network":
            excluded[node.name] = {"preprocess": "pre-processing", "decode": "decode tail",
                                   "constant": "constant subgraph"}[region]
            continue
        if node.op_type in FLOAT_ONLY_OPS:
            excluded[node.name] = f"{node.op_type} has no int8 implementation (TensorRT plugin is fp32/fp16)"
            continue
        if node.op_type in WEIGHTED_OPS:
            if len(node.input) < 2 or not is_activation(node.input[0]):
                excluded[node.name] = "data input is not a float activation"
                continue
            weight = node.input[1]
            init = inits.get(weight)
            if init is None or init.data_type != onnx.TensorProto.FLOAT:
                excluded[node.name] = "weight is not a float32 initializer"
                continue
            axis = _weight_axis(node, len(init.dims))
            if axis is None:
                excluded[node.name] = "no per-output-channel weight axis (grouped ConvTranspose, 1-D MatMul)"
                continue
            layers.append(QuantLayer(node.name, node.op_type, (node.input[0],), weight, axis))
        elif node.op_type in POOL_OPS:
            if is_activation(node.input[0]):
                layers.append(QuantLayer(node.name, node.op_type, (node.input[0],)))
            else:
                excluded[node.name] = "input is not a float activation"
        elif node.op_type in RESIDUAL_OPS:
            if len(node.input) == 2 and all(is_activation(i) for i in node.input):
                layers.append(QuantLayer(node.name, node.op_type, (_residual_input(node, prod, order),)))
            else:
                excluded[node.name] = "not a residual Add (one input is a constant)"
        else:
            excluded[node.name] = f"{node.op_type} is not quantized (TensorRT fuses or runs it in float)"
    return Placement(layers, excluded, regions)


def _residual_input(node: onnx.NodeProto, prod: dict[str, onnx.NodeProto], order: dict[str, int]) -> str:
    """The skip input of a residual Add.

    TensorRT fuses an Add into the weighted layer producing one input; the other (the skip) decides the
    fused output precision and is the one to quantize. A non-weighted producer marks the skip; when both
    come from weighted layers the older one (earlier in graph order) is the skip connection.
    """
    a, b = node.input[0], node.input[1]
    a_weighted = a in prod and prod[a].op_type in WEIGHTED_OPS
    b_weighted = b in prod and prod[b].op_type in WEIGHTED_OPS
    if a_weighted != b_weighted:
        return b if a_weighted else a
    pos_a = order.get(prod[a].name, -1) if a in prod else -1
    pos_b = order.get(prod[b].name, -1) if b in prod else -1
    return a if pos_a <= pos_b else b
