"""Official CenterNet ``dla_34`` (``pose_dla_dcn.py``, ``DLASeg``): DLA-34 trunk (``base.*``), iterative
deep aggregation with DCN blocks (``dla_up.*``, ``ida_up.*``) and heads on 64 channels at stride 4.

The released ``ctdet_coco_dla_2x.pth`` also holds the ImageNet classifier ``base.fc`` (unused at
inference); this module has no ``fc``, so a loader must drop those two tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import OFFICIAL_HEAD_NAMES, OFFICIAL_HM_BIAS, fill_up_weights, init_head, make_head
from .dcn import DCN

DLA34_LEVELS = (1, 1, 1, 2, 2, 1)
DLA34_CHANNELS = (16, 32, 64, 128, 256, 512)


class DLABasicBlock(nn.Module):
    """ResNet basic block whose shortcut is supplied by the enclosing ``Tree``."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        residual = x if residual is None else residual
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class Root(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, residual: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, stride=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual

    def forward(self, *children: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(torch.cat(children, 1)))
        if self.residual:
            x = x + children[0]
        return self.relu(x)


class Tree(nn.Module):
    def __init__(self, levels: int, in_channels: int, out_channels: int, stride: int = 1,
                 level_root: bool = False, root_dim: int = 0, root_residual: bool = False) -> None:
        super().__init__()
        if root_dim == 0:
            root_dim = 2 * out_channels
        if level_root:
            root_dim += in_channels
        self.tree1: nn.Module
        self.tree2: nn.Module
        if levels == 1:
            self.tree1 = DLABasicBlock(in_channels, out_channels, stride)
            self.tree2 = DLABasicBlock(out_channels, out_channels, 1)
        else:
            self.tree1 = Tree(levels - 1, in_channels, out_channels, stride, root_dim=0,
                              root_residual=root_residual)
            self.tree2 = Tree(levels - 1, out_channels, out_channels, root_dim=root_dim + out_channels,
                              root_residual=root_residual)
        if levels == 1:
            self.root = Root(root_dim, out_channels, root_residual)
        self.level_root = level_root
        self.root_dim = root_dim
        self.levels = levels
        self.downsample = nn.MaxPool2d(stride, stride=stride) if stride > 1 else None
        self.project = None
        if in_channels != out_channels:
            self.project = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=1, bias=False),
                                         nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                children: list[torch.Tensor] | None = None) -> torch.Tensor:
        # ``residual`` is accepted for call compatibility with blocks; a Tree builds its own shortcut.
        children = [] if children is None else children
        bottom = self.downsample(x) if self.downsample is not None else x
        residual = self.project(bottom) if self.project is not None else bottom
        if self.level_root:
            children.append(bottom)
        x1 = self.tree1(x, residual)
        if self.levels == 1:
            x2 = self.tree2(x1)
            return self.root(x2, x1, *children)
        children.append(x1)
        return self.tree2(x1, children=children)


def _conv_level(inplanes: int, planes: int, convs: int, stride: int = 1) -> nn.Sequential:
    modules: list[nn.Module] = []
    for i in range(convs):
        modules += [nn.Conv2d(inplanes, planes, 3, stride=stride if i == 0 else 1, padding=1, bias=False),
                    nn.BatchNorm2d(planes), nn.ReLU(inplace=True)]
        inplanes = planes
    return nn.Sequential(*modules)


class DLA(nn.Module):
    def __init__(self, levels: tuple[int, ...] = DLA34_LEVELS, channels: tuple[int, ...] = DLA34_CHANNELS,
                 residual_root: bool = False) -> None:
        super().__init__()
        self.channels = list(channels)
        self.base_layer = nn.Sequential(nn.Conv2d(3, channels[0], 7, stride=1, padding=3, bias=False),
                                        nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True))
        self.level0 = _conv_level(channels[0], channels[0], levels[0])
        self.level1 = _conv_level(channels[0], channels[1], levels[1], stride=2)
        self.level2 = Tree(levels[2], channels[1], channels[2], 2, level_root=False,
                           root_residual=residual_root)
        self.level3 = Tree(levels[3], channels[2], channels[3], 2, level_root=True,
                           root_residual=residual_root)
        self.level4 = Tree(levels[4], channels[3], channels[4], 2, level_root=True,
                           root_residual=residual_root)
        self.level5 = Tree(levels[5], channels[4], channels[5], 2, level_root=True,
                           root_residual=residual_root)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.base_layer(x)
        outs = []
        for level in (self.level0, self.level1, self.level2, self.level3, self.level4, self.level5):
            x = level(x)
            outs.append(x)
        return outs


class DeformConv(nn.Module):
    """``DCN -> BN -> ReLU``; named ``conv`` / ``actf`` as in pose_dla_dcn (not the ONNX op)."""

    def __init__(self, chi: int, cho: int) -> None:
        super().__init__()
        self.actf = nn.Sequential(nn.BatchNorm2d(cho), nn.ReLU(inplace=True))
        self.conv = DCN(chi, cho, kernel_size=3, stride=1, padding=1, dilation=1, deformable_groups=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.actf(self.conv(x))


class IDAUp(nn.Module):
    """Project each coarser map to ``o`` channels, upsample it (depthwise deconv) and merge into its finer
    neighbour. Modules are ``proj_i``, ``up_i``, ``node_i`` for i = 1..len(channels)-1."""

    def __init__(self, o: int, channels: list[int], up_f: list[int]) -> None:
        super().__init__()
        self.count = len(channels) - 1
        for i in range(1, len(channels)):
            f = int(up_f[i])
            up = nn.ConvTranspose2d(o, o, f * 2, stride=f, padding=f // 2, output_padding=0, groups=o,
                                    bias=False)
            fill_up_weights(up)
            setattr(self, f"proj_{i}", DeformConv(channels[i], o))
            setattr(self, f"up_{i}", up)
            setattr(self, f"node_{i}", DeformConv(o, o))

    def forward(self, layers: list[torch.Tensor], startp: int, endp: int) -> None:
        """Updates ``layers[startp+1:endp]`` in place, like the original."""
        for i in range(startp + 1, endp):
            upsample = getattr(self, f"up_{i - startp}")
            project = getattr(self, f"proj_{i - startp}")
            node = getattr(self, f"node_{i - startp}")
            layers[i] = node(upsample(project(layers[i])) + layers[i - 1])


class DLAUp(nn.Module):
    def __init__(self, startp: int, channels: list[int], scales: list[int]) -> None:
        super().__init__()
        self.startp = startp
        channels = list(channels)
        in_channels = list(channels)
        scales = list(scales)
        for i in range(len(channels) - 1):
            j = -i - 2
            up_f = [s // scales[j] for s in scales[j:]]
            setattr(self, f"ida_{i}", IDAUp(channels[j], in_channels[j:], up_f))
            scales[j + 1:] = [scales[j]] * len(scales[j + 1:])
            in_channels[j + 1:] = [channels[j]] * len(in_channels[j + 1:])
        self.count = len(channels) - 1

    def forward(self, layers: list[torch.Tensor]) -> list[torch.Tensor]:
        layers = list(layers)
        out = [layers[-1]]
        for i in range(len(layers) - self.startp - 1):
            getattr(self, f"ida_{i}")(layers, len(layers) - i - 2, len(layers))
            out.insert(0, layers[-1])
        return out


class DLASeg(nn.Module):
    """``base`` / ``dla_up`` / ``ida_up`` / heads ``hm, wh, reg`` (head_conv 256, final kernel 1).

    ``forward`` returns ``(heatmap_logits, wh, reg)`` at stride 4 (heatmap before sigmoid). Input sides
    must be multiples of 32.
    """

    def __init__(self, num_classes: int = 80, head_conv: int = 256, down_ratio: int = 4, last_level: int = 5,
                 final_kernel: int = 1) -> None:
        super().__init__()
        if down_ratio not in (2, 4, 8, 16):
            raise ValueError(f"down_ratio must be 2, 4, 8 or 16, got {down_ratio}")
        self.first_level = down_ratio.bit_length() - 1
        self.last_level = last_level
        self.base = DLA()
        channels = self.base.channels
        scales = [2**i for i in range(len(channels[self.first_level:]))]
        self.dla_up = DLAUp(self.first_level, channels[self.first_level:], scales)
        out_channel = channels[self.first_level]
        self.ida_up = IDAUp(out_channel, channels[self.first_level:self.last_level],
                            [2**i for i in range(self.last_level - self.first_level)])
        outputs = {"hm": num_classes, "wh": 2, "reg": 2}
        for name in OFFICIAL_HEAD_NAMES:
            head = make_head(channels[self.first_level], head_conv, outputs[name], final_kernel)
            init_head(head, OFFICIAL_HM_BIAS if name == "hm" else None)
            self.add_module(name, head)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.dla_up(self.base(x))
        # The original clones these before the in-place IDAUp update; list items are only rebound here,
        # so a plain copy of the list is enough.
        y = list(feats[: self.last_level - self.first_level])
        self.ida_up(y, 0, len(y))
        hm, wh, reg = (getattr(self, name)(y[-1]) for name in OFFICIAL_HEAD_NAMES)
        return hm, wh, reg
