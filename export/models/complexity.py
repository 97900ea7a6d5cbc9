"""Parameter and multiply-accumulate counts (analytic, via forward hooks on a shape-only forward)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .dcn import DCN, ModulatedDeformConv2dPack


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BN running stats are not parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _conv_macs(module: nn.Conv2d, inp: torch.Tensor, out: torch.Tensor) -> int:
    kh, kw = module.kernel_size
    return out.numel() * (module.in_channels // module.groups) * kh * kw


def _deconv_macs(module: nn.ConvTranspose2d, inp: torch.Tensor, out: torch.Tensor) -> int:
    # Every input pixel scatters one kernel per output channel of its group.
    kh, kw = module.kernel_size
    return inp.numel() * (module.out_channels // module.groups) * kh * kw


def _dcn_macs(module: DCN | ModulatedDeformConv2dPack, inp: torch.Tensor, out: torch.Tensor) -> int:
    # The main 3x3 conv over the sampled columns; the offset conv is a child Conv2d with its own hook and
    # the bilinear sampling itself is not counted.
    kh, kw = module.kernel_size
    return out.numel() * module.in_channels * kh * kw


def count_macs(model: nn.Module, input_size: tuple[int, int] = (512, 512), batch: int = 1) -> int:
    """Multiply-accumulates of one forward pass of convolutions, deconvolutions and DCN layers.

    Build the model under ``torch.device("meta")`` to count large networks without computing anything:
    the input is created on the device of the model's parameters.
    """
    device = next(model.parameters()).device
    total = 0
    handles = []

    def hook(fn: Callable[[Any, torch.Tensor, torch.Tensor], int]) -> Callable[..., None]:
        def _hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            nonlocal total
            total += int(fn(module, args[0], out))
        return _hook

    for m in model.modules():
        if isinstance(m, (DCN, ModulatedDeformConv2dPack)):
            handles.append(m.register_forward_hook(hook(_dcn_macs)))
        elif isinstance(m, nn.ConvTranspose2d):
            handles.append(m.register_forward_hook(hook(_deconv_macs)))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(hook(_conv_macs)))
    try:
        with torch.no_grad():
            model(torch.zeros(batch, 3, *input_size, device=device))
    finally:
        for h in handles:
            h.remove()
    return total
