"""Check an exported graph against the PyTorch reference pipeline before anyone relies on it.

The graph runs in ONNX Runtime with its internal head tensors exposed (:func:`expose_heads`). The
reference is :class:`ReferenceDetector` (cv2 warp, PyTorch forward, upstream decode, numpy
back-projection), run twice on the same network inputs: in float32 as exported, and on a float64 copy of
the same weights. The float64 run is the exact answer for these weights and inputs; the float32 run's
distance from it is this model's *noise floor*, what float32 arithmetic alone costs. Both depend on the
weights (trained DCN offsets, large activations) and on the inputs, so they are measured per model and per
image instead of assumed.

The verdict is taken on detections, not on head errors (those are reported next to the floor): ONNX
rows are matched to the float64 rows of the same class by IoU (or, for degenerate boxes, by coordinates)
and matched rows must agree within the score and box tolerances. A row may stay unmatched only where the
float64 scores say the decision is a near-tie that float32 noise can flip (see :func:`compare_detections`).
A dynamic-batch graph is also run on a batch of two and must reproduce its single-image results.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import torch
from torch import nn

from centernet_edge.export.torch_reference import ReferenceDetector
from centernet_edge.runtime.decode import project_boxes
from centernet_edge.runtime.detections import Detections, box_iou
from centernet_edge.runtime.geometry import InputGeometry
from centernet_edge.runtime.images import ReadReport, list_images, read_bgr
from centernet_edge.runtime.onnx_session import create_session
from centernet_edge.runtime.postprocess import finalize
from centernet_edge.runtime.preprocess import prepare_batch
from centernet_edge.runtime.runners import run_by_role
from centernet_edge.runtime.spec import ModelSpec

from .onnx_export import HEAD_NAMES, expose_heads

__all__ = ["DetectionAgreement", "ImageCheck", "Tolerances", "VerifyReport", "compare_detections", "load_images",
           "tied_peaks",
           "synthetic_images", "verify_export", "match_detections"]

# Rounding the float64 reference scores to float32 (its decode runs in float32) moves a probability by at
# most half an ulp of 1.0; the tie band always covers that.
_FLOAT32_ULP = float(np.spacing(np.float32(1.0)))


@dataclass(frozen=True)
class Tolerances:
    """Pass/fail limits, all on detections.

    score, box_px: largest score / box-corner (pixel) difference of a matched detection.
    min_matched: fraction of the float64 reference's detections that must be matched or explained by a
    near-tie (default all of them).
    batch: largest difference between a batch of two and single-image runs of the same graph.
    head: optional extra limit on the head errors (off by default: they are reported against the
    model's noise floor; ``max|onnx - ref| / max(1, max|ref|)``, absolute for the heatmap, relative for wh).
    """

    score: float = 1e-3
    box_px: float = 1.0
    min_matched: float = 1.0
    match_iou: float = 0.9
    batch: float = 1e-3
    head: float | None = None


@dataclass
class ImageCheck:
    """Agreement of graph and float64 reference on one image.

    head_err: graph vs float64 reference per head; noise_floor: float32 PyTorch vs float64 per head;
    tie_band: score difference below which the float64 reference calls two candidates tied.
    """

    name: str
    size: tuple[int, int]
    head_err: dict[str, float] = field(default_factory=dict)
    noise_floor: dict[str, float] = field(default_factory=dict)
    n_ref: int = 0
    n_onnx: int = 0
    matched: float = 1.0
    tied: float = 0.0
    unexplained_onnx: int = 0
    score_err: float = 0.0
    box_err: float = 0.0
    tie_band: float = 0.0


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
        head = f"{'image':<20} {'size':>9} " + " ".join(f"{r + ' err/floor':>19}" for r in HEAD_NAMES) + \
               f" {'dets':>5} {'matched':>8} {'tied':>5} {'score_err':>9} {'box_err_px':>10}"
        lines = [head, "-" * len(head)]
        for c in self.checks:
            errs = [f"{c.head_err[r]:9.2e}/{c.noise_floor.get(r, float('nan')):<9.2e}" if r in c.head_err
                    else f"{'-':>19}" for r in HEAD_NAMES]
            lines.append(f"{c.name[:20]:<20} {c.size[0]:>4}x{c.size[1]:<4} {' '.join(errs)} {c.n_onnx:>5} "
                         f"{c.matched:>8.1%} {c.tied:>5.0%} {c.score_err:>9.2e} {c.box_err:>10.2e}")
        t = self.tolerances
        lines.append("head err: ONNX vs the float64 reference; floor: float32 PyTorch vs float64 (reported, "
                     "not a verdict)")
        if self.checks:
            band = max(c.tie_band for c in self.checks)
            lines.append(f"tie band (scores this close count as tied): up to {band:.2e}")
        if self.batch_err is not None:
            lines.append(f"batch of 2 vs single images: max abs difference {self.batch_err:.2e}")
        extra = f", heads {t.head:g}" if t.head is not None else ""
        lines.append(f"tolerances: score {t.score:g}, box {t.box_px:g} px, matched or tied >= {t.min_matched:.0%}"
                     f"{extra}")
        verdict = "verification PASSED" if self.passed else "verification FAILED: " + "; ".join(self.failures)
        lines.append(verdict)
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        """The numbers worth keeping with the artifact (worst case over the images)."""
        def worst(attr: str) -> dict[str, float]:
            out: dict[str, float] = {}
            for c in self.checks:
                for role, v in getattr(c, attr).items():
                    out[role] = max(out.get(role, 0.0), float(v))
            return out

        return {
            "passed": self.passed,
            "images": len(self.checks),
            "head_error_vs_float64": worst("head_err"),
            "noise_floor_float32_vs_float64": worst("noise_floor"),
            "matched": min((c.matched for c in self.checks), default=1.0),
            "tied": max((c.tied for c in self.checks), default=0.0),
            "score_error": max((c.score_err for c in self.checks), default=0.0),
            "box_error_px": max((c.box_err for c in self.checks), default=0.0),
        }


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


def _match(ref: Detections, got: Detections, iou: float, box_px: float
           ) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """Greedy one-to-one matching in reference score order: (pairs (ref, got), unmatched ref, unmatched got).

    A candidate must have the same class and IoU >= ``iou`` or all coordinates within ``box_px``
    (zero-area boxes of untrained heads have no IoU); among those the closest score wins, since
    near-tied scores may swap order.
    """
    free = np.ones(len(got), dtype=bool)
    pairs: list[tuple[int, int]] = []
    lost: list[int] = []
    for i in np.argsort(-ref.scores, kind="stable"):
        idx = np.flatnonzero(free & (got.labels == ref.labels[i]))
        if len(idx):
            diff = np.abs(got.boxes[idx] - ref.boxes[i]).max(axis=1)
            ok = (box_iou(ref.boxes[i], got.boxes[idx])[0] >= iou) | (diff <= box_px)
            if ok.any():
                choice = idx[ok][np.argmin(np.abs(got.scores[idx[ok]] - ref.scores[i]) + diff[ok] * 1e-6)]
                free[choice] = False
                pairs.append((int(i), int(choice)))
                continue
        lost.append(int(i))
    return pairs, np.array(lost, dtype=np.int64), np.flatnonzero(free)


def _errors(ref: Detections, got: Detections, pairs: list[tuple[int, int]]) -> tuple[float, float]:
    if not pairs:
        return 0.0, 0.0
    r, g = np.array(pairs).T
    return (float(np.abs(got.scores[g] - ref.scores[r]).max()),
            float(np.abs(got.boxes[g] - ref.boxes[r]).max()))


def match_detections(ref: Detections, got: Detections, iou: float = 0.9, box_px: float = 1.0,
                     score_tol: float = 1e-3) -> tuple[float, float, float]:
    """(fraction of reference rows matched, max score error, max box error in px) over matches.

    Unmatched rows scoring within ``score_tol`` of the graph's lowest kept score are boundary ties and
    count as matched (used to compare two runs of the same graph, where only the top-K boundary can swap).
    """
    if len(ref) == 0:
        return 1.0, 0.0, 0.0
    pairs, lost, _ = _match(ref, got, iou, box_px)
    floor = float(got.scores.min()) + score_tol if len(got) else -np.inf
    matched = len(pairs) + int(np.count_nonzero(ref.scores[lost] <= floor))
    return (matched / len(ref), *_errors(ref, got, pairs))


@dataclass
class DetectionAgreement:
    """How one image's graph detections agree with the float64 reference's.

    matched: fraction of reference rows with a graph row of the same class and box; tied: fraction of
    reference rows unmatched but explained by a near-tie; unexplained_got: graph rows neither matched nor
    explained.
    """

    matched: float
    tied: float
    unexplained_got: int
    score_err: float
    box_err: float


def _neighbour_max(heat: np.ndarray, kernel: int) -> np.ndarray:
    """Max over each cell's kernel x kernel window without the cell itself (outside is -inf)."""
    pad = (kernel - 1) // 2
    c, h, w = heat.shape
    padded = np.full((c, h + 2 * pad, w + 2 * pad), -np.inf)
    padded[:, pad:pad + h, pad:pad + w] = heat
    out = np.full(heat.shape, -np.inf)
    for dy in range(kernel):
        for dx in range(kernel):
            if (dy, dx) != (pad, pad):
                np.maximum(out, padded[:, dy:dy + h, dx:dx + w], out=out)
    return out


def tied_peaks(heads: dict[str, np.ndarray], spec: ModelSpec, geom: InputGeometry, tie_band: float) -> Detections:
    """Cells whose peak decision is a near-tie in ``heads`` (one image, float64 probabilities).

    A cell is a peak when no neighbour in the peak window scores higher; when the cell and its best
    neighbour are within ``tie_band``, noise may make it a peak or not. Returned as detections (boxes from
    the cell's own wh/reg, in original pixels) so graph rows can be compared with them geometrically.
    """
    heat = heads["heatmap"][0].astype(np.float64)
    decode = spec.decode
    cls, ys, xs = np.nonzero(np.abs(heat - _neighbour_max(heat, decode.peak_kernel)) <= tie_band)
    wh = heads["wh"][0].astype(np.float64)
    if decode.reg_offset and "reg" in heads:
        cx, cy = xs + heads["reg"][0, 0, ys, xs], ys + heads["reg"][0, 1, ys, xs]
    else:
        cx, cy = xs + 0.5, ys + 0.5
    half_w, half_h = wh[0, ys, xs] / 2, wh[1, ys, xs] / 2
    boxes = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)
    return Detections(project_boxes(boxes, geom, decode, frame="output"), heat[cls, ys, xs].astype(np.float32),
                      cls.astype(np.int64))


def compare_detections(ref: Detections, got: Detections, tie_band: float, tied: Detections | None = None,
                       iou: float = 0.9, box_px: float = 1.0) -> DetectionAgreement:
    """Match ``got`` (the graph) to ``ref`` (the float64 reference) and explain the leftovers by ties.

    A CenterNet detection is the outcome of comparisons between scores: the peak test keeps a cell only if
    no neighbour scores higher, and top-K keeps the K best peaks. When two candidates' exact scores are
    closer than the computations' errors, either outcome is correct; with random or weakly trained heads
    such near-ties are common (smooth plateaus, e.g. where the warp's border makes features constant). If
    the graph's probabilities are within ``e`` of the exact ones, a comparison can only flip between
    candidates whose exact scores differ by at most ``2e``; ``tie_band`` is that bound. So a row left
    unmatched on either side is explained when

    * it is at the top-K boundary: its score is within the band of the reference's lowest kept score, so
      another boundary candidate may take its place; or
    * its cell's peak decision is a near-tie: it matches (same class, same box) one of ``tied``, the cells
      :func:`tied_peaks` found within the band of their best neighbour. A peak then moves to, vanishes
      into, or is duplicated on (exactly equal float32 neighbours both survive, as upstream) a neighbour.

    Everything else must match one to one; score and box errors are taken over the matches.
    """
    if len(ref) == 0:
        return DetectionAgreement(1.0, 0.0, len(got), 0.0, 0.0)
    pairs, lost, extra = _match(ref, got, iou, box_px)
    boundary = float(ref.scores.min()) + tie_band
    fragile = tied if tied is not None else Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                                                        np.zeros(0, np.int64))

    def explained(side: Detections, rows: np.ndarray) -> np.ndarray:
        ok = side.scores[rows] <= boundary
        for j, row in enumerate(rows):
            if not ok[j]:
                idx = np.flatnonzero(fragile.labels == side.labels[row])
                if len(idx):
                    diff = np.abs(fragile.boxes[idx] - side.boxes[row]).max(axis=1)
                    ok[j] = bool(np.any((box_iou(side.boxes[row], fragile.boxes[idx])[0] >= iou) | (diff <= box_px)))
        return ok

    lost_ok = explained(ref, lost)
    extra_ok = explained(got, extra)
    score_err, box_err = _errors(ref, got, pairs)
    return DetectionAgreement(len(pairs) / len(ref), int(lost_ok.sum()) / len(ref),
                              int(np.count_nonzero(~extra_ok)), score_err, box_err)


def _head_error(got: np.ndarray, ref: np.ndarray) -> float:
    if got.shape != ref.shape:
        return float("inf")
    return float(np.abs(got.astype(np.float64) - ref).max() / max(1.0, float(np.abs(ref).max())))


def _probabilities(heads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # The reference heatmap is logits; compare probabilities (what scores are), in float64.
    out = dict(heads)
    out["heatmap"] = 1.0 / (1.0 + np.exp(-heads["heatmap"].astype(np.float64)))
    return out


@contextmanager
def _float64(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` converted to float64 in place, restored afterwards.

    float32 -> float64 -> float32 is exact, so the caller's model comes back bit-identical, and no second
    copy of the weights is held (hourglass_104 has ~190M parameters).
    """
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    model.double()
    try:
        yield model
    finally:
        model.to(dtype)


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
    """Run ``model`` (the ONNX about to be written) and the PyTorch reference on ``images``; compare.

    The reference runs in float32 and on a float64 copy of the same weights (module docstring); the
    verdict is on detections against the float64 run, with near-ties judged by :func:`compare_detections`.
    """
    tol = tolerances or Tolerances()
    session = create_session(expose_heads(model), threads=threads)
    ref_spec = _reference_spec(spec)
    torch_model.eval()
    onnx_runs: list[tuple[dict[str, np.ndarray], Detections]] = []
    floats32: list[dict[str, np.ndarray]] = []
    reference32 = ReferenceDetector(torch_model, ref_spec)
    for _, img in images:
        outputs, dets = _run(session, spec, [img])
        onnx_runs.append((outputs, dets[0]))
        floats32.append(_probabilities(reference32.forward_heads([img])))
    exact: list[tuple[dict[str, np.ndarray], Detections, InputGeometry]] = []
    with _float64(torch_model) as model64:
        reference64 = ReferenceDetector(model64, ref_spec)
        for _, img in images:
            heads, dets = reference64.heads_and_detections([img])
            exact.append((_probabilities(heads), dets[0], reference64.preprocess([img])[1][0]))

    checks: list[ImageCheck] = []
    failures: list[str] = []
    for (name, img), (outputs, got), heads32, (heads64, ref_dets, geom) in zip(images, onnx_runs, floats32,
                                                                            exact, strict=True):
        check = ImageCheck(name, (img.shape[0], img.shape[1]))
        for role in HEAD_NAMES:
            if role in heads64:
                check.noise_floor[role] = _head_error(heads32[role], heads64[role])
                if role in outputs:
                    check.head_err[role] = _head_error(outputs[role], heads64[role])
        # The graph's own distance e from the exact heatmap bounds which comparisons it may flip (exact
        # gaps up to 2e: see compare_detections), never taken below PyTorch's float32 floor, and capped
        # at the score tolerance so that a broken graph cannot widen the band beyond differences already
        # accepted on matched rows.
        heat_err = check.head_err.get("heatmap", check.noise_floor.get("heatmap", 0.0))
        check.tie_band = 2.0 * max(check.noise_floor.get("heatmap", 0.0), min(heat_err, tol.score)) + _FLOAT32_ULP
        check.n_ref, check.n_onnx = len(ref_dets), len(got)
        tied = tied_peaks(heads64, ref_spec, geom, check.tie_band)
        agreement = compare_detections(ref_dets, got, check.tie_band, tied, tol.match_iou, tol.box_px)
        check.matched, check.tied = agreement.matched, agreement.tied
        check.unexplained_onnx = agreement.unexplained_got
        check.score_err, check.box_err = agreement.score_err, agreement.box_err
        checks.append(check)
        if check.matched + check.tied < tol.min_matched:
            failures.append(f"{name}: only {check.matched + check.tied:.1%} of reference detections matched "
                            f"or tied")
        if check.unexplained_onnx:
            failures.append(f"{name}: {check.unexplained_onnx} detection(s) the reference does not have")
        if check.score_err > tol.score:
            failures.append(f"{name}: score error {check.score_err:.2e} > {tol.score:g}")
        if check.box_err > tol.box_px:
            failures.append(f"{name}: box error {check.box_err:.2f} px > {tol.box_px:g}")
        worst = max(check.head_err.values(), default=0.0)
        if tol.head is not None and not worst <= tol.head:
            failures.append(f"{name}: head error {worst:.2e} > {tol.head:g}")
    singles = [outputs for outputs, _ in onnx_runs]

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
        if batch_err > tol.batch:
            failures.append(f"batch of 2 differs from single-image runs by {batch_err:.2e}")
    return VerifyReport(checks, tol, failures, batch_err)
