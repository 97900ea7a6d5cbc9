"""int8 ONNX for CPU inference in ONNX Runtime, built from *our* calibrated ranges.

Why a second int8 artifact: the TensorRT Q/DQ graph (signed int8 activations, Q/DQ only on inputs) runs
*slower* than fp32 in ONNX Runtime's CPU provider, whose fast kernels (QLinearConv with VNNI/AVX2) want
uint8 activations, int8 weights and a Q node after every quantized op so the graph optimizer can fuse
DQ -> op -> Q into one integer kernel. ONNX Runtime's own quantizer writes exactly that layout; here it is
driven with our ranges (``tensors_range``), so no ONNX Runtime calibrator runs:

* activation ranges are asymmetric uint8 ``[lo, hi]`` from the observed min/max clipped to the calibrated
  amax (a ReLU output gets [0, amax] and all 256 levels);
* weights are per-channel symmetric int8;
* nodes outside the network region (pre-processing, decode tail), DeformConv and the layers computing its
  offsets/mask, layers the caller keeps float, and ops listed in ``float_ops`` stay float; the head convs
  feeding the decode tail optionally too (``float_head_outputs``).

ONNX Runtime's integer kernels have their own cost model, so by default (``kernel_rewrites``) the graph
is first rewritten for them, without changing what it computes (:mod:`cpu_rewrites`): depthwise channel
groups padded to multiples of 16, the stem convolution over the image kept float, constant scalings
folded into scales; peak NMS runs on the uint8 logits (:mod:`quantized_peaks`). Resize stays float
between DQ and Q (ONNX Runtime's uint8 bilinear resize measured 3x slower than its float one plus the
conversions), and concat inputs are quantized with the concat's output range (``shared_concat_ranges``)
so ``QLinearConcat`` copies instead of requantizing. Measured on the mb3 CenterNet (MobileNetV3:
depthwise convs, hard-swish), one thread: 1.3x fp32 without these, about 1.85x with them; see
scripts/bench_calibration.py and scripts/bench_cpu_kernels.py.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from centernet_edge.runtime.onnx_graph import is_depthwise_conv, remove_dead_nodes, topological_sort

from .cpu_rewrites import (
    affine_as_depthwise_convs,
    fold_constant_scaling,
    image_blocks,
    image_convolutions,
    pad_depthwise_channels,
)
from .float_layers import shield_float_layers
from .placement import GraphRegions, graph_regions
from .quantized_peaks import mask_peaks_on_quantized_logits, pool_quantized_logits

__all__ = [
    "DEFAULT_CPU_OPS",
    "decode_input_ranges",
    "CpuInt8Config",
    "build_ort_cpu_int8",
    "build_ort_cpu_int8_with_report",
    "depthwise_convs",
    "float_feeders",
    "ort_ranges",
    "quantized_node_count",
    "shared_concat_ranges",
]

# Ops ONNX Runtime has integer kernels for on CPU and that appear in CenterNet networks.
# Resize is left out on purpose: ONNX Runtime's uint8 bilinear Resize is ~3x slower than DQ -> float
# Resize -> Q (measured on mb3's 2x upsamplings), and the float one rounds once instead of twice.
DEFAULT_CPU_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "Concat", "Relu", "Clip",
                   "MaxPool", "GlobalAveragePool", "AveragePool", "Sigmoid", "Reshape", "Transpose")


@dataclass(frozen=True)
class CpuInt8Config:
    """What to quantize. ``fmt`` "qoperator" (QLinear* ops written out) or "qdq" (ORT fuses at load time).

    QOperator is the default because it measured fastest on mb3 (1.87x fp32 vs 1.35x for QDQ, one thread,
    AVX-512 VNNI); QDQ drifted less from fp32 (25.7 vs 24.2 AP on the dev set) and is the format that can
    hand float layers their float inputs back.
    """

    op_types: tuple[str, ...] = DEFAULT_CPU_OPS
    fmt: str = "qoperator"
    per_channel: bool = True
    keep_depthwise_float: bool = False
    # The head convs feeding the decode tail: float keeps the logits unrounded before the sigmoid
    # (label-free head error 0.50 vs 0.55 on mb3) but costs speed (1.1x vs 1.3x fp32), because ONNX
    # Runtime's integer conv must write uint8.
    float_head_outputs: bool = False
    float_ops: tuple[str, ...] = ()
    # Float-exact rewrites for ONNX Runtime's integer kernels (see cpu_rewrites); off only to measure them.
    kernel_rewrites: bool = True
    # Concat inputs quantized with the output's range (see shared_concat_ranges); off only to measure it.
    shared_concat_ranges: bool = True


def ort_ranges(
    amax: Mapping[str, float], observed: Mapping[str, tuple[float, float]] | None = None
) -> dict[str, tuple[float, float]]:
    """uint8 ranges ``(lo, hi)``: observed min/max clipped to ``[-amax, amax]``; symmetric without them.

    The range always contains 0 (ONNX Runtime's zero point must be representable).
    """
    out = {}
    for name, a in amax.items():
        a = float(a)
        lo, hi = (-a, a) if observed is None or name not in observed else observed[name]
        lo, hi = max(float(lo), -a), min(float(hi), a)
        out[name] = (min(lo, 0.0), max(hi, 0.0))
    return out


def depthwise_convs(model: onnx.ModelProto) -> list[str]:
    """Grouped convolutions with one input channel per group.

    ONNX Runtime's int8 depthwise kernel is no faster than its fp32 NCHWc one on x86 (measured), and a
    per-tensor activation scale hurts depthwise layers most. Keeping them float still measured slower
    overall (the Q/DQ transitions around them cost more), so it is an option, not the default.
    """
    dims = {init.name: list(init.dims) for init in model.graph.initializer}
    return [node.name for node in model.graph.node if is_depthwise_conv(node, dims, multiplier=True)]


def _tensors_data(ranges: Mapping[str, tuple[float, float]]):
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

    data = {
        name: TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
        for name, (lo, hi) in ranges.items()
    }
    return TensorsData(CalibrationMethod.MinMax, data)


def build_ort_cpu_int8(
    model: onnx.ModelProto,
    ranges: Mapping[str, tuple[float, float]],
    *,
    keep_float: Iterable[str] = (),
    config: CpuInt8Config | None = None,
    regions: GraphRegions | None = None,
) -> onnx.ModelProto:
    """A uint8-activation / int8-weight model for ONNX Runtime CPU (see module docstring).

    ``ranges`` must cover every activation the chosen ops read or write; nodes whose tensors have no
    range are left in float by excluding them up front (ONNX Runtime's quantizer would otherwise fail).
    """
    return build_ort_cpu_int8_with_report(model, ranges, keep_float=keep_float, config=config,
                                          regions=regions)[0]


def build_ort_cpu_int8_with_report(
    model: onnx.ModelProto,
    ranges: Mapping[str, tuple[float, float]],
    *,
    keep_float: Iterable[str] = (),
    config: CpuInt8Config | None = None,
    regions: GraphRegions | None = None,
) -> tuple[onnx.ModelProto, dict[str, int]]:
    """:func:`build_ort_cpu_int8` and how often each graph change applied (for summary.json)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode

    config = config or CpuInt8Config()
    if config.fmt not in ("qdq", "qoperator"):
        raise ValueError(f"fmt must be 'qdq' or 'qoperator'; got {config.fmt!r}")
    regions = regions or graph_regions(model)
    keep_float = set(keep_float)
    report: dict[str, int] = {}
    if config.kernel_rewrites:
        model = copy.deepcopy(model)
        # tensor and node names are kept: ranges and regions still apply (the new convs belong to no region
        # list, so they are quantized like the network around them)
        report["affine_as_depthwise_convs"] = affine_as_depthwise_convs(
            model, skip=keep_float | set(regions.preprocess) | set(regions.decode))
        report["depthwise_groups_padded"] = len(pad_depthwise_channels(model))
        images = image_convolutions(model, regions.network)
        report["image_convolutions_float"] = len(images)
        blocks = image_blocks(model, regions.network, images)
        report["image_block_nodes_float"] = len(blocks)
        keep_float |= set(images) | set(blocks)
    exclude = _excluded_nodes(model, regions, ranges, keep_float, config)
    if config.shared_concat_ranges:
        shared = shared_concat_ranges(model, ranges, exclude)
        report["concat_tensors_given_shared_range"] = sum(shared[t] != ranges.get(t) for t in shared)
        ranges = shared
    work = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    tensors = _tensors_data(ranges)
    # QDQKeepRemovableActivations=False lets Relu/Clip vanish into the uint8 range of the conv output.
    extra = {"ActivationSymmetric": False, "WeightSymmetric": True, "QDQKeepRemovableActivations": False}
    include = [n.name for n in work.graph.node if n.op_type in config.op_types and n.name not in exclude]
    if config.fmt == "qdq":
        quantizer = QDQQuantizer(work, config.per_channel, False, QuantType.QInt8, QuantType.QUInt8, tensors,
                                 include, sorted(exclude), list(config.op_types), extra)
    else:
        quantizer = ONNXQuantizer(work, config.per_channel, False, QuantizationMode.QLinearOps, True,
                                  QuantType.QInt8, QuantType.QUInt8, tensors, include, sorted(exclude),
                                  list(config.op_types), extra)
    producer_of = {o: n.name for n in model.graph.node for o in n.output}
    original_inputs = {n.name: [(t, producer_of.get(t)) for t in n.input] for n in model.graph.node
                       if n.name in exclude}
    quantizer.quantize_model()
    out = quantizer.model.model
    if config.fmt == "qdq":
        _float_inputs_for_float_nodes(out, original_inputs)
    if config.kernel_rewrites:
        if config.fmt == "qoperator":
            report["constant_scalings_folded"] = fold_constant_scaling(out)
        report["peak_pools_on_uint8"] = pool_quantized_logits(out)
        report["peak_masks_on_uint8"] = mask_peaks_on_quantized_logits(out)
        remove_dead_nodes(out)
    # else ONNX Runtime quantizes their weights per tensor at load time
    report["float_layers_shielded"] = len(shield_float_layers(out))
    # Inferred shapes of the fp32 graph are stale for the quantized one; ONNX Runtime re-infers them.
    del out.graph.value_info[:]
    topological_sort(out.graph)  # the quantizer appends its Q/DQ nodes at the end
    return out, report


def _float_inputs_for_float_nodes(model: onnx.ModelProto,
                                  original_inputs: Mapping[str, list[tuple[str, str | None]]]) -> None:
    """Let nodes kept in float read the float tensor instead of a shared Q -> DQ copy of it.

    ONNX Runtime's quantizer gives each quantized tensor one Q/DQ pair that every consumer reads, so a
    layer kept float would still see int8-rounded inputs, which is the error mixed precision avoids.
    Only a Q that reads the very tensor the node read before quantization, made by the same node, is
    bypassed: where the quantizer folded a Relu/Clip into the uint8 range it drops the activation and
    gives its output name to the conv, so that name then holds *pre-activation* values and the clamp
    lives in the Q; such an input must stay quantized.
    """
    prod = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        before = original_inputs.get(node.name)
        if before is None:
            continue
        for i, name in enumerate(node.input):
            dq = prod.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or i >= len(before):
                continue
            q = prod.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            tensor, producer = before[i]
            now = prod.get(tensor)
            if q.input[0] == tensor and (now.name if now is not None else None) == producer:
                node.input[i] = tensor


def decode_input_ranges(model: onnx.ModelProto, regions: GraphRegions, ranges: Mapping[str, tuple[float, float]],
                        observed: Mapping[str, tuple[float, float]], score_floor: float | None = None
                        ) -> dict[str, tuple[float, float]]:
    """Ranges where the head outputs the decode tail reads (its uint8 inputs in this graph; float in the
    TensorRT one) keep their observed maximum, and the heatmap logits drop what no detection needs.

    A range clipped at the top saturates exactly what matters most: the strongest heatmap peaks (ties among
    the best detections) and the largest box sizes. Below, logits under ``logit(score_floor)`` (the lowest
    score that still made a top-K on calibration images) change no top-K there; clamping them gives the
    logits that do matter a finer step (mb3: [-14.8, 2.7] -> [-6.6, 2.7], 1.9x finer).
    """
    out = dict(ranges)
    decode = set(regions.decode)
    network = set(regions.network)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    floor = None
    if score_floor is not None and 0.0 < score_floor < 1.0:
        floor = float(np.log(score_floor / (1.0 - score_floor)))
    for node in model.graph.node:
        if node.name not in network:
            continue
        for tensor in node.output:
            tail = [r for r in readers.get(tensor, []) if r.name in decode]
            if not tail or tensor not in out or tensor not in observed:
                continue
            lo, hi = (float(v) for v in observed[tensor])
            if floor is not None and any(r.op_type == "Sigmoid" for r in tail):
                lo = max(lo, floor)
            out[tensor] = (min(lo, 0.0), max(hi, 0.0))
    return out


def shared_concat_ranges(model: onnx.ModelProto, ranges: Mapping[str, tuple[float, float]],
                         exclude: Iterable[str] = ()) -> dict[str, tuple[float, float]]:
    """Ranges where every quantized Concat's inputs carry the range its output is quantized with.

    ONNX Runtime's ``QLinearConcat`` copies inputs whose scale and zero point equal the output's and
    requantizes the others through a table, about 3x slower (``scripts/bench_cpu_kernels.py``). TensorRT shares concat
    scales the same way. The concatenated values are then rounded once, at the output's scale, instead of
    twice. A Concat read only by a Relu or Clip is quantized with the activation's range (the
    quantizer folds the activation into it); inputs read by nothing else take that range too, which clips
    exactly what the activation would. Otherwise inputs and output share their union, and other readers
    of a narrower input see it at the coarser scale. Repeated until chains of concats agree.
    """
    out = dict(ranges)
    skip = set(exclude)
    inits = {i.name for i in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    changed = True
    while changed:
        changed = False
        for node in model.graph.node:
            if node.op_type != "Concat" or node.name in skip:
                continue
            inputs = [t for t in node.input if t and t not in inits]
            tensors = [*inputs, node.output[0]]
            if any(t not in out for t in tensors):
                continue
            activation = _folded_activation(node.output[0], readers, graph_outputs, skip)
            if activation is not None and activation in out:
                target = out[activation]
                tensors = [node.output[0]] + [t for t in inputs
                                              if len(readers.get(t, [])) == 1 and t not in graph_outputs]
            else:
                target = (min(out[t][0] for t in tensors), max(out[t][1] for t in tensors))
            for t in tensors:
                if out[t] != target:
                    out[t] = target
                    changed = True
    return out


def _folded_activation(tensor: str, readers: Mapping[str, list[onnx.NodeProto]], graph_outputs: set[str],
                       skip: set[str]) -> str | None:
    """The output of the Relu or Clip that alone reads ``tensor`` (ONNX Runtime's quantizer folds it into
    ``tensor``'s range), else None. Clamping commutes with Concat, so clamping the inputs is exact."""
    users = readers.get(tensor, [])
    if len(users) != 1 or tensor in graph_outputs or users[0].name in skip:
        return None
    user = users[0]
    return user.output[0] if user.op_type in ("Relu", "Clip") else None


def _excluded_nodes(model: onnx.ModelProto, regions: GraphRegions, ranges: Mapping[str, tuple[float, float]],
                    keep_float: set[str], config: CpuInt8Config) -> set[str]:
    inits = {i.name for i in model.graph.initializer}
    exclude = set(keep_float) | set(regions.preprocess) | set(regions.decode) | set(regions.constant)
    exclude |= float_feeders(model, regions, decode=config.float_head_outputs)
    if config.keep_depthwise_float:
        exclude |= set(depthwise_convs(model))
    for node in model.graph.node:
        if node.op_type == "DeformConv" or node.op_type in config.float_ops:
            exclude.add(node.name)
            continue
        if node.op_type not in config.op_types or node.name in exclude:
            continue
        data = [t for t in list(node.input[:1]) + list(node.output) if t and t not in inits]
        if node.op_type in ("Add", "Mul", "Concat"):
            data = [t for t in list(node.input) + list(node.output) if t and t not in inits]
        if any(t not in ranges for t in data):
            exclude.add(node.name)
    return exclude


def float_feeders(model: onnx.ModelProto, regions: GraphRegions, decode: bool = True) -> set[str]:
    """Network nodes whose results reach DeformConv's offsets/mask (and the decode tail when ``decode``),
    back to the weighted layer that computes them.

    Quantizing them would round the head logits to 256 levels before the sigmoid (ties in the peak
    TopK) or snap deformable sampling offsets to a grid; on TensorRT these tensors are never quantized
    either (no Q on weighted-layer outputs, no Q/DQ on DeformConv inputs).
    """
    prod = {o: n for n in model.graph.node for o in n.output if o}
    weighted = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
    stack: list[str] = []
    for node in model.graph.node:
        if decode and node.name in regions.decode:
            stack.extend(node.input)
        elif node.op_type == "DeformConv":
            stack.extend(node.input[i] for i in (2, 4) if i < len(node.input))
    found: set[str] = set()
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        node = prod.get(name)
        if not name or name in seen or node is None or node.name not in regions.network:
            continue
        seen.add(name)
        found.add(node.name)
        if node.op_type not in weighted:
            stack.extend(node.input)
    return found


def quantized_node_count(model: onnx.ModelProto) -> dict[str, int]:
    """How many integer ops / Q / DQ nodes a quantized graph holds (for reports)."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type.startswith("QLinear") or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts

