"""Modulated deformable convolution (DCNv2) in plain PyTorch, exportable as one ONNX ``DeformConv`` node.

Numerics follow DCNv2 / mmcv / torchvision: each kernel tap samples the input bilinearly at
``p0 + p_k + offset`` (offset channels interleaved ``(dy, dx)`` per tap), samples outside the image read
zero, and the sample is scaled by the mask before the weighted sum.

Export: under the TorchScript exporter (``torch.onnx.export(..., dynamo=False, opset_version>=19)``) the
call is routed through an ``autograd.Function`` whose ``symbolic`` emits the standard ``DeformConv`` op.
Tracing the real gather computation inside such a Function breaks the exporter (pytorch#97160), so its
forward only returns a zero tensor of the right shape. For runtimes without ``DeformConv`` the context
manager :func:`decomposed_deform_conv` exports the gather-based computation as ordinary ONNX ops instead
(static input size only: the sampling grid is traced as constants).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch
from torch import nn

__all__ = [
    "DCN",
    "ModulatedDeformConv2dPack",
    "decomposed_deform_conv",
    "modulated_deform_conv2d",
]

_DECOMPOSE_ON_EXPORT = False


@contextlib.contextmanager
def decomposed_deform_conv() -> Iterator[None]:
    """Export DCN layers as Gather/Floor/MatMul subgraphs instead of ``DeformConv`` while active."""
    global _DECOMPOSE_ON_EXPORT
    previous = _DECOMPOSE_ON_EXPORT
    _DECOMPOSE_ON_EXPORT = True
    try:
        yield
    finally:
        _DECOMPOSE_ON_EXPORT = previous


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _reference(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, stride: int, padding: int, dilation: int,
               deform_groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    c_out, c_in, kh, kw = weight.shape
    oh = _out_size(h, kh, stride, padding, dilation)
    ow = _out_size(w, kw, stride, padding, dilation)
    taps = kh * kw
    g = deform_groups
    if not torch.jit.is_tracing():  # shape checks would only add tracer warnings to a decomposed export
        if c_in != c:
            raise ValueError(f"weight expects {c_in} input channels, input has {c}")
        if c % g:
            raise ValueError(f"{c} input channels are not divisible by deform_groups={g}")
        expected = (n, 2 * g * taps, oh, ow)
        if tuple(offset.shape) != expected:
            raise ValueError(f"offset has shape {tuple(offset.shape)}, expected {expected}")
        if tuple(mask.shape) != (n, g * taps, oh, ow):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {(n, g * taps, oh, ow)}")

    # Gather rather than grid_sample: align_corners normalisation divides by (W-1), which breaks on the
    # 1-pixel-wide maps that small inputs produce deep in the network.
    # Sampling grid before offsets: tap (i, j) of output (y, x) looks at (y*s - p + i*d, x*s - p + j*d).
    dev, dt = x.device, x.dtype
    tap_y = (torch.arange(kh, device=dev, dtype=dt) * dilation).repeat_interleave(kw)
    tap_x = (torch.arange(kw, device=dev, dtype=dt) * dilation).repeat(kh)
    out_y = torch.arange(oh, device=dev, dtype=dt) * stride - padding
    out_x = torch.arange(ow, device=dev, dtype=dt) * stride - padding
    base_y = (tap_y.view(taps, 1, 1) + out_y.view(1, oh, 1)).expand(taps, oh, ow)
    base_x = (tap_x.view(taps, 1, 1) + out_x.view(1, 1, ow)).expand(taps, oh, ow)

    off = offset.reshape(n, g, taps, 2, oh, ow)
    py = base_y + off[:, :, :, 0]  # (n, g, taps, oh, ow)
    px = base_x + off[:, :, :, 1]

    y0 = torch.floor(py)
    x0 = torch.floor(px)
    ly = py - y0
    lx = px - x0
    y0i = y0.to(torch.int64)
    x0i = x0.to(torch.int64)

    xg = x.reshape(n, g, c // g, h * w)
    length = taps * oh * ow
    cols = x.new_zeros(n, g, c // g, length)
    # Each of the four bilinear corners contributes only where it lies inside the image: this is exactly
    # DCNv2's zero-outside rule, including points in (-1, 0) and (H-1, H).
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        yi = y0i + dy
        xi = x0i + dx
        wy = ly if dy else 1 - ly
        wx = lx if dx else 1 - lx
        inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        corner_w = wy * wx * inside.to(dt)
        idx = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).reshape(n, g, 1, length)
        vals = torch.gather(xg, 3, idx.expand(n, g, c // g, length))
        cols = cols + vals * corner_w.reshape(n, g, 1, length)

    cols = cols * mask.reshape(n, g, 1, length)
    # (n, c, taps, L) matches the (c_in, kh, kw) flattening of the weight.
    cols = cols.reshape(n, c * taps, oh * ow)
    out = torch.matmul(weight.reshape(c_out, c * taps), cols)
    if bias is not None:
        out = out + bias.view(1, c_out, 1)
    return out.reshape(n, c_out, oh, ow)


class _DeformConvOnnx(torch.autograd.Function):
    """Placeholder forward + ``symbolic`` that the TorchScript exporter turns into ONNX ``DeformConv``."""

    @staticmethod
    def forward(ctx, x, offset, mask, weight, bias, stride, padding, dilation, deform_groups, kh, kw):
        oh = _out_size(x.shape[2], kh, stride, padding, dilation)
        ow = _out_size(x.shape[3], kw, stride, padding, dilation)
        return x.new_zeros(x.shape[0], weight.shape[0], oh, ow)

    @staticmethod
    def symbolic(g, x, offset, mask, weight, bias, stride, padding, dilation, deform_groups, kh, kw):
        return g.op(
            "DeformConv", x, weight, offset, bias, mask,
            strides_i=[stride, stride], pads_i=[padding] * 4, dilations_i=[dilation, dilation],
            group_i=1, offset_group_i=deform_groups, kernel_shape_i=[kh, kw],
        )


def modulated_deform_conv2d(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None, stride: int = 1, padding: int = 1, dilation: int = 1,
                            deform_groups: int = 1) -> torch.Tensor:
    """DCNv2 forward. ``offset``: (N, 2*G*kh*kw, oH, oW) interleaved (dy, dx); ``mask``: (N, G*kh*kw, oH, oW)
    already passed through sigmoid. Convolution groups are not supported (CenterNet never uses them)."""
    if torch.onnx.is_in_onnx_export() and torch.jit.is_tracing() and not _DECOMPOSE_ON_EXPORT:
        if bias is None:
            # ONNX's B is optional, but an explicit zero keeps the symbolic to one input signature.
            bias = weight.new_zeros(weight.shape[0])
        with warnings.catch_warnings():
            # A parameter's kernel size is static; the tracer's "converting a tensor to int" warning is noise.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            kh, kw = int(weight.shape[2]), int(weight.shape[3])
        return _DeformConvOnnx.apply(x, offset, mask, weight, bias, int(stride), int(padding), int(dilation),
                                     int(deform_groups), kh, kw)
    return _reference(x, offset, mask, weight, bias, int(stride), int(padding), int(dilation),
                      int(deform_groups))


def _split_offset_mask(out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Both DCNv2 and mmcv use chunk(3): the first two thirds are the offsets, already interleaved (dy, dx).
    # Static split sizes export as one Split node instead of chunk's Shape/Div/Slice arithmetic.
    third = channels // 3
    o1, o2, m = torch.split(out, [third, third, third], dim=1)
    return torch.cat((o1, o2), dim=1), torch.sigmoid(m)


class DCN(nn.Module):
    """Official CenterNet ``DCN`` (CharlesShang/DCNv2): keys ``weight``, ``bias``, ``conv_offset_mask.*``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, dilation: int = 1, deformable_groups: int = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kernel_size, kernel_size)
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.deformable_groups = deformable_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels))
        # The official offset conv uses stride/padding but not the dilation of the main conv.
        self.conv_offset_mask = nn.Conv2d(in_channels, deformable_groups * 3 * kernel_size * kernel_size,
                                          kernel_size, stride=stride, padding=padding, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -stdv, stdv)
        nn.init.zeros_(self.bias)
        # Zero offsets at init: training starts from a regular conv, as in the original.
        nn.init.zeros_(self.conv_offset_mask.weight)
        nn.init.zeros_(self.conv_offset_mask.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = _split_offset_mask(self.conv_offset_mask(x), self.conv_offset_mask.out_channels)
        return modulated_deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride, self.padding,
                                       self.dilation, self.deformable_groups)


class ModulatedDeformConv2dPack(nn.Module):
    """mmcv ``ModulatedDeformConv2dPack`` (mmdet's ``DCNv2``): keys ``weight``, ``[bias]``, ``conv_offset.*``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 0, dilation: int = 1, deform_groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = (kernel_size, kernel_size)
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.deform_groups = deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.conv_offset = nn.Conv2d(in_channels, deform_groups * 3 * kernel_size * kernel_size, kernel_size,
                                     stride=stride, padding=padding, dilation=dilation, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -stdv, stdv)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = _split_offset_mask(self.conv_offset(x), self.conv_offset.out_channels)
        return modulated_deform_conv2d(x, offset, mask, self.weight, self.bias, self.stride, self.padding,
                                       self.dilation, self.deform_groups)
