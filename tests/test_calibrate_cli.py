"""``centernet-calibrate`` end to end on a small synthetic CenterNet-like ONNX."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from quant_synthetic import FRAGILE, synthetic_spec, write_images, write_model

from centernet_edge.quantize.cli import main
from centernet_edge.quantize.trt_cache import read_cache
from centernet_edge.runtime.hashing import file_sha256
from centernet_edge.runtime.runners import OnnxRuntimeRunner
from centernet_edge.runtime.spec import ModelSpec


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = write_model(root / "synthetic.onnx", fragile=True)
    images = write_images(root / "images", 12, seed=4)
    return root, model, images


def _run(model, images, out, *extra: str) -> int:
    return main(
        [
            str(model),
            "--images",
            str(images),
            "--num-images",
            "10",
            "--sensitivity-images",
            "4",
            "-o",
            str(out),
            "--quiet",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def calibrated(inputs):
    root, model, images = inputs
    out = root / "out"
    assert _run(model, images, out, "--method", "minmax", "--budget", "0.05") == 0
    return out


def test_writes_every_artifact(calibrated, inputs):
    _, model, _ = inputs
    names = {p.name for p in calibrated.iterdir()}
    assert {
        "calibration.cache",
        "summary.json",
        "model_int8_qdq.onnx",
        "model_int8_cpu.onnx",
        "model_fp16.onnx",
        "sensitivity.json",
        "sensitivity.md",
        "precision.json",
        "layer_error.json",
        "layer_error.md",
    } <= names
    assert not [n for n in names if n.endswith(".tmp")]
    cache = read_cache(calibrated / "calibration.cache")
    assert cache.version == 101601 and cache.algorithm == "MinMaxCalibration"
    summary = json.loads((calibrated / "summary.json").read_text())
    assert summary["model_sha256"] == file_sha256(model)
    assert (
        summary["method"] == "minmax" and summary["num_images"] == 10 and len(summary["dataset_hash"]) == 64
    )
    assert set(summary["amax"]) == set(cache.amaxes)
    for name, amax in cache.amaxes.items():
        assert amax == pytest.approx(summary["amax"][name], rel=1e-6)


def test_artifacts_keep_io_and_label_their_precision(calibrated, inputs):
    _, model, images = inputs
    original = onnx.load(str(model))
    io = [
        (v.name, v.type.tensor_type.elem_type)
        for v in list(original.graph.input) + list(original.graph.output)
    ]
    labels = {}
    for name in ("model_int8_qdq.onnx", "model_int8_cpu.onnx", "model_fp16.onnx"):
        artifact = onnx.load(str(calibrated / name))
        onnx.checker.check_model(artifact)
        got = [
            (v.name, v.type.tensor_type.elem_type)
            for v in list(artifact.graph.input) + list(artifact.graph.output)
        ]
        assert got == io, name
        spec = ModelSpec.from_onnx(artifact)
        assert spec.graph == synthetic_spec().graph and spec.name == synthetic_spec().name
        labels[name] = spec.provenance["precision"]
        assert spec.provenance["calibration_method"] == "minmax"
    assert labels["model_fp16.onnx"] == "fp16"
    assert labels["model_int8_qdq.onnx"] in ("int8", "int8-mixed")
    assert labels["model_int8_cpu.onnx"] == "int8"  # the CPU model is all-int8 unless --cpu-float mixed
    summary = json.loads((calibrated / "summary.json").read_text())
    assert summary["cpu_int8"]["float_layers"] == 0 and 0 <= summary["cpu_int8"]["head_error"] <= 1
    changes = summary["cpu_int8"]["graph_changes"]
    # the synthetic decode has one peak NMS; its heatmap logits stay well inside the sigmoid's range
    assert changes["peak_pools_on_uint8"] == 1 and changes["peak_masks_on_uint8"] == 1
    assert all(isinstance(v, int) and v >= 0 for v in changes.values())
    import cv2

    imgs = [cv2.imread(str(p)) for p in sorted(images.glob("*.png"))[:2]]
    ref = OnnxRuntimeRunner(model).run(imgs)
    for name in ("model_int8_qdq.onnx", "model_int8_cpu.onnx", "model_fp16.onnx"):
        runner = OnnxRuntimeRunner(calibrated / name)
        dets = runner.run(imgs)
        assert runner.precision == labels[name]
        assert len(dets) == 2 and len(dets[0]) == len(ref[0])


def test_sensitivity_and_precision_reports(calibrated):
    ranking = json.loads((calibrated / "sensitivity.json").read_text())["ranking"]
    assert ranking[0]["layer"] == FRAGILE
    precision = json.loads((calibrated / "precision.json").read_text())
    assert precision["nodes"][FRAGILE]["precision"] == "float"
    assert precision["nodes"]["dcn"]["precision"] == "float"
    assert precision["search"]["budget"] == 0.05
    qdq = onnx.load(str(calibrated / "model_int8_qdq.onnx"))
    node = next(n for n in qdq.graph.node if n.name == FRAGILE)
    producer = {o: n for n in qdq.graph.node for o in n.output}
    assert producer[node.input[0]].op_type != "DequantizeLinear"


def test_layer_error_report_points_at_the_fragile_conv(calibrated):
    doc = json.loads((calibrated / "layer_error.json").read_text())
    rows = [r for r in doc["tensors"] if r["growth"] is not None]
    assert max(rows, key=lambda r: r["growth"])["producer"] == FRAGILE
    assert doc["meta"]["images"] == 2 and "squeeze-excite scaled" in doc["kinds"]


def test_downstream_ranges_are_recorded_and_deterministic(inputs, tmp_path):
    _, model, images = inputs
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert _run(model, images, out, "--method", "downstream", "--int8", "--budget", "none",
                    "--range-images", "2", "--layer-report-images", "0") == 0
        runs.append(out)
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["selected_method"] == "downstream" and summary["amax"]
    assert not (runs[0] / "layer_error.json").exists()
    for name in ("calibration.cache", "summary.json", "model_int8_qdq.onnx"):
        assert (runs[0] / name).read_bytes() == (runs[1] / name).read_bytes(), name


@pytest.mark.parametrize("workers", ["1", "3"])
def test_cache_is_byte_identical_across_runs(calibrated, inputs, tmp_path, workers):
    # also across worker counts: parallel runs merge order-independently, each single-threaded
    _, model, images = inputs
    out = tmp_path / "again"
    assert _run(model, images, out, "--method", "minmax", "--budget", "0.05", "--workers", workers) == 0
    for name in ("calibration.cache", "summary.json", "model_int8_qdq.onnx", "precision.json",
                 "sensitivity.json", "weight_fit.json", "model_int8_cpu.onnx"):
        assert (out / name).read_bytes() == (calibrated / name).read_bytes(), name


def test_stale_cache_is_refused_then_forced(inputs, tmp_path, capsys):
    _, model, images = inputs
    out = tmp_path / "stale"
    assert _run(model, images, out, "--fp16") == 0
    before = (out / "calibration.cache").read_bytes()
    assert _run(model, images, out, "--fp16", "--seed", "7") == 3
    err = capsys.readouterr().err
    assert "stale" in err and "dataset_hash" in err and "--force" in err
    assert (out / "calibration.cache").read_bytes() == before  # untouched
    assert _run(model, images, out, "--fp16", "--method", "mse") == 3
    assert "method 'auto' (now 'mse')" in capsys.readouterr().err
    assert _run(model, images, out, "--fp16", "--seed", "7", "--force") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calibration_set"]["seed"] == 7
    # same inputs again: the cache is reused, not recomputed
    main([str(model), "--images", str(images), "--num-images", "10", "-o", str(out), "--fp16", "--seed", "7"])
    assert "reusing calibration" in capsys.readouterr().out


def test_foreign_model_gets_sidecar_descriptions(inputs, tmp_path):
    _, _, images = inputs
    bare = write_model(tmp_path / "bare.onnx", embed_spec=False)
    spec_path = tmp_path / "bare.json"
    spec_path.write_text(synthetic_spec().to_json())
    out = tmp_path / "foreign"
    assert _run(bare, images, out, "--model-spec", str(spec_path), "--budget", "none") == 0
    for name in ("model_int8_qdq", "model_int8_cpu", "model_fp16"):
        side = ModelSpec.from_file(out / f"{name}.json")
        assert side.graph.input.name == "image" and side.provenance["precision"] in ("int8", "fp16")
    precision = json.loads((out / "precision.json").read_text())
    assert precision["float_layers"] == []


def test_clear_errors(inputs, tmp_path, capsys):
    _, model, images = inputs
    bare = write_model(tmp_path / "bare.onnx", embed_spec=False)
    assert _run(bare, images, tmp_path / "o1") == 2
    assert "--model-spec" in capsys.readouterr().err
    assert _run(model, tmp_path / "nowhere", tmp_path / "o2") == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(model), "--images", str(images), "--budget", "2"])
    assert "budget must be in [0, 1]" in capsys.readouterr().err


@pytest.mark.slow
def test_exported_official_architecture(tmp_path, inputs):
    """resdcn_18 (random weights) through centernet-export: in-graph warp, DeformConv, decode-only."""
    torch = pytest.importorskip("torch")
    models = pytest.importorskip("centernet_edge.export.models")
    export_cli = pytest.importorskip("centernet_edge.export.cli")
    _, _, images = inputs
    torch.manual_seed(0)
    net = models.build_model("resdcn_18", num_classes=4)
    checkpoint = tmp_path / "rd18.pth"
    torch.save({"epoch": 0, "state_dict": net.state_dict()}, checkpoint)
    exported = tmp_path / "rd18.onnx"
    args = [str(checkpoint), "-o", str(exported), "--input-size", "64", "--batch", "1", "--no-verify", "-q"]
    assert export_cli.main(args) == 0
    out = tmp_path / "out"
    # Placement and spec carry-over are the subject here; the knee ranking, weight fitting and layer report
    # of a whole resdcn_18 are tested on smaller graphs and would triple this test's time.
    assert _run(exported, images, out, "--method", "minmax", "--budget", "none", "--rounding", "nearest",
                "--layer-report-images", "0") == 0
    qdq = onnx.load(str(out / "model_int8_qdq.onnx"))
    producer = {o: n for n in qdq.graph.node for o in n.output}
    deform = [n for n in qdq.graph.node if n.op_type == "DeformConv"]
    assert deform
    for node in deform:
        assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in node.input)
    assert any(n.op_type == "DequantizeLinear" for n in qdq.graph.node)
    original = ModelSpec.from_onnx(onnx.load(str(exported)))
    for name in ("model_int8_qdq.onnx", "model_fp16.onnx"):
        spec = ModelSpec.from_onnx(onnx.load(str(out / name)))
        assert spec.graph == original.graph and spec.preprocess == original.preprocess


def test_default_knee_rule_and_no_sensitivity_without_mixed_precision(inputs, tmp_path):
    _, model, images = inputs
    out = tmp_path / "knee"
    assert _run(model, images, out, "--method", "minmax", "--int8") == 0
    fits = json.loads((out / "weight_fit.json").read_text())
    precision = json.loads((out / "precision.json").read_text())
    # the Q/DQ model's fit is made for its own int8 layers, the all-int8 CPU model gets its own fit
    assert fits["qdq"]["int8_layers"] + len(precision["float_layers"]) == fits["cpu"]["int8_layers"]
    assert fits["qdq"]["int8_layers"] == len(precision["int8_layers"])
    assert precision["search"]["rule"] == "knee" and precision["meta"]["rule"] == "knee"
    assert FRAGILE in precision["float_layers"]
    convs = sum(1 for e in precision["nodes"].values()
                if e["op"] == "Conv" and e["reason"] in ("eligible", "kept float by mixed precision"))
    assert 1 <= len(precision["float_layers"]) <= max(1, int(0.1 * convs))
    assert (out / "sensitivity.json").exists()
    # --budget none: every eligible layer int8, the ranking is neither computed nor left from the last run
    assert _run(model, images, out, "--method", "minmax", "--int8", "--budget", "none", "--force") == 0
    precision = json.loads((out / "precision.json").read_text())
    assert precision["float_layers"] == [] and precision["search"]["rule"] == "none"
    assert not (out / "sensitivity.json").exists() and not (out / "sensitivity.md").exists()


def test_weight_fitting_from_the_cli_is_guarded_and_reported(inputs, tmp_path):
    _, model, images = inputs
    out = tmp_path / "fit"
    assert _run(model, images, out, "--method", "minmax", "--int8", "--budget", "none", "--rounding", "adaround",
                "--bias-correction", "--fit-images", "2", "--layer-report-images", "0") == 0
    doc = json.loads((out / "weight_fit.json").read_text())
    # every eligible layer int8 in both: the Q/DQ fit is the CPU candidate too (not fitted again), judged
    # on the CPU graph by the same guard
    assert doc["cpu"]["layers"] == doc["qdq"]["layers"] and "2 standard errors" in doc["cpu"]["guard"]
    cpu = doc["cpu"]["head_error"]
    assert not doc["cpu"]["kept"] or cpu["after"] < cpu["before"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cpu_int8"]["head_error"] == pytest.approx(cpu["after"] if doc["cpu"]["kept"] else cpu["before"],
                                                              abs=1e-6)
    report = doc["qdq"]
    assert report["options"]["rounding"] == "adaround" and report["options"]["bias_correction"] is True
    assert report["images"] == 2 and report["layers"]
    before, after = report["head_error"]["before"], report["head_error"]["after"]
    # Kept only for an improvement beyond the probe's noise (paired per image), so never for a worse fit.
    assert not report["kept"] or after < before
    assert "2 standard errors" in report["guard"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["int8_head_error"]["head_error"] == pytest.approx(after if report["kept"] else before, abs=1e-6)
    # nearest rounding without bias correction: no fit and no stale report
    assert _run(model, images, out, "--method", "minmax", "--int8", "--budget", "none", "--force",
                "--rounding", "nearest", "--no-bias-correction", "--layer-report-images", "0") == 0
    assert not (out / "weight_fit.json").exists()


def test_equalize_from_the_cli(inputs, tmp_path):
    _, model, images = inputs
    out = tmp_path / "eq"
    assert _run(model, images, out, "--method", "minmax", "--int8", "--budget", "none", "--equalize",
                "--layer-report-images", "0") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method_options"].get("equalize") is True
    assert not list(out.glob("*.tmp"))
    # a cache made without equalization is stale for a run with it
    plain = tmp_path / "plain"
    assert _run(model, images, plain, "--method", "minmax", "--int8", "--budget", "none",
                "--layer-report-images", "0") == 0
    assert _run(model, images, plain, "--method", "minmax", "--int8", "--budget", "none", "--equalize",
                "--layer-report-images", "0") == 3


def test_channel_scaling_from_the_cli_and_its_rescaled_model(inputs, tmp_path):
    """Default: the depthwise input is rescaled, the cache describes model_fp32_rescaled.onnx (same fp32
    outputs as the source); --no-channel-scaling removes that file from the folder as stale."""
    from centernet_edge.runtime.onnx_session import create_session

    _, model, images = inputs
    out = tmp_path / "cs"
    flags = ("--method", "minmax", "--int8", "--budget", "none", "--rounding", "nearest", "--layer-report-images",
             "0", "--scaling-images", "4")
    assert _run(model, images, out, *flags) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [site["kind"] for site in summary["channel_scaling"]] == ["folded"]
    assert summary["method_options"]["channel_scaling"] == 4
    rescaled = out / summary["cache_model"]
    assert rescaled.is_file() and not list(out.glob("*.tmp"))
    feed = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3)).astype(np.uint8)
    source_out = create_session(str(model)).run(None, {"image": feed})
    rescaled_out = create_session(str(rescaled)).run(None, {"image": feed})
    for a, b in zip(source_out, rescaled_out, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    assert _run(model, images, out, *flags, "--no-channel-scaling", "--force") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cache_model"] is None and summary["channel_scaling"] == []
    assert not rescaled.exists()


def test_cpu_model_can_keep_the_mixed_float_layers(inputs, tmp_path):
    from centernet_edge.quantize.pipeline import CalibrateOptions, calibrate

    _, model, images = inputs
    options = CalibrateOptions(
        model=model,
        images=images,
        out_dir=tmp_path / "o",
        num_images=10,
        method="minmax",
        budget=0.05,
        sensitivity_images=4,
        fp16=False,
        cpu_float="mixed",
        cpu_format="qdq",
        progress=False,
    )
    result = calibrate(options)
    assert result.mixed is not None and FRAGILE in result.mixed.float_layers
    assert result.cpu_int8["float_layers"] == len(result.mixed.float_layers)
    assert result.cpu_int8["format"] == "qdq"
    cpu = onnx.load(str(tmp_path / "o" / "model_int8_cpu.onnx"))
    assert ModelSpec.from_onnx(cpu).provenance["precision"] == "int8-mixed"
    node = next(n for n in cpu.graph.node if n.name == FRAGILE)
    assert node.op_type == "Conv" and node.input[1] in {i.name for i in cpu.graph.initializer}  # float
    assert not (tmp_path / "o" / "model_fp16.onnx").exists()


def _one_line(capsys, message: str, prefix: str = "centernet-calibrate: error: ") -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(prefix) and message in err, err


def test_bad_outputs_are_refused_before_any_work(inputs, tmp_path, monkeypatch, capsys):
    import centernet_edge.quantize.pipeline as pipeline
    import centernet_edge.runtime.cli_common as cli_common

    _, model, images = inputs

    def no_work(*args, **kwargs):
        raise AssertionError("calibration started although its output cannot be written")

    monkeypatch.setattr(pipeline, "collect_calibration_stats", no_work)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert _run(model, images, a_file) == 2
    _one_line(capsys, "output folder")
    assert _run(model, images, a_file / "out") == 2
    _one_line(capsys, "a_file is not a directory")
    assert _run(tmp_path, images, tmp_path / "o") == 2
    _one_line(capsys, "is a directory; pass the .onnx file inside it")
    monkeypatch.setattr(cli_common.os, "access", lambda path, mode: False)
    assert _run(model, images, tmp_path / "ro" / "out") == 2
    _one_line(capsys, f"{tmp_path} is not writable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_interrupt_leaves_the_output_folder_as_it_was(inputs, tmp_path, monkeypatch, capsys):
    import centernet_edge.quantize.pipeline as pipeline

    _, model, images = inputs
    out = tmp_path / "nested" / "out"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # after the cache was written: the point that used to block reruns
        patch.setattr(pipeline, "convert_fp16", interrupted)
        assert _run(model, images, out, "--fp16") == 130
    assert capsys.readouterr().err == "centernet-calibrate: interrupted; nothing written\n"
    assert list(tmp_path.iterdir()) == []  # no folder, no staging folder, no lone cache
    assert _run(model, images, out, "--fp16") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "convert_fp16", interrupted)
        assert _run(model, images, out, "--fp16", "--seed", "3", "--force") == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    capsys.readouterr()
    assert _run(model, images, out, "--fp16") == 0  # the identical rerun reuses the calibration
    assert "reusing calibration" not in capsys.readouterr().out  # --quiet


def test_no_mixed_precision_skips_sensitivity_and_counts_written_files(inputs, tmp_path, monkeypatch, capsys):
    import centernet_edge.quantize.pipeline as pipeline

    _, model, images = inputs

    def no_sensitivity(*args, **kwargs):
        raise AssertionError("sensitivity analysed although no layer may stay float")

    monkeypatch.setattr(pipeline, "layer_sensitivity", no_sensitivity)
    out = tmp_path / "o"
    argv = [str(model), "--images", str(images), "--num-images", "10", "--sensitivity-images", "4", "-o", str(out),
            "--method", "percentile", "--budget", "none"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    names = sorted(p.name for p in out.iterdir())
    assert "sensitivity.json" not in names and "precision.json" in names
    assert f"wrote {len(names)} file(s) to {out}:" in stdout
    assert all(f"  {n}" in stdout.splitlines() for n in names)
    note = ("header TRT-101601-EntropyCalibration2 (TensorRT has no percentile calibrator; its cache reader "
            "takes the ranges as written), ranges from percentile")
    assert f"calibration.cache: {note}" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cache_header_note"] == note and summary["trt_cache_header"] == "TRT-101601-EntropyCalibration2"
    assert main([*argv, "--max-float", "0", "--budget", "0.01", "-q", "--force"]) == 0
    assert capsys.readouterr().out == f"wrote {len(names)} file(s) to {out}\n"


def test_unreadable_images_are_skipped_named_and_recorded_or_fail_strict(inputs, tmp_path, capsys):
    import shutil

    import cv2
    import numpy as np

    _, model, images = inputs
    folder = tmp_path / "imgs"
    shutil.copytree(images, folder)
    ok, jpeg = cv2.imencode(".jpg", np.full((64, 64, 3), 90, np.uint8))
    (folder / "truncated.jpg").write_bytes(jpeg.tobytes()[: len(jpeg) // 2])
    (folder / "notes.png").write_text("not an image")
    out = tmp_path / "o"
    assert main([str(model), "--images", str(folder), "--num-images", "14", "-o", str(out), "--fp16", "-q"]) == 0
    reads = json.loads((out / "summary.json").read_text())["image_reads"]
    assert reads["read"] == 12 and reads["skipped"] == 2
    assert reads["skip_reasons"] == {"notes.png": "not a decodable image",
                                     "truncated.jpg": "truncated JPEG (no end-of-image marker)"}
    capsys.readouterr()
    strict = tmp_path / "strict"
    assert main([str(model), "--images", str(folder), "--num-images", "14", "-o", str(strict), "--fp16", "-q",
                 "--strict"]) == 2
    _one_line(capsys, "cannot read image notes.png: not a decodable image (--strict)")
    assert not strict.exists()


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"centernet-calibrate {version('centernet-edge')}\n"


def test_a_cpu_graph_onnx_runtime_rejects_leaves_the_tensorrt_artifacts(inputs, tmp_path, monkeypatch, caplog):
    """The quantizer failing on the CPU graph (also while judging the weight fit) skips that artifact only."""
    import logging

    from centernet_edge.quantize import pipeline

    def rejected(*args, **kwargs):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(pipeline, "build_cpu_model", rejected)
    _, model, images = inputs
    out = tmp_path / "nocpu"
    with caplog.at_level(logging.WARNING, logger="centernet_edge.quantize"):
        assert _run(model, images, out, "--method", "minmax", "--int8", "--budget", "none", "--fit-images", "2",
                    "--layer-report-images", "0") == 0
    assert (out / "model_int8_qdq.onnx").is_file() and not (out / "model_int8_cpu.onnx").exists()
    assert "ONNX Runtime CPU int8 model not written: RuntimeError: unsupported op" in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cpu_int8"] is None
    assert json.loads((out / "weight_fit.json").read_text())["cpu"] is None
