"""COCO annotations + image folder: loading, validation, and the checks against a model spec."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from centernet_edge.runtime.images import ReadReport, read_bgr
from centernet_edge.runtime.spec import ModelSpec

__all__ = ["CocoDataset", "DatasetError", "check_model_classes", "load_coco_dataset", "model_category_ids"]

_SHOWN = 10  # how many offending names an error message lists before summarising


class DatasetError(ValueError):
    """The annotations or image folder cannot be evaluated (or do not fit the model)."""


def _listing(names: list[Any]) -> str:
    shown = ", ".join(str(n) for n in names[:_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")


@dataclass
class CocoDataset:
    """The images one evaluation runs over (``image_ids``, sorted) and their ground truth (``coco``)."""

    ann_path: Path
    images_dir: Path
    coco: Any  # pycocotools.coco.COCO
    image_ids: list[int]
    fingerprint: str  # sha256 over the annotation bytes and the evaluated image names and sizes

    @property
    def category_ids(self) -> list[int]:
        return sorted(self.coco.cats)

    @property
    def category_names(self) -> dict[int, str]:
        return {cid: str(cat.get("name", cid)) for cid, cat in self.coco.cats.items()}

    def image_path(self, image_id: int) -> Path:
        return self.images_dir / self.coco.imgs[image_id]["file_name"]

    def load_image(self, image_id: int, report: ReadReport | None = None) -> np.ndarray | None:
        """The image as ``cv2.imread`` gives it, or ``None`` when unreadable (noted in ``report``; a strict
        report raises). Read by the same reader as calibration and export verification."""
        return read_bgr(self.image_path(image_id), report, self.coco.imgs[image_id]["file_name"])


def _read_json(ann_path: Path) -> dict[str, Any]:
    if ann_path.is_dir():
        found = sorted(p.name for p in ann_path.glob("*.json"))[:3]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise DatasetError(f"--ann {ann_path} is a directory; pass the COCO instances .json file inside it{hint}")
    try:
        data = json.loads(ann_path.read_bytes())
    except FileNotFoundError:
        raise DatasetError(f"annotation file not found: {ann_path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{ann_path.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_path.name} is not a COCO instances file: the top level is not an object")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DatasetError(
            f"{ann_path.name} is not a COCO instances file: missing or non-list {', '.join(missing)} "
            "(expected the layout of instances_val2017.json)"
        )
    return data


def _validate(data: dict[str, Any], name: str) -> None:
    cat_ids = [c.get("id") for c in data["categories"] if isinstance(c, dict)]
    if len(cat_ids) != len(data["categories"]) or not all(isinstance(c, int) for c in cat_ids):
        raise DatasetError(f"{name}: every category needs an integer 'id'")
    if len(set(cat_ids)) != len(cat_ids):
        raise DatasetError(f"{name}: duplicate category ids")
    for image in data["images"]:
        if not isinstance(image, dict) or not {"id", "file_name"} <= set(image):
            raise DatasetError(f"{name}: every image needs 'id' and 'file_name'")
    image_ids = {image["id"] for image in data["images"]}
    known_cats = set(cat_ids)
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            raise DatasetError(f"{name}: an annotation is not an object: {ann!r}")
        where = f"{name}: annotation {ann.get('id')}"
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise DatasetError(f"{where} has no xywh bbox")
        if ann.get("image_id") not in image_ids:
            raise DatasetError(f"{where} refers to unknown image {ann.get('image_id')}")
        if ann.get("category_id") not in known_cats:
            raise DatasetError(f"{where} has unknown category {ann.get('category_id')}")


def _fingerprint(ann_bytes: bytes, paths: list[Path]) -> str:
    digest = hashlib.sha256(ann_bytes)
    # Names and sizes, not pixels: hashing thousands of JPEGs per run would cost more than the eval.
    for path in paths:
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def load_coco_dataset(ann_path: str | Path, images_dir: str | Path, limit: int | None = None) -> CocoDataset:
    """Load and check a COCO instances file; ``limit`` keeps the first N images by id."""
    from pycocotools.coco import COCO

    ann_path, images_dir = Path(ann_path), Path(images_dir)
    data = _read_json(ann_path)
    _validate(data, ann_path.name)
    if not images_dir.is_dir():
        raise DatasetError(f"image folder not found: {images_dir}")
    if limit is not None and limit <= 0:
        raise DatasetError(f"--limit must be positive; got {limit}")
    if not data["images"]:
        raise DatasetError(f"{ann_path.name} lists no images")

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco.createIndex()
    image_ids = sorted(coco.imgs)[:limit] if limit else sorted(coco.imgs)
    if not coco.getAnnIds(imgIds=image_ids):
        which = f"the first {len(image_ids)} image(s) of {ann_path.name} have" if limit else f"{ann_path.name} has"
        raise DatasetError(f"{which} no annotations: no ground truth to score against")
    paths = [images_dir / coco.imgs[i]["file_name"] for i in image_ids]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} image(s) listed in {ann_path.name} are not in {images_dir}: {_listing(missing)}"
        )
    return CocoDataset(ann_path, images_dir, coco, image_ids, _fingerprint(ann_path.read_bytes(), paths))


def model_category_ids(spec: ModelSpec) -> list[int]:
    """Category id for each 0-based class index: ``spec.category_ids``, or the index itself when unset."""
    return list(spec.category_ids) if spec.category_ids is not None else list(range(spec.num_classes))


def check_model_classes(spec: ModelSpec, dataset: CocoDataset) -> list[str]:
    """Raise when the model's classes cannot be scored against these annotations; return soft warnings."""
    n_cats = len(dataset.category_ids)
    if spec.num_classes != n_cats:
        raise DatasetError(
            f"class count mismatch: model {spec.name!r} has num_classes={spec.num_classes}, "
            f"{dataset.ann_path.name} has {n_cats} categories"
        )
    mapped = model_category_ids(spec)
    unknown = [cid for cid in mapped if cid not in dataset.coco.cats]
    if unknown:
        how = "its category_ids" if spec.category_ids is not None else "identity (spec has no category_ids)"
        raise DatasetError(
            f"model {spec.name!r} maps class indices to category ids via {how}, but {dataset.ann_path.name} "
            f"has no categories {_listing(unknown)}; set category_ids in the model spec "
            f"(annotation ids: {_listing(dataset.category_ids)})"
        )
    names = dataset.category_names
    renamed = [
        f"{i}:{spec.class_names[i]!r}->{names[cid]!r}"
        for i, cid in enumerate(mapped)
        if spec.class_names[i].strip().lower() != names[cid].strip().lower()
    ]
    if renamed:
        return [f"model {spec.name!r} class names differ from the annotation categories: {_listing(renamed)}"]
    return []
