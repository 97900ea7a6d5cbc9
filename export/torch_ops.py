"""Torch modules that render a model spec's pre- and post-processing as exportable graph ops.

Everything here is written for the TorchScript ONNX exporter and for the TensorRT ONNX parser:
shapes are read from the input tensor (so N, H, W stay dynamic), TopK's K is a Python constant, no op
produces a bool tensor (TensorRT 7.1 silently dropped INT8 calibration for such graphs) and the
decode stays in fp32.

The warp reproduces ``cv2.warpAffine(img, M, size, flags=INTER_LINEAR)`` (constant 0 border) of
OpenCV 5 bit-exactly for the official transforms. OpenCV 5 no longer uses the 5-bit fixed-point
coordinates and 15-bit weights of OpenCV <= 4 (emulating those differs in ~2-7 % of values here): it
computes source coordinates in float32 from the float32-cast inverse matrix, interpolates along x
then y as ``p0 + a * (p1 - p0)`` in float32 and rounds half to even. The official transforms are
axis-aligned (uniform scale plus translation), so the warp is separable: gather two source columns
per output column, blend, gather two rows per output row, blend, with the same operation order (the
column pass runs on an H/W-swapped copy so that it, too, gathers whole rows).
Unlike GridSample this never normalises coordinates to [-1, 1] and back: that round trip moves
coordinates by ~1e-5 px, and an otherwise identical GridSample warp (bilinear, zeros padding,
align_corners=0) differs from cv2 by 1 in 1.5 % of values at 512x512.

Measured residual against cv2 on the 103 COCO val2017 images of the shared data (ONNX Runtime):
0 differing values for 512x512, 384x512 (HxW), 320x320 and 128x128 outputs; 1.7e-4 of values off by 1
for 512x384 and 2.8e-5 for 416x416 - widths whose scale ``max(h, w) / width`` float32 cannot hold
exactly, where cv2's double-precision matrix inversion rounds differently. keep_res is a pure integer
translation, rendered as a zero Pad: exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.onnx.operators import shape_as_tensor

from centernet_edge.runtime.spec import Decode, Preprocess

Geometry = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(s, cx, cy) of the official ``get_affine_transform(c, s, 0, ...)`` as float32 scalars."""


def _taps(coord: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices (into the source padded by one zero pixel per side) and fraction around each coordinate.

    Clamping to [-1, size] lands every out-of-image sample on a zero border pixel, which is cv2's
    constant-0 border without a validity mask (and without bool tensors).
    """
    low = torch.floor(coord)
    frac = coord - low
    first = torch.minimum(torch.maximum(low, torch.full_like(low, -1.0)), size) + 1.0
    second = torch.minimum(torch.maximum(low + 1.0, torch.full_like(low, -1.0)), size) + 1.0
    return first.to(torch.int64), second.to(torch.int64), frac


def to_planar(image: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW.

    Cast first: TensorRT accepts UINT8 only as a Cast's input. Planar layout early makes every later
    per-channel and per-row broadcast a contiguous one (ONNX Runtime is several times slower on
    NHWC tensors broadcast against a 3-vector).
    """
    return image.to(torch.float32).permute(0, 3, 1, 2)


class AffineWarp(nn.Module):
    """uint8 [N,H,W,3] -> float32 [N,3,out_h,out_w] holding cv2.warpAffine's uint8 values.

    Implements the official fixed-resolution transform: c = (w/2, h/2), s = max(h, w), output
    ``input_size``; returns the warped batch and its geometry (shared by the batch: same-size images).
    """

    def __init__(self, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.out_h, self.out_w = (int(v) for v in input_size)
        self.register_buffer("u", torch.arange(self.out_w, dtype=torch.float32), persistent=False)
        self.register_buffer("v", torch.arange(self.out_h, dtype=torch.float32), persistent=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, Geometry]:
        pixels = to_planar(image)
        shape = shape_as_tensor(pixels).to(torch.float32)
        h, w = shape[2], shape[3]
        s = torch.maximum(h, w)
        # Coefficients of the inverse map as cv2 holds them (float32 of the exact value): each is one
        # correctly rounded division of integers that float32 represents exactly.
        scale = s / float(self.out_w)  # get_affine_transform scales by s[0] / output width on both axes
        tx = (w - s) * 0.5
        ty = (h * float(self.out_w) - s * float(self.out_h)) / float(2 * self.out_w)
        x0, x1, ax = _taps(self.u * scale + tx, w)
        y0, y1, ay = _taps(self.v * scale + ty, h)
        pixels = F.pad(pixels, [1, 1, 1, 1])
        # A Gather on the innermost axis copies one float per index (ONNX Runtime: ~2 ms per tap for a
        # 640x480 image); with x as the row axis both passes gather whole rows. The Reshape between the
        # NHWC->NCHW and the H/W swap keeps ORT from merging them into one 4-D permutation, which runs
        # ~10x slower than the two fast-path transposes.
        padded_h, padded_w = pixels.shape[2], pixels.shape[3]
        by_x = pixels.reshape(-1, padded_h, padded_w).transpose(1, 2).reshape(-1, 3, padded_w, padded_h)
        # cv2 (OpenCV 5) interpolates along x, then y, as p0 + a * (p1 - p0); same order, same rounding.
        left = by_x.index_select(2, x0)
        cols = (left + ax.view(1, 1, -1, 1) * (by_x.index_select(2, x1) - left)).transpose(2, 3)
        top = cols.index_select(2, y0)
        out = top + ay.view(1, 1, -1, 1) * (cols.index_select(2, y1) - top)
        # cv2 writes uint8: round half to even (ONNX Round) and saturate.
        out = torch.clamp(torch.round(out), 0.0, 255.0)
        return out, (s, w * 0.5, h * 0.5)


class KeepResPad(nn.Module):
    """uint8 [N,H,W,3] -> float32 [N,3,(H|pad)+1,(W|pad)+1], image centred on a zero canvas.

    The official keep_res transform (c = (w//2, h//2), s = padded size, unit scale) is an integer
    translation, so a zero Pad reproduces cv2.warpAffine exactly.
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        if pad < 0 or (pad + 1) & pad:
            raise ValueError(f"keep_res pad must be 2**k - 1 (31, 127); got {pad}")
        self.multiple = pad + 1

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, Geometry]:
        pixels = to_planar(image)
        h, w = pixels.shape[2], pixels.shape[3]
        # (h | pad) + 1 == (h // (pad + 1) + 1) * (pad + 1) for pad = 2**k - 1; BitwiseOr is not in TensorRT.
        out_h = (h // self.multiple + 1) * self.multiple
        out_w = (w // self.multiple + 1) * self.multiple
        top = out_h // 2 - h // 2
        left = out_w // 2 - w // 2
        padded = F.pad(pixels, [left, out_w - w - left, top, out_h - h - top])
        shape = shape_as_tensor(pixels).to(torch.float32)
        padded_shape = shape_as_tensor(padded).to(torch.float32)
        cy = torch.floor(shape[2] * 0.5)
        cx = torch.floor(shape[3] * 0.5)
        return padded, (padded_shape[3], cx, cy)


class Normalize(nn.Module):
    """float32 0..255 BGR NCHW -> normalised NCHW in the network's colour order.

    ``(x * scale - mean) / std`` is folded into one multiply-add per channel.
    """

    def __init__(self, pre: Preprocess) -> None:
        super().__init__()
        order = [2, 1, 0] if pre.color == "RGB" else [0, 1, 2]
        mul = torch.tensor([pre.scale / s for s in pre.std], dtype=torch.float32)
        add = torch.tensor([-m / s for m, s in zip(pre.mean, pre.std, strict=True)], dtype=torch.float32)
        self.flip = pre.color == "RGB"
        self.register_buffer("order", torch.tensor(order, dtype=torch.int64), persistent=False)
        self.register_buffer("mul", mul.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("add", add.view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.flip:
            pixels = pixels.index_select(1, self.order)
        return pixels * self.mul + self.add


def network_geometry(net_input: torch.Tensor) -> Geometry:
    """Geometry for detections in network-input pixels (no warp in the graph): c = centre, s = width."""
    shape = shape_as_tensor(net_input).to(torch.float32)
    h, w = shape[2], shape[3]
    return w, w * 0.5, h * 0.5


class CenterNetDecode(nn.Module):
    """(sigmoid heatmap, wh, reg, geometry) -> detections [N, K, 6] in the geometry's source frame.

    Peaks: ``heat * (1 - Ceil(hmax - heat))`` equals official ``heat * (hmax == heat)`` because
    0 <= hmax - heat <= 1 for scores in [0, 1], without a bool tensor. Top-K follows the source:
    ``two_stage`` (official: K per class, then K overall, class = index // K) or ``single`` (mmdet: one
    TopK over C*H*W). Back-projection is
    the closed form of official ``transform_preds``: x = x_out * s / out_w + cx - s / 2,
    y = y_out * s / out_w + cy - s * out_h / (2 * out_w).
    """

    def __init__(self, decode: Decode, min_cells: int) -> None:
        super().__init__()
        self.K = int(decode.K)
        self.kernel = int(decode.peak_kernel)
        self.two_stage = decode.topk == "two_stage"
        self.reg_offset = bool(decode.reg_offset)
        # A per-class TopK needs >= K cells; small keep_res inputs can have fewer (8x8 for a 32x32 input),
        # so the scores are padded with -1 entries that only surface when C * cells < K.
        self.pad_cells = self.two_stage and min_cells < self.K

    def forward(self, heat: torch.Tensor, wh: torch.Tensor, reg: torch.Tensor | None,
                geom: Geometry) -> torch.Tensor:
        n, c, h, w = heat.shape
        hmax = F.max_pool2d(heat, self.kernel, stride=1, padding=self.kernel // 2)
        # hmax - heat lies in [0, 1] for sigmoid scores, so Ceil is exactly 0 at a peak and 1 elsewhere
        # (and runs ~3x faster than Sign in ONNX Runtime).
        peaks = heat * (1.0 - torch.ceil(hmax - heat))
        cells = h * w
        if self.two_stage:
            flat = peaks.reshape(n, c, cells)
            if self.pad_cells:
                flat = F.pad(flat, [0, self.K], value=-1.0)
            class_scores, class_inds = torch.topk(flat, self.K, dim=2)
            scores, order = torch.topk(class_scores.reshape(n, c * self.K), self.K, dim=1)
            classes = torch.div(order, self.K, rounding_mode="trunc")
            inds = torch.gather(class_inds.reshape(n, c * self.K), 1, order)
            if self.pad_cells:
                inds = torch.minimum(inds, torch.full_like(inds, 1) * (cells - 1))
        else:
            scores, order = torch.topk(peaks.reshape(n, c * cells), self.K, dim=1)
            classes = torch.div(order, cells, rounding_mode="trunc")
            inds = order - classes * cells
        ys_i = torch.div(inds, w, rounding_mode="trunc")
        xs = (inds - ys_i * w).to(torch.float32)
        ys = ys_i.to(torch.float32)
        # repeat (Tile) rather than expand: expand's shape arithmetic exports an Equal/Where on the shape.
        gather_idx = inds.unsqueeze(1).repeat(1, 2, 1)
        size = torch.gather(wh.reshape(n, 2, cells), 2, gather_idx)
        if reg is not None and self.reg_offset:
            offset = torch.gather(reg.reshape(n, 2, cells), 2, gather_idx)
            xs = xs + offset[:, 0]
            ys = ys + offset[:, 1]
        else:
            xs = xs + 0.5
            ys = ys + 0.5
        half_w = size[:, 0] * 0.5
        half_h = size[:, 1] * 0.5
        s, cx, cy = geom
        out_shape = shape_as_tensor(heat).to(torch.float32)
        ratio = s / out_shape[3]
        off_x = cx - s * 0.5
        off_y = cy - ratio * out_shape[2] * 0.5
        boxes = torch.stack(
            [(xs - half_w) * ratio + off_x, (ys - half_h) * ratio + off_y,
             (xs + half_w) * ratio + off_x, (ys + half_h) * ratio + off_y],
            dim=2,
        )
        return torch.cat([boxes, scores.unsqueeze(2), classes.to(torch.float32).unsqueeze(2)], dim=2)


class ExportGraph(nn.Module):
    """Pre-processing + network + sigmoid (+ decode) as one module for ``torch.onnx.export``.

    ``graph_preprocess``: ``warp`` (raw uint8 NHWC BGR images), ``normalize`` (uint8 NHWC BGR at the
    network size) or ``none`` (normalised float NCHW). Outputs: with decode ``(detections, heatmap, wh,
    reg)`` (the heads are exposed so export can name them, then drops them from the graph outputs);
    without decode ``(heatmap, wh, reg)``.
    """

    def __init__(self, model: nn.Module, pre: Preprocess, decode: Decode | None, graph_preprocess: str,
                 min_cells: int) -> None:
        super().__init__()
        self.model = model
        self.graph_preprocess = graph_preprocess
        self.warp: nn.Module | None = None
        if graph_preprocess == "warp":
            self.warp = KeepResPad(pre.pad) if pre.resize == "keep_res" else AffineWarp(pre.input_size)
        self.normalize = Normalize(pre) if graph_preprocess in ("warp", "normalize") else None
        self.decode = CenterNetDecode(decode, min_cells) if decode is not None else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        geom: Geometry | None = None
        if self.warp is not None:
            x, geom = self.warp(x)
        elif self.graph_preprocess == "normalize":
            x = to_planar(x)
        if self.normalize is not None:
            x = self.normalize(x)
        hm, wh, reg = self.model(x)
        heat = torch.sigmoid(hm)
        if self.decode is None:
            return heat, wh, reg
        if geom is None:
            geom = network_geometry(x)
        return self.decode(heat, wh, reg, geom), heat, wh, reg
