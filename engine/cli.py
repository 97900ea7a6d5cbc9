"""``centernet-build``: a TensorRT engine (and its side-car) from an exported ONNX or a calibration folder.

    centernet-build calib_out/ --onnx model.onnx --precision int8 -o model_int8.engine     # TensorRT 10
    centernet-build calib_out/ --precision int8 -o model_int8.engine                       # TensorRT 11
    centernet-build model.onnx --precision fp16 --print-commands --trt-version 10          # no TensorRT needed
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from centernet_edge.runtime.atomic import atomic_path
from centernet_edge.runtime.cli_common import OneLineParser, add_common_flags, run_main
from centernet_edge.runtime.engine_meta import EngineMeta, engine_meta_path, write_engine_meta
from centernet_edge.runtime.hashing import file_sha256
from centernet_edge.runtime.spec import ModelSpec, SpecError

from .builder import INSTALL_HINT, BuildEnvironmentError, BuildError, build_engine, check_build_environment
from .commands import BuildSettings, polygraphy_command, render, trtexec_command
from .profiles import InputProfile, ProfileError, input_profile, parse_size
from .selection import BUILD_PRECISIONS, BuildPlan, SelectionError, plan_build
from .versions import TrtTarget, installed_tensorrt_version, parse_trt_version

__all__ = ["build_parser", "main"]

PROG = "centernet-build"

_EPILOG = """TensorRT 11 is strongly typed: fp16 is built from the calibration folder's model_fp16.onnx and int8
from model_int8_qdq.onnx. TensorRT 10 (Jetson) builds the fp32 ONNX (--onnx) with FP16/INT8 flags and the
folder's calibration.cache, so no images are needed on the target.
Writes -o and -o.json (the side-car: engine sha256, TensorRT version, GPU, model spec), which
centernet-eval reads: centernet-eval model.engine --images DIR --ann JSON.
exit codes: 0 ok, 2 bad input or no TensorRT/GPU, 130 interrupted."""


class UsageError(ValueError):
    """Options that do not fit together."""


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0; got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Build a TensorRT engine (fp32, fp16 or int8) from an exported CenterNet ONNX or a "
        "centernet-calibrate folder, or print the equivalent trtexec and Polygraphy commands.")
    p.add_argument("artifact", type=Path, metavar="ARTIFACT", help="exported .onnx, or a centernet-calibrate folder")
    p.add_argument("-o", "--output", type=Path, metavar="ENGINE",
                   help="engine file (default: ARTIFACT's name + _PRECISION.engine in the current folder)")
    p.add_argument("--precision", choices=BUILD_PRECISIONS,
                   help="engine precision (default: int8 for a calibration folder, else the ONNX's own)")
    p.add_argument("--onnx", type=Path, metavar="ONNX",
                   help="the fp32 ONNX a calibration folder was made from (TensorRT 10 routes, fp32); checked "
                   "against the sha256 in summary.json. Not needed for int8 from the cache when the folder has "
                   "model_fp32_rescaled.onnx (that model is built)")
    p.add_argument("--model-spec", type=Path, metavar="JSON", help="model description for a foreign ONNX")
    p.add_argument("--calib-images", type=Path, metavar="SRC",
                   help="TensorRT 10 int8: calibrate live in TensorRT on these images (folder, list or COCO "
                   "json) instead of serving calibration.cache")
    p.add_argument("--calib-num", type=_positive, default=500, metavar="N",
                   help="images drawn (seed 0) from --calib-images (default: %(default)s)")
    p.add_argument("--strongly-typed", action="store_true",
                   help="TensorRT 10: build the folder's model_fp16.onnx / model_int8_qdq.onnx strongly typed, "
                   "as TensorRT 11 does (always on with 11)")
    p.add_argument("--batch", type=_positive, metavar="N",
                   help="largest batch of a dynamic-batch model with a fixed-size input (default 1)")
    p.add_argument("--min-size", type=_size, metavar="HxW", help="smallest input (raw image or keep_res) size")
    p.add_argument("--opt-size", type=_size, metavar="HxW", help="size TensorRT tunes for")
    p.add_argument("--max-size", type=_size, metavar="HxW", help="largest input size")
    p.add_argument("--workspace", type=_positive, metavar="MIB", help="builder workspace limit in MiB")
    p.add_argument("--timing-cache", type=Path, metavar="FILE",
                   help="read and update a TensorRT timing cache (faster rebuilds of similar models)")
    p.add_argument("--version-compatible", action="store_true",
                   help="build an engine later TensorRT versions (lean runtime) can run")
    p.add_argument("--dla-core", type=_non_negative, metavar="N",
                   help="Jetson: run on DLA core N with GPU fallback (fp16/int8 only)")
    p.add_argument("--trt-version", metavar="VER",
                   help="target TensorRT line (10, 11 or 10.16.1); defaults to the installed one. Lets "
                   "--print-commands work without TensorRT")
    p.add_argument("--print-commands", action="store_true",
                   help="print the equivalent trtexec line and a Polygraphy TensorRT-vs-ONNX-Runtime comparison, "
                   "build nothing")
    p.add_argument("--compare-images", type=Path, metavar="SRC",
                   help="with --print-commands: write a Polygraphy data loader for these images next to the "
                   "engine and compare on them instead of random pixels")
    p.add_argument("-v", "--verbose", action="store_true", help="TensorRT's verbose log")
    add_common_flags(p, "print nothing but errors")
    return p


def _target(args: argparse.Namespace) -> TrtTarget:
    installed = installed_tensorrt_version()
    if args.trt_version:
        target = parse_trt_version(args.trt_version)
        if installed and not args.print_commands and parse_trt_version(installed).major != target.major:
            raise UsageError(f"--trt-version {args.trt_version} but TensorRT {installed} is installed")
        return target
    if installed:
        return parse_trt_version(installed)
    if args.print_commands:
        raise UsageError("TensorRT is not installed here; pass --trt-version 10 or 11 to print that line's commands")
    raise BuildEnvironmentError(f"TensorRT is not installed: {INSTALL_HINT}")


def _validate(args: argparse.Namespace, target: TrtTarget) -> None:
    if args.calib_images is not None and not target.implicit_precision:
        raise UsageError("TensorRT 11 has no calibrators: int8 comes from the folder's model_int8_qdq.onnx")
    if args.calib_images is not None and args.strongly_typed:
        raise UsageError("--calib-images and --strongly-typed exclude each other (a Q/DQ graph carries its scales)")
    if args.dla_core is not None:
        if not target.implicit_precision:
            raise UsageError("DLA cores are on Jetson, which runs TensorRT 10.x (TensorRT 11 does not support JetPack)")
        if args.precision == "fp32":
            raise UsageError("DLA runs fp16 or int8 only; pick --precision fp16 or int8")
    if args.compare_images is not None and not args.print_commands:
        raise UsageError("--compare-images goes with --print-commands")


def _output(args: argparse.Namespace, plan: BuildPlan) -> Path:
    if args.output is not None:
        return args.output
    return Path(f"{args.artifact.resolve().name.removesuffix('.onnx')}_{plan.precision}.engine")


def _print_commands(args: argparse.Namespace, plan: BuildPlan, profile: InputProfile, engine: Path,
                    settings: BuildSettings) -> None:
    loader = None
    if args.compare_images is not None:
        from centernet_edge.calib_data.polygraphy_loader import write_polygraphy_loader
        from centernet_edge.calib_data.sources import load_calibration_set

        images = load_calibration_set(args.compare_images, num_images=32, seed=0).paths
        loader = write_polygraphy_loader(engine.with_name(engine.name + ".polygraphy_loader.py"), plan.onnx,
                                         args.model_spec, images, profile.opt[0])
    print(f"# {plan.describe()}")
    if plan.int8_source == "images":
        print("# trtexec cannot calibrate from images: use centernet-build, or build from the calibration folder")
    else:
        print(render(trtexec_command(plan, profile, engine, settings)))
    print(render(polygraphy_command(plan, profile, loader, settings)))


def _live_feeds(args: argparse.Namespace, spec: ModelSpec, profile: InputProfile) -> Iterator[np.ndarray]:
    """Calibration batches at the profile's opt shape (TensorRT 10 calibrates at one shape)."""
    import cv2

    from centernet_edge.calib_data.batches import iter_images
    from centernet_edge.calib_data.sources import load_calibration_set
    from centernet_edge.runtime.preprocess import prepare_batch

    if spec.preprocess.resize == "keep_res" and spec.graph.preprocess != "warp":
        raise UsageError("live calibration needs one input size; keep_res inputs vary per image: serve the "
                         "calibration folder's cache instead")
    images = load_calibration_set(args.calib_images, num_images=args.calib_num, seed=0)
    batch = profile.opt[0]
    raw_hw = (profile.opt[1], profile.opt[2]) if spec.graph.preprocess == "warp" else None

    def generate() -> Iterator[np.ndarray]:
        pending: list[np.ndarray] = []
        for _, img in iter_images(images):
            if raw_hw is not None and img.shape[:2] != raw_hw:
                img = cv2.resize(img, (raw_hw[1], raw_hw[0]), interpolation=cv2.INTER_LINEAR)
            pending.append(img)
            if len(pending) == batch:
                yield prepare_batch(pending, spec)[0]
                pending = []

    return generate()


def _build(args: argparse.Namespace, plan: BuildPlan, profile: InputProfile, engine: Path,
           settings: BuildSettings) -> None:
    check_build_environment()  # before anything is written or any calibration image is read
    if not engine.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {engine.parent}")
    feeds = _live_feeds(args, plan.spec, profile) if plan.int8_source == "images" else None
    calib_out = engine.with_name(engine.name + ".calib.cache") if feeds is not None else None
    if not args.quiet:
        print(f"building {plan.describe()} (this takes minutes)", file=sys.stderr)
    built = build_engine(plan, profile, settings, calibration_feeds=feeds, calibration_cache_out=calib_out,
                         verbose=args.verbose)
    meta = EngineMeta(
        engine_sha256="", tensorrt_version=built.tensorrt_version, gpu_name=built.gpu_name,
        precision=plan.spec.provenance.get("precision", plan.precision), spec=plan.spec,
        profile={profile.name: profile.shapes()}, version_compatible=settings.version_compatible,
        dla_core=settings.dla_core,
        build={**plan.source, "onnx": plan.onnx.name, "strongly_typed": plan.strongly_typed,
               "flags": list(plan.flags), "int8_source": plan.int8_source,
               "fp16_layers": list(plan.fp16_layers), "workspace_mib": settings.workspace_mib, "notes": built.notes})
    try:
        with atomic_path(engine) as tmp:
            tmp.write_bytes(built.data)
            meta.engine_sha256 = file_sha256(tmp)
            write_engine_meta(engine, meta)  # the engine appears only after its side-car is complete
    except BaseException:
        engine_meta_path(engine).unlink(missing_ok=True)
        raise
    if not args.quiet:
        for note in built.notes:
            print(f"note: {note}", file=sys.stderr)
        print(f"wrote {engine} and {engine_meta_path(engine).name} (TensorRT {built.tensorrt_version}, "
              f"{built.gpu_name or 'unknown GPU'})")


def run(args: argparse.Namespace) -> None:
    target = _target(args)
    _validate(args, target)
    plan = plan_build(args.artifact, target, args.precision, source_onnx=args.onnx, model_spec=args.model_spec,
                      int8_source="images" if args.calib_images is not None else "cache",
                      strongly_typed=args.strongly_typed or None)
    if args.dla_core is not None and plan.precision == "fp32":
        raise UsageError("DLA runs fp16 or int8 only; pick --precision fp16 or int8")
    profile = input_profile(plan.spec, batch=args.batch, min_size=args.min_size, opt_size=args.opt_size,
                            max_size=args.max_size)
    settings = BuildSettings(args.workspace, args.timing_cache, args.version_compatible, args.dla_core)
    engine = _output(args, plan)
    if args.print_commands:
        _print_commands(args, plan, profile, engine, settings)
    else:
        _build(args, plan, profile, engine, settings)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except (UsageError, SelectionError, ProfileError, SpecError, BuildEnvironmentError, BuildError,
            FileNotFoundError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, _main, argv, interrupted="interrupted")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
