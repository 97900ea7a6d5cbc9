"""Check an exported graph against the PyTorch reference pipeline before anyone relies on it.

The graph runs in ONNX Runtime with its internal head tensors exposed (:func:`expose_heads`), the
reference is :class:`ReferenceDetector` (cv2 warp, PyTorch forward, upstream decode, numpy
back-projection). Per image we compare the heads (sigmoid heatmap, wh, reg) and the detections: ONNX rows
are matched to reference rows of the same class by IoU (or, for degenerate boxes, by coordinates), then
score and box errors are taken over the matches. A dynamic-batch graph is also run on a batch of two and
must reproduce its single-image results.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import torch
from torch import nn

from centernet_edge.export.torch_reference import ReferenceDetector
from centernet_edge.runtime.detections import Detections, box_iou
from centernet_edge.runtime.images import ReadReport, list_images, read_bgr
from centernet_edge.runtime.onnx_session import create_session
from centernet_edge.runtime.postprocess import finalize
from centernet_edge.runtime.preprocess import prepare_batch
from centernet_edge.runtime.runners import run_by_role
from centernet_edge.runtime.spec import ModelSpec

from .onnx_export import HEAD_NAMES, expose_heads

__all__ = ["ImageCheck", "Tolerances", "VerifyReport", "load_images", "synthetic_images", "verify_export",
           "match_detections"]



@dataclass(frozen=True)
class Tolerances:
    """Pass/fail limits. Head errors are ``max|onnx - ref| / max(1, max|ref|)`` (absolute for values
    within +-1 like the heatmap, relative for large ones like wh)."""

    head: float = 1e-3
    score: float = 1e-3
    box_px: float = 1.0
    min_matched: float = 0.97
    match_iou: float = 0.9


@dataclass
class ImageCheck:
    """Agreement of graph and reference on one image."""

    name: str
    size: tuple[int, int]
    head_err: dict[str, float] = field(default_factory=dict)
    n_ref: int = 0
    n_onnx: int = 0
    matched: float = 1.0
    score_err: float = 0.0
    box_err: float = 0.0


@dataclass
class VerifyReport:
    checks: list[ImageCheck]
    tolerances: Tolerances
    failures: list[str]
    batch_err: float | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def table(self) -> str:
        """A short fixed-width table, one row per image, then the verdict."""
        head = f"{'image':<22} {'size':>9} {'heatmap':>9} {'wh':>9} {'reg':>9} {'dets':>5} {'matched':>8} " \
               f"{'score_err':>9} {'box_err_px':>10}"
        lines = [head, "-" * len(head)]
        for c in self.checks:
            errs = [f"{c.head_err[r]:9.2e}" if r in c.head_err else f"{'-':>9}" for r in HEAD_NAMES]
            lines.append(f"{c.name[:22]:<22} {c.size[0]:>4}x{c.size[1]:<4} {' '.join(errs)} {c.n_onnx:>5} "
                         f"{c.matched:>8.1%} {c.score_err:>9.2e} {c.box_err:>10.2e}")
        t = self.tolerances
        if self.batch_err is not None:
            lines.append(f"batch of 2 vs single images: max abs difference {self.batch_err:.2e}")
        lines.append(f"tolerances: heads {t.head:g}, score {t.score:g}, box {t.box_px:g} px, "
                     f"matched >= {t.min_matched:.0%}")
        verdict = "verification PASSED" if self.passed else "verification FAILED: " + "; ".join(self.failures)
        lines.append(verdict)
        return "\n".join(lines)


# ---- images ---------------------------------------------------------------------------------------------


def synthetic_images(count: int = 3, seed: int = 0,
                     sizes: tuple[tuple[int, int], ...] = ((240, 320), (301, 187), (150, 226))
                     ) -> list[tuple[str, np.ndarray]]:
    """Deterministic BGR test images of different sizes: smooth gradients plus filled shapes and noise,
    so a wrong warp, colour order or normalisation shows up in the heads."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], axis=2)
        img = img + rng.normal(0, 12, img.shape)
        img = np.clip(img, 0, 255).astype(np.uint8)
        for _ in range(6):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
            x1, y1 = int(rng.integers(x0 + 4, w)), int(rng.integers(y0 + 4, h))
            if rng.random() < 0.5:
                cv2.rectangle(img, (x0, y0), (x1, y1), colour, -1)
            else:
                cv2.circle(img, ((x0 + x1) // 2, (y0 + y1) // 2), max(2, (x1 - x0) // 3), colour, -1)
        images.append((f"synthetic_{i}", img))
    return images


def load_images(directory: str | Path, limit: int | None = None,
                report: ReadReport | None = None) -> list[tuple[str, np.ndarray]]:
    """The first ``limit`` readable BGR images of a folder (sorted by name), read by the tools' one reader.

    Unreadable files are skipped and noted in ``report`` (a strict report raises instead).
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder does not exist: {folder}")
    report = report if report is not None else ReadReport()
    images = []
    for path in list_images(folder):
        if limit is not None and len(images) >= limit:
            break
        img = read_bgr(path, report, path.name)
        if img is not None:
            images.append((path.name, img))
    if not images:
        found = f" ({report.skip_line()})" if report.skipped else ""
        raise FileNotFoundError(f"no readable images in {folder}{found}")
    return images


# ---- comparison -----------------------------------------------------------------------------------------


def match_detections(ref: Detections, got: Detections, iou: float = 0.9, box_px: float = 1.0,
                     score_tol: float = 1e-3) -> tuple[float, float, float]:
    """(fraction of reference rows matched, max score error, max box error in px) over matches.

    Greedy in reference score order; a candidate must have the same class and IoU >= ``iou`` or all
    coordinates within ``box_px`` (zero-area boxes of untrained heads have no IoU). Unmatched rows
    scoring within ``score_tol`` of the graph's lowest kept score are boundary ties and count as matched.
    """
    if len(ref) == 0:
        return 1.0, 0.0, 0.0
    free = np.ones(len(got), dtype=bool)
    matched, score_err, box_err = 0, 0.0, 0.0
    # Rows tied with the graph's lowest kept score may be swapped for other equally scored peaks at the
    # top-K boundary; with equal scores either choice is correct, so they count as matched.
    floor = float(got.scores.min()) + score_tol if len(got) else -np.inf
    for i in np.argsort(-ref.scores, kind="stable"):
        cand = free & (got.labels == ref.labels[i])
        if not cand.any():
            matched += int(ref.scores[i] <= floor)
            continue
        idx = np.flatnonzero(cand)
        diff = np.abs(got.boxes[idx] - ref.boxes[i]).max(axis=1)
        ious = box_iou(ref.boxes[i], got.boxes[idx])[0]
        ok = (ious >= iou) | (diff <= box_px)
        if not ok.any():
            matched += int(ref.scores[i] <= floor)
            continue
        # Prefer the closest score among geometric matches: near-tied scores may swap order.
        choice = idx[ok][np.argmin(np.abs(got.scores[idx[ok]] - ref.scores[i]) + diff[ok] * 1e-6)]
        free[choice] = False
        matched += 1
        score_err = max(score_err, float(abs(got.scores[choice] - ref.scores[i])))
        box_err = max(box_err, float(np.abs(got.boxes[choice] - ref.boxes[i]).max()))
    return matched / len(ref), score_err, box_err


def _head_error(got: np.ndarray, ref: np.ndarray) -> float:
    if got.shape != ref.shape:
        return float("inf")
    return float(np.abs(got.astype(np.float64) - ref).max() / max(1.0, float(np.abs(ref).max())))


def _reference_spec(spec: ModelSpec) -> ModelSpec:
    # The torch model returns heatmap logits; the graph's spec describes its own (sigmoid) output.
    ref = copy.deepcopy(spec)
    ref.decode.heatmap_activation = "logits"
    return ref


def _run(session: Any, spec: ModelSpec, images: list[np.ndarray]
         ) -> tuple[dict[str, np.ndarray], list[Detections]]:
    batch, geoms = prepare_batch(images, spec)
    by_role = run_by_role(session, spec, batch)
    return by_role, finalize(by_role, spec, geoms)


def verify_export(
    model: onnx.ModelProto,
    torch_model: nn.Module,
    spec: ModelSpec,
    images: list[tuple[str, np.ndarray]],
    tolerances: Tolerances | None = None,
    threads: int | None = None,
) -> VerifyReport:
    """Run ``model`` (the ONNX about to be written) and the PyTorch reference on ``images``; compare."""
    tol = tolerances or Tolerances()
    session = create_session(expose_heads(model), threads=threads)
    reference = ReferenceDetector(torch_model.eval(), _reference_spec(spec))
    checks: list[ImageCheck] = []
    failures: list[str] = []
    singles: list[dict[str, np.ndarray]] = []
    for name, img in images:
        outputs, dets = _run(session, spec, [img])
        singles.append(outputs)
        with torch.no_grad():
            ref_heads = reference.forward_heads([img])
            ref_dets = reference.detect([img])[0]
        ref_heads["heatmap"] = 1.0 / (1.0 + np.exp(-ref_heads["heatmap"].astype(np.float64)))
        check = ImageCheck(name, (img.shape[0], img.shape[1]))
        for role in HEAD_NAMES:
            if role in outputs and role in ref_heads:
                check.head_err[role] = _head_error(outputs[role], ref_heads[role])
        got = dets[0]
        check.n_ref, check.n_onnx = len(ref_dets), len(got)
        check.matched, check.score_err, check.box_err = match_detections(
            ref_dets, got, tol.match_iou, tol.box_px, tol.score)
        checks.append(check)
        worst = max(check.head_err.values(), default=0.0)
        if not worst <= tol.head:
            failures.append(f"{name}: head error {worst:.2e} > {tol.head:g}")
        if check.matched < tol.min_matched:
            failures.append(f"{name}: only {check.matched:.1%} of reference detections matched")
        if check.score_err > tol.score:
            failures.append(f"{name}: score error {check.score_err:.2e} > {tol.score:g}")
        if check.box_err > tol.box_px:
            failures.append(f"{name}: box error {check.box_err:.2f} px > {tol.box_px:g}")

    batch_err = None
    if spec.graph.batch is None and images:
        # Same-size pair: the first image and a resized copy of the second (or itself).
        first = images[0][1]
        second = images[1][1] if len(images) > 1 else first
        second = cv2.resize(second, (first.shape[1], first.shape[0]), interpolation=cv2.INTER_AREA)
        pair_outputs, pair_dets = _run(session, spec, [first, second])
        solo_outputs, solo_dets = _run(session, spec, [second])
        batch_err = 0.0
        for role in HEAD_NAMES:
            if role in pair_outputs:
                for got, solo in ((pair_outputs[role][0], singles[0][role][0]),
                                  (pair_outputs[role][1], solo_outputs[role][0])):
                    batch_err = max(batch_err, _head_error(got, solo))
        # Detection rows are compared by matching: equal scores may legitimately swap places.
        solo_first = finalize(singles[0], spec, prepare_batch([first], spec)[1])[0]
        for got, solo in ((pair_dets[0], solo_first), (pair_dets[1], solo_dets[0])):
            frac, score_err, box_err = match_detections(solo, got, tol.match_iou, tol.box_px, tol.score)
            if frac < 1.0 or score_err > tol.score or box_err > tol.box_px:
                batch_err = max(batch_err, score_err, box_err / max(1.0, tol.box_px), 1.0 - frac)
        if batch_err > tol.head:
            failures.append(f"batch of 2 differs from single-image runs by {batch_err:.2e}")
    return VerifyReport(checks, tol, failures, batch_err)
