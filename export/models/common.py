"""Pieces shared by the CenterNet architectures: prediction heads and initialisers."""

from __future__ import annotations

import math

import torch
from torch import nn

# Official heads dict for ctdet: {'hm': num_classes, 'wh': 2, 'reg': 2} (opts.py, reg_offset on).
OFFICIAL_HEAD_NAMES = ("hm", "wh", "reg")
MMDET_HEAD_NAMES = ("heatmap_head", "wh_head", "offset_head")
OFFICIAL_HM_BIAS = -2.19


def bias_init_with_prob(prior_prob: float) -> float:
    """mmcv's focal-loss prior: the bias whose sigmoid equals ``prior_prob``."""
    return float(-math.log((1 - prior_prob) / prior_prob))


MMDET_HM_BIAS = bias_init_with_prob(0.1)


def make_head(in_channels: int, head_conv: int, out_channels: int, final_kernel: int = 1) -> nn.Module:
    """``Sequential(conv3x3(in, head_conv, bias), ReLU, conv(head_conv, out))``, or a single conv when
    ``head_conv`` is 0 (the official ``head_conv <= 0`` branch, keys ``<head>.weight``)."""
    if head_conv > 0:
        return nn.Sequential(
            nn.Conv2d(in_channels, head_conv, 3, padding=1, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(head_conv, out_channels, final_kernel, padding=final_kernel // 2, bias=True),
        )
    return nn.Conv2d(in_channels, out_channels, final_kernel, padding=final_kernel // 2, bias=True)


def last_conv(head: nn.Module) -> nn.Conv2d:
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1]


def init_head(head: nn.Module, hm_bias: float | None) -> None:
    """Heatmap heads start at a low prior (focal loss); regression heads start near zero."""
    final = last_conv(head)
    if hm_bias is not None:
        nn.init.constant_(final.bias, hm_bias)
        return
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.001)
            nn.init.zeros_(m.bias)


def fill_up_weights(up: nn.ConvTranspose2d) -> None:
    """Bilinear-upsampling initialisation used by the official DLA/resnet_dcn and mmdet's neck."""
    with torch.no_grad():
        w = up.weight
        if w.is_meta:
            return
        k = w.size(2)
        f = math.ceil(k / 2)
        c = (2 * f - 1 - f % 2) / (2.0 * f)
        coords = torch.arange(k, dtype=w.dtype)
        tent = 1 - (coords / f - c).abs()
        kernel = tent[:, None] * tent[None, :]
        # The originals write only the first input-channel slice of every output channel.
        w[:, 0] = kernel
