"""CenterNet checkpoint -> self-describing ONNX (pre-processing, network, decode and the model spec).

The default artifact is a stable contract: input ``image`` uint8 [N, H, W, 3] BGR (cv2.imread), output
``detections`` float32 [N, K, 6] rows (x1, y1, x2, y2, score, class_index) in original-image pixels,
best first. Variants (``ExportOptions``) move pre-processing out of the graph or drop the decode; the
embedded :class:`ModelSpec` always describes what the file actually does.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from centernet_edge.runtime.atomic import atomic_path
from centernet_edge.runtime.onnx_graph import constants_to_initializers, drop_outputs, fold_identities
from centernet_edge.runtime.spec import (
    COCO_CATEGORY_IDS,
    COCO_CLASS_NAMES,
    GRAPH_PREPROCESS,
    OFFICIAL_NORMALIZATIONS,
    GraphIO,
    ModelSpec,
    TensorInfo,
    mmdet_preprocess,
    official_preprocess,
    source_decode,
    toolkit_version,
)

from .optimize import optimize_graph
from .torch_ops import ExportGraph

__all__ = [
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "HEAD_NAMES",
    "MAX_TOPK",
    "build_spec",
    "export_checkpoint",
    "export_onnx",
    "expose_heads",
    "save_onnx",
]

MAX_TOPK = 3839  # TensorRT's TopK needs K < 3840
MIN_OPSET, MAX_OPSET = 19, 20  # DeformConv needs 19; the TorchScript exporter stops at 20
HEAD_NAMES = ("heatmap", "wh", "reg")


class ExportError(ValueError):
    """Export options or inputs that cannot produce a valid artifact; the message says which and why."""


@dataclass(frozen=True)
class ExportOptions:
    """What to put in the graph. Defaults give the stable contract described in the module docstring.

    input_size: (height, width) of the network input for the fixed-size affine warp (default 512x512);
    must be None with keep_res (the paper protocol: each image padded to ((h|pad)+1, (w|pad)+1)).
    batch: fixed batch size, or None for a dynamic one.
    optimize: apply the graph rewrites of :mod:`.optimize` (same values up to float32 summation order;
    ConvTranspose becomes Conv + a one-hot interleave). False keeps the graph as traced.
    official_normalization: for official checkpoints, 'test' (test.py's precise mean/std, the reported
    COCO AP; the default when None) or 'demo' (the rounded mean/std of demo.py and ``opts().init()``).
    """

    keep_res: bool = False
    input_size: tuple[int, int] | None = None
    preprocess: str = "warp"
    decode: bool = True
    batch: int | None = None
    topk: int = 100
    opset: int = MIN_OPSET
    name: str | None = None
    optimize: bool = True
    official_normalization: str | None = None

    def network_size(self) -> tuple[int, int] | None:
        if self.keep_res:
            return None
        return tuple(self.input_size) if self.input_size is not None else (512, 512)

    def validate(self, input_multiple: int = 32) -> ExportOptions:
        if self.preprocess not in GRAPH_PREPROCESS:
            raise ExportError(
                f"--preprocess must be one of {', '.join(GRAPH_PREPROCESS)}; got {self.preprocess!r}")
        if not 1 <= self.topk <= MAX_TOPK:
            raise ExportError(
                f"--topk must be in 1..{MAX_TOPK} (TensorRT TopK needs K < 3840); got {self.topk}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ExportError(
                f"--opset must be {MIN_OPSET}..{MAX_OPSET}: DeformConv needs opset 19 and the TorchScript "
                f"exporter supports up to {MAX_OPSET}; got {self.opset}"
            )
        if self.official_normalization not in (None, *OFFICIAL_NORMALIZATIONS):
            raise ExportError(f"--official-normalization must be one of {', '.join(OFFICIAL_NORMALIZATIONS)}; "
                              f"got {self.official_normalization!r}")
        if self.batch is not None and self.batch < 1:
            raise ExportError(f"--batch must be a positive integer or 'dynamic'; got {self.batch}")
        if self.keep_res and self.input_size is not None:
            raise ExportError(
                "--keep-res pads every image to its own size; it cannot be combined with --input-size")
        size = self.network_size()
        if size is not None:
            if len(size) != 2 or min(size) <= 0 or any(v % input_multiple for v in size):
                raise ExportError(
                    f"--input-size must be positive multiples of {input_multiple} for this architecture "
                    f"(height [width]); got {' '.join(str(v) for v in size)}"
                )
        return self


@dataclass
class ExportResult:
    """An exported model: the in-memory ONNX (graph outputs as written) and its spec."""

    model: onnx.ModelProto
    spec: ModelSpec
    torch_model: nn.Module | None = None
    path: Path | None = None


def _class_tables(num_classes: int, names: tuple[str, ...] | None) -> tuple[list[str], list[int] | None]:
    coco = num_classes == len(COCO_CLASS_NAMES)
    if names is not None and len(names) == num_classes:
        class_names = [str(n) for n in names]
    elif coco:
        class_names = list(COCO_CLASS_NAMES)
    else:
        class_names = [f"class_{i}" for i in range(num_classes)]
    return class_names, (list(COCO_CATEGORY_IDS) if coco else None)


def network_complexity(arch: str, num_classes: int, head_conv: int | None,
                       size: tuple[int, int] | None) -> dict[str, Any]:
    """Parameters and multiply-accumulates of the network (at ``size``, or 512x512 for keep_res)."""
    from .models import build_model, count_macs, count_parameters

    size = size or (512, 512)
    with torch.device("meta"):  # shapes only: nothing is computed or allocated
        network = build_model(arch, num_classes=num_classes, head_conv=head_conv)
    return {"params": count_parameters(network), "macs": count_macs(network, size), "macs_input_size": list(size)}


def build_spec(
    *,
    arch: str,
    source: str,
    num_classes: int,
    options: ExportOptions,
    keep_res_pad: int = 31,
    class_names: tuple[str, ...] | None = None,
    provenance: dict[str, Any] | None = None,
    name: str | None = None,
) -> ModelSpec:
    """The model spec of an export: what the graph's input and outputs are and how they were made."""
    size = options.network_size()
    if source == "mmdet":
        if options.official_normalization is not None:
            raise ExportError("--official-normalization applies to official CenterNet checkpoints; mmdetection "
                              "has one normalisation")
        pre = mmdet_preprocess(keep_res=options.keep_res, input_size=size or (512, 512), pad=keep_res_pad)
    else:
        pre = official_preprocess(keep_res=options.keep_res, input_size=size or (512, 512), pad=keep_res_pad,
                                  normalization=options.official_normalization or "test")
    # The graph applies sigmoid itself; a raw-head output therefore carries probabilities.
    decode = replace(source_decode(source, K=options.topk), heatmap_activation="sigmoid")
    n: int | str = options.batch if options.batch is not None else "N"
    net_h: int | str = size[0] if size else "H"
    net_w: int | str = size[1] if size else "W"
    out_h: int | str = size[0] // decode.stride if size else "h"
    out_w: int | str = size[1] // decode.stride if size else "w"
    if options.preprocess == "warp":
        graph_input = TensorInfo("image", "uint8", [n, "H", "W", 3], "NHWC",
                                 "BGR images as cv2.imread returns them; one size per batch")
    elif options.preprocess == "normalize":
        graph_input = TensorInfo("image", "uint8", [n, net_h, net_w, 3], "NHWC",
                                 "BGR images already warped to the network size")
    else:
        graph_input = TensorInfo("input", "float32", [n, 3, net_h, net_w], "NCHW",
                                 f"normalised network input, {pre.color} channel order")
    if options.decode:
        outputs = {"detections": TensorInfo(
            "detections", "float32", [n, options.topk, 6], None,
            "rows (x1, y1, x2, y2, score, class_index), 0-based class, best first")}
    else:
        outputs = {
            "heatmap": TensorInfo("heatmap", "float32", [n, num_classes, out_h, out_w], "NCHW",
                                  "after sigmoid"),
            "wh": TensorInfo("wh", "float32", [n, 2, out_h, out_w], "NCHW",
                             "box width, height (output cells)"),
            "reg": TensorInfo("reg", "float32", [n, 2, out_h, out_w], "NCHW",
                              "centre offset (output cells)"),
        }
    graph = GraphIO(
        preprocess=options.preprocess,
        decode=options.decode,
        input=graph_input,
        outputs=outputs,
        detections_frame="original" if options.preprocess == "warp" else "network_input",
        batch=options.batch,
    )
    names, category_ids = _class_tables(num_classes, class_names)
    return ModelSpec(
        name=name or options.name or arch,
        source=source,
        arch=arch,
        num_classes=num_classes,
        class_names=names,
        preprocess=pre,
        decode=decode,
        graph=graph,
        category_ids=category_ids,
        provenance={
            "toolkit_version": toolkit_version(),
            "torch_version": torch.__version__.split("+")[0],
            "onnx_opset": options.opset,
            "exporter": "torch.onnx (TorchScript)",
            "precision": "fp32",
            "source": source,
            "arch": arch,
            **(provenance or {}),
        },
    ).validate()


# ---- ONNX post-processing ------------------------------------------------------------------------------


def expose_heads(model: onnx.ModelProto) -> bytes:
    """The serialized graph with its internal ``heatmap``/``wh``/``reg`` tensors as extra outputs.

    Verification runs this: it is the graph about to be written, only with the heads observable. The
    outputs are added to ``model`` for the serialization only (no copy of the weights is made).
    """
    graph = model.graph
    produced = {out for node in graph.node for out in node.output}
    present = {o.name for o in graph.output}
    added = [name for name in HEAD_NAMES if name in produced and name not in present]
    for name in added:
        graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    try:
        return model.SerializeToString()
    finally:
        del graph.output[len(graph.output) - len(added):]


def _set_io_shapes(model: onnx.ModelProto, spec: ModelSpec) -> None:
    """Name the graph's dimensions as the spec does (the exporter invents names like 'Concat..._dim_1')."""
    infos = {spec.graph.input.name: spec.graph.input, **{i.name: i for i in spec.graph.outputs.values()}}
    for value in list(model.graph.input) + list(model.graph.output):
        info = infos.get(value.name)
        if info is None:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(info.shape):
            raise ExportError(
                f"graph tensor {value.name!r} has rank {len(dims)}, the spec says {len(info.shape)}")
        for dim, want in zip(dims, info.shape, strict=True):
            if isinstance(want, int):
                dim.Clear()
                dim.dim_value = want
            else:
                dim.Clear()
                dim.dim_param = want


def _trace(module: nn.Module, example: torch.Tensor, options: ExportOptions, input_name: str,
           output_names: list[str], dynamic_axes: dict[str, dict[int, str]]) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Tracer chatter (shape arithmetic, the legacy-exporter notice) is expected and not actionable.
        warnings.simplefilter("ignore")
        with torch.no_grad():
            torch.onnx.export(
                module, (example,), buffer, dynamo=False, opset_version=options.opset,
                input_names=[input_name], output_names=output_names, dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
    return onnx.load_from_string(buffer.getvalue())


def _example_input(options: ExportOptions, multiple: int) -> torch.Tensor:
    n = options.batch or 1
    size = options.network_size()
    gen = torch.Generator().manual_seed(0)  # leave the caller's global RNG alone
    if options.preprocess == "warp":
        # Deliberately not square and not the network size, so nothing shape-specific can be baked in.
        return torch.randint(0, 256, (n, 3 * 16 + 5, 4 * 16 + 3, 3), dtype=torch.uint8, generator=gen)
    h, w = size if size is not None else (multiple * 2, multiple * 3)
    if options.preprocess == "normalize":
        return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen)
    return torch.randn(n, 3, h, w, generator=gen)


def export_onnx(model: nn.Module, spec: ModelSpec, options: ExportOptions, input_multiple: int = 32,
                min_cells: int | None = None) -> onnx.ModelProto:
    """Trace ``model`` (forward -> heatmap logits, wh, reg) with the spec's pre/post-processing.

    Returns the checked ONNX model with the spec in its metadata. For decode graphs the head tensors
    keep their names (``heatmap``, ``wh``, ``reg``) inside the graph; :func:`expose_heads` makes them
    outputs again.
    """
    options.validate(input_multiple)
    stride = spec.decode.stride
    if min_cells is None:
        size = options.network_size()
        min_cells = (size[0] // stride) * (size[1] // stride) if size else (input_multiple // stride) ** 2
    module = ExportGraph(model.eval(), spec.preprocess, spec.decode if options.decode else None,
                         options.preprocess, min_cells).eval()
    input_name = spec.graph.input.name
    names = (["detections"] if options.decode else []) + list(HEAD_NAMES)
    dynamic: dict[str, dict[int, str]] = {}
    batch_axis = {0: "N"} if options.batch is None else {}
    if options.preprocess == "warp" or options.keep_res:
        spatial = {1: "H", 2: "W"} if spec.graph.input.layout == "NHWC" else {2: "H", 3: "W"}
        dynamic[input_name] = {**batch_axis, **spatial}
        head_axes = {2: "h", 3: "w"} if options.keep_res else {}
    else:
        dynamic[input_name] = dict(batch_axis)
        head_axes = {}
    for name in names:
        dynamic[name] = {**batch_axis, **(head_axes if name in HEAD_NAMES else {})}
    onnx_model = _trace(module, _example_input(options, input_multiple), options, input_name, names, dynamic)
    constants_to_initializers(onnx_model)
    fold_identities(onnx_model)
    if options.optimize:
        applied = optimize_graph(onnx_model)
        # The artifact says which rewrites changed it: downstream tools (quantization) see their nodes.
        spec.provenance["graph_rewrites"] = {name: count for name, count in applied.items() if count}
    if options.decode:
        drop_outputs(onnx_model, HEAD_NAMES)
    _set_io_shapes(onnx_model, spec)
    onnx_model.producer_name = "centernet-edge"
    onnx_model.producer_version = toolkit_version()
    onnx_model.doc_string = (
        f"CenterNet {spec.arch} ({spec.source}); graph.preprocess={options.preprocess}, "
        f"decode={options.decode}. The full contract is the model spec in metadata_props."
    )
    spec.write_to_onnx(onnx_model)
    try:
        # full_check includes strict shape inference, which also confirms the declared output shapes.
        onnx.checker.check_model(onnx_model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported graph failed ONNX validation: {exc}") from exc
    return onnx_model


def save_onnx(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``model`` atomically (nothing at ``path`` unless the whole file was written)."""
    data = model.SerializeToString()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path | None = None,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    options: ExportOptions | None = None,
) -> ExportResult:
    """Load a checkpoint (arch/source auto-detected unless ``arch`` is given) and export it.

    Writes ``output`` atomically when given; verification is separate (:mod:`.verify`) so callers can
    check a model before writing it.
    """
    from centernet_edge.export.models import ARCHITECTURES

    from .checkpoints import load_checkpoint

    options = options or ExportOptions()
    loaded = load_checkpoint(checkpoint, arch=arch, num_classes=num_classes)
    info = ARCHITECTURES[loaded.arch]
    options.validate(info.input_multiple)
    spec = build_spec(
        arch=loaded.arch,
        source=loaded.source,
        num_classes=loaded.num_classes,
        options=options,
        keep_res_pad=info.keep_res_pad,
        class_names=loaded.info.class_names,
        name=options.name or Path(checkpoint).stem,
        provenance={
            "checkpoint_sha256": loaded.sha256,
            "checkpoint_file": Path(checkpoint).name,
            "head_conv": loaded.head_conv,
            **network_complexity(loaded.arch, loaded.num_classes, loaded.head_conv, options.network_size()),
        },
    )
    model = export_onnx(loaded.model, spec, options, input_multiple=info.input_multiple)
    result = ExportResult(model, spec, torch_model=loaded.model)
    if output is not None:
        result.path = save_onnx(model, output)
    return result
