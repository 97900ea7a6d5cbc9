"""CenterNet 'ctdet' decode (heads -> boxes in the output/stride frame) and back-projection.

Two independent implementations of the same decode:
  * :func:`decode_torch` follows upstream ``src/lib/models/decode.py`` (two-stage top-K) and mmdet's
    single flattened top-K line by line; it is what the reference detector uses;
  * :func:`decode_numpy` is a plain re-implementation (shifted-window max, explicit loops, stable argsort)
    that needs no torch and serves as the test oracle and the numpy runtime's decoder.
They agree exactly whenever the top-K has no ties. With ties, torch.topk's order is unspecified while
``decode_numpy`` breaks them by lower index (class-major, then row-major position).

When ``K`` exceeds what the map holds (K > H*W for the per-class stage), fewer than K rows come back
instead of upstream's torch.topk error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .geometry import InputGeometry, affine_boxes, compose_affine
from .spec import Decode

if TYPE_CHECKING:
    import torch

__all__ = ["Decoded", "decode_numpy", "decode_torch", "local_max_mask", "project_boxes", "window_max"]


class Decoded(NamedTuple):
    """Batched decode result: boxes (N, K, 4) xyxy in output-map units, scores (N, K), classes (N, K)."""

    boxes: Any
    scores: Any
    classes: Any


def _check_heads(heatmap_shape: tuple[int, ...], wh: Any, reg: Any, decode: Decode) -> None:
    if len(heatmap_shape) != 4:
        raise ValueError(f"heatmap must be (N, C, H, W); got shape {tuple(heatmap_shape)}")
    n, _, h, w = heatmap_shape
    if tuple(wh.shape) != (n, 2, h, w):
        raise ValueError(f"wh must be (N, 2, H, W) = {(n, 2, h, w)}; got {tuple(wh.shape)}")
    if decode.reg_offset:
        if reg is None:
            raise ValueError("decode.reg_offset is true but no reg head was given")
        if tuple(reg.shape) != (n, 2, h, w):
            raise ValueError(f"reg must be (N, 2, H, W) = {(n, 2, h, w)}; got {tuple(reg.shape)}")


# ---- torch (upstream-faithful) ----------------------------------------------------------------------


def decode_torch(
    heatmap: torch.Tensor | np.ndarray,
    wh: torch.Tensor | np.ndarray,
    reg: torch.Tensor | np.ndarray | None,
    decode: Decode,
) -> Decoded:
    """Upstream ctdet_decode on (N, C, H, W) heads; returns torch tensors (classes int64)."""
    import torch
    import torch.nn.functional as F

    heat, wh_t = torch.as_tensor(heatmap).float(), torch.as_tensor(wh).float()
    reg_t = torch.as_tensor(reg).float() if (decode.reg_offset and reg is not None) else None
    _check_heads(tuple(heat.shape), wh_t, reg_t if decode.reg_offset else None, decode)
    n, c, h, w = heat.shape

    if decode.heatmap_activation == "logits":
        heat = heat.sigmoid()
    pad = (decode.peak_kernel - 1) // 2
    hmax = F.max_pool2d(heat, decode.peak_kernel, stride=1, padding=pad)
    heat = heat * (hmax == heat).float()  # equal neighbours (ties) all survive, as upstream

    if decode.topk == "two_stage":
        k1 = min(decode.K, h * w)
        cls_scores, cls_inds = torch.topk(heat.reshape(n, c, -1), k1)
        k = min(decode.K, c * k1)
        scores, ind = torch.topk(cls_scores.reshape(n, -1), k)
        classes = torch.div(ind, k1, rounding_mode="floor")
        inds = torch.gather(cls_inds.reshape(n, -1), 1, ind)
    else:
        k = min(decode.K, c * h * w)
        scores, flat = torch.topk(heat.reshape(n, -1), k)
        classes = torch.div(flat, h * w, rounding_mode="floor")
        inds = flat % (h * w)
    ys = torch.div(inds, w, rounding_mode="floor").float()
    xs = (inds % w).float()

    def gather(head: torch.Tensor) -> torch.Tensor:  # (N, 2, H, W) -> (N, k, 2)
        flat_head = head.reshape(n, 2, -1)
        return torch.gather(flat_head, 2, inds.unsqueeze(1).expand(n, 2, k)).permute(0, 2, 1)

    if reg_t is not None:
        off = gather(reg_t)
        xs, ys = xs + off[..., 0], ys + off[..., 1]
    else:
        xs, ys = xs + 0.5, ys + 0.5
    size = gather(wh_t)
    half_w, half_h = size[..., 0] / 2, size[..., 1] / 2
    boxes = torch.stack([xs - half_w, ys - half_h, xs + half_w, ys + half_h], dim=2)
    return Decoded(boxes, scores, classes.long())


# ---- numpy (independent oracle) ---------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def window_max(heat: np.ndarray, kernel: int) -> np.ndarray:
    """Max over a kernel x kernel window of the last two axes; cells past the border are left out, as
    max_pool2d's -inf padding leaves them.

    Max is exact and separable: shifted in-place maxima along rows, then columns, take 4 * (kernel // 2)
    passes instead of kernel**2 over a padded copy."""
    pad = kernel // 2
    rows = heat.copy()
    for d in range(1, pad + 1):
        np.maximum(rows[..., d:], heat[..., :-d], out=rows[..., d:])
        np.maximum(rows[..., :-d], heat[..., d:], out=rows[..., :-d])
    out = rows.copy()
    for d in range(1, pad + 1):
        np.maximum(out[..., d:, :], rows[..., :-d, :], out=out[..., d:, :])
        np.maximum(out[..., :-d, :], rows[..., d:, :], out=out[..., :-d, :])
    return out


def local_max_mask(heat: np.ndarray, kernel: int) -> np.ndarray:
    """heat == maxpool(heat) over a kernel x kernel window: CenterNet's peak NMS (ties survive)."""
    return heat == window_max(heat, kernel)


def _top_indices(values: np.ndarray, k: int) -> np.ndarray:
    # Stable sort on the negation: highest first, ties by lower index.
    return np.argsort(-values, kind="stable")[:k]


def decode_numpy(
    heatmap: np.ndarray, wh: np.ndarray, reg: np.ndarray | None, decode: Decode
) -> Decoded:
    """Straightforward numpy ctdet decode on (N, C, H, W) heads; returns numpy arrays."""
    heat = np.asarray(heatmap, dtype=np.float32)
    wh = np.asarray(wh, dtype=np.float32)
    reg = np.asarray(reg, dtype=np.float32) if (decode.reg_offset and reg is not None) else None
    _check_heads(heat.shape, wh, reg if decode.reg_offset else None, decode)
    n, c, h, w = heat.shape
    if decode.heatmap_activation == "logits":
        heat = _sigmoid(heat)
    heat = np.where(local_max_mask(heat, decode.peak_kernel), heat, np.float32(0.0))

    all_boxes, all_scores, all_classes = [], [], []
    for b in range(n):
        if decode.topk == "two_stage":
            k1 = min(decode.K, h * w)
            cand_inds = np.zeros((c, k1), dtype=np.int64)
            cand_scores = np.zeros((c, k1), dtype=np.float32)
            for cls in range(c):
                flat = heat[b, cls].reshape(-1)
                cand_inds[cls] = _top_indices(flat, k1)
                cand_scores[cls] = flat[cand_inds[cls]]
            pick = _top_indices(cand_scores.reshape(-1), min(decode.K, c * k1))
            classes = pick // k1
            inds = cand_inds.reshape(-1)[pick]
            scores = cand_scores.reshape(-1)[pick]
        else:
            flat = heat[b].reshape(-1)
            pick = _top_indices(flat, min(decode.K, c * h * w))
            classes, inds, scores = pick // (h * w), pick % (h * w), flat[pick]
        ys, xs = inds // w, inds % w
        cx = xs.astype(np.float32)
        cy = ys.astype(np.float32)
        if reg is not None:
            cx = cx + reg[b, 0, ys, xs]
            cy = cy + reg[b, 1, ys, xs]
        else:
            cx, cy = cx + np.float32(0.5), cy + np.float32(0.5)
        half_w, half_h = wh[b, 0, ys, xs] / 2, wh[b, 1, ys, xs] / 2
        all_boxes.append(np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1))
        all_scores.append(scores)
        all_classes.append(classes)
    return Decoded(
        np.stack(all_boxes).astype(np.float32),
        np.stack(all_scores).astype(np.float32),
        np.stack(all_classes).astype(np.int64),
    )


# ---- back-projection --------------------------------------------------------------------------------


def project_boxes(
    boxes: np.ndarray, geom: InputGeometry, decode: Decode, frame: str = "output"
) -> np.ndarray:
    """Map (..., 4) xyxy boxes of one image to original-image pixels (float32, not clipped).

    frame='output' (stride frame, what the decoders return):
      affine_inverse: upstream ``transform_preds``, i.e.
                      ``get_affine_transform(c, s, 0, (out_w, out_h), inv=1)``;
      border_shift:   mmdet, ``x * stride`` then back through the input warp (for keep_res that is
                      ``x * stride - border_left``; mmdet's factor inp_w / out_w equals the stride whenever
                      the input size is a multiple of it, which keep_res guarantees).
    frame='network_input': boxes already in network-input pixels, mapped with ``geom.to_original``.
    """
    if frame == "network_input":
        m = geom.to_original
    elif frame == "output":
        if decode.back_projection == "affine_inverse":
            m = geom.output_to_original(decode.stride)
        elif decode.back_projection == "border_shift":
            stride = float(decode.stride)
            m = compose_affine(geom.to_original, np.array([[stride, 0.0, 0.0], [0.0, stride, 0.0]]))
        else:
            raise ValueError(f"unknown decode.back_projection {decode.back_projection!r}")
    else:
        raise ValueError(f"frame must be 'output' or 'network_input'; got {frame!r}")
    return affine_boxes(np.asarray(boxes, dtype=np.float32), m).astype(np.float32)
