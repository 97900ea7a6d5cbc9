"""Where calibration images come from: a folder, a list file or a COCO json, and which of them are used.

A calibration set is a fixed, ordered list of existing files plus a hash for provenance. The choice of
``num_images`` out of the candidates is seeded (``numpy.random.default_rng(seed)``) and made from the
name-sorted candidate list, so the same inputs give the same images in the same order on any machine.
Files that are listed but missing are reported, never fatal; files that exist but do not decode are
found later, when they are read (see :mod:`.images`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from centernet_edge.runtime.images import list_images, relative_name

from .provenance import dataset_hash

__all__ = [
    "CalibrationSet",
    "CalibrationSourceError",
    "list_coco",
    "list_file",
    "list_folder",
    "load_calibration_set",
    "select_images",
]

log = logging.getLogger("centernet_edge.calib_data")


class CalibrationSourceError(ValueError):
    """The calibration source is missing, empty or malformed."""


@dataclass(frozen=True)
class CalibrationSet:
    """The images to calibrate on, in feeding order, with what is needed to reproduce the choice."""

    paths: tuple[Path, ...]
    root: Path
    source: str
    seed: int
    num_candidates: int
    missing: tuple[str, ...]
    dataset_hash: str

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def names(self) -> list[str]:
        return [relative_name(p, self.root) for p in self.paths]

    def summary(self) -> dict[str, object]:
        return {
            "source": self.source,
            "num_candidates": self.num_candidates,
            "num_selected": len(self.paths),
            "num_missing": len(self.missing),
            "seed": self.seed,
            "dataset_hash": self.dataset_hash,
        }


def list_folder(folder: str | os.PathLike[str], recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (:func:`~centernet_edge.runtime.images.list_images`), as a calibration
    source."""
    try:
        return list_images(folder, recursive)
    except FileNotFoundError:
        raise CalibrationSourceError(f"calibration folder does not exist: {folder}") from None


def _split_existing(paths: list[Path], root: Path) -> tuple[list[Path], list[str]]:
    existing, missing, seen = [], [], set()
    for p in paths:
        key = relative_name(p, root)
        if key in seen:
            continue
        seen.add(key)
        (existing if p.is_file() else missing).append(p)
    if missing:
        log.warning("%d listed calibration image(s) do not exist, e.g. %s", len(missing), missing[0])
    return existing, [relative_name(p, root) for p in missing]


def list_file(list_path: str | os.PathLike[str]) -> tuple[list[Path], list[str]]:
    """Paths from a text file (one per line, relative to the file's folder; ``#`` comments, blanks skipped).

    Returns (existing files, names of missing ones).
    """
    path = Path(list_path)
    if not path.is_file():
        raise CalibrationSourceError(f"calibration list file does not exist: {path}")
    root = path.parent
    entries = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        entries.append(root / line)
    return _split_existing(entries, root)


def list_coco(annotation_json: str | os.PathLike[str], images_dir: str | os.PathLike[str] | None = None
              ) -> tuple[list[Path], list[str]]:
    """Images named in a COCO json's ``images[].file_name``; ``images_dir`` defaults to the json's folder."""
    path = Path(annotation_json)
    if not path.is_file():
        raise CalibrationSourceError(f"COCO annotation file does not exist: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        names = [str(img["file_name"]) for img in data["images"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CalibrationSourceError(
            f"{path.name} is not a COCO annotation file (needs images[].file_name): {exc}"
        ) from None
    root = Path(images_dir) if images_dir is not None else path.parent
    if not root.is_dir():
        raise CalibrationSourceError(f"COCO images folder does not exist: {root}")
    return _split_existing([root / n for n in names], root)


def select_images(paths: list[Path], num_images: int | None, seed: int) -> list[Path]:
    """A seeded choice of ``num_images`` out of ``paths`` (all of them, in the given order, when None)."""
    if num_images is None or num_images >= len(paths):
        return list(paths)
    if num_images <= 0:
        raise CalibrationSourceError(f"num_images must be positive; got {num_images}")
    picked = np.random.default_rng(seed).choice(len(paths), size=num_images, replace=False)
    return [paths[int(i)] for i in picked]


def load_calibration_set(
    source: str | os.PathLike[str],
    *,
    images_dir: str | os.PathLike[str] | None = None,
    num_images: int | None = None,
    seed: int = 0,
    recursive: bool = False,
) -> CalibrationSet:
    """Build a calibration set from a folder, a ``.json`` COCO annotation file or a list file."""
    src = Path(source)
    missing: list[str] = []
    if src.is_dir():
        kind, root, candidates = "folder", src, list_folder(src, recursive=recursive)
    elif src.suffix.lower() == ".json":
        kind = "coco"
        root = Path(images_dir) if images_dir is not None else src.parent
        candidates, missing = list_coco(src, images_dir)
    elif src.is_file():
        kind, root = "list", src.parent
        candidates, missing = list_file(src)
    else:
        raise CalibrationSourceError(f"calibration source does not exist: {src}")
    candidates = sorted(candidates, key=lambda p: relative_name(p, root))
    if not candidates:
        raise CalibrationSourceError(f"no calibration images found in {src}")
    chosen = select_images(candidates, num_images, seed)
    digest = dataset_hash(((relative_name(p, root), p.stat().st_size) for p in chosen), seed)
    log.info("calibration set: %d of %d image(s) from %s (%s), hash %s",
             len(chosen), len(candidates), src, kind, digest[:12])
    return CalibrationSet(
        paths=tuple(chosen), root=root, source=kind, seed=seed, num_candidates=len(candidates),
        missing=tuple(missing), dataset_hash=digest,
    )
