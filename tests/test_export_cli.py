"""``centernet-export`` end to end: the default contract, variants, atomic writes and error handling."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_export_models import save_checkpoint

from centernet_edge.export import cli
from centernet_edge.export.checkpoints import load_checkpoint
from centernet_edge.export.onnx_export import ExportError, ExportOptions, build_spec, expose_heads
from centernet_edge.export.torch_reference import ReferenceDetector
from centernet_edge.export.trt_ops import check_trt_compatibility
from centernet_edge.export.verify import match_detections, synthetic_images
from centernet_edge.runtime.postprocess import finalize
from centernet_edge.runtime.preprocess import prepare_batch
from centernet_edge.runtime.spec import COCO_CLASS_NAMES, ModelSpec

SMALL = ["--input-size", "128", "--threads", "1", "-q"]


@pytest.fixture(scope="module")
def res18(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint("res_18", tmp_path_factory.mktemp("cli") / "ctdet_res18.pth")


@pytest.fixture(scope="module")
def default_onnx(res18: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli_out") / "model.onnx"
    assert cli.main([str(res18), "-o", str(out), *SMALL]) == 0
    return out


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _reference(ckpt: Path, spec: ModelSpec) -> ReferenceDetector:
    ref_spec = ModelSpec.from_dict(spec.to_dict())
    ref_spec.decode.heatmap_activation = "logits"
    return ReferenceDetector(load_checkpoint(ckpt).model, ref_spec)


def test_default_contract(default_onnx: Path, res18: Path) -> None:
    model = onnx.load(str(default_onnx))
    onnx.checker.check_model(model, full_check=True)
    assert not check_trt_compatibility(model)
    (inp,) = model.graph.input
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["N", "H", "W", 3]
    (out,) = model.graph.output
    assert out.name == "detections"
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["N", 100, 6]
    topk = [n for n in model.graph.node if n.op_type == "TopK"]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert len(topk) == 2 and all(int(inits[n.input[1]][0]) == 100 for n in topk)  # official two-stage

    spec = ModelSpec.from_onnx(default_onnx)
    assert spec.graph.preprocess == "warp" and spec.graph.decode and spec.graph.batch is None
    assert spec.graph.detections_frame == "original"
    assert spec.preprocess.input_size == (128, 128) and spec.preprocess.resize == "affine"
    # test.py's precise mean/std (the published AP's) by default, named in the spec.
    assert spec.preprocess.normalization == "official_test" and spec.preprocess.mean[0] == 0.40789654
    assert spec.class_names == list(COCO_CLASS_NAMES) and spec.category_ids[-1] == 90
    prov = spec.provenance
    assert prov["checkpoint_file"] == res18.name and len(prov["checkpoint_sha256"]) == 64
    assert prov["arch"] == "res_18" and prov["source"] == "official" and prov["toolkit_version"]
    assert "/" not in str(prov)  # no machine paths in the artifact
    # The verification's evidence travels with the artifact: head errors against float64 and the floor.
    check = prov["verification"]
    assert check["passed"] and check["images"] == 3 and check["matched"] + check["tied"] >= 1.0
    assert 0 < check["head_error_vs_float64"]["heatmap"] < 1e-5
    assert 0 < check["noise_floor_float32_vs_float64"]["heatmap"] < 1e-5


def test_expose_heads_leaves_the_model_untouched(default_onnx: Path) -> None:
    model = onnx.load(str(default_onnx))
    before = model.SerializeToString()
    session = ort.InferenceSession(expose_heads(model), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["detections", "heatmap", "wh", "reg"]
    assert model.SerializeToString() == before


def test_dynamic_batch_and_sizes_match_reference(default_onnx: Path, res18: Path) -> None:
    session = _session(default_onnx)
    spec = ModelSpec.from_onnx(default_onnx)
    reference = _reference(res18, spec)
    a, b = (img for _, img in synthetic_images(2, seed=3, sizes=((90, 140), (150, 100))))
    b2 = cv2.resize(b, (a.shape[1], a.shape[0]))
    for batch in ([a], [b], [a, b2]):
        x, geoms = prepare_batch(batch, spec)
        (dets,) = session.run(None, {"image": x})
        assert dets.shape == (len(batch), 100, 6) and dets.dtype == np.float32
        assert np.all(np.diff(dets[..., 4], axis=1) <= 0)  # best first
        got = finalize({"detections": dets}, spec, geoms)
        for g, r in zip(got, reference.detect(batch), strict=True):
            matched, score_err, box_err = match_detections(r, g)
            assert matched == 1.0 and score_err < 1e-5 and box_err < 1e-2


def test_variants_normalize_fixed_batch_topk(res18: Path, tmp_path: Path) -> None:
    out = tmp_path / "norm.onnx"
    code = cli.main([str(res18), "-o", str(out), *SMALL, "--preprocess", "normalize", "--batch", "2",
                     "--topk", "7"])
    assert code == 0
    spec = ModelSpec.from_onnx(out)
    assert spec.graph.preprocess == "normalize" and spec.graph.batch == 2 and spec.decode.K == 7
    assert spec.graph.input.shape == [2, 128, 128, 3] and spec.graph.detections_frame == "network_input"
    model = onnx.load(str(out))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [2, 128, 128, 3]
    assert not check_trt_compatibility(model)
    img = synthetic_images(1)[0][1]
    x, geoms = prepare_batch([img, img], spec)
    (dets,) = _session(out).run(None, {"image": x})
    assert dets.shape == (2, 7, 6)
    got = finalize({"detections": dets}, spec, geoms)[0]
    ref = _reference(res18, spec).detect([img])[0]
    matched, score_err, box_err = match_detections(ref, got)
    assert matched == 1.0 and box_err < 1e-2 and score_err < 1e-5


def test_official_normalization_demo_is_recorded_and_verified(res18: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo.onnx"
    assert cli.main([str(res18), "-o", str(out), *SMALL, "--official-normalization", "demo"]) == 0
    spec = ModelSpec.from_onnx(out)
    assert spec.preprocess.normalization == "official_demo" and spec.preprocess.mean == (0.408, 0.447, 0.470)
    assert spec.provenance["verification"]["passed"] is True
    # The graph normalises with the recorded values: it reproduces a reference run with the demo spec.
    img = synthetic_images(1)[0][1]
    x, geoms = prepare_batch([img], spec)
    got = finalize({"detections": _session(out).run(None, {"image": x})[0]}, spec, geoms)[0]
    matched, score_err, _ = match_detections(_reference(res18, spec).detect([img])[0], got)
    assert matched == 1.0 and score_err < 1e-5


def test_official_normalization_is_refused_for_mmdet() -> None:
    with pytest.raises(ExportError, match="applies to official CenterNet checkpoints"):
        build_spec(arch="mmdet_r18", source="mmdet", num_classes=80,
                   options=ExportOptions(input_size=(128, 128), official_normalization="demo"))
    with pytest.raises(ExportError, match="--official-normalization must be one of test, demo"):
        ExportOptions(official_normalization="rounded").validate()


def test_variant_raw_heads(res18: Path, tmp_path: Path) -> None:
    out = tmp_path / "heads.onnx"
    assert cli.main([str(res18), "-o", str(out), *SMALL, "--preprocess", "none", "--no-decode",
                     "--opset", "20"]) == 0
    model = onnx.load(str(out))
    assert [o.name for o in model.graph.output] == ["heatmap", "wh", "reg"]
    assert model.opset_import[0].version == 20
    assert not check_trt_compatibility(model)
    spec = ModelSpec.from_onnx(out)
    assert not spec.graph.decode and spec.graph.input.name == "input" and spec.graph.input.dtype == "float32"
    assert spec.graph.outputs["heatmap"].shape == ["N", 80, 32, 32]
    assert spec.decode.heatmap_activation == "sigmoid"
    img = synthetic_images(1)[0][1]
    x, _ = prepare_batch([img], spec)
    heat, wh, reg = _session(out).run(None, {"input": x})
    ref = _reference(res18, spec).forward_heads([img])
    np.testing.assert_allclose(heat, torch.sigmoid(torch.from_numpy(ref["heatmap"])).numpy(), atol=1e-5)
    np.testing.assert_allclose(wh, ref["wh"], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(reg, ref["reg"], atol=1e-5)


def test_no_optimize_keeps_the_traced_graph(res18: Path, default_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "traced.onnx"
    assert cli.main([str(res18), "-o", str(out), *SMALL, "--no-optimize", "--no-verify"]) == 0
    traced, optimized = onnx.load(str(out)), onnx.load(str(default_onnx))

    def deconvs(model: onnx.ModelProto) -> list[int]:
        return [next((a.i for a in n.attribute if a.name == "group"), 1)
                for n in model.graph.node if n.op_type == "ConvTranspose"]

    assert deconvs(traced) == [1, 1, 1]  # res_18's three upsampling layers, as traced
    assert all(g > 1 for g in deconvs(optimized))  # only the one-hot interleaves remain
    assert "graph_rewrites" not in ModelSpec.from_onnx(out).provenance
    assert ModelSpec.from_onnx(default_onnx).provenance["graph_rewrites"]["deconv_to_conv"] == 3


def test_verify_on_image_folder_and_failure_keeps_nothing(res18: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, img in synthetic_images(2, seed=5):
        cv2.imwrite(str(folder / f"{name}.png"), img)
    out = tmp_path / "v.onnx"
    assert cli.main([str(res18), "-o", str(out), "--input-size", "128", "--threads", "1",
                     "--verify-images", str(folder)]) == 0
    table = capsys.readouterr().out
    assert "synthetic_0.png" in table and "verification PASSED" in table
    # An impossible tolerance fails verification: exit 1 and no file unless asked to keep it.
    bad = tmp_path / "bad.onnx"
    assert cli.main([str(res18), "-o", str(bad), *SMALL, "--min-matched", "1.5"]) == 1
    assert not bad.exists()
    assert "verification FAILED" in capsys.readouterr().out
    assert cli.main([str(res18), "-o", str(bad), *SMALL, "--min-matched", "1.5", "--keep-unverified"]) == 1
    assert bad.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "imgs", "v.onnx"]


def test_interrupt_mid_export_leaves_no_file(res18: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "m.onnx"

    def interrupted_write(self: Path, data: bytes) -> int:
        with open(self, "wb") as fh:
            fh.write(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", interrupted_write)
    assert cli.main([str(res18), "-o", str(out), *SMALL, "--no-verify"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--topk", "5000"], "--topk must be in 1..3839"),
        (["--topk", "0"], "--topk must be in 1..3839"),
        (["--input-size", "0"], "--input-size must be positive multiples of 32"),
        (["--input-size", "100", "128"], "--input-size must be positive multiples of 32"),
        (["--input-size", "128", "128", "128"], "--input-size takes H or H W"),
        (["--keep-res", "--input-size", "128"], "cannot be combined with --input-size"),
        (["--opset", "17"], "--opset must be 19..20"),
        (["--batch", "0"], "argument --batch: expected a positive integer or 'dynamic'"),
        (["--preprocess", "resize"], "argument --preprocess: invalid choice"),
        (["--verify-count", "0"], "--verify-count must be >= 1"),
        (["--official-normalization", "imagenet"], "argument --official-normalization: invalid choice"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_fail_in_one_line(res18: Path, tmp_path: Path, capsys, args: list[str],
                                    message: str) -> None:
    out = tmp_path / "x.onnx"
    assert cli.main([str(res18), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("centernet-export: error: ") and message in err
    assert "Traceback" not in err
    assert not out.exists()


def test_bad_checkpoints_fail_in_one_line(res18: Path, tmp_path: Path, capsys) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint at all" * 10)
    cases = [
        ([str(tmp_path / "missing.pth")], "checkpoint not found"),
        ([str(garbage)], "garbage.pth"),
        ([str(res18), "--arch", "nope_99"], "unknown arch 'nope_99'"),
        ([str(res18), "--num-classes", "3"], "has 80 classes"),
        ([str(res18), "--arch", "resdcn_18"], "resdcn_18"),
        ([str(res18), "-o", str(tmp_path / "no" / "dir.onnx")], "output directory does not exist"),
    ]
    for args, message in cases:
        assert cli.main([*args, "--no-verify", "-q"]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("centernet-export: error: "), err
        assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.pth"]


def _one_line_error(capsys, message: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("centernet-export: error: "), err
    assert message in err, err


def test_bad_outputs_are_refused_before_any_work(res18: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import centernet_edge.export.onnx_export as onnx_export
    import centernet_edge.runtime.cli_common as cli_common

    def no_work(*args, **kwargs):
        raise AssertionError("the export started although its output cannot be written")

    monkeypatch.setattr(onnx_export, "export_checkpoint", no_work)
    existing = tmp_path / "existing"
    existing.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (existing, "is a directory; give a file name"),
        (a_file / "m.onnx", "a_file is not a directory"),
        (a_file / "deeper" / "m.onnx", "a_file is not a directory"),
    ]
    for output, message in cases:
        assert cli.main([str(res18), "-o", str(output), *SMALL]) == 2, output
        _one_line_error(capsys, message)
    # A read-only place (as root, only a read-only mount is unwritable, so os.access is what is asked).
    monkeypatch.setattr(cli_common.os, "access", lambda path, mode: False)
    assert cli.main([str(res18), "-o", str(tmp_path / "m.onnx"), *SMALL]) == 2
    _one_line_error(capsys, f"cannot write {tmp_path / 'm.onnx'}: {tmp_path} is not writable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "existing"]
    assert list(existing.iterdir()) == []


def test_directory_and_corrupt_weights_as_checkpoint(res18: Path, tmp_path: Path, capsys) -> None:
    assert cli.main([str(tmp_path), "-o", str(tmp_path / "m.onnx"), *SMALL]) == 2
    _one_line_error(capsys, f"checkpoint {tmp_path} is a directory; pass the .pth file inside it")
    state = torch.load(res18, map_location="cpu", weights_only=True)
    state["state_dict"]["hm.0.weight"].view(-1)[3] = float("nan")
    bad = tmp_path / "nan.pth"
    torch.save(state, bad)
    # Refused at load, before the export and its verification.
    assert cli.main([str(bad), "-o", str(tmp_path / "m.onnx"), *SMALL]) == 2
    _one_line_error(capsys, "tensor 'hm.0.weight' holds 1 NaN and 0 Inf value(s)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pth"]


def test_unreadable_verify_images_are_skipped_and_named_or_fail_strict(res18: Path, tmp_path: Path,
                                                                       capsys) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    (name, img), = synthetic_images(1, seed=5)
    cv2.imwrite(str(folder / "b_good.png"), img)
    ok, jpeg = cv2.imencode(".jpg", img)
    (folder / "a_truncated.jpg").write_bytes(jpeg.tobytes()[: len(jpeg) // 2])
    (folder / "c_text.png").write_text("not an image")
    out = tmp_path / "v.onnx"
    argv = [str(res18), "-o", str(out), *SMALL, "--verify-images", str(folder)]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("centernet-export: warning: skipped 2 unreadable image(s): ")
    assert "a_truncated.jpg (truncated JPEG" in err and "c_text.png (not a decodable image)" in err
    assert out.exists()
    out.unlink()
    assert cli.main([*argv, "--strict"]) == 2
    _one_line_error(capsys, "cannot read image a_truncated.jpg: truncated JPEG (no end-of-image marker) (--strict)")
    assert not out.exists()


def test_version_and_interrupted_import(monkeypatch, capsys) -> None:
    import builtins
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"centernet-export {version('centernet-edge')}"
    real_import = builtins.__import__

    def slow_import(name, *args, **kwargs):
        if name.endswith("onnx_export") or (args and args[2] and "onnx_export" in args[2]):
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", slow_import)
    assert cli.main(["x.pth"]) == 130
    assert capsys.readouterr().err == "centernet-export: interrupted; nothing written\n"
