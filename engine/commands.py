"""The trtexec and Polygraphy command lines equivalent to a build, for users who build on the target.

Flags per line (NVIDIA's trtexec reference and 10.x -> 11.x migration guide): TensorRT 10 takes
``--fp16``, ``--int8``, ``--calib=<cache>``, ``--stronglyTyped``, ``--precisionConstraints`` and
``--layerPrecisions``; TensorRT 11 removed all of them (every network is strongly typed), so its lines
carry none. Both take ``--minShapes/--optShapes/--maxShapes``, ``--memPoolSize=workspace:<MiB>``,
``--timingCacheFile``, ``--versionCompatible`` and ``--useDLACore`` with ``--allowGPUFallback``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from .profiles import InputProfile
from .selection import BuildPlan

__all__ = ["TRT11_REMOVED_FLAGS", "BuildSettings", "polygraphy_command", "render", "trtexec_command"]

TRT11_REMOVED_FLAGS = ("--fp16", "--int8", "--best", "--calib", "--bf16", "--fp8", "--int4", "--stronglyTyped",
                       "--precisionConstraints", "--layerPrecisions", "--layerOutputTypes", "--directIO")

# Polygraphy comparison tolerances per engine precision: starting points for the heads, not guarantees.
_TOLERANCES = {"fp32": ("1e-3", "1e-3"), "fp16": ("5e-2", "5e-2"), "int8": ("1e-1", "1e-1")}


@dataclass(frozen=True)
class BuildSettings:
    """Builder options that are not about precision."""

    workspace_mib: int | None = None
    timing_cache: Path | None = None
    version_compatible: bool = False
    dla_core: int | None = None


def _dims(shape: tuple[int, ...], sep: str) -> str:
    return sep.join(str(d) for d in shape)


def trtexec_command(plan: BuildPlan, profile: InputProfile, engine: str | Path,
                    settings: BuildSettings = BuildSettings()) -> list[str]:
    """``trtexec`` arguments building the same engine as ``plan`` (None for live calibration: trtexec
    cannot calibrate from images)."""
    if plan.int8_source == "images":
        raise ValueError("trtexec cannot calibrate from images; build with centernet-build or use the "
                         "calibration folder's cache")
    cmd = ["trtexec", f"--onnx={plan.onnx}", f"--saveEngine={engine}"]
    for key, shape in (("min", profile.min), ("opt", profile.opt), ("max", profile.max)):
        cmd.append(f"--{key}Shapes={profile.name}:{_dims(shape, 'x')}")
    if plan.target.implicit_precision:
        if plan.strongly_typed:
            cmd.append("--stronglyTyped")
        if "FP16" in plan.flags:
            cmd.append("--fp16")
        if "INT8" in plan.flags:
            cmd.append("--int8")
        if plan.calibration_cache is not None:
            cmd.append(f"--calib={plan.calibration_cache}")
        if plan.fp16_layers:
            cmd.append("--precisionConstraints=prefer")
            cmd.append("--layerPrecisions=" + ",".join(f"{name}:fp16" for name in plan.fp16_layers))
    if settings.workspace_mib:
        cmd.append(f"--memPoolSize=workspace:{settings.workspace_mib}")
    if settings.timing_cache is not None:
        cmd.append(f"--timingCacheFile={settings.timing_cache}")
    if settings.version_compatible:
        cmd.append("--versionCompatible")
    if settings.dla_core is not None:
        cmd += [f"--useDLACore={settings.dla_core}", "--allowGPUFallback"]
    return cmd


def polygraphy_command(plan: BuildPlan, profile: InputProfile, data_loader: str | Path | None = None,
                       settings: BuildSettings = BuildSettings()) -> list[str]:
    """``polygraphy run`` comparing TensorRT with ONNX Runtime on the ONNX the plan builds.

    On TensorRT 10 the implicit routes compare the engine's precision (``--fp16``/``--int8`` with our
    cache) against ONNX Runtime in fp32; strongly typed routes compare both backends on the same graph.
    Inputs: real images through ``data_loader`` (a script from ``calib_data.polygraphy_loader``), else
    random pixels in the input's range at the opt shape."""
    cmd = ["polygraphy", "run", str(plan.onnx), "--trt", "--onnxrt"]
    if plan.target.implicit_precision and not plan.strongly_typed:
        if "FP16" in plan.flags:
            cmd.append("--fp16")
        if "INT8" in plan.flags:
            cmd.append("--int8")
        if plan.calibration_cache is not None:
            cmd += ["--calibration-cache", str(plan.calibration_cache)]
    for key, shape in (("min", profile.min), ("opt", profile.opt), ("max", profile.max)):
        cmd += [f"--trt-{key}-shapes", f"{profile.name}:[{_dims(shape, ',')}]"]
    if data_loader is not None:
        cmd += ["--data-loader-script", str(data_loader)]
    else:
        cmd += ["--input-shapes", f"{profile.name}:[{_dims(profile.opt, ',')}]"]
        if plan.spec.graph.input.dtype == "uint8":
            cmd += ["--val-range", f"{profile.name}:[0,255]"]
    if settings.workspace_mib:
        cmd += ["--pool-limit", f"workspace:{settings.workspace_mib << 20}"]
    atol, rtol = _TOLERANCES[plan.precision]
    cmd += ["--atol", atol, "--rtol", rtol, "--check-error-stat", "median"]
    return cmd


def render(cmd: list[str]) -> str:
    return shlex.join(cmd)
