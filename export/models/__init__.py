"""CenterNet architectures in plain PyTorch whose ``state_dict()`` keys and shapes equal the originals'
(xingyizhou/CenterNet and mmdetection), so released checkpoints load strictly.

Every model's ``forward(x)`` takes a normalised float NCHW image and returns
``(heatmap_logits, wh, reg)`` at stride 4. The heatmap is returned as *logits* for both sources: mmdet's
head applies ``sigmoid`` itself, the official code applies it in its decoder; the shared decode stage
applies it uniformly, which is mathematically the same. All models export with the TorchScript exporter at
opset 19 (DCN layers become single ``DeformConv`` nodes, see :mod:`.dcn`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .common import MMDET_HEAD_NAMES, MMDET_HM_BIAS, OFFICIAL_HEAD_NAMES, OFFICIAL_HM_BIAS
from .complexity import count_macs, count_parameters
from .dcn import DCN, ModulatedDeformConv2dPack, decomposed_deform_conv, modulated_deform_conv2d
from .dla import DLASeg
from .hourglass import HourglassNet
from .mmdet_centernet import MMDetCenterNet
from .msra_resnet import PoseResNet
from .resnet_dcn import PoseResNetDCN

__all__ = [
    "ARCHITECTURES",
    "ArchInfo",
    "DCN",
    "ModulatedDeformConv2dPack",
    "build_model",
    "count_macs",
    "count_parameters",
    "decomposed_deform_conv",
    "modulated_deform_conv2d",
]


@dataclass(frozen=True)
class ArchInfo:
    """What the rest of the pipeline needs to know about an architecture without building it."""

    name: str
    source: str  # 'official' (xingyizhou/CenterNet) | 'mmdet'
    family: str  # 'res' | 'resdcn' | 'dla' | 'hourglass' | 'mmdet'
    depth: int
    has_dcn: bool
    default_head_conv: int
    keep_res_pad: int  # official --keep_res pads to (size | pad) + 1; mmdet test_pad_mode ['logical_or', 31]
    head_in_channels: int
    head_names: tuple[str, ...]  # state-dict prefixes of the (heatmap, wh, offset) heads
    hm_bias_init: float
    down_ratio: int = 4

    @property
    def input_multiple(self) -> int:
        """Input sides must be multiples of this (``keep_res_pad + 1``)."""
        return self.keep_res_pad + 1


def _official(name: str, family: str, depth: int, has_dcn: bool, head_conv: int, pad: int,
              head_in: int) -> ArchInfo:
    return ArchInfo(name, "official", family, depth, has_dcn, head_conv, pad, head_in, OFFICIAL_HEAD_NAMES,
                    OFFICIAL_HM_BIAS)


def _registry() -> dict[str, ArchInfo]:
    archs: list[ArchInfo] = []
    for depth in (18, 34, 50, 101):
        # opts.py: head_conv defaults to 256 for DLA and 64 otherwise.
        archs.append(_official(f"res_{depth}", "res", depth, False, 64, 31, 256))
        archs.append(_official(f"resdcn_{depth}", "resdcn", depth, True, 64, 31, 64))
    archs.append(_official("dla_34", "dla", 34, True, 256, 31, 64))
    archs.append(_official("hourglass_104", "hourglass", 104, False, 256, 127, 256))
    for name, dcn in (("mmdet_r18", False), ("mmdet_r18_dcnv2", True)):
        heads = tuple(f"bbox_head.{h}" for h in MMDET_HEAD_NAMES)
        archs.append(ArchInfo(name, "mmdet", "mmdet", 18, dcn, 64, 31, 64, heads, MMDET_HM_BIAS))
    return {a.name: a for a in archs}


ARCHITECTURES: dict[str, ArchInfo] = _registry()


def build_model(arch: str, num_classes: int = 80, head_conv: int | None = None) -> nn.Module:
    """Build ``arch`` (a key of :data:`ARCHITECTURES`) with randomly initialised weights.

    ``head_conv=None`` uses the architecture's default (official ``--head_conv -1``); ``0`` gives the
    official single-conv heads (not available for mmdet or hourglass). Wrap in ``torch.device("meta")`` to
    inspect shapes or count FLOPs without allocating weights.
    """
    info = ARCHITECTURES.get(arch)
    if info is None:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    hc = info.default_head_conv if head_conv is None else int(head_conv)
    if hc < 0:
        raise ValueError(f"head_conv must be >= 0, got {hc}")
    if hc == 0 and info.family in ("mmdet", "hourglass"):
        raise ValueError(f"{arch} has no single-conv head variant: head_conv must be > 0")
    if info.family == "res":
        return PoseResNet(info.depth, num_classes, hc)
    if info.family == "resdcn":
        return PoseResNetDCN(info.depth, num_classes, hc)
    if info.family == "dla":
        return DLASeg(num_classes, hc)
    if info.family == "hourglass":
        return HourglassNet(num_classes, hc)
    return MMDetCenterNet(info.depth, num_classes, hc, use_dcn=info.has_dcn)
