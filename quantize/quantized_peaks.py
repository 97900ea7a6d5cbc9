"""Rewrites of CenterNet's peak NMS for a heatmap whose logits are quantized (CPU int8 model).

Peak NMS keeps a heatmap cell when it equals the 3x3 max around it. With uint8 logits ``q`` the heatmap is
``f(q) = Sigmoid(DequantizeLinear(q))``. Were ``f`` increasing, two rewrites would be exact:

* :func:`pool_quantized_logits`: ``MaxPool(f(q))`` -> ``f(MaxPool(q))`` (max commutes with a
  non-decreasing function); the pool then runs on uint8 in NHWC instead of re-blocking a float map for
  the NCHWc kernel (1.7 ms on mb3, one thread);
* :func:`mask_peaks_on_quantized_logits`: ``heat * (f(q) == f(MaxPool(q)))`` (or the Ceil form our
  exports use) -> ``heat * Cast(q == MaxPool(q))`` (comparing integers is comparing the floats when ``f``
  is strictly increasing); the pooled map then never leaves uint8.

ONNX Runtime's vectorised sigmoid is not quite increasing in float32: its absolute error is about 2**-24,
so near ``f = 1e-6`` adjacent levels can tie or even swap (mb3: one tie, at 9.2e-7), it returns 0 below
-18, and above ~16 it rounds to 1.0 or just under it, in either order. So ``f`` is evaluated in ONNX
Runtime itself on every level of the model's scale and zero point, and a rewrite is applied only when
``f`` keeps the order of the levels wherever it reaches ``score_floor`` (default 1e-4), every level below
that scoring less than every level above. The rewritten graph then gives the same value for every cell
whose neighbourhood reaches the floor, so detections differ only below it, and those stay out of the
top-K unless a map has fewer than K peaks above it. Logits spanning more than about +-16 leave the graph
as it was.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from centernet_edge.runtime.onnx_graph import constant_array, initializers, producers, remove_dead_nodes, unique_name
from centernet_edge.runtime.onnx_session import create_session

__all__ = ["DEFAULT_SCORE_FLOOR", "mask_peaks_on_quantized_logits", "pool_quantized_logits"]

DEFAULT_SCORE_FLOOR = 1e-4


def pool_quantized_logits(model: onnx.ModelProto, score_floor: float = DEFAULT_SCORE_FLOOR) -> int:
    """Rewrite ``MaxPool(Sigmoid(DequantizeLinear(q)))`` as ``Sigmoid(DequantizeLinear(MaxPool(q)))``.

    Transposes between the sigmoid and the pool are allowed when they compose to the identity (a
    TensorFlow export transposes NCHW -> NHWC -> NCHW around its outputs). The dequantization must be
    per-tensor with a positive scale, and its sigmoid non-decreasing over the levels above ``score_floor``
    (module docstring). In place; returns the number of pools rewritten.
    """
    inits = initializers(model.graph)
    prod = producers(model.graph)
    taken = {n.name for n in model.graph.node}
    rewritten = 0
    for pool in list(model.graph.node):
        if pool.op_type != "MaxPool" or len([o for o in pool.output if o]) != 1:
            continue
        source, perm = _behind_transposes(pool.input[0], prod)
        sigmoid = prod.get(source) if perm is None else None
        dq = prod.get(sigmoid.input[0]) if sigmoid is not None and sigmoid.op_type == "Sigmoid" else None
        if dq is None or dq.op_type != "DequantizeLinear" or not _per_tensor_positive_scale(dq, inits):
            continue
        if not _keeps_level_order(dq, inits, score_floor, strict=False):
            continue
        quantized, pooled_q, pooled = dq.input[0], f"{pool.output[0]}_uint8", f"{pool.output[0]}_logits"
        new_pool = helper.make_node("MaxPool", [quantized], [pooled_q], name=unique_name(f"{pool.name}_uint8", taken))
        new_pool.attribute.extend(a for a in pool.attribute if a.name != "storage_order")
        dequant = helper.make_node("DequantizeLinear", [pooled_q, *dq.input[1:]], [pooled],
                                   name=unique_name(f"{pool.name}_dequantize", taken))
        squash = helper.make_node("Sigmoid", [pooled], [pool.output[0]],
                                  name=unique_name(f"{pool.name}_sigmoid", taken))
        _replace(model, pool, [new_pool, dequant, squash])
        rewritten += 1
    if rewritten:
        remove_dead_nodes(model)
    return rewritten


def mask_peaks_on_quantized_logits(model: onnx.ModelProto, score_floor: float = DEFAULT_SCORE_FLOOR) -> int:
    """Rewrite the peak mask ``heat * mask(heat, hmax)`` as ``heat * Cast(q == q_max)`` (in place).

    ``heat`` and ``hmax`` must be ``Sigmoid(DequantizeLinear(.))`` of ``q`` and ``q_max`` with the same
    scale and zero point, behind the same Transposes; the mask either ``Cast(Equal(heat, hmax))`` or
    ``1 - Ceil(hmax - heat)`` with ``q_max = MaxPool(q)`` (then ``hmax >= heat`` and the two forms agree).
    (ONNX Runtime's ``Where`` would save the Cast but measured 4-10x slower than Cast + Mul.) Run after
    :func:`pool_quantized_logits`. ``score_floor``: see the module docstring. Returns the number of masks
    rewritten.
    """
    inits = initializers(model.graph)
    prod = producers(model.graph)
    taken = {n.name for n in model.graph.node} | set(inits)
    rewritten = 0
    for mul in list(model.graph.node):
        if mul.op_type != "Mul" or len(mul.input) != 2:
            continue
        for heat_index in (0, 1):
            match = _peak_mask(model, mul.input[heat_index], mul.input[1 - heat_index], prod, inits, score_floor)
            if match is None:
                continue
            quantized, quantized_max, perm = match
            new_nodes, compared = [], []
            for name in (quantized, quantized_max):
                if perm is not None:
                    moved = unique_name(f"{name}_transposed", taken)
                    new_nodes.append(helper.make_node("Transpose", [name], [moved], perm=perm,
                                                      name=unique_name(f"{name}_transpose", taken)))
                    name = moved
                compared.append(name)
            is_peak = unique_name(f"{mul.output[0]}_is_peak", taken)
            peak_mask = unique_name(f"{mul.output[0]}_peak_mask", taken)
            new_nodes += [
                helper.make_node("Equal", compared, [is_peak], name=unique_name(f"{mul.name}_is_peak", taken)),
                helper.make_node("Cast", [is_peak], [peak_mask], to=TensorProto.FLOAT,
                                 name=unique_name(f"{mul.name}_peak_mask", taken)),
                helper.make_node("Mul", [mul.input[heat_index], peak_mask], [mul.output[0]],
                                 name=unique_name(f"{mul.name}_peaks", taken)),
            ]
            _replace(model, mul, new_nodes)
            rewritten += 1
            break
    if rewritten:
        remove_dead_nodes(model)
    return rewritten


def _peak_mask(model: onnx.ModelProto, heat: str, mask: str, prod: dict[str, onnx.NodeProto],
               inits: dict[str, onnx.TensorProto], score_floor: float) -> tuple[str, str, list[int] | None] | None:
    """``(q, q_max, perm)`` when ``heat * mask`` is a peak mask over quantized logits, else None."""
    compared = _mask_operands(model, mask, prod)
    if compared is None:
        return None
    heat_source = _sigmoid_of_dequantized(heat, prod, inits)
    left, right = (_sigmoid_of_dequantized(name, prod, inits) for name in compared[:2])
    if heat_source is None or left is None or right is None:
        return None
    (q_heat, dq_heat, perm), (q_left, dq_left, perm_left), (q_right, dq_right, perm_right) = (
        heat_source, left, right)
    if not (perm == perm_left == perm_right) or q_left == q_right:
        return None
    if not (list(dq_heat.input[1:]) == list(dq_left.input[1:]) == list(dq_right.input[1:])):
        return None
    if compared[2]:  # 1 - Ceil(hmax - heat): hmax must be the pool of heat
        pool = prod.get(q_right)
        if q_left != q_heat or pool is None or pool.op_type != "MaxPool" or pool.input[0] != q_heat:
            return None
        if not _contains_centre(pool):
            return None
        pooled = q_right
    else:
        pooled = {q_left: q_right, q_right: q_left}.get(q_heat)
        if pooled is None:
            return None
    if not _keeps_level_order(dq_heat, inits, score_floor, strict=True):
        return None
    return q_heat, pooled, perm


def _mask_operands(model: onnx.ModelProto, mask: str, prod: dict[str, onnx.NodeProto]) -> tuple[str, str, bool] | None:
    """``(heat_side, hmax_side, needs_hmax_ge_heat)`` of a 0/1 peak mask, else None.

    ``Cast(Equal(a, b), FLOAT)`` is symmetric; ``1 - Ceil(b - a)`` is the mask only when ``b >= a``.
    """
    node = prod.get(mask)
    if node is None:
        return None
    if node.op_type == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        equal = prod.get(node.input[0])
        if to == TensorProto.FLOAT and equal is not None and equal.op_type == "Equal":
            return equal.input[0], equal.input[1], False
        return None
    if node.op_type == "Sub" and _is_scalar(model, node.input[0], 1.0):
        ceil = prod.get(node.input[1])
        diff = prod.get(ceil.input[0]) if ceil is not None and ceil.op_type == "Ceil" else None
        if diff is not None and diff.op_type == "Sub":
            return diff.input[1], diff.input[0], True
    return None


def _is_scalar(model: onnx.ModelProto, name: str, value: float) -> bool:
    array = constant_array(model, name)
    return array is not None and array.size == 1 and float(array.reshape(())) == value


def _contains_centre(pool: onnx.NodeProto) -> bool:
    """A stride-1 pool whose window covers its own cell (then ``MaxPool(x) >= x`` everywhere)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in pool.attribute}
    kernel = list(attrs.get("kernel_shape", []))
    strides = list(attrs.get("strides", [1] * len(kernel)))
    pads = list(attrs.get("pads", [0] * 2 * len(kernel)))
    dilations = list(attrs.get("dilations", [1] * len(kernel)))
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or any(s != 1 for s in strides):
        return False
    return all(0 <= pads[i] <= (kernel[i] - 1) * dilations[i] and pads[i] % dilations[i] == 0
               for i in range(len(kernel)))


def _sigmoid_of_dequantized(name: str, prod: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto]
                            ) -> tuple[str, onnx.NodeProto, list[int] | None] | None:
    """``(q, its DequantizeLinear, perm)`` when ``name`` is ``Transpose(perm)(Sigmoid(DQ(q)))``."""
    source, perm = _behind_transposes(name, prod)
    sigmoid = prod.get(source) if source is not None else None
    if sigmoid is None or sigmoid.op_type != "Sigmoid":
        return None
    dq = prod.get(sigmoid.input[0])
    if dq is None or dq.op_type != "DequantizeLinear" or not _per_tensor_positive_scale(dq, inits):
        return None
    return dq.input[0], dq, perm


def _behind_transposes(name: str, prod: dict[str, onnx.NodeProto]) -> tuple[str | None, list[int] | None]:
    """The tensor behind a chain of Transposes ending in ``name`` and the chain's net permutation (None for
    the identity); ``(None, None)`` if a Transpose has no explicit perm."""
    perms: list[list[int]] = []
    node = prod.get(name)
    while node is not None and node.op_type == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if perm is None or (perms and len(perm) != len(perms[0])):
            return None, None
        perms.append(perm)
        name = node.input[0]
        node = prod.get(name)
    if not perms:
        return name, None
    order = list(range(len(perms[0])))
    for perm in reversed(perms):  # innermost transpose first
        order = [order[i] for i in perm]
    return name, (None if order == sorted(order) else order)


def _per_tensor_positive_scale(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    if len(dq.input) < 2 or dq.input[1] not in inits:
        return False
    if len(dq.input) > 2 and dq.input[2] and (dq.input[2] not in inits or
                                                numpy_helper.to_array(inits[dq.input[2]]).size != 1):
        return False
    scale = numpy_helper.to_array(inits[dq.input[1]])
    return scale.size == 1 and float(scale.reshape(())) > 0


def _keeps_level_order(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto], floor: float,
                       strict: bool) -> bool:
    """Whether ONNX Runtime's ``Sigmoid(DequantizeLinear(k))`` keeps the order of the integer levels ``k``
    (strictly, or allowing ties) from the first level reaching ``floor`` on, every level below it lower.

    Evaluated in ONNX Runtime because its vectorised sigmoid, not numpy's, produces the values compared;
    the levels are tiled so the full-width kernel path computes them, and must agree across the tiles.
    """
    values = _sigmoid_of_levels(dq, inits)
    if values is None:
        return False
    above = np.flatnonzero(values >= floor)
    if above.size == 0:
        return True
    first = int(above[0])
    steps = np.diff(values[first:])
    ordered = bool(np.all(steps > 0)) if strict else bool(np.all(steps >= 0))
    return ordered and bool(np.all(values[:first] < values[first]))


def _sigmoid_of_levels(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    scale = numpy_helper.to_array(inits[dq.input[1]]).reshape(())
    zero_point = (numpy_helper.to_array(inits[dq.input[2]]).reshape(()) if len(dq.input) > 2 and dq.input[2]
                  else np.zeros((), np.uint8))
    info = np.iinfo(zero_point.dtype)
    levels = np.arange(info.min, info.max + 1).astype(zero_point.dtype)
    tiled = np.tile(levels, 64)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["x"]),
         helper.make_node("Sigmoid", ["x"], ["y"])], "levels",
        [helper.make_tensor_value_info("q", helper.np_dtype_to_tensor_dtype(levels.dtype), [tiled.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tiled.size])],
        [numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(zero_point, "zero_point")])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    probe.ir_version = 8
    session = create_session(probe, threads=1)
    values = session.run(None, {"q": tiled})[0].reshape(64, levels.size)
    return values[0] if np.all(values == values[0]) else None


def _replace(model: onnx.ModelProto, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
    index = list(model.graph.node).index(old)
    model.graph.node.remove(old)
    for offset, node in enumerate(new):
        model.graph.node.insert(index + offset, node)
