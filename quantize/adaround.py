"""AdaRound-style weight rounding for one conv layer, on cached calibration samples (torch, CPU).

Nearest rounding minimises each weight's own error, not the layer's output error. AdaRound (Nagel et al.,
2020) learns, per weight, whether to round down or up: ``W_q = s * clip(floor(W/s) + h(V), -127, 127)``
with ``h`` a rectified sigmoid, minimising ``||x_q W_q - y_fp32||^2`` on calibration inputs plus a term
that pushes every ``h`` to 0 or 1 (annealed; weighted relative to the nearest rounding's error, so the
balance does not depend on the layer's scale), then hardening ``h``. ``x_q`` are the layer's inputs as the
quantized model delivers them (upstream layers already quantized), ``y_fp32`` the fp32 model's outputs, so
the layer also learns to absorb part of the error arriving from upstream.

The layer is given in column form (see :mod:`layer_samples`): ``x`` ``[P, G, K]`` sampled input patches per
group, ``y`` ``[P, G, O]`` the fp32 outputs at those positions, weights ``[G, O, K]`` with per-output-channel
scales. The scale of every channel is kept (the largest weight of a channel keeps its nearest rounding),
so the result is a plain per-channel int8 weight that any builder re-derives exactly from ``q * s``.
The returned rounding is never worse than nearest on the samples it minimises: both are scored after
hardening and the better one is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RoundingResult", "adaround_layer", "nearest_levels", "reconstruction_error"]

_ZETA, _GAMMA = 1.1, -0.1  # rectified sigmoid stretch (from the AdaRound paper)


@dataclass(frozen=True)
class RoundingResult:
    """Integer levels ``[G, O, K]`` and the relative reconstruction errors of both roundings."""

    levels: np.ndarray
    nearest_error: float
    error: float
    adaround_kept: bool


def nearest_levels(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Round-to-nearest int8 levels of ``weight`` ``[G, O, K]`` with per-channel ``scale`` ``[G, O, 1]``."""
    return np.clip(np.rint(weight / scale), -127, 127).astype(np.float32)


def reconstruction_error(x: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> float:
    """``sum (x W + b - y)^2 / sum y^2`` over the samples (column form; see module docstring)."""
    out = np.einsum("pgk,gok->pgo", x, weight, optimize=True)
    if bias is not None:
        out = out + bias
    diff = (out - y).astype(np.float64)
    ref = float(np.square(y, dtype=np.float64).sum())
    return float(np.square(diff).sum()) / ref if ref > 0 else float(np.square(diff).sum())


def adaround_layer(x: np.ndarray, y: np.ndarray, weight: np.ndarray, scale: np.ndarray,
                   bias: np.ndarray | None, iterations: int = 200, batch: int = 512,
                   reg_weight: float = 10.0, seed: int = 0, lr: float = 1e-2) -> RoundingResult:
    """Learned rounding of one layer (module docstring). ``x`` ``[P, G, K]``, ``y`` ``[P, G, O]``,
    ``weight`` ``[G, O, K]``, ``scale`` ``[G, O, 1]``, ``bias`` ``[G, O]`` or None."""
    import torch

    nearest = nearest_levels(weight, scale)
    nearest_err = reconstruction_error(x, y, nearest * scale, bias)
    if iterations <= 0 or x.shape[0] == 0:
        return RoundingResult(nearest, nearest_err, nearest_err, False)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    st = torch.from_numpy(scale.astype(np.float32))
    bt = None if bias is None else torch.from_numpy(bias.astype(np.float32))
    ratio = torch.from_numpy((weight / scale).astype(np.float32))
    floor = torch.floor(ratio)
    # The largest weight of each channel keeps its nearest level, so the channel's scale cannot change.
    fixed = torch.from_numpy(np.abs(nearest) >= 127)
    rest = (ratio - floor).clamp(0.01, 0.99)
    v = torch.log((rest - _GAMMA) / (_ZETA - rest)).requires_grad_(True)  # h(v) == rest at the start
    optimizer = torch.optim.Adam([v], lr=lr)
    norm = float(yt.square().mean()) or 1.0
    nearest_t = torch.from_numpy(nearest)
    warmup = iterations // 5

    def soft(h: torch.Tensor) -> torch.Tensor:
        levels = torch.where(fixed, nearest_t, (floor + h).clamp(-127, 127))
        return levels * st

    for step in range(iterations):
        idx = torch.randint(0, xt.shape[0], (min(batch, xt.shape[0]),), generator=gen)
        h = (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA).clamp(0, 1)
        out = torch.einsum("pgk,gok->pgo", xt[idx], soft(h))
        if bt is not None:
            out = out + bt
        loss = (out - yt[idx]).square().mean() / norm
        if step >= warmup:  # anneal beta 20 -> 2: first let rounding move, then force it to 0/1
            beta = 20 - 18 * (step - warmup) / max(1, iterations - warmup)
            loss = loss + reg_weight * nearest_err * (1 - (2 * h - 1).abs().pow(beta)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        hard = (v >= 0).float()  # h(v) >= 0.5
        levels = torch.where(fixed, nearest_t, (floor + hard).clamp(-127, 127)).numpy().astype(np.float32)
    err = reconstruction_error(x, y, levels * scale, bias)
    if err < nearest_err:
        return RoundingResult(levels, nearest_err, err, True)
    return RoundingResult(nearest, nearest_err, nearest_err, False)
