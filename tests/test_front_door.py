"""The package's front door: lazy imports, verified export, Detector parity with the runners and the
evaluator, and the README's Python example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

import centernet_edge
from centernet_edge.export.pipeline import ExportRun, VerificationFailed
from centernet_edge.export.verify import synthetic_images
from centernet_edge.runtime.runners import OnnxRuntimeRunner
from centernet_edge.runtime.spec import COCO_CLASS_NAMES

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_front_door_imports_nothing_heavy(tmp_path: Path, cwd: str) -> None:
    probe = (
        "import sys, centernet_edge, centernet_edge.runtime\n"
        "from centernet_edge import Detector, Detections, ModelSpec, calibrate, evaluate, export, load_spec\n"
        "heavy = sorted(m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules)\n"
        "print(heavy, callable(export), export is sys.modules['centernet_edge.export'], centernet_edge.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO if cwd == "repo" else tmp_path,
                         capture_output=True, text=True, check=True)
    heavy, is_callable, is_module, where = out.stdout.split(maxsplit=3)
    assert heavy == "[]", out.stdout
    assert (is_callable, is_module) == ("True", "True")
    assert Path(where.strip()).resolve() == REPO / "centernet_edge" / "__init__.py"


def test_front_door_names_resolve_to_the_pipeline_objects() -> None:
    from centernet_edge.detect.detector import Detector
    from centernet_edge.runtime.detections import Detections

    assert centernet_edge.Detector is Detector and centernet_edge.Detections is Detections
    assert set(centernet_edge.__all__) <= set(dir(centernet_edge))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = centernet_edge.nope


def test_export_writes_a_verified_model(small_export) -> None:
    checkpoint, run = small_export
    assert isinstance(run, ExportRun) and run.verified and run.report.passed
    assert run.path.is_file() and run.spec.arch == "res_18" and run.spec.preprocess.input_size == (128, 128)
    assert run.spec.class_names == list(COCO_CLASS_NAMES)
    assert len(run.report.checks) == 3  # the CLI's default verification images
    # As from the CLI, the written file carries the verification evidence in its spec.
    from centernet_edge.runtime.spec import ModelSpec

    assert ModelSpec.from_onnx(run.path).provenance["verification"] == run.report.summary()


def test_export_refuses_a_broken_graph(small_export, tmp_path: Path, monkeypatch) -> None:
    """A graph that no longer computes what the checkpoint does is refused, exactly as by the CLI."""
    from centernet_edge.export import onnx_export

    real = onnx_export.optimize_graph

    def corrupting(model: onnx.ModelProto) -> dict[str, int]:
        applied = real(model)
        biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        values = onnx.numpy_helper.to_array(biggest) * 1.5  # one conv's weights off by 50%
        biggest.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), biggest.name))
        return applied

    monkeypatch.setattr(onnx_export, "optimize_graph", corrupting)
    checkpoint, _ = small_export
    out = tmp_path / "broken.onnx"
    with pytest.raises(VerificationFailed, match="broken.onnx not written: verification failed") as info:
        centernet_edge.export(checkpoint, out, input_size=128, threads=1)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert info.value.run.path is None and not info.value.run.verified
    assert info.value.run.report.failures  # judged on detections against the float64 reference
    kept = centernet_edge.export(checkpoint, out, input_size=128, threads=1, keep_unverified=True)
    assert kept.path == out and out.is_file() and not kept.verified


def test_export_rejects_unknown_options(small_export, tmp_path: Path) -> None:
    from centernet_edge.export.onnx_export import ExportError

    checkpoint, _ = small_export
    with pytest.raises(ExportError, match="unknown export option.*input_sise"):
        centernet_edge.export(checkpoint, tmp_path / "x.onnx", input_sise=128)
    with pytest.raises(ExportError, match="checkpoint not found"):
        centernet_edge.export(tmp_path / "missing.pth", tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("front_door_images")
    paths = []
    for name, image in synthetic_images(3, seed=11):
        path = folder / f"{name}.png"
        cv2.imwrite(str(path), image)
        paths.append(path)
    return paths


def test_detector_matches_the_runner(small_export, image_files: list[Path]) -> None:
    _, run = small_export
    images = [cv2.imread(str(p)) for p in image_files]
    expected = OnnxRuntimeRunner(run.path, intra_op_threads=1).run(images)
    assert sum(len(d) for d in expected) > 0
    with centernet_edge.Detector(run.path, score_threshold=0.0, threads=1) as detector:
        assert detector.class_names == list(COCO_CLASS_NAMES)
        by_path = detector(image_files)
        by_array = detector(images)
        one = detector(image_files[1])
        one_array = detector(images[1])
    assert len(by_path) == len(by_array) == 3 and len(one) == len(one_array) == 1
    for got in (by_path, by_array):
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_array_equal(g.to_array(), e.to_array())
    np.testing.assert_array_equal(one[0].to_array(), expected[1].to_array())
    np.testing.assert_array_equal(one_array[0].to_array(), expected[1].to_array())
    with pytest.raises(RuntimeError, match="closed"):
        detector(images[0])


def test_detector_threshold_clip_and_records(small_export, image_files: list[Path]) -> None:
    _, run = small_export
    image = cv2.imread(str(image_files[0]))
    h, w = image.shape[:2]
    everything = centernet_edge.Detector(run.path, score_threshold=0.0, threads=1)(image)[0]
    threshold = float(np.median(everything.scores))
    detector = centernet_edge.Detector(run.path, score_threshold=threshold, clip_boxes=True, threads=1)
    kept = detector(image)[0]
    wanted = everything.scores >= threshold
    assert 0 < len(kept) == int(wanted.sum()) < len(everything)
    np.testing.assert_array_equal(kept.scores, everything.scores[wanted])
    np.testing.assert_array_equal(kept.boxes, np.clip(everything.boxes[wanted], 0, [w, h, w, h]))
    rows = detector.records(kept)
    assert [r["class_name"] for r in rows] == [COCO_CLASS_NAMES[i] for i in kept.labels]
    assert rows[0]["category_id"] == run.spec.category_ids[int(kept.labels[0])]


def test_detector_errors(small_export, tmp_path: Path) -> None:
    from centernet_edge.detect.detector import ImageReadError
    from centernet_edge.runtime.spec import SpecError

    _, run = small_export
    with pytest.raises(FileNotFoundError, match="model file not found"):
        centernet_edge.Detector(tmp_path / "none.onnx")
    bare = onnx.load(str(run.path))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(SpecError, match="bare.onnx: .*carries no centernet-edge model spec"):
        centernet_edge.Detector(tmp_path / "bare.onnx")
    # The same graph with its spec given as a side-car description works.
    (tmp_path / "bare.json").write_text(run.spec.to_json())
    assert centernet_edge.Detector(tmp_path / "bare.onnx", model_spec=tmp_path / "bare.json").spec.arch == "res_18"
    detector = centernet_edge.Detector(run.path, threads=1)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageReadError, match="cannot read image .*broken.jpg"):
        detector(tmp_path / "broken.jpg")
    with pytest.raises(ValueError, match="must be uint8"):
        detector(np.zeros((20, 20, 3), np.float32))
    with pytest.raises(ValueError, match="score_threshold must be in"):
        centernet_edge.Detector(run.path, score_threshold=1.5)


def test_detector_matches_the_evaluator_on_the_real_model(mb3_onnx: Path, coco_val_dir: Path,
                                                         coco_dev_annotations: Path) -> None:
    description = REPO / "eval" / "model_descriptions" / "mb3_centernet_coco.json"
    result = centernet_edge.evaluate(mb3_onnx, coco_val_dir, coco_dev_annotations, model_specs=description,
                                     limit=3, threads=1, heatmaps=False, warmup=0, progress=False)
    (model_run,) = result.runs
    assert 0.0 <= model_run.metrics.stats["AP"] <= 1.0 and model_run.metrics.num_images == 3
    # The evaluator scores boxes clipped to the image; clip_boxes=True is the same.
    with centernet_edge.Detector(mb3_onnx, model_spec=description, score_threshold=0.0, clip_boxes=True,
                                 threads=1) as detector:
        for image_id, expected in model_run.detections.items():
            (got,) = detector(result.dataset.image_path(image_id))
            assert len(got) == len(expected) == 100
            np.testing.assert_array_equal(got.to_array(), expected.to_array())


def test_calibrate_front_door_builds_the_pipeline_options(tmp_path: Path, monkeypatch) -> None:
    """``calibrate`` is the calibration pipeline's entry with keyword options (the pipeline is tested on
    its own): the options object it hands over is what the CLI would build."""
    from centernet_edge.quantize import pipeline

    seen: list[pipeline.CalibrateOptions] = []
    monkeypatch.setattr(pipeline, "calibrate", lambda options: seen.append(options) or "result")
    assert centernet_edge.calibrate("m.onnx", "imgs", tmp_path, num_images=3, int8=False,
                                    model_spec="d.json") == "result"
    (options,) = seen
    expected = pipeline.CalibrateOptions(model=Path("m.onnx"), images=Path("imgs"), out_dir=tmp_path,
                                         num_images=3, int8=False, model_spec=Path("d.json"))
    assert options == expected
    with pytest.raises(TypeError, match="unknown calibrate option.*num_image"):
        centernet_edge.calibrate("m.onnx", "imgs", tmp_path, num_image=3)


def _readme_block(section: str, index: int) -> str:
    text = (REPO / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)[index]


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path: Path) -> None:
    """The README's first Python block, verbatim, on a demo checkpoint and two images."""
    code = _readme_block("Python API", 0)
    make = subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_checkpoint.py"), "res_18",
                           str(tmp_path / "demo.pth")], capture_output=True, text=True)
    assert make.returncode == 0, make.stderr
    (tmp_path / "images").mkdir()
    for name, (_, image) in zip(("a.jpg", "b.jpg"), synthetic_images(2, seed=3), strict=True):
        cv2.imwrite(str(tmp_path / "images" / name), image)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[0] == "demo.onnx res_18 True"
    assert (tmp_path / "demo.onnx").is_file()
