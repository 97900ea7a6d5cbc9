"""``centernet-export``: checkpoint -> verified, self-describing ONNX.

    centernet-export model.pth -o model.onnx                 # uint8 BGR images in, detections out
    centernet-export model.pth -o m.onnx --keep-res          # paper protocol (pad to multiples of 32/128)
    centernet-export model.pth -o m.onnx --preprocess none --no-decode   # plain network + sigmoid

The file is only written after ONNX Runtime reproduced the PyTorch reference on the verification
images (``--no-verify`` skips that, ``--keep-unverified`` writes even when it fails). The output location
is checked before any work; unreadable files among ``--verify-images`` are skipped and named (``--strict``
fails instead). Exit codes: 0 ok, 1 verification failed, 2 bad arguments, checkpoint or output, 130
interrupted (nothing written).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from centernet_edge.runtime.cli_common import QUIET_HELP, add_common_flags, run_main
from centernet_edge.runtime.spec import GRAPH_PREPROCESS, OFFICIAL_NORMALIZATIONS, SpecError

if TYPE_CHECKING:
    from .onnx_export import ExportOptions

# Torch, ONNX and the exporter are imported inside main(), so Ctrl-C while they load is one line too.
__all__ = ["build_parser", "main"]

PROG = "centernet-export"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage dump) so scripts can log it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _batch(value: str) -> int | None:
    if value.lower() == "dynamic":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'dynamic', got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'dynamic', got {value!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    from .onnx_export import MAX_OPSET, MAX_TOPK, MIN_OPSET

    p = _Parser(prog=PROG, description="Export a CenterNet checkpoint (official or mmdetection) to ONNX with "
                "pre-processing and decode in the graph, verified against the PyTorch reference.")
    p.add_argument("checkpoint", type=Path, help=".pth file (architecture and source are detected)")
    p.add_argument("-o", "--output", type=Path,
                   help="ONNX file to write (default: <checkpoint stem>.onnx here)")
    p.add_argument("--arch", help="override the detected architecture (e.g. resdcn_18, mmdet_r18_dcnv2)")
    p.add_argument("--num-classes", type=int, help="expected class count (must match the checkpoint)")
    g = p.add_argument_group("graph")
    g.add_argument("--keep-res", action="store_true",
                   help="paper protocol: pad each image to ((h|pad)+1, (w|pad)+1) instead of a fixed size")
    g.add_argument("--input-size", type=int, nargs="+", metavar=("H", "W"),
                   help="fixed network input size (default 512 512; W defaults to H)")
    g.add_argument("--preprocess", choices=GRAPH_PREPROCESS, default="warp",
                   help="warp: raw uint8 BGR images in (default); normalize: uint8 BGR already warped to the "
                   "network size; none: normalised float NCHW")
    g.add_argument("--no-decode", action="store_true",
                   help="output the heads (heatmap after sigmoid, wh, reg) instead of detections")
    g.add_argument("--batch", type=_batch, default=None, metavar="N|dynamic",
                   help="fixed batch size or 'dynamic' (default)")
    g.add_argument("--topk", type=int, default=100, help=f"detections per image, 1..{MAX_TOPK} (default 100)")
    g.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET}")
    g.add_argument("--name", help="model name stored in the spec (default: checkpoint stem)")
    g.add_argument("--official-normalization", choices=OFFICIAL_NORMALIZATIONS, default=None,
                   help="official checkpoints only: 'test' (default) is test.py's precise dataset mean/std, with "
                   "which the published COCO AP was measured; 'demo' is the rounded mean/std of demo.py and "
                   "opts().init(). Recorded in the model spec")
    g.add_argument("--no-optimize", action="store_true",
                   help="keep the graph as traced (default: fold BN, rewrite ConvTranspose as Conv + interleave)")
    v = p.add_argument_group("verification")
    v.add_argument("--verify-images", type=Path, metavar="DIR",
                   help="images to verify on (default: generated synthetic images of several sizes)")
    v.add_argument("--verify-count", type=int, default=3, help="at most this many images (default 3)")
    v.add_argument("--no-verify", action="store_true", help="skip verification")
    v.add_argument("--keep-unverified", action="store_true", help="write the file even if verification fails")
    v.add_argument("--strict", action="store_true",
                   help="fail on an unreadable file in --verify-images (default: skip it, count it and name it)")
    v.add_argument("--score-tol", type=float, default=1e-3,
                   help="max score error of a detection matched to the reference (default 1e-3)")
    v.add_argument("--box-tol", type=float, default=1.0,
                   help="max box error of a matched detection, pixels (default 1)")
    v.add_argument("--min-matched", type=float, default=1.0,
                   help="min fraction of reference detections matched or explained by a float64 near-tie "
                   "(default 1.0)")
    v.add_argument("--head-tol", type=float, default=None,
                   help="also fail when a head differs from the float64 reference by more than this (default: "
                   "head errors are reported next to the model's float32 noise floor, not judged)")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch and ONNX Runtime")
    add_common_flags(p, QUIET_HELP)
    return p


def _options(args: argparse.Namespace) -> ExportOptions:
    from .onnx_export import ExportError, ExportOptions

    size = None
    if args.input_size is not None:
        if len(args.input_size) > 2:
            raise ExportError(f"--input-size takes H or H W; got {len(args.input_size)} values")
        size = (args.input_size[0], args.input_size[-1])
    if args.verify_count < 1:
        raise ExportError(f"--verify-count must be >= 1; got {args.verify_count}")
    return ExportOptions(
        keep_res=args.keep_res, input_size=size, preprocess=args.preprocess, decode=not args.no_decode,
        batch=args.batch, topk=args.topk, opset=args.opset, name=args.name, optimize=not args.no_optimize,
        official_normalization=args.official_normalization,
    )


def _run(args: argparse.Namespace) -> int:
    from centernet_edge.runtime.images import ReadReport

    from .onnx_export import ExportResult
    from .pipeline import check_export_paths, export_verified
    from .trt_ops import check_trt_compatibility
    from .verify import Tolerances, load_images

    say = (lambda *a: None) if args.quiet else print  # noqa: E731
    options = _options(args).validate()
    output = check_export_paths(args.checkpoint, args.output or Path(args.checkpoint.stem + ".onnx"))
    images = None
    if not args.no_verify and args.verify_images is not None:
        reads = ReadReport(strict=args.strict)
        images = load_images(args.verify_images, args.verify_count, reads)
        if reads.skipped:
            print(f"{PROG}: warning: {reads.skip_line()} (--strict fails instead)", file=sys.stderr)

    start = time.perf_counter()

    def exported(result: ExportResult) -> None:
        model, spec = result.model, result.spec
        say(f"{args.checkpoint.name}: {spec.arch} ({spec.source}), {spec.num_classes} classes; exported in "
            f"{time.perf_counter() - start:.1f} s, {len(model.graph.node)} nodes")
        for issue in check_trt_compatibility(model):
            print(f"{PROG}: warning: TensorRT parser: {issue}", file=sys.stderr)

    tolerances = Tolerances(score=args.score_tol, box_px=args.box_tol, min_matched=args.min_matched,
                            head=args.head_tol)
    run = export_verified(
        args.checkpoint, output, arch=args.arch, num_classes=args.num_classes, options=options,
        verify=not args.no_verify, verify_images=images, verify_count=args.verify_count,
        tolerances=tolerances, keep_unverified=args.keep_unverified, threads=args.threads,
        on_exported=exported,
    )
    if run.report is not None:
        table = run.report.table()
        print(table.splitlines()[-1] if args.quiet else table)
    if run.path is None:
        print(f"{PROG}: {output} not written (use --keep-unverified to write it anyway)", file=sys.stderr)
        return 1
    inp = run.spec.graph.input
    outs = ", ".join(f"{i.name} {i.dtype} {i.shape}" for i in run.spec.graph.outputs.values())
    if args.quiet:
        print(f"wrote {output}")
    say(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB): input {inp.name} {inp.dtype} {inp.shape}; "
        f"output {outs}")
    return 0 if run.report is None or run.report.passed else 1


def _main(argv: list[str] | None) -> int:
    from centernet_edge.runtime.cli_common import OutputError
    from centernet_edge.runtime.images import UnreadableImageError

    from .checkpoints import CheckpointError
    from .onnx_export import ExportError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return _run(args)
    except _UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (ExportError, CheckpointError, SpecError, OutputError, UnreadableImageError,
            FileNotFoundError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 verification failed, 2 usage/input error, 130 Ctrl-C)."""
    return run_main(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
