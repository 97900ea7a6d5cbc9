"""centernet-bundle MODEL -o DIR: the embedded C-API handoff folder for an exported model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from centernet_edge.runtime.cli_common import OneLineParser, add_common_flags, run_main

__all__ = ["main"]

PROG = "centernet-bundle"


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Write a folder an embedded team builds with make or CMake: the network-only ONNX (plus the "
                    "end-to-end and quantized models), manifest.json, the C99 pre/post-processing library with "
                    "this model's spec as C constants, a demo program, and a README with this bundle's parity "
                    "numbers (C library vs the exported ONNX).")
    p.add_argument("model", type=Path, help="an ONNX written by centernet-export (any variant) or a "
                                            "centernet-calibrate output folder (its int8/fp16 artifacts come too)")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle folder to create")
    p.add_argument("--fp32-model", type=Path, default=None,
                   help="the fp32 ONNX of a calibration folder, when it is not beside the folder")
    p.add_argument("--images", type=Path, default=None,
                   help="images for the parity numbers (default: 3 synthetic images)")
    p.add_argument("--parity-images", type=int, default=20, help="how many of --images to use (default 20)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_common_flags(p, "print only the result line")
    return p


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    from .generate import BundleError, make_bundle

    def say(message: str) -> None:
        if not args.quiet:
            print(f"centernet-bundle: {message}", file=sys.stderr, flush=True)

    try:
        result = make_bundle(args.model, args.output, fp32_model=args.fp32_model, images=args.images,
                             parity_images=args.parity_images, overwrite=args.overwrite, progress=say)
    except BundleError as exc:
        print(f"centernet-bundle: error: {exc}", file=sys.stderr)
        return 2
    parity = result.parity or {}
    summary = parity.get("skipped") or (
        f"{parity['images_with_identical_order_and_classes']}/{parity['image_count']} images identical, "
        f"boxes <= {parity['max_box_diff_px']:.1e} px, scores <= {parity['max_score_diff']:.1e}")
    print(f"wrote {result.path} (parity: {summary}); build it with: make -C {result.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, _main, argv, interrupted="interrupted; nothing was written")


if __name__ == "__main__":
    sys.exit(main())
