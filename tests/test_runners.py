"""Backend runners: explicit backend choice, the runner protocol's lifecycle, the ONNX Runtime runner on a tiny
graph with an embedded spec, the torch reference runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from centernet_edge.eval.backends import BACKENDS, default_backend, open_runner
from centernet_edge.export.torch_runner import TorchReferenceRunner
from centernet_edge.runtime.onnx_session import SessionError, resolve_providers
from centernet_edge.runtime.runners import (
    OnnxRuntimeRunner,
    Runner,
    RunnerError,
    RunnerOptions,
    StageTimes,
    fill_fixed_batch,
)
from centernet_edge.runtime.spec import GraphIO, ModelSpec, TensorInfo, official_preprocess, source_decode


def _means_graph_spec(batch: int | None = None, input_name: str = "image") -> ModelSpec:
    return ModelSpec(
        name="means", source="foreign", arch="test", num_classes=4, class_names=["a", "b", "c", "d"],
        preprocess=official_preprocess(), decode=source_decode("official"),
        graph=GraphIO(preprocess="warp", input=TensorInfo(input_name, "uint8", ["N", "H", "W", 3], "NHWC"),
                      outputs={"detections": TensorInfo("detections", "float32", ["N", 1, 6])}, batch=batch),
        provenance={"precision": "int8"},
    ).validate()


def _means_model(path: Path, spec: ModelSpec) -> Path:
    """detections[n, 0] = (mean B, G, R, B, G, R) of image n: boxes and scores that identify the input."""
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
        helper.make_node("Concat", ["m", "m"], ["row"], axis=1),
        helper.make_node("Unsqueeze", ["row", "one"], ["detections"]),
    ]
    graph = helper.make_graph(
        nodes, "means",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["N", 1, 6])],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
         helper.make_tensor("one", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    spec.write_to_onnx(model)
    onnx.save(model, path)
    return path


def _image(h: int, w: int, bgr: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.asarray(bgr, np.uint8), (h, w, 3)).copy()


def test_backend_choice_is_explicit_with_defaults_by_extension() -> None:
    assert set(BACKENDS) == {"ort", "torch", "trt"}
    assert default_backend("m.onnx") == "ort" and default_backend("M.PTH") == "torch"
    assert default_backend("m.engine") == "trt"
    with pytest.raises(RunnerError, match="no default backend for 'm.bin'.*use --backend"):
        default_backend("m.bin")
    with pytest.raises(RunnerError, match="unknown backend 'nope'; available: ort, torch, trt"):
        open_runner("nope", "m.onnx")


def test_provider_resolution() -> None:
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    assert resolve_providers(None)[-1] == "CPUExecutionProvider"
    with pytest.raises(SessionError, match="not available in this installation: NoSuchExecutionProvider"):
        resolve_providers(["NoSuchExecutionProvider"])


def test_fixed_batch_filling() -> None:
    batch = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert fill_fixed_batch(batch, None) is batch and fill_fixed_batch(batch, 3) is batch
    np.testing.assert_array_equal(fill_fixed_batch(batch, 5), [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
    with pytest.raises(RunnerError, match="a batch of 3 does not fit the graph's fixed batch of 2"):
        fill_fixed_batch(batch, 2)


def test_runner_lifecycle_raw_run_and_timing_hooks(tmp_path: Path) -> None:
    path = _means_model(tmp_path / "means.onnx", _means_graph_spec())
    seen: list[StageTimes] = []
    with open_runner("ort", path, None, RunnerOptions(providers=["cpu"], threads=1)) as runner:
        assert isinstance(runner, Runner)
        runner.add_timing_hook(seen.append)
        runner.run([_image(30, 40, (10, 20, 2))])
        raw = runner.run_raw(_image(30, 40, (10, 20, 2))[None])
        assert list(raw) == ["detections"]
        np.testing.assert_allclose(raw["detections"], [[[10, 20, 2, 10, 20, 2]]])
    assert seen == [runner.last_timing] and seen[0].images == 1
    with pytest.raises(RunnerError, match="ort runner is closed"):
        runner.run([_image(30, 40, (1, 2, 3))])


def test_ort_runner_reads_the_embedded_spec_and_splits_time(tmp_path: Path) -> None:
    path = _means_model(tmp_path / "means.onnx", _means_graph_spec())
    runner = open_runner("ort", path, None, RunnerOptions(providers=["cpu"], threads=1, keep_raw=True))
    assert isinstance(runner, OnnxRuntimeRunner) and runner.precision == "int8"
    # Different sizes in one call: a raw-image graph gets them one at a time.
    dets = runner.run([_image(30, 40, (10, 20, 2)), _image(50, 20, (3, 4, 1))])
    np.testing.assert_allclose(dets[0].boxes, [[10, 20, 2, 10]])
    np.testing.assert_allclose(dets[0].scores, [20.0])
    assert dets[0].labels.tolist() == [2] and dets[1].labels.tolist() == [1]
    t = runner.last_timing
    assert t is not None and t.images == 2 and min(t.pre_ms, t.infer_ms, t.post_ms) >= 0
    assert t.total_ms == pytest.approx(t.pre_ms + t.infer_ms + t.post_ms)
    assert runner.raw_outputs is not None and runner.raw_outputs["detections"].shape == (2, 1, 6)
    assert runner.describe() == {"backend": "ort", "providers": ["CPUExecutionProvider"], "precision": "int8"}


def test_fixed_batch_graph_is_padded_and_trimmed(tmp_path: Path) -> None:
    spec = _means_graph_spec(batch=2)
    path = _means_model(tmp_path / "b2.onnx", spec)
    runner = OnnxRuntimeRunner(path, providers=["cpu"], intra_op_threads=1)
    images = [_image(8, 8, (i, i, i % 4)) for i in range(3)]
    dets = runner.run(images)
    assert [d.scores.tolist() for d in dets] == [[0.0], [1.0], [2.0]]
    assert runner.raw_outputs is None


def test_spec_that_names_the_wrong_tensors_fails_early(tmp_path: Path) -> None:
    path = _means_model(tmp_path / "m.onnx", _means_graph_spec())
    with pytest.raises(RunnerError, match="model spec names input 'pixels', the graph has image"):
        OnnxRuntimeRunner(path, _means_graph_spec(input_name="pixels"), providers=["cpu"])


@pytest.fixture(scope="module")
def res18_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from centernet_edge.export.models import build_model

    torch.manual_seed(0)
    state = build_model("res_18", num_classes=4).state_dict()
    path = tmp_path_factory.mktemp("ckpt") / "res18_demo.pth"
    torch.save({"epoch": 0, "state_dict": state}, path)
    return path


def test_torch_runner_matches_the_reference_detector(res18_checkpoint: Path) -> None:
    from centernet_edge.export.checkpoints import load_checkpoint
    from centernet_edge.export.torch_reference import ReferenceDetector

    options = RunnerOptions(device="cpu", threads=1, keep_raw=True)
    runner = open_runner("torch", res18_checkpoint, None, options)
    assert isinstance(runner, TorchReferenceRunner)
    assert runner.spec.num_classes == 4 and runner.spec.category_ids is None and runner.precision == "fp32"
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    (dets,) = runner.run([image])
    reference = ReferenceDetector(load_checkpoint(res18_checkpoint).model, runner.spec).detect([image])[0]
    np.testing.assert_array_equal(dets.boxes, reference.boxes)
    np.testing.assert_array_equal(dets.scores, reference.scores)
    np.testing.assert_array_equal(dets.labels, reference.labels)
    assert runner.raw_outputs is not None and runner.raw_outputs["heatmap"].shape == (1, 4, 128, 128)
    assert runner.last_timing is not None and runner.last_timing.infer_ms > 0
    # The raw path returns the same heads for the prepared input.
    inputs, _ = runner.detector.preprocess([image])
    raw = runner.run_raw(np.stack(inputs))
    np.testing.assert_array_equal(raw["heatmap"], runner.raw_outputs["heatmap"])
    runner.close()


def test_torch_fp16_needs_cuda(res18_checkpoint: Path) -> None:
    with pytest.raises(RunnerError, match="fp16 is only supported on CUDA"):
        TorchReferenceRunner(res18_checkpoint, device="cpu", fp16=True)


def test_feed_that_does_not_fit_the_graph_is_explained(tmp_path: Path) -> None:
    path = _means_model(tmp_path / "m.onnx", _means_graph_spec())
    wrong = _means_graph_spec()
    wrong.graph.preprocess = "none"  # a description that claims the graph wants normalised floats
    runner = OnnxRuntimeRunner(path, wrong, providers=["cpu"])
    with pytest.raises(RunnerError, match=r"m.onnx: inference failed on a float32 \[1, 512, 512, 3\] input; "
                                          r"the graph expects tensor\(uint8\)"):
        runner.run([_image(20, 30, (1, 2, 3))])
