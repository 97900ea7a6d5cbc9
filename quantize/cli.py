"""``centernet-calibrate``: hardware-free calibration -> TensorRT cache, int8 Q/DQ, CPU int8 and fp16 models.

Example::

    centernet-calibrate model.onnx --images calib_dir/ --num-images 500 -o calib_out/
    centernet-calibrate foreign.onnx --model-spec foreign.json --images list.txt --int8 --method auto

Writes into ``-o``: calibration.cache (TensorRT <= 10), summary.json (hashes, method, per-tensor amax),
model_int8_qdq.onnx (TensorRT explicit quantization), model_int8_cpu.onnx (ONNX Runtime CPU),
model_fp16.onnx, sensitivity.json/.md and precision.json. An existing cache made from another model,
image set or method is refused unless ``--force``. The run is written into a temporary folder beside
``-o`` and moved into place at the end: a failed or interrupted run (Ctrl-C: one line, exit 130) leaves
``-o`` as it was.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from centernet_edge.runtime.cli_common import OneLineParser, add_common_flags, run_main

if TYPE_CHECKING:
    from .pipeline import CalibrateResult

# ONNX, ONNX Runtime and the pipeline are imported inside main(), so Ctrl-C while they load is one line.
__all__ = ["build_parser", "main"]

PROG = "centernet-calibrate"
_EPILOG = """outputs (in -o): calibration.cache, summary.json, timings.json, model_int8_qdq.onnx (TensorRT),
model_int8_cpu.onnx (ONNX Runtime CPU), model_fp16.onnx, precision.json, weight_fit.json (AdaRound / bias
correction per layer), layer_error.json/.md; sensitivity.json/.md when layers may stay float (--mixed knee or
budget); model_fp32_rescaled.onnx when channels were rescaled (the fp32 model the cache's ranges describe).
unreadable calibration images are skipped, counted and named in summary.json (--strict fails instead).
exit codes: 0 ok, 2 bad input (one line on stderr, nothing written), 3 an existing cache was made from
another model/images/method, 130 interrupted (nothing written)."""


def _budget(text: str) -> float | str:
    """A head-error budget in [0, 1], or 'none' for every eligible layer in int8."""
    if text.lower() in ("none", "off", "all-int8"):
        return "none"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budget must be a number in [0, 1] or 'none'; got {text!r}") from None
    if not 0 <= value <= 1 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"budget must be in [0, 1]; got {value}")
    return value


def _trt_version(text: str) -> str | int:
    """'10.16.1' style, or the NV_TENSORRT_VERSION integer itself (101601)."""
    return int(text) if text.strip().isdigit() else text


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .mixed import DEFAULT_BUDGET, DEFAULT_FLOAT_SHARE, KNEE_TOLERANCE
    from .pipeline import METHOD_CHOICES, MIXED_RULES
    from .sequential import ROUNDINGS
    from .trt_cache import DEFAULT_TRT_VERSION

    p = OneLineParser(
        prog=PROG,
        description="Calibrate a CenterNet ONNX model without a GPU; write int8/fp16 deployment artifacts.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    p.add_argument("model", type=Path,
                   help="fp32 ONNX model (our export, or a foreign one with --model-spec)")
    p.add_argument("--model-spec", type=Path, help="side-car JSON model description for a foreign ONNX")
    p.add_argument("--images", type=Path, required=True,
                   help="calibration images: a folder, a text file listing paths, or a COCO .json")
    p.add_argument("--images-dir", type=Path, help="image folder for a COCO .json (default: next to it)")
    p.add_argument("--num-images", type=_positive, default=500,
                   help="images drawn (seeded) from --images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image selection (default: %(default)s)")
    p.add_argument("--int8", action="store_true", help="write the int8 artifacts (default: int8 and fp16)")
    p.add_argument("--fp16", action="store_true", help="write the fp16 model (default: int8 and fp16)")
    p.add_argument("--method", choices=METHOD_CHOICES, default="auto",
                   help="activation range method; 'auto' (default) picks the one whose all-int8 model drifts "
                        "least from fp32 on calibration images; 'downstream' picks per tensor the range whose "
                        "int8 rounding changes the reading layer's output least")
    p.add_argument("--range-images", type=_positive, default=4,
                   help="calibration images replayed by --method downstream (default: %(default)s)")
    p.add_argument("--layer-report-images", type=int, default=2,
                   help="images for layer_error.json/.md, the per-layer int8-vs-fp32 comparison; 0 skips it "
                        "(default: %(default)s)")
    p.add_argument("--equalize", action=argparse.BooleanOptionalAction, default=False,
                   help="cross-layer equalization of conv -> ReLU/identity -> conv pairs before calibration "
                        "(same fp32 function; default: off)")
    p.add_argument("--channel-scaling", action=argparse.BooleanOptionalAction, default=True,
                   help="even out the channels of every depthwise conv input before calibration (per-channel "
                        "factors from calibration images, folded into the neighbouring convs or one Mul in front "
                        "of the depthwise conv; same fp32 function; default: on)")
    p.add_argument("--scaling-images", type=_positive, default=32,
                   help="calibration images whose per-channel ranges set the channel-scaling factors "
                        "(default: %(default)s)")
    p.add_argument("--rounding", choices=ROUNDINGS, default="adaround",
                   help="int8 weight rounding: adaround (default; learned per layer on calibration patches, "
                        "layers fitted in order on quantized inputs, kept only when it lowers the all-int8 "
                        "head error on calibration images) or nearest")
    p.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=False,
                   help="empirical per-channel bias correction of the int8 convs (same guard as --rounding; "
                        "default: off)")
    p.add_argument("--fit-images", type=_positive, default=8,
                   help="calibration images replayed by --rounding adaround / --bias-correction "
                        "(default: %(default)s)")
    p.add_argument("--percentile", type=float, default=99.99,
                   help="percentile for --method percentile (default: %(default)s)")
    p.add_argument("--mixed", choices=MIXED_RULES, default="knee",
                   help="which layers stay float (label-free, calibration images): 'knee' (default) measures "
                        f"0..cap float layers (cap: {DEFAULT_FLOAT_SHARE * 100:.0f}%% of the Conv layers) and keeps "
                        f"the fewest that reach {(1 - KNEE_TOLERANCE) * 100:.0f}%% of the head-error reduction the "
                        "cap gives; "
                        "'budget' the fewest within --budget; 'none' every eligible layer int8 (no sensitivity "
                        "analysis)")
    p.add_argument("--budget", type=_budget, default=None,
                   help="selects the budget rule: max head error (1 - score-weighted detection agreement with "
                        f"fp32 on calibration images; {DEFAULT_BUDGET} with --mixed budget); 'none' = --mixed none")
    p.add_argument("--max-float", type=int,
                   help="at most this many layers kept float (the knee rule's cap; default 10%% of the convs)")
    p.add_argument("--ranking-images", type=_positive, default=8,
                   help="calibration images of the one-layer-at-a-time sensitivity ranking (default: "
                        "%(default)s)")
    p.add_argument("--cpu-float", choices=("none", "mixed"), default="none",
                   help="layers kept float in model_int8_cpu.onnx: none (fastest) or the mixed-precision set")
    p.add_argument("--cpu-format", choices=("qoperator", "qdq"), default="qoperator",
                   help="model_int8_cpu.onnx format: qoperator (fastest measured) or qdq (closer to fp32)")
    p.add_argument("--cpu-float-heads", action="store_true",
                   help="keep the head convs float in model_int8_cpu.onnx (logits not rounded; slower)")
    p.add_argument("--sensitivity-images", type=_positive, default=32,
                   help="calibration images that score whole-model candidates (auto method, mixed precision) "
                        "(default: %(default)s)")
    p.add_argument("--trt-version", type=_trt_version, default=DEFAULT_TRT_VERSION,
                   help="TensorRT version for the cache header: 10.16.1, 8.6.1 or NV_TENSORRT_VERSION "
                        "(default: 10.16.1)")
    p.add_argument("--threads", type=_positive, default=1,
                   help="ONNX Runtime intra-op threads per run (default: %(default)s)")
    p.add_argument("--workers", type=_positive,
                   help="ONNX Runtime runs at once: images in the statistics passes, layers or images in the "
                        "sensitivity analysis (default: available cores / --threads); results do not depend on it")
    p.add_argument("--batch-size", type=_positive, help="calibration batch (default: the graph's, else 1)")
    p.add_argument("--stats-cache", type=Path, help="folder to keep and reuse activation statistics in")
    p.add_argument("-o", "--out-dir", type=Path, default=Path("calibration"),
                   help="output folder (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="recalibrate over an existing (stale) cache")
    p.add_argument("--strict", action="store_true",
                   help="fail on an unreadable calibration image (default: skip it, count it and name it)")
    add_common_flags(p)
    return p


def _report(result: CalibrateResult, quiet: bool) -> None:
    from .manifest import ARTIFACTS

    print(f"wrote {len(result.written)} file(s) to {result.out_dir}" + ("" if quiet else ":"))
    if quiet:
        return
    order = {name: i for i, name in enumerate(ARTIFACTS.values())}
    for name in sorted(result.written, key=lambda n: (order.get(n, len(order)), n)):
        print(f"  {name}")
    print(f"calibration.cache: {result.header_note}")
    if result.mixed is not None:
        m = result.mixed
        rule = f"budget {m.budget}" if m.rule == "budget" else f"rule {m.rule}"
        print(f"int8 (TensorRT Q/DQ): method {result.method}, {len(m.float_layers)} layer(s) kept float, "
              f"head error {m.error.head_error:.4f} ({rule})")
    if result.cpu_int8 is not None:
        c = result.cpu_int8
        print(f"int8 (ONNX Runtime CPU): {c['float_layers']} layer(s) kept float, head error {c['head_error']:.4f}")


def _main(argv: Sequence[str] | None) -> int:
    from .manifest import StaleCacheError
    from .pipeline import CalibrateOptions, calibrate

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    both = not (args.int8 or args.fp16)
    mixed, budget = (("none", None) if args.budget == "none" else (args.mixed, args.budget))
    options = CalibrateOptions(
        model=args.model, images=args.images, out_dir=args.out_dir, model_spec=args.model_spec,
        images_dir=args.images_dir, num_images=args.num_images, seed=args.seed,
        int8=args.int8 or both, fp16=args.fp16 or both, method=args.method, percentile=args.percentile,
        mixed=mixed, budget=budget, max_float=args.max_float, sensitivity_images=args.sensitivity_images,
        ranking_images=args.ranking_images, rounding=args.rounding, bias_correction=args.bias_correction,
        equalize=args.equalize, channel_scaling=args.channel_scaling, scaling_images=args.scaling_images,
        fit_images=args.fit_images,
        cpu_float=args.cpu_float, cpu_format=args.cpu_format, cpu_float_heads=args.cpu_float_heads,
        trt_version=args.trt_version, force=args.force, threads=args.threads, workers=args.workers,
        batch_size=args.batch_size, range_images=args.range_images,
        layer_report_images=args.layer_report_images,
        stats_cache=args.stats_cache, progress=not args.quiet, strict=args.strict,
    )
    try:
        result = calibrate(options)
    except StaleCacheError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 3
    except (OSError, ValueError, KeyError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    _report(result, args.quiet)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, _main, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
