"""``centernet-detect``: draw a model's detections on images, folders of images or video files.

    centernet-detect model.onnx photo.jpg holiday/ -o detect_out/
    centernet-detect foreign.onnx --model-spec foreign.json street.mp4 -o detect_out/ --score-threshold 0.4

Writes into ``-o``: one annotated copy per image (same name), one annotated video per video file, and
detections.json (per image / per frame: boxes, scores, class indices and names). Everything is written into
a temporary folder first and moved into place at the end, so a failure or Ctrl-C leaves nothing behind.
Exit codes: 0 ok, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["VIDEO_EXTENSIONS", "build_parser", "main"]

PROG = "centernet-detect"
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})
# cv2.imwrite can write these; anything else (EXR, HDR, ...) is written as PNG.
_WRITABLE_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
# Preferred first; which one works depends on how OpenCV was built.
_VIDEO_CODECS = (("mp4v", ".mp4"), ("MJPG", ".avi"))

_EPILOG = """outputs (in -o): annotated images (input names; PNG for formats OpenCV cannot write),
annotated videos (.mp4 with mp4v, or .avi with MJPG where mp4v is unavailable) and detections.json.
Boxes are (x1, y1, x2, y2) in original pixels, clipped to the image. Unreadable images are skipped and
listed in detections.json and on stderr (--strict: stop instead).
exit codes: 0 ok, 2 bad input, 130 interrupted."""


class DetectError(ValueError):
    """Inputs or options that cannot be processed; the message says which and why."""


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1]; got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1]; got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from centernet_edge.runtime.cli_common import OneLineParser, add_common_flags

    from .detector import DEFAULT_SCORE_THRESHOLD

    p = OneLineParser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
                description="Run a CenterNet model on images, image folders or video files and write annotated "
                "copies (boxes, class names, scores) plus the detections as JSON: a first look at what a "
                "model does, before any numbers.")
    p.add_argument("model", type=Path, metavar="MODEL",
                   help="model file: an exported .onnx, a foreign ONNX with --model-spec, or a .pth checkpoint")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                   help="image files, folders of images (and videos), or video files "
                   f"({', '.join(sorted(VIDEO_EXTENSIONS))})")
    p.add_argument("-o", "--output-dir", type=Path, required=True, metavar="DIR",
                   help="where the annotated files and detections.json go (created; same names replaced)")
    p.add_argument("--model-spec", type=Path, metavar="JSON",
                   help="model description for an ONNX without an embedded spec (see eval/model_descriptions/)")
    p.add_argument("--score-threshold", type=_threshold, default=DEFAULT_SCORE_THRESHOLD, metavar="S",
                   help=f"draw and record detections scoring at least S (default {DEFAULT_SCORE_THRESHOLD})")
    p.add_argument("--backend", help="runtime backend (default by file extension: .onnx ort, .pth torch)")
    p.add_argument("--providers", metavar="LIST",
                   help="ONNX Runtime providers, comma separated (cpu, cuda, tensorrt); default CUDA if available")
    p.add_argument("--threads", type=int, metavar="N", help="intra-op threads")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping")
    add_common_flags(p, "no progress bars: only the line saying what was written, warnings and errors")
    return p


# ---- inputs --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Item:
    path: Path
    kind: str  # "image" or "video"


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def collect_inputs(inputs: Sequence[Path]) -> list[_Item]:
    """Images and videos in command-line order; a folder contributes its images and videos sorted by name."""
    from centernet_edge.runtime.images import list_images

    items: list[_Item] = []
    for given in inputs:
        if given.is_dir():
            videos = [p for p in given.iterdir() if p.is_file() and _is_video(p) and not p.name.startswith(".")]
            found = sorted([*list_images(given), *videos], key=lambda p: p.name)
            if not found:
                raise DetectError(f"no images or videos in folder {given}")
            items += [_Item(p, "video" if _is_video(p) else "image") for p in found]
        elif given.is_file():
            items.append(_Item(given, "video" if _is_video(given) else "image"))
        else:
            raise DetectError(f"input not found: {given}")
    seen: set[Path] = set()
    unique = []
    for item in items:
        key = item.path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique


def _output_name(path: Path, suffix: str, taken: set[str]) -> str:
    stem, n = path.stem, 2
    name = stem + suffix
    while name.lower() in taken:  # two inputs with one name (from different folders)
        name, n = f"{stem}-{n}{suffix}", n + 1
    taken.add(name.lower())
    return name


# ---- processing ----------------------------------------------------------------------------------------


@dataclass
class _Summary:
    images: list[dict[str, Any]] = field(default_factory=list)
    videos: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _open_writer(stage: Path, source: Path, fps: float, size: tuple[int, int], taken: set[str]) -> tuple[Any, str]:
    import cv2

    for codec, suffix in _VIDEO_CODECS:
        name = _output_name(source, suffix, taken)
        writer = cv2.VideoWriter(str(stage / name), cv2.VideoWriter_fourcc(*codec), fps, size)
        if writer.isOpened():
            return writer, name
        writer.release()
        taken.discard(name.lower())
        (stage / name).unlink(missing_ok=True)
    raise DetectError(f"this OpenCV build cannot write video ({', '.join(c for c, _ in _VIDEO_CODECS)})")


def _run_video(detector: Any, item: _Item, stage: Path, taken: set[str], summary: _Summary, quiet: bool) -> None:
    import cv2
    from tqdm import tqdm

    from .drawing import draw_detections

    capture = cv2.VideoCapture(str(item.path))
    try:
        ok, frame = capture.read() if capture.isOpened() else (False, None)
        if not ok or frame is None:
            raise DetectError(f"cannot read video {item.path}: no decodable frames")
        fps = capture.get(cv2.CAP_PROP_FPS)
        fps = fps if fps and fps == fps and 0 < fps < 1000 else 25.0  # some containers report 0 or NaN
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        h, w = frame.shape[:2]
        writer, name = _open_writer(stage, item.path, fps, (w, h), taken)
        frames: list[list[dict[str, Any]]] = []
        try:
            with tqdm(total=total, desc=item.path.name, unit="frame", disable=quiet) as bar:
                while ok:
                    dets = detector.detect([frame])[0]
                    frames.append(detector.records(dets))
                    writer.write(draw_detections(frame, dets, detector.class_names))
                    bar.update(1)
                    ok, frame = capture.read()
        finally:
            writer.release()
    finally:
        capture.release()
    summary.videos.append({"input": str(item.path), "output": name, "width": w, "height": h, "fps": fps,
                           "frames": len(frames), "detections": frames})


def _run_images(detector: Any, items: list[_Item], stage: Path, taken: set[str], summary: _Summary,
                strict: bool, quiet: bool) -> None:
    import cv2
    from tqdm import tqdm

    from centernet_edge.runtime.images import ReadReport, read_bgr

    from .drawing import draw_detections

    report = ReadReport(strict=strict)  # strict: the first unreadable file raises UnreadableImageError
    for item in tqdm(items, desc="images", unit="img", disable=quiet or len(items) < 2):
        image = read_bgr(item.path, report)
        if image is None:
            summary.skipped[str(item.path)] = report.skip_reasons.get(str(item.path), "unreadable")
            continue
        dets = detector.detect([image])[0]
        suffix = item.path.suffix.lower() if item.path.suffix.lower() in _WRITABLE_IMAGE_SUFFIXES else ".png"
        name = _output_name(item.path, suffix, taken)
        if not cv2.imwrite(str(stage / name), draw_detections(image, dets, detector.class_names)):
            raise DetectError(f"cannot write {name}")
        summary.images.append({"input": str(item.path), "output": name, "width": image.shape[1],
                               "height": image.shape[0], "detections": detector.records(dets)})


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Detect as the arguments say; returns the detections document that was written."""
    from centernet_edge.runtime.atomic import staged_dir
    from centernet_edge.runtime.cli_common import check_output_dir

    from .detector import Detector

    items = collect_inputs(args.inputs)
    if args.output_dir.resolve() in {i.path.resolve().parent for i in items} and args.output_dir.exists():
        raise DetectError(f"output directory {args.output_dir} holds inputs; choose another -o")
    if args.threads is not None and args.threads < 1:
        raise DetectError(f"--threads must be >= 1; got {args.threads}")
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    summary = _Summary()
    check_output_dir(args.output_dir)
    with staged_dir(args.output_dir) as stage, Detector(
        args.model, model_spec=args.model_spec, score_threshold=args.score_threshold, clip_boxes=True,
        backend=args.backend, providers=providers, threads=args.threads,
    ) as detector:
        taken = {"detections.json"}
        images = [i for i in items if i.kind == "image"]
        if images:
            _run_images(detector, images, stage, taken, summary, args.strict, args.quiet)
        for item in items:
            if item.kind == "video":
                _run_video(detector, item, stage, taken, summary, args.quiet)
        if not summary.images and not summary.videos:
            raise DetectError(f"none of the {len(items)} input(s) could be read: "
                              + "; ".join(f"{Path(k).name}: {v}" for k, v in list(summary.skipped.items())[:3]))
        document = {
            "model": detector.spec.name,
            "model_file": args.model.name,
            "score_threshold": args.score_threshold,
            "box_format": "x1, y1, x2, y2 in original pixels, clipped to the image",
            "class_names": detector.class_names,
            "images": summary.images,
            "videos": summary.videos,
            "skipped": summary.skipped,
        }
        (stage / "detections.json").write_text(json.dumps(document, indent=1) + "\n")
    return document


def _user_errors() -> tuple[type[BaseException], ...]:
    from centernet_edge.runtime.cli_common import OutputError
    from centernet_edge.runtime.images import UnreadableImageError
    from centernet_edge.runtime.runners import RunnerError
    from centernet_edge.runtime.spec import SpecError

    from .detector import ImageReadError

    known: tuple[type[BaseException], ...] = (DetectError, SpecError, RunnerError, ImageReadError, OutputError,
                                              UnreadableImageError, OSError)
    checkpoints = sys.modules.get("centernet_edge.export.checkpoints")  # only loaded when a .pth was given
    if checkpoints is not None:
        known += (checkpoints.CheckpointError,)
    return known


def _main(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad flag already reported in one line
        return exc.code if isinstance(exc.code, int) else 2
    try:
        document = run(args)
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        print(f"{PROG}: error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
              file=sys.stderr)
        return 2
    for name, reason in document["skipped"].items():
        print(f"{PROG}: warning: skipped {name}: {reason} (--strict fails instead)", file=sys.stderr)
    frames = sum(v["frames"] for v in document["videos"])
    print(f"wrote {len(document['images'])} image(s), {len(document['videos'])} video(s) ({frames} frames) "
          f"and detections.json to {args.output_dir}" + (f"; skipped {len(document['skipped'])}"
                                                         if document["skipped"] else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    from centernet_edge.runtime.cli_common import run_main

    return run_main(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
