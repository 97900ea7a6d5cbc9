"""Shared fixtures. Data-dependent tests use the read-only data folder beside the checkout and skip
cleanly when it is absent (set CENTERNET_EDGE_SHARED to point elsewhere)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_root() -> Path:
    env = os.environ.get("CENTERNET_EDGE_SHARED")
    return Path(env) if env else REPO_ROOT.parent / "shared"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not available: {path.name}")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _require(shared_root() / "data")


@pytest.fixture(scope="session")
def coco_val_dir(shared_data: Path) -> Path:
    return _require(shared_data / "coco" / "val2017")


@pytest.fixture(scope="session")
def coco_dev_annotations(shared_data: Path) -> Path:
    return _require(shared_data / "coco" / "annotations" / "instances_val2017_dev103.json")


@pytest.fixture(scope="session")
def calib_dir(shared_data: Path) -> Path:
    return _require(shared_data / "coco" / "calib_val2017")


@pytest.fixture(scope="session")
def mb3_onnx(shared_data: Path) -> Path:
    return _require(shared_data / "models" / "mb3_centernet_coco.onnx")


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


@pytest.fixture(scope="session")
def small_export(tmp_path_factory: pytest.TempPathFactory):
    """A conditioned random official res_18 exported at 128x128 through the front door (verified):
    (checkpoint path, ExportRun). Shared by the front-door and centernet-detect tests."""
    from test_export_models import save_checkpoint

    from centernet_edge import export

    root = tmp_path_factory.mktemp("small_export")
    checkpoint = save_checkpoint("res_18", root / "ctdet_res18.pth")
    return checkpoint, export(checkpoint, root / "small.onnx", input_size=128, threads=1)
