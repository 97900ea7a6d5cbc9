"""Per-layer int8-vs-fp32 error (a Polygraphy-style layer comparison), label-free, streaming.

The fp32 model and a quantized candidate that keeps the fp32 tensor names (the TensorRT Q/DQ graph from
:mod:`qdq` does: Q/DQ pairs are inserted on inputs, every original node keeps its outputs) are run on the
same calibration batches with the network's tensors exposed as outputs. Per tensor only sums leave each
batch, so memory does not grow with the number of images:

* ``rel_error``: ``sum (q - f)^2 / sum f^2`` (noise-to-signal power; 0.01 is 20 dB SNR);
* ``cosine``: cosine similarity of the flattened tensors;
* ``mean_shift``: ``|mean(q - f)| / rms(f)``, the part of the error that bias correction can remove;
* ``growth``: ``rel_error`` of the tensor over the largest ``rel_error`` of the network tensors feeding
  its producer: above 1 the node adds error, below 1 it averages error away.

Each tensor is also tagged with what it is (:func:`tensor_kinds`: hard-swish output, squeeze-excite
scale, depthwise output, concat input, head output...), found from the graph's structure, never from
names, so the report can say which kinds of tensors dominate the error.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from centernet_edge.runtime.atomic import atomic_write_text
from centernet_edge.runtime.onnx_graph import (
    FLOAT_TYPES,
    consumers,
    initializers,
    is_depthwise_conv,
    producers,
    prune_to_outputs,
    tensor_types,
)
from centernet_edge.runtime.onnx_session import create_session

from .placement import GraphRegions, graph_regions

__all__ = ["TensorError", "compare_tensors", "layer_error_markdown", "network_tensors", "tensor_kinds",
           "write_layer_errors"]

# Ops a value passes through unchanged in meaning when looking for the structure around a tensor.
_SHAPE_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten"})
_SCALAR_OPS = frozenset({"Mul", "Div", "Add", "Sub"})


@dataclass(frozen=True)
class TensorError:
    """int8-vs-fp32 error of one tensor over the compared images (see module docstring)."""

    tensor: str
    producer: str
    op_type: str
    kinds: tuple[str, ...]
    rel_error: float
    cosine: float
    mean_shift: float
    max_abs: float
    growth: float | None

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["kinds"] = list(self.kinds)
        return doc


def network_tensors(model: onnx.ModelProto, regions: GraphRegions | None = None) -> list[str]:
    """Float outputs of the network region's nodes, in graph order (what the comparison looks at)."""
    regions = regions or graph_regions(model)
    types = tensor_types(model)
    names: list[str] = []
    for node in model.graph.node:
        if node.name not in regions.network:
            continue
        names.extend(o for o in node.output if o and types.get(o, onnx.TensorProto.FLOAT) in FLOAT_TYPES)
    return list(dict.fromkeys(names))


def _through(name: str, prod: Mapping[str, onnx.NodeProto], inits: Mapping[str, onnx.TensorProto],
             skip: frozenset[str], depth: int = 4) -> onnx.NodeProto | None:
    """The first producer of ``name`` that is not a shape op or a scaling by a constant."""
    node = prod.get(name)
    for _ in range(depth):
        if node is None:
            return None
        if node.op_type in skip or (node.op_type in _SCALAR_OPS
                                    and any(i in inits for i in node.input)):
            data = [i for i in node.input if i and i not in inits and i in prod]
            if not data:
                return None
            node = prod[data[0]]
            continue
        return node
    return node


def _gate_source(name: str, prod: Mapping[str, onnx.NodeProto], inits: Mapping[str, onnx.TensorProto]
                 ) -> str | None:
    """``"hard-swish"`` when ``name`` is ``clip(x + 3, 0, 6) / 6`` of the Mul's other input,
    ``"squeeze-excite"`` when it is a gate computed from a GlobalAveragePool."""
    node = _through(name, prod, inits, _SHAPE_OPS)
    if node is None or node.op_type not in ("Clip", "Relu", "HardSigmoid", "Sigmoid"):
        return None
    seen = 0
    stack = [i for i in node.input if i and i not in inits]
    while stack and seen < 12:
        seen += 1
        current = prod.get(stack.pop())
        if current is None:
            continue
        if current.op_type == "GlobalAveragePool":
            return "squeeze-excite"
        stack.extend(i for i in current.input if i and i not in inits)
    return "hard-swish"


def tensor_kinds(model: onnx.ModelProto, regions: GraphRegions | None = None) -> dict[str, tuple[str, ...]]:
    """Structural tags per network tensor (see module docstring). A tensor may carry several tags."""
    regions = regions or graph_regions(model)
    graph = model.graph
    prod = producers(graph)
    cons = consumers(graph)
    inits = initializers(graph)
    dims = {name: list(init.dims) for name, init in inits.items()}
    kinds: dict[str, list[str]] = {}
    for name in network_tensors(model, regions):
        node = prod[name]
        tags: list[str] = []
        if node.op_type == "Conv":
            tags.append("depthwise conv" if is_depthwise_conv(node, dims, multiplier=True) else "conv")
        elif node.op_type in ("Relu", "Clip") and node.input[0] in prod \
                and is_depthwise_conv(prod[node.input[0]], dims, multiplier=True):
            tags.append("depthwise conv")
        if node.op_type == "Mul" and all(i not in inits for i in node.input[:2]):
            gates = [_gate_source(i, prod, inits) for i in node.input[:2]]
            if "squeeze-excite" in gates:
                tags.append("squeeze-excite scaled")
            elif "hard-swish" in gates:
                tags.append("hard-swish")
        if node.op_type in ("Clip", "HardSigmoid") and any(
                c.op_type == "Mul" for c in cons.get(name, [])):
            tags.append("gate")
        if node.op_type == "Add" and all(i not in inits for i in node.input[:2]):
            tags.append("residual add")
        readers = cons.get(name, [])
        if any(c.op_type == "Concat" for c in readers):
            tags.append("concat input")
        if any(c.name in regions.decode for c in readers) or name in {o.name for o in graph.output}:
            tags.append("head output")
        kinds[name] = tuple(tags) or (node.op_type.lower(),)
    return kinds


class _Sums:
    __slots__ = ("count", "diff_sq", "ref_sq", "cand_sq", "dot", "diff_sum", "ref_sum", "max_abs")

    def __init__(self) -> None:
        self.count = 0
        self.diff_sq = self.ref_sq = self.cand_sq = self.dot = self.diff_sum = self.ref_sum = 0.0
        self.max_abs = 0.0

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        f = np.asarray(ref, dtype=np.float64).ravel()
        q = np.asarray(cand, dtype=np.float64).ravel()
        d = q - f
        self.count += f.size
        self.diff_sq += float(d @ d)
        self.ref_sq += float(f @ f)
        self.cand_sq += float(q @ q)
        self.dot += float(f @ q)
        self.diff_sum += float(d.sum())
        self.ref_sum += float(f.sum())
        if d.size:
            self.max_abs = max(self.max_abs, float(np.abs(d).max()))


def compare_tensors(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    batches: Iterable[np.ndarray],
    input_name: str,
    tensors: Sequence[str] | None = None,
    kinds: Mapping[str, tuple[str, ...]] | None = None,
    threads: int = 1,
) -> list[TensorError]:
    """Per-tensor error of ``candidate`` against ``reference`` over ``batches`` (graph-input arrays), in
    graph order. ``tensors`` defaults to :func:`network_tensors` of the reference; names missing from the
    candidate are skipped."""
    names = list(tensors) if tensors is not None else network_tensors(reference)
    cand_known = {o for n in candidate.graph.node for o in n.output}
    names = [n for n in names if n in cand_known]
    if not names:
        raise ValueError("no tensor to compare: the candidate renamed every network tensor")
    ref_session = create_session(prune_to_outputs(reference, names), threads=threads)
    cand_session = create_session(prune_to_outputs(candidate, names), threads=threads)
    sums = {n: _Sums() for n in names}
    for batch in batches:
        ref_values = ref_session.run(names, {input_name: batch})
        cand_values = cand_session.run(names, {input_name: batch})
        for name, f, q in zip(names, ref_values, cand_values, strict=True):
            sums[name].add(f, q)
        del ref_values, cand_values
    prod = producers(reference.graph)
    kinds = kinds if kinds is not None else tensor_kinds(reference)
    rel: dict[str, float] = {}
    rows: list[TensorError] = []
    for name in names:
        s = sums[name]
        rel[name] = s.diff_sq / s.ref_sq if s.ref_sq > 0 else (0.0 if s.diff_sq == 0 else float("inf"))
        norm = np.sqrt(s.ref_sq * s.cand_sq)
        rms = np.sqrt(s.ref_sq / s.count) if s.count else 0.0
        node = prod[name]
        feeding = [rel[i] for i in node.input if i in rel]
        base = max(feeding) if feeding else 0.0
        rows.append(TensorError(
            tensor=name, producer=node.name, op_type=node.op_type, kinds=tuple(kinds.get(name, ())),
            rel_error=rel[name], cosine=float(s.dot / norm) if norm > 0 else 1.0,
            mean_shift=float(abs(s.diff_sum) / s.count / rms) if rms > 0 else 0.0,
            max_abs=s.max_abs, growth=rel[name] / base if base > 0 else None))
    return rows


def kind_summary(rows: Sequence[TensorError]) -> dict[str, dict[str, float]]:
    """Per tag: how many tensors, their mean error and mean growth (which kinds of tensors add error)."""
    out: dict[str, dict[str, float]] = {}
    for kind in sorted({k for r in rows for k in r.kinds}):
        members = [r for r in rows if kind in r.kinds]
        growth = [r.growth for r in members if r.growth is not None]
        out[kind] = {"tensors": len(members), "mean_rel_error": float(np.mean([r.rel_error for r in members])),
                     "mean_growth": float(np.mean(growth)) if growth else float("nan"),
                     "max_growth": float(np.max(growth)) if growth else float("nan")}
    return out


def layer_error_markdown(rows: Sequence[TensorError], top: int | None = 25) -> str:
    """The layers that add most error (largest growth first), then the per-kind summary."""
    ranked = sorted((r for r in rows if r.growth is not None), key=lambda r: (-r.growth, r.tensor))
    lines = ["| producer | op | kinds | rel. error | growth | cosine | mean shift |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in ranked[:top] if top else ranked:
        lines.append(f"| `{r.producer}` | {r.op_type} | {', '.join(r.kinds)} | {r.rel_error:.4g} | "
                     f"{r.growth:.2f} | {r.cosine:.5f} | {r.mean_shift:.4f} |")
    lines += ["", "| kind | tensors | mean rel. error | mean growth | max growth |", "|---|---:|---:|---:|---:|"]
    for kind, s in kind_summary(rows).items():
        lines.append(f"| {kind} | {s['tensors']:.0f} | {s['mean_rel_error']:.4g} | {s['mean_growth']:.2f} | "
                     f"{s['max_growth']:.2f} |")
    return "\n".join(lines) + "\n"


def write_layer_errors(rows: Sequence[TensorError], json_path: str | Path, md_path: str | Path,
                       meta: Mapping[str, Any] | None = None) -> None:
    """layer_error.json (every tensor in graph order) and layer_error.md (the ranked view)."""
    doc = {"meta": dict(meta or {}), "tensors": [r.to_dict() for r in rows], "kinds": kind_summary(rows)}
    atomic_write_text(json_path, json.dumps(doc, indent=2) + "\n")
    header = "# Per-layer int8 error against fp32 (label-free, calibration images)\n\n"
    if meta:
        header += "".join(f"- {k}: {v}\n" for k, v in meta.items()) + "\n"
    atomic_write_text(md_path, header + layer_error_markdown(rows))
