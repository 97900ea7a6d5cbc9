"""The C library (runtime/c) against the numpy reference and the exported ONNX graphs.

Three renderings of one spec must agree: pre-processing bit-exact on the warped uint8 image and within
1e-6 on the normalised input; detections identical in order and class, boxes within 1e-3 px and scores
within 1e-6.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from c_runtime_support import TinyHeads, assert_same_detections, c_to_detections

from centernet_edge.runtime.clib import (
    ABI_VERSION,
    C_DIR,
    CLibrary,
    CLibraryError,
    build_shared_library,
    config_values,
    find_compiler,
)
from centernet_edge.runtime.decode import decode_numpy, project_boxes
from centernet_edge.runtime.detections import Detections
from centernet_edge.runtime.geometry import compute_geometry
from centernet_edge.runtime.postprocess import finalize
from centernet_edge.runtime.preprocess import prepare_batch, warp_image
from centernet_edge.runtime.spec import Decode, ModelSpec

NUM_CLASSES = 6


@pytest.fixture(scope="session")
def clib(tmp_path_factory) -> CLibrary:
    if find_compiler() is None:
        pytest.skip("no C compiler on PATH")
    return CLibrary(build_shared_library(tmp_path_factory.mktemp("clib")))


@pytest.fixture(scope="session")
def dev_images(coco_val_dir: Path) -> list[np.ndarray]:
    paths = sorted(coco_val_dir.glob("*.jpg"))
    assert len(paths) >= 100, f"expected the 103 dev images, found {len(paths)}"
    return [cv2.imread(str(p)) for p in paths]


def _session(model) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


class Exported:
    """An end-to-end export (uint8 in, detections out) and its network-only sibling of one tiny network."""

    @staticmethod
    def network_graph(size, classes: int = 1):
        from centernet_edge.runtime.spec import GraphIO, TensorInfo

        h, w = size[0] // 4, size[1] // 4
        return GraphIO(preprocess="none", decode=False, input=TensorInfo("input", "float32", [1, 3, *size], "NCHW"),
                       outputs={r: TensorInfo(r, "float32", [1, c, h, w], "NCHW")
                                for r, c in (("heatmap", classes), ("wh", 2), ("reg", 2))})

    def __init__(self, source: str, keep_res: bool, input_size=None) -> None:
        from centernet_edge.export.onnx_export import ExportOptions, build_spec, export_onnx

        net = TinyHeads(NUM_CLASSES, seed=1 if source == "mmdet" else 0).eval()
        e2e_opts = ExportOptions(keep_res=keep_res, input_size=input_size)
        net_opts = replace(e2e_opts, preprocess="none", decode=False)
        self.spec = build_spec(arch="tiny", source=source, num_classes=NUM_CLASSES, options=e2e_opts)
        self.net_spec = build_spec(arch="tiny", source=source, num_classes=NUM_CLASSES, options=net_opts)
        self.e2e = _session(export_onnx(net, self.spec, e2e_opts))
        self.net = _session(export_onnx(net, self.net_spec, net_opts))


@pytest.fixture(scope="session")
def exported():
    cache: dict[tuple, Exported] = {}

    def get(source: str, keep_res: bool, input_size=None) -> Exported:
        key = (source, keep_res, input_size)
        if key not in cache:
            cache[key] = Exported(source, keep_res, input_size)
        return cache[key]

    return get


def test_abi_version_and_status_strings(clib: CLibrary) -> None:
    header = (C_DIR / "centernet_edge.h").read_text()
    assert int(re.search(r"#define CN_ABI_VERSION (\d+)", header).group(1)) == ABI_VERSION
    assert re.fullmatch(r"\d+\.\d+\.\d+", clib.version())
    assert clib.lib.cn_abi_version() == ABI_VERSION
    strings = {clib.lib.cn_status_string(code).decode() for code in range(7)}
    assert len(strings) == 7 and "ok" in strings
    assert clib.lib.cn_status_string(99).decode() == "unknown status code"


# ---- pre-processing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("source,keep_res,count", [("official", False, None), ("mmdet", False, 20),
                                                   ("official", True, 20), ("mmdet", True, 20)])
def test_preprocess_matches_reference_on_dev_images(clib, exported, dev_images, source, keep_res, count):
    spec = exported(source, keep_res).net_spec
    ctx = clib.context(config_values(spec))
    for i, img in enumerate(dev_images[:count]):
        geom = compute_geometry(img.shape[0], img.shape[1], spec.preprocess)
        warped, t = ctx.preprocess(img, "BGR", "uint8_bgr_nhwc")
        np.testing.assert_array_equal(warped, warp_image(img, geom, spec.preprocess), err_msg=f"image {i}")
        net_in, _ = ctx.preprocess(img, "BGR", "float32")
        want, _ = prepare_batch([img], spec)
        np.testing.assert_allclose(net_in, want[0], rtol=0, atol=1e-6, err_msg=f"image {i}")
        assert (t.input_height, t.input_width) == geom.inp_hw


@pytest.mark.parametrize("size", [(96, 128), (416, 416), (512, 384)])
def test_affine_warp_equals_the_exported_graph(clib, dev_images, size):
    """At sizes where cv2 itself differs from the graph by rounding, the C warp follows the graph."""
    import torch

    from centernet_edge.export.torch_ops import AffineWarp
    from centernet_edge.runtime.spec import official_preprocess

    warp = AffineWarp(size)
    spec = ModelSpec("w", "official", "tiny", 1, ["a"], official_preprocess(input_size=size), Decode(),
                     Exported.network_graph(size))
    ctx = clib.context(config_values(spec))
    for img in dev_images[:8] + [np.full((7, 5, 3), 200, np.uint8)]:
        want, _ = warp(torch.from_numpy(img)[None])
        got, _ = ctx.preprocess(img, "BGR", "uint8_bgr_nhwc")
        np.testing.assert_array_equal(got, want[0].permute(1, 2, 0).numpy().astype(np.uint8))


def test_default_c_config_is_the_official_spec(clib):
    """cn_config_default (official 512x512 COCO, sigmoid heads) equals config_values of that spec."""
    import ctypes

    from centernet_edge.runtime.clib import Config
    from centernet_edge.runtime.spec import official_preprocess, source_decode

    cfg = Config()
    assert clib.lib.cn_config_default(ctypes.byref(cfg)) == 0
    spec = ModelSpec("d", "official", "any", 80, [str(i) for i in range(80)], official_preprocess(),
                     replace(source_decode("official"), heatmap_activation="sigmoid"),
                     Exported.network_graph((512, 512), 80))
    for key, value in config_values(spec).items():
        got = getattr(cfg, key)
        assert (list(got) if key in ("mean", "std") else got) == value, key


def test_pixel_formats_strides_and_quantised_outputs(clib, exported):
    spec = exported("mmdet", False).net_spec
    ctx = clib.context(config_values(spec))
    rng = np.random.default_rng(3)
    bgr = rng.integers(0, 256, (61, 97, 3), dtype=np.uint8)
    want, _ = ctx.preprocess(bgr, "BGR")
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    np.testing.assert_array_equal(ctx.preprocess(rgb, "RGB")[0], want)
    bgra = np.concatenate([bgr, np.full((61, 97, 1), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(ctx.preprocess(bgra, "BGRA")[0], want)
    # Rows 3 * 97 + 5 bytes apart, the padding filled with junk the library must not read as pixels.
    padded = rng.integers(0, 256, (61, 97 * 3 + 5), dtype=np.uint8)
    padded[:, :97 * 3] = bgr.reshape(61, -1)
    np.testing.assert_array_equal(ctx.preprocess(padded, "BGR", stride_bytes=97 * 3 + 5, width=97)[0], want)
    gray = rng.integers(0, 256, (61, 97), dtype=np.uint8)
    np.testing.assert_array_equal(ctx.preprocess(gray, "GRAY")[0],
                                  ctx.preprocess(np.repeat(gray[:, :, None], 3, axis=2), "BGR")[0])
    for tensor, (lo, hi), zp in (("int8", (-128, 127), 3), ("uint8", (0, 255), 128)):
        scale = 0.02
        q, _ = ctx.preprocess(bgr, "BGR", tensor, scale, zp)
        expect = np.clip(np.rint(want / np.float32(scale)) + zp, lo, hi)
        np.testing.assert_array_equal(q.astype(np.int32), expect.astype(np.int32))


def test_bad_arguments_return_status(clib, exported):
    ctx = clib.context(config_values(exported("official", False).net_spec))
    img = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(CLibraryError) as err:
        ctx.preprocess(img, "BGR", stride_bytes=20)  # shorter than a row
    assert err.value.status == 2
    with pytest.raises(CLibraryError) as err:
        ctx.preprocess(img, "BGR", "int8", 0.0, 0)  # no quantisation scale
    assert err.value.status == 2
    heat = np.zeros((1, NUM_CLASSES, 128, 128), np.float32)
    with pytest.raises(CLibraryError) as err:
        ctx.postprocess(heat, np.zeros((1, 2, 128, 128), np.float32), heat[:, :2], [ctx.transform(640, 480)],
                        score_threshold=float("nan"))
    assert err.value.status == 2
    with pytest.raises(CLibraryError) as err:  # heads of another size than the transform
        ctx.postprocess(heat[:, :, :64], np.zeros((1, 2, 64, 128), np.float32), heat[:, :2, :64],
                        [ctx.transform(640, 480)])
    assert err.value.status == 6


# ---- post-processing ----------------------------------------------------------------------------------


def _reference(spec: ModelSpec, heads: dict[str, np.ndarray], geoms) -> list[Detections]:
    return finalize(heads, spec, geoms, backend="numpy")


@pytest.mark.parametrize("source,keep_res,count", [("official", False, None), ("mmdet", False, 25),
                                                   ("official", True, 25), ("mmdet", True, 25)])
def test_end_to_end_parity_with_exported_graph(clib, exported, dev_images, source, keep_res, count):
    """C pre-process -> network-only ONNX -> C post-process == the end-to-end ONNX == the numpy reference."""
    ex = exported(source, keep_res)
    ctx = clib.context(config_values(ex.net_spec))
    nonzero = 0
    for i, img in enumerate(dev_images[:count]):
        net_in, t = ctx.preprocess(img, "BGR")
        heatmap, wh, reg = ex.net.run(["heatmap", "wh", "reg"], {"input": net_in[None]})
        got = c_to_detections(ctx.postprocess(heatmap, wh, reg, [t])[0])
        e2e = Detections.from_array(ex.e2e.run(None, {"image": img[None]})[0][0])
        assert_same_detections(got, e2e, what=f"{source} keep_res={keep_res} image {i} vs graph")
        geom = compute_geometry(img.shape[0], img.shape[1], ex.net_spec.preprocess)
        ref = _reference(ex.net_spec, {"heatmap": heatmap, "wh": wh, "reg": reg}, [geom])[0]
        assert_same_detections(got, ref, what=f"{source} keep_res={keep_res} image {i} vs numpy")
        nonzero += int((got.scores > 0).sum())
    assert nonzero > 100, "the tiny network should give real peaks on photos"


def _quantise(x: np.ndarray, dtype, scale: float, zp: int) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(np.rint(x / scale) + zp, info.min, info.max).astype(dtype)


@pytest.mark.parametrize("head_dtype", ["int8", "uint8", "float16"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_quantised_and_half_heads_match_reference_on_their_values(clib, exported, dev_images, head_dtype,
                                                                  layout):
    ex = exported("official", False)
    ctx = clib.context(config_values(ex.net_spec))
    for img in dev_images[:6]:
        net_in, t = ctx.preprocess(img, "BGR")
        heads = dict(zip(("heatmap", "wh", "reg"), ex.net.run(["heatmap", "wh", "reg"], {"input": net_in[None]}),
                         strict=True))
        quant, fed, used = {}, {}, {}
        for name, x in heads.items():
            if head_dtype == "float16":
                fed[name] = x.astype(np.float16)
                used[name] = fed[name].astype(np.float32)
            else:
                dtype = np.int8 if head_dtype == "int8" else np.uint8
                zp = 0 if (dtype is np.int8 or name != "reg") else 10
                scale = float(np.abs(x).max()) / 120.0 or 1.0
                fed[name] = _quantise(x, dtype, scale, zp)
                used[name] = (fed[name].astype(np.float32) - zp) * np.float32(scale)
                quant[name] = (scale, zp)
            if layout == "NHWC":
                fed[name] = np.ascontiguousarray(fed[name].transpose(0, 2, 3, 1))
        got = c_to_detections(ctx.postprocess(fed["heatmap"], fed["wh"], fed["reg"], [t], layout=layout,
                                              quant=quant)[0])
        geom = compute_geometry(img.shape[0], img.shape[1], ex.net_spec.preprocess)
        assert_same_detections(got, _reference(ex.net_spec, used, [geom])[0], what=f"{head_dtype} {layout}")


def test_logit_heads_and_score_threshold(clib, exported, dev_images):
    ex = exported("mmdet", True)
    spec = ex.net_spec
    logit_spec = replace(spec, decode=replace(spec.decode, heatmap_activation="logits"))
    ctx = clib.context(config_values(logit_spec))
    img = dev_images[0]
    net_in, t = clib.context(config_values(spec)).preprocess(img, "BGR")
    heatmap, wh, reg = ex.net.run(["heatmap", "wh", "reg"], {"input": net_in[None]})
    with np.errstate(divide="ignore"):  # saturated probabilities become infinite logits: still defined
        logits = np.log(heatmap) - np.log1p(-heatmap)
    got = c_to_detections(ctx.postprocess(logits.astype(np.float32), wh, reg, [t])[0])
    geom = compute_geometry(img.shape[0], img.shape[1], spec.preprocess)
    ref = _reference(logit_spec, {"heatmap": logits.astype(np.float32), "wh": wh, "reg": reg}, [geom])[0]
    assert_same_detections(got, ref, what="logits")
    thr = float(np.sort(ref.scores)[-5])
    kept = c_to_detections(clib.context(config_values(spec)).postprocess(heatmap, wh, reg, [t],
                                                                          score_threshold=thr)[0])
    want = ref.top(int((ref.scores >= thr).sum()))
    assert len(kept) == len(want) >= 5
    np.testing.assert_array_equal(kept.labels, want.labels)


def test_batch_items_decode_independently(clib, exported, dev_images):
    ex = exported("official", False)
    ctx = clib.context(config_values(ex.net_spec))
    items = [ctx.preprocess(img, "BGR") for img in dev_images[:3]]
    batch = np.stack([x for x, _ in items])
    heads = ex.net.run(["heatmap", "wh", "reg"], {"input": batch})
    together = ctx.postprocess(*heads, [t for _, t in items])
    for b, (_, t) in enumerate(items):
        alone = ctx.postprocess(*(h[b:b + 1] for h in heads), [t])[0]
        np.testing.assert_array_equal(together[b], alone)
    assert not np.array_equal(together[0]["x1"], together[1]["x1"])


@pytest.mark.parametrize("topk", ["two_stage", "single"])
def test_ties_small_maps_and_k_beyond_candidates(clib, exported, topk):
    ex = exported("official", True)
    spec = replace(ex.net_spec, decode=replace(ex.net_spec.decode, topk=topk, K=100))
    ctx = clib.context(config_values(spec))
    t = ctx.transform(13, 9)  # keep_res 32x32 input -> 8x8 heads: 6 * 64 = 384 cells
    rng = np.random.default_rng(0)
    wh = rng.uniform(1, 5, (1, 2, 8, 8)).astype(np.float32)
    reg = rng.uniform(0, 1, (1, 2, 8, 8)).astype(np.float32)
    geom = compute_geometry(9, 13, spec.preprocess)
    cases = {
        "all equal": np.full((1, NUM_CLASSES, 8, 8), 0.25, np.float32),
        "quantised steps": (rng.integers(0, 4, (1, NUM_CLASSES, 8, 8)) / 4).astype(np.float32),
        "zeros": np.zeros((1, NUM_CLASSES, 8, 8), np.float32),
    }
    for name, heat in cases.items():
        got = c_to_detections(ctx.postprocess(heat, wh, reg, [t])[0])
        ref = _reference(spec, {"heatmap": heat, "wh": wh, "reg": reg}, [geom])[0]
        assert_same_detections(got, ref, what=name)
    # K larger than every candidate: 2 classes on a 2x2 map hold 8 cells.
    small = replace(spec, num_classes=2, class_names=["a", "b"], category_ids=None,
                    decode=replace(spec.decode, K=50))
    ctx2 = clib.context({**config_values(small), "resize": 2, "input_height": 8, "input_width": 8})
    t2 = ctx2.transform(8, 8)
    heat = np.full((1, 2, 2, 2), 0.5, np.float32)
    rows = ctx2.postprocess(heat, np.ones((1, 2, 2, 2), np.float32), np.zeros((1, 2, 2, 2), np.float32), [t2])[0]
    assert len(rows) == 8
    dec = decode_numpy(heat, np.ones((1, 2, 2, 2), np.float32), np.zeros((1, 2, 2, 2), np.float32), small.decode)
    np.testing.assert_array_equal(rows["class_id"], dec.classes[0])


def test_two_stage_graph_padding_rows_are_the_only_difference(clib, exported):
    """The graph pads a map with fewer than K cells with score -1 rows; the C rows are the rest, equal."""
    ex = exported("official", True)
    ctx = clib.context(config_values(ex.net_spec))
    img = np.random.default_rng(5).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    net_in, t = ctx.preprocess(img, "BGR")
    got = c_to_detections(ctx.postprocess(*ex.net.run(["heatmap", "wh", "reg"], {"input": net_in[None]}), [t])[0])
    e2e = Detections.from_array(ex.e2e.run(None, {"image": img[None]})[0][0])
    real = e2e.scores >= 0
    # 8x8 heads: every class is padded to K=100 in the graph's first TopK, yet 6 * 64 cells exceed K.
    assert len(got) == int(real.sum()) == 100
    assert_same_detections(got, Detections(e2e.boxes[real], e2e.scores[real], e2e.labels[real]))


def test_real_mb3_heads(clib, mb3_onnx, dev_images):
    """mb3's own heatmap (NHWC, after sigmoid, stretch geometry, single top-K, no reg) on real photos."""
    from centernet_edge.runtime.spec import load_spec

    desc = Path(__file__).resolve().parents[1] / "eval" / "model_descriptions" / "mb3_centernet_coco.json"
    spec = load_spec(mb3_onnx, desc)
    session = ort.InferenceSession(str(mb3_onnx), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    hm_name = spec.graph.outputs["heatmap"].name
    wh_name = next(n for n in names if n.endswith("/wh"))
    ctx = clib.context(config_values(spec))
    checked = 0
    for img in dev_images[:6]:
        batch, geoms = prepare_batch([img], spec)
        outs = dict(zip(names, session.run(None, {spec.graph.input.name: batch}), strict=True))
        heat = outs[hm_name]
        assert heat.shape == (1, 128, 128, 80)
        wh = outs[wh_name]
        if wh.ndim != 4 or wh.shape[-1] != 2:  # not (w, h) per cell: use fixed sizes, the heatmap is the point
            wh = np.full((1, 128, 128, 2), 6.0, np.float32)
        t = ctx.transform(img.shape[1], img.shape[0])
        got = c_to_detections(ctx.postprocess(heat, np.ascontiguousarray(wh), None, [t],
                                              layout={"heatmap": "NHWC", "wh": "NHWC", "reg": "NCHW"})[0])
        hm_nchw = heat.transpose(0, 3, 1, 2)
        dec = decode_numpy(hm_nchw, wh.transpose(0, 3, 1, 2), None, spec.decode)
        boxes = project_boxes(dec.boxes[0], geoms[0], spec.decode)
        assert_same_detections(got, Detections(boxes, dec.scores[0], dec.classes[0]), what="mb3")
        checked += int((got.scores > 0.3).sum())
    assert checked > 0, "mb3 should find confident objects in the dev photos"
