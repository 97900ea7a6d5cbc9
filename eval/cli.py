"""``centernet-eval``: COCO accuracy, agreement and latency of models against a baseline, as a report.

    centernet-eval model.onnx model_int8.onnx --images val2017 --ann instances_val2017.json -o report/
    centernet-eval foreign.onnx --model-spec foreign.json --images val2017 --ann instances_val2017.json

Unreadable images are skipped for every model, left out of the scores and named in the report
(``--strict`` fails instead). The outputs are written into a temporary folder beside ``-o`` and moved
into place at the end. Exit codes: 0 ok, 2 bad input (one line on stderr, nothing written), 130
interrupted (nothing written).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from centernet_edge.runtime.cli_common import OneLineParser, add_common_flags, run_main

if TYPE_CHECKING:
    from .evaluate import EvaluationResult, ModelEntry

# ONNX Runtime, pycocotools and matplotlib are imported inside main(), so Ctrl-C while they load is one line.
__all__ = ["build_parser", "main"]

PROG = "centernet-eval"


class UsageError(ValueError):
    """Command-line arguments that do not fit together."""


def build_parser() -> argparse.ArgumentParser:
    from .backends import BACKENDS

    p = OneLineParser(
        prog=PROG,
        description="Evaluate CenterNet models (ONNX, checkpoints, plug-in backends) on COCO annotations and "
        "write a Markdown + JSON report with deltas against a baseline.",
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="model files (.onnx, .pth, ...)")
    p.add_argument("--images", required=True, type=Path, metavar="DIR", help="image folder (e.g. val2017)")
    p.add_argument("--ann", required=True, type=Path, metavar="JSON", help="COCO instances annotation file")
    p.add_argument("--model-spec", action="extend", nargs="+", default=[], metavar="JSON",
                   help="model description for an ONNX without embedded spec: one for all models, or one per "
                   "model in order, e.g. '--model-spec a.json - -' ('-' = the model's own); the flag may "
                   "also be repeated")
    p.add_argument("--baseline", metavar="MODEL", help="baseline model (default: the first MODEL)")
    p.add_argument("--baseline-spec", metavar="JSON", help="model description of a --baseline not in MODELs")
    p.add_argument("--backend", action="extend", nargs="+", default=[], choices=tuple(BACKENDS), metavar="NAME",
                   help="backend: " + "; ".join(f"{k} = {v}" for k, v in BACKENDS.items())
                   + ". One for all, or one per model in order; default by file extension")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate the first N images (by id) only")
    p.add_argument("--providers", metavar="LIST",
                   help="ONNX Runtime providers, comma separated (cpu, cuda, tensorrt or full names); "
                   "default CUDA when available, else CPU")
    p.add_argument("--threads", type=int, metavar="N", help="intra-op threads per model (default: backend's)")
    p.add_argument("--device", help="torch device (default cuda when available)")
    p.add_argument("--precision", action="extend", nargs="+", default=[], choices=("fp32", "fp16"),
                   help="torch backend: run the checkpoint in this precision (fp16 on CUDA only): one for "
                   "all, or one per model in order, so one checkpoint can be compared with itself")
    p.add_argument("-o", "--out-dir", type=Path, default=Path("eval_report"), metavar="DIR",
                   help="where report.md, report.json and the figures go (default: ./eval_report)")
    p.add_argument("--no-cache", action="store_true", help="always re-run the baseline")
    p.add_argument("--no-clip", action="store_true",
                   help="score boxes as the model returns them, unclipped (upstream CenterNet's protocol); by "
                   "default boxes are clipped to the image first")
    p.add_argument("--cache-dir", type=Path, metavar="DIR",
                   help="baseline cache (default: $XDG_CACHE_HOME or ~/.cache, /centernet-edge/eval)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-heatmaps", action="store_true",
                   help="do not fetch raw heatmaps (no heatmap agreement; latency without the extra copy)")
    p.add_argument("--save-detections", action="store_true", help="also write COCO results JSON per model")
    p.add_argument("--agreement-score", type=float, default=0.3, metavar="S",
                   help="score threshold for the label-free agreement (default 0.3)")
    p.add_argument("--disagreements", type=int, default=3, metavar="N",
                   help="images to show side by side per model where it disagrees most (default 3)")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed warm-up calls per model")
    p.add_argument("--strict", action="store_true",
                   help="fail on an unreadable image (default: skip it for every model, count it and name it)")
    add_common_flags(p)
    return p


def _per_model(values: list[str], count: int, what: str) -> list[str | None]:
    """A repeatable option given zero times, once (for all), or once per model."""
    if not values:
        return [None] * count
    if len(values) == 1:
        return [values[0]] * count
    if len(values) != count:
        raise UsageError(f"{what} given {len(values)} times for {count} models; once, or once per model")
    return list(values)


def _labels(paths: Sequence[Path], precisions: Sequence[str | None]) -> list[str]:
    labels: list[str] = []
    for path, precision in zip(paths, precisions, strict=True):
        stem = f"{path.stem}@{precision}" if precision == "fp16" else path.stem
        label, n = stem, 2
        while label in labels:
            label, n = f"{stem}-{n}", n + 1
        labels.append(label)
    return labels


def _entries(args: argparse.Namespace) -> tuple[list[ModelEntry], int]:
    from centernet_edge.runtime.spec import SpecError

    from .evaluate import resolve_model

    paths = [Path(m) for m in args.models]
    specs = _per_model(args.model_spec, len(paths), "--model-spec")
    backends = _per_model(args.backend, len(paths), "--backend")
    precisions = _per_model(args.precision, len(paths), "--precision")
    baseline = 0
    if args.baseline:
        base_path = Path(args.baseline)
        matches = [i for i, p in enumerate(paths) if p.resolve() == base_path.resolve()]
        if matches:
            baseline = matches[0]
        else:
            paths.insert(0, base_path)
            one_spec = args.model_spec[0] if len(args.model_spec) == 1 else None
            specs.insert(0, args.baseline_spec or one_spec)
            backends.insert(0, backends[0] if len(args.backend) == 1 else None)
            precisions.insert(0, precisions[0] if len(args.precision) == 1 else None)
    labels = _labels(paths, precisions)
    entries = []
    for path, spec, backend, label, precision in zip(paths, specs, backends, labels, precisions, strict=True):
        try:
            entry = resolve_model(path, None if spec in (None, "-") else spec, backend, label)
            entry.fp16 = precision == "fp16"
            entries.append(entry)
        except SpecError as exc:
            hint = "" if "--model-spec" in str(exc) else " (pass a model description with --model-spec)"
            raise SpecError(f"{path.name}: {exc}{hint}") from None
    return entries, baseline


def _plots(result: EvaluationResult, out_dir: Path, count: int, min_score: float) -> list[Path]:
    from .plots import plot_disagreements, plot_per_class_delta, plot_pr_curves, safe_name

    base = result.baseline_run
    names = result.dataset.category_names
    curves = {r.entry.label: r.metrics for r in result.runs if r.metrics}
    written = [plot_pr_curves(curves, out_dir / "pr_curves.png")]
    for i, run in enumerate(result.runs):
        if i == result.baseline or run.metrics is None or base.metrics is None:
            continue
        stem = safe_name(run.entry.label)
        title = f"{run.entry.label} vs {base.entry.label}"
        delta_png = out_dir / f"ap_delta_{stem}.png"
        written.append(plot_per_class_delta(base.metrics, run.metrics, names, title, delta_png))
        worst = result.agreements[run.entry.label].most_disagreeing(count)
        if worst:
            panels = [(f"baseline {base.entry.label}", base.detections), (run.entry.label, run.detections)]
            class_names = run.entry.spec.class_names if run.entry.spec else []
            written.append(plot_disagreements(result.dataset, worst, panels, class_names,
                                              out_dir / f"disagreements_{stem}.png", min_score))
    return written


def _save_detections(result: EvaluationResult, out_dir: Path) -> list[Path]:
    from centernet_edge.runtime.atomic import atomic_write_text

    from .coco_eval import to_coco_results
    from .dataset import model_category_ids
    from .plots import safe_name

    written = []
    for run in result.runs:
        assert run.entry.spec is not None
        records = to_coco_results(run.detections, model_category_ids(run.entry.spec))
        path = out_dir / f"detections_{safe_name(run.entry.label)}.json"
        written.append(atomic_write_text(path, json.dumps(records)))
    return written


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as the arguments say, write the outputs, and return the report dict."""
    from centernet_edge.runtime.atomic import staged_dir
    from centernet_edge.runtime.cli_common import check_output_dir
    from centernet_edge.runtime.runners import RunnerOptions

    from .cache import ResultCache, default_cache_dir
    from .dataset import load_coco_dataset
    from .evaluate import evaluate_models
    from .report import build_report, write_report

    out_dir = check_output_dir(args.out_dir)
    dataset = load_coco_dataset(args.ann, args.images, args.limit)
    entries, baseline = _entries(args)
    options = RunnerOptions(
        providers=[p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None,
        threads=args.threads, device=args.device, keep_raw=not args.no_heatmaps,
    )
    cache = None if args.no_cache else ResultCache(args.cache_dir or default_cache_dir())
    result = evaluate_models(
        entries, dataset, baseline, options, cache=cache, limit=args.limit, progress=not args.quiet,
        agreement_min_score=args.agreement_score, warmup=args.warmup, strict=args.strict,
        clip_boxes=not args.no_clip,
    )
    report = build_report(result)
    with staged_dir(out_dir) as stage:
        written = list(write_report(report, stage))
        if not args.no_plots:
            written += _plots(result, stage, args.disagreements, args.agreement_score)
        if args.save_detections:
            written += _save_detections(result, stage)
    report["written"] = [p.name for p in written]
    return report


def _user_error(exc: Exception) -> bool:
    """Errors about the user's files and options: reported in one line, not as a traceback."""
    from centernet_edge.runtime.cli_common import OutputError
    from centernet_edge.runtime.images import UnreadableImageError
    from centernet_edge.runtime.runners import RunnerError
    from centernet_edge.runtime.spec import SpecError

    from .dataset import DatasetError

    known = (DatasetError, SpecError, RunnerError, OutputError, UnreadableImageError, FileNotFoundError)
    return isinstance(exc, known)


def _main(argv: Sequence[str] | None) -> int:
    from .report import render_markdown

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except UsageError as exc:
        parser.error(str(exc))
    except Exception as exc:
        if not _user_error(exc):
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(render_markdown(report).split("\n## ")[0].rstrip())
        print()
    skipped = report["dataset"]["skipped_images"]
    if skipped["skipped"]:
        print(f"{PROG}: warning: {skipped['line']} (left out of the scores)", file=sys.stderr)
    print(f"wrote {', '.join(report['written'])} to {args.out_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
