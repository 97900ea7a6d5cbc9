"""Calibration tensors (network-only rule), streaming statistics, determinism and memory."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from centernet_edge.calib_data.sources import load_calibration_set
from centernet_edge.quantize.stats import (
    collect_calibration_stats,
    collect_statistics,
    load_stats,
    prune_to_outputs,
    save_stats,
)
from centernet_edge.quantize.tensors import calibration_tensors, network_nodes
from centernet_edge.quantize.thresholds import compute_amaxes
from centernet_edge.quantize.trt_cache import render_cache
from centernet_edge.runtime.spec import Decode, GraphIO, ModelSpec, Preprocess, TensorInfo, load_spec

REPO = Path(__file__).resolve().parents[1]
NETWORK_TENSORS = ["normalized", "c1", "r1", "c2", "p1", "s1", "feat", "hm", "wh_raw"]


def tiny_model(size: int = 16, seed: int = 0, log_input: bool = False) -> onnx.ModelProto:
    """image -> (pre-processing) -> conv/relu/pool/add network -> hm & wh head convs -> CenterNet-like decode.

    The decode tail uses a second graph input ("affine") so pruning is exercised too.
    """
    rng = np.random.default_rng(seed)

    def const(name: str, array: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)

    inits = [
        const("k", [1 / 255.0]), const("mean", np.full((1, 3, 1, 1), 0.45)),
        const("w1", rng.normal(0, 0.5, (4, 3, 3, 3))), const("b1", rng.normal(0, 0.1, 4)),
        const("w2", rng.normal(0, 0.5, (4, 4, 3, 3))), const("b2", rng.normal(0, 0.1, 4)),
        const("whm", rng.normal(0, 0.5, (2, 4, 1, 1))), const("bhm", [-2.19, -2.19]),
        const("wwh", rng.normal(0, 0.5, (2, 4, 1, 1))), const("bwh", [0.0, 0.0]),
        const("stride", [4.0]),
        numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([5], dtype=np.int64), "K"),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "aff_axes"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "unsq_axes"),
    ]
    first = "image" if not log_input else "logged"
    nodes = ([helper.make_node("Log", ["image"], ["logged"])] if log_input else []) + [
        helper.make_node("Mul", [first, "k"], ["pre_scaled"]),
        helper.make_node("Sub", ["pre_scaled", "mean"], ["normalized"]),
        helper.make_node("Conv", ["normalized", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Add", ["c2", "p1"], ["s1"]),
        helper.make_node("Relu", ["s1"], ["feat"]),
        helper.make_node("Conv", ["feat", "whm", "bhm"], ["hm"]),
        helper.make_node("Conv", ["feat", "wwh", "bwh"], ["wh_raw"]),
        helper.make_node("Mul", ["wh_raw", "stride"], ["wh"]),
        helper.make_node("Sigmoid", ["hm"], ["hm_sig"]),
        helper.make_node("MaxPool", ["hm_sig"], ["hm_max"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Equal", ["hm_sig", "hm_max"], ["is_peak"]),
        helper.make_node("Cast", ["is_peak"], ["peak_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["hm_sig", "peak_f"], ["peaks"]),
        helper.make_node("Reshape", ["peaks", "flat_shape"], ["flat"]),
        helper.make_node("TopK", ["flat", "K"], ["scores", "inds"]),
        helper.make_node("ReduceSum", ["affine", "aff_axes"], ["aff_sum"], keepdims=0),
        helper.make_node("Unsqueeze", ["aff_sum", "unsq_axes"], ["aff_col"]),
        helper.make_node("Mul", ["scores", "aff_col"], ["dets"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_centernet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size]),
         helper.make_tensor_value_info("affine", TensorProto.FLOAT, ["N", 2, 3])],
        [helper.make_tensor_value_info("hm", TensorProto.FLOAT, ["N", 2, size // 4, size // 4]),
         helper.make_tensor_value_info("wh", TensorProto.FLOAT, ["N", 2, size // 4, size // 4]),
         helper.make_tensor_value_info("dets", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tiny_spec(size: int = 16) -> ModelSpec:
    return ModelSpec(
        name="tiny", source="foreign", arch="tiny", num_classes=2, class_names=["a", "b"],
        preprocess=Preprocess(resize="stretch", input_size=(size, size), color="BGR", scale=1.0,
                              mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
        decode=Decode(),
        graph=GraphIO(preprocess="none", decode=False, input=TensorInfo("image", "float32", ["N", 3, size, size],
                                                                         "NCHW"),
                      outputs={"heatmap": TensorInfo("hm", "float32", []), "wh": TensorInfo("wh", "float32", [])}),
    ).validate()


def write_images(folder: Path, n: int, size: int = 20) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        img = rng.integers(0, 256, (size, size + i % 4, 3), dtype=np.uint8)
        img[: size // 3] = 0  # black rows give exact zeros after ReLU-free layers too
        cv2.imwrite(str(folder / f"{i:03d}.png"), img)
    return folder


def synthetic_batches(n: int, size: int, batch: int = 1):
    def make():
        rng = np.random.default_rng(123)
        for _ in range(0, n, batch):
            yield rng.uniform(0, 255, (batch, 3, size, size)).astype(np.float32)
    return make


# ---- which tensors --------------------------------------------------------------------------------


def test_calibration_tensors_on_a_synthetic_graph():
    model = tiny_model()
    assert calibration_tensors(model, tiny_spec()) == NETWORK_TENSORS
    names = [model.graph.node[i].output[0] for i in network_nodes(model.graph)]
    assert names == ["c1", "r1", "c2", "p1", "s1", "feat", "hm", "wh_raw"]
    with pytest.raises(ValueError, match="not an input of this graph"):
        bad = tiny_spec()
        bad.graph.input.name = "pixels"
        calibration_tensors(model, bad)


def test_graph_without_convs_is_rejected():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(ValueError, match="no Conv/ConvTranspose"):
        calibration_tensors(helper.make_model(graph))


def test_calibration_tensors_on_mb3(mb3_onnx):
    model = onnx.load(str(mb3_onnx))
    spec = load_spec(mb3_onnx, REPO / "eval" / "model_descriptions" / "mb3_centernet_coco.json")
    tensors = calibration_tensors(model, spec)
    assert len(tensors) == 276 and len(set(tensors)) == 276
    # first conv's input is the NHWC->NCHW transposed image (the Transpose itself is pre-processing)
    assert tensors[0] == "tower_0/MobilenetV3/Conv/BatchNorm/FusedBatchNorm_BiasAdd__9__109:0"
    assert "tower_0/images:0" not in tensors
    # head conv outputs are in; everything after them (decode tail) is out
    heads = ["tower_0/CenternetHead/centernet_wh_output/BiasAdd_BiasAdd__108:0",
             "tower_0/CenternetHead/centernet_cls_output/BiasAdd_BiasAdd__107:0"]
    assert tensors[-2:] == heads
    # nodes 275.. are the wh scaling and the decode, except node 278, the heatmap head conv
    tail = {o for i, n in enumerate(model.graph.node) if i >= 275 and n.op_type != "Conv" for o in n.output}
    assert len(tail) > 40
    assert not tail & set(tensors)
    for name in ("tower_0/Sigmoid:0", "tower_0/keypoints", "tower_0/max_pooling2d/MaxPool:0", "tower_0/Equal:0",
                 "tower_0/TopKV2:0", "tower_0/mul:0", "tower_0/wh"):
        assert name not in tensors
    # the squeeze-excite sigmoid inside the head is network, and so is its gating Mul
    assert {"tower_0/CenternetHead/Sigmoid:0", "tower_0/CenternetHead/mul:0"} <= set(tensors)
    # no constants (hard-swish's 1/6, shapes) sneak in
    inits = {i.name for i in model.graph.initializer}
    assert not inits & set(tensors)


# ---- statistics -----------------------------------------------------------------------------------


def reference_stats(model: onnx.ModelProto, tensors: list[str], batches, bins: int = 2048):
    """Everything in memory at once (what the streaming code must avoid), computed independently."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    del exposed.graph.output[:]
    exposed.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(exposed.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    runs = [sess.run(tensors, {"image": b, "affine": np.zeros((b.shape[0], 2, 3), np.float32)}) for b in batches()]
    result = {}
    for i, name in enumerate(tensors):
        values = np.concatenate([r[i].ravel() for r in runs])
        a = np.abs(values)
        absmax = float(a.max())
        idx = np.minimum((a * np.float32(bins / absmax)).astype(np.int64), bins - 1)
        hist = np.bincount(idx[a != 0], minlength=bins)
        result[name] = (absmax, float(values.min()), float(values.max()), values.size, int((a == 0).sum()), hist)
    return result


def test_streaming_stats_equal_in_memory_reference():
    model = tiny_model()
    batches = synthetic_batches(6, 16, batch=2)
    stats = collect_statistics(model, batches, NETWORK_TENSORS, progress=False)
    assert stats.num_images == 6 and stats.num_batches == 3 and stats.names == NETWORK_TENSORS
    expected = reference_stats(model, NETWORK_TENSORS, batches)
    for name in NETWORK_TENSORS:
        s = stats.tensors[name]
        absmax, lo, hi, count, zeros, hist = expected[name]
        assert (s.absmax, s.min, s.max, s.count, s.zero_count) == (absmax, lo, hi, count, zeros), name
        np.testing.assert_array_equal(s.hist, hist, err_msg=name)
        assert s.hist.sum() + s.zero_count == s.count
        assert s.bin_edges[-1] == s.absmax and s.num_bins == 2048
    assert stats.tensors["r1"].zero_count > 0 and stats.tensors["r1"].min == 0.0  # ReLU output


def test_pruning_drops_decode_tail_and_extra_inputs():
    pruned = prune_to_outputs(tiny_model(), ["feat"])
    assert [i.name for i in pruned.graph.input] == ["image"]
    assert {n.op_type for n in pruned.graph.node} == {"Mul", "Sub", "Conv", "Relu", "MaxPool", "Add"}
    assert {i.name for i in pruned.graph.initializer} == {"k", "mean", "w1", "b1", "w2", "b2"}
    with pytest.raises(ValueError, match="not in the graph"):
        prune_to_outputs(tiny_model(), ["nope"])


def test_non_finite_activations_are_reported():
    model = tiny_model(log_input=True)

    def zeros():
        yield np.zeros((1, 3, 16, 16), np.float32)  # log(0) = -inf

    with pytest.raises(ValueError, match="non-finite activations"):
        collect_statistics(model, zeros, ["normalized", "c1"], progress=False)
    with pytest.raises(ValueError, match="no batches"):
        collect_statistics(tiny_model(), lambda: iter(()), ["c1"], progress=False)


def test_same_inputs_give_byte_identical_cache(tmp_path):
    folder = write_images(tmp_path / "imgs", 6)
    model_path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), model_path)
    spec = tiny_spec()
    caches = []
    for _ in range(2):
        calib = load_calibration_set(folder, num_images=5, seed=11)
        stats = collect_calibration_stats(model_path, spec, calib, progress=False)
        caches.append(render_cache(compute_amaxes(stats.tensors, "entropy")).encode())
    assert caches[0] == caches[1]
    assert caches[0].decode().splitlines()[0] == "TRT-101601-EntropyCalibration2"
    assert len(caches[0].decode().splitlines()) == 1 + len(NETWORK_TENSORS)
    # batching does not change the statistics (integer counts, order-free maxima)
    batched = collect_calibration_stats(model_path, spec, calib, batch_size=3, progress=False)
    for name in NETWORK_TENSORS:
        np.testing.assert_array_equal(batched.tensors[name].hist, stats.tensors[name].hist)
        assert batched.tensors[name].absmax == stats.tensors[name].absmax


def test_stats_npz_cache_round_trip_and_reuse(tmp_path, monkeypatch):
    folder = write_images(tmp_path / "imgs", 4)
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    model_path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), model_path)
    calib = load_calibration_set(folder)
    first = collect_calibration_stats(model_path, tiny_spec(), calib, cache_dir=tmp_path / "cache", progress=False)
    assert first.num_images == 4
    assert first.meta["read_report"]["skipped"] == 1 and first.meta["dataset_hash"] == calib.dataset_hash
    files = list((tmp_path / "cache").glob("calib-stats-*.npz"))
    assert len(files) == 1

    import centernet_edge.quantize.stats as stats_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("statistics were recomputed although a matching cache exists")

    monkeypatch.setattr(stats_module, "collect_statistics", must_not_run)
    again = collect_calibration_stats(model_path, tiny_spec(), calib, cache_dir=tmp_path / "cache", progress=False)
    assert again.meta == first.meta and again.names == first.names
    for name in first.names:
        a, b = first.tensors[name], again.tensors[name]
        assert (a.absmax, a.min, a.max, a.count, a.zero_count) == (b.absmax, b.min, b.max, b.count, b.zero_count)
        np.testing.assert_array_equal(a.hist, b.hist)
    # another calibration set has another key: it does not hit this cache
    other = load_calibration_set(folder, num_images=2, seed=1)
    with pytest.raises(AssertionError, match="recomputed"):
        collect_calibration_stats(model_path, tiny_spec(), other, cache_dir=tmp_path / "cache", progress=False)
    path = save_stats(first, tmp_path / "plain.npz")
    assert load_stats(path).tensors["feat"].hist.dtype == np.int64


def _peak_bytes(n_images: int, size: int) -> int:
    model = tiny_model(size=size)
    tracemalloc.start()
    try:
        collect_statistics(model, synthetic_batches(n_images, size), NETWORK_TENSORS, progress=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_images():
    size = 64  # 0.1 MB of activations per image: keeping them would add ~3 MB over 30 more images
    small, large = _peak_bytes(10, size), _peak_bytes(40, size)
    assert large < small * 1.2 + 256 * 1024, (small, large)


def test_data_changing_between_passes_is_an_error():
    calls = []

    def shrinking():
        calls.append(1)
        n = 3 if len(calls) == 1 else 2
        return (np.full((1, 3, 16, 16), 100.0, np.float32) for _ in range(n))

    with pytest.raises(ValueError, match="changed between passes \\(3 then 2 images\\)"):
        collect_statistics(tiny_model(), shrinking, ["c1"], progress=False)


def test_worker_count_does_not_change_the_statistics():
    model = tiny_model()
    batches = synthetic_batches(7, 16)
    one = collect_statistics(model, batches, NETWORK_TENSORS, progress=False, workers=1)
    many = collect_statistics(model, batches, NETWORK_TENSORS, progress=False, workers=3)
    assert (one.num_images, one.num_batches) == (many.num_images, many.num_batches) == (7, 7)
    for name in NETWORK_TENSORS:
        a, b = one.tensors[name], many.tensors[name]
        assert (a.absmax, a.min, a.max, a.count, a.zero_count) == (b.absmax, b.min, b.max, b.count, b.zero_count)
        np.testing.assert_array_equal(a.hist, b.hist, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_chunked_binner_matches_the_clipped_float32_rule(dtype):
    from centernet_edge.quantize.stats import _CHUNK, _Binner

    rng = np.random.default_rng(5)
    x = rng.standard_normal(2 * _CHUNK + 123).astype(dtype)
    x[::7] = 0
    x[::11] = -0.0
    x32 = x.astype(np.float32)
    absmax = float(np.abs(x32).max())
    x32[:3] = [absmax, -absmax, np.nextafter(np.float32(absmax), np.float32(0))]  # the top bin's edge cases
    x = x32.astype(dtype)
    x32 = x.astype(np.float32)
    scale = np.float32(2048 / absmax)
    expected = np.abs(x32) * scale  # the rule: min(int(|x| * scale), bins - 1), in float32
    expected = np.minimum(expected, np.float32(2047)).astype(np.intp)
    hist = np.zeros(2048, np.int64)
    zeros = _Binner(2048).add(x, scale, hist)
    assert zeros == int((x32 == 0).sum())
    np.testing.assert_array_equal(hist, np.bincount(expected, minlength=2048))


def test_worker_errors_reach_the_caller():
    from centernet_edge.quantize.parallel import consume

    def work(item: int, state: list[int]) -> None:
        if item == 3:
            raise RuntimeError("boom")
        state.append(item)

    states: list[list[int]] = [[], []]
    with pytest.raises(RuntimeError, match="boom"):
        consume(iter(range(50)), work, states)
    seen = sorted(states[0] + states[1])
    assert 3 not in seen and len(seen) < 50
