"""The reference detector against a hand-written upstream pipeline, using tiny stand-in networks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from centernet_edge.export.torch_reference import ReferenceDetector, split_heads
from centernet_edge.runtime.decode import decode_numpy, project_boxes
from centernet_edge.runtime.geometry import compute_geometry
from centernet_edge.runtime.postprocess import finalize
from centernet_edge.runtime.spec import (
    OFFICIAL_MEAN_BGR,
    OFFICIAL_STD_BGR,
    Decode,
    GraphIO,
    ModelSpec,
    TensorInfo,
    mmdet_preprocess,
    official_preprocess,
    source_decode,
)

NUM_CLASSES = 3


class TinyCenterNet(nn.Module):
    """Stride-4 stand-in returning (heatmap_logits, wh, reg).

    A fixed random per-position term is added to the heatmap so that flat image regions (the warp's
    black border) do not produce exactly equal scores: the tests compare decoders whose tie order differs.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, style: str = "tuple"):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.hm, self.wh, self.reg = nn.Conv2d(8, num_classes, 1), nn.Conv2d(8, 2, 1), nn.Conv2d(8, 2, 1)
        self.register_buffer("jitter", torch.rand(1, num_classes, 256, 256) * 0.05)
        self.style = style

    def forward(self, x):
        f = self.body(x)
        h, w = f.shape[2:]
        hm = self.hm(f) + self.jitter[:, :, :h, :w]
        wh, reg = self.wh(f).abs() * 10, self.reg(f).sigmoid()
        if self.style == "upstream":
            return [{"hm": hm, "wh": wh, "reg": reg}]
        return hm, wh, reg


def make_spec(pre, decode=None):
    graph = GraphIO(outputs={"detections": TensorInfo("dets", "float32", ["N", 100, 6])})
    return ModelSpec("tiny", "official", "tiny", NUM_CLASSES, ["a", "b", "c"], pre, decode or Decode(K=30),
                     graph).validate()


def textured_image(h, w, seed):
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 1.5)


def upstream_input(img, keep_res):
    """base_detector.pre_process at scale 1, written out independently of the runtime modules."""
    h, w = img.shape[:2]
    if keep_res:
        inp_h, inp_w = (h | 31) + 1, (w | 31) + 1
        trans = np.float64([[1, 0, inp_w // 2 - w // 2], [0, 1, inp_h // 2 - h // 2]])
    else:
        inp_h = inp_w = 128
        r = 128 / max(h, w)
        trans = np.float64([[r, 0, 64 - r * w / 2], [0, r, 64 - r * h / 2]])
    warped = cv2.warpAffine(img, trans, (inp_w, inp_h), flags=cv2.INTER_LINEAR)
    mean = np.float32(OFFICIAL_MEAN_BGR).reshape(1, 1, 3)
    std = np.float32(OFFICIAL_STD_BGR).reshape(1, 1, 3)
    return ((warped / 255.0 - mean) / std).astype(np.float32).transpose(2, 0, 1)


@pytest.mark.parametrize("keep_res", [False, True])
def test_forward_heads_match_upstream_preprocessing(keep_res):
    img = textured_image(90, 120, 0)
    model = TinyCenterNet()
    pre = official_preprocess(keep_res=keep_res, input_size=(128, 128))
    heads = ReferenceDetector(model, make_spec(pre)).forward_heads([img])
    with torch.no_grad():
        hm, wh, reg = model(torch.from_numpy(upstream_input(img, keep_res))[None])
    np.testing.assert_allclose(heads["heatmap"], hm.numpy(), atol=1e-5)
    np.testing.assert_allclose(heads["wh"], wh.numpy(), atol=1e-5)
    np.testing.assert_allclose(heads["reg"], reg.numpy(), atol=1e-5)
    assert set(heads) == {"heatmap", "wh", "reg"}


@pytest.mark.parametrize("keep_res", [False, True])
def test_detect_matches_numpy_decode_of_heads(keep_res):
    imgs = [textured_image(90, 120, 1), textured_image(130, 70, 2)]
    pre = official_preprocess(keep_res=keep_res, input_size=(128, 128))
    spec = make_spec(pre)
    det = ReferenceDetector(TinyCenterNet(), spec)
    results = det.detect(imgs)
    assert len(results) == 2
    for img, got in zip(imgs, results, strict=True):
        heads = det.forward_heads([img])
        dec = decode_numpy(heads["heatmap"], heads["wh"], heads["reg"], spec.decode)
        geom = compute_geometry(img.shape[0], img.shape[1], pre)
        assert len(got) == 30 and (np.diff(got.scores) <= 0).all()
        np.testing.assert_allclose(got.boxes, project_boxes(dec.boxes[0], geom, spec.decode), atol=1e-3)
        np.testing.assert_allclose(got.scores, dec.scores[0], atol=1e-6)
        np.testing.assert_array_equal(got.labels, dec.classes[0])


def test_detect_groups_mixed_sizes_and_keeps_order():
    imgs = [textured_image(90, 120, 3), textured_image(40, 50, 4), textured_image(95, 100, 5)]
    det = ReferenceDetector(TinyCenterNet(), make_spec(official_preprocess(keep_res=True)))
    together = det.detect(imgs)
    for img, got in zip(imgs, together, strict=True):
        (alone,) = det.detect([img])
        np.testing.assert_allclose(got.boxes, alone.boxes, atol=1e-3)
        np.testing.assert_allclose(got.scores, alone.scores, atol=1e-6)
    with pytest.raises(ValueError, match="one size"):
        det.forward_heads(imgs)


def test_reference_agrees_with_finalize_on_raw_heads():
    """Heads through postprocess.finalize (what an ONNX raw-head runtime does) give the same result."""
    imgs = [textured_image(100, 150, 6), textured_image(150, 100, 7)]
    pre = mmdet_preprocess(input_size=(96, 128))
    spec = make_spec(pre, source_decode("mmdet", K=25))
    det = ReferenceDetector(TinyCenterNet(), spec)
    heads = det.forward_heads(imgs)
    raw = ModelSpec.from_dict({**spec.to_dict(), "graph": {
        "preprocess": "none", "decode": False,
        "input": {"name": "x", "dtype": "float32", "shape": ["N", 3, 96, 128], "layout": "NCHW"},
        "outputs": {r: {"name": r, "dtype": "float32", "shape": [], "layout": "NCHW"} for r in heads}}})
    geoms = [compute_geometry(i.shape[0], i.shape[1], pre) for i in imgs]
    for got, ref in zip(finalize(heads, raw, geoms), det.detect(imgs), strict=True):
        np.testing.assert_allclose(got.boxes, ref.boxes, atol=1e-3)
        np.testing.assert_allclose(got.scores, ref.scores, atol=1e-6)
        np.testing.assert_array_equal(got.labels, ref.labels)


def test_upstream_dict_output_and_no_reg():
    img = textured_image(64, 64, 8)
    spec = make_spec(official_preprocess(input_size=(64, 64)))
    a = ReferenceDetector(TinyCenterNet(style="upstream"), spec).detect([img])[0]
    b = ReferenceDetector(TinyCenterNet(), spec).detect([img])[0]
    np.testing.assert_array_equal(a.to_array(), b.to_array())
    hm, wh, reg = split_heads((torch.zeros(1), torch.ones(1)))
    assert reg is None and wh.item() == 1
    with pytest.raises(ValueError):
        split_heads(torch.zeros(1))


# ---- real architectures (random weights) ------------------------------------------------------------


def _build_model(arch: str) -> nn.Module:
    models = pytest.importorskip("centernet_edge.export.models")
    build = getattr(models, "build_model", None)
    if build is None:
        pytest.skip("centernet_edge.export.models.build_model is not available yet")
    torch.manual_seed(0)
    return build(arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["res_18", "resdcn_18"])
def test_real_architectures_on_coco_images(arch, coco_val_dir):
    paths = sorted(coco_val_dir.glob("*.jpg"))[:2]
    imgs = [cv2.imread(str(p)) for p in paths]
    spec = ModelSpec("real", "official", arch, 80, [f"c{i}" for i in range(80)],
                     official_preprocess(input_size=(384, 384)), Decode(K=100),
                     GraphIO(outputs={"detections": TensorInfo("d", "float32", ["N", 100, 6])})).validate()
    det = ReferenceDetector(_build_model(arch), spec)
    heads = det.forward_heads(imgs)
    assert heads["heatmap"].shape == (2, 80, 96, 96)
    assert heads["wh"].shape == heads["reg"].shape == (2, 2, 96, 96)
    for img, d in zip(imgs, det.detect(imgs), strict=True):
        h, w = img.shape[:2]
        side, r = max(h, w), max(h, w) / 96
        assert len(d) == 100 and d.boxes.dtype == np.float32 and d.labels.dtype == np.int64
        assert (np.diff(d.scores) <= 0).all() and ((d.scores >= 0) & (d.scores <= 1)).all()
        assert ((d.labels >= 0) & (d.labels < 80)).all()
        # Centres lie on the letterboxed square around the image (upstream does not clip).
        cx, cy = (d.boxes[:, 0] + d.boxes[:, 2]) / 2, (d.boxes[:, 1] + d.boxes[:, 3]) / 2
        assert (cx >= w / 2 - side / 2 - r).all() and (cx <= w / 2 + side / 2 + r).all()
        assert (cy >= h / 2 - side / 2 - r).all() and (cy <= h / 2 + side / 2 + r).all()
        # Untrained wh heads may be negative (upstream has no ReLU on wh), so only finiteness is checked.
        assert np.isfinite(d.boxes).all()
