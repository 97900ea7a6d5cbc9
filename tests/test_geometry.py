"""Geometry against cv2 and the closed forms of upstream CenterNet's pre_process / transform_preds."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from centernet_edge.runtime.geometry import (
    affine_boxes,
    affine_points,
    compose_affine,
    compute_geometry,
    get_affine_transform,
    invert_affine,
)
from centernet_edge.runtime.spec import Preprocess, official_preprocess

SIZES = [(427, 640), (500, 375), (517, 333), (1, 1), (512, 512), (231, 1001)]  # (h, w)


def _upstream_points(center, side, out_w, out_h):
    """The three point pairs of upstream get_affine_transform at rot=0, written out by hand."""
    cx, cy = center
    src = np.float32([[cx, cy], [cx, cy - side / 2], [cx - side / 2, cy - side / 2]])
    dst = np.float32([[out_w / 2, out_h / 2], [out_w / 2, out_h / 2 - out_w / 2],
                      [out_w / 2 - out_w / 2, out_h / 2 - out_w / 2]])
    return src, dst


@pytest.mark.parametrize("hw", SIZES)
def test_affine_matrix_matches_cv2(hw):
    h, w = hw
    c, s = (w / 2.0, h / 2.0), float(max(h, w))
    src, dst = _upstream_points(c, s, 512, 512)
    np.testing.assert_allclose(get_affine_transform(np.float32(c), s, 0, (512, 512)),
                               cv2.getAffineTransform(src, dst), rtol=0, atol=1e-9)
    np.testing.assert_allclose(get_affine_transform(np.float32(c), s, 0, (512, 512), inv=True),
                               cv2.getAffineTransform(dst, src), rtol=0, atol=1e-9)


@pytest.mark.parametrize("hw", SIZES)
def test_fixed_512_geometry_closed_form(hw):
    h, w = hw
    g = compute_geometry(h, w, official_preprocess())
    assert (g.inp_h, g.inp_w) == (512, 512)
    r = 512 / max(h, w)
    expected = np.array([[r, 0, 256 - r * w / 2], [0, r, 256 - r * h / 2]])
    np.testing.assert_allclose(g.to_network, expected, atol=1e-6)
    np.testing.assert_allclose(g.to_original, cv2.invertAffineTransform(g.to_network), atol=1e-6)
    # REFERENCE 5.1 closed form of transform_preds: x = x_out*r + cx - s/2, y = y_out*r + cy - s*oh/(2*ow).
    m = g.output_to_original(4)
    side = max(h, w)
    out = np.array([[0.0, 0.0], [17.25, 101.5], [128.0, 128.0]])
    exp = np.stack([out[:, 0] * side / 128 + w / 2 - side / 2,
                    out[:, 1] * side / 128 + h / 2 - side * 128 / (2 * 128)], axis=1)
    np.testing.assert_allclose(affine_points(out, m), exp, atol=1e-4)


@pytest.mark.parametrize("pad", [31, 127])
@pytest.mark.parametrize("hw", SIZES)
def test_keep_res_geometry(hw, pad):
    h, w = hw
    g = compute_geometry(h, w, official_preprocess(keep_res=True, pad=pad))
    inp_h, inp_w = (h | pad) + 1, (w | pad) + 1
    assert (g.inp_h, g.inp_w) == (inp_h, inp_w)
    assert inp_h % (pad + 1) == 0 and inp_w % (pad + 1) == 0 and inp_h > h and inp_w > w
    np.testing.assert_array_equal(g.c, np.float32([w // 2, h // 2]))
    np.testing.assert_array_equal(g.s, np.float32([inp_w, inp_h]))
    # Pure translation that centres the image; equals mmdet's border (left, top).
    left, top = inp_w // 2 - w // 2, inp_h // 2 - h // 2
    np.testing.assert_allclose(g.to_network, [[1, 0, left], [0, 1, top]], atol=1e-9)
    np.testing.assert_allclose(g.to_original, [[1, 0, -left], [0, 1, -top]], atol=1e-9)
    src, dst = _upstream_points((w // 2, h // 2), inp_w, inp_w, inp_h)
    np.testing.assert_allclose(g.to_network, cv2.getAffineTransform(src, dst), atol=1e-9)
    # Output frame: x*4 - left.
    np.testing.assert_allclose(g.output_to_original(4), [[4, 0, -left], [0, 4, -top]], atol=1e-9)
    assert g.output_size(4) == (inp_h // 4, inp_w // 4)


def test_only_first_scale_component_is_used():
    a = get_affine_transform((100, 50), (300, 1), 0, (128, 64))
    b = get_affine_transform((100, 50), (300, 999), 0, (128, 64))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a[:, :2], np.eye(2) * 128 / 300, atol=1e-9)


def test_rotation_and_shift():
    m = get_affine_transform((10.0, 20.0), 40.0, 90, (80, 80))
    np.testing.assert_allclose(affine_points([10.0, 20.0], m), [40, 40], atol=1e-5)
    # Upstream's src direction (0, -s/2) rotated by +90 deg is (s/2, 0) and lands on dst (0, -w/2):
    # image +x goes to network -y, zoom 2.
    np.testing.assert_allclose(m[:, :2], [[0, 2], [-2, 0]], atol=1e-6)
    shifted = get_affine_transform((10.0, 20.0), 40.0, 0, (80, 80), shift=(0.25, 0.5))
    np.testing.assert_allclose(affine_points([20.0, 40.0], shifted), [40, 40], atol=1e-5)


@pytest.mark.parametrize("hw", [(427, 640), (500, 375), (517, 333)])
def test_stretch_conventions(hw):
    h, w = hw
    pre = Preprocess(resize="stretch", input_size=(512, 384))
    g = compute_geometry(h, w, pre)
    fx, fy = 384 / w, 512 / h
    # Boxes: edge convention.
    np.testing.assert_allclose(g.to_network, [[fx, 0, 0], [0, fy, 0]])
    np.testing.assert_allclose(affine_boxes([[0, 0, w, h]], g.to_network), [[0, 0, 384, 512]], atol=1e-9)
    identity = compose_affine(g.to_original, g.to_network)
    np.testing.assert_allclose(identity, [[1, 0, 0], [0, 1, 0]], atol=1e-12)
    np.testing.assert_allclose(affine_points([[8.0, 8.0]], g.output_to_original(4)), [[32 / fx, 32 / fy]])
    # Pixels: cv2.resize samples at pixel centres; warpAffine with warp_matrix() agrees away from borders.
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (7, 7), 2)
    resized = cv2.resize(img, (384, 512), interpolation=cv2.INTER_LINEAR)
    warped = cv2.warpAffine(img, g.warp_matrix(), (384, 512), flags=cv2.INTER_LINEAR)
    diff = np.abs(resized.astype(int) - warped.astype(int))[4:-4, 4:-4]
    assert diff.max() <= 2
    edge = cv2.warpAffine(img, g.to_network, (384, 512), flags=cv2.INTER_LINEAR)
    assert np.abs(resized.astype(int) - edge.astype(int))[4:-4, 4:-4].mean() > diff.mean()


def test_invert_and_compose():
    m = get_affine_transform((37.5, 12.0), 300.0, 0, (96, 64))
    np.testing.assert_allclose(invert_affine(m), cv2.invertAffineTransform(m), atol=1e-9)
    np.testing.assert_allclose(compose_affine(invert_affine(m), m), [[1, 0, 0], [0, 1, 0]], atol=1e-12)


def test_bad_sizes():
    with pytest.raises(ValueError):
        compute_geometry(0, 10, official_preprocess())
