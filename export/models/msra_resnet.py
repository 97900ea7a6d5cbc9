"""Official CenterNet ``res_<depth>`` (``msra_resnet.py``): ResNet + three plain deconv stages of 256
channels + heads on 256 channels. No DCN."""

from __future__ import annotations

import torch
from torch import nn

from .common import OFFICIAL_HEAD_NAMES, OFFICIAL_HM_BIAS, init_head, make_head
from .resnet import ResNet


class PoseResNet(ResNet):
    """Keys: ``conv1, bn1, layer1..4`` (torchvision names), ``deconv_layers.{0,3,6}`` (ConvTranspose,
    no bias) with BN at ``{1,4,7}``, heads ``hm/reg/wh.{0,2}``.

    ``forward`` returns ``(heatmap_logits, wh, reg)`` at stride 4; the heatmap is *not* passed through
    sigmoid (the official ``ctdet`` decode applies it, like our decode stage).
    """

    def __init__(self, depth: int, num_classes: int = 80, head_conv: int = 64) -> None:
        super().__init__(depth)
        layers: list[nn.Module] = []
        for planes in (256, 256, 256):
            layers += [
                nn.ConvTranspose2d(self.inplanes, planes, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(planes),
                nn.ReLU(inplace=True),
            ]
            self.inplanes = planes
        self.deconv_layers = nn.Sequential(*layers)
        outputs = {"hm": num_classes, "wh": 2, "reg": 2}
        # msra_resnet registers heads in sorted() order (hm, reg, wh); the forward order stays hm, wh, reg.
        for name in sorted(outputs):
            head = make_head(256, head_conv, outputs[name])
            init_head(head, OFFICIAL_HM_BIAS if name == "hm" else None)
            self.add_module(name, head)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat = self.deconv_layers(self.forward_trunk(x))
        hm, wh, reg = (getattr(self, name)(feat) for name in OFFICIAL_HEAD_NAMES)
        return hm, wh, reg
