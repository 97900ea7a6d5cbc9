"""Cross-layer equalization (Nagel et al., 2019): balance per-channel weight ranges across conv pairs.

Per-channel int8 weights cope with channels of different ranges, but the activation between two convs
has one per-tensor range: a channel whose values are 100x smaller than its neighbours' is rounded to a
handful of levels. For ``conv1 -> f -> conv2`` where ``f(s * x) = s * f(x)`` for every positive ``s``,
scaling output channel ``i`` of conv1 (weights and bias) by ``1/s_i`` and input channel ``i`` of conv2 by
``s_i`` leaves the function unchanged; ``s_i = sqrt(r1_i / r2_i)`` (``r1_i``: range of conv1's output
channel ``i`` weights, ``r2_i``: range of conv2's input channel ``i`` weights) gives both the same range
``sqrt(r1_i * r2_i)``, which also evens out the activation channels. A few sweeps over all pairs converge.

Where ``f`` commutes with positive per-channel scaling:

* identity and ReLU (``max(s x, 0) = s max(x, 0)``): equalized;
* ReLU6 / Clip: ``min(max(s x, 0), 6) != s min(max(x, 0), 6)`` -- the upper bound would have to become
  ``6 / s_i`` per channel, which Clip cannot express, so such pairs are left alone;
* hard-swish ``x * relu6(x + 3) / 6`` and sigmoid / hard-sigmoid gates (squeeze-excite): not positively
  homogeneous (the ``+ 3`` offset and the sigmoid's fixed shape), so no scaling passes through them;
  mb3's blocks are of this kind and are not touched;
* BatchNormalization between the convs: must be folded first (our exporter folds Conv+BN); an unfolded
  BN is not a scaling-commuting op here and the pair is skipped.

conv2 must be a dense conv (``group == 1``): scaling a depthwise conv's input channel scales its output
channel, which would have to be undone further on. conv1 may be grouped or depthwise (its output channel
``i`` is weight row ``i``). Every tensor between the two must have no other reader.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from centernet_edge.runtime.onnx_graph import attribute, consumers, initializers, unique_name

__all__ = ["EqualizedPair", "equalizable_pairs", "equalize"]

_COMMUTING = ("Relu", "Identity")


@dataclass(frozen=True)
class EqualizedPair:
    first: str
    second: str
    activation: str  # "Relu", "Identity" or "" (conv2 reads conv1 directly)


def _single_use(name: str, cons: dict[str, list[onnx.NodeProto]], outputs: set[str]) -> onnx.NodeProto | None:
    readers = cons.get(name, [])
    return readers[0] if len(readers) == 1 and name not in outputs else None


def _weight_ok(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], uses: dict[str, int]) -> bool:
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits or uses[node.input[1]] != 1:
        return False
    if len(node.input) > 2 and node.input[2] and node.input[2] not in inits:
        return False  # a shared bias is fine: conv1 gets a private copy before it is rescaled
    return len(inits[node.input[1]].dims) == 4


def equalizable_pairs(model: onnx.ModelProto) -> list[EqualizedPair]:
    """The ``conv1 -> [Relu | Identity] -> conv2`` chains equalization may rescale (module docstring)."""
    graph = model.graph
    cons = consumers(graph)
    inits = initializers(graph)
    outputs = {o.name for o in graph.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    pairs: list[EqualizedPair] = []
    for node in graph.node:
        if not _weight_ok(node, inits, uses):
            continue
        nxt = _single_use(node.output[0], cons, outputs)
        activation = ""
        if nxt is not None and nxt.op_type in _COMMUTING:
            activation = nxt.op_type
            nxt = _single_use(nxt.output[0], cons, outputs)
        if nxt is None or not _weight_ok(nxt, inits, uses) or int(attribute(nxt, "group", 1)) != 1:  # type: ignore[arg-type]
            continue
        if nxt.input[0] == node.input[0]:
            continue
        pairs.append(EqualizedPair(node.name, nxt.name, activation))
    return pairs


def _private_biases(model: onnx.ModelProto, convs: list[onnx.NodeProto]) -> None:
    """Give each of ``convs`` a bias initializer of its own (exporters share equal constants, e.g. zeros)."""
    inits = initializers(model.graph)
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    taken = set(inits) | {o for n in model.graph.node for o in n.output}
    for node in convs:
        if len(node.input) > 2 and node.input[2] and uses[node.input[2]] > 1:
            name = unique_name(f"{node.name}_bias", taken)
            model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[node.input[2]]), name))
            uses[node.input[2]] -= 1
            node.input[2] = name


def equalize(model: onnx.ModelProto, sweeps: int = 4) -> tuple[onnx.ModelProto, list[EqualizedPair]]:
    """A copy of ``model`` with every equalizable pair rescaled (``sweeps`` passes); the same function."""
    out = copy.deepcopy(model)
    pairs = equalizable_pairs(out)
    if not pairs:
        return out, pairs
    nodes = {n.name: n for n in out.graph.node}
    _private_biases(out, [nodes[p.first] for p in pairs])
    index = {init.name: i for i, init in enumerate(out.graph.initializer)}
    arrays = {name: numpy_helper.to_array(out.graph.initializer[i]).astype(np.float64) for name, i in index.items()
              if any(name in nodes[p.first].input or name in nodes[p.second].input for p in pairs)}
    for _ in range(max(1, sweeps)):
        for pair in pairs:
            first, second = nodes[pair.first], nodes[pair.second]
            w1, w2 = arrays[first.input[1]], arrays[second.input[1]]
            r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
            r2 = np.abs(w2).transpose(1, 0, 2, 3).reshape(w2.shape[1], -1).max(axis=1)
            if r1.shape != r2.shape:
                continue  # conv2 does not read conv1's channels one to one (cannot happen with group 1)
            scale = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1.0)), 1.0)
            arrays[first.input[1]] = w1 / scale[:, None, None, None]
            if len(first.input) > 2 and first.input[2]:
                arrays[first.input[2]] = arrays[first.input[2]] / scale
            arrays[second.input[1]] = w2 * scale[None, :, None, None]
    for name, value in arrays.items():
        out.graph.initializer[index[name]].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return out, pairs
