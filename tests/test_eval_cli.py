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
    # The published numbers are upstream's protocol (boxes unclipped), printed to one decimal: within 0.1.
    assert main(_argv([mb3_onnx], coco_val_dir, coco_dev_annotations, tmp_path, "--no-plots", "--no-clip")) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    (row,) = report["rows"]
    assert abs(row["ap"] - PUBLISHED_AP) <= 0.1
    assert abs(row["ap50"] - PUBLISHED_AP50) <= 0.1
    assert row["protocol"]["clip_boxes"] is False
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


# --- bad inputs and surprises, on synthetic data (fast, no shared data) -------------------------------------


@pytest.fixture()
def synthetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    from eval_synthetic import install_fake_backend, write_dataset, write_fake_model, write_spec

    install_fake_backend(monkeypatch)
    ann, images, data = write_dataset(tmp_path / "data")
    return {"tmp": tmp_path, "ann": ann, "images": images, "data": data,
            "exact": write_fake_model(tmp_path / "exact.json", data, jitter=0.0),
            "noisy": write_fake_model(tmp_path / "noisy.json", data, jitter=0.12, seed=2),
            "spec": write_spec(tmp_path / "spec.json"), "spec_int8": write_spec(tmp_path / "int8.json", "int8")}


def _fake_argv(s: dict, out: Path, *extra: str, ann: Path | None = None) -> list[str]:
    from eval_synthetic import FAKE_BACKEND

    return [str(s["exact"]), "--images", str(s["images"]), "--ann", str(ann or s["ann"]), "--backend",
            FAKE_BACKEND, "--model-spec", str(s["spec"]), "--no-cache", "-q", "--no-plots", "-o", str(out),
            *extra]


def _one_line(capsys, message: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("centernet-eval: error: ") and message in err, err


def _annotations(s: dict, name: str, mutate) -> Path:
    data = json.loads(s["ann"].read_text())
    mutate(data)
    path = s["tmp"] / name
    path.write_text(json.dumps(data))
    return path


def test_bad_annotations_and_outputs_fail_in_one_line(synthetic: dict, capsys, monkeypatch) -> None:
    import centernet_edge.runtime.cli_common as cli_common

    s = synthetic
    out = s["tmp"] / "out"
    assert main(_fake_argv(s, out, ann=s["images"])) == 2
    _one_line(capsys, f"--ann {s['images']} is a directory; pass the COCO instances .json file inside it")
    none = _annotations(s, "none.json", lambda d: d.update(annotations=[]))
    assert main(_fake_argv(s, out, ann=none)) == 2
    _one_line(capsys, "none.json has no annotations: no ground truth to score against")
    a_file = s["tmp"] / "a_file"
    a_file.write_text("x")
    assert main(_fake_argv(s, a_file)) == 2
    _one_line(capsys, f"output folder {a_file} exists and is not a directory")
    monkeypatch.setattr(cli_common.os, "access", lambda path, mode: False)
    assert main(_fake_argv(s, out)) == 2
    _one_line(capsys, f"{s['tmp']} is not writable")
    assert not out.exists()


def test_detections_of_the_wrong_shape_are_refused(synthetic: dict, capsys) -> None:
    from onnx import TensorProto, helper

    from centernet_edge.runtime.spec import ModelSpec

    s = synthetic
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", "H", "W", 3])
    dets = helper.make_tensor_value_info("detections", TensorProto.FLOAT, [1, 6, 100])
    zeros = helper.make_node("Constant", [], ["detections"],
                             value=helper.make_tensor("z", TensorProto.FLOAT, [1, 6, 100], [0.0] * 600))
    graph = helper.make_graph([zeros], "transposed", [image], [dets])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    ModelSpec.from_file(s["spec"]).write_to_onnx(model)
    path = s["tmp"] / "transposed.onnx"
    onnx.save(model, str(path))
    argv = [str(path), "--images", str(s["images"]), "--ann", str(s["ann"]), "--no-cache", "-q", "--no-plots",
            "--providers", "cpu", "-o", str(s["tmp"] / "out")]
    assert main(argv) == 2
    _one_line(capsys, "transposed.onnx: output 'detections' has shape [1, 6, 100], expected [N, K, 6] rows")


def test_missing_size_classes_show_na_and_boxes_are_clipped(synthetic: dict, capsys) -> None:
    from eval_synthetic import write_fake_model

    s = synthetic

    def small_only(data: dict) -> None:  # every object under 32x32 px: no medium or large ground truth
        for ann in data["annotations"]:
            ann["bbox"] = [ann["bbox"][0], ann["bbox"][1], 20.0, 15.0]
            ann["area"] = 300.0

    small = _annotations(s, "small.json", small_only)
    model = write_fake_model(s["tmp"] / "small_model.json", json.loads(small.read_text()), jitter=0.0)
    rows = json.loads(model.read_text())
    for key in rows:  # one box far outside its image on every side
        h, w = map(int, key.split("x"))
        rows[key].append([-50.0, -40.0, w + 300.0, h + 200.0, 0.9, 0])
    model.write_text(json.dumps(rows))
    out = s["tmp"] / "small_out"
    argv = _fake_argv(s, out, "--save-detections", ann=small)
    argv[0] = str(model)
    assert main(argv) == 0
    (row,) = json.loads((out / "report.json").read_text())["rows"]
    assert row["ap_medium"] is None and row["ap_large"] is None and row["ap_small"] > 0
    assert row["stats"]["APl"] is None and row["stats"]["ARm"] is None
    cells = next(x for x in (out / "report.md").read_text().splitlines() if x.startswith("| small_model"))
    assert [c.strip() for c in cells.strip("|").split("|")][7:10] == [format_pct(row["ap_small"]), "n/a", "n/a"]
    sizes = {i["id"]: (i["width"], i["height"]) for i in s["data"]["images"]}
    records = json.loads((out / "detections_small_model.json").read_text())
    for r in records:
        x, y, bw, bh = r["bbox"]
        w, h = sizes[r["image_id"]]
        assert 0 <= x and 0 <= y and x + bw <= w + 1e-3 and y + bh <= h + 1e-3
    assert sum(1 for r in records if r["bbox"] == [0.0, 0.0] + list(sizes[r["image_id"]])) == len(sizes)


def test_unreadable_images_are_skipped_named_and_reported_or_fail_strict(synthetic: dict, capsys) -> None:
    s = synthetic
    names = sorted(p.name for p in s["images"].iterdir())
    (s["images"] / names[1]).write_text("not an image")
    (s["images"] / names[2]).write_bytes((s["images"] / names[3]).read_bytes()[:60])
    out = s["tmp"] / "out"
    assert main(_fake_argv(s, out)) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(
        f"centernet-eval: warning: skipped 2 unreadable image(s): {names[1]} (not a decodable image), {names[2]} (")
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"]["images"] == 6 and report["dataset"]["listed_images"] == 8
    skipped = report["dataset"]["skipped_images"]
    assert skipped["skipped"] == 2 and sorted(skipped["skip_reasons"]) == names[1:3]
    assert report["rows"][0]["latency"]["images"] == 6
    assert "skipped 2 unreadable image(s)" in (out / "report.md").read_text()
    strict = s["tmp"] / "strict"
    assert main(_fake_argv(s, strict, "--strict")) == 2
    _one_line(capsys, f"cannot read image {names[1]}: not a decodable image (--strict)")
    assert not strict.exists()


def test_interrupt_is_one_line_and_leaves_nothing(synthetic: dict, capsys, monkeypatch) -> None:
    from eval_synthetic import FakeRunner

    s = synthetic

    def interrupted(self, images):
        raise KeyboardInterrupt

    monkeypatch.setattr(FakeRunner, "run", interrupted)
    before = sorted(p.name for p in s["tmp"].iterdir())
    assert main(_fake_argv(s, s["tmp"] / "out")) == 130
    assert capsys.readouterr().err == "centernet-eval: interrupted; nothing written\n"
    assert sorted(p.name for p in s["tmp"].iterdir()) == before


def test_model_spec_values_follow_the_help_and_version(synthetic: dict, capsys) -> None:
    from importlib.metadata import version

    from centernet_edge.eval.cli import _per_model, build_parser

    s = synthetic
    args = build_parser().parse_args(["a.onnx", "b.onnx", "c.onnx", "--model-spec", "a.json", "-", "-",
                                      "--images", "i", "--ann", "x.json"])
    assert args.models == ["a.onnx", "b.onnx", "c.onnx"] and args.model_spec == ["a.json", "-", "-"]
    assert _per_model(args.model_spec, 3, "--model-spec") == ["a.json", "-", "-"]
    argv = _fake_argv(s, s["tmp"] / "two")
    argv[argv.index("--model-spec") + 1:argv.index("--model-spec") + 2] = [str(s["spec"]), str(s["spec_int8"])]
    argv.insert(1, str(s["noisy"]))
    assert main(argv) == 0
    rows = json.loads((s["tmp"] / "two" / "report.json").read_text())["rows"]
    assert [r["precision"] for r in rows] == ["fp32", "int8"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"centernet-eval {version('centernet-edge')}\n"
