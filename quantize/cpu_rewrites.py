"""Float-exact graph rewrites that let ONNX Runtime's CPU integer kernels run at full speed.

ONNX Runtime's uint8 kernels have costs an fp32 graph does not show (measured on an AVX-512 VNNI core,
ONNX Runtime 1.31, one thread; ``scripts/bench_cpu_int8.py --micro``):

* the NHWC int8 depthwise kernel vectorises over channels in blocks of 16: 72 channels at 128x128 take
  0.97 ms, 80 channels 0.43 ms. :func:`pad_depthwise_channels` widens such channel groups with zero
  channels (zero weights in, zero weights out), which changes no output value;
* a multiplication by a positive constant (hard-swish's ``x * 1/6``, TensorFlow's way of writing it) is a
  whole pass over memory as ``QLinearMul``, although ``c * x`` needs no arithmetic at all in a quantized
  graph: the same integers with scale ``c * s``. :func:`fold_constant_scaling` removes those nodes from a
  QOperator graph by rescaling instead;
* an integer convolution over a 3-channel image into few channels is slower than fp32 (1.7 vs 0.6 ms for
  mb3's 16-channel stem: the im2col of 3-byte pixels dominates), so :func:`image_convolutions` names those
  layers to keep in float;
  :func:`image_blocks` extends that float stem through its activation to a depthwise conv reading it;
* a per-channel scaling followed by a constant offset, ``Mul(x, s) + b`` (the gate input channel
  scaling puts in front of a hard-swish, ``quantize/channel_scaling.py``), is two passes as ``QLinearMul``
  + ``QLinearAdd``, and ``QLinearMul`` quantizes ``s`` with one scale for all channels.
  :func:`affine_as_depthwise_convs` writes it as one 1x1 depthwise ``Conv`` with weights ``s`` and bias
  ``b``: one pass, and per-channel int8 weights hold every ``s_c`` exactly;
* peak NMS on the quantized heatmap logits has its own exact rewrites in :mod:`.quantized_peaks`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from centernet_edge.runtime.onnx_graph import (
    constant_array,
    consumers,
    initializers,
    is_depthwise_conv,
    producers,
    unique_name,
)

__all__ = [
    "DEPTHWISE_CHANNEL_BLOCK",
    "affine_as_depthwise_convs",
    "fold_constant_scaling",
    "image_blocks",
    "image_convolutions",
    "pad_depthwise_channels",
]

DEPTHWISE_CHANNEL_BLOCK = 16

# Ops that act on every channel alike: padded (zero) channels stay finite and are dropped by the zero
# weights of the layers that read them.
_CHANNELWISE = frozenset({"Relu", "Clip", "Add", "Sub", "Mul", "Div", "Sigmoid", "HardSigmoid", "HardSwish",
                          "LeakyRelu", "GlobalAveragePool"})


def _attr(node: onnx.NodeProto, name: str, default: int = 1) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _constant(model: onnx.ModelProto, name: str, inits: dict[str, onnx.TensorProto],
              prod: dict[str, onnx.NodeProto]) -> np.ndarray | None:
    """Value of ``name`` if it is an initializer, a Constant, or computed from constants only."""
    if not _is_constant(name, inits, prod, {}):
        return None
    return _fold(model, name, inits, prod)


def _fold(model: onnx.ModelProto, name: str, inits: dict[str, onnx.TensorProto],
          prod: dict[str, onnx.NodeProto]) -> np.ndarray:
    """Evaluate a tensor known to depend on constants only (a Reshape of a bias, say)."""
    value = constant_array(model, name)
    if value is not None:
        return value
    from onnx.reference import ReferenceEvaluator

    node = prod[name]
    feeds = {i: _fold(model, i, inits, prod) for i in node.input if i}
    sub = onnx.helper.make_graph([node], "fold", [], [onnx.helper.make_tensor_value_info(o, 0, None)
                                                      for o in node.output])
    results = ReferenceEvaluator(onnx.helper.make_model(sub, opset_imports=model.opset_import)).run(None, feeds)
    return np.asarray(results[list(node.output).index(name)])


def _is_constant(name: str, inits: dict[str, onnx.TensorProto], prod: dict[str, onnx.NodeProto],
                 memo: dict[str, bool]) -> bool:
    """Whether ``name`` depends on constants only (no graph input); iterative, so deep graphs are cheap."""
    stack = [name]
    while stack:
        current = stack[-1]
        if current in memo:
            stack.pop()
            continue
        node = prod.get(current)
        if current in inits or (node is not None and node.op_type == "Constant"):
            memo[current] = True
            stack.pop()
            continue
        if node is None:
            memo[current] = False
            stack.pop()
            continue
        pending = [i for i in node.input if i and i not in memo]
        if pending:
            stack.extend(pending)
            continue
        memo[current] = all(memo[i] for i in node.input if i)
        stack.pop()
    return memo[name]


class _Region:
    """Tensors of one channel group: between the layers that write it and the layers that read it."""

    def __init__(self) -> None:
        self.tensors: set[str] = set()
        self.sources: set[str] = set()  # weighted layers writing the group (output channels padded)
        self.sinks: set[str] = set()  # weighted layers reading it (input channels padded)
        self.depthwise: set[str] = set()  # both
        self.reshapes: set[str] = set()  # shape constants naming the channel count


def _grow_region(model: onnx.ModelProto, start: str, channels: int, shapes: dict[str, list[int]],
                 inits: dict[str, onnx.TensorProto], prod: dict[str, onnx.NodeProto],
                 cons: dict[str, list[onnx.NodeProto]]) -> _Region | None:
    """The closed channel group around ``start``, or None when something in it cannot be widened."""
    region, stack = _Region(), [start]
    outputs = {o.name for o in model.graph.output}
    while stack:
        name = stack.pop()
        if name in region.tensors:
            continue
        if name in outputs or name in inits or name not in prod:
            return None
        region.tensors.add(name)
        node = prod[name]
        if node.op_type == "Conv" and is_depthwise_conv(node, shapes):
            region.depthwise.add(node.name)
            stack.append(node.input[0])
        elif node.op_type in ("Conv", "ConvTranspose"):
            if _attr(node, "group") != 1 or node.op_type == "ConvTranspose":
                return None
            region.sources.add(node.name)
        elif not _joins(model, node, region, stack, inits, prod, channels):
            return None
        for user in cons.get(name, []):
            if user.op_type == "Conv" and is_depthwise_conv(user, shapes):
                region.depthwise.add(user.name)
                stack.append(user.output[0])
            elif user.op_type == "Conv" and user.input[0] == name and _attr(user, "group") == 1:
                region.sinks.add(user.name)
            elif user.op_type in _CHANNELWISE or user.op_type == "Reshape":
                stack.extend(o for o in user.output if o)
            else:
                return None
    return region


def _joins(model: onnx.ModelProto, node: onnx.NodeProto, region: _Region, stack: list[str],
           inits: dict[str, onnx.TensorProto], prod: dict[str, onnx.NodeProto], channels: int) -> bool:
    """Add a channel-wise node's tensor inputs to the region; False if it cannot be widened."""
    if node.op_type == "Reshape":
        shape = _constant(model, node.input[1], inits, prod)
        if shape is None or shape.ndim != 1 or len(shape) != 4 or int(shape[1]) != channels:
            return False
        region.reshapes.add(node.name)
        stack.append(node.input[0])
        return True
    if node.op_type not in _CHANNELWISE:
        return False
    for i, name in enumerate(node.input):
        if not name:
            continue
        value = _constant(model, name, inits, prod)
        if value is None:
            stack.append(name)
        elif value.size != 1 and not (node.op_type == "Clip" and i > 0):
            return False
    return True


def pad_depthwise_channels(model: onnx.ModelProto, block: int = DEPTHWISE_CHANNEL_BLOCK,
                           min_pixels: int = 32 * 32) -> list[str]:
    """Widen depthwise channel groups to a multiple of ``block`` with zero channels (in place).

    Only groups whose every reader and writer can be widened exactly are changed: pointwise/dense convs
    writing or reading them, depthwise convs, channel-wise elementwise ops with scalar constants, global
    average pooling and 4-D reshapes naming the channel count (squeeze-excite). Depthwise layers with
    fewer than ``min_pixels`` output pixels are left alone (there the padding costs more than it saves).
    Returns the depthwise layers widened. Tensor names are unchanged, so calibrated ranges still apply.
    """
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    for info in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value for d in dims]
    inits, prod, cons = initializers(model.graph), producers(model.graph), consumers(model.graph)
    done: set[str] = set()
    widened: list[str] = []
    for node in list(model.graph.node):
        if node.name in done or node.op_type != "Conv" or not is_depthwise_conv(node, shapes):
            continue
        channels = shapes[node.input[1]][0]
        out_shape = shapes.get(node.output[0], [])
        pixels = int(np.prod(out_shape[2:])) if len(out_shape) == 4 and all(out_shape[2:]) else 0
        if channels % block == 0 or pixels < min_pixels:
            continue
        region = _grow_region(model, node.output[0], channels, shapes, inits, prod, cons)
        if region is None:
            continue
        done |= region.depthwise
        _widen(model, region, channels, -(-channels // block) * block, inits, prod)
        widened.extend(sorted(region.depthwise))
        # Widened layers got new weight initializers; later groups must see them.
        inits, prod, cons = initializers(model.graph), producers(model.graph), consumers(model.graph)
        shapes.update({i.name: list(i.dims) for i in model.graph.initializer})
    if widened:
        del model.graph.value_info[:]  # channel counts changed; ONNX Runtime re-infers shapes
    return widened


def _widen(model: onnx.ModelProto, region: _Region, channels: int, wide: int,
           inits: dict[str, onnx.TensorProto], prod: dict[str, onnx.NodeProto]) -> None:
    taken = {i.name for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}

    def replace(node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        name = unique_name(f"{node.input[index]}_wide", taken)
        model.graph.initializer.append(numpy_helper.from_array(value, name))
        node.input[index] = name

    def padded(value: np.ndarray, axis: int) -> np.ndarray:
        widths = [(0, 0)] * value.ndim
        widths[axis] = (0, wide - channels)
        return np.pad(value, widths)

    def tensor(node: onnx.NodeProto, index: int) -> np.ndarray:
        value = _constant(model, node.input[index], inits, prod)
        if value is None:
            raise ValueError(f"{node.name}: input {index} is not constant")
        return value

    for name in region.sources | region.depthwise:
        node = nodes[name]
        replace(node, 1, padded(tensor(node, 1), 0))
        if len(node.input) > 2 and node.input[2]:
            replace(node, 2, padded(tensor(node, 2), 0))
    for name in region.depthwise:
        node = nodes[name]
        for attr in node.attribute:
            if attr.name == "group":
                attr.i = wide
    for name in region.sinks:
        node = nodes[name]
        replace(node, 1, padded(tensor(node, 1), 1))
    for name in region.reshapes:
        node = nodes[name]
        shape = tensor(node, 1).copy()
        shape[1] = wide
        replace(node, 1, shape)


def fold_constant_scaling(model: onnx.ModelProto) -> int:
    """Remove ``QLinearMul(x, c)`` with a positive scalar constant ``c`` from a QOperator graph (in place).

    ``c * x`` is ``x``'s integers read with scale ``c * s_x``: every reader of the product gets ``x`` and
    that scale (and ``x``'s zero point) instead of a requantized copy. Exact up to float rounding of the
    scale; one rounding fewer than before. Products that are graph outputs, or read by an op whose
    quantized inputs are not known here, are left alone. Returns the number of nodes removed.
    """
    inits = initializers(model.graph)
    cons = consumers(model.graph)
    outputs = {o.name for o in model.graph.output}
    taken = set(inits)
    removed = []
    for node in model.graph.node:
        product = node.output[0]
        scaled = _constant_factor(node, inits) if node.op_type == "QLinearMul" else None
        if scaled is None or product in outputs or not cons.get(product):
            continue
        data_index, factor = scaled
        x, x_scale, x_zp = node.input[data_index:data_index + 3]
        if x_scale not in inits or x_zp not in inits or not all(_slots(u, product) for u in cons[product]):
            continue
        scale = numpy_helper.to_array(inits[x_scale]).astype(np.float64) * factor
        new_scale = unique_name(f"{product}_scale_folded", taken)
        model.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), new_scale))
        for user in cons[product]:
            for data, s, z in _slots(user, product):
                user.input[data], user.input[s], user.input[z] = x, new_scale, x_zp
        removed.append(node)
    for node in removed:
        model.graph.node.remove(node)
    return len(removed)


def _constant_factor(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[int, float] | None:
    """(index of the data operand, real value of the constant) for ``QLinearMul(x, c)``, else None."""
    for const_index, data_index in ((3, 0), (0, 3)):
        names = node.input[const_index:const_index + 3]
        if not all(n in inits for n in names):
            continue
        q, scale, zp = (numpy_helper.to_array(inits[n]) for n in names)
        if q.size != 1 or scale.size != 1 or zp.size != 1:
            return None
        value = float(scale.reshape(())) * (float(q.reshape(())) - float(zp.reshape(())))
        return (data_index, value) if value > 0 else None
    return None


# Where a quantized tensor is read: (data, scale, zero point) input positions per QOperator op.
_QUANTIZED_READS = {
    "QLinearConv": [(0, 1, 2)],
    "QLinearMatMul": [(0, 1, 2), (3, 4, 5)],
    "QLinearAdd": [(0, 1, 2), (3, 4, 5)],
    "QLinearMul": [(0, 1, 2), (3, 4, 5)],
    "QLinearSigmoid": [(0, 1, 2)],
    "QLinearLeakyRelu": [(0, 1, 2)],
    "QLinearGlobalAveragePool": [(0, 1, 2)],
    "QLinearAveragePool": [(0, 1, 2)],
    "DequantizeLinear": [(0, 1, 2)],
}


def _reads(node: onnx.NodeProto) -> list[tuple[int, int, int]]:
    if node.op_type == "QLinearConcat":  # Y_scale, Y_zp, then (X, X_scale, X_zp) triples
        return [(i, i + 1, i + 2) for i in range(2, len(node.input), 3)]
    return _QUANTIZED_READS.get(node.op_type, [])


def _slots(user: onnx.NodeProto, tensor: str) -> list[tuple[int, int, int]]:
    """(data, scale, zero point) positions where ``user`` reads quantized ``tensor``; [] if it reads it
    any other way (then its scale cannot be swapped)."""
    slots = [s for s in _reads(user) if user.input[s[0]] == tensor]
    data = {s[0] for s in slots}
    if any(name == tensor for i, name in enumerate(user.input) if i not in data):
        return []
    return slots


def image_convolutions(model: onnx.ModelProto, network: Iterable[str], max_channels: int = 4,
                       max_outputs: int = 16) -> list[str]:
    """Weighted layers of the network that read at most ``max_channels`` input channels (the image) and
    write at most ``max_outputs`` channels.

    The integer kernel's im2col cost per output pixel is paid once for all output channels: with few of
    them it dominates (mb3's 3x3 stem, 16 outputs: int8 1.7 ms, fp32 0.6 ms), with many the integer GEMM
    wins (the official 7x7 stem, 64 outputs, kept float cost res_18 2.99x -> 2.48x end to end).
    """
    names = set(network)
    inits = initializers(model.graph)
    found = []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name not in names or len(node.input) < 2 or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]].dims
        if len(weight) >= 2 and weight[1] * _attr(node, "group") <= max_channels and weight[0] <= max_outputs:
            found.append(node.name)
    return found


def image_blocks(model: onnx.ModelProto, network: Iterable[str], image_convs: Iterable[str]) -> list[str]:
    """The element-wise activation after each float image conv and the depthwise convs reading it, when
    there are such depthwise convs (else nothing): they stay float with the image conv.

    The stem's activation is the first feature map; a depthwise conv reads its channels one by one, so
    one int8 range for all of them reaches the network unaveraged (mb3's 16-channel hard-swish stem:
    channel ranges 0.3 ... 36; CPU all-int8 head error 0.51 -> 0.32 with this block float). In float the
    block costs next to nothing, since the image conv before it is float anyway (mb3: 1.81x -> 1.79x fp32).
    """
    names = set(network)
    inits = initializers(model.graph)
    shapes = {name: list(init.dims) for name, init in inits.items()}
    prod = producers(model.graph)
    float_tensors = {n.output[0] for n in model.graph.node if n.name in set(image_convs)}
    chain: list[str] = []
    depthwise: list[str] = []
    memo: dict[str, bool] = {}
    for node in model.graph.node:  # graph order is topological
        if node.name not in names:
            continue
        activations = [i for i in node.input if i and not _is_constant(i, inits, prod, memo)]
        if not activations or not all(i in float_tensors for i in activations):
            continue
        if node.op_type in _CHANNELWISE and node.op_type != "GlobalAveragePool":
            chain.append(node.name)
            float_tensors.update(node.output)
        elif is_depthwise_conv(node, shapes) and node.input[0] in float_tensors:
            depthwise.append(node.name)
    return chain + depthwise if depthwise else []


def affine_as_depthwise_convs(model: onnx.ModelProto, skip: Iterable[str] = ()) -> int:
    """Replace ``Add(Mul(x, s), b)`` (``s`` a positive per-channel ``[1, C, 1, 1]`` constant, ``b`` a
    scalar constant, the product read only by the Add) with a 1x1 depthwise ``Conv`` (in place; the Add's
    output keeps its name, so calibrated ranges still apply); nodes named in ``skip`` are left alone.
    Returns the number of rewrites."""
    skip = set(skip)
    inits = initializers(model.graph)
    cons = consumers(model.graph)
    outputs = {o.name for o in model.graph.output}
    taken = set(inits) | {o for n in model.graph.node for o in n.output} | {n.name for n in model.graph.node}
    replaced: list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto]] = []
    for mul in model.graph.node:
        if mul.op_type != "Mul" or len(mul.input) != 2 or mul.output[0] in outputs or mul.name in skip:
            continue
        x, factor = (mul.input[0], mul.input[1]) if mul.input[1] in inits else (mul.input[1], mul.input[0])
        if factor not in inits or x in inits:
            continue
        scale = numpy_helper.to_array(inits[factor]).astype(np.float32)
        if scale.ndim != 4 or scale.shape[0] != 1 or scale.shape[2:] != (1, 1) or not np.all(scale > 0):
            continue
        readers = cons.get(mul.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "Add" or readers[0].name in skip:
            continue
        add = readers[0]
        other = next((i for i in add.input if i != mul.output[0]), None)
        offset = constant_array(model, other) if other is not None else None
        if offset is None or offset.size != 1:
            continue
        channels = scale.shape[1]
        weight = unique_name(f"{mul.name}_dw_weight", taken)
        bias = unique_name(f"{mul.name}_dw_bias", taken)
        taken |= {weight, bias}
        model.graph.initializer.extend([
            numpy_helper.from_array(scale.reshape(channels, 1, 1, 1), weight),
            numpy_helper.from_array(np.full(channels, float(offset.reshape(())), np.float32), bias)])
        conv = onnx.helper.make_node("Conv", [x, weight, bias], [add.output[0]], name=f"{mul.name}_as_dw_conv",
                                     group=channels, kernel_shape=[1, 1])
        replaced.append((mul, add, conv))
    for mul, add, conv in replaced:
        model.graph.node.insert(list(model.graph.node).index(add), conv)
        model.graph.node.remove(mul)
        model.graph.node.remove(add)
    return len(replaced)
