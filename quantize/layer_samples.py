"""Conv layers in column form on sampled output positions: bounded-memory data for per-layer fitting.

A 2-D conv's output at one position is ``W_g @ patch_g`` per channel group ``g``. Fitting a layer's int8
weights or bias needs (input patch, fp32 output) pairs, not whole activation maps, so for every image a
fixed number of output positions is drawn (seeded by layer and image, so the fp32 and the quantized
passes see the same positions) and only their input patches are gathered: memory is
``positions x in_channels x kernel`` per layer, whatever the resolution, instead of an unfolded map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from centernet_edge.runtime.onnx_graph import initializers

from .placement import QuantLayer
from .range_search import conv_attributes

__all__ = ["ConvLayer", "conv_layers", "grouped_output", "sample_patches", "sample_positions"]


@dataclass
class ConvLayer:
    """One eligible 2-D Conv: its node, input tensor, weight ``[Cout, Cin/G, kh, kw]``, bias and attributes."""

    name: str
    index: int
    input: str
    weight_name: str
    bias_name: str | None
    weight: np.ndarray
    bias: np.ndarray | None
    attrs: dict[str, object]
    bias_shared: bool = False  # the bias initializer is read by other nodes too (exporters share equal ones)

    @property
    def groups(self) -> int:
        return int(self.attrs["group"])  # type: ignore[call-overload]

    def grouped_weight(self) -> np.ndarray:
        """``[G, O, K]``: per group, output channels by (input channel, ky, kx)."""
        cout = self.weight.shape[0]
        return self.weight.reshape(self.groups, cout // self.groups, -1).astype(np.float32)

    def grouped_bias(self) -> np.ndarray | None:
        return None if self.bias is None else self.bias.reshape(self.groups, -1).astype(np.float32)

    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.weight.shape[1] == 1


def conv_layers(model: onnx.ModelProto, layers: list[QuantLayer]) -> list[ConvLayer]:
    """The eligible plain 2-D Convs with initializer weights read by no other node, in graph order."""
    inits = initializers(model.graph)
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    eligible = {layer.name: layer for layer in layers}
    out: list[ConvLayer] = []
    for node in model.graph.node:
        layer = eligible.get(node.name)
        if layer is None or node.op_type != "Conv" or layer.weight is None or layer.weight_axis != 0:
            continue
        attrs = conv_attributes(node)
        if attrs is None or node.input[1] not in inits or uses.get(node.input[1], 0) != 1:
            continue
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias_name is not None and bias_name not in inits:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if weight.ndim != 4:
            continue
        bias = numpy_helper.to_array(inits[bias_name]).astype(np.float32) if bias_name else None
        shared = bias_name is not None and uses.get(bias_name, 0) > 1
        out.append(ConvLayer(node.name, len(out), node.input[0], node.input[1], bias_name, weight, bias, attrs,
                             shared))
    return out


def _output_size(size: int, kernel: int, stride: int, dilation: int, pad: int) -> int:
    return (size + pad - dilation * (kernel - 1) - 1) // stride + 1


def sample_positions(layer: ConvLayer, input_shape: tuple[int, ...], count: int, seed: int, image: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` output positions (rows, cols) of one image, the same for every call with these arguments."""
    kh, kw = layer.weight.shape[2:]
    sy, sx = layer.attrs["strides"]  # type: ignore[misc]
    dy, dx = layer.attrs["dilations"]  # type: ignore[misc]
    pads = layer.attrs["pads"]
    oh = _output_size(input_shape[2], kh, sy, dy, pads[0] + pads[2])  # type: ignore[index]
    ow = _output_size(input_shape[3], kw, sx, dx, pads[1] + pads[3])  # type: ignore[index]
    rng = np.random.default_rng([seed, layer.index, image])
    flat = rng.choice(oh * ow, size=min(count, oh * ow), replace=False)
    flat.sort()
    return flat // ow, flat % ow


def sample_patches(layer: ConvLayer, x: np.ndarray, positions: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Input patches ``[P, G, K]`` of one image ``x`` ``[1, C, H, W]`` at output ``positions``."""
    kh, kw = layer.weight.shape[2:]
    sy, sx = layer.attrs["strides"]  # type: ignore[misc]
    dy, dx = layer.attrs["dilations"]  # type: ignore[misc]
    top, left, bottom, right = layer.attrs["pads"]  # type: ignore[misc]
    padded = np.pad(x[0], ((0, 0), (top, bottom), (left, right)))
    rows = positions[0][:, None] * sy + np.arange(kh)[None, :] * dy  # [P, kh]
    cols = positions[1][:, None] * sx + np.arange(kw)[None, :] * dx  # [P, kw]
    patches = padded[:, rows[:, :, None], cols[:, None, :]]  # [C, P, kh, kw]
    patches = np.moveaxis(patches, 1, 0)  # [P, C, kh, kw]
    return np.ascontiguousarray(patches.reshape(patches.shape[0], layer.groups, -1), dtype=np.float32)


def grouped_output(patches: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``[P, G, O]`` conv outputs of column-form patches (``weight`` ``[G, O, K]``)."""
    out = np.einsum("pgk,gok->pgo", patches, weight, optimize=True)
    return out + bias if bias is not None else out
