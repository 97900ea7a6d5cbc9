"""Pre-processing against upstream's formulas, and prepare_batch for every graph input variant."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from centernet_edge.runtime.decode import project_boxes
from centernet_edge.runtime.geometry import affine_boxes, compute_geometry
from centernet_edge.runtime.preprocess import check_image, normalize_image, prepare_batch, warp_image
from centernet_edge.runtime.spec import (
    OFFICIAL_MEAN_BGR,
    OFFICIAL_STD_BGR,
    Decode,
    GraphIO,
    ModelSpec,
    TensorInfo,
    mmdet_preprocess,
    official_preprocess,
)

ROOT = Path(__file__).resolve().parents[1]
MB3_DESCRIPTION = ROOT / "eval" / "model_descriptions" / "mb3_centernet_coco.json"


def make_spec(pre, graph_pre="none", layout="NCHW", dtype="float32"):
    graph = GraphIO(
        preprocess=graph_pre,
        decode=True,
        input=TensorInfo("input", dtype, ["N", 3, "H", "W"] if layout == "NCHW" else ["N", "H", "W", 3],
                         layout),
        outputs={"detections": TensorInfo("dets", "float32", ["N", 100, 6])},
    )
    return ModelSpec("t", "official", "tiny", 2, ["a", "b"], pre, Decode(), graph).validate()


def random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("keep_res", [False, True])
@pytest.mark.parametrize("hw", [(427, 640), (500, 375), (97, 131)])
def test_warp_and_normalize_match_upstream(hw, keep_res):
    h, w = hw
    img = random_image(h, w)
    pre = official_preprocess(keep_res=keep_res)
    g = compute_geometry(h, w, pre)
    # Upstream base_detector.pre_process, written out with cv2 directly.
    if keep_res:
        c, s = np.float32([w // 2, h // 2]), np.float32([(w | 31) + 1, (h | 31) + 1])
        inp_w, inp_h = int(s[0]), int(s[1])
    else:
        c, s, inp_w, inp_h = np.float32([w / 2, h / 2]), float(max(h, w)), 512, 512
    side = float(np.asarray(s).reshape(-1)[0])
    src = np.float32([c, c + [0, -side / 2], c + [-side / 2, -side / 2]])
    dst = np.float32([[inp_w / 2, inp_h / 2], [inp_w / 2, inp_h / 2 - inp_w / 2], [0, inp_h / 2 - inp_w / 2]])
    trans = cv2.getAffineTransform(src, dst)
    expected = cv2.warpAffine(img, trans, (inp_w, inp_h), flags=cv2.INTER_LINEAR)
    warped = warp_image(img, g, pre)
    np.testing.assert_array_equal(warped, expected)
    mean = np.array(OFFICIAL_MEAN_BGR, dtype=np.float32).reshape(1, 1, 3)
    std = np.array(OFFICIAL_STD_BGR, dtype=np.float32).reshape(1, 1, 3)
    upstream = ((expected / 255.0 - mean) / std).astype(np.float32).transpose(2, 0, 1)
    np.testing.assert_allclose(normalize_image(warped, pre), upstream, rtol=0, atol=1e-6)


def test_normalize_rgb_mmdet():
    img = random_image(8, 6)
    pre = mmdet_preprocess()
    x = normalize_image(img, pre)
    rgb = img[:, :, ::-1].astype(np.float64)
    exp = (rgb - np.float32(pre.mean)) / np.float32(pre.std)
    np.testing.assert_allclose(x, exp.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)
    assert x.dtype == np.float32 and x.shape == (3, 8, 6)


def test_keep_res_warp_is_centred_copy():
    img = random_image(100, 70)
    pre = official_preprocess(keep_res=True)
    g = compute_geometry(100, 70, pre)
    warped = warp_image(img, g, pre)
    top, left = g.inp_h // 2 - 50, g.inp_w // 2 - 35
    assert warped.shape == (128, 96, 3)
    np.testing.assert_array_equal(warped[top:top + 100, left:left + 70], img)
    assert warped[:top].max() == 0 and warped[:, :left].max() == 0


def test_stretch_is_cv2_resize():
    img = random_image(300, 200)
    spec = ModelSpec.from_file(MB3_DESCRIPTION)
    g = compute_geometry(300, 200, spec.preprocess)
    np.testing.assert_array_equal(warp_image(img, g, spec.preprocess),
                                  cv2.resize(img, (512, 512), interpolation=cv2.INTER_LINEAR))


@pytest.mark.parametrize(
    "bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32),
            np.zeros((0, 4, 3), np.uint8), [[1, 2, 3]]],
)
def test_invalid_images_rejected(bad):
    with pytest.raises((ValueError, TypeError)):
        check_image(bad)
    with pytest.raises((ValueError, TypeError)):
        prepare_batch([bad], make_spec(official_preprocess()))


def test_prepare_batch_warp_variant():
    imgs = [random_image(50, 60, 1), random_image(50, 60, 2)]
    spec = make_spec(official_preprocess(), "warp", "NHWC", "uint8")
    batch, geoms = prepare_batch(imgs, spec)
    assert batch.dtype == np.uint8 and batch.shape == (2, 50, 60, 3)
    np.testing.assert_array_equal(batch[1], imgs[1])
    assert [g.orig_hw for g in geoms] == [(50, 60), (50, 60)]
    with pytest.raises(ValueError, match="one size"):
        prepare_batch([imgs[0], random_image(51, 60)], spec)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_prepare_batch_normalize_variant(layout):
    imgs = [random_image(50, 60, 1), random_image(70, 40, 2)]  # different sizes are fine after an affine warp
    pre = official_preprocess(input_size=(64, 96))
    batch, geoms = prepare_batch(imgs, make_spec(pre, "normalize", layout, "uint8"))
    warped = warp_image(imgs[1], geoms[1], pre)
    assert batch.dtype == np.uint8
    if layout == "NHWC":
        assert batch.shape == (2, 64, 96, 3)
        np.testing.assert_array_equal(batch[1], warped)
    else:
        assert batch.shape == (2, 3, 64, 96)
        np.testing.assert_array_equal(batch[1], warped.transpose(2, 0, 1))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_prepare_batch_none_variant(layout):
    imgs = [random_image(50, 60, 1)]
    pre = official_preprocess(input_size=(64, 96))
    batch, geoms = prepare_batch(imgs, make_spec(pre, "none", layout))
    ref = normalize_image(warp_image(imgs[0], geoms[0], pre), pre)
    assert batch.dtype == np.float32 and batch.flags.c_contiguous
    np.testing.assert_array_equal(batch[0], ref if layout == "NCHW" else ref.transpose(1, 2, 0))


def test_prepare_batch_keep_res_sizes_must_match():
    spec = make_spec(official_preprocess(keep_res=True), "none", "NCHW")
    batch, _ = prepare_batch([random_image(40, 60), random_image(33, 50)], spec)  # both pad to 64x64
    assert batch.shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="one size"):
        prepare_batch([random_image(40, 60), random_image(70, 50)], spec)


def test_prepare_batch_mb3_foreign_model():
    spec = ModelSpec.from_file(MB3_DESCRIPTION)
    img = random_image(240, 320)
    batch, geoms = prepare_batch([img], spec)
    assert batch.shape == (1, 512, 512, 3) and batch.dtype == np.float32
    rgb = cv2.resize(img, (512, 512), interpolation=cv2.INTER_LINEAR)[:, :, ::-1]
    np.testing.assert_array_equal(batch[0], rgb.astype(np.float32))  # plain RGB 0..255
    np.testing.assert_allclose(geoms[0].to_original, [[320 / 512, 0, 0], [0, 240 / 512, 0]])


def _bright_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


@pytest.mark.parametrize("keep_res", [False, True])
@pytest.mark.parametrize("hw", [(427, 640), (500, 375)])
def test_chain_box_survives_warp_and_back_projection(hw, keep_res):
    """A white rectangle: warp it, find it in the network input, map it back, recover it within 1 px."""
    h, w = hw
    x1, y1, x2, y2 = 101, 57, 301, 257
    img = np.zeros((h, w, 3), np.uint8)
    img[y1:y2, x1:x2] = 255
    pre = official_preprocess(keep_res=keep_res)
    g = compute_geometry(h, w, pre)
    warped = warp_image(img, g, pre)
    found = _bright_box(warped[:, :, 0] >= 128)
    # Edge-to-edge box [x1, x2) as pixel indices: the warp maps index coordinates.
    predicted = affine_boxes([x1, y1, x2 - 1, y2 - 1], g.to_network) + [0, 0, 1, 1]
    np.testing.assert_allclose(found, predicted, atol=1.0)
    decode = Decode()
    back = project_boxes(found, g, decode, frame="network_input")
    np.testing.assert_allclose(back, [x1, y1, x2, y2], atol=1.0)
    # Same box in the stride-4 output frame through upstream's transform_preds.
    back_out = project_boxes(found / 4.0, g, decode, frame="output")
    np.testing.assert_allclose(back_out, back, atol=1e-3)
