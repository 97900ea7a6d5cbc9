"""Shared helpers for the C-library tests: a built library, tiny exportable networks, parity checks."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from centernet_edge.runtime.detections import Detections


class TinyHeads(nn.Module):
    """A small stride-4 'CenterNet': image -> (heatmap logits, wh, reg), random but fixed weights.

    Peaks come from the image content, so real photos give realistic, varied heatmaps.
    """

    def __init__(self, num_classes: int = 6, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.body = nn.Conv2d(3, 8, 4, stride=4)
        self.hm = nn.Conv2d(8, num_classes, 3, padding=1)
        self.wh = nn.Conv2d(8, 2, 1)
        self.reg = nn.Conv2d(8, 2, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = torch.relu(self.body(x))
        return self.hm(f) * 3.0 - 2.0, torch.abs(self.wh(f)) * 8.0, torch.sigmoid(self.reg(f))


def c_to_detections(rows: np.ndarray) -> Detections:
    boxes = np.stack([rows["x1"], rows["y1"], rows["x2"], rows["y2"]], axis=1)
    return Detections(boxes, rows["score"], rows["class_id"])


def assert_same_detections(got: Detections, want: Detections, box_tol: float = 1e-3,
                           score_tol: float = 1e-6, what: str = "") -> None:
    """Identical count, order and classes; boxes within box_tol px, scores within score_tol."""
    assert len(got) == len(want), f"{what}: {len(got)} rows vs {len(want)}"
    np.testing.assert_array_equal(got.labels, want.labels, err_msg=f"{what}: classes/order differ")
    np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=score_tol, err_msg=f"{what}: scores")
    np.testing.assert_allclose(got.boxes, want.boxes, rtol=0, atol=box_tol, err_msg=f"{what}: boxes")
