"""centernet-build without TensorRT: artifact/precision selection per TensorRT line, profiles from specs,
the engine side-car, the cache-serving calibrator, printed trtexec/Polygraphy lines and the clear errors.
Tests that need TensorRT and a GPU are at the end and skip elsewhere."""

from __future__ import annotations

import dataclasses
import shlex
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from quant_synthetic import FRAGILE, synthetic_spec, write_images, write_model

from centernet_edge.engine import cli
from centernet_edge.engine.calibrator import BASE_CLASSES, cache_bytes_for, make_batch_calibrator, make_cache_calibrator
from centernet_edge.engine.commands import TRT11_REMOVED_FLAGS, BuildSettings, polygraphy_command, trtexec_command
from centernet_edge.engine.profiles import ProfileError, input_profile, parse_size
from centernet_edge.engine.selection import SelectionError, plan_build
from centernet_edge.engine.versions import parse_trt_version
from centernet_edge.eval.backends import default_backend
from centernet_edge.export.onnx_export import ExportOptions, build_spec
from centernet_edge.quantize.trt_cache import parse_cache, write_cache
from centernet_edge.runtime.cuda_probe import gpu_devices, tensorrt_installed
from centernet_edge.runtime.engine_meta import (
    EngineMeta,
    EngineMetaError,
    engine_meta_path,
    read_engine_meta,
    verify_engine,
    write_engine_meta,
)
from centernet_edge.runtime.hashing import file_sha256
from centernet_edge.runtime.runners import RunnerError

TRT10, TRT11 = parse_trt_version("10.16.1"), parse_trt_version("11")


# ---- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def calibrated(tmp_path_factory):
    """A synthetic fp32 ONNX and its centernet-calibrate folder (with one layer kept float)."""
    from centernet_edge.quantize.pipeline import CalibrateOptions, calibrate

    root = tmp_path_factory.mktemp("engine")
    model = write_model(root / "model.onnx", fragile=True)
    images = write_images(root / "images", 8)
    out = root / "calib"
    # Channel scaling off: these tests build the source model; the rescaled route has its own test.
    calibrate(CalibrateOptions(model=model, images=images, out_dir=out, num_images=8, method="minmax",
                               budget=0.05, sensitivity_images=4, channel_scaling=False, progress=False))
    return model, out, images


def _export_spec(**options):
    return build_spec(arch="resnet18", source="official", num_classes=80, options=ExportOptions(**options))


# ---- selection ----------------------------------------------------------------------------------------

def test_trt11_builds_what_the_folder_onnx_says(calibrated):
    _, folder, _ = calibrated
    int8 = plan_build(folder, TRT11, "int8")
    assert int8.onnx.name == "model_int8_qdq.onnx" and int8.strongly_typed
    assert int8.flags == () and int8.int8_source == "qdq" and int8.calibration_cache is None
    assert int8.spec.provenance["precision"] == "int8-mixed"
    fp16 = plan_build(folder, TRT11, "fp16")
    assert fp16.onnx.name == "model_fp16.onnx" and fp16.flags == () and fp16.spec.provenance["precision"] == "fp16"
    assert plan_build(folder, TRT11).precision == "int8"  # a folder defaults to int8


def test_trt10_builds_the_fp32_onnx_with_flags_and_our_cache(calibrated):
    model, folder, _ = calibrated
    plan = plan_build(folder, TRT10, "int8", source_onnx=model)
    assert plan.onnx == model and not plan.strongly_typed
    assert plan.flags == ("INT8", "FP16") and plan.int8_source == "cache"
    assert plan.calibration_cache == folder / "calibration.cache"
    assert FRAGILE in plan.fp16_layers and plan.spec.provenance["precision"] == "int8-mixed"
    fp16 = plan_build(folder, TRT10, "fp16", source_onnx=model)
    assert fp16.flags == ("FP16",) and fp16.onnx == model and fp16.spec.provenance["precision"] == "fp16"
    typed = plan_build(folder, TRT10, "int8", strongly_typed=True)
    assert typed.onnx.name == "model_int8_qdq.onnx" and typed.strongly_typed and typed.flags == ()
    live = plan_build(folder, TRT10, "int8", source_onnx=model, int8_source="images")
    assert live.int8_source == "images" and live.calibration_cache is None


def test_trt10_cache_of_a_rescaled_calibration_builds_the_rescaled_model(calibrated, tmp_path):
    """Channel scaling changes the tensors the cache describes: TensorRT 10 must build the folder's
    model_fp32_rescaled.onnx with it, not the source model."""
    import json

    from centernet_edge.quantize.pipeline import CalibrateOptions, calibrate

    model, _, images = calibrated
    folder = tmp_path / "calib"
    calibrate(CalibrateOptions(model=model, images=images, out_dir=folder, num_images=8, method="minmax",
                               mixed="none", rounding="nearest", fp16=False, scaling_images=4,
                               layer_report_images=0, progress=False))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["cache_model"] == "model_fp32_rescaled.onnx" and summary["channel_scaling"]
    plan = plan_build(folder, TRT10, "int8")  # no --onnx needed
    assert plan.onnx == folder / "model_fp32_rescaled.onnx" and plan.int8_source == "cache"
    assert plan.calibration_cache == folder / "calibration.cache"
    assert plan_build(folder, TRT10, "int8", source_onnx=model).onnx == plan.onnx
    with pytest.raises(SelectionError, match="not the model this calibration was made from"):
        plan_build(folder, TRT10, "int8", source_onnx=write_model(tmp_path / "other.onnx", seed=3))
    assert plan_build(folder, TRT10, "fp16", source_onnx=model).onnx == model  # fp16 builds the source
    rescaled = folder / "model_fp32_rescaled.onnx"
    rescaled.write_bytes(rescaled.read_bytes() + b"\0")
    with pytest.raises(SelectionError, match="changed after calibration"):
        plan_build(folder, TRT10, "int8")
    rescaled.unlink()
    with pytest.raises(SelectionError, match="model_fp32_rescaled.onnx is missing"):
        plan_build(folder, TRT10, "int8")


def test_folder_routes_need_the_right_fp32_onnx(calibrated, tmp_path):
    _, folder, _ = calibrated
    with pytest.raises(SelectionError, match="--onnx"):
        plan_build(folder, TRT10, "int8")
    with pytest.raises(SelectionError, match="--onnx"):
        plan_build(folder, TRT11, "fp32")
    other = write_model(tmp_path / "other.onnx", seed=3)
    with pytest.raises(SelectionError, match="not the model this calibration was made from"):
        plan_build(folder, TRT10, "fp16", source_onnx=other)
    with pytest.raises(SelectionError, match="not a centernet-calibrate output folder"):
        plan_build(tmp_path, TRT11, "int8")


def test_onnx_artifact_per_version(calibrated):
    model, folder, _ = calibrated
    assert plan_build(model, TRT11).precision == "fp32"
    with pytest.raises(SelectionError, match="model_fp16.onnx"):
        plan_build(model, TRT11, "fp16")
    with pytest.raises(SelectionError, match="model_int8_qdq.onnx"):
        plan_build(model, TRT11, "int8")
    assert plan_build(model, TRT10, "fp16").flags == ("FP16",)
    with pytest.raises(SelectionError, match="calibration"):
        plan_build(model, TRT10, "int8")
    assert plan_build(model, TRT10, "int8", int8_source="images").flags == ("INT8", "FP16")
    qdq = plan_build(folder / "model_int8_qdq.onnx", TRT10)
    assert qdq.precision == "int8" and qdq.strongly_typed and qdq.flags == ()
    with pytest.raises(SelectionError, match="ONNX Runtime CPU int8"):
        plan_build(folder / "model_int8_cpu.onnx", TRT10)


# ---- profiles -----------------------------------------------------------------------------------------

def test_profile_of_the_default_export_spans_raw_image_sizes():
    profile = input_profile(_export_spec())  # warp graph: raw uint8 NHWC images of any size
    assert profile.name == "image"
    assert profile.shapes() == [[1, 32, 32, 3], [1, 480, 640, 3], [1, 1920, 1920, 3]]
    assert input_profile(_export_spec(), max_size=(1080, 1920)).max == (1, 1080, 1920, 3)
    with pytest.raises(ProfileError, match="fixed-size input"):
        input_profile(_export_spec(), batch=4)


def test_profile_of_fixed_inputs_is_static_with_a_batch_range():
    spec = _export_spec(preprocess="normalize")
    assert input_profile(spec).shapes() == [[1, 512, 512, 3]] * 3
    batched = input_profile(spec, batch=8)
    assert (batched.min, batched.opt, batched.max) == ((1, 512, 512, 3), (8, 512, 512, 3), (8, 512, 512, 3))
    nchw = input_profile(_export_spec(preprocess="none", input_size=(384, 640)))
    assert nchw.name == "input" and nchw.is_static and nchw.min == (1, 3, 384, 640)
    with pytest.raises(ProfileError, match="fixed at 512x512"):
        input_profile(spec, max_size=(1024, 1024))
    fixed_batch = _export_spec(preprocess="normalize", batch=4)
    assert input_profile(fixed_batch).shapes() == [[4, 512, 512, 3]] * 3
    with pytest.raises(ProfileError, match="fixed batch of 4"):
        input_profile(fixed_batch, batch=2)


def test_keep_res_profile_lies_on_the_padding_grid():
    spec = _export_spec(preprocess="normalize", keep_res=True)
    profile = input_profile(spec, min_size=(100, 70), opt_size=(480, 641), max_size=(1000, 1000))
    assert profile.min == (1, 96, 64, 3) and profile.opt == (1, 480, 672, 3) and profile.max == (1, 1024, 1024, 3)
    assert all(d % 32 == 0 for shape in profile.shapes() for d in shape[1:3])
    default = input_profile(spec)
    assert default.opt == (1, 512, 640, 3)  # a 480x640 COCO image pads to 512x640
    with pytest.raises(ProfileError, match="min <= opt <= max"):
        input_profile(spec, min_size=(640, 640), opt_size=(320, 320))
    assert parse_size("480x640") == (480, 640) and parse_size("512") == (512, 512)
    with pytest.raises(ValueError):
        parse_size("480*640")


# ---- side-car -------------------------------------------------------------------------------------------

def _fake_engine(tmp_path: Path, spec=None, version: str = "10.16.1") -> Path:
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not really an engine" + bytes(range(256)))
    meta = EngineMeta(engine_sha256=file_sha256(engine), tensorrt_version=version, gpu_name="Orin",
                      precision="fp16", spec=spec or synthetic_spec(), profile={"image": [[1, 64, 64, 3]] * 3},
                      version_compatible=False, dla_core=0, build={"flags": ["FP16"]})
    write_engine_meta(engine, meta)
    return engine


def test_side_car_round_trip_and_sha_check(tmp_path):
    engine = _fake_engine(tmp_path)
    assert engine_meta_path(engine).name == "model.engine.json"
    meta = read_engine_meta(engine)
    assert meta.spec == synthetic_spec() and meta.tensorrt_version == "10.16.1" and meta.dla_core == 0
    assert meta.profile == {"image": [[1, 64, 64, 3]] * 3} and meta.build == {"flags": ["FP16"]}
    assert EngineMeta.from_dict(meta.to_dict()).to_dict() == meta.to_dict()
    verify_engine(engine, meta)
    data = bytearray(engine.read_bytes())
    data[3] ^= 1
    engine.write_bytes(bytes(data))
    with pytest.raises(EngineMetaError, match="does not match its side-car"):
        verify_engine(engine, meta)
    engine_meta_path(engine).unlink()
    with pytest.raises(EngineMetaError, match="centernet-build"):
        read_engine_meta(engine)


def test_side_car_rejects_a_broken_profile(tmp_path):
    engine = _fake_engine(tmp_path)
    data = read_engine_meta(engine).to_dict()
    data["profile"] = {"image": [[1, 64, 64, 3]]}
    with pytest.raises(EngineMetaError, match=r"\[min, opt, max\]"):
        EngineMeta.from_dict(data)
    data["profile"] = {"image": [[1, 64, 64, 3]] * 3}
    del data["engine_sha256"]
    with pytest.raises(EngineMetaError, match="engine_sha256"):
        EngineMeta.from_dict(data)


# ---- calibrators against a stand-in with the documented method names ----------------------------------

def _fake_tensorrt(version: str = "10.16.1", forbid_runtime: bool = False) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class IInt8Calibrator:
        def __init__(self) -> None:
            self.base_initialised = True

        def get_batch_size(self):
            raise NotImplementedError

        def get_batch(self, names):
            raise NotImplementedError

        def read_calibration_cache(self):
            raise NotImplementedError

        def write_calibration_cache(self, cache):
            raise NotImplementedError

        def get_algorithm(self):
            raise NotImplementedError

    for class_name, _ in BASE_CLASSES.values():
        setattr(trt, class_name, type(class_name, (IInt8Calibrator,), {}))
    trt.CalibrationAlgoType = types.SimpleNamespace(**{algo: f"algo:{algo}" for _, algo in BASE_CLASSES.values()})

    def forbidden(*_a, **_k):
        raise AssertionError("a TensorRT builder/runtime was created")

    if forbid_runtime:
        trt.Builder = trt.Runtime = trt.Logger = forbidden
    return trt


@pytest.mark.parametrize("method", ["entropy", "minmax"])
def test_cache_calibrator_serves_exactly_the_cache_and_never_a_batch(tmp_path, method):
    trt = _fake_tensorrt()
    cache = write_cache(tmp_path / "calibration.cache", {"conv1": 2.5, "x:0": 0.125, "zero": 0.0}, method=method,
                        trt_version="10.16.1")
    data, algorithm = cache_bytes_for(cache, "10.16.1")
    assert data == cache.read_bytes()
    calibrator = make_cache_calibrator(trt, data, algorithm)
    base_name, algo = BASE_CLASSES[algorithm]
    assert isinstance(calibrator, getattr(trt, base_name)) and calibrator.base_initialised
    assert calibrator.read_calibration_cache() == cache.read_bytes()
    assert calibrator.get_batch(["image"]) is None and calibrator.batch_requests == 1
    assert calibrator.get_algorithm() == f"algo:{algo}" and calibrator.get_batch_size() == 1
    calibrator.write_calibration_cache(b"TRT-1-EntropyCalibration2\n")
    assert cache.read_bytes() == data  # ours is never overwritten


def test_cache_from_another_version_is_served_under_the_running_header(tmp_path):
    cache = write_cache(tmp_path / "c.cache", {"a": 1.7, "b": 300.0}, trt_version="10.16.1")
    data, _ = cache_bytes_for(cache, "10.8.0.43")
    served = data.decode().splitlines()
    assert served[0] == "TRT-100800-EntropyCalibration2"
    assert served[1:] == cache.read_text().splitlines()[1:]  # the ranges, bit for bit
    assert parse_cache(data.decode()).amaxes == parse_cache(cache.read_text()).amaxes


def test_batch_calibrator_hands_out_device_pointers_then_stops(tmp_path):
    trt = _fake_tensorrt()
    kept = []

    class Buffer:
        def __init__(self, array):
            self.array = array
            kept.append(array)

        def data_ptr(self):
            return self.array.ctypes.data

    batches = iter([np.full((1, 8, 8, 3), i, np.uint8) for i in range(3)])
    calibrator = make_batch_calibrator(trt, batches, 1, Buffer, tmp_path / "trt.cache")
    pointers = [calibrator.get_batch(["image"]) for _ in range(3)]
    assert [p[0] for p in pointers] == [a.ctypes.data for a in kept]
    assert [int(a[0, 0, 0, 0]) for a in kept] == [0, 1, 2]
    assert calibrator.get_batch(["image"]) is None and calibrator.read_calibration_cache() is None
    calibrator.write_calibration_cache(b"TRT-101601-EntropyCalibration2\nx: 3c000000\n")
    assert (tmp_path / "trt.cache").read_bytes().startswith(b"TRT-101601")


# ---- printed commands ----------------------------------------------------------------------------------

def _flag_names(cmd: list[str]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in cmd if arg.startswith("--")}


def test_trtexec_lines_per_version(calibrated):
    model, folder, _ = calibrated
    settings = BuildSettings(workspace_mib=2048, timing_cache=Path("t.cache"), version_compatible=True, dla_core=1)
    plan10 = plan_build(folder, TRT10, "int8", source_onnx=model)
    profile = input_profile(plan10.spec)
    cmd10 = trtexec_command(plan10, profile, "m.engine", settings)
    assert cmd10[:3] == ["trtexec", f"--onnx={model}", "--saveEngine=m.engine"]
    assert {"--int8", "--fp16", "--calib", "--precisionConstraints", "--layerPrecisions"} <= _flag_names(cmd10)
    assert f"--calib={folder / 'calibration.cache'}" in cmd10
    assert f"{FRAGILE}:fp16" in next(a for a in cmd10 if a.startswith("--layerPrecisions=")).split("=", 1)[1]
    assert "--minShapes=image:1x64x64x3" in cmd10 and "--maxShapes=image:1x64x64x3" in cmd10
    assert {"--memPoolSize=workspace:2048", "--timingCacheFile=t.cache", "--versionCompatible", "--useDLACore=1",
            "--allowGPUFallback"} <= set(cmd10)
    for precision in ("int8", "fp16"):
        plan11 = plan_build(folder, TRT11, precision)
        cmd11 = trtexec_command(plan11, input_profile(plan11.spec), "m.engine")
        assert not _flag_names(cmd11) & set(TRT11_REMOVED_FLAGS)
        assert cmd11[1] == f"--onnx={plan11.onnx}"
    typed = plan_build(folder, TRT10, "fp16", strongly_typed=True)
    assert "--stronglyTyped" in trtexec_command(typed, input_profile(typed.spec), "m.engine")
    live = plan_build(model, TRT10, "int8", int8_source="images")
    with pytest.raises(ValueError, match="cannot calibrate from images"):
        trtexec_command(live, input_profile(live.spec), "m.engine")


def test_polygraphy_lines_per_version(calibrated):
    model, folder, _ = calibrated
    plan10 = plan_build(folder, TRT10, "int8", source_onnx=model)
    cmd = polygraphy_command(plan10, input_profile(plan10.spec))
    assert cmd[:5] == ["polygraphy", "run", str(model), "--trt", "--onnxrt"]
    assert "--int8" in cmd and cmd[cmd.index("--calibration-cache") + 1] == str(folder / "calibration.cache")
    assert cmd[cmd.index("--val-range") + 1] == "image:[0,255]"
    assert cmd[cmd.index("--trt-opt-shapes") + 1] == "image:[1,64,64,3]"
    plan11 = plan_build(folder, TRT11, "int8")
    cmd11 = polygraphy_command(plan11, input_profile(plan11.spec), data_loader="loader.py")
    assert cmd11[2] == str(folder / "model_int8_qdq.onnx")
    assert not {"--fp16", "--int8", "--calibration-cache", "--val-range"} & set(cmd11)
    assert cmd11[cmd11.index("--data-loader-script") + 1] == "loader.py"


def test_print_commands_without_tensorrt(calibrated, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    model, folder, images = calibrated
    assert cli.main([str(folder), "--trt-version", "11", "--print-commands", "-o", "x.engine"]) == 0
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert [line[0] for line in lines] == ["trtexec", "polygraphy"]
    assert lines[0][1].endswith("model_int8_qdq.onnx") and not _flag_names(lines[0]) & set(TRT11_REMOVED_FLAGS)
    assert cli.main([str(folder), "--onnx", str(model), "--trt-version", "10", "--print-commands",
                     "--precision", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "--fp16" in out and "--int8" not in out and "model_fp16.engine" not in out
    assert cli.main([str(model), "--print-commands"]) == 2
    assert "pass --trt-version 10 or 11" in capsys.readouterr().err


def test_print_commands_can_compare_on_real_images(calibrated, capsys, tmp_path):
    _, folder, images = calibrated
    engine = tmp_path / "m.engine"
    assert cli.main([str(folder), "--trt-version", "11", "--print-commands", "-o", str(engine),
                     "--compare-images", str(images)]) == 0
    loader = tmp_path / "m.engine.polygraphy_loader.py"
    assert f"--data-loader-script {loader}" in capsys.readouterr().out
    assert "iter_feeds" in loader.read_text()
    assert not engine.exists()


# ---- clear errors --------------------------------------------------------------------------------------

def test_build_without_tensorrt_is_one_line_exit_2(calibrated, capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    model, _, _ = calibrated
    engine = tmp_path / "m.engine"
    assert cli.main([str(model), "-o", str(engine)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("centernet-build: error: TensorRT is not installed") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def _no_gpu(monkeypatch, version="10.16.1"):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "cuda", None)  # cuda-python absent too
    fake = _fake_tensorrt(version, forbid_runtime=True)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


def test_build_without_gpu_never_touches_tensorrt(calibrated, capsys, monkeypatch, tmp_path):
    _no_gpu(monkeypatch)
    assert not gpu_devices().found and tensorrt_installed()
    model, folder, _ = calibrated
    engine = tmp_path / "m.engine"
    assert cli.main([str(folder), "--onnx", str(model), "-o", str(engine)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("centernet-build: error: no NVIDIA GPU is visible") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_exit_2(calibrated, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    model, folder, images = calibrated
    cases = [
        ([str(folder), "--trt-version", "11", "--print-commands", "--dla-core", "0"], "JetPack"),
        ([str(folder), "--trt-version", "11", "--print-commands", "--calib-images", str(images)], "no calibrators"),
        ([str(model), "--trt-version", "10", "--print-commands", "--precision", "fp32", "--dla-core", "0"], "DLA"),
        ([str(model), "--trt-version", "9", "--print-commands"], "not supported"),
        ([str(model), "--trt-version", "10", "--print-commands", "--max-size", "900x900"], "fixed at 64x64"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)


# ---- runner and evaluator hook -------------------------------------------------------------------------

def test_engine_files_default_to_the_trt_backend_and_eval_reads_the_side_car(tmp_path):
    from centernet_edge.eval.evaluate import resolve_model
    from centernet_edge.runtime.spec import SpecError

    engine = _fake_engine(tmp_path)
    assert default_backend(engine) == "trt"
    entry = resolve_model(engine, None, None, "m")
    assert entry.backend == "trt" and entry.spec == synthetic_spec()
    engine_meta_path(engine).unlink()
    with pytest.raises(SpecError, match="side-car"):
        resolve_model(engine, None, None, "m")


def test_runner_refuses_without_gpu_before_tensorrt(tmp_path, monkeypatch):
    from centernet_edge.runtime.trt_runner import TensorRTRunner

    _no_gpu(monkeypatch)
    engine = _fake_engine(tmp_path)
    with pytest.raises(RunnerError, match="needs an NVIDIA GPU"):
        TensorRTRunner(engine)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(RunnerError, match="TensorRT is not installed"):
        TensorRTRunner(engine)


def test_runner_refuses_a_swapped_engine_or_a_disagreeing_spec(tmp_path, monkeypatch):
    from centernet_edge.runtime.trt_runner import TensorRTRunner, check_spec_matches

    _no_gpu(monkeypatch)
    engine = _fake_engine(tmp_path)
    meta = read_engine_meta(engine)
    other = dataclasses.replace(synthetic_spec(), num_classes=3, class_names=["a", "b", "c"])
    with pytest.raises(RunnerError, match="class_names"):
        check_spec_matches(meta, other)
    relabelled = dataclasses.replace(synthetic_spec(), provenance={"precision": "fp16"})
    assert check_spec_matches(meta, relabelled) is relabelled
    engine.write_bytes(b"rebuilt")
    with pytest.raises(EngineMetaError, match="does not match"):
        TensorRTRunner(engine)


# ---- on a machine with TensorRT and a GPU --------------------------------------------------------------

_HAS_TRT_GPU = tensorrt_installed() and gpu_devices().found
needs_trt = pytest.mark.skipif(not _HAS_TRT_GPU, reason="needs TensorRT and an NVIDIA GPU (neither is here)")


@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_built_engine_matches_onnx_runtime(calibrated, tmp_path, precision):
    from centernet_edge.runtime.runners import OnnxRuntimeRunner
    from centernet_edge.runtime.trt_runner import TensorRTRunner


    model, folder, images = calibrated
    engine = tmp_path / f"m_{precision}.engine"
    assert cli.main([str(folder), "--onnx", str(model), "--precision", precision, "-o", str(engine), "-q"]) == 0
    meta = read_engine_meta(engine)
    verify_engine(engine, meta)
    import cv2

    imgs = [cv2.imread(str(p)) for p in sorted(images.glob("*.png"))[:4]]
    reference = OnnxRuntimeRunner(model).run(imgs)
    runner = TensorRTRunner(engine)
    got = runner.run(imgs)
    assert runner.last_timing is not None and runner.last_engine_ms > 0
    tolerance = {"fp32": 1e-3, "fp16": 5e-2, "int8": 0.15}[precision]
    for ref, det in zip(reference, got, strict=True):
        top = min(5, len(ref.scores))
        assert np.allclose(det.scores[:top], ref.scores[:top], atol=tolerance)
