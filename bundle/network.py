"""The network-only graph (normalised float NCHW in; heatmap after sigmoid, wh, reg out) of any export."""

from __future__ import annotations

import copy

import onnx
from onnx.utils import Extractor

from centernet_edge.export.onnx_export import HEAD_NAMES, ExportOptions, build_spec
from centernet_edge.runtime.spec import ModelSpec

__all__ = ["NetworkCutError", "network_only", "network_only_spec"]

INPUT_NAME = "input"


class NetworkCutError(ValueError):
    """The model cannot be reduced to its network (no head tensors, no convolution input)."""


def network_only_spec(spec: ModelSpec) -> ModelSpec:
    """The spec of the ``--preprocess none --no-decode`` export of the same model."""
    pre = spec.preprocess
    options = ExportOptions(keep_res=pre.resize == "keep_res",
                            input_size=None if pre.resize == "keep_res" else tuple(pre.input_size),
                            preprocess="none", decode=False, batch=spec.graph.batch, topk=spec.decode.K)
    graph = build_spec(arch=spec.arch, source=spec.source if spec.source != "foreign" else "official",
                       num_classes=spec.num_classes, options=options, keep_res_pad=pre.pad).graph
    out = copy.deepcopy(spec)
    out.graph = graph
    out.decode.heatmap_activation = "sigmoid"  # the graph's sigmoid is part of the network-only model
    return out.validate()


def _network_input(model: onnx.ModelProto) -> str:
    """The tensor the network starts from: the data input of the first convolution."""
    inits = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvInteger", "QLinearConv") and node.input[0] not in inits:
            return node.input[0]
    raise NetworkCutError("the graph has no convolution: cannot find where the network starts")


def network_only(model: onnx.ModelProto, spec: ModelSpec) -> tuple[onnx.ModelProto, ModelSpec]:
    """Cut ``model`` (any centernet-export variant) down to the network: ``input`` -> heatmap, wh, reg.

    A model that already is the network-only variant comes back unchanged (with its spec). Otherwise the
    pre-processing in front of the first convolution and the decode behind the heads are cut away.
    """
    net_spec = network_only_spec(spec)
    if spec.graph.preprocess == "none" and not spec.graph.decode:
        return model, net_spec
    produced = {o for n in model.graph.node for o in n.output}
    missing = [h for h in HEAD_NAMES if h not in produced and h not in {o.name for o in model.graph.output}]
    if missing:
        raise NetworkCutError(f"the graph has no head tensors {missing}; was it written by centernet-export?")
    start = _network_input(model)
    if spec.graph.preprocess == "none":
        start = spec.graph.input.name
    inferred = onnx.shape_inference.infer_shapes(model)
    cut = Extractor(inferred).extract_model([start], list(HEAD_NAMES))
    for node in cut.graph.node:
        for i, name in enumerate(node.input):
            if name == start:
                node.input[i] = INPUT_NAME
    (graph_input,) = [i for i in cut.graph.input if i.name == start]
    graph_input.name = INPUT_NAME
    dims = graph_input.type.tensor_type.shape.dim
    for dim, want in zip(dims, net_spec.graph.input.shape, strict=True):
        dim.Clear()
        if isinstance(want, int):
            dim.dim_value = want
        else:
            dim.dim_param = want
    del cut.graph.value_info[:]
    kept = [p for p in model.metadata_props]
    del cut.metadata_props[:]
    cut.metadata_props.extend(kept)
    net_spec.write_to_onnx(cut)
    onnx.checker.check_model(cut)
    return cut, net_spec
