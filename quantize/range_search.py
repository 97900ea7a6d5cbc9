"""Per-tensor range choice by the error it causes in the layer that reads the tensor (label-free).

A histogram method judges a clipping range by the tensor's own values. What matters is the output of the
layer reading it: a 3x3 depthwise conv averages nothing away and suffers from a wide range, a 1x1 conv
over hundreds of channels averages rounding noise and suffers from clipping. So for every calibrated
tensor the candidate ranges (each histogram method's amax, and a few percentiles) are replayed through the
layers that read it, with their per-channel int8 weights, on calibration images:

    error(c) = sum over readers L of  ||L(q_c(x), W_q) - L(x, W)||^2 / ||L(x, W)||^2

and the candidate with the smallest error wins (ties: the earlier candidate). Readers that are not a plain
2-D ``Conv`` (residual Add, pooling, Gemm...) are scored by the tensor's own quantization error, which is
what their output inherits. Batches stream: per batch the fp32 activations come out of ONNX Runtime, are
replayed with torch on CPU and reduced to sums, and are dropped (memory: one batch of activations).
Inputs are fp32 (each layer judged on its own, not on error accumulated upstream), which keeps the search
one pass and the choice per tensor independent of the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from centernet_edge.runtime.onnx_graph import initializers, prune_to_outputs
from centernet_edge.runtime.onnx_session import create_session

from .placement import QuantLayer
from .qdq import quantize_weight_per_channel

__all__ = ["RangeChoice", "conv_attributes", "fake_quant", "replay_conv", "search_ranges"]


@dataclass
class RangeChoice:
    """The chosen amax per tensor, which candidate it was, and every candidate's error."""

    amax: dict[str, float]
    chosen: dict[str, str]
    errors: dict[str, dict[str, float]] = field(default_factory=dict)


def fake_quant(x: np.ndarray, amax: float) -> np.ndarray:
    """Symmetric int8 round trip of ``x`` with range ``amax`` (what a Q/DQ pair computes)."""
    scale = np.float32(max(float(amax), 1e-12) / 127.0)
    return (np.clip(np.rint(x / scale), -127, 127) * scale).astype(np.float32)


def conv_attributes(node: onnx.NodeProto) -> dict[str, object] | None:
    """Strides, pads (begin/end per axis), dilations and groups of a 2-D Conv; None when the node uses
    ``auto_pad`` or is not 2-D (those readers are scored by the tensor's own error)."""
    attrs = {a.name: a for a in node.attribute}
    if "auto_pad" in attrs and attrs["auto_pad"].s not in (b"", b"NOTSET"):
        return None
    if "kernel_shape" in attrs and len(attrs["kernel_shape"].ints) != 2:
        return None
    pads = list(attrs["pads"].ints) if "pads" in attrs else [0, 0, 0, 0]
    return {
        "strides": list(attrs["strides"].ints) if "strides" in attrs else [1, 1],
        "pads": pads,
        "dilations": list(attrs["dilations"].ints) if "dilations" in attrs else [1, 1],
        "group": attrs["group"].i if "group" in attrs else 1,
    }


def replay_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, attrs: Mapping[str, object]
                ) -> np.ndarray:
    """ONNX 2-D Conv in torch (NCHW float32); used to replay a layer on cached activations."""
    import torch
    import torch.nn.functional as F

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.require(a, dtype=np.float32, requirements=["C", "W"]))

    pads = list(attrs["pads"])  # type: ignore[arg-type]
    t = tensor(x)
    if any(pads):
        t = F.pad(t, (pads[1], pads[3], pads[0], pads[2]))
    b = None if bias is None else tensor(bias)
    with torch.no_grad():
        y = F.conv2d(t, tensor(weight), b,
                     stride=list(attrs["strides"]), dilation=list(attrs["dilations"]),  # type: ignore[arg-type]
                     groups=int(attrs["group"]))  # type: ignore[call-overload]
    return y.numpy()


@dataclass
class _Reader:
    attrs: dict[str, object] | None
    weight: np.ndarray | None = None
    weight_q: np.ndarray | None = None
    bias: np.ndarray | None = None


def _readers(model: onnx.ModelProto, layers: Sequence[QuantLayer]) -> dict[str, list[_Reader]]:
    inits = initializers(model.graph)
    nodes = {n.name: n for n in model.graph.node}
    out: dict[str, list[_Reader]] = {}
    for layer in layers:
        node = nodes[layer.name]
        for tensor in layer.inputs:
            attrs = conv_attributes(node) if node.op_type == "Conv" and layer.weight is not None else None
            reader = _Reader(attrs)
            if attrs is not None:
                w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
                q, scales = quantize_weight_per_channel(w, 0)
                reader.weight = w
                reader.weight_q = (q.astype(np.float32) * scales.reshape(-1, 1, 1, 1)).astype(np.float32)
                if len(node.input) > 2 and node.input[2] in inits:
                    reader.bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
            out.setdefault(tensor, []).append(reader)
    return out


def search_ranges(
    model: onnx.ModelProto,
    layers: Sequence[QuantLayer],
    candidates: Mapping[str, Mapping[str, float]],
    batches: Iterable[np.ndarray],
    input_name: str,
    threads: int = 1,
) -> RangeChoice:
    """Pick, per tensor read by ``layers``, the candidate amax (``candidates[label][tensor]``) whose int8
    round trip changes the reading layers' outputs least on ``batches`` (see module docstring)."""
    labels = list(candidates)
    if not labels:
        raise ValueError("no candidate ranges to choose from")
    readers = _readers(model, layers)
    tensors = [t for t in readers if all(t in candidates[label] for label in labels)]
    missing = sorted(set(readers) - set(tensors))
    if missing:
        raise ValueError(f"no candidate range for {len(missing)} tensor(s), e.g. {missing[:3]}")
    session = create_session(prune_to_outputs(model, tensors), threads=threads)
    num = {t: np.zeros((len(readers[t]), len(labels))) for t in tensors}
    den = {t: np.zeros(len(readers[t])) for t in tensors}
    for batch in batches:
        values = session.run(tensors, {input_name: batch})
        for tensor, x in zip(tensors, values, strict=True):
            x = np.asarray(x, dtype=np.float32)
            quantized = [fake_quant(x, candidates[label][tensor]) for label in labels]
            for r, reader in enumerate(readers[tensor]):
                if reader.attrs is None:
                    den[tensor][r] += float(np.square(x, dtype=np.float64).sum())
                    for c, xq in enumerate(quantized):
                        num[tensor][r, c] += float(np.square(xq - x, dtype=np.float64).sum())
                    continue
                y = replay_conv(x, reader.weight, reader.bias, reader.attrs)  # type: ignore[arg-type]
                den[tensor][r] += float(np.square(y, dtype=np.float64).sum())
                for c, xq in enumerate(quantized):
                    yq = replay_conv(xq, reader.weight_q, reader.bias, reader.attrs)  # type: ignore[arg-type]
                    num[tensor][r, c] += float(np.square(yq - y, dtype=np.float64).sum())
        del values
    choice = RangeChoice({}, {}, {})
    for tensor in tensors:
        d = np.where(den[tensor] > 0, den[tensor], 1.0)[:, None]
        total = (num[tensor] / d).sum(axis=0)
        best = int(np.argmin(total))  # first minimum: the earlier candidate wins ties
        choice.amax[tensor] = float(candidates[labels[best]][tensor])
        choice.chosen[tensor] = labels[best]
        choice.errors[tensor] = {label: float(e) for label, e in zip(labels, total, strict=True)}
    return choice
