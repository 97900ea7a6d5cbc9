"""The pipeline folders install under one package, never as generic top-level modules."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIPELINE_FOLDERS = ("export", "quantize", "runtime", "calib_data", "eval", "detect")


def test_installed_package_maps_the_pipeline_folders():
    import importlib

    for folder in PIPELINE_FOLDERS:
        module = importlib.import_module(f"centernet_edge.{folder}")
        assert Path(module.__file__).resolve().parent == REPO / folder
    # The front door is a real package (its own folder), not a namespace stitched from the others.
    front = importlib.import_module("centernet_edge")
    assert Path(front.__file__).resolve() == REPO / "centernet_edge" / "__init__.py"


def test_front_door_and_subpackages_import_outside_the_repo(tmp_path):
    probe = ("import centernet_edge, centernet_edge.export.onnx_export as m; from centernet_edge import Detector; "
             "print(centernet_edge.__file__, m.__file__, Detector.__module__)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    front, module, detector = out.stdout.split()
    assert Path(front).resolve() == REPO / "centernet_edge" / "__init__.py"
    assert Path(module).resolve() == REPO / "export" / "onnx_export.py"
    assert detector == "centernet_edge.detect.detector"


def test_no_generic_top_level_module_outside_the_repo(tmp_path):
    probe = f"import importlib.util as u; print([n for n in {PIPELINE_FOLDERS!r} if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_built_wheel_contains_only_the_namespaced_package(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True,
    )
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip("wheel build tools not installed")
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(tmp_path.glob("centernet_edge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert top_level <= {"centernet_edge", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    for folder in PIPELINE_FOLDERS:
        assert f"centernet_edge/{folder}/__init__.py" in names
    assert "centernet_edge/eval/model_descriptions/mb3_centernet_coco.json" in names
    assert {"centernet_edge/__init__.py", "centernet_edge/api.py", "centernet_edge/detect/cli.py"} <= set(names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "centernet-detect = centernet_edge.detect.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert not any(n.startswith("centernet_edge/tests") for n in names)
    # The wheel imports on its own, from a directory that is not the repository.
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    probe = ("import centernet_edge.runtime.spec as s, centernet_edge.export as e; "
             "from centernet_edge import Detector, calibrate, evaluate, export; "
             "assert export is e and callable(e) and Detector.__module__.startswith('centernet_edge.'); "
             "print(s.__file__)")
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {probe}"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))


def _console_scripts() -> dict[str, str]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("script", sorted(_console_scripts()))
def test_every_tool_prints_its_help(script, capsys):
    """``--help`` renders (argparse expands ``%`` in help texts: a bare percent sign crashes it)."""
    import importlib

    module_name, function = _console_scripts()[script].split(":")
    main = getattr(importlib.import_module(module_name), function)
    try:
        code = main(["--help"])
    except SystemExit as stop:  # argparse's exit, unless the tool's wrapper turns it into a return code
        code = stop.code
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {script}")
    assert "options:" in out
