"""Official CenterNet ``resdcn_<depth>`` (``resnet_dcn.py``): ResNet + three stages of
``DCN(3x3) + BN + ReLU + ConvTranspose(k4, s2) + BN + ReLU`` with 256/128/64 channels, heads on 64."""

from __future__ import annotations

import torch
from torch import nn

from .common import OFFICIAL_HEAD_NAMES, OFFICIAL_HM_BIAS, fill_up_weights, init_head, make_head
from .dcn import DCN
from .resnet import ResNet


class PoseResNetDCN(ResNet):
    """Keys: trunk as torchvision, ``deconv_layers.{0,6,12}`` = DCN (``weight, bias,
    conv_offset_mask.*``), BN at ``{1,4,7,10,13,16}``, ConvTranspose at ``{3,9,15}``, heads ``hm/wh/reg``.

    ``forward`` returns ``(heatmap_logits, wh, reg)`` at stride 4 (heatmap before sigmoid).
    """

    def __init__(self, depth: int, num_classes: int = 80, head_conv: int = 64) -> None:
        super().__init__(depth)
        layers: list[nn.Module] = []
        for planes in (256, 128, 64):
            up = nn.ConvTranspose2d(planes, planes, 4, stride=2, padding=1, output_padding=0, bias=False)
            fill_up_weights(up)
            layers += [
                DCN(self.inplanes, planes, kernel_size=3, stride=1, padding=1),
                nn.BatchNorm2d(planes),
                nn.ReLU(inplace=True),
                up,
                nn.BatchNorm2d(planes),
                nn.ReLU(inplace=True),
            ]
            self.inplanes = planes
        self.deconv_layers = nn.Sequential(*layers)
        outputs = {"hm": num_classes, "wh": 2, "reg": 2}
        for name in OFFICIAL_HEAD_NAMES:
            head = make_head(64, head_conv, outputs[name])
            init_head(head, OFFICIAL_HM_BIAS if name == "hm" else None)
            self.add_module(name, head)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat = self.deconv_layers(self.forward_trunk(x))
        hm, wh, reg = (getattr(self, name)(feat) for name in OFFICIAL_HEAD_NAMES)
        return hm, wh, reg
