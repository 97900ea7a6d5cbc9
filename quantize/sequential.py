"""Layer-by-layer int8 weight fitting: AdaRound rounding and/or bias correction, baked into the weights.

Each eligible 2-D Conv is fitted in graph order on the inputs the *quantized* model gives it: every layer
is quantized (Q/DQ with the calibrated ranges), the ones already fitted carry their new weights, so a layer
sees (and can compensate) the error of everything upstream. Targets are the fp32 model's outputs at the
same sampled positions (:mod:`layer_samples`), computed once in a first fp32 pass and kept as small
column-form arrays. Per layer: one ONNX Runtime pass of the quantized model pruned to that layer's input,
over ``images`` calibration images, one image's activations at a time (memory: one activation map plus
``samples x in_channels x kernel`` floats).

The result is an fp32 model whose conv weights are exactly ``level * scale`` (per-channel int8 levels,
channel scales unchanged) and whose biases absorb the mean shift, so the Q/DQ builder and ONNX Runtime's
quantizer re-derive the fitted int8 weights and both artifacts get them; the fp32 reference stays the
original model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from centernet_edge.runtime.onnx_graph import prune_to_outputs, unique_name
from centernet_edge.runtime.onnx_session import create_session

from .adaround import adaround_layer, nearest_levels, reconstruction_error
from .bias_correction import ShiftAccumulator
from .layer_samples import ConvLayer, conv_layers, grouped_output, sample_patches, sample_positions
from .placement import QuantLayer
from .qdq import build_qdq_model
from .range_search import fake_quant

__all__ = ["ROUNDINGS", "FitOptions", "FitReport", "fit_layers"]

ROUNDINGS = ("nearest", "adaround")


@dataclass(frozen=True)
class FitOptions:
    rounding: str = "nearest"
    bias_correction: bool = False
    samples: int = 2048  # sampled output positions per layer, spread over the images
    iterations: int = 200  # AdaRound optimisation steps per layer
    seed: int = 0

    def active(self) -> bool:
        return self.rounding != "nearest" or self.bias_correction


@dataclass
class LayerFit:
    layer: str
    depthwise: bool
    nearest_error: float  # relative reconstruction error on the samples, nearest rounding, before correction
    error: float  # after the chosen rounding and the bias correction
    adaround_kept: bool
    shift_before: float  # relative mean shift (see bias_correction) before / after the correction
    shift_after: float


@dataclass
class FitReport:
    options: dict[str, Any]
    images: int
    layers: list[LayerFit] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"options": self.options, "images": self.images, "layers": [asdict(r) for r in self.layers]}


def _images(batches: Sequence[np.ndarray]) -> list[tuple[int, np.ndarray, int]]:
    """(image index, its batch, row in the batch) for every image of ``batches``."""
    out = []
    for batch in batches:
        for row in range(batch.shape[0]):
            out.append((len(out), batch, row))
    return out


def _channel_scales(grouped: np.ndarray) -> np.ndarray:
    """Per-output-channel scales ``[G, O, 1]`` as :func:`qdq.quantize_weight_per_channel` derives them."""
    amax = np.abs(grouped).max(axis=2, keepdims=True)
    return np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)


def _reference_outputs(model: onnx.ModelProto, convs: list[ConvLayer], batches: Sequence[np.ndarray],
                       input_name: str, per_image: int, seed: int, threads: int) -> dict[str, np.ndarray]:
    """fp32 outputs ``[P, G, O]`` of every layer at its sampled positions (one pass, streaming)."""
    tensors = list(dict.fromkeys(c.input for c in convs))
    session = create_session(prune_to_outputs(model, tensors), threads=threads)
    parts: dict[str, list[np.ndarray]] = {c.name: [] for c in convs}
    for index, batch, row in _images(batches):
        if row == 0:
            values = dict(zip(tensors, session.run(tensors, {input_name: batch}), strict=True))
        for conv in convs:
            x = np.asarray(values[conv.input][row:row + 1], dtype=np.float32)
            patches = sample_patches(conv, x, sample_positions(conv, x.shape, per_image, seed, index))
            parts[conv.name].append(grouped_output(patches, conv.grouped_weight(), conv.grouped_bias()))
    return {name: np.concatenate(p, axis=0) for name, p in parts.items()}


def _quantized_patches(work: onnx.ModelProto, layers: Sequence[QuantLayer], amax: Mapping[str, float],
                       conv: ConvLayer, batches: Sequence[np.ndarray], input_name: str, per_image: int,
                       seed: int, threads: int) -> np.ndarray:
    """The layer's input patches as the current quantized model delivers them (after its input Q/DQ)."""
    qdq = build_qdq_model(work, layers, amax)
    session = create_session(prune_to_outputs(qdq, [conv.input]), threads=threads)
    parts = []
    for index, batch, row in _images(batches):
        if row == 0:
            (value,) = session.run([conv.input], {input_name: batch})
        x = np.asarray(value[row:row + 1], dtype=np.float32)
        if conv.input in amax:
            x = fake_quant(x, amax[conv.input])
        parts.append(sample_patches(conv, x, sample_positions(conv, x.shape, per_image, seed, index)))
    return np.concatenate(parts, axis=0)


def _set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for i, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
            return
    raise KeyError(name)


def _write_back(work: onnx.ModelProto, conv: ConvLayer, weight: np.ndarray | None, bias: np.ndarray | None,
                taken: set[str]) -> None:
    if weight is not None:
        _set_initializer(work, conv.weight_name, weight.reshape(conv.weight.shape))
        conv.weight = weight.reshape(conv.weight.shape).astype(np.float32)
    if bias is None:
        return
    flat = bias.reshape(-1).astype(np.float32)
    if conv.bias_name is None or conv.bias_shared:  # a conv without a bias of its own gets one
        conv.bias_name = unique_name(f"{conv.weight_name}_bias", taken)
        conv.bias_shared = False
        work.graph.initializer.append(numpy_helper.from_array(flat, conv.bias_name))
        node = next(n for n in work.graph.node if n.name == conv.name)
        if len(node.input) > 2:
            node.input[2] = conv.bias_name
        else:
            node.input.append(conv.bias_name)
    else:
        _set_initializer(work, conv.bias_name, flat)
    conv.bias = flat


def fit_layers(model: onnx.ModelProto, layers: Sequence[QuantLayer], amax: Mapping[str, float],
               batches: Sequence[np.ndarray], input_name: str, options: FitOptions, threads: int = 1,
               progress: Callable[[str], None] | None = None) -> tuple[onnx.ModelProto, FitReport]:
    """A copy of ``model`` with fitted conv weights/biases (module docstring) and the per-layer report."""
    if options.rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {options.rounding!r}; choose one of {', '.join(ROUNDINGS)}")
    images = sum(b.shape[0] for b in batches)
    report = FitReport(asdict(options), images)
    if not options.active() or images == 0:
        return model, report
    work = copy.deepcopy(model)
    convs = conv_layers(work, list(layers))
    per_image = max(1, math.ceil(options.samples / images))
    references = _reference_outputs(model, convs, batches, input_name, per_image, options.seed, threads)
    taken = {i.name for i in work.graph.initializer} | {o for n in work.graph.node for o in n.output}
    for step, conv in enumerate(convs):
        x = _quantized_patches(work, layers, amax, conv, batches, input_name, per_image, options.seed, threads)
        y = references.pop(conv.name)
        weight, bias = conv.grouped_weight(), conv.grouped_bias()
        scale = _channel_scales(weight)
        nearest = nearest_levels(weight, scale) * scale
        nearest_err = reconstruction_error(x, y, nearest, bias)
        new_weight, kept = None, False
        quantized = nearest
        if options.rounding == "adaround":
            fit = adaround_layer(x, y, weight, scale, bias, iterations=options.iterations,
                                 seed=options.seed + conv.index)
            if fit.adaround_kept:
                quantized = fit.levels * scale
                new_weight, kept = quantized, True
        shifts = ShiftAccumulator()
        shifts.add(grouped_output(x, quantized, bias), y)
        before = shifts.relative_shift()
        new_bias = None
        after = before
        if options.bias_correction:
            base = bias if bias is not None else np.zeros(weight.shape[:2], np.float32)
            new_bias = base - shifts.shift()
            check = ShiftAccumulator()
            check.add(grouped_output(x, quantized, new_bias), y)
            after = check.relative_shift()
        error = reconstruction_error(x, y, quantized, new_bias if new_bias is not None else bias)
        _write_back(work, conv, new_weight, new_bias, taken)
        report.layers.append(LayerFit(conv.name, conv.is_depthwise(), nearest_err, error, kept, before, after))
        if progress:
            progress(f"fit {step + 1}/{len(convs)} {conv.name}: error {nearest_err:.4g} -> {error:.4g}")
        del x, y
    return work, report
