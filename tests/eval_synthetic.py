"""Synthetic COCO data and a fake backend patched into the evaluator for tests (no model, no shared data).

The fake "model file" is JSON: detection rows per image size ("HxW"), which identifies the image because
the synthetic images all differ in size.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from centernet_edge.eval import backends
from centernet_edge.runtime.detections import Detections
from centernet_edge.runtime.runners import RunnerBase, RunnerOptions, StageTimes
from centernet_edge.runtime.spec import GraphIO, ModelSpec, TensorInfo, official_preprocess, source_decode

GAPPY_IDS = [1, 3, 13, 27, 44, 67, 88, 90]
FAKE_BACKEND = "fake-json"


def write_dataset(root: Path, n_images: int = 8, seed: int = 0) -> tuple[Path, Path, dict[str, Any]]:
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    images, anns = [], []
    for i in range(n_images):
        image_id = 100 + 7 * i
        w, h = 200 + 13 * i, 150 + 11 * i  # unique sizes identify the images
        name = f"{image_id:012d}.png"
        cv2.imwrite(str(images_dir / name), np.full((h, w, 3), 40 + 20 * i, np.uint8))
        images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        for _ in range(int(rng.integers(2, 6))):
            bw, bh = rng.uniform(10, w / 2), rng.uniform(10, h / 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(rng.choice(GAPPY_IDS)),
                         "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": f"c{k}"} for k, c in enumerate(GAPPY_IDS)]}
    ann_path = root / "instances.json"
    ann_path.write_text(json.dumps(data))
    return ann_path, images_dir, data


def write_fake_model(path: Path, data: dict[str, Any], jitter: float, seed: int = 1) -> Path:
    """Ground-truth boxes jittered by ``jitter`` (relative), random scores, plus two false positives."""
    rng = np.random.default_rng(seed)
    index_of = {c: k for k, c in enumerate(GAPPY_IDS)}
    rows: dict[str, list[list[float]]] = {}
    for image in data["images"]:
        key = f"{image['height']}x{image['width']}"
        rows[key] = []
        for ann in (a for a in data["annotations"] if a["image_id"] == image["id"]):
            x, y, w, h = ann["bbox"]
            j = rng.normal(0, jitter, 4) * [w, h, w, h]
            rows[key].append([x + j[0], y + j[1], x + w + j[2], y + h + j[3], float(rng.uniform(0.4, 1.0)),
                              index_of[ann["category_id"]]])
        for _ in range(2):
            rows[key].append([5.0, 5.0, 40.0, 40.0, float(rng.uniform(0.0, 0.35)), int(rng.integers(0, 8))])
    path.write_text(json.dumps(rows))
    return path


def write_spec(path: Path, precision: str = "fp32", input_size: tuple[int, int] = (512, 512)) -> Path:
    spec = ModelSpec(
        name="fake", source="foreign", arch="json", num_classes=len(GAPPY_IDS),
        class_names=[f"c{k}" for k in range(len(GAPPY_IDS))],
        preprocess=official_preprocess(input_size=input_size), decode=source_decode("official"),
        graph=GraphIO(outputs={"detections": TensorInfo("detections", "float32", ["N", 100, 6])}),
        category_ids=GAPPY_IDS, provenance={"precision": precision, "params": 1_234_567, "macs": 8.5e9},
    ).validate()
    path.write_text(spec.to_json())
    return path


class FakeRunner(RunnerBase):
    backend = FAKE_BACKEND

    def __init__(self, model_path: Path, spec: ModelSpec, options: RunnerOptions) -> None:
        super().__init__()
        self.spec = spec
        self.precision = str(spec.provenance.get("precision", "fp32"))
        self.rows = json.loads(Path(model_path).read_text())
        self.keep_raw = options.keep_raw

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "providers": ["json"], "precision": self.precision}

    def run(self, images: Sequence[np.ndarray]) -> list[Detections]:
        out = []
        for image in images:
            rows = np.asarray(self.rows[f"{image.shape[0]}x{image.shape[1]}"], np.float32).reshape(-1, 6)
            out.append(Detections.from_array(rows))
        self._record(StageTimes(0.1, 1.0, 0.1, len(images)))
        if self.keep_raw:
            # A constant "heatmap" per model file, so heatmap agreement has something to compare.
            level = (sum(map(ord, json.dumps(self.rows)[:50])) % 7) / 10.0
            self.raw_outputs = {"heatmap": np.full((len(images), 8, 4, 4), level, np.float32)}
        return out


    def run_raw(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError("the fake backend has no graph input")


def install_fake_backend(monkeypatch: Any) -> None:
    """Make ``--backend fake-json`` known to the evaluator for one test (pytest's monkeypatch undoes it)."""
    real_open = backends.open_runner

    def open_runner(backend: str, model_path: Any, spec: Any = None, options: Any = None) -> Any:
        if backend == FAKE_BACKEND:
            return FakeRunner(Path(model_path), spec, options or RunnerOptions())
        return real_open(backend, model_path, spec, options)

    monkeypatch.setitem(backends.BACKENDS, FAKE_BACKEND, "JSON rows per image size (tests)")
    monkeypatch.setattr(backends, "open_runner", open_runner)
