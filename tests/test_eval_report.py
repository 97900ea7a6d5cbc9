"""End-to-end report checks on synthetic data through a plug-in backend (fast, no shared data)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import pytest
from eval_synthetic import (
    FAKE_BACKEND,
    GAPPY_IDS,
    install_fake_backend,
    write_dataset,
    write_fake_model,
    write_spec,
)

from centernet_edge.eval.cli import main
from centernet_edge.eval.report import MISMATCH_MARK, format_delta, format_pct


@pytest.fixture()
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    install_fake_backend(monkeypatch)
    ann, images, data = write_dataset(tmp_path / "data")
    return {
        "tmp": tmp_path, "ann": ann, "images": images,
        "exact": write_fake_model(tmp_path / "exact.json", data, jitter=0.0),
        "noisy": write_fake_model(tmp_path / "noisy.json", data, jitter=0.12, seed=2),
        "spec": write_spec(tmp_path / "spec.json"),
        "spec_int8": write_spec(tmp_path / "spec_int8.json", precision="int8"),
        "spec_384": write_spec(tmp_path / "spec_384.json", input_size=(384, 384)),
    }


def _run(s: dict, models: list[Path], specs: list[Path], out: str, *extra: str) -> dict:
    argv = [str(m) for m in models] + ["--images", str(s["images"]), "--ann", str(s["ann"]), "--backend",
                                       FAKE_BACKEND, "-o", str(s["tmp"] / out), "--no-cache", "-q"]
    for spec in specs:
        argv += ["--model-spec", str(spec)]
    assert main(argv + list(extra)) == 0
    return json.loads((s["tmp"] / out / "report.json").read_text())


def _markdown_rows(path: Path) -> dict[str, list[str]]:
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 16 and cells[0] != "Model":
            rows[cells[0].removesuffix(" (baseline)")] = cells
    return rows


def test_report_deltas_equal_separate_runs_and_markdown_matches_json(setup: dict, capsys) -> None:
    s = setup
    report = _run(s, [s["exact"], s["noisy"]], [s["spec"], s["spec_int8"]], "both")
    single_exact = _run(s, [s["exact"]], [s["spec"]], "exact")["rows"][0]
    single_noisy = _run(s, [s["noisy"]], [s["spec_int8"]], "noisy")["rows"][0]

    base, other = report["rows"]
    assert base["is_baseline"] and base["model"] == "exact" and not other["is_baseline"]
    assert base["ap"] == single_exact["ap"] and other["ap"] == single_noisy["ap"]
    assert base["ap"] > other["ap"]  # jitter must cost AP, or the delta checks below are vacuous
    assert other["delta_ap"] == single_noisy["ap"] - single_exact["ap"]
    assert other["delta_ap50"] == single_noisy["ap50"] - single_exact["ap50"]
    assert base["delta_ap"] is None
    assert (base["precision"], other["precision"]) == ("fp32", "int8")
    assert other["protocol_mismatch"] == [] and other["comparable"]
    assert len(base["stats"]) == 12 and set(base["per_class_ap"]) == {str(c) for c in GAPPY_IDS}

    md = _markdown_rows(s["tmp"] / "both" / "report.md")
    for row in report["rows"]:
        cells = md[row["model"]]
        assert cells[2] == row["precision"]
        assert cells[3:5] == [format_pct(row["ap"]), format_pct(row["ap50"])]
        assert cells[5:7] == [format_delta(row["delta_ap"]), format_delta(row["delta_ap50"])]
        assert cells[7:10] == [format_pct(row[k]) for k in ("ap_small", "ap_medium", "ap_large")]
        assert cells[10] == "1.23M" and cells[11] == "8.50G"  # the spec records MACs
    assert "| Params | MACs | Input |" in (s["tmp"] / "both" / "report.md").read_text()
    # -q: no table, only what was written, one line per run
    assert [line.split(" to ")[0] for line in capsys.readouterr().out.splitlines()] == [
        "wrote report.json, report.md, pr_curves.png, ap_delta_noisy.png, disagreements_noisy.png",
        "wrote report.json, report.md, pr_curves.png", "wrote report.json, report.md, pr_curves.png"]

    agreement = other["agreement"]
    assert agreement["base_detections"] > 0 and agreement["base_matched"] <= agreement["base_detections"]
    assert agreement["heatmap_mae"] is not None
    assert agreement["heatmap_images"] == report["dataset"]["images"] == 8
    for png in ("pr_curves.png", "ap_delta_noisy.png", "disagreements_noisy.png"):
        image = cv2.imread(str(s["tmp"] / "both" / png))
        assert image is not None and image.shape[0] > 200 and image.shape[1] > 200, png


def test_protocol_mismatch_is_flagged_not_silently_compared(setup: dict) -> None:
    s = setup
    report = _run(s, [s["exact"], s["noisy"]], [s["spec"], s["spec_384"]], "mixed", "--no-plots")
    other = report["rows"][1]
    assert other["protocol_mismatch"] == ["input_size: [384, 384] vs [512, 512]"]
    assert not other["comparable"]
    md = (s["tmp"] / "mixed" / "report.md").read_text()
    row = _markdown_rows(s["tmp"] / "mixed" / "report.md")["noisy"]
    assert row[5] == format_delta(other["delta_ap"], mismatch=True) and row[5].endswith(MISMATCH_MARK)
    assert re.search(r"\*\*noisy\*\* differs from the baseline in input_size: .*mixes protocol", md)


def test_baseline_is_cached_and_reused(setup: dict) -> None:
    s = setup
    cache = s["tmp"] / "cache"
    argv = [str(s["exact"]), str(s["noisy"]), "--images", str(s["images"]), "--ann", str(s["ann"]),
            "--backend", FAKE_BACKEND, "--model-spec", str(s["spec"]), "--cache-dir", str(cache), "-q",
            "--no-plots"]
    assert main(argv + ["-o", str(s["tmp"] / "first")]) == 0
    assert len(list(cache.glob("*.npz"))) == 1
    assert main(argv + ["-o", str(s["tmp"] / "second")]) == 0
    first = json.loads((s["tmp"] / "first" / "report.json").read_text())["rows"]
    second = json.loads((s["tmp"] / "second" / "report.json").read_text())["rows"]
    assert not first[0]["cached"] and second[0]["cached"]
    # Accuracy is cached, latency never: the cached row is not timed, the fresh one is.
    assert first[0]["latency"]["images"] == 8 and second[0]["latency"] is None
    assert second[1]["latency"]["images"] == 8
    md = _markdown_rows(s["tmp"] / "second" / "report.md")
    assert md["exact"][13:16] == ["cached: not timed", "—", "—"]
    assert second[0]["ap"] == first[0]["ap"] and second[1]["delta_ap"] == first[1]["delta_ap"]
    assert "from cache" in second[1]["agreement"]["note"]
    # A different image limit is a different protocol: no hit.
    assert main(argv + ["-o", str(s["tmp"] / "third"), "--limit", "4"]) == 0
    third = json.loads((s["tmp"] / "third" / "report.json").read_text())["rows"]
    assert not third[0]["cached"] and len(list(cache.glob("*.npz"))) == 2


def _drop_category_90(data: dict) -> None:
    data["categories"] = [c for c in data["categories"] if c["id"] != 90]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 90]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("annotations"), "not a COCO instances file: missing or non-list annotations"),
        (lambda d: d["images"].append({"id": 1, "file_name": "nowhere.jpg"}), "not in .*: nowhere.jpg"),
        (_drop_category_90, "class count mismatch: model 'fake' has num_classes=8.* 7 categories"),
    ],
)
def test_clear_errors(setup: dict, capsys, mutate, message: str) -> None:
    s = setup
    data = json.loads(s["ann"].read_text())
    mutate(data)
    bad = s["tmp"] / "bad.json"
    bad.write_text(json.dumps(data))
    argv = [str(s["exact"]), "--images", str(s["images"]), "--ann", str(bad), "--backend", FAKE_BACKEND,
            "--model-spec", str(s["spec"]), "--no-cache", "-q", "-o", str(s["tmp"] / "err")]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


def test_invalid_json_and_option_counts(setup: dict, capsys) -> None:
    s = setup
    bad = s["tmp"] / "broken.json"
    bad.write_text("{not json")
    base = ["--images", str(s["images"]), "--backend", FAKE_BACKEND, "--no-cache", "-q"]
    assert main([str(s["exact"]), "--ann", str(bad), "--model-spec", str(s["spec"]), *base]) == 2
    assert "broken.json is not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(s["exact"]), str(s["noisy"]), str(s["exact"]), "--ann", str(s["ann"]), *base,
              "--model-spec", str(s["spec"]), "--model-spec", str(s["spec"])])
    assert "--model-spec given 2 times for 3 models" in capsys.readouterr().err
    garbage = s["tmp"] / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffnot a protobuf" * 10)
    assert main([str(garbage), "--ann", str(s["ann"]), "--images", str(s["images"]), "--no-cache", "-q"]) == 2
    assert "cannot read garbage.onnx as ONNX" in capsys.readouterr().err


def test_checkpoint_through_the_torch_backend(setup: dict, capsys) -> None:
    import torch

    from centernet_edge.export.models import build_model

    s = setup
    torch.manual_seed(0)
    ckpt = s["tmp"] / "res18_demo.pth"
    state = build_model("res_18", num_classes=len(GAPPY_IDS)).state_dict()
    torch.save({"epoch": 0, "state_dict": state}, ckpt)
    common = ["--images", str(s["images"]), "--ann", str(s["ann"]), "--no-cache", "-q", "--no-plots",
              "--threads", "1", "--device", "cpu", "--limit", "2"]
    # No spec: the checkpoint's own (identity class ids, which these annotations do not have).
    assert main([str(ckpt), *common, "-o", str(s["tmp"] / "t0")]) == 2
    assert "res18_demo" in (err := capsys.readouterr().err) and "set category_ids" in err

    with_spec = [*common, "--model-spec", str(s["spec"])]
    assert main([str(ckpt), *with_spec, "-o", str(s["tmp"] / "t1")]) == 0
    (row,) = json.loads((s["tmp"] / "t1" / "report.json").read_text())["rows"]
    assert (row["backend"], row["precision"], row["providers"]) == ("torch", "fp32", ["cpu"])
    assert row["latency"]["images"] == 2 and row["latency"]["median_ms"]["infer"] > 0
    # The same checkpoint twice, fp32 against fp16: refused on CPU with the reason.
    twice = [str(ckpt), str(ckpt), *with_spec, "--precision", "fp32", "--precision", "fp16"]
    assert main([*twice, "-o", str(s["tmp"] / "t2")]) == 2
    assert "fp16 is only supported on CUDA" in capsys.readouterr().err
