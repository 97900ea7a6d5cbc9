"""Small ONNX graph helpers shared by the quantization passes (naming, lookup maps, ordering).

They work on ``onnx.ModelProto`` in place and know nothing about quantization, so every pass (QDQ, fp16,
ORT int8, sensitivity) sees the graph the same way and refers to nodes by the same names.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = [
    "FLOAT_TYPES",
    "constant_array",
    "consumers",
    "default_opset",
    "ensure_node_names",
    "initializers",
    "producers",
    "remove_dead_nodes",
    "tensor_types",
    "topological_sort",
    "unique_name",
]

FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})


def ensure_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node a unique, non-empty name.

    Precision decisions are stored by node name; exporters often leave names empty or repeated, so the
    names are made unique once here and every artifact built from this model shares them.
    """
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{index}"
        if name in seen:
            name = unique_name(f"{name}_{index}", seen)
        node.name = name
        seen.add(name)
    return model


def unique_name(base: str, taken: set[str]) -> str:
    """``base`` or ``base_N`` for the first N that is not in ``taken`` (the result is added to it)."""
    name, n = base, 1
    while name in taken:
        name = f"{base}_{n}"
        n += 1
    taken.add(name)
    return name


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError("the model imports no default ONNX opset")


def initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in graph.initializer}


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    result: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                result[name].append(node)
    return result


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type ONNX shape inference can tell (initializers included)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is best-effort: unknown custom ops must not stop quantization
        inferred = model
    graph = inferred.graph
    types: dict[str, int] = {}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def constant_array(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of an initializer or Constant-node output, else None."""
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def topological_sort(graph: onnx.GraphProto, extra_known: Iterable[str] = ()) -> None:
    """Reorder ``graph.node`` so every node follows the producers of its inputs (stable otherwise).

    Passes append their new nodes at the end; ONNX requires topological order, so they sort once after.
    """
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | set(extra_known) | {""}
    nodes = list(graph.node)
    producer_index = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waiting: dict[int, int] = {}
    dependants: dict[int, list[int]] = defaultdict(list)
    for i, node in enumerate(nodes):
        deps = {producer_index[name] for name in _node_inputs(node)
                if name not in known and name in producer_index}
        deps.discard(i)
        waiting[i] = len(deps)
        for d in deps:
            dependants[d].append(i)
    # A heap of original positions keeps already-ordered graphs unchanged and the output deterministic.
    heap = [i for i in range(len(nodes)) if waiting[i] == 0]
    heapq.heapify(heap)
    order: list[int] = []
    while heap:
        i = heapq.heappop(heap)
        order.append(i)
        for j in dependants[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(heap, j)
    if len(order) != len(nodes):
        stuck = [nodes[i].name for i in range(len(nodes)) if waiting[i] > 0][:5]
        raise ValueError(f"graph has a cycle or a missing producer near nodes {stuck}")
    sorted_nodes = [nodes[i] for i in order]
    del graph.node[:]
    graph.node.extend(sorted_nodes)


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    """Inputs of a node, including names its subgraphs (If/Loop bodies) read from the outer scope."""
    names = list(node.input)
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            inner = {o for n in sub.node for o in n.output} | {i.name for i in sub.input}
            inner |= {i.name for i in sub.initializer}
            for n in sub.node:
                names.extend(x for x in _node_inputs(n) if x and x not in inner)
    return names


def remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads, and initializers no node reads (in place)."""
    wanted = {o.name for o in model.graph.output}
    changed = True
    while changed:
        read = wanted | {i for n in model.graph.node for i in n.input}
        dead = [n for n in model.graph.node if not any(o in read for o in n.output if o)]
        for node in dead:
            model.graph.node.remove(node)
        changed = bool(dead)
    read = {i for n in model.graph.node for i in n.input} | wanted
    unused = [i for i in model.graph.initializer if i.name not in read]
    for init in unused:
        model.graph.initializer.remove(init)
