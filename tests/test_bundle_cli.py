"""centernet-bundle: folder contents, the cut network-only graph, manifest hashes, make, demo, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from c_runtime_support import TinyHeads

from centernet_edge.bundle.cli import main
from centernet_edge.export.onnx_export import ExportOptions, build_spec, export_onnx, save_onnx
from centernet_edge.runtime.clib import find_compiler
from centernet_edge.runtime.hashing import file_sha256
from centernet_edge.runtime.spec import ModelSpec


def _export(path: Path, options: ExportOptions, source: str = "official") -> Path:
    net = TinyHeads(4, seed=2).eval()
    spec = build_spec(arch="tiny", source=source, num_classes=4, options=options, name="tiny")
    save_onnx(export_onnx(net, spec, options), path)
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {
        "e2e": _export(root / "tiny.onnx", ExportOptions(input_size=(128, 128))),
        "net": _export(root / "tiny_net.onnx", ExportOptions(input_size=(128, 128), preprocess="none",
                                                              decode=False)),
        "keep_res": _export(root / "tiny_kr.onnx", ExportOptions(keep_res=True), source="mmdet"),
    }


def _run(session: ort.InferenceSession, feed: np.ndarray) -> list[np.ndarray]:
    return session.run(["heatmap", "wh", "reg"], {session.get_inputs()[0].name: feed})


@pytest.mark.parametrize("kind", ["e2e", "keep_res"])
def test_bundle_folder_and_network_cut(tmp_path, exports, kind):
    out = tmp_path / "bundle"
    assert main([str(exports[kind]), "-o", str(out), "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for rel, digest in manifest["sha256"].items():
        assert file_sha256(out / rel) == digest, rel
    assert manifest["c_abi_version"] == 1
    assert [h["role"] for h in manifest["heads"]] == ["heatmap", "wh", "reg"]
    spec = ModelSpec.from_dict(manifest["spec"])
    assert spec.graph.preprocess == "none" and not spec.graph.decode
    assert spec.decode.heatmap_activation == "sigmoid"
    for rel in ("include/centernet_edge.h", "include/centernet_model_config.h", "src/cn_core.c",
                "src/centernet_demo.c", "Makefile", "CMakeLists.txt", "README.md", "model/end_to_end.onnx"):
        assert (out / rel).is_file(), rel
    # The cut graph computes what the network-only export computes (same weights), on the same input.
    cut = ort.InferenceSession(str(out / "model" / "network.onnx"), providers=["CPUExecutionProvider"])
    assert ModelSpec.from_onnx(out / "model" / "network.onnx").graph.input.name == "input"
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 96) if kind == "keep_res" else (1, 3, 128, 128))
    got = _run(cut, x.astype(np.float32))
    if kind == "e2e":
        ref = ort.InferenceSession(str(exports["net"]), providers=["CPUExecutionProvider"])
        for a, b in zip(got, _run(ref, x.astype(np.float32)), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    else:
        assert got[0].shape == (1, 4, 16, 24)
    parity = manifest["parity"]
    if find_compiler() is not None:
        assert parity["images_with_identical_order_and_classes"] == parity["image_count"] == 3
        assert parity["warp_mismatched_values"] == 0
        assert parity["max_box_diff_px"] <= 1e-3 and parity["max_score_diff"] <= 1e-6
        assert "| images with identical detection order and classes | 3 / 3 |" in (out / "README.md").read_text()


def test_network_only_input_is_kept_and_make_builds_the_demo(tmp_path, exports):
    out = tmp_path / "b"
    assert main([str(exports["net"]), "-o", str(out), "-q"]) == 0
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert set(files) == {"network", "source"}
    if find_compiler() is None or shutil.which("make") is None:
        pytest.skip("no C compiler or make")
    build = subprocess.run(["make", "-C", str(out)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    for rel in ("lib/libcenternet_edge.a", "lib/libcenternet_edge.so", "bin/centernet_demo"):
        assert (out / rel).is_file(), rel
    ppm = tmp_path / "x.ppm"
    ppm.write_bytes(b"P6\n40 30\n255\n" + bytes(range(256)) * 14 + bytes(40 * 30 * 3 - 256 * 14))
    run = subprocess.run([str(out / "bin" / "centernet_demo"), "preprocess", str(ppm), str(tmp_path / "in.bin")],
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == '{"input_shape": [1, 3, 128, 128]}', run.stderr


def test_calibration_folder_brings_its_artifacts(tmp_path, exports):
    calib = tmp_path / "calib"
    calib.mkdir()
    shutil.copy2(exports["e2e"], tmp_path / "tiny.onnx")
    (calib / "summary.json").write_text(json.dumps({"model_sha256": file_sha256(exports["e2e"])}))
    shutil.copy2(exports["e2e"], calib / "model_fp16.onnx")  # stands in for the real artifact
    (calib / "calibration.cache").write_text("TRT-100000-EntropyCalibration2\n")
    out = tmp_path / "b"
    assert main([str(calib), "-o", str(out), "-q"]) == 0
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert {"model_fp16", "calibration", "summary", "network", "end_to_end"} <= set(files)


def test_errors_exit_2_and_write_nothing(tmp_path, exports, capsys):
    assert main([str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (tmp_path / "o").mkdir()
    assert main([str(exports["e2e"]), "-o", str(tmp_path / "o")]) == 2
    assert "exists" in capsys.readouterr().err and not any((tmp_path / "o").iterdir())
    bare = tmp_path / "calib"
    bare.mkdir()
    assert main([str(bare), "-o", str(tmp_path / "p")]) == 2
    assert "summary.json" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_spec_without_network_heads_is_refused(tmp_path, exports):
    import onnx

    model = onnx.load(str(exports["e2e"]))
    spec = ModelSpec.from_onnx(model)
    for node in model.graph.node:
        node.output[:] = [o.replace("heatmap", "hm_renamed") for o in node.output]
        node.input[:] = [i.replace("heatmap", "hm_renamed") for i in node.input]
    replace(spec).write_to_onnx(model)
    onnx.save(model, str(tmp_path / "odd.onnx"))
    assert main([str(tmp_path / "odd.onnx"), "-o", str(tmp_path / "o")]) == 2
