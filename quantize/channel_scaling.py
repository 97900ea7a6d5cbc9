"""Per-channel activation scaling at depthwise-conv inputs: even out the channels one int8 range serves.

An activation gets one int8 range per tensor (TensorRT's and ONNX Runtime's rule), so a channel whose
values span 0.3 next to channels spanning 35 is rounded to one or two levels. A dense conv reading that
tensor averages such rounding over all its input channels; a depthwise conv does not: output channel
``c`` sees only input channel ``c``, and batch-norm folding often gives exactly the narrow channels the
largest gains. On mb3 these depthwise inputs carry most of the all-int8 error (``layer_error.md``; the
stem's 16-channel hard-swish output alone: all-int8 head error 0.57 -> 0.41 when only it stays float).

For a depthwise conv the fix is exact: divide input channel ``c`` by ``s_c`` and multiply the depthwise
weights of channel ``c`` by ``s_c``. The depthwise output is unchanged and its per-channel int8 weights
do not care (each channel has a scale of its own). Where the division happens:

* **folded** (free): the region of tensors that must carry the same factors is grown from the depthwise
  input through ReLU / MaxPool (``f(x / s) = f(x) / s`` for ``s > 0``) up to the convs that make it, whose
  output channels are divided, and to the convs that read it, whose input channels are multiplied. A
  hard-swish ``y * k * relu6(y + 3)`` between producer and depthwise is not positively homogeneous, but
  ``hs(y) / s = (y / s) * k * relu6(s * (y / s) + 3)``: the producer emits ``y / s`` and a per-channel
  ``Mul(y / s, s)`` is inserted in front of the gate's ``+ 3`` (TensorRT fuses it into the conv's
  point-wise epilogue; no int8 tensor there);
* **split** (one point-wise op): where the region meets a residual ``Add`` (the other operand and the sum
  would need the same factors: on mb3 the stem's narrow channels are wide in the sum) or an op that does
  not commute with scaling (ReLU6 / Clip with an upper bound, sigmoid, Resize, ...), a ``Mul(x, 1 / s)``
  is inserted in front of the depthwise conv only; the other readers keep ``x``. Its output is the
  depthwise conv's int8 input in the TensorRT Q/DQ graph. (In ONNX Runtime's CPU graph every tensor is
  int8, ``x`` included, so a split site helps the TensorRT model only.)

Factors come from label-free per-channel ranges on calibration images (:func:`site_factors`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from centernet_edge.runtime.onnx_graph import (
    attribute,
    constant_array,
    consumers,
    initializers,
    is_depthwise_conv,
    producers,
    prune_to_outputs,
    remove_dead_nodes,
    topological_sort,
    unique_name,
)
from centernet_edge.runtime.onnx_session import create_session

__all__ = ["MAX_STRETCH", "ScalingSite", "Source", "apply_channel_scaling", "channel_ranges", "depthwise_input_sites",
           "site_factors", "undo_split_sites"]

# A channel is stretched at most this much: a nearly dead channel is noise, not signal worth the range.
MAX_STRETCH = 64.0


@dataclass(frozen=True)
class Source:
    """A conv whose output channels are divided; ``gate``: the hard-swish gate node that gets ``Mul(s)``."""

    conv: str
    output: str  # the conv's output tensor (divided too; read by the hard-swish when there is a gate)
    gate: str = ""


@dataclass(frozen=True)
class ScalingSite:
    """A depthwise conv input and the closed set of tensors that must carry the same per-channel factors.

    A folded site's region passes through ReLU and MaxPool; it starts at ``sources`` (convs whose output
    channels are divided) and is undone by ``readers`` (convs whose input channels are multiplied, the
    depthwise conv among them). A region that reaches a residual Add becomes a split site instead: its
    ``carried`` tensor is the depthwise input alone, with no sources and the depthwise conv as reader."""

    tensor: str  # the depthwise conv's input: its per-channel ranges set the factors
    depthwise: str
    carried: tuple[str, ...]
    sources: tuple[Source, ...]
    readers: tuple[str, ...]
    split: bool = False  # a Mul(tensor, 1 / s) in front of the depthwise conv instead of a folded region

    @property
    def measured(self) -> tuple[str, ...]:
        """Every tensor the factors divide: the carried ones and the hard-swish sources' conv outputs."""
        return tuple(dict.fromkeys([*self.carried, *(s.output for s in self.sources if s.gate)]))

    @property
    def kind(self) -> str:
        if self.split:
            return "split"
        return "hardswish" if any(source.gate for source in self.sources) else "folded"


_PASS_THROUGH = ("Relu", "MaxPool")  # f(x / s) = f(x) / s for s > 0, per channel


def _readers(name: str, cons: dict[str, list[onnx.NodeProto]], outputs: set[str]) -> list[onnx.NodeProto]:
    return [] if name in outputs else cons.get(name, [])


def _conv_weight_ok(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], uses: dict[str, int]) -> bool:
    """A 2-D conv with an initializer weight only it reads (its channels may be rescaled)."""
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
        return False
    return uses.get(node.input[1], 0) == 1 and len(inits[node.input[1]].dims) == 4


def _source_conv(node: onnx.NodeProto | None, inits: dict[str, onnx.TensorProto], uses: dict[str, int]) -> bool:
    if node is None or not _conv_weight_ok(node, inits, uses):
        return False
    return len(node.input) < 3 or not node.input[2] or node.input[2] in inits


def _scalar(model: onnx.ModelProto, name: str) -> float | None:
    value = constant_array(model, name)
    if value is None or value.size != 1:
        return None
    return float(value.reshape(()))


def _hardswish_gate(model: onnx.ModelProto, y: str, readers: list[onnx.NodeProto], x: str,
                    cons: dict[str, list[onnx.NodeProto]]) -> onnx.NodeProto | None:
    """The gate node of ``x = (y * k) * relu6(y + 3)`` reading ``y``, if ``x`` is that."""
    if len(readers) != 2:
        return None
    gate = next((n for n in readers if n.op_type == "Add"), None)
    linear = next((n for n in readers if n is not gate), None)
    if gate is None or linear is None:
        return None
    offset = next((_scalar(model, i) for i in gate.input if i != y), None)
    if offset is None or abs(offset - 3.0) > 1e-6:
        return None
    clip = cons.get(gate.output[0], [])
    if len(clip) != 1 or clip[0].op_type != "Clip":
        return None
    bounds = [_scalar(model, i) if i else None for i in clip[0].input[1:3]]
    if len(bounds) != 2 or bounds[0] is None or bounds[1] is None or abs(bounds[0]) > 1e-6 \
            or abs(bounds[1] - 6.0) > 1e-6:
        return None
    chain = {linear.output[0], clip[0].output[0]}
    final = [n for n in cons.get(linear.output[0], []) if n.op_type == "Mul" and set(n.input) == chain]
    if linear.op_type == "Mul" and final and final[0].output[0] == x:
        # Any constant factor keeps the linear branch homogeneous (exporters write 1/6 as 0.16663).
        factor = next((_scalar(model, i) for i in linear.input if i != y), None)
        if factor is not None and factor > 0:
            return gate
    return None


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.inits = initializers(model.graph)
        self.dims = {name: list(init.dims) for name, init in self.inits.items()}
        self.prod = producers(model.graph)
        self.cons = consumers(model.graph)
        self.outputs = {o.name for o in model.graph.output}
        self.uses: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1

    def is_activation(self, name: str) -> bool:
        return name in self.prod and constant_array(self.model, name) is None

    def source_of(self, tensor: str) -> Source | None:
        """How ``tensor`` can be produced divided by ``s``: a conv's output, or a conv's hard-swish."""
        first = self.prod.get(tensor)
        if first is None:
            return None
        if _source_conv(first, self.inits, self.uses) and first.output[0] == tensor:
            return Source(first.name, tensor)
        if first.op_type == "Mul":
            # x = Mul(y * k, Clip(y + 3)): y is read two nodes up, through either factor.
            upstream = [i for f in first.input if f in self.prod for i in self.prod[f].input]
            for y in dict.fromkeys(upstream):
                conv = self.prod.get(y)
                if conv is None or not _source_conv(conv, self.inits, self.uses):
                    continue
                gate = _hardswish_gate(self.model, y, _readers(y, self.cons, self.outputs), tensor, self.cons)
                if gate is not None:
                    return Source(conv.name, y, gate.name)
        return None


def _region(graph: _Graph, depthwise: onnx.NodeProto) -> ScalingSite | None:
    """The tensors that must carry the factors of ``depthwise``'s input, or None where one of them is
    made or read by an op that does not commute with per-channel scaling (module docstring)."""
    start = depthwise.input[0]
    carried: dict[str, None] = {start: None}
    queue = [start]
    sources: dict[str, Source] = {}
    readers: dict[str, None] = {}

    def carry(name: str) -> bool:
        if not graph.is_activation(name):
            return False
        if name not in carried:
            carried[name] = None
            queue.append(name)
        return True

    while queue:
        tensor = queue.pop(0)
        if tensor in graph.outputs:
            return None
        first = graph.prod.get(tensor)
        source = graph.source_of(tensor)
        if source is not None:
            sources[source.conv] = source
        elif first is not None and first.op_type in _PASS_THROUGH:
            if not carry(first.input[0]):
                return None
        elif first is not None and first.op_type == "Add" and len(first.input) == 2:
            if not all(carry(i) for i in first.input):
                return None
        else:
            return None
        for reader in graph.cons.get(tensor, []):
            if reader.op_type == "Conv" and list(reader.input).index(tensor) == 0 \
                    and _conv_weight_ok(reader, graph.inits, graph.uses):
                readers[reader.name] = None
            elif reader.op_type in _PASS_THROUGH:
                carry(reader.output[0])
            elif reader.op_type == "Add" and len(reader.input) == 2:
                if not all(carry(i) for i in reader.input):
                    return None
                carry(reader.output[0])
            else:
                return None
    return ScalingSite(start, depthwise.name, tuple(carried), tuple(sources.values()), tuple(readers))


def depthwise_input_sites(model: onnx.ModelProto) -> list[ScalingSite]:
    """Every depthwise conv input of ``model`` as a folded or a split site (module docstring); a depthwise
    conv whose input already lies in an earlier folded region shares that region."""
    graph = _Graph(model)
    sites: list[ScalingSite] = []
    covered: set[str] = set()
    for node in model.graph.node:
        if not is_depthwise_conv(node, graph.dims) or len(graph.dims[node.input[1]]) != 4:
            continue
        if graph.uses.get(node.input[1], 0) != 1 or node.input[0] in covered:
            continue
        if not graph.is_activation(node.input[0]):
            continue  # a graph input or a constant: nothing in the graph makes it
        site = _region(graph, node)
        residual = site is not None and any(
            n.op_type == "Add" for t in site.carried for n in [graph.prod.get(t), *graph.cons.get(t, [])] if n)
        if site is None or residual:
            site = ScalingSite(node.input[0], node.name, (node.input[0],), (), (node.name,), split=True)
        else:
            covered.update(site.carried)
        sites.append(site)
    return sites


def _channel_range_model(model: onnx.ModelProto, tensors: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """The network pruned to ``tensors``, each reduced to its per-channel max |x| (NCHW)."""
    pruned = prune_to_outputs(model, tensors)
    g = pruned.graph
    outputs = []
    for i, name in enumerate(tensors):
        absolute, peak = f"__chan_abs_{i}", f"__chan_max_{i}"
        axes = f"__chan_axes_{i}"
        g.initializer.append(numpy_helper.from_array(np.array([0, 2, 3], dtype=np.int64), axes))
        g.node.extend([helper.make_node("Abs", [name], [absolute]),
                       helper.make_node("ReduceMax", [absolute, axes], [peak], keepdims=0)])
        outputs.append(peak)
    del g.output[:]
    g.output.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs)
    opset = next((o for o in pruned.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset.version < 18:
        opset.version = 18  # ReduceMax takes its axes as an input from opset 18 on
    return pruned, outputs


def channel_ranges(model: onnx.ModelProto, tensors: list[str], batches: Iterable[np.ndarray],
                   input_name: str, threads: int = 1) -> dict[str, np.ndarray]:
    """Per-channel max |x| of each of ``tensors`` (NCHW) over ``batches`` (graph-input batches)."""
    tensors = list(dict.fromkeys(tensors))
    if not tensors:
        return {}
    probe, outputs = _channel_range_model(model, tensors)
    session = create_session(probe, threads=threads)
    peaks: list[np.ndarray | None] = [None] * len(tensors)
    for batch in batches:
        for i, value in enumerate(session.run(outputs, {input_name: batch})):
            value = np.asarray(value, dtype=np.float64)
            peaks[i] = value if peaks[i] is None else np.maximum(peaks[i], value)
    if any(p is None for p in peaks):
        raise ValueError("channel ranges need at least one calibration batch")
    return {name: peak for name, peak in zip(tensors, peaks, strict=True)}  # type: ignore[misc]


def site_factors(site: ScalingSite, ranges: dict[str, np.ndarray], max_stretch: float = MAX_STRETCH
                 ) -> np.ndarray:
    """Per-channel divisors ``s_c`` for ``site``: every channel is stretched as far as it can go without
    widening any tensor the region divides, ``s_c = max_t r_tc / max_c' r_tc'`` over the site's measured
    tensors ``t``, at most ``max_stretch`` fold; 1 for a channel that is zero everywhere, and 1 everywhere
    when no channel would gain a factor of 2 (one bit)."""
    stretch: np.ndarray | None = None
    for name in site.measured:
        r = np.asarray(ranges[name], dtype=np.float64)
        top = float(r.max()) if r.size else 0.0
        share = r / top if top > 0 else np.zeros_like(r)
        stretch = share if stretch is None else np.maximum(stretch, share)
    if stretch is None:
        raise ValueError(f"site {site.depthwise!r} measures no tensor")
    if float(stretch.min()) >= 0.5:
        return np.ones_like(stretch)  # no channel would gain a bit: leave the graph alone
    factors = np.clip(stretch, 1.0 / max_stretch, 1.0)
    return np.where(stretch > 0, factors, 1.0)


def apply_channel_scaling(model: onnx.ModelProto, sites: list[ScalingSite], factors: dict[str, np.ndarray]
                          ) -> onnx.ModelProto:
    """A copy of ``model`` with every site's carried tensors divided per channel by
    ``factors[site.tensor]``; the same function (see module docstring)."""
    out = copy.deepcopy(model)
    graph = out.graph
    nodes = {n.name: n for n in graph.node}
    index = {init.name: i for i, init in enumerate(graph.initializer)}
    taken = set(index) | {o for n in graph.node for o in n.output} | {n.name for n in graph.node}

    def read(name: str) -> np.ndarray:
        return numpy_helper.to_array(graph.initializer[index[name]]).astype(np.float64)

    def write(name: str, value: np.ndarray) -> None:
        graph.initializer[index[name]].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    def add_initializer(base: str, value: np.ndarray) -> str:
        name = unique_name(base, taken)
        taken.add(name)
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
        index[name] = len(graph.initializer) - 1
        return name

    for site in sites:
        scale = factors.get(site.tensor)
        if scale is None or np.all(scale == 1.0):
            continue
        if site.split:
            depthwise = nodes[site.depthwise]
            divisor = add_initializer(f"{site.depthwise}_input_scale", (1.0 / scale).reshape(1, -1, 1, 1))
            scaled = unique_name(f"{site.depthwise}_scaled_input", taken)
            taken.add(scaled)
            graph.node.append(helper.make_node("Mul", [site.tensor, divisor], [scaled], name=scaled))
            depthwise.input[0] = scaled
        for source in site.sources:
            conv = nodes[source.conv]
            write(conv.input[1], read(conv.input[1]) / scale[:, None, None, None])
            if len(conv.input) > 2 and conv.input[2]:
                bias = conv.input[2]
                if sum(bias in n.input for n in graph.node) > 1:  # exporters share equal constants: unshare
                    bias = conv.input[2] = add_initializer(f"{conv.name}_bias", read(bias))
                write(bias, read(bias) / scale)
            if source.gate:
                gate, y = nodes[source.gate], conv.output[0]
                factor = add_initializer(f"{conv.name}_gate_scale", scale.reshape(1, -1, 1, 1))
                restored = unique_name(f"{conv.name}_gate_input", taken)
                taken.add(restored)
                graph.node.append(helper.make_node("Mul", [y, factor], [restored], name=restored))
                gate.input[list(gate.input).index(y)] = restored
        for name in site.readers:
            conv = nodes[name]
            weight = read(conv.input[1])
            groups = int(attribute(conv, "group", 1))  # type: ignore[arg-type]
            cout, cin_g = weight.shape[:2]
            grouped = weight.reshape(groups, cout // groups, cin_g, *weight.shape[2:])
            grouped = grouped * scale.reshape(groups, 1, cin_g, 1, 1)
            write(conv.input[1], grouped.reshape(weight.shape))
    topological_sort(graph)
    return out


def undo_split_sites(model: onnx.ModelProto, sites: list[ScalingSite]) -> onnx.ModelProto:
    """A copy of a rescaled ``model`` with the split sites' Muls removed again (each depthwise conv reads
    the unscaled tensor with its original weights; folded sites stay). For graphs that quantize every
    tensor, where the Mul's input is int8 already and the Mul only costs a pass over memory."""
    out = copy.deepcopy(model)
    graph = out.graph
    prod = producers(graph)
    nodes = {n.name: n for n in graph.node}
    index = {init.name: i for i, init in enumerate(graph.initializer)}
    for site in sites:
        if not site.split or site.depthwise not in nodes:
            continue
        depthwise = nodes[site.depthwise]
        mul = prod.get(depthwise.input[0])
        if mul is None or mul.op_type != "Mul" or mul.input[0] != site.tensor or mul.input[1] not in index:
            raise ValueError(f"{site.depthwise!r} does not read a split Mul of {site.tensor!r}")
        divisor = numpy_helper.to_array(graph.initializer[index[mul.input[1]]]).astype(np.float64).reshape(-1)
        weight = numpy_helper.to_array(graph.initializer[index[depthwise.input[1]]]).astype(np.float64)
        graph.initializer[index[depthwise.input[1]]].CopyFrom(numpy_helper.from_array(
            (weight * divisor[:, None, None, None]).astype(np.float32), depthwise.input[1]))
        depthwise.input[0] = site.tensor
        graph.node.remove(mul)
    remove_dead_nodes(out)
    return out
