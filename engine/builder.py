"""Building a serialized engine with the TensorRT Python API (10.x and 11.x).

Nothing here runs without TensorRT and a GPU: :func:`check_build_environment` answers first, from the
GPU probe, so a machine without a device never reaches a TensorRT builder (the lean runtime crashes the
process there). Written against NVIDIA's documented Python API; see README "TensorRT" for what has
been run where.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from centernet_edge.runtime.atomic import atomic_write_bytes
from centernet_edge.runtime.cuda_probe import gpu_devices, gpu_name, tensorrt_installed

from .calibrator import cache_bytes_for, make_batch_calibrator, make_cache_calibrator
from .commands import BuildSettings
from .profiles import InputProfile
from .selection import BuildPlan

__all__ = ["BuildEnvironmentError", "BuildError", "BuiltEngine", "build_engine", "check_build_environment"]

log = logging.getLogger("centernet_edge.engine")

INSTALL_HINT = ("install TensorRT on the build machine (x86: pip install 'centernet-edge[trt]' from NVIDIA's "
                "package index; Jetson: JetPack's python3-libnvinfer), or print the equivalent trtexec line "
                "with --print-commands --trt-version 10|11")


class BuildEnvironmentError(RuntimeError):
    """TensorRT or a GPU is missing: nothing can be built here."""


class BuildError(RuntimeError):
    """TensorRT refused the network or the configuration."""


@dataclass
class BuiltEngine:
    data: bytes
    tensorrt_version: str
    gpu_name: str | None
    notes: list[str] = field(default_factory=list)


def check_build_environment() -> None:
    """Raise :class:`BuildEnvironmentError` unless TensorRT is importable and a GPU is visible.

    The GPU is probed before ``tensorrt`` is imported."""
    if not tensorrt_installed():
        raise BuildEnvironmentError(f"TensorRT is not installed: {INSTALL_HINT}")
    probe = gpu_devices()
    if not probe.found:
        raise BuildEnvironmentError(
            f"no NVIDIA GPU is visible ({probe.how}); TensorRT builds engines on the GPU they will run on: run "
            "this on the target, or print the equivalent commands with --print-commands")


def _parse(trt: Any, network: Any, logger: Any, onnx_path: Path) -> Any:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT's ONNX parser rejected {onnx_path.name}: " + " | ".join(errors[:3]))
    return parser


def _pin_fp16(trt: Any, network: Any, names: tuple[str, ...]) -> list[str]:
    """Keep the mixed-precision float layers and plugin layers (DCN: fp32/fp16 only) out of int8."""
    wanted = set(names)
    plugin_types = {getattr(trt.LayerType, t) for t in ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3")
                    if hasattr(trt.LayerType, t)}
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name in wanted or layer.type in plugin_types:
            layer.precision = trt.float16
            pinned.append(layer.name)
    missing = sorted(wanted - set(pinned))
    if missing:
        log.warning("%d float layer name(s) not found in the TensorRT network (e.g. %r); they are left to the "
                    "builder", len(missing), missing[0])
    return pinned


def _profile(builder: Any, profile: InputProfile, shapes: tuple[tuple[int, ...], ...] | None = None) -> Any:
    p = builder.create_optimization_profile()
    lo, mid, hi = shapes or (profile.min, profile.opt, profile.max)
    p.set_shape(profile.name, lo, mid, hi)
    return p


def _torch_to_cuda(batch: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(batch).cuda()


def build_engine(plan: BuildPlan, profile: InputProfile, settings: BuildSettings | None = None, *,
                 calibration_feeds: Iterator[np.ndarray] | None = None, calibration_cache_out: Path | None = None,
                 verbose: bool = False) -> BuiltEngine:
    """Parse ``plan.onnx`` and build it as the plan says; returns the serialized engine."""
    check_build_environment()
    import tensorrt as trt

    settings = settings or BuildSettings()

    version = str(trt.__version__)
    if int(version.split(".")[0]) != plan.target.major:
        raise BuildError(f"the plan targets TensorRT {plan.target.major}, the installed TensorRT is {version}")
    notes: list[str] = []
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # DeformConv is imported as the ModulatedDeformConv2d plugin
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed and plan.target.implicit_precision:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # 11.x: always, flag not needed
    network = builder.create_network(flags)
    _parse(trt, network, logger, plan.onnx)
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if inputs != [profile.name]:
        raise BuildError(f"{plan.onnx.name}: the network's inputs are {inputs}; the model spec names {profile.name!r}")

    config = builder.create_builder_config()
    if settings.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    config.add_optimization_profile(_profile(builder, profile))

    if plan.int8_source in ("cache", "images"):
        # Calibration (even one answered from a cache) runs at one fixed shape: the profile's opt.
        config.set_calibration_profile(_profile(builder, profile, (profile.opt, profile.opt, profile.opt)))
        if plan.int8_source == "cache":
            assert plan.calibration_cache is not None
            data, algorithm = cache_bytes_for(plan.calibration_cache, version)
            calibrator = make_cache_calibrator(trt, data, algorithm)
        else:
            if calibration_feeds is None:
                raise BuildError("live int8 calibration needs calibration images")
            calibrator = make_batch_calibrator(trt, calibration_feeds, profile.opt[0], _torch_to_cuda,
                                               calibration_cache_out)
        config.int8_calibrator = calibrator
        pinned = _pin_fp16(trt, network, plan.fp16_layers)
        if pinned:
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
            notes.append(f"{len(pinned)} layer(s) pinned to fp16")

    timing = None
    if settings.timing_cache is not None:
        previous = settings.timing_cache.read_bytes() if settings.timing_cache.is_file() else b""
        timing = config.create_timing_cache(previous)
        config.set_timing_cache(timing, ignore_mismatch=False)
    if settings.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        if any(network.get_layer(i).type == getattr(trt.LayerType, "PLUGIN_V2", None)
               for i in range(network.num_layers)):
            notes.append("the network uses plugins; a version-compatible engine needs them at run time too")
    if settings.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(settings.dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT could not build {plan.onnx.name} (see TensorRT's messages above)")
    if timing is not None and settings.timing_cache is not None:
        atomic_write_bytes(settings.timing_cache, bytes(config.get_timing_cache().serialize()))
    if plan.int8_source == "cache" and getattr(calibrator, "batch_requests", 0):
        notes.append("TensorRT asked the cache calibrator for batches: it did not accept calibration.cache")
    return BuiltEngine(bytes(serialized), version, gpu_name(), notes)
