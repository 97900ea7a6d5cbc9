"""Calibration data: sources, seeded selection, provenance hash, robust reading, batches, Polygraphy loader."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from centernet_edge.calib_data.batches import effective_batch_size, iter_batches, iter_feeds
from centernet_edge.calib_data.polygraphy_loader import write_polygraphy_loader
from centernet_edge.calib_data.provenance import dataset_hash
from centernet_edge.calib_data.sources import (
    CalibrationSourceError,
    list_coco,
    list_file,
    list_folder,
    load_calibration_set,
    select_images,
)
from centernet_edge.runtime.images import ReadReport, decode_bgr, read_bgr
from centernet_edge.runtime.preprocess import prepare_batch
from centernet_edge.runtime.spec import Decode, GraphIO, ModelSpec, Preprocess, TensorInfo


def tiny_spec(size: int = 16, preprocess: str = "none", batch: int | None = None, resize: str = "stretch"
              ) -> ModelSpec:
    return ModelSpec(
        name="tiny", source="foreign", arch="tiny", num_classes=2, class_names=["a", "b"],
        preprocess=Preprocess(resize=resize, input_size=None if resize == "keep_res" else (size, size),
                              color="RGB", scale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        decode=Decode(),
        graph=GraphIO(
            preprocess=preprocess, decode=False, batch=batch,
            input=TensorInfo("image", "float32", ["N", 3, size, size], "NCHW"),
            outputs={"heatmap": TensorInfo("hm", "float32", ["N", 2, 4, 4]),
                     "wh": TensorInfo("wh", "float32", ["N", 2, 4, 4])},
        ),
    ).validate()


def _img(seed: int, h: int = 24, w: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_folder(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"img_{i:03d}.png"
        cv2.imwrite(str(p), _img(i, 20 + i % 3, 30))
        paths.append(p)
    return paths


# ---- reading --------------------------------------------------------------------------------------


def test_read_matches_cv2_imread_for_every_conversion(tmp_path):
    rng = np.random.default_rng(0)
    cases = {
        "color.jpg": _img(1),
        "gray.png": rng.integers(0, 256, (10, 12), dtype=np.uint8),
        "deep.png": rng.integers(0, 65536, (10, 12, 3), dtype=np.uint16),
        "deep_gray.png": rng.integers(0, 65536, (10, 12), dtype=np.uint16),
        "alpha.png": rng.integers(0, 256, (10, 12, 4), dtype=np.uint8),
    }
    report = ReadReport()
    for name, pixels in cases.items():
        path = tmp_path / name
        assert cv2.imwrite(str(path), pixels)
        ours = read_bgr(path, report)
        reference = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert ours.dtype == np.uint8 and ours.shape == reference.shape and ours.shape[2] == 3
        np.testing.assert_array_equal(ours, reference, err_msg=name)
    assert report.read == 5 and report.skipped == 0
    assert dict(report.conversions) == {"gray_to_bgr": 2, "16bit_to_8bit": 2}
    # 16-bit keeps the high byte, exactly like IMREAD_COLOR
    np.testing.assert_array_equal(read_bgr(tmp_path / "deep.png"), (cases["deep.png"] >> 8).astype(np.uint8))


def test_four_channel_decode_drops_alpha():
    bgra = np.random.default_rng(3).integers(0, 256, (6, 7, 4), dtype=np.uint8)
    ok, buf = cv2.imencode(".tiff", bgra)
    assert ok
    img, conversions, reason = decode_bgr(buf.tobytes())
    assert reason is None
    np.testing.assert_array_equal(img, bgra[:, :, :3])
    np.testing.assert_array_equal(img, cv2.imdecode(buf, cv2.IMREAD_COLOR))


def test_cmyk_jpeg_becomes_bgr(tmp_path):
    image_mod = pytest.importorskip("PIL.Image")
    path = tmp_path / "cmyk.jpg"
    image_mod.new("CMYK", (9, 7), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    img = read_bgr(path)
    assert img.shape == (7, 9, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, cv2.imread(str(path), cv2.IMREAD_COLOR))
    assert img[..., 2].min() > 200 and img[..., :2].max() < 60  # red stays red: B, G low, R high


def test_unreadable_files_are_skipped_counted_and_never_raise(tmp_path):
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), _img(0))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:40])
    junk = bytearray(good.read_bytes())
    junk[8:] = bytes(len(junk) - 8)  # valid PNG signature, garbage after it
    (tmp_path / "garbage.png").write_bytes(bytes(junk))
    report = ReadReport()
    names = ["good.png", "empty.jpg", "text.jpg", "truncated.png", "garbage.png", "missing.png"]
    results = {n: read_bgr(tmp_path / n, report) for n in names}
    assert results["good.png"] is not None
    assert all(results[n] is None for n in names[1:])
    assert report.read == 1 and report.skipped == 5
    assert report.skip_reasons[str(tmp_path / "empty.jpg")] == "empty file"
    assert "cannot read file" in report.skip_reasons[str(tmp_path / "missing.png")]
    assert report.as_dict()["skipped"] == 5


def test_strict_reads_fail_on_the_first_unreadable_file_and_skips_are_listed_in_one_line(tmp_path):
    from centernet_edge.runtime.images import UnreadableImageError

    good = tmp_path / "good.jpg"
    cv2.imwrite(str(good), _img(0))
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:200])
    (tmp_path / "text.jpg").write_text("not an image")
    report = ReadReport()
    for name in ("good.jpg", "cut.jpg", "text.jpg"):
        read_bgr(tmp_path / name, report, name)
    assert report.skip_line() == ("skipped 2 unreadable image(s): cut.jpg (truncated JPEG (no end-of-image "
                                  "marker)), text.jpg (not a decodable image)")
    assert ReadReport().skip_line() == ""
    strict = ReadReport(strict=True)
    assert read_bgr(good, strict) is not None
    with pytest.raises(UnreadableImageError, match=r"cannot read image cut.jpg: truncated JPEG .*\(--strict\)"):
        read_bgr(tmp_path / "cut.jpg", strict, "cut.jpg")
    assert strict.read == 1 and strict.skipped == 0


# ---- sources --------------------------------------------------------------------------------------


def test_folder_listing_is_sorted_and_filters_non_images(tmp_path):
    make_folder(tmp_path, 3)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    cv2.imwrite(str(tmp_path / "sub" / "deep.PNG"), _img(9))
    assert [p.name for p in list_folder(tmp_path)] == ["img_000.png", "img_001.png", "img_002.png"]
    assert [p.name for p in list_folder(tmp_path, recursive=True)][-1] == "deep.PNG"
    with pytest.raises(CalibrationSourceError, match="does not exist"):
        list_folder(tmp_path / "nope")


def test_list_file_relative_to_its_folder_with_comments_and_missing(tmp_path, caplog):
    make_folder(tmp_path / "imgs", 3)
    lst = tmp_path / "lists" / "calib.txt"
    lst.parent.mkdir()
    lst.write_text("# calibration\n../imgs/img_002.png\n\n../imgs/img_000.png\n../imgs/gone.png\n../imgs/img_000.png\n")
    with caplog.at_level(logging.WARNING):
        paths, missing = list_file(lst)
    assert [p.name for p in paths] == ["img_002.png", "img_000.png"]
    assert missing == ["../imgs/gone.png"]
    assert "do not exist" in caplog.text
    cs = load_calibration_set(lst)
    assert cs.source == "list" and len(cs) == 2 and cs.summary()["num_missing"] == 1
    assert cs.names == ["../imgs/img_000.png", "../imgs/img_002.png"]


def test_coco_json_source(tmp_path):
    make_folder(tmp_path / "val", 4)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": i, "file_name": f"img_{i:03d}.png"} for i in (3, 1, 7)]}))
    paths, missing = list_coco(ann, tmp_path / "val")
    assert [p.name for p in paths] == ["img_003.png", "img_001.png"] and missing == ["img_007.png"]
    cs = load_calibration_set(ann, images_dir=tmp_path / "val")
    assert cs.source == "coco" and cs.names == ["img_001.png", "img_003.png"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(CalibrationSourceError, match="not a COCO annotation file"):
        list_coco(bad, tmp_path / "val")


def test_seeded_selection_is_deterministic_and_hash_tracks_inputs(tmp_path):
    make_folder(tmp_path, 12)
    a = load_calibration_set(tmp_path, num_images=5, seed=3)
    b = load_calibration_set(tmp_path, num_images=5, seed=3)
    c = load_calibration_set(tmp_path, num_images=5, seed=4)
    assert a.paths == b.paths and a.dataset_hash == b.dataset_hash
    assert len(a) == 5 and len(set(a.paths)) == 5
    assert a.paths != c.paths and a.dataset_hash != c.dataset_hash
    everything = load_calibration_set(tmp_path)
    assert len(everything) == 12 and everything.names == sorted(everything.names)
    assert load_calibration_set(tmp_path, num_images=100).paths == everything.paths
    # re-encoding a chosen file (size change) changes the hash; the order of entries does not
    victim = a.paths[0]
    cv2.imwrite(str(victim), _img(99, 40, 40))
    assert load_calibration_set(tmp_path, num_images=5, seed=3).dataset_hash != a.dataset_hash
    assert dataset_hash([("b", 2), ("a", 1)], 0) == dataset_hash([("a", 1), ("b", 2)], 0)
    assert dataset_hash([("a", 1)], 0) != dataset_hash([("a", 1)], 1)
    with pytest.raises(CalibrationSourceError, match="positive"):
        select_images([Path("x"), Path("y")], 0, 0)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(CalibrationSourceError, match="no calibration images"):
        load_calibration_set(empty)
    with pytest.raises(CalibrationSourceError, match="does not exist"):
        load_calibration_set(tmp_path / "none_here")


# ---- batches --------------------------------------------------------------------------------------


def test_batches_equal_prepare_batch_and_skip_bad_images(tmp_path, caplog):
    paths = make_folder(tmp_path, 5)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    spec = tiny_spec()
    cs = load_calibration_set(tmp_path)
    report = ReadReport()
    with caplog.at_level(logging.WARNING):
        batches = list(iter_batches(cs, spec, 2, report=report))
    assert [b.shape for b in batches] == [(2, 3, 16, 16), (2, 3, 16, 16), (1, 3, 16, 16)]
    assert report.read == 5 and report.skipped == 1 and "broken.png" in caplog.text
    images = [cv2.imread(str(p)) for p in paths]
    expected, _ = prepare_batch(images[:2], spec)
    np.testing.assert_array_equal(batches[0], expected)
    assert len(list(iter_batches(cs, spec, 2, drop_last=True))) == 2


def test_effective_batch_size_rules():
    assert effective_batch_size(tiny_spec()) == 1
    assert effective_batch_size(tiny_spec(), 4) == 4
    assert effective_batch_size(tiny_spec(batch=1)) == 1
    with pytest.raises(ValueError, match="fixed batch of 1"):
        effective_batch_size(tiny_spec(batch=1), 8)
    # raw-image graphs and keep_res inputs vary in size per image: one image at a time
    assert effective_batch_size(tiny_spec(preprocess="warp"), 8) == 1
    assert effective_batch_size(tiny_spec(resize="keep_res"), 8) == 1


def test_polygraphy_loader_script_yields_prepare_batch_inputs(tmp_path):
    paths = make_folder(tmp_path / "imgs", 3)
    spec = tiny_spec()
    spec_path = tmp_path / "tiny.json"
    spec_path.write_text(spec.to_json())
    script = write_polygraphy_loader(tmp_path / "loader.py", tmp_path / "tiny.onnx", spec_path, paths)
    text = script.read_text()
    assert "def load_data()" in text and "import centernet_edge" not in text.split("def load_data")[0]
    module_spec = importlib.util.spec_from_file_location("generated_loader", script)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    feeds = list(module.load_data())
    assert len(feeds) == 3 and all(list(f) == ["image"] for f in feeds)
    expected, _ = prepare_batch([cv2.imread(str(paths[1]))], spec)
    np.testing.assert_array_equal(feeds[1]["image"], expected)
    with pytest.raises(ValueError, match="at least one image"):
        write_polygraphy_loader(tmp_path / "x.py", tmp_path / "tiny.onnx", spec_path, [])


def test_iter_feeds_drops_partial_batch_for_fixed_batch_graphs(tmp_path):
    paths = make_folder(tmp_path, 3)
    feeds = list(iter_feeds(paths, tiny_spec(), batch_size=2))
    assert [f["image"].shape[0] for f in feeds] == [2, 1]
    # a fixed batch (graph.batch) cannot take a short last batch: it is dropped, not padded
    spec = tiny_spec(batch=2)
    assert [f["image"].shape[0] for f in iter_feeds(paths, spec)] == [2]
