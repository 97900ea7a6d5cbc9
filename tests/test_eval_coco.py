"""The evaluator's COCO scoring against direct pycocotools, and the class-index -> category-id mapping."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from centernet_edge.eval.coco_eval import STAT_NAMES, evaluate_coco, to_coco_results
from centernet_edge.eval.dataset import (
    DatasetError,
    check_model_classes,
    load_coco_dataset,
    model_category_ids,
)
from centernet_edge.runtime.detections import Detections
from centernet_edge.runtime.spec import (
    COCO_CATEGORY_IDS,
    COCO_CLASS_NAMES,
    GraphIO,
    ModelSpec,
    TensorInfo,
    official_preprocess,
    source_decode,
)

# Category ids with gaps inside 1..90, as in COCO, so index != id everywhere but the first.
GAPPY_IDS = [1, 3, 13, 27, 44, 67, 88, 90]


def _spec(num_classes: int, category_ids: list[int] | None, names: list[str] | None = None) -> ModelSpec:
    return ModelSpec(
        name="synthetic", source="official", arch="res_18", num_classes=num_classes,
        class_names=names or [f"c{i}" for i in range(num_classes)],
        preprocess=official_preprocess(), decode=source_decode("official"),
        graph=GraphIO(outputs={"detections": TensorInfo("detections", "float32", ["N", 100, 6])}),
        category_ids=category_ids,
    ).validate()


def _synthetic(tmp_path: Path, n_images: int = 6, seed: int = 0) -> tuple[Path, Path, dict]:
    """A COCO file with GAPPY_IDS categories, random boxes, and tiny JPEGs on disk."""
    rng = np.random.default_rng(seed)
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    images, anns = [], []
    for i in range(n_images):
        image_id = 100 + 7 * i  # ids unrelated to positions
        w, h = int(rng.integers(200, 400)), int(rng.integers(150, 300))
        name = f"{image_id:012d}.jpg"
        cv2.imwrite(str(images_dir / name), np.full((h, w, 3), 127, np.uint8))
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for _ in range(int(rng.integers(2, 7))):
            bw, bh = rng.uniform(8, w / 2), rng.uniform(8, h / 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(rng.choice(GAPPY_IDS)),
                         "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": f"c{k}"} for k, c in enumerate(GAPPY_IDS)]}
    ann_path = tmp_path / "instances.json"
    ann_path.write_text(json.dumps(data))
    return ann_path, images_dir, data


def _detections(data: dict, seed: int = 1, extra: int = 5) -> dict[int, Detections]:
    """Jittered copies of the ground truth (some with the wrong class) plus random false positives."""
    rng = np.random.default_rng(seed)
    index_of = {c: k for k, c in enumerate(GAPPY_IDS)}
    out = {}
    for image in data["images"]:
        rows = []
        for ann in (a for a in data["annotations"] if a["image_id"] == image["id"]):
            x, y, w, h = ann["bbox"]
            j = rng.normal(0, 0.08, 4) * [w, h, w, h]
            label = index_of[ann["category_id"]] if rng.random() > 0.2 else int(rng.integers(0, 8))
            rows.append([x + j[0], y + j[1], x + w + j[2], y + h + j[3], rng.uniform(0.05, 1.0), label])
        for _ in range(extra):
            x, y = rng.uniform(0, image["width"] - 20), rng.uniform(0, image["height"] - 20)
            rows.append([x, y, x + rng.uniform(5, 60), y + rng.uniform(5, 60), rng.uniform(0, 0.6),
                         int(rng.integers(0, 8))])
        out[image["id"]] = Detections.from_array(np.asarray(rows, np.float32))
    return out


def _direct_pycocotools(ann_path: Path, records: list[dict], image_ids: list[int]) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_path))
        e = COCOeval(gt, gt.loadRes(records), "bbox")
        e.params.imgIds = image_ids
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e


def test_matches_direct_pycocotools_with_gappy_category_ids(tmp_path: Path) -> None:
    ann_path, images_dir, data = _synthetic(tmp_path)
    dets = _detections(data)
    dataset = load_coco_dataset(ann_path, images_dir)
    spec = _spec(len(GAPPY_IDS), GAPPY_IDS)
    ours = evaluate_coco(dataset.coco, to_coco_results(dets, model_category_ids(spec)), dataset.image_ids)

    # The reference: hand-written xywh records with the index -> id lookup done independently.
    records = []
    for image_id, d in dets.items():
        rows = zip(d.boxes.tolist(), d.scores.tolist(), d.labels.tolist(), strict=True)
        for (x1, y1, x2, y2), s, lab in rows:
            records.append({"image_id": image_id, "category_id": GAPPY_IDS[lab],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    ref = _direct_pycocotools(ann_path, records, sorted(dets))
    assert [ours.stats[k] for k in STAT_NAMES] == pytest.approx(list(ref.stats), abs=1e-12)
    assert 0.05 < ours.stats["AP"] < 0.95  # a meaningful, non-degenerate score

    precision = ref.eval["precision"]
    for k, cat_id in enumerate(ref.params.catIds):
        p = precision[:, :, k, 0, -1]
        if (p > -1).any():
            assert ours.per_class_ap[cat_id] == pytest.approx(float(p[p > -1].mean()), abs=1e-12)
        else:  # no ground truth of this class in these images
            assert ours.per_class_ap[cat_id] is None
    assert ours.num_detections == len(records)


def test_subset_of_images_is_scored_alone(tmp_path: Path) -> None:
    ann_path, images_dir, data = _synthetic(tmp_path)
    dets = _detections(data)
    dataset = load_coco_dataset(ann_path, images_dir, limit=3)
    assert dataset.image_ids == sorted(i["id"] for i in data["images"])[:3]
    results = to_coco_results(dets, GAPPY_IDS)  # detections for all images; only 3 are scored
    ours = evaluate_coco(dataset.coco, results, dataset.image_ids)
    ref = _direct_pycocotools(ann_path, results, dataset.image_ids)
    assert [ours.stats[k] for k in STAT_NAMES] == pytest.approx(list(ref.stats), abs=1e-12)
    assert ours.num_images == 3


def test_results_keep_top_100_unrounded_scores_in_xywh() -> None:
    rng = np.random.default_rng(3)
    n = 150
    xy = rng.uniform(0, 100, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 50, (n, 2))], axis=1)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    dets = Detections(boxes, scores, rng.integers(0, 80, n))
    records = to_coco_results({5: dets}, COCO_CATEGORY_IDS)
    assert len(records) == 100
    kept = np.sort(dets.scores)[::-1][:100]
    assert [r["score"] for r in records] == [float(s) for s in kept]  # no 2-decimal rounding
    first = int(np.argmax(dets.scores))
    x1, y1, x2, y2 = dets.boxes[first].astype(np.float64)
    assert records[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    assert records[0]["category_id"] == COCO_CATEGORY_IDS[int(dets.labels[first])]


def test_class_index_maps_to_the_80_coco_category_ids() -> None:
    spec = _spec(80, list(COCO_CATEGORY_IDS), list(COCO_CLASS_NAMES))
    mapping = model_category_ids(spec)
    assert len(mapping) == 80 and mapping == sorted(mapping)
    labels = np.arange(80)
    dets = Detections(np.tile([10.0, 10.0, 20.0, 30.0], (80, 1)), np.linspace(1.0, 0.2, 80), labels)
    records = to_coco_results({1: dets}, mapping)
    by_label = {int(lab): r["category_id"] for lab, r in zip(labels, records, strict=True)}
    # The gaps in COCO's ids: 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are never produced.
    assert by_label[0] == 1 and by_label[11] == 13 and by_label[24] == 27 and by_label[79] == 90
    assert {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}.isdisjoint(by_label.values())
    assert COCO_CLASS_NAMES[11] == "stop sign"  # category 13 in instances_val2017.json
    # Without category_ids the index is the id itself.
    assert model_category_ids(_spec(3, None)) == [0, 1, 2]


def test_labels_outside_the_class_table_are_rejected() -> None:
    dets = Detections(np.zeros((1, 4)), [0.5], [8])
    with pytest.raises(ValueError, match="class index 8 outside 0..7"):
        to_coco_results({1: dets}, GAPPY_IDS)


def test_no_detections_scores_zero(tmp_path: Path) -> None:
    ann_path, images_dir, _ = _synthetic(tmp_path)
    dataset = load_coco_dataset(ann_path, images_dir)
    metrics = evaluate_coco(dataset.coco, [], dataset.image_ids)
    assert metrics.stats["AP"] == 0.0 and metrics.stats["AR100"] == 0.0


def test_model_classes_checked_against_annotations(tmp_path: Path) -> None:
    ann_path, images_dir, _ = _synthetic(tmp_path)
    dataset = load_coco_dataset(ann_path, images_dir)
    with pytest.raises(DatasetError, match="class count mismatch: .*num_classes=80.* 8 categories"):
        check_model_classes(_spec(80, list(COCO_CATEGORY_IDS)), dataset)
    with pytest.raises(DatasetError, match="identity .* no categories 0, 2, 4, 5, 6, 7.*set category_ids"):
        check_model_classes(_spec(8, None), dataset)
    assert check_model_classes(_spec(8, GAPPY_IDS), dataset) == []
    renamed = _spec(8, GAPPY_IDS, [f"c{i}" for i in range(7)] + ["zebra"])
    (warning,) = check_model_classes(renamed, dataset)
    assert "7:'zebra'->'c7'" in warning
