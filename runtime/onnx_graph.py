"""The project's one ONNX graph toolkit: naming, lookup maps, constants, types, ordering, pruning and the
small clean-ups every graph edit ends with.

Export's rewrites (``export/optimize.py``, ``export/onnx_export.py``), the TensorRT op check and every
quantization pass (Q/DQ, fp16, CPU int8, statistics, sensitivity) edit ``onnx.ModelProto`` through these,
so they see a graph the same way and refer to nodes by the same names. Nothing here knows about CenterNet
or quantization. (``export/torch_ops.py`` is the other kind of graph: torch modules that render the
pre/post-processing for the exporter.)
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = [
    "FLOAT_TYPES",
    "attribute",
    "attributes",
    "constant_array",
    "constants",
    "constants_to_initializers",
    "consumers",
    "default_opset",
    "drop_outputs",
    "ensure_node_names",
    "fold_identities",
    "initializers",
    "is_depthwise_conv",
    "producers",
    "prune_to_outputs",
    "remove_dead_nodes",
    "replace_nodes",
    "tensor_types",
    "topological_sort",
    "unique_name",
    "without_weights",
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


def attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def attribute(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def is_depthwise_conv(node: onnx.NodeProto, weight_dims: Mapping[str, Sequence[int]],
                      multiplier: bool = False) -> bool:
    """A Conv with one input channel per group (``group > 1``) and an initializer weight named in
    ``weight_dims`` (name -> dims); exactly one output channel per group unless ``multiplier`` allows a
    depth multiplier."""
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in weight_dims:
        return False
    dims = list(weight_dims[node.input[1]])
    group = int(attribute(node, "group", 1))  # type: ignore[call-overload]
    return group > 1 and len(dims) >= 2 and dims[1] == 1 and (multiplier or dims[0] == group)


def without_weights(model: onnx.ModelProto, keep_elements: int = 4096) -> onnx.ModelProto:
    """A copy for shape inference whose large initializers became typed graph inputs.

    Copying hourglass_104 whole would duplicate 760 MB of weights; small constants (shapes, axes, K) keep
    their values because inference propagates them.
    """
    light = onnx.ModelProto()
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(light, name, getattr(model, name))
    light.opset_import.extend(model.opset_import)
    graph = light.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    for init in model.graph.initializer:
        if int(np.prod(init.dims)) <= keep_elements:
            graph.initializer.append(init)
        else:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor whose type ONNX shape inference can tell (initializers included).

    Best effort: a graph inference cannot handle (unknown custom ops) yields what is declared."""
    try:
        inferred = onnx.shape_inference.infer_shapes(without_weights(model), strict_mode=False)
    except Exception:  # inference is best-effort: unknown custom ops must not stop the caller
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


def constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant-node values by tensor name."""
    found = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = attribute(node, "value")
            if isinstance(value, onnx.TensorProto):
                found[node.output[0]] = value
    return found


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
    """Drop nodes whose outputs nobody reads, then initializers no node reads and value_info entries of
    tensors nothing produces any more (in place)."""
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
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    stale = [v for v in model.graph.value_info if v.name not in produced]
    for info in stale:
        model.graph.value_info.remove(info)


def replace_nodes(graph: onnx.GraphProto, replaced: dict[int, list[onnx.NodeProto]],
                  removed: Iterable[int] = ()) -> None:
    """Rebuild the node list in one pass: the node with ``id(node)`` in ``replaced`` becomes that list of
    nodes (in its place), nodes whose id is in ``removed`` disappear."""
    removed = set(removed)
    nodes = []
    for node in graph.node:
        key = id(node)
        if key in replaced:
            nodes.extend(replaced[key])
        elif key not in removed:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def prune_to_outputs(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` computing only ``outputs`` (unused nodes, initializers and inputs removed)."""
    graph = model.graph
    producer = producers(graph)
    known = {i.name for i in graph.input} | {i.name for i in graph.initializer} | set(producer)
    missing = [o for o in outputs if o not in known]
    if missing:
        raise ValueError(f"tensors not in the graph: {', '.join(missing[:5])}")
    needed: set[str] = set()
    keep_nodes: set[int] = set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in keep_nodes:
            keep_nodes.add(id(node))
            stack.extend(x for x in _node_inputs(node) if x)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    g = pruned.graph
    kept = [n for n in graph.node if id(n) in keep_nodes]
    del g.node[:]
    g.node.extend(kept)
    inits = [i for i in graph.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    inputs = [i for i in graph.input if i.name in needed]
    del g.input[:]
    g.input.extend(inputs)
    del g.output[:]
    g.output.extend(onnx.ValueInfoProto(name=o) for o in outputs)
    return pruned


def drop_outputs(model: onnx.ModelProto, names: Iterable[str]) -> None:
    """Remove the named graph outputs (the nodes stay; :func:`remove_dead_nodes` clears what is unread)."""
    names = set(names)
    kept = [o for o in model.graph.output if o.name not in names]
    del model.graph.output[:]
    model.graph.output.extend(kept)


def constants_to_initializers(model: onnx.ModelProto) -> None:
    """Turn ``Constant`` nodes into initializers named after their outputs (unique in the graph).

    TensorRT's TopK needs K as an initializer, and static shapes/axes are easier for every parser to
    see that way.
    """
    graph = model.graph
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1 \
                and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def fold_identities(model: onnx.ModelProto) -> None:
    """Bypass ``Identity`` nodes that do not produce a graph output (exporters add them when they
    de-duplicate equal initializers)."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    rename = {n.output[0]: n.input[0] for n in graph.node
              if n.op_type == "Identity" and n.output[0] not in outputs}
    if not rename:
        return

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in rename)]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = resolve(name)
    del graph.node[:]
    graph.node.extend(kept)
