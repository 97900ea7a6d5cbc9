"""Graph rewrites applied to the traced ONNX so that ONNX Runtime's CPU kernels run it faster.

Every rewrite keeps the graph's inputs, outputs and named head tensors, and changes values only by
float32 summation order (~1e-6 relative). The rewritten graph stays within TensorRT's parser (plain
Conv, Relu, Split and ConvTranspose) and holds no bool tensors.

``fold_batchnorm``: a BatchNormalization right after a Conv / ConvTranspose becomes part of its weights.
The exporter already folds Conv+BN but leaves ConvTranspose+BN, and the deconvolution rewrite below
needs the bias in the convolution so the Relu can move in front of the interleave.

``deconv_to_conv``: ONNX Runtime runs ConvTranspose as one GEMM into a k*k-times larger column buffer
followed by col2im; for CenterNet's stride-2 4x4 upsampling (256 -> 256 channels to 128x128) that is
~60 GMAC/s against ~115 for its NCHWc Conv. A stride-s ConvTranspose whose kernel is a multiple of s
splits into s*s phases, each a correlation with a (k/s)x(k/s) kernel on the same input. One Conv
computes all phases (output channel c*s*s + phase) and a ConvTranspose with group=C, kernel s, stride s
and one-hot weights interleaves them (a copy: every output receives exactly one input times 1.0, so the
Relu moves in front of it and fuses into the Conv). Measured on res_18 at 512x512, one thread: the
last deconvolution goes from ~72 ms to ~42 ms. DepthToSpace+Slice also interleaves, but ran ~2x slower
than the one-hot ConvTranspose in ONNX Runtime.

``fuse_sibling_convs``: Conv nodes reading the same tensor with the same geometry become one Conv with
concatenated output channels, a Relu (when every member had one) and a Split (CenterNet's three head
3x3 convolutions). Not a default: ONNX Runtime's NCHWc Conv is compute-bound on the heads (res_18 at
512x512: 61.6 ms for three convs, 61.7 ms fused, plus ~1.5 ms of layout reorders around the Split, at
one thread; no gain at two either), so it is kept for runtimes that pay per kernel launch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from centernet_edge.runtime.onnx_graph import attributes, remove_dead_nodes, replace_nodes, unique_name

__all__ = ["DEFAULT_REWRITES", "REWRITES", "deconv_to_conv", "fold_batchnorm", "fuse_sibling_convs",
           "optimize_graph"]


class _Graph:
    """Lookup tables over a GraphProto. Each rewrite plans on the graph as found, then swaps nodes once."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.inits = {init.name: init for init in self.graph.initializer}
        self.outputs = {o.name for o in self.graph.output}
        self.names = set(self.inits) | {i.name for i in self.graph.input}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            self.names.update(node.output)
            self.names.add(node.name)
            for name in node.input:
                self.consumers[name].append(node)

    def const(self, name: str) -> np.ndarray | None:
        init = self.inits.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def fresh(self, base: str) -> str:
        return unique_name(base, self.names)

    def add_init(self, base: str, value: np.ndarray, dtype: type = np.float32) -> str:
        # Always a new initializer: the exporter de-duplicates equal tensors, so the original one may be
        # shared with nodes this rewrite does not touch.
        name = self.fresh(base)
        init = numpy_helper.from_array(np.ascontiguousarray(value, dtype=dtype), name)
        self.graph.initializer.append(init)
        self.inits[name] = init
        return name

    def sole_consumer(self, tensor: str, op_type: str) -> onnx.NodeProto | None:
        """The one node reading ``tensor`` if it is an ``op_type`` and the tensor is not a graph output."""
        users = self.consumers.get(tensor, [])
        if len(users) == 1 and users[0].op_type == op_type and tensor not in self.outputs:
            return users[0]
        return None


def _auto_pad_notset(attrs: dict[str, object]) -> bool:
    return attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")


# ---- BatchNormalization folding ------------------------------------------------------------------------


def fold_batchnorm(model: onnx.ModelProto) -> int:
    """Fold inference BatchNormalization into a preceding Conv/ConvTranspose; returns the number folded."""
    g = _Graph(model)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    removed: set[int] = set()
    for node in g.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose") or len(node.input) < 2:
            continue
        bn = g.sole_consumer(node.output[0], "BatchNormalization")
        if bn is None or len(bn.output) != 1 or attributes(bn).get("training_mode", 0):
            continue
        params = [g.const(name) for name in bn.input[1:5]]
        weight = g.const(node.input[1])
        bias = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if weight is None or any(p is None for p in params) or (len(node.input) > 2 and node.input[2]
                                                                 and bias is None):
            continue
        attrs = attributes(node)
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        factor = gamma / np.sqrt(var + float(attributes(bn).get("epsilon", 1e-5)))
        if node.op_type == "Conv":
            scaled = weight * factor.reshape(-1, *[1] * (weight.ndim - 1))
        else:
            # ConvTranspose weights are (C_in, C_out / group, k...): output channels on axis 1 per group.
            group = int(attrs.get("group", 1))
            per = weight.shape[1]
            shaped = weight.reshape(group, weight.shape[0] // group, per, *weight.shape[2:])
            scaled = (shaped * factor.reshape(group, 1, per, *[1] * (weight.ndim - 2))).reshape(weight.shape)
        base = bias.astype(np.float64) if bias is not None else 0.0
        new_bias = (base - mean) * factor + beta
        folded = helper.make_node(node.op_type, [node.input[0], g.add_init(f"{node.name}.folded_weight", scaled),
                                                 g.add_init(f"{node.name}.folded_bias", new_bias)],
                                  [bn.output[0]], name=node.name)
        folded.attribute.extend(node.attribute)
        replaced[id(node)] = [folded]
        removed.add(id(bn))
    replace_nodes(g.graph, replaced, removed)
    remove_dead_nodes(model)
    return len(replaced)


# ---- ConvTranspose -> polyphase Conv + interleave ---------------------------------------------------


def _polyphase(weight: np.ndarray, strides: list[int]) -> np.ndarray:
    """ConvTranspose weight (C_in, C_out, ky, kx) -> Conv weight (C_out*sy*sx, C_in, ky/sy, kx/sx).

    Output o of a ConvTranspose receives x[q - a] * w[s*a + r] for a < k/s, where o + pad = s*q + r. As a
    correlation over x padded by k/s - 1 that is tap b = k/s - 1 - a, hence the flip of the tap axis.
    """
    c_in, c_out, ky, kx = weight.shape
    sy, sx = strides
    ty, tx = ky // sy, kx // sx
    split = weight.reshape(c_in, c_out, ty, sy, tx, sx)[:, :, ::-1, :, ::-1, :]
    return split.transpose(1, 3, 5, 0, 2, 4).reshape(c_out * sy * sx, c_in, ty, tx)


def _interleave_weight(channels: int, strides: list[int]) -> np.ndarray:
    sy, sx = strides
    onehot = np.zeros((channels, sy, sx, 1, sy, sx), np.float32)
    for ry in range(sy):
        for rx in range(sx):
            onehot[:, ry, rx, 0, ry, rx] = 1.0
    return onehot.reshape(channels * sy * sx, 1, sy, sx)


def _deconv_plan(g: _Graph, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray, list[int], list[int]] | None:
    """(weight, bias, strides, pads) for a ConvTranspose the rewrite handles, else None."""
    attrs = attributes(node)
    weight = g.const(node.input[1]) if len(node.input) > 1 else None
    if weight is None or weight.ndim != 4:
        return None
    has_bias = len(node.input) > 2 and bool(node.input[2])
    bias = g.const(node.input[2]) if has_bias else np.zeros(weight.shape[1], np.float32)
    strides = [int(v) for v in attrs.get("strides", [1, 1])]
    pads = [int(v) for v in attrs.get("pads", [0, 0, 0, 0])]
    kernel = [int(v) for v in attrs.get("kernel_shape", weight.shape[2:])]
    if (bias is None or int(attrs.get("group", 1)) != 1 or any(int(d) != 1 for d in attrs.get("dilations", [1, 1]))
            or any(int(v) for v in attrs.get("output_padding", [0, 0])) or "output_shape" in attrs
            or not _auto_pad_notset(attrs) or kernel != list(weight.shape[2:]) or max(strides) < 2
            or any(k % s for k, s in zip(kernel, strides, strict=True))):
        return None
    return weight, bias, strides, pads


def deconv_to_conv(model: onnx.ModelProto) -> int:
    """Rewrite stride-s ConvTranspose nodes (kernel a multiple of s, group 1) as polyphase Conv + one-hot
    interleave; returns the number rewritten."""
    g = _Graph(model)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    removed: set[int] = set()
    for node in g.graph.node:
        plan = _deconv_plan(g, node) if node.op_type == "ConvTranspose" else None
        if plan is None:
            continue
        weight, bias, strides, pads = plan
        c_out = weight.shape[1]
        taps = [k // s for k, s in zip(weight.shape[2:], strides, strict=True)]
        base = node.name or node.output[0]
        phases = g.fresh(f"{base}_phases")
        conv = helper.make_node(
            "Conv", [node.input[0], g.add_init(f"{base}.polyphase_weight", _polyphase(weight, strides)),
                     g.add_init(f"{base}.polyphase_bias", np.repeat(bias, strides[0] * strides[1]))],
            [phases], name=g.fresh(f"{base}_polyphase"), kernel_shape=taps,
            pads=[t - 1 for t in taps] * 2)
        new_nodes = [conv]
        result = node.output[0]
        relu = g.sole_consumer(result, "Relu")
        if relu is not None:
            # The interleave copies each value once, so Relu commutes with it and fuses into the Conv.
            activated = g.fresh(f"{base}_phases_relu")
            new_nodes.append(helper.make_node("Relu", [phases], [activated], name=relu.name))
            phases, result = activated, relu.output[0]
            removed.add(id(relu))
        new_nodes.append(helper.make_node(
            "ConvTranspose", [phases, g.add_init(f"{base}.interleave_weight", _interleave_weight(c_out, strides))],
            [result], name=g.fresh(f"{base}_interleave"), kernel_shape=strides, strides=strides, pads=pads,
            group=c_out))
        replaced[id(node)] = new_nodes
    replace_nodes(g.graph, replaced, removed)
    remove_dead_nodes(model)
    return len(replaced)


# ---- sibling Conv fusion ----------------------------------------------------------------------------


def _conv_key(g: _Graph, node: onnx.NodeProto) -> tuple | None:
    attrs = attributes(node)
    weight = g.const(node.input[1]) if len(node.input) > 1 else None
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if (weight is None or (has_bias and g.const(node.input[2]) is None) or int(attrs.get("group", 1)) != 1
            or not _auto_pad_notset(attrs)):
        return None
    spatial = weight.ndim - 2
    return (node.input[0], tuple(weight.shape[1:]),
            tuple(attrs.get("strides", [1] * spatial)), tuple(attrs.get("pads", [0] * 2 * spatial)),
            tuple(attrs.get("dilations", [1] * spatial)))


def fuse_sibling_convs(model: onnx.ModelProto) -> int:
    """Merge Conv nodes that read the same tensor with equal geometry into one Conv + (Relu) + Split;
    returns the number of groups merged."""
    g = _Graph(model)
    groups: dict[tuple, list[onnx.NodeProto]] = defaultdict(list)
    for node in g.graph.node:
        key = _conv_key(g, node) if node.op_type == "Conv" else None
        if key is not None:
            groups[key].append(node)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    removed: set[int] = set()
    for members in groups.values():
        if len(members) < 2:
            continue
        weights = [g.const(n.input[1]) for n in members]
        biases = [g.const(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros(w.shape[0], np.float32)
                  for n, w in zip(members, weights, strict=True)]
        first = members[0]
        base = first.name or first.output[0]
        fused = g.fresh(f"{base}_fused")
        conv = helper.make_node("Conv", [first.input[0], g.add_init(f"{base}.fused_weight", np.concatenate(weights)),
                                         g.add_init(f"{base}.fused_bias", np.concatenate(biases))],
                                [fused], name=g.fresh(f"{base}_fused"))
        conv.attribute.extend(first.attribute)
        new_nodes = [conv]
        relus = [g.sole_consumer(n.output[0], "Relu") for n in members]
        outputs = [n.output[0] for n in members]
        if all(r is not None for r in relus):
            activated = g.fresh(f"{base}_fused_relu")
            new_nodes.append(helper.make_node("Relu", [fused], [activated], name=g.fresh(f"{base}_fused_relu")))
            fused, outputs = activated, [r.output[0] for r in relus]
            removed.update(id(r) for r in relus)
        sizes = g.add_init(f"{base}.fused_split", np.array([w.shape[0] for w in weights]), np.int64)
        new_nodes.append(helper.make_node("Split", [fused, sizes], outputs, name=g.fresh(f"{base}_split"), axis=1))
        replaced[id(first)] = new_nodes
        removed.update(id(n) for n in members[1:])
    replace_nodes(g.graph, replaced, removed)
    remove_dead_nodes(model)
    return sum(len(v) >= 2 for v in groups.values())


Rewrite = Callable[[onnx.ModelProto], int]
REWRITES: dict[str, Rewrite] = {
    "fold_batchnorm": fold_batchnorm,
    "deconv_to_conv": deconv_to_conv,
    "fuse_sibling_convs": fuse_sibling_convs,
}
DEFAULT_REWRITES = ("fold_batchnorm", "deconv_to_conv")


def optimize_graph(model: onnx.ModelProto, rewrites: Iterable[str] = DEFAULT_REWRITES) -> dict[str, int]:
    """Apply ``rewrites`` in order, in place; returns how many sites each one changed."""
    return {name: REWRITES[name](model) for name in rewrites}
