"""On-disk cache of baseline runs, so comparing several candidates against one fp32 model runs it once.

The key covers everything that changes the baseline's detections: the model file's sha256, the dataset
fingerprint, the protocol (spec pre-processing/decode and evaluator settings), the backend and the image
limit. A hit restores the detections (clipped to their images, as scored): accuracy only. Latency is
never cached, since a time measured in another session (other load, other clocks) next to fresh ones
reads as a speed-up or slow-down that is not there. Raw heatmaps are not cached either (they are large),
so heatmap agreement is unavailable against a cached baseline.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from centernet_edge.runtime.atomic import atomic_path, atomic_write_text
from centernet_edge.runtime.detections import Detections

__all__ = ["CACHE_VERSION", "CachedRun", "ResultCache", "cache_key", "default_cache_dir"]

CACHE_VERSION = 2  # 2: boxes clipped to the image, no timings


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "centernet-edge" / "eval"


def cache_key(
    model_sha256: str, dataset_fingerprint: str, protocol: dict[str, Any], limit: int | None
) -> str:
    """Hex key for one (model, dataset, protocol, limit) combination."""
    blob = json.dumps(
        {"v": CACHE_VERSION, "model": model_sha256, "data": dataset_fingerprint, "protocol": protocol,
         "limit": limit},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class CachedRun:
    """What a baseline run leaves behind for reuse: detections per image and the runner description."""

    detections: dict[int, Detections]
    meta: dict[str, Any]


class ResultCache:
    """``<root>/<key>.npz`` (arrays) + ``<root>/<key>.json`` (meta); written atomically."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.npz", self.root / f"{key}.json"

    def load(self, key: str) -> CachedRun | None:
        arrays_path, meta_path = self._paths(key)
        if not (arrays_path.is_file() and meta_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            with np.load(arrays_path) as data:
                ids, counts = data["image_ids"], data["counts"]
                boxes, scores, labels = data["boxes"], data["scores"], data["labels"]
        except (OSError, ValueError, KeyError):
            return None  # a damaged entry is a miss, not an error: it is rewritten after the run
        detections: dict[int, Detections] = {}
        starts = np.concatenate([[0], np.cumsum(counts)])
        for image_id, lo, hi in zip(ids, starts[:-1], starts[1:], strict=True):
            detections[int(image_id)] = Detections(boxes[lo:hi], scores[lo:hi], labels[lo:hi])
        return CachedRun(detections, meta)

    def store(self, key: str, run: CachedRun) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        arrays_path, meta_path = self._paths(key)
        ids = sorted(run.detections)
        dets = [run.detections[i] for i in ids]
        arrays = {
            "image_ids": np.asarray(ids, dtype=np.int64),
            "counts": np.asarray([len(np.asarray(d.scores).reshape(-1)) for d in dets], dtype=np.int64),
            "boxes": np.concatenate([np.asarray(d.boxes, np.float32).reshape(-1, 4) for d in dets]
                                    or [np.zeros((0, 4), np.float32)]),
            "scores": np.concatenate([np.asarray(d.scores, np.float32).reshape(-1) for d in dets]
                                     or [np.zeros(0, np.float32)]),
            "labels": np.concatenate([np.asarray(d.labels, np.int64).reshape(-1) for d in dets]
                                     or [np.zeros(0, np.int64)]),
        }

        with atomic_path(arrays_path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        atomic_write_text(meta_path, json.dumps(run.meta, indent=2, default=str))
