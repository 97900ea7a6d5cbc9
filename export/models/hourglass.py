"""Official CenterNet ``hourglass_104`` (``large_hourglass.py``, ExtremeNet's ``exkp`` with 2 stacks).

Module/parameter names follow the original (``pre``, ``kps``, ``cnvs``, ``inters``, ``inters_``, ``cnvs_``,
heads ``hm/wh/reg`` as one ``ModuleList`` entry per stack, e.g. ``hm.1.0.conv.weight``, ``hm.1.1.bias``).
Only the last stack's predictions are computed: the official test code uses ``outputs[-1]`` and the
intermediate heads exist for deep supervision during training only.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import OFFICIAL_HEAD_NAMES, OFFICIAL_HM_BIAS

HG104_DIMS = (256, 256, 384, 384, 384, 512)
HG104_MODULES = (2, 2, 2, 2, 2, 4)


class Convolution(nn.Module):
    """``convolution`` in the original: conv (bias only without BN) + BN + ReLU."""

    def __init__(self, k: int, inp_dim: int, out_dim: int, stride: int = 1, with_bn: bool = True) -> None:
        super().__init__()
        pad = (k - 1) // 2
        self.conv = nn.Conv2d(inp_dim, out_dim, k, padding=pad, stride=stride, bias=not with_bn)
        # An empty Sequential keeps the ``bn`` attribute (and identity behaviour) without parameters.
        self.bn = nn.BatchNorm2d(out_dim) if with_bn else nn.Sequential()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, k: int, inp_dim: int, out_dim: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inp_dim, out_dim, 3, padding=1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(out_dim)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_dim)
        needs_proj = stride != 1 or inp_dim != out_dim
        self.skip = (nn.Sequential(nn.Conv2d(inp_dim, out_dim, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(out_dim)) if needs_proj else nn.Sequential())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.skip(x))


def _layer(inp_dim: int, out_dim: int, modules: int) -> nn.Sequential:
    rest = [Residual(3, out_dim, out_dim) for _ in range(1, modules)]
    return nn.Sequential(Residual(3, inp_dim, out_dim), *rest)


def _layer_revr(inp_dim: int, out_dim: int, modules: int) -> nn.Sequential:
    first = [Residual(3, inp_dim, inp_dim) for _ in range(modules - 1)]
    return nn.Sequential(*first, Residual(3, inp_dim, out_dim))


def _hg_layer(inp_dim: int, out_dim: int, modules: int) -> nn.Sequential:
    # HourglassNet downsamples with a stride-2 residual instead of max pooling.
    return nn.Sequential(Residual(3, inp_dim, out_dim, stride=2),
                         *[Residual(3, out_dim, out_dim) for _ in range(modules - 1)])


class KPModule(nn.Module):
    """One recursive hourglass level (``kp_module``): ``up1`` skip branch, ``low1 -> low2 -> low3``
    bottleneck branch, nearest-neighbour ``up2``. ``max1`` is an empty Sequential in HourglassNet."""

    def __init__(self, n: int, dims: tuple[int, ...], modules: tuple[int, ...]) -> None:
        super().__init__()
        curr_mod, next_mod = modules[0], modules[1]
        curr_dim, next_dim = dims[0], dims[1]
        self.up1 = _layer(curr_dim, curr_dim, curr_mod)
        self.max1 = nn.Sequential()
        self.low1 = _hg_layer(curr_dim, next_dim, curr_mod)
        self.low2 = KPModule(n - 1, dims[1:], modules[1:]) if n > 1 else _layer(next_dim, next_dim, next_mod)
        self.low3 = _layer_revr(next_dim, curr_dim, curr_mod)
        self.up2 = nn.Upsample(scale_factor=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up1(x) + self.up2(self.low3(self.low2(self.low1(self.max1(x)))))


def _kp_head(cnv_dim: int, curr_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(Convolution(3, cnv_dim, curr_dim, with_bn=False), nn.Conv2d(curr_dim, out_dim, 1))


class HourglassNet(nn.Module):
    """``forward`` returns the last stack's ``(heatmap_logits, wh, reg)`` at stride 4 (heatmap before
    sigmoid). Input sides must be multiples of 128 (the official pad is 127)."""

    def __init__(self, num_classes: int = 80, head_conv: int = 256, nstack: int = 2, n: int = 5,
                 dims: tuple[int, ...] = HG104_DIMS, modules: tuple[int, ...] = HG104_MODULES,
                 cnv_dim: int = 256) -> None:
        super().__init__()
        self.nstack = nstack
        curr_dim = dims[0]
        self.pre = nn.Sequential(Convolution(7, 3, 128, stride=2), Residual(3, 128, curr_dim, stride=2))
        self.kps = nn.ModuleList([KPModule(n, dims, modules) for _ in range(nstack)])
        self.cnvs = nn.ModuleList([Convolution(3, curr_dim, cnv_dim) for _ in range(nstack)])
        self.inters = nn.ModuleList([Residual(3, curr_dim, curr_dim) for _ in range(nstack - 1)])
        self.inters_ = nn.ModuleList([
            nn.Sequential(nn.Conv2d(curr_dim, curr_dim, 1, bias=False), nn.BatchNorm2d(curr_dim))
            for _ in range(nstack - 1)])
        self.cnvs_ = nn.ModuleList([
            nn.Sequential(nn.Conv2d(cnv_dim, curr_dim, 1, bias=False), nn.BatchNorm2d(curr_dim))
            for _ in range(nstack - 1)])
        # The original sizes the head's middle conv with curr_dim and ignores --head_conv; head_conv
        # defaults to that value here and only changes the architecture when set explicitly.
        outputs = {"hm": num_classes, "wh": 2, "reg": 2}
        for name in OFFICIAL_HEAD_NAMES:
            heads = nn.ModuleList([_kp_head(cnv_dim, head_conv, outputs[name]) for _ in range(nstack)])
            if name == "hm":
                for head in heads:
                    nn.init.constant_(head[-1].bias, OFFICIAL_HM_BIAS)
            self.add_module(name, heads)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inter = self.pre(x)
        cnv = inter
        for ind in range(self.nstack):
            cnv = self.cnvs[ind](self.kps[ind](inter))
            if ind < self.nstack - 1:
                inter = self.relu(self.inters_[ind](inter) + self.cnvs_[ind](cnv))
                inter = self.inters[ind](inter)
        last = self.nstack - 1
        hm, wh, reg = (getattr(self, name)[last](cnv) for name in OFFICIAL_HEAD_NAMES)
        return hm, wh, reg
