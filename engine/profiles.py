"""Optimisation-profile shapes of the graph input, derived from the model spec.

Fixed-size graphs (the default 512x512 export) get min = opt = max. Raw-image graphs (the graph warps)
and keep_res graphs take a different size per image, so their spatial dims span a range; keep_res
network inputs are always multiples of ``pad + 1``, so a range for them is rounded onto that grid.
Batches above one only make sense for fixed-size inputs (images of different sizes cannot share one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from centernet_edge.runtime.spec import ModelSpec

__all__ = ["RAW_IMAGE_SIZES", "KEEP_RES_SIZES", "InputProfile", "ProfileError", "input_profile", "parse_size"]

# (height, width) defaults: COCO images are at most 640 on the long side; 1920 covers 1080p both ways.
RAW_IMAGE_SIZES = {"min": (32, 32), "opt": (480, 640), "max": (1920, 1920)}
KEEP_RES_SIZES = {"min": (32, 32), "opt": (512, 640), "max": (1024, 1024)}


class ProfileError(ValueError):
    """Requested profile sizes do not fit the model's input."""


@dataclass(frozen=True)
class InputProfile:
    """min/opt/max shapes of one input, in the graph's layout."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @property
    def is_static(self) -> bool:
        return self.min == self.opt == self.max

    @property
    def max_batch(self) -> int:
        return self.max[0]

    def shapes(self) -> list[list[int]]:
        return [list(self.min), list(self.opt), list(self.max)]

    def contains(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(
            lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max, strict=True))


def parse_size(text: str) -> tuple[int, int]:
    """``"480x640"`` (HEIGHTxWIDTH) or ``"512"`` (square) -> (height, width)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not match:
        raise ValueError(f"size must be HEIGHTxWIDTH (e.g. 480x640) or one number; got {text!r}")
    h = int(match.group(1))
    w = int(match.group(2) or h)
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive; got {text!r}")
    return h, w


def _on_grid(size: tuple[int, int], step: int, up: bool) -> tuple[int, int]:
    def one(v: int) -> int:
        return max(step, -(-v // step) * step if up else v // step * step)

    return one(size[0]), one(size[1])


def _varies(spec: ModelSpec) -> bool:
    return spec.graph.preprocess == "warp" or spec.preprocess.resize == "keep_res"


def _spatial(spec: ModelSpec, sizes: dict[str, tuple[int, int] | None]) -> dict[str, tuple[int, int]]:
    given = {k: v for k, v in sizes.items() if v is not None}
    if not _varies(spec):
        h, w = spec.preprocess.input_size or (0, 0)
        if given:
            raise ProfileError(
                f"the model's input is fixed at {h}x{w}; --min-size/--opt-size/--max-size apply only to "
                "raw-image (graph warps) and keep_res models")
        return {"min": (h, w), "opt": (h, w), "max": (h, w)}
    raw = spec.graph.preprocess == "warp"
    chosen = {k: given.get(k, default) for k, default in (RAW_IMAGE_SIZES if raw else KEEP_RES_SIZES).items()}
    if not raw:  # keep_res network inputs: padded to multiples of pad + 1
        step = spec.preprocess.pad + 1
        chosen = {"min": _on_grid(chosen["min"], step, up=False), "opt": _on_grid(chosen["opt"], step, up=True),
                  "max": _on_grid(chosen["max"], step, up=True)}
    lo, mid, hi = chosen["min"], chosen["opt"], chosen["max"]
    if not all(a <= b <= c for a, b, c in zip(lo, mid, hi, strict=True)):
        raise ProfileError(f"sizes must satisfy min <= opt <= max in both dims; got min {lo}, opt {mid}, max {hi}")
    return chosen


def _batch(spec: ModelSpec, batch: int | None) -> tuple[int, int, int]:
    dim = spec.graph.input.shape[0] if spec.graph.input.shape else None
    fixed = spec.graph.batch if spec.graph.batch is not None else (dim if isinstance(dim, int) else None)
    if fixed is not None:
        if batch is not None and batch != fixed:
            raise ProfileError(f"the model has a fixed batch of {fixed}; cannot build for batch {batch}")
        return fixed, fixed, fixed
    if batch is None:
        return 1, 1, 1
    if batch < 1:
        raise ProfileError(f"batch must be positive; got {batch}")
    if batch > 1 and _varies(spec):
        raise ProfileError(
            "batch > 1 needs a fixed-size input; this model takes one size per image "
            f"(graph.preprocess={spec.graph.preprocess!r}, resize={spec.preprocess.resize!r})")
    return 1, batch, batch


def input_profile(
    spec: ModelSpec,
    *,
    batch: int | None = None,
    min_size: tuple[int, int] | None = None,
    opt_size: tuple[int, int] | None = None,
    max_size: tuple[int, int] | None = None,
) -> InputProfile:
    """The profile of ``spec``'s graph input. ``batch`` is the largest batch (opt = max) of a
    dynamic-batch graph; sizes are (height, width) of raw images (warp graphs) or network inputs."""
    info = spec.graph.input
    layout = info.layout or ("NHWC" if spec.graph.preprocess in ("warp", "normalize") else "NCHW")
    channels = 3
    spatial = _spatial(spec, {"min": min_size, "opt": opt_size, "max": max_size})
    batches = _batch(spec, batch)

    def shape(n: int, hw: tuple[int, int]) -> tuple[int, ...]:
        return (n, hw[0], hw[1], channels) if layout == "NHWC" else (n, channels, hw[0], hw[1])

    return InputProfile(info.name, shape(batches[0], spatial["min"]), shape(batches[1], spatial["opt"]),
                        shape(batches[2], spatial["max"]))
