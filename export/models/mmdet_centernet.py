"""mmdetection CenterNet (``configs/centernet``): ``backbone`` ResNet, ``neck`` CTResNetNeck,
``bbox_head`` CenterNetHead.

Not the same network as the official ``res_18``: every upsampling stage has a 3x3 conv (DCNv2 or plain)
+ BN before the deconv, and the stages have 256/128/64 channels.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import MMDET_HEAD_NAMES, MMDET_HM_BIAS, fill_up_weights, init_head, make_head
from .dcn import ModulatedDeformConv2dPack
from .resnet import ResNet


class ConvModule(nn.Module):
    """mmcv ``ConvModule`` with ``norm_cfg=BN``: keys ``conv.*`` and ``bn.*``; the conv has no bias
    because a norm follows (mmcv's ``bias='auto'``)."""

    def __init__(self, conv: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class CTResNetNeck(nn.Module):
    """``deconv_layers.{0,2,4}``: 3x3 ConvModule (``conv.conv_offset.*`` when ``use_dcn``);
    ``deconv_layers.{1,3,5}``: ConvTranspose(k4, s2, p1) ConvModule."""

    def __init__(self, in_channels: int = 512, num_deconv_filters: tuple[int, ...] = (256, 128, 64),
                 num_deconv_kernels: tuple[int, ...] = (4, 4, 4), use_dcn: bool = True) -> None:
        super().__init__()
        if len(num_deconv_filters) != len(num_deconv_kernels):
            raise ValueError("num_deconv_filters and num_deconv_kernels must have the same length")
        self.use_dcn = use_dcn
        layers: list[nn.Module] = []
        channels = in_channels
        for feat, kernel in zip(num_deconv_filters, num_deconv_kernels, strict=True):
            conv: nn.Module
            if use_dcn:
                conv = ModulatedDeformConv2dPack(channels, feat, 3, padding=1, bias=False)
            else:
                conv = nn.Conv2d(channels, feat, 3, padding=1, bias=False)
            layers.append(ConvModule(conv, feat))
            up = nn.ConvTranspose2d(feat, feat, kernel, stride=2, padding=1, bias=False)
            fill_up_weights(up)
            layers.append(ConvModule(up, feat))
            channels = feat
        self.deconv_layers = nn.Sequential(*layers)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deconv_layers(x)


class CenterNetHead(nn.Module):
    """``heatmap_head``, ``wh_head``, ``offset_head``, each ``{0,2}`` convs."""

    def __init__(self, in_channels: int = 64, feat_channels: int = 64, num_classes: int = 80) -> None:
        super().__init__()
        if feat_channels <= 0:
            raise ValueError(f"mmdet CenterNetHead needs feat_channels > 0, got {feat_channels}")
        self.num_classes = num_classes
        self.heatmap_head = make_head(in_channels, feat_channels, num_classes)
        self.wh_head = make_head(in_channels, feat_channels, 2)
        self.offset_head = make_head(in_channels, feat_channels, 2)
        init_head(self.heatmap_head, MMDET_HM_BIAS)
        init_head(self.wh_head, None)
        init_head(self.offset_head, None)

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hm, wh, offset = (getattr(self, name)(feat) for name in MMDET_HEAD_NAMES)
        return hm, wh, offset


class MMDetCenterNet(nn.Module):
    """``forward`` returns ``(heatmap_logits, wh, offset)`` at stride 4.

    mmdet's ``CenterNetHead.forward_single`` applies ``sigmoid`` to the heatmap; it is left out here so that
    both sources hand logits to the shared decode stage, which applies the sigmoid (same result).
    """

    def __init__(self, depth: int = 18, num_classes: int = 80, head_conv: int = 64,
                 use_dcn: bool = True) -> None:
        super().__init__()
        self.backbone = ResNet(depth)
        self.neck = CTResNetNeck(self.backbone.out_channels, (256, 128, 64), (4, 4, 4), use_dcn=use_dcn)
        self.bbox_head = CenterNetHead(self.neck.out_channels, head_conv, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.bbox_head(self.neck(self.backbone(x)))
