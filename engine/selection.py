"""Which ONNX file and which builder settings give the requested precision on a TensorRT line.

ARTIFACT is an exported ONNX or a ``centernet-calibrate`` folder (calibration.cache, summary.json,
model_fp16.onnx, model_int8_qdq.onnx). TensorRT 11 builds what the ONNX says (strong typing): fp16 from
model_fp16.onnx, int8 from model_int8_qdq.onnx. TensorRT 10 builds the fp32 ONNX with the FP16 flag, or
with INT8 + FP16 and our calibration cache (or live calibration batches); ``strongly_typed`` asks it for
the TensorRT 11 route instead. The calibration folder does not hold the fp32 model, so routes that need
it take it from ``source_onnx`` and check it against the sha256 the calibration recorded; except int8 from
the cache of a calibration that rescaled channels: its ranges describe the folder's
model_fp32_rescaled.onnx, which is what gets built then.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from centernet_edge.quantize.artifacts import derived_spec
from centernet_edge.quantize.manifest import ARTIFACTS, read_summary
from centernet_edge.runtime.hashing import file_sha256
from centernet_edge.runtime.spec import ModelSpec, load_spec

from .versions import TrtTarget

__all__ = ["BUILD_PRECISIONS", "BuildPlan", "SelectionError", "plan_build"]

BUILD_PRECISIONS = ("fp32", "fp16", "int8")
INT8_SOURCES = ("cache", "images")


class SelectionError(ValueError):
    """The artifact cannot give the requested precision on this TensorRT line."""


@dataclass(frozen=True)
class BuildPlan:
    """What to parse and how to configure the builder.

    ``flags`` are BuilderFlag names (TensorRT 10 only); ``int8_source`` is ``cache`` (our calibration
    cache, served as is), ``images`` (live calibration batches), ``qdq`` (scales in the graph) or None;
    ``fp16_layers`` are ONNX node names kept out of int8 by the mixed-precision search (pinned to fp16
    on TensorRT 10; the Q/DQ graph leaves them float by itself).
    """

    target: TrtTarget
    precision: str
    onnx: Path
    strongly_typed: bool
    flags: tuple[str, ...]
    int8_source: str | None
    calibration_cache: Path | None
    fp16_layers: tuple[str, ...]
    spec: ModelSpec  # the engine's spec: the ONNX's, labelled with the engine's precision
    source: dict[str, Any]

    def describe(self) -> str:
        typing = "strongly typed" if self.strongly_typed else "weakly typed"
        flags = f", flags {'+'.join(self.flags)}" if self.flags else ""
        int8 = f", int8 from {self.int8_source}" if self.int8_source else ""
        return f"TensorRT {self.target.major}: {self.onnx.name}, {self.precision}, {typing}{flags}{int8}"


def _onnx_precision(spec: ModelSpec) -> str:
    """What the ONNX itself computes in: fp32, fp16 or int8 (Q/DQ); the CPU int8 model is refused."""
    label = str(spec.provenance.get("precision", "fp32"))
    fmt = str(spec.provenance.get("int8_format", ""))
    if label.startswith("int8"):
        if fmt and fmt != "qdq-tensorrt":
            raise SelectionError(
                f"this ONNX is the ONNX Runtime CPU int8 model ({fmt}); TensorRT needs model_int8_qdq.onnx or the "
                "fp32 ONNX with calibration.cache")
        return "int8"
    return "fp16" if label == "fp16" else "fp32"


def _calibration_folder(folder: Path) -> dict[str, Any]:
    summary = folder / ARTIFACTS["summary"]
    if not summary.is_file():
        raise SelectionError(f"{folder} is not a centernet-calibrate output folder ({summary.name} is missing)")
    return read_summary(summary)


def _checked_source(source_onnx: Path | None, summary: dict[str, Any], why: str) -> Path:
    if source_onnx is None:
        raise SelectionError(f"{why} needs the fp32 ONNX the calibration was made from: pass it with --onnx")
    if not source_onnx.is_file():
        raise SelectionError(f"--onnx: file not found: {source_onnx}")
    recorded = summary.get("model_sha256")
    actual = file_sha256(source_onnx)
    if recorded and actual != recorded:
        raise SelectionError(
            f"--onnx {source_onnx.name} (sha256 {actual[:12]}) is not the model this calibration was made from "
            f"({str(recorded)[:12]})")
    return source_onnx


def _cache_model(folder: Path, summary: dict[str, Any]) -> Path | None:
    """The folder's rescaled fp32 model when the calibration rescaled channels: the cache's ranges describe
    its tensors, not the source model's, so TensorRT must build it (same function, other weights)."""
    name = summary.get("cache_model")
    if not name:
        return None
    path = folder / str(name)
    if not path.is_file():
        raise SelectionError(f"{folder.name}/{name} is missing: the calibration.cache ranges describe that "
                             "rescaled model's tensors; rerun centernet-calibrate")
    recorded = summary.get("cache_model_sha256")
    if recorded and file_sha256(path) != recorded:
        raise SelectionError(f"{folder.name}/{name} changed after calibration (sha256 differs from summary.json); "
                             "rerun centernet-calibrate")
    return path


def _folder_file(folder: Path, key: str, hint: str) -> Path:
    path = folder / ARTIFACTS[key]
    if not path.is_file():
        raise SelectionError(f"{folder.name}/{path.name} is missing: {hint}")
    return path


def _plan(target: TrtTarget, precision: str, onnx: Path, description: Path | None, *, strongly_typed: bool,
          flags: tuple[str, ...] = (), int8_source: str | None = None, cache: Path | None = None,
          fp16_layers: tuple[str, ...] = (), source: dict[str, Any]) -> BuildPlan:
    spec = load_spec(onnx, description)
    label = precision
    if precision == "int8":
        mixed = fp16_layers or str(spec.provenance.get("precision", "")) == "int8-mixed"
        label = "int8-mixed" if mixed else "int8"
    # The spec of an fp16/Q/DQ ONNX already says so; the implicit routes relabel the fp32 spec.
    engine_spec = derived_spec(spec, label, {"engine_builder": "centernet-build"})
    engine_spec = dataclasses.replace(engine_spec, provenance={
        **engine_spec.provenance, "onnx_sha256": file_sha256(onnx)})
    return BuildPlan(target, precision, onnx, strongly_typed, flags, int8_source, cache, fp16_layers,
                     engine_spec, source)


def plan_build(
    artifact: str | Path,
    target: TrtTarget,
    precision: str | None = None,
    *,
    source_onnx: str | Path | None = None,
    model_spec: str | Path | None = None,
    int8_source: str = "cache",
    strongly_typed: bool | None = None,
) -> BuildPlan:
    """Pick the ONNX and builder settings for ``precision`` (default: the artifact's own; int8 for a
    calibration folder). ``int8_source`` on TensorRT 10: ``cache`` or ``images`` (live calibration).
    ``strongly_typed`` (TensorRT 10 only) builds the folder's fp16 / Q/DQ ONNX as TensorRT 11 would."""
    path = Path(artifact)
    source = Path(source_onnx) if source_onnx is not None else None
    description = Path(model_spec) if model_spec is not None else None
    if precision is not None and precision not in BUILD_PRECISIONS:
        raise SelectionError(f"precision must be one of {', '.join(BUILD_PRECISIONS)}; got {precision!r}")
    if int8_source not in INT8_SOURCES:
        raise SelectionError(f"int8 source must be one of {', '.join(INT8_SOURCES)}; got {int8_source!r}")
    if strongly_typed and not target.implicit_precision:
        strongly_typed = None  # TensorRT 11 is always strongly typed
    explicit = not target.implicit_precision or bool(strongly_typed)
    if path.is_dir():
        return _from_folder(path, target, precision or "int8", source, description, int8_source, explicit)
    if not path.is_file():
        raise SelectionError(f"artifact not found: {path}")
    if path.suffix.lower() != ".onnx":
        raise SelectionError(f"{path.name}: expected an .onnx file or a centernet-calibrate folder")
    return _from_onnx(path, target, precision, description, int8_source, explicit)


def _from_onnx(path: Path, target: TrtTarget, precision: str | None, description: Path | None,
               int8_source: str, explicit: bool) -> BuildPlan:
    own = _onnx_precision(load_spec(path, description))
    precision = precision or own
    src = {"artifact": path.name, "artifact_sha256": file_sha256(path)}
    if own != "fp32" or explicit:
        if precision != own:
            how = ("TensorRT 11 builds the precision the ONNX is in (strongly typed)" if not target.implicit_precision
                   else "a strongly typed build uses the precision the ONNX is in")
            raise SelectionError(
                f"{path.name} is {own}; {how}. For {precision} pass the centernet-calibrate folder (it has "
                f"{ARTIFACTS['fp16'] if precision == 'fp16' else ARTIFACTS['qdq']}) or that file")
        return _plan(target, precision, path, description, strongly_typed=own != "fp32" or explicit,
                     int8_source="qdq" if own == "int8" else None, source=src)
    if precision == "fp32":
        return _plan(target, "fp32", path, description, strongly_typed=False, source=src)
    if precision == "fp16":
        return _plan(target, "fp16", path, description, strongly_typed=False, flags=("FP16",), source=src)
    if int8_source == "cache":
        raise SelectionError(
            f"int8 from {path.name} needs calibration: pass the centernet-calibrate folder as ARTIFACT with "
            "--onnx this file (its calibration.cache is used), or --calib-images DIR for live calibration")
    return _plan(target, "int8", path, description, strongly_typed=False, flags=("INT8", "FP16"),
                 int8_source="images", source=src)


def _from_folder(folder: Path, target: TrtTarget, precision: str, source: Path | None, description: Path | None,
                 int8_source: str, explicit: bool) -> BuildPlan:
    summary = _calibration_folder(folder)
    src: dict[str, Any] = {"artifact": folder.name, "calibration_model_sha256": summary.get("model_sha256"),
                           "calibration_dataset_hash": summary.get("dataset_hash"),
                           "calibration_method": summary.get("selected_method", summary.get("method"))}
    rerun = "rerun centernet-calibrate with --{}"
    if precision == "fp32":
        onnx = _checked_source(source, summary, "an fp32 engine from a calibration folder")
        return _plan(target, "fp32", onnx, description, strongly_typed=False, source=src)
    if explicit:
        if precision == "fp16":
            onnx = _folder_file(folder, "fp16", rerun.format("fp16"))
            return _plan(target, "fp16", onnx, description, strongly_typed=True, source=src)
        onnx = _folder_file(folder, "qdq", rerun.format("int8"))
        return _plan(target, "int8", onnx, description, strongly_typed=True, int8_source="qdq", source=src)
    cache_model = _cache_model(folder, summary) if precision == "int8" and int8_source == "cache" else None
    if cache_model is not None:
        if source is not None:
            _checked_source(source, summary, "")  # a wrong --onnx is still an error, though it is not built
        cache = _folder_file(folder, "cache", "rerun centernet-calibrate")
        float_layers = tuple(str(n) for n in summary.get("float_layers", []))
        return _plan(target, "int8", cache_model, description, strongly_typed=False, flags=("INT8", "FP16"),
                     int8_source="cache", cache=cache, fp16_layers=float_layers, source=src)
    onnx = _checked_source(source, summary, f"{precision} on TensorRT {target.major} (fp32 ONNX + builder flags)")
    if precision == "fp16":
        return _plan(target, "fp16", onnx, description, strongly_typed=False, flags=("FP16",), source=src)
    float_layers = tuple(str(n) for n in summary.get("float_layers", []))
    if int8_source == "images":
        return _plan(target, "int8", onnx, description, strongly_typed=False, flags=("INT8", "FP16"),
                     int8_source="images", fp16_layers=float_layers, source=src)
    cache = _folder_file(folder, "cache", "rerun centernet-calibrate")
    return _plan(target, "int8", onnx, description, strongly_typed=False, flags=("INT8", "FP16"),
                 int8_source="cache", cache=cache, fp16_layers=float_layers, source=src)
