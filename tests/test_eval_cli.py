"""centernet-eval on the real mb3 CenterNet ONNX and the COCO dev subset (skipped without shared data)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from centernet_edge.eval.cli import main
from centernet_edge.eval.report import format_delta, format_pct

DESCRIPTION = Path(__file__).resolve().parents[1] / "eval" / "model_descriptions" / "mb3_centernet_coco.json"
# Published in the shared models README for this model, file and annotation subset (ONNX Runtime, CPU).
PUBLISHED_AP, PUBLISHED_AP50 = 29.5, 47.9


def _argv(models: list[Path], images: Path, ann: Path, out: Path, *extra: str) -> list[str]:
    return [*map(str, models), "--model-spec", str(DESCRIPTION), "--images", str(images), "--ann", str(ann),
            "-o", str(out), "--no-cache", "--threads", "1", "--providers", "cpu", "-q", *extra]


@pytest.mark.slow
def test_mb3_reproduces_the_published_accuracy(mb3_onnx, coco_val_dir, coco_dev_annotations, tmp_path):
    assert main(_argv([mb3_onnx], coco_val_dir, coco_dev_annotations, tmp_path, "--no-plots")) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    (row,) = report["rows"]
    assert abs(row["ap"] - PUBLISHED_AP) <= 0.1
    assert abs(row["ap50"] - PUBLISHED_AP50) <= 0.1
    assert row["precision"] == "fp32" and row["input"] == "stretch 512x512"
    assert report["dataset"]["images"] == 103 and row["latency"]["images"] == 103
    assert row["protocol"]["score_threshold"] is None and row["protocol"]["max_dets"] == 100


def test_foreign_onnx_without_description_suggests_model_spec(mb3_onnx, coco_val_dir, coco_dev_annotations,
                                                               tmp_path, capsys) -> None:
    argv = [str(mb3_onnx), "--images", str(coco_val_dir), "--ann", str(coco_dev_annotations)]
    assert main([*argv, "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "mb3_centernet_coco.onnx" in err and "carries no centernet-edge model spec" in err
    assert "--model-spec" in err


def _perturbed(src: Path, dst: Path, layer: int = 10, scale: float = 0.5) -> Path:
    """The same network with Gaussian noise on one conv's weights (a stand-in for a lossy conversion)."""
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits]
    weight = numpy_helper.to_array(inits[convs[layer].input[1]]).copy()
    weight += np.random.default_rng(0).normal(0, scale * weight.std(), weight.shape).astype(weight.dtype)
    inits[convs[layer].input[1]].CopyFrom(numpy_helper.from_array(weight, convs[layer].input[1]))
    onnx.save(model, str(dst))
    return dst


@pytest.mark.slow
def test_two_model_report_equals_single_runs(mb3_onnx, coco_val_dir, coco_dev_annotations, tmp_path) -> None:
    perturbed = _perturbed(mb3_onnx, tmp_path / "mb3_perturbed.onnx")
    limit = ["--limit", "20"]
    both = _argv([mb3_onnx, perturbed], coco_val_dir, coco_dev_annotations, tmp_path / "both", *limit)
    assert main(both) == 0
    for name, model in (("base", mb3_onnx), ("pert", perturbed)):
        out = tmp_path / name
        assert main(_argv([model], coco_val_dir, coco_dev_annotations, out, *limit, "--no-plots")) == 0
    report = json.loads((tmp_path / "both" / "report.json").read_text())
    single_base = json.loads((tmp_path / "base" / "report.json").read_text())["rows"][0]
    single_pert = json.loads((tmp_path / "pert" / "report.json").read_text())["rows"][0]

    base, pert = report["rows"]
    assert (base["model"], pert["model"]) == ("mb3_centernet_coco", "mb3_perturbed")
    assert base["stats"] == single_base["stats"] and pert["stats"] == single_pert["stats"]
    assert pert["delta_ap"] == single_pert["ap"] - single_base["ap"]
    assert pert["delta_ap50"] == single_pert["ap50"] - single_base["ap50"]
    assert pert["comparable"] and pert["precision"] == base["precision"] == "fp32"
    agreement = pert["agreement"]
    assert agreement["heatmap_images"] == 20 and agreement["heatmap_mae"] > 0  # the noise is visible
    assert 0 < agreement["recall"] <= 1 and agreement["base_detections"] > 0

    markdown = (tmp_path / "both" / "report.md").read_text()
    line = next(x for x in markdown.splitlines() if x.startswith("| mb3_perturbed |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3:7] == [format_pct(pert["ap"]), format_pct(pert["ap50"]), format_delta(pert["delta_ap"]),
                          format_delta(pert["delta_ap50"])]
    for png in ("pr_curves.png", "ap_delta_mb3_perturbed.png", "disagreements_mb3_perturbed.png"):
        image = cv2.imread(str(tmp_path / "both" / png))
        assert image is not None and min(image.shape[:2]) > 300, png
