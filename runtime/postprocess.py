"""Graph outputs (keyed by role) -> per-image :class:`Detections` in original-image pixels.

Nothing is clipped to the image and no score threshold is applied: upstream CenterNet evaluates the raw
top-K boxes, and clipping would change AP relative to the published numbers.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .decode import Decoded, decode_numpy, decode_torch, project_boxes
from .detections import Detections
from .geometry import InputGeometry
from .spec import ModelSpec

__all__ = ["finalize", "heads_to_nchw"]


def heads_to_nchw(outputs: Mapping[str, np.ndarray], spec: ModelSpec, role: str) -> np.ndarray | None:
    """One raw head as (N, C, H, W) float32, transposed from NHWC when the spec's layout says so."""
    if role not in outputs or outputs[role] is None:
        return None
    arr = np.asarray(outputs[role], dtype=np.float32)
    if arr.ndim != 4:
        raise ValueError(f"output {role!r} must be 4-D; got shape {arr.shape}")
    info = spec.graph.outputs.get(role)
    if info is not None and info.layout == "NHWC":
        arr = arr.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(arr)


def heatmap_probabilities(raw: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """A raw heatmap output as NCHW probabilities (layout and activation taken from the spec)."""
    heat = heads_to_nchw({"heatmap": raw}, spec, "heatmap")
    if spec.decode.heatmap_activation == "logits":
        heat = 1.0 / (1.0 + np.exp(-heat))
    return heat


def _from_detections(dets: np.ndarray, spec: ModelSpec, geoms: list[InputGeometry]) -> list[Detections]:
    dets = np.asarray(dets, dtype=np.float32)
    if dets.ndim == 2:  # a batch-less [K, 6] graph output
        dets = dets[None]
    if dets.ndim != 3 or dets.shape[2] < 6:
        raise ValueError(f"detections output must be [N, K, 6]; got shape {dets.shape}")
    if len(dets) != len(geoms):
        raise ValueError(f"detections hold {len(dets)} images but {len(geoms)} geometries were given")
    results = []
    for rows, geom in zip(dets, geoms, strict=True):
        boxes = rows[:, 0:4]
        if spec.graph.detections_frame == "network_input":
            boxes = project_boxes(boxes, geom, spec.decode, frame="network_input")
        results.append(Detections(boxes, rows[:, 4], rows[:, 5]))
    return results


def _from_heads(
    outputs: Mapping[str, np.ndarray], spec: ModelSpec, geoms: list[InputGeometry], backend: str
) -> list[Detections]:
    heatmap = heads_to_nchw(outputs, spec, "heatmap")
    wh = heads_to_nchw(outputs, spec, "wh")
    if heatmap is None or wh is None:
        raise ValueError("outputs hold neither 'detections' nor both raw heads 'heatmap' and 'wh'")
    reg = heads_to_nchw(outputs, spec, "reg") if spec.decode.reg_offset else None
    if len(heatmap) != len(geoms):
        raise ValueError(f"heads hold {len(heatmap)} images but {len(geoms)} geometries were given")
    if backend == "numpy":
        decoded = decode_numpy(heatmap, wh, reg, spec.decode)
    elif backend == "torch":
        t = decode_torch(heatmap, wh, reg, spec.decode)
        decoded = Decoded(t.boxes.numpy(), t.scores.numpy(), t.classes.numpy())
    else:
        raise ValueError(f"backend must be 'numpy' or 'torch'; got {backend!r}")
    return [
        Detections(project_boxes(decoded.boxes[i], geom, spec.decode, frame="output"),
                   decoded.scores[i], decoded.classes[i])
        for i, geom in enumerate(geoms)
    ]


def finalize(
    outputs: Mapping[str, np.ndarray],
    spec: ModelSpec,
    geoms: list[InputGeometry],
    backend: str = "numpy",
) -> list[Detections]:
    """Detections per image from graph outputs keyed by role (detections / heatmap / wh / reg).

    A 'detections' output ([N, K, 6] rows x1, y1, x2, y2, score, class_index) wins when present; its
    boxes are mapped from the network input when ``graph.detections_frame`` is 'network_input' and
    taken as-is when 'original'. Otherwise the raw heads are decoded (``backend`` numpy or torch) and
    back-projected per ``spec.decode``. Heads are sigmoid-ed only when ``decode.heatmap_activation`` is
    'logits'.
    """
    if "detections" in outputs and outputs["detections"] is not None:
        return _from_detections(outputs["detections"], spec, geoms)
    return _from_heads(outputs, spec, geoms, backend)
