"""Image <-> network-input <-> output-map coordinate transforms (the reference geometry).

Conventions. ``affine`` and ``keep_res`` follow xingyizhou/CenterNet exactly: one 2x3 matrix built by
``get_affine_transform`` serves both ``cv2.warpAffine`` (which applies it to integer pixel indices) and
the box back-projection, so boxes and pixels share the *pixel-index* convention. ``stretch`` (foreign
models) maps boxes with the *edge* convention ``x_net = x * inp_w / w``, which is what such models' own
post-processing assumes; the pixels themselves are resampled by ``cv2.resize`` under the *pixel-centre*
convention ``x_net = (x + 0.5) * inp_w / w - 0.5`` (:meth:`InputGeometry.warp_matrix`). The two differ by
``0.5 * (inp_w / w - 1)`` network pixels, below one pixel for any sane size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .spec import Preprocess

__all__ = [
    "InputGeometry",
    "affine_points",
    "affine_boxes",
    "compose_affine",
    "compute_geometry",
    "get_affine_transform",
    "invert_affine",
]


def _solve_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix taking three src points onto three dst points (what cv2.getAffineTransform does)."""
    a = np.hstack([src.astype(np.float64), np.ones((3, 1))])
    # Solving in float64 from float32 points reproduces cv2.getAffineTransform to ~1e-12.
    return np.linalg.solve(a, dst.astype(np.float64)).T.copy()


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    direct = a - b
    return b + np.array([-direct[1], direct[0]], dtype=np.float32)


def get_affine_transform(
    center: Sequence[float] | np.ndarray,
    scale: float | Sequence[float] | np.ndarray,
    rot: float,
    output_size: Sequence[int],
    shift: Sequence[float] = (0.0, 0.0),
    inv: bool = False,
) -> np.ndarray:
    """Official CenterNet ``get_affine_transform`` (src/lib/utils/image.py), float64 2x3.

    ``output_size`` is (width, height). Only ``scale[0]`` sets the zoom (``output_w / scale[0]`` on both
    axes); ``scale[1]`` is ignored, exactly like upstream. Points are rounded to float32 before solving,
    as upstream does, so matrices agree with it bit-for-bit up to the solver.
    """
    scale_arr = np.asarray(scale, dtype=np.float32)
    if scale_arr.ndim == 0:
        scale_arr = np.array([scale_arr, scale_arr], dtype=np.float32)
    center_arr = np.asarray(center, dtype=np.float32)
    shift_arr = np.asarray(shift, dtype=np.float32)
    src_w = float(scale_arr[0])
    dst_w, dst_h = float(output_size[0]), float(output_size[1])

    rot_rad = np.pi * rot / 180.0
    sn, cs = np.sin(rot_rad), np.cos(rot_rad)
    src_dir = np.array([-(src_w * -0.5) * sn, (src_w * -0.5) * cs])
    dst_dir = np.array([0.0, dst_w * -0.5], dtype=np.float32)

    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = center_arr + scale_arr * shift_arr
    src[1] = center_arr + src_dir + scale_arr * shift_arr
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = np.array([dst_w * 0.5, dst_h * 0.5], dtype=np.float32) + dst_dir
    src[2] = _third_point(src[0], src[1])
    dst[2] = _third_point(dst[0], dst[1])
    return _solve_affine(dst, src) if inv else _solve_affine(src, dst)


def invert_affine(m: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine matrix (same result as cv2.invertAffineTransform, in float64)."""
    full = np.vstack([np.asarray(m, dtype=np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2].copy()


def compose_affine(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 2x3 matrix applying ``inner`` first, then ``outer``."""
    full_outer = np.vstack([np.asarray(outer, dtype=np.float64), [0.0, 0.0, 1.0]])
    full_inner = np.vstack([np.asarray(inner, dtype=np.float64), [0.0, 0.0, 1.0]])
    return (full_outer @ full_inner)[:2].copy()


def affine_points(points: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Apply a 2x3 matrix to points of shape (..., 2); float64 result."""
    pts = np.asarray(points, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    return pts @ m[:, :2].T + m[:, 2]


def affine_boxes(boxes: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Map (..., 4) xyxy boxes by transforming both corners, as upstream ``transform_preds`` does.

    Valid for the scale+translate matrices used here (no rotation/flip), so corners stay ordered.
    """
    b = np.asarray(boxes, dtype=np.float64)
    out = np.empty_like(b)
    out[..., 0:2] = affine_points(b[..., 0:2], m)
    out[..., 2:4] = affine_points(b[..., 2:4], m)
    return out


def _scale_matrix(sx: float, sy: float) -> np.ndarray:
    return np.array([[sx, 0.0, 0.0], [0.0, sy, 0.0]], dtype=np.float64)


@dataclass
class InputGeometry:
    """Where one original image lands in the network input, and the way back.

    ``c`` and ``s`` are upstream's ``meta['c']`` / ``meta['s']`` (float32, s as two values; for
    ``stretch`` they are informational: c = image centre, s = (w, h)).
    ``to_network`` maps original pixel coordinates to network-input pixels, ``to_original`` the reverse.
    """

    resize: str
    orig_h: int
    orig_w: int
    inp_h: int
    inp_w: int
    c: np.ndarray
    s: np.ndarray
    to_network: np.ndarray
    to_original: np.ndarray

    @property
    def orig_hw(self) -> tuple[int, int]:
        return self.orig_h, self.orig_w

    @property
    def inp_hw(self) -> tuple[int, int]:
        return self.inp_h, self.inp_w

    def output_size(self, stride: int) -> tuple[int, int]:
        """(out_h, out_w) of the stride-``stride`` heads, as upstream's meta (floor division)."""
        return self.inp_h // stride, self.inp_w // stride

    def output_to_original(self, stride: int) -> np.ndarray:
        """2x3 matrix from output-map (stride frame) coordinates to original pixels.

        affine/keep_res: upstream ``transform_preds`` matrix,
        ``get_affine_transform(c, s, 0, (out_w, out_h), inv=1)``; stretch: ``x * stride`` then edge scaling.
        """
        if self.resize == "stretch":
            return compose_affine(self.to_original, _scale_matrix(stride, stride))
        out_h, out_w = self.output_size(stride)
        return get_affine_transform(self.c, self.s, 0, (out_w, out_h), inv=True)

    def warp_matrix(self) -> np.ndarray:
        """Matrix taking original pixel indices to network pixel indices the way the pixels are resampled.

        Equal to ``to_network`` for affine/keep_res (cv2.warpAffine uses it directly); for stretch it is
        cv2.resize's pixel-centre mapping ``(x + 0.5) * f - 0.5``, useful for a warpAffine-only runtime.
        """
        if self.resize != "stretch":
            return self.to_network.copy()
        fx, fy = self.inp_w / self.orig_w, self.inp_h / self.orig_h
        return np.array([[fx, 0.0, 0.5 * fx - 0.5], [0.0, fy, 0.5 * fy - 0.5]], dtype=np.float64)


def compute_geometry(height: int, width: int, pre: Preprocess) -> InputGeometry:
    """The geometry of an ``height`` x ``width`` image under ``pre`` (upstream ``pre_process`` at scale 1)."""
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive; got {height}x{width}")
    if pre.resize == "keep_res":
        inp_h, inp_w = (height | pre.pad) + 1, (width | pre.pad) + 1
        # Integer division for the centre is upstream's: it makes the warp a pure integer translation.
        c = np.array([width // 2, height // 2], dtype=np.float32)
        s = np.array([inp_w, inp_h], dtype=np.float32)
    elif pre.resize in ("affine", "stretch"):
        if pre.input_size is None:
            raise ValueError(f"preprocess.input_size is required for resize={pre.resize!r}")
        inp_h, inp_w = int(pre.input_size[0]), int(pre.input_size[1])
        c = np.array([width / 2.0, height / 2.0], dtype=np.float32)
        if pre.resize == "affine":
            side = float(max(height, width))
            s = np.array([side, side], dtype=np.float32)
        else:
            s = np.array([width, height], dtype=np.float32)
    else:
        raise ValueError(f"unknown preprocess.resize {pre.resize!r}")

    if pre.resize == "stretch":
        to_network = _scale_matrix(inp_w / width, inp_h / height)
        to_original = _scale_matrix(width / inp_w, height / inp_h)
    else:
        to_network = get_affine_transform(c, s, 0, (inp_w, inp_h))
        # Upstream builds inverses by swapping the point sets, not by inverting: keep that.
        to_original = get_affine_transform(c, s, 0, (inp_w, inp_h), inv=True)
    return InputGeometry(pre.resize, height, width, inp_h, inp_w, c, s, to_network, to_original)
