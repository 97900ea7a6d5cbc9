"""The in-graph pre/post-processing modules against cv2 and the reference decode, in torch and in ORT."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from centernet_edge.export.torch_ops import AffineWarp, CenterNetDecode, KeepResPad, Normalize
from centernet_edge.export.verify import synthetic_images
from centernet_edge.runtime.decode import decode_numpy, project_boxes
from centernet_edge.runtime.geometry import compute_geometry
from centernet_edge.runtime.preprocess import normalize_image, warp_image
from centernet_edge.runtime.spec import Decode, mmdet_preprocess, official_preprocess


def _to_ort(module: torch.nn.Module, example: tuple[torch.Tensor, ...], names: list[str],
            dynamic: dict[str, dict[int, str]]) -> ort.InferenceSession:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, buf, dynamo=False, opset_version=19,
                          input_names=names, dynamic_axes=dynamic)
    model = onnx.load_from_string(buf.getvalue())
    # No bool tensors anywhere (TensorRT 7.1 INT8 calibration), UINT8 read only by Cast.
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    assert onnx.TensorProto.BOOL not in types.values()
    for node in model.graph.node:
        if node.op_type != "Cast":
            assert not any(types.get(i) == onnx.TensorProto.UINT8 or i == "image" for i in node.input), node
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])


def _images(coco_dir: Path | None) -> list[np.ndarray]:
    imgs = [img for _, img in synthetic_images(3)]
    imgs.append(np.full((7, 5, 3), 200, np.uint8))  # tiny: mostly border, upscaled ~73x
    if coco_dir is not None:
        imgs += [cv2.imread(str(p)) for p in sorted(coco_dir.glob("*.jpg"))[:3]]
    return imgs


@pytest.fixture(scope="module")
def maybe_coco() -> Path | None:
    from conftest import shared_root

    folder = shared_root() / "data" / "coco" / "val2017"
    return folder if folder.is_dir() else None


@pytest.mark.parametrize("size", [(128, 128), (96, 128), (512, 512)])
def test_affine_warp_is_bit_exact_with_cv2(size: tuple[int, int], maybe_coco) -> None:
    pre = official_preprocess(input_size=size)
    warp = AffineWarp(size)
    session = _to_ort(warp, (torch.zeros(1, 37, 53, 3, dtype=torch.uint8),), ["image"],
                      {"image": {0: "N", 1: "H", 2: "W"}})
    for img in _images(maybe_coco):
        geom = compute_geometry(img.shape[0], img.shape[1], pre)
        expected = warp_image(img, geom, pre)
        got_torch, (s, cx, cy) = warp(torch.from_numpy(img)[None])
        got_ort = session.run(None, {"image": img[None]})
        np.testing.assert_array_equal(got_torch[0].permute(1, 2, 0).numpy().astype(np.uint8), expected)
        np.testing.assert_array_equal(got_ort[0][0].transpose(1, 2, 0).astype(np.uint8), expected)
        # The geometry handed to decode is upstream's meta: c = (w/2, h/2), s = max(h, w).
        assert (float(s), float(cx), float(cy)) == (max(img.shape[:2]), img.shape[1] / 2, img.shape[0] / 2)
        np.testing.assert_allclose([float(v) for v in got_ort[1:]], [float(s), float(cx), float(cy)])


@pytest.mark.parametrize("pad", [31, 127])
def test_keep_res_pad_matches_cv2_and_geometry(pad: int, maybe_coco) -> None:
    pre = official_preprocess(keep_res=True, pad=pad)
    session = _to_ort(KeepResPad(pad), (torch.zeros(1, 37, 53, 3, dtype=torch.uint8),), ["image"],
                      {"image": {0: "N", 1: "H", 2: "W"}})
    for img in _images(maybe_coco) + [np.zeros((32, 64, 3), np.uint8)]:
        geom = compute_geometry(img.shape[0], img.shape[1], pre)
        out, s, cx, cy = session.run(None, {"image": np.stack([img, img])})
        assert out.shape == (2, 3, geom.inp_h, geom.inp_w)
        np.testing.assert_array_equal(out[1].transpose(1, 2, 0).astype(np.uint8), warp_image(img, geom, pre))
        np.testing.assert_array_equal([s, cx, cy], [geom.s[0], geom.c[0], geom.c[1]])


def test_keep_res_rejects_bad_pad() -> None:
    with pytest.raises(ValueError, match="2\\*\\*k - 1"):
        KeepResPad(30)


@pytest.mark.parametrize("make_pre", [official_preprocess, mmdet_preprocess], ids=["official", "mmdet"])
def test_normalize_matches_reference(make_pre) -> None:
    pre = make_pre(input_size=(64, 96))
    img = synthetic_images(1, sizes=((64, 96),))[0][1]
    got = Normalize(pre)(torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None])[0].numpy()
    np.testing.assert_allclose(got, normalize_image(img, pre), atol=2e-6, rtol=0)


def _heads(seed: int, n: int, c: int, h: int, w: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    heat = rng.random((n, c, h, w), dtype=np.float32)
    heat[:, :, 1::4] = heat[:, :, 0::4]  # plateaus: equal neighbours both survive peak detection (ties)
    wh = rng.uniform(1, 20, (n, 2, h, w)).astype(np.float32)
    reg = rng.random((n, 2, h, w), dtype=np.float32)
    return heat, wh, reg


@pytest.mark.parametrize("topk", ["two_stage", "single"])
def test_decode_matches_reference_decode(topk: str) -> None:
    decode = Decode(K=50, topk=topk, heatmap_activation="sigmoid")
    module = CenterNetDecode(decode, min_cells=16 * 24)
    pre = official_preprocess(input_size=(64, 96))
    geom = compute_geometry(150, 226, pre)
    geom_t = tuple(torch.tensor(v, dtype=torch.float32) for v in (geom.s[0], geom.c[0], geom.c[1]))
    session = _to_ort(
        module, (torch.zeros(1, 3, 16, 24), torch.zeros(1, 2, 16, 24), torch.zeros(1, 2, 16, 24), geom_t),
        ["heat", "wh", "reg", "s", "cx", "cy"], {k: {0: "N"} for k in ("heat", "wh", "reg")})
    heat, wh, reg = _heads(0, 2, 3, 16, 24)
    scalars = {k: np.array(v, dtype=np.float32) for k, v in zip(("s", "cx", "cy"), (geom.s[0], *geom.c),
                                                                   strict=True)}
    got = session.run(None, {"heat": heat, "wh": wh, "reg": reg, **scalars})[0]
    ref = decode_numpy(heat, wh, reg, decode)
    for i in range(2):
        ref_boxes = project_boxes(ref.boxes[i], geom, decode, frame="output")
        assert got.shape == (2, 50, 6)
        np.testing.assert_allclose(got[i, :, 4], ref.scores[i], atol=0, rtol=0)
        # Ties may come out in another order; compare as sorted sets of rows.
        want = np.concatenate([ref_boxes, ref.scores[i, :, None], ref.classes[i, :, None]], axis=1)
        key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
        np.testing.assert_allclose(key(got[i].astype(np.float64)), key(want.astype(np.float64)), atol=1e-3)


def test_two_stage_decode_pads_maps_smaller_than_k() -> None:
    # An 8x8 map (a 32x32 keep_res input) holds 64 cells per class, fewer than K=100.
    decode = Decode(K=100, topk="two_stage", heatmap_activation="sigmoid")
    module = CenterNetDecode(decode, min_cells=64)
    assert module.pad_cells
    heat, wh, reg = (torch.from_numpy(a) for a in _heads(1, 1, 1, 8, 8))
    geom = (torch.tensor(32.0), torch.tensor(16.0), torch.tensor(16.0))
    dets = module(heat, wh, reg, geom)[0].numpy()
    ref = decode_numpy(heat.numpy(), wh.numpy(), reg.numpy(), decode)
    n = ref.scores.shape[1]  # all 64 cells (non-peaks score 0), fewer than K
    assert n == 64
    np.testing.assert_array_equal(np.sort(dets[:n, 4]), np.sort(ref.scores[0]))
    # The rest are padding rows with score -1, never real peaks.
    assert np.all(dets[n:, 4] == -1.0)
