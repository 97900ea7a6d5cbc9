"""Streaming calibration batches: files -> BGR images -> exactly the graph input deployment builds.

Everything goes through :func:`centernet_edge.runtime.preprocess.prepare_batch` with the model's spec, so
calibration sees the same resize, colour order, normalisation and layout as inference. Images are read
lazily, one batch at a time: memory does not depend on how many images the set holds.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from centernet_edge.runtime.images import ReadReport, read_bgr, relative_name
from centernet_edge.runtime.preprocess import prepare_batch
from centernet_edge.runtime.spec import ModelSpec

from .sources import CalibrationSet

__all__ = ["effective_batch_size", "iter_batches", "iter_feeds", "iter_images", "num_batches"]

log = logging.getLogger("centernet_edge.calib_data")

PathLike = str | os.PathLike[str]


def _paths(images: CalibrationSet | Iterable[PathLike]) -> list[Path]:
    if isinstance(images, CalibrationSet):
        return list(images.paths)
    return [Path(p) for p in images]


def iter_images(images: CalibrationSet | Iterable[PathLike], report: ReadReport | None = None
                ) -> Iterator[tuple[Path, np.ndarray]]:
    """Yield ``(path, bgr_uint8)`` for every readable image; unreadable ones are skipped.

    With a ``report`` every skip is logged as a warning and noted there (under the name relative to a
    calibration set's root, so summaries carry no machine paths); without one (e.g. a second pass over
    the same files) skips are silent.
    """
    root = images.root if isinstance(images, CalibrationSet) else None
    for path in _paths(images):
        name = relative_name(path, root) if root is not None else str(path)
        img = read_bgr(path, report, name)
        if img is None:
            if report is not None:
                log.warning("skipping unreadable calibration image %s: %s", name, report.skip_reasons[name])
            continue
        yield path, img


def _fixed_input_size(spec: ModelSpec) -> bool:
    # Raw-image graphs take the original size and keep_res pads to a per-image size: neither can batch
    # images of different sizes, so only fixed-size network inputs allow batches larger than one.
    return spec.graph.preprocess != "warp" and spec.preprocess.resize != "keep_res"


def effective_batch_size(spec: ModelSpec, requested: int | None = None) -> int:
    """The batch size calibration can use: the graph's fixed batch, else ``requested`` (1 by default)."""
    fixed = spec.graph.batch
    if fixed is not None and requested is not None and requested != fixed:
        raise ValueError(f"the model has a fixed batch of {fixed}; cannot calibrate with batch {requested}")
    size = fixed if fixed is not None else (requested or 1)
    if size < 1:
        raise ValueError(f"batch size must be positive; got {size}")
    if size > 1 and not _fixed_input_size(spec):
        if fixed is not None:
            raise ValueError(
                f"the model has a fixed batch of {fixed} but its input size varies per image "
                f"(graph.preprocess={spec.graph.preprocess!r}, resize={spec.preprocess.resize!r})"
            )
        log.info("input size varies per image; calibrating one image at a time")
        size = 1
    return size


def num_batches(num_images: int, batch_size: int, drop_last: bool = False) -> int:
    return num_images // batch_size if drop_last else math.ceil(num_images / batch_size)


def iter_batches(
    images: CalibrationSet | Iterable[PathLike],
    spec: ModelSpec,
    batch_size: int = 1,
    *,
    report: ReadReport | None = None,
    drop_last: bool = False,
) -> Iterator[np.ndarray]:
    """Yield graph-input batches built by ``prepare_batch(images, spec)``.

    ``drop_last`` drops a final partial batch (needed when the graph's batch dimension is fixed):
    padding it with repeated images would bias the statistics.
    """
    pending: list[np.ndarray] = []
    for _, img in iter_images(images, report):
        pending.append(img)
        if len(pending) == batch_size:
            yield prepare_batch(pending, spec)[0]
            pending = []
    if pending:
        if drop_last:
            log.warning("dropping the last %d image(s): the graph needs batches of exactly %d",
                        len(pending), batch_size)
        else:
            yield prepare_batch(pending, spec)[0]


def iter_feeds(
    images: Sequence[PathLike] | CalibrationSet,
    spec: ModelSpec,
    batch_size: int | None = None,
    input_name: str | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """``{input_name: batch}`` dictionaries, the form Polygraphy and ONNX Runtime take."""
    name = input_name or spec.graph.input.name
    size = effective_batch_size(spec, batch_size)
    drop_last = spec.graph.batch is not None
    for batch in iter_batches(images, spec, size, report=ReadReport(), drop_last=drop_last):
        yield {name: batch}
