"""Convert between official ``resdcn_18`` and mmdetection ``centernet_resnet18_dcnv2`` state_dicts.

The two networks are the same graph (REFERENCE.md §6.2): ResNet-18, then three stages of
DCNv2 3x3 -> BN -> ReLU -> ConvTranspose k4 s2 -> BN -> ReLU with 256/128/64 channels, then 3x3 -> ReLU -> 1x1
heads on 64 channels. Only names differ, plus one parameter: the official DCN has a bias and mmdetection's
(followed by a norm layer) has none. A bias ahead of an eval-mode BN is absorbed exactly by its running
mean: BN(y + b) with mean m equals BN(y) with mean m - b. Training-mode BN subtracts the batch mean, so there
the bias has no effect at all, and the conversion stays exact for fine-tuning too.

Input normalisation differs between the two sources (see runtime/spec.py); converting weights does not
change which mean/std the network expects.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from centernet_edge.export.checkpoints import (
    CheckpointError,
    extract_state_dict,
    infer_architecture,
    safe_torch_load,
)

__all__ = ["official_to_mmdet", "mmdet_to_official", "convert_checkpoint", "OFFICIAL_ARCH", "MMDET_ARCH"]

OFFICIAL_ARCH = "resdcn_18"
MMDET_ARCH = "mmdet_r18_dcnv2"

_BACKBONE_ROOTS = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
_HEADS = {"hm": "heatmap_head", "wh": "wh_head", "reg": "offset_head"}
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_STAGES = 3
# Official resnet_dcn deconv_layers per stage: [DCN, BN, ReLU, ConvTranspose, BN, ReLU].
_OFFICIAL_STRIDE = 6


def _stage_keys(stage: int) -> dict[str, str]:
    """Official key -> mmdet key for the parameters that map one to one in one deconv stage."""
    o, m = _OFFICIAL_STRIDE * stage, 2 * stage
    pairs = {
        f"deconv_layers.{o}.weight": f"neck.deconv_layers.{m}.conv.weight",
        f"deconv_layers.{o}.conv_offset_mask.weight": f"neck.deconv_layers.{m}.conv.conv_offset.weight",
        f"deconv_layers.{o}.conv_offset_mask.bias": f"neck.deconv_layers.{m}.conv.conv_offset.bias",
        f"deconv_layers.{o + 3}.weight": f"neck.deconv_layers.{m + 1}.conv.weight",
    }
    for name in _BN_FIELDS:
        pairs[f"deconv_layers.{o + 1}.{name}"] = f"neck.deconv_layers.{m}.bn.{name}"
        pairs[f"deconv_layers.{o + 4}.{name}"] = f"neck.deconv_layers.{m + 1}.bn.{name}"
    return pairs


def _head_keys() -> dict[str, str]:
    return {
        f"{old}.{i}.{p}": f"bbox_head.{new}.{i}.{p}"
        for old, new in _HEADS.items()
        for i in (0, 2)
        for p in ("weight", "bias")
    }


def _rename_map() -> dict[str, str]:
    mapping = _head_keys()
    for stage in range(_STAGES):
        mapping.update(_stage_keys(stage))
    return mapping


def _check_leftovers(leftover: list[str], direction: str) -> None:
    if leftover:
        shown = ", ".join(sorted(leftover)[:5])
        raise CheckpointError(
            f"{direction}: {len(leftover)} keys have no counterpart (e.g. {shown}); only official "
            "resdcn_18 <-> mmdet centernet_resnet18_dcnv2 are structurally identical"
        )


def official_to_mmdet(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official resdcn_18 keys -> mmdet r18-dcnv2 keys, folding each DCN bias into the following BN."""
    mapping = _rename_map()
    out: dict[str, torch.Tensor] = {}
    leftover = []
    for key, value in state_dict.items():
        if key.startswith(_BACKBONE_ROOTS):
            out[f"backbone.{key}"] = value.clone()
        elif key in mapping:
            out[mapping[key]] = value.clone()
        elif not _is_dcn_bias(key):
            leftover.append(key)
    _check_leftovers(leftover, "official -> mmdet")
    for stage in range(_STAGES):
        bias_key = f"deconv_layers.{_OFFICIAL_STRIDE * stage}.bias"
        mean_key = f"neck.deconv_layers.{2 * stage}.bn.running_mean"
        if bias_key not in state_dict or mean_key not in out:
            raise CheckpointError(f"official -> mmdet: {bias_key} or its BN running_mean is missing")
        mean, bias = out[mean_key], state_dict[bias_key]
        # Subtract in float64 so the folded mean is the correctly rounded value of m - b.
        out[mean_key] = (mean.double() - bias.double()).to(mean.dtype)
    return out


def _is_dcn_bias(key: str) -> bool:
    return key in {f"deconv_layers.{_OFFICIAL_STRIDE * s}.bias" for s in range(_STAGES)}


def mmdet_to_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmdet r18-dcnv2 keys -> official resdcn_18 keys; the official DCN bias becomes zero."""
    inverse = {v: k for k, v in _rename_map().items()}
    out: dict[str, torch.Tensor] = {}
    leftover = []
    for key, value in state_dict.items():
        if key.startswith("backbone.") and key[len("backbone.") :].startswith(_BACKBONE_ROOTS):
            out[key[len("backbone.") :]] = value.clone()
        elif key in inverse:
            out[inverse[key]] = value.clone()
        else:
            leftover.append(key)
    _check_leftovers(leftover, "mmdet -> official")
    for stage in range(_STAGES):
        weight = out.get(f"deconv_layers.{_OFFICIAL_STRIDE * stage}.weight")
        if weight is None:
            raise CheckpointError(f"mmdet -> official: neck.deconv_layers.{2 * stage}.conv.weight is missing")
        out[f"deconv_layers.{_OFFICIAL_STRIDE * stage}.bias"] = torch.zeros(
            weight.shape[0], dtype=weight.dtype
        )
    return _official_order(out)


_PARAM_ORDER = ("weight", "bias", "conv_offset_mask.weight", "conv_offset_mask.bias") + _BN_FIELDS[2:]


def _official_order(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Order keys as official resnet_dcn does: backbone, deconv layers by index, heads hm, wh, reg."""

    def rank(key: str) -> tuple[int, int, int, int]:
        parts = key.split(".")
        if parts[0] == "deconv_layers":
            return (1, 0, int(parts[1]), _PARAM_ORDER.index(".".join(parts[2:])))
        if parts[0] in _HEADS:
            return (2, list(_HEADS).index(parts[0]), int(parts[1]), _PARAM_ORDER.index(parts[2]))
        return (0, 0, 0, 0)  # backbone: sorted() is stable, so its order is kept

    return dict(sorted(sd.items(), key=lambda item: rank(item[0])))


def _container(sd: dict[str, torch.Tensor], target: str, epoch: int | None, origin: str) -> dict[str, Any]:
    if target == "mmdet":
        # Only plain values so the result loads with weights_only=True; mmdet reads meta optionally.
        meta: dict[str, Any] = {"converted_from": origin}
        if epoch is not None:
            meta["epoch"] = epoch
        return {"meta": meta, "state_dict": sd}
    return {"epoch": epoch if epoch is not None else 0, "state_dict": sd}


def convert_checkpoint(
    src: str | Path | Mapping[str, Any],
    to: Literal["mmdet", "official"],
    dst: str | Path | None = None,
) -> dict[str, Any]:
    """Convert a resdcn_18 / mmdet r18-dcnv2 checkpoint (file or loaded dict) to the other source.

    Returns the checkpoint dict in the target's container format ({'epoch','state_dict'} or
    {'meta','state_dict'}) and writes it with torch.save when `dst` is given."""
    if to not in ("mmdet", "official"):
        raise ValueError(f"to must be 'mmdet' or 'official', got {to!r}")
    where = str(src) if isinstance(src, (str, Path)) else "checkpoint"
    obj = safe_torch_load(Path(src)) if isinstance(src, (str, Path)) else src
    raw = extract_state_dict(obj, where=where)
    guess = infer_architecture(raw.state_dict, where=where)
    expected = OFFICIAL_ARCH if to == "mmdet" else MMDET_ARCH
    if guess.arch != expected:
        raise CheckpointError(
            f"{where}: is '{guess.arch}'; conversion to {to} needs '{expected}' (only official resdcn_18 and "
            "mmdet centernet_resnet18_dcnv2 are the same network)"
        )
    converted = official_to_mmdet(raw.state_dict) if to == "mmdet" else mmdet_to_official(raw.state_dict)
    result = _container(converted, to, raw.epoch, f"{guess.source} {guess.arch}")
    if dst is not None:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, dst)
    return result
