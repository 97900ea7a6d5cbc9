"""Which tensors get calibration ranges: the activations around quantizable ops in the network proper.

The rule (applied to any CenterNet export, ours or foreign):

1. *Anchors* are the Conv / ConvTranspose nodes. The **network** is every node that is reachable from an
   anchor (the anchor included) *and* from which some **head anchor** is reachable, where a head anchor
   is an anchor with no anchor downstream of it (the last conv of each head).
2. Hence in-graph pre-processing (cast, warp, colour swap, normalisation, layout transposes: everything
   upstream of the first convs) is outside, and so is the decode tail (heatmap sigmoid, 3x3 max-pool
   peak test, Equal/Cast, TopK, Gather, box arithmetic, output scaling and transposes after the head
   convs). The tail stays fp32 anyway (see REFERENCE §0 item 10) and its bool/int tensors must never
   get int8 ranges.
3. For each network node whose op is in :data:`QUANTIZABLE_OPS`, the calibrated tensors are its data
   inputs (weights, biases, shapes, scales and other constants excluded) and its outputs, provided they
   are float activations, i.e. computed from a graph input through something other than Shape/Size.
   The first conv's input (the normalised image) is therefore included; the head convs' outputs (raw
   logits/regressions) are too.

Names are ONNX value names, which is what TensorRT's ONNX parser names its tensors, so they can go into a
TensorRT calibration cache unchanged. Order: first appearance in the graph's (topological) node order.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable

import onnx

from centernet_edge.runtime.spec import ModelSpec

__all__ = ["ANCHOR_OPS", "QUANTIZABLE_OPS", "calibration_tensors", "network_nodes"]

ANCHOR_OPS = frozenset({"Conv", "ConvTranspose"})

# Ops TensorRT (and ModelOpt's int8 rules) can run in int8 or fuse into an int8 neighbour, mapped to the
# input positions that carry activations (None: every input).
_DATA_INPUTS: dict[str, tuple[int, ...] | None] = {
    "Conv": (0,), "ConvTranspose": (0,), "MatMul": (0, 1), "Gemm": (0, 1),
    "Add": None, "Sub": None, "Mul": None, "Concat": None,
    "MaxPool": (0,), "AveragePool": (0,), "GlobalAveragePool": (0,), "GlobalMaxPool": (0,),
    "Relu": (0,), "LeakyRelu": (0,), "PRelu": (0,), "Clip": (0,), "Sigmoid": (0,),
    "HardSigmoid": (0,), "HardSwish": (0,), "BatchNormalization": (0,), "Resize": (0,), "Upsample": (0,),
}
QUANTIZABLE_OPS = frozenset(_DATA_INPUTS)

# Outputs of these depend only on shapes, never on pixel values.
_SHAPE_OPS = frozenset({"Shape", "Size"})
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                          onnx.TensorProto.BFLOAT16})


def _subgraph_inputs(node: onnx.NodeProto) -> list[str]:
    # Nodes with subgraphs (If/Loop/Scan) read outer-scope values that are not listed as their inputs.
    names: list[str] = []
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for sub in g.node:
                names.extend(i for i in sub.input if i)
                names.extend(_subgraph_inputs(sub))
    return names


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    return [i for i in node.input if i] + _subgraph_inputs(node)


def _reachable(start: Iterable[int], edges: dict[int, list[int]]) -> set[int]:
    seen = set(start)
    queue = deque(seen)
    while queue:
        for nxt in edges[queue.popleft()]:
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return seen


def network_nodes(graph: onnx.GraphProto) -> list[int]:
    """Indices (in graph order) of the nodes forming the network part, per the module rule."""
    producer = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    children: dict[int, list[int]] = defaultdict(list)
    parents: dict[int, list[int]] = defaultdict(list)
    for i, node in enumerate(graph.node):
        for name in _node_inputs(node):
            if name in producer:
                parents[i].append(producer[name])
                children[producer[name]].append(i)
    anchors = [i for i, n in enumerate(graph.node) if n.op_type in ANCHOR_OPS]
    if not anchors:
        raise ValueError(
            "the graph has no Conv/ConvTranspose node: cannot tell the network from pre/post-processing"
        )
    after_anchor = _reachable(anchors, children)
    # Graph order is topological, so one backward sweep tells which nodes have an anchor downstream.
    anchor_below = [False] * len(graph.node)
    for i in reversed(range(len(graph.node))):
        anchor_below[i] = any(graph.node[c].op_type in ANCHOR_OPS or anchor_below[c] for c in children[i])
    heads = [a for a in anchors if not anchor_below[a]]
    before_head = _reachable(heads, parents)
    return sorted(after_anchor & before_head)


def _activations(graph: onnx.GraphProto) -> set[str]:
    """Value names computed from a graph input other than through Shape/Size (so: pixel-dependent)."""
    constant = {init.name for init in graph.initializer}
    live = {vi.name for vi in graph.input if vi.name not in constant}
    for node in graph.node:  # graph order is topological (ONNX requirement)
        if node.op_type in _SHAPE_OPS or node.op_type == "Constant":
            continue
        if any(name in live for name in _node_inputs(node)):
            live.update(o for o in node.output if o)
    return live


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is only a filter; an exotic graph should still calibrate
        inferred = model
    g = inferred.graph
    types = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def calibration_tensors(model: onnx.ModelProto, spec: ModelSpec | None = None) -> list[str]:
    """The activation tensors to calibrate (inputs/outputs of quantizable ops in the network part).

    ``spec`` (when given) is checked against the graph: its input must be a graph input, so a model and
    a description of some other model are not silently combined.
    """
    graph = model.graph
    if spec is not None:
        names = {vi.name for vi in graph.input}
        if spec.graph.input.name not in names:
            raise ValueError(
                f"the model spec's input {spec.graph.input.name!r} is not an input of this graph "
                f"(inputs: {sorted(names)})"
            )
    live = _activations(graph)
    types = _elem_types(model)

    def wanted(name: str) -> bool:
        return bool(name) and name in live and types.get(name, onnx.TensorProto.FLOAT) in _FLOAT_TYPES

    picked: dict[str, None] = {}
    for i in network_nodes(graph):
        node = graph.node[i]
        if node.op_type not in QUANTIZABLE_OPS:
            continue
        positions = _DATA_INPUTS[node.op_type]
        if positions is None:
            inputs = list(node.input)
        else:
            inputs = [node.input[p] for p in positions if p < len(node.input)]
        for name in inputs + list(node.output):
            if wanted(name):
                picked.setdefault(name, None)
    return list(picked)
