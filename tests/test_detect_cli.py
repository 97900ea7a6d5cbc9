"""``centernet-detect`` end to end: images, a folder, a video, and every bad input as one line, exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from centernet_edge.detect import cli
from centernet_edge.detect.detector import Detector
from centernet_edge.export.verify import synthetic_images

FAST = ["--threads", "1", "-q"]


@pytest.fixture(scope="module")
def model(small_export) -> Path:
    return small_export[1].path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with two images, a file that is not an image and a tiny generated video."""
    root = tmp_path_factory.mktemp("detect_inputs")
    folder = root / "photos"
    folder.mkdir()
    for name, image in synthetic_images(2, seed=21):
        cv2.imwrite(str(folder / f"{name}.png"), image)
    (folder / "notes.txt").write_text("not an image")
    writer = cv2.VideoWriter(str(root / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (96, 72))
    assert writer.isOpened()
    for i, (_, image) in enumerate(synthetic_images(5, seed=30)):
        writer.write(cv2.resize(image, (96, 72)) if i % 2 else cv2.resize(image[::-1], (96, 72)))
    writer.release()
    return root


def _frames(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    ok, frame = capture.read()
    while ok:
        frames.append(frame)
        ok, frame = capture.read()
    capture.release()
    return frames


def _one_line_error(capsys, message: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("centernet-detect: error: "), err
    assert message in err, err


def test_images_and_folder(model: Path, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    photos = sorted((inputs / "photos").glob("*.png"))
    # The same image twice (once directly, once through the folder) is processed once.
    # Random weights score about 0.21 at best; 0.211 keeps a few boxes per image.
    assert cli.main([str(model), str(photos[0]), str(inputs / "photos"), "-o", str(out),
                     "--score-threshold", "0.211", *FAST]) == 0
    doc = json.loads((out / "detections.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["detections.json", *[p.name for p in photos]]
    assert [Path(i["input"]).name for i in doc["images"]] == [p.name for p in photos]
    assert doc["videos"] == [] and doc["skipped"] == {} and doc["score_threshold"] == 0.211
    detector = Detector(model, score_threshold=0.211, clip_boxes=True, threads=1)
    drawn = 0
    for entry, path in zip(doc["images"], photos, strict=True):
        image = cv2.imread(str(path))
        expected = detector.records(detector(path)[0])
        assert entry["detections"] == expected and (entry["height"], entry["width"]) == image.shape[:2]
        annotated = cv2.imread(str(out / entry["output"]))
        assert annotated.shape == image.shape
        changed = np.any(annotated != image, axis=2)
        assert changed.any() == bool(expected)  # boxes drawn exactly when there is something to draw
        for row in expected:  # each box's outline is drawn
            x1, y1 = (int(round(v)) for v in row["box"][:2])
            assert changed[min(y1, image.shape[0] - 1), min(x1, image.shape[1] - 1)]
        drawn += len(expected)
    assert drawn > 0


def test_video(model: Path, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli.main([str(model), str(inputs / "clip.avi"), "-o", str(out), "--score-threshold", "0.2",
                     *FAST]) == 0  # random weights score about 0.21 at best
    doc = json.loads((out / "detections.json").read_text())
    (video,) = doc["videos"]
    source = _frames(inputs / "clip.avi")
    written = _frames(out / video["output"])
    assert video["frames"] == len(source) == len(written) == 5 and video["fps"] == pytest.approx(5.0)
    assert all(f.shape == (72, 96, 3) for f in written)
    detector = Detector(model, score_threshold=0.2, clip_boxes=True, threads=1)
    assert video["detections"] == [detector.records(detector(f)[0]) for f in source]
    assert sum(len(f) for f in video["detections"]) > 0


def test_unreadable_images_are_skipped_and_listed_or_fatal_with_strict(model: Path, inputs: Path,
                                                                        tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    good = next((inputs / "photos").glob("*.png"))
    out = tmp_path / "out"
    assert cli.main([str(model), str(good), str(broken), "-o", str(out), "--threads", "1"]) == 0
    doc = json.loads((out / "detections.json").read_text())
    assert list(doc["skipped"]) == [str(broken)] and len(doc["images"]) == 1
    assert f"skipped {broken}" in capsys.readouterr().err
    strict_out = tmp_path / "strict"
    assert cli.main([str(model), str(good), str(broken), "-o", str(strict_out), "--strict", *FAST]) == 2
    _one_line_error(capsys, "cannot read image")
    assert not strict_out.exists()


def test_bad_inputs_fail_in_one_line_and_write_nothing(model: Path, inputs: Path, tmp_path: Path,
                                                       capsys) -> None:
    work = tmp_path / "work"
    work.mkdir()
    bare = onnx.load(str(model))
    del bare.metadata_props[:]
    onnx.save(bare, str(work / "bare.onnx"))
    (work / "empty").mkdir()
    (work / "bad.mp4").write_bytes(b"not a video")
    (work / "a_file").write_text("x")
    (work / "junk.png").write_bytes(b"junk")
    image = str(next((inputs / "photos").glob("*.png")))
    out = str(work / "out")
    cases = [
        ([str(work / "none.onnx"), image, "-o", out], "model file not found"),
        ([str(work / "bare.onnx"), image, "-o", out], "carries no centernet-edge model spec"),
        ([str(model), str(work / "missing.jpg"), "-o", out], "input not found"),
        ([str(model), str(work / "empty"), "-o", out], "no images or videos in folder"),
        ([str(model), str(work / "bad.mp4"), "-o", out], "cannot read video"),
        ([str(model), str(work / "junk.png"), "-o", out], "none of the 1 input(s) could be read"),
        ([str(model), image, "-o", str(work / "a_file")], "exists and is not a directory"),
        ([str(model), image, "-o", str(inputs / "photos")], "holds inputs"),
        ([str(model), image, "-o", out, "--score-threshold", "2"], "expected a number in [0, 1]"),
        ([str(model), image], "the following arguments are required: -o/--output-dir"),
        ([str(model), image, "-o", out, "--providers", "nope"], "providers not available"),
    ]
    for args, message in cases:
        assert cli.main([*args, *FAST]) == 2, args
        _one_line_error(capsys, message)
    assert sorted(p.name for p in work.iterdir()) == ["a_file", "bad.mp4", "bare.onnx", "empty", "junk.png"]
    assert sorted(p.name for p in (inputs / "photos").iterdir()) == ["notes.txt", "synthetic_0.png",
                                                                     "synthetic_1.png"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_unwritable_output_is_refused_before_any_work(model: Path, inputs: Path, tmp_path: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert cli.main([str(model), str(inputs / "photos"), "-o", str(locked / "out"), *FAST]) == 2
        _one_line_error(capsys, "not writable")
        assert cli.main([str(model), str(inputs / "photos"), "-o", str(locked), *FAST]) == 2
        _one_line_error(capsys, "not writable")
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_interrupt_leaves_nothing(model: Path, inputs: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from centernet_edge.detect import drawing

    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return args[0].copy()

    monkeypatch.setattr(drawing, "draw_detections", interrupted)
    assert cli.main([str(model), str(inputs / "photos"), "-o", str(tmp_path / "out"), *FAST]) == 130
    assert capsys.readouterr().err == "centernet-detect: interrupted; nothing written\n"
    assert list(tmp_path.iterdir()) == []
    # Into an existing folder: its old contents stay, nothing new appears.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    calls.clear()
    assert cli.main([str(model), str(inputs / "photos"), "-o", str(tmp_path / "out"), *FAST]) == 130
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["keep.txt", "out"]


def test_default_threshold() -> None:
    args = cli.build_parser().parse_args(["m.onnx", "a.jpg", "-o", "out"])
    assert args.score_threshold == 0.3 and args.inputs == [Path("a.jpg")]


def test_help_explains_outputs(capsys) -> None:
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for phrase in ("detections.json", "--model-spec", "--score-threshold", "video", "exit codes"):
        assert phrase in text
