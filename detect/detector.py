"""``Detector("model.onnx")(images)``: detections for images, the shortest path from a model to boxes.

A thin layer over the runners (opened by :func:`centernet_edge.eval.backends.open_runner`, which picks the
backend by file extension): the model spec comes from the model's metadata (or ``model_spec=`` for a foreign
ONNX), files are read with the tools' one image reader (:func:`centernet_edge.runtime.images.read_bgr`, the
pixels ``cv2.imread`` gives), and the results are the runners' own :class:`Detections`, only filtered by
``score_threshold``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from centernet_edge.eval.backends import default_backend, open_runner, spec_for
from centernet_edge.runtime.detections import Detections
from centernet_edge.runtime.images import ReadReport, read_bgr
from centernet_edge.runtime.runners import Runner, RunnerOptions
from centernet_edge.runtime.spec import ModelSpec, SpecError

__all__ = ["DEFAULT_SCORE_THRESHOLD", "Detector", "ImageInput", "ImageReadError", "detection_records"]

DEFAULT_SCORE_THRESHOLD = 0.3
ImageInput = Union[str, "os.PathLike[str]", np.ndarray]


class ImageReadError(ValueError):
    """An image file given to a :class:`Detector` cannot be read or decoded."""


def _spec_for(model: Path, model_spec: str | os.PathLike[str] | ModelSpec | None, backend: str) -> ModelSpec | None:
    if isinstance(model_spec, ModelSpec):
        return model_spec.validate()
    if model_spec is None and backend != "ort":
        return None  # checkpoints and engines: their runners build or check their own spec
    try:
        return spec_for(model, backend, model_spec)
    except SpecError as exc:
        raise SpecError(f"{model.name}: {exc}") from None


def detection_records(dets: Detections, spec: ModelSpec) -> list[dict[str, Any]]:
    """JSON-ready rows: box (x1, y1, x2, y2, pixels), score, 0-based class index, class name and, when the
    spec has them, the dataset category id."""
    records = []
    for box, score, label in zip(dets.boxes.tolist(), dets.scores.tolist(), dets.labels.tolist(), strict=True):
        row: dict[str, Any] = {"box": [round(v, 2) for v in box], "score": round(score, 5), "class_index": label,
                               "class_name": spec.class_names[label] if 0 <= label < spec.num_classes else None}
        if spec.category_ids is not None and 0 <= label < spec.num_classes:
            row["category_id"] = spec.category_ids[label]
        records.append(row)
    return records


class Detector:
    """Run a CenterNet model on images.

    >>> with Detector("model.onnx", score_threshold=0.3) as detector:   # doctest: +SKIP
    ...     dets = detector(["a.jpg", "b.jpg"])[0]
    ...     print(dets.boxes, dets.scores, [detector.class_names[i] for i in dets.labels])

    model: an .onnx file (ONNX Runtime) or a checkpoint (.pth, PyTorch reference), or any file a registered
    backend handles. model_spec: a side-car description (JSON path or :class:`ModelSpec`) for an ONNX without
    an embedded spec. score_threshold: detections scoring below it are dropped (0 keeps all K).
    clip_boxes: clip boxes to the image, as the evaluator scores them (the runners, like upstream CenterNet,
    do not clip).
    providers/threads: ONNX Runtime execution providers ("cpu", "cuda", ...) and intra-op threads.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        model_spec: str | os.PathLike[str] | ModelSpec | None = None,
        score_threshold: float = DEFAULT_SCORE_THRESHOLD,
        clip_boxes: bool = False,
        backend: str | None = None,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}" if not path.exists()
                                    else f"model is not a file: {path}")
        if not 0.0 <= float(score_threshold) <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1]; got {score_threshold}")
        self.model_path = path
        self.score_threshold = float(score_threshold)
        self.clip_boxes = clip_boxes
        backend = backend or default_backend(path)
        options = RunnerOptions(providers=list(providers) if providers else None, threads=threads)
        self._runner: Runner | None = open_runner(backend, path, _spec_for(path, model_spec, backend), options)
        self.spec: ModelSpec = self._runner.spec

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.class_names)

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            raise RuntimeError(f"Detector for {self.model_path.name} is closed")
        return self._runner

    def _load(self, item: ImageInput, index: int) -> np.ndarray:
        if isinstance(item, np.ndarray):
            return item
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"image #{index} must be a path or a BGR uint8 array; got {type(item).__name__}")
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        report = ReadReport()
        image = read_bgr(path, report)
        if image is None:
            raise ImageReadError(f"cannot read image {path}: {report.skip_reasons.get(str(path), 'unreadable')}")
        return image

    def _images(self, images: ImageInput | Sequence[ImageInput]) -> list[np.ndarray]:
        if isinstance(images, (str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim == 3):
            images = [images]
        return [self._load(item, i) for i, item in enumerate(images)]

    def filter(self, dets: Detections, image_hw: tuple[int, int]) -> Detections:
        """Apply ``score_threshold`` (and ``clip_boxes``) to one image's raw detections."""
        keep = dets.scores >= self.score_threshold
        kept = Detections(dets.boxes[keep], dets.scores[keep], dets.labels[keep])
        return kept.clipped(*image_hw) if self.clip_boxes else kept

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detections of already-loaded BGR uint8 images, one :class:`Detections` per image."""
        raw = self.runner.run(list(images)) if len(images) else []
        return [self.filter(d, img.shape[:2]) for d, img in zip(raw, images, strict=True)]

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> list[Detections]:
        """Detections for a path, a BGR uint8 array, or a list of either: one :class:`Detections` per image,
        boxes in original-image pixels (x1, y1, x2, y2), best first."""
        return self.detect(self._images(images))

    def records(self, dets: Detections) -> list[dict[str, Any]]:
        """``dets`` as JSON-ready rows with class names (see :func:`detection_records`)."""
        return detection_records(dets, self.spec)

    def close(self) -> None:
        """Release the backend session (the detector cannot be used afterwards)."""
        if self._runner is not None:
            self._runner.close()
        self._runner = None

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._runner is None else self._runner.backend
        return f"Detector({self.model_path.name!r}, {self.spec.num_classes} classes, {state})"
