"""ctdet decode (torch vs numpy oracle vs hand-made expectations), back-projection and finalize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from centernet_edge.runtime.decode import decode_numpy, decode_torch, project_boxes
from centernet_edge.runtime.detections import Detections
from centernet_edge.runtime.geometry import compute_geometry
from centernet_edge.runtime.postprocess import finalize
from centernet_edge.runtime.spec import (
    Decode,
    GraphIO,
    ModelSpec,
    TensorInfo,
    official_preprocess,
)

ROOT = Path(__file__).resolve().parents[1]
MB3_DESCRIPTION = ROOT / "eval" / "model_descriptions" / "mb3_centernet_coco.json"
BOTH = [decode_numpy, decode_torch]


def as_numpy(decoded):
    return tuple(np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x) for x in decoded)


def logit(p):
    return float(np.log(p / (1 - p)))


def known_heads(n_classes=3, h=16, w=20):
    """Three isolated peaks (one on the border) with known wh/reg; background strictly lower, tie-free."""
    rng = np.random.default_rng(5)
    heat = rng.uniform(-12, -10, (1, n_classes, h, w)).astype(np.float32)
    wh = rng.uniform(0, 50, (1, 2, h, w)).astype(np.float32)
    reg = rng.uniform(0, 1, (1, 2, h, w)).astype(np.float32)
    peaks = [  # (class, y, x, prob, w, h, dx, dy)
        (1, 5, 7, 0.95, 4.0, 6.0, 0.25, 0.75),
        (0, 0, 19, 0.80, 10.0, 2.0, 0.5, 0.125),
        (2, 12, 2, 0.60, 2.0, 8.0, 0.0, 0.5),
    ]
    for cls, y, x, p, bw, bh, dx, dy in peaks:
        heat[0, cls, y, x] = logit(p)
        wh[0, :, y, x] = (bw, bh)
        reg[0, :, y, x] = (dx, dy)
    return heat, wh, reg, peaks


@pytest.mark.parametrize("topk", ["two_stage", "single"])
@pytest.mark.parametrize("reg_offset", [True, False])
@pytest.mark.parametrize("fn", BOTH)
def test_known_peaks_give_known_boxes(fn, reg_offset, topk):
    heat, wh, reg, peaks = known_heads()
    dec = Decode(K=3, topk=topk, reg_offset=reg_offset)
    boxes, scores, classes = as_numpy(fn(heat, wh, reg, dec))
    assert boxes.shape == (1, 3, 4) and scores.shape == (1, 3) and classes.shape == (1, 3)
    for k, (cls, y, x, p, bw, bh, dx, dy) in enumerate(peaks):
        cx, cy = (x + dx, y + dy) if reg_offset else (x + 0.5, y + 0.5)
        expected = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]
        np.testing.assert_allclose(boxes[0, k], expected, atol=1e-5)
        np.testing.assert_allclose(scores[0, k], p, atol=1e-6)
        assert classes[0, k] == cls
    # The same map already through a sigmoid, declared as such, decodes identically.
    probs = torch.sigmoid(torch.from_numpy(heat)).numpy()
    b2, s2, c2 = as_numpy(fn(probs, wh, reg, Decode(K=3, topk=topk, reg_offset=reg_offset,
                                                   heatmap_activation="sigmoid")))
    np.testing.assert_allclose(b2, boxes, atol=1e-6)
    np.testing.assert_allclose(s2, scores, atol=1e-6)
    np.testing.assert_array_equal(c2, classes)


@pytest.mark.parametrize("fn", BOTH)
def test_ties_survive_nms_and_neighbours_do_not(fn):
    rng = np.random.default_rng(1)
    heat = rng.uniform(0.0, 0.1, (1, 2, 10, 12)).astype(np.float32)
    heat[0, 1, 4, 4] = heat[0, 1, 4, 5] = 0.9  # a two-pixel plateau: both are local maxima
    heat[0, 1, 3, 4] = 0.8  # next to the plateau: suppressed
    heat[0, 0, 8, 10] = 0.5  # an isolated peak in another class
    wh = np.ones((1, 2, 10, 12), np.float32)
    _, scores, classes = as_numpy(fn(heat, wh, None, Decode(K=3, heatmap_activation="sigmoid",
                                                            reg_offset=False)))
    np.testing.assert_allclose(scores[0], [0.9, 0.9, 0.5])
    np.testing.assert_array_equal(classes[0], [1, 1, 0])


def random_heads(n=2, c=5, h=12, w=10, seed=0):
    rng = np.random.default_rng(seed)
    heat = rng.normal(-2, 1.5, (n, c, h, w)).astype(np.float32)
    wh = rng.uniform(0, 30, (n, 2, h, w)).astype(np.float32)
    reg = rng.uniform(0, 1, (n, 2, h, w)).astype(np.float32)
    return heat, wh, reg


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_stage_and_single_agree_without_ties(seed):
    heat, wh, reg = random_heads(seed=seed)
    schemes = ("two_stage", "single")
    results = [as_numpy(fn(heat, wh, reg, Decode(K=20, topk=t))) for fn in BOTH for t in schemes]
    ref_boxes, ref_scores, ref_classes = results[0]
    assert (ref_scores > 0).all() and (np.diff(ref_scores, axis=1) < 0).all()  # tie-free top-K
    for boxes, scores, classes in results[1:]:
        np.testing.assert_allclose(boxes, ref_boxes, atol=1e-5)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
        np.testing.assert_array_equal(classes, ref_classes)


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("reg_offset", [True, False])
def test_torch_and_numpy_agree_on_random_heads(reg_offset, kernel):
    heat, wh, reg = random_heads(n=3, c=4, h=24, w=32, seed=7)
    dec = Decode(K=40, reg_offset=reg_offset, peak_kernel=kernel)
    t = as_numpy(decode_torch(torch.from_numpy(heat), torch.from_numpy(wh), torch.from_numpy(reg), dec))
    n = as_numpy(decode_numpy(heat, wh, reg, dec))
    np.testing.assert_allclose(t[0], n[0], atol=1e-5)
    np.testing.assert_allclose(t[1], n[1], atol=1e-6)
    np.testing.assert_array_equal(t[2], n[2])
    assert t[2].dtype == n[2].dtype == np.int64


def test_nms_is_a_real_local_maximum_filter():
    heat, wh, reg = random_heads(n=1, c=2, h=9, w=9, seed=3)
    _, scores, classes = as_numpy(decode_numpy(heat, wh, reg, Decode(K=100)))
    probs = 1 / (1 + np.exp(-heat[0].astype(np.float64)))
    # Brute force: count strict-or-equal 3x3 local maxima per class; the decoder must keep exactly those.
    maxima = sum(
        probs[c, y, x] >= probs[c, max(0, y - 1):y + 2, max(0, x - 1):x + 2].max()
        for c in range(2) for y in range(9) for x in range(9)
    )
    assert int((scores[0] > 0).sum()) == maxima


@pytest.mark.parametrize("topk", ["two_stage", "single"])
@pytest.mark.parametrize("fn", BOTH)
def test_k_larger_than_map_returns_fewer_rows(fn, topk):
    heat, wh, reg = random_heads(n=1, c=2, h=3, w=3)
    boxes, scores, classes = as_numpy(fn(heat, wh, reg, Decode(K=100, topk=topk)))
    assert boxes.shape == (1, 18, 4) and scores.shape == (1, 18)


def test_missing_reg_is_an_error():
    heat, wh, _ = random_heads(n=1)
    for fn in BOTH:
        with pytest.raises(ValueError, match="reg"):
            fn(heat, wh, None, Decode())


# ---- back-projection --------------------------------------------------------------------------------


BOXES_OUT = np.array([[0.0, 0.0, 10.0, 12.0], [31.25, 7.5, 90.0, 60.125]], dtype=np.float32)


@pytest.mark.parametrize("hw", [(427, 640), (500, 375)])
def test_affine_inverse_closed_form(hw):
    h, w = hw
    g = compute_geometry(h, w, official_preprocess())
    s = max(h, w)
    r = s / 128
    got = project_boxes(BOXES_OUT, g, Decode(), frame="output")
    exp = BOXES_OUT * r + np.array([w / 2 - s / 2, h / 2 - s / 2] * 2)
    np.testing.assert_allclose(got, exp, atol=1e-3)
    # mmdet's x*stride-then-unwarp agrees whenever the input is a multiple of the stride.
    shift = project_boxes(BOXES_OUT, g, Decode(back_projection="border_shift"), frame="output")
    np.testing.assert_allclose(shift, got, atol=1e-3)


@pytest.mark.parametrize("hw", [(427, 640), (500, 375), (97, 131)])
def test_border_shift_equals_affine_inverse_for_keep_res(hw):
    h, w = hw
    g = compute_geometry(h, w, official_preprocess(keep_res=True))
    left, top = g.inp_w // 2 - w // 2, g.inp_h // 2 - h // 2
    mmdet = BOXES_OUT * 4 - np.array([left, top, left, top])
    for mode in ("affine_inverse", "border_shift"):
        got = project_boxes(BOXES_OUT, g, Decode(back_projection=mode))
        np.testing.assert_allclose(got, mmdet, atol=1e-4)
    net = project_boxes(BOXES_OUT * 4, g, Decode(), frame="network_input")
    np.testing.assert_allclose(net, mmdet, atol=1e-4)
    with pytest.raises(ValueError):
        project_boxes(BOXES_OUT, g, Decode(), frame="stride")


# ---- finalize ---------------------------------------------------------------------------------------


def raw_head_spec(layout, reg=True, activation="logits"):
    dims = ["N", "H", "W", "C"] if layout == "NHWC" else ["N", "C", "H", "W"]
    roles = ["heatmap", "wh"] + (["reg"] if reg else [])
    graph = GraphIO(preprocess="none", decode=False,
                    input=TensorInfo("input", "float32", ["N", 3, "H", "W"], "NCHW"),
                    outputs={r: TensorInfo(r, "float32", dims, layout) for r in roles})
    dec = Decode(K=20, reg_offset=reg, heatmap_activation=activation)
    return ModelSpec("raw", "official", "tiny", 5, [f"c{i}" for i in range(5)],
                     official_preprocess(input_size=(48, 40)), dec, graph).validate()


@pytest.mark.parametrize("reg", [True, False])
def test_finalize_raw_heads_nchw_and_nhwc(reg):
    heat, wh, regh = random_heads(n=2, c=5, h=12, w=10, seed=11)
    geoms = [compute_geometry(300, 200, official_preprocess(input_size=(48, 40))),
             compute_geometry(90, 160, official_preprocess(input_size=(48, 40)))]
    nchw = {"heatmap": heat, "wh": wh, "reg": regh}
    nhwc = {k: v.transpose(0, 2, 3, 1) for k, v in nchw.items()}
    spec = raw_head_spec("NCHW", reg)
    a = finalize(nchw, spec, geoms)
    b = finalize(nhwc, raw_head_spec("NHWC", reg), geoms)
    c = finalize(nchw, spec, geoms, backend="torch")
    dec = decode_numpy(heat, wh, regh if reg else None, spec.decode)
    for i, geom in enumerate(geoms):
        exp = project_boxes(dec.boxes[i], geom, spec.decode)
        for got in (a[i], b[i], c[i]):
            assert len(got) == 20 and got.labels.dtype == np.int64
            np.testing.assert_allclose(got.boxes, exp, atol=1e-4)
            np.testing.assert_allclose(got.scores, dec.scores[i], atol=1e-6)
            np.testing.assert_array_equal(got.labels, dec.classes[i])
    with pytest.raises(ValueError, match="geometries"):
        finalize(nchw, spec, geoms[:1])


def test_finalize_detections_original_frame():
    graph = GraphIO(outputs={"detections": TensorInfo("d", "float32", ["N", 2, 6])})
    spec = ModelSpec("d", "official", "tiny", 5, [f"c{i}" for i in range(5)], official_preprocess(),
                     Decode(), graph).validate()
    rows = np.array([[[1, 2, 30, 40, 0.9, 3], [5, 6, 7, 8, 0.2, 0]]], np.float32)
    (det,) = finalize({"detections": rows}, spec, [compute_geometry(100, 120, spec.preprocess)])
    np.testing.assert_array_equal(det.to_array(), rows[0])
    assert det.labels.tolist() == [3, 0]


def test_finalize_detections_network_input_frame_mb3():
    spec = ModelSpec.from_file(MB3_DESCRIPTION)
    h, w = 480, 640
    rows = np.zeros((1, 100, 6), np.float32)
    rows[0, 0] = [128, 256, 384, 512, 0.7, 17]
    rows[0, 1] = [0, 0, 512, 512, 0.1, 0]
    (det,) = finalize({"detections": rows, "heatmap": np.zeros((1, 128, 128, 80), np.float32)}, spec,
                      [compute_geometry(h, w, spec.preprocess)])
    assert len(det) == 100
    np.testing.assert_allclose(det.boxes[0], [128 * w / 512, 256 * h / 512, 384 * w / 512, h], atol=1e-4)
    np.testing.assert_allclose(det.boxes[1], [0, 0, w, h], atol=1e-4)
    assert det.labels[0] == 17 and det.scores[0] == np.float32(0.7)


def test_detections_helpers():
    d = Detections([[0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3]], [0.2, 0.9, 0.5], [1.0, 2.0, 2.9999])
    assert len(d) == 3 and d.labels.tolist() == [1, 2, 3]
    top = d.top(2)
    assert top.scores.tolist() == pytest.approx([0.9, 0.5]) and top.labels.tolist() == [2, 3]
    back = Detections.from_array(d.to_array())
    np.testing.assert_array_equal(back.boxes, d.boxes)
    np.testing.assert_array_equal(back.labels, d.labels)
    assert len(Detections.empty()) == 0 and Detections.empty().to_array().shape == (0, 6)
    with pytest.raises(ValueError):
        Detections([[0, 0, 1, 1]], [0.1, 0.2], [0, 0])
