"""The accuracy report: one row per model x backend x precision, as Markdown and as JSON.

Deltas are against the baseline row. A row whose protocol (input geometry, decode) differs from the
baseline's is still given its delta, but flagged: that delta mixes protocol and precision effects
(REFERENCE §1.7), and the protocol section says which settings differ.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from centernet_edge.runtime.atomic import atomic_write_text
from centernet_edge.runtime.spec import toolkit_version

from .evaluate import EvaluationResult, ModelRun, input_mode, protocol_differences, protocol_of

__all__ = [
    "REPORT_FORMAT",
    "ReportRow",
    "build_report",
    "format_delta",
    "format_pct",
    "render_markdown",
    "write_report",
]

REPORT_FORMAT = "centernet-edge-eval-report/1"
MISMATCH_MARK = "⚠"
_PER_CLASS_SHOWN = 5
_FEW_IMAGES = 500


def format_pct(value: float | None) -> str:
    """A percentage; ``n/a`` where COCO has nothing to score (e.g. AP_L without large ground truth)."""
    return "n/a" if value is None else f"{value:.1f}"


def format_delta(value: float | None, mismatch: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.2f}" + (f" {MISMATCH_MARK}" if mismatch else "")


def _format_count(value: Any, unit: str) -> str:
    """12345678 -> '12.3M'; strings pass through (a spec may already say '8.7 GFLOPs')."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    number = float(value)
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= scale:
            return f"{number / scale:.2f}{suffix}{unit}"
    return f"{number:g}{unit}"


def _provenance_number(provenance: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if provenance.get(key) is not None:
            value = provenance[key]
            return value * 1e9 if key.startswith("g") and not isinstance(value, str) else value
    return None


@dataclass
class ReportRow:
    """One model x backend x precision. AP values are percentages (COCO stat x 100), unrounded."""

    model: str
    spec_name: str
    model_file: str
    model_sha256: str
    backend: str
    providers: list[str]
    precision: str
    is_baseline: bool
    stats: dict[str, float | None]  # all 12 COCO stats, percent (None: no ground truth of that kind)
    ap: float | None
    ap50: float | None
    ap_small: float | None
    ap_medium: float | None
    ap_large: float | None
    delta_ap: float | None
    delta_ap50: float | None
    protocol: dict[str, Any]
    protocol_mismatch: list[str]
    input: str
    params: Any  # from spec.provenance when the exporter recorded it
    flops: Any
    macs: Any
    latency: dict[str, Any] | None
    agreement: dict[str, Any] | None
    per_class_ap: dict[str, float | None]  # category id -> AP percent (None: no ground truth)
    cached: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def comparable(self) -> bool:
        return not self.protocol_mismatch


def _percent(stats: dict[str, float]) -> dict[str, float | None]:
    # pycocotools writes -1 where there is no ground truth of that kind (e.g. no large objects).
    return {k: v * 100.0 if v >= 0 else None for k, v in stats.items()}


def _difference(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def _row(run: ModelRun, base: ModelRun | None, clip_boxes: bool = True) -> ReportRow:
    assert run.metrics is not None and run.entry.spec is not None
    spec = run.entry.spec
    stats = _percent(run.metrics.stats)
    protocol = protocol_of(spec, clip_boxes)
    mismatch: list[str] = []
    delta_ap = delta_ap50 = None
    if base is not None:
        assert base.metrics is not None and base.entry.spec is not None
        base_stats = _percent(base.metrics.stats)
        # Difference of the reported percentages, so it equals what two separate reports would give.
        delta_ap = _difference(stats["AP"], base_stats["AP"])
        delta_ap50 = _difference(stats["AP50"], base_stats["AP50"])
        mismatch = protocol_differences(protocol, protocol_of(base.entry.spec, clip_boxes))
    latency = run.latency
    precision = str(run.runner_info.get("precision") or run.entry.precision)
    return ReportRow(
        model=run.entry.label,
        spec_name=spec.name,
        model_file=run.entry.model_path.name,
        model_sha256=run.entry.sha256,
        backend=run.entry.backend,
        providers=list(run.runner_info.get("providers", [])),
        precision=precision,
        is_baseline=base is None,
        stats=stats,
        ap=stats["AP"],
        ap50=stats["AP50"],
        ap_small=stats["APs"],
        ap_medium=stats["APm"],
        ap_large=stats["APl"],
        delta_ap=delta_ap,
        delta_ap50=delta_ap50,
        protocol=protocol,
        protocol_mismatch=mismatch,
        input=input_mode(spec),
        params=_provenance_number(spec.provenance, "params", "num_params"),
        flops=_provenance_number(spec.provenance, "flops", "gflops"),
        macs=_provenance_number(spec.provenance, "macs", "gmacs"),
        latency=latency.to_dict() if latency else None,
        agreement=run.agreement.to_dict() if run.agreement else None,
        per_class_ap={str(k): None if v is None else v * 100.0 for k, v in run.metrics.per_class_ap.items()},
        cached=run.cached,
        warnings=list(run.entry.warnings),
    )


def _host() -> dict[str, Any]:
    info: dict[str, Any] = {"machine": platform.machine(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count()}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def build_report(result: EvaluationResult) -> dict[str, Any]:
    """The report as a JSON-ready dict (rows in model order, baseline first)."""
    base = result.baseline_run
    order = [result.baseline] + [i for i in range(len(result.runs)) if i != result.baseline]
    clip = bool(result.options.get("clip_boxes", True))
    rows = [_row(result.runs[i], None if i == result.baseline else base, clip) for i in order]
    dataset = result.dataset
    return {
        "format": REPORT_FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "toolkit_version": toolkit_version(),
        "dataset": {
            "annotations": dataset.ann_path.name,
            "images": len(result.image_ids or dataset.image_ids),
            "listed_images": len(dataset.image_ids),
            "skipped_images": result.reads.as_dict() | {"line": result.reads.skip_line()},
            "categories": len(dataset.category_ids),
            "fingerprint": dataset.fingerprint,
        },
        "baseline": base.entry.label,
        "protocol": {
            "metric": "COCO bbox AP (pycocotools), area all, maxDets 100",
            "score_threshold": None,
            "max_detections_per_image": 100,
            "score_rounding": None,
            "box_format": "xywh, original image pixels",
            "latency": "per image, batch 1, wall clock, after warm-up; a baseline restored from the cache is "
                       "not timed (only its accuracy is cached)",
            **{k: v for k, v in result.options.items()},
        },
        "category_names": {str(k): v for k, v in dataset.category_names.items()},
        "host": _host(),
        "rows": [asdict(r) | {"comparable": r.comparable} for r in rows],
    }


# ---- Markdown -------------------------------------------------------------------------------------


def _latency_cells(latency: dict[str, Any] | None, cached: bool) -> list[str]:
    if not latency:
        return ["cached: not timed" if cached else "—", "—", "—"]
    med, p90 = latency["median_ms"], latency["p90_ms"]
    return [
        f"{med['total']:.1f} ({med['pre']:.1f}/{med['infer']:.1f}/{med['post']:.1f})",
        f"{p90['total']:.1f}",
        f"{latency['throughput_ips']:.1f}",
    ]


def _macs_cell(row: dict[str, Any]) -> str:
    # The exporter counts multiply-accumulates; a spec that only states FLOPs keeps that unit, spelled out.
    if row.get("macs") is not None:
        return _format_count(row["macs"], "")
    if row.get("flops") is not None:
        return _format_count(row["flops"], " FLOPs")
    return "—"


def _providers(row: dict[str, Any]) -> str:
    short = [p.replace("ExecutionProvider", "") for p in row["providers"]]
    return f"{row['backend']} ({short[0]})" if short else row["backend"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    data = report["dataset"]
    base = rows[0]
    out = [
        "# Accuracy report",
        "",
        f"Dataset: `{data['annotations']}`, {data['images']} images, {data['categories']} categories "
        f"(fingerprint `{data['fingerprint'][:12]}`). Baseline: **{base['model']}** "
        f"({base['backend']}, {base['precision']}).",
        "",
    ]
    header = ["Model", "Backend", "Precision", "AP", "AP50", "ΔAP", "ΔAP50", "AP_S", "AP_M", "AP_L",
              "Params", "MACs", "Input", "Latency ms median (pre/infer/post)", "p90 ms", "img/s"]
    body = []
    for row in rows:
        name = f"{row['model']} (baseline)" if row["is_baseline"] else row["model"]
        mismatch = bool(row["protocol_mismatch"])
        body.append([
            name, _providers(row), row["precision"], format_pct(row["ap"]), format_pct(row["ap50"]),
            format_delta(row["delta_ap"], mismatch), format_delta(row["delta_ap50"], mismatch),
            format_pct(row["ap_small"]), format_pct(row["ap_medium"]), format_pct(row["ap_large"]),
            _format_count(row["params"], ""), _macs_cell(row), row["input"],
            *_latency_cells(row["latency"], row["cached"]),
        ])
    out += _table(header, body)

    others = [r for r in rows if not r["is_baseline"]]
    if others:
        agreement = others[0]["agreement"] or {}
        out += ["", "## Agreement with the baseline (no labels)", "",
                f"Detections with score >= {agreement.get('min_score', '—')}, matched greedily by class and "
                f"IoU >= {agreement.get('iou_threshold', '—')} (a partner may score down to a third of it); "
                "recall = baseline detections reproduced, precision = model detections the baseline has; "
                "heatmap error on sigmoid probabilities.", ""]
        cells = []
        for row in others:
            a = row["agreement"] or {}

            def num(key: str, fmt: str, a: dict[str, Any] = a) -> str:
                return "—" if a.get(key) is None else format(a[key], fmt)

            cells.append([row["model"], f"{a.get('base_matched', 0)} / {a.get('base_detections', 0)}",
                          num("recall", ".3f"), num("precision", ".3f"), num("mean_iou", ".4f"),
                          num("mean_score_error", ".4f"), num("heatmap_mae", ".2e"),
                          num("heatmap_max_error", ".3f")])
        out += _table(["Model", "matched / baseline dets", "recall", "precision", "mean IoU",
                       "mean abs Δscore", "heatmap MAE", "heatmap max err"], cells)
        out += _per_class_section(report, others, base)

    out += ["", "## Protocol", ""]
    proto = report["protocol"]
    out += [
        f"- Metric: {proto['metric']}; no score threshold; at most {proto['max_detections_per_image']} "
        "detections per image (highest scores); scores not rounded; boxes xywh in original pixels.",
        f"- Latency: {proto['latency']}; warm-up calls: {proto.get('warmup')}; intra-op threads: "
        f"{proto.get('threads') or 'backend default'}; image decoding excluded.",
        "",
    ]
    out += _table(["Model", "Input", "K", "Top-K", "Peak kernel"],
                  [[r["model"], r["input"], str(r["protocol"]["K"]), r["protocol"]["topk"],
                    str(r["protocol"]["peak_kernel"])] for r in rows])
    flagged = [r for r in others if r["protocol_mismatch"]]
    out.append("")
    if flagged:
        for row in flagged:
            out.append(f"- {MISMATCH_MARK} **{row['model']}** differs from the baseline in "
                       f"{'; '.join(row['protocol_mismatch'])}: its Δ mixes protocol and precision effects.")
    else:
        out.append("- Every row shares the baseline's protocol: deltas are model/precision/backend effects.")
    notes = [w for r in rows for w in r["warnings"]]
    skipped = data.get("skipped_images") or {}
    if skipped.get("skipped"):
        notes.append(f"{skipped['line']}; they are left out of every row's scores (--strict fails instead)")
    notes += [f"{r['model']}: {r['agreement']['note']}" for r in others if (r["agreement"] or {}).get("note")]
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def _per_class_section(
    report: dict[str, Any], others: list[dict[str, Any]], base: dict[str, Any]
) -> list[str]:
    names = report["category_names"]
    out = ["", f"## Largest per-class AP changes (top {_PER_CLASS_SHOWN} each way)", ""]
    if report["dataset"]["images"] < _FEW_IMAGES:
        out += [f"Over {report['dataset']['images']} images a class has only a handful of instances: "
                "single-class swings of several points are expected even for tiny perturbations.", ""]
    for row in others:
        deltas = [(row["per_class_ap"][cid] - base["per_class_ap"][cid], names.get(cid, cid))
                  for cid in row["per_class_ap"]
                  if row["per_class_ap"][cid] is not None and base["per_class_ap"].get(cid) is not None]
        deltas.sort()
        worst = ", ".join(f"{n} {d:+.1f}" for d, n in deltas[:_PER_CLASS_SHOWN])
        best = ", ".join(f"{n} {d:+.1f}" for d, n in reversed(deltas[-_PER_CLASS_SHOWN:]))
        out.append(f"- **{row['model']}**: worst {worst or '—'}; best {best or '—'}")
    return out


def _finite(value: Any) -> Any:
    """NaN/inf -> None, recursively: strict JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = _finite(report)
    json_path = atomic_write_text(out / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    md_path = atomic_write_text(out / "report.md", render_markdown(report))
    return json_path, md_path

