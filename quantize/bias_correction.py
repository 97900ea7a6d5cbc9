"""Empirical bias correction: remove the mean output shift int8 causes, per output channel.

Quantized weights and inputs shift a conv's outputs on average (rounding is not zero-mean once clipped or
once a channel's weights round the same way). With the layer's quantized inputs ``x_q`` (upstream layers
already quantized and corrected, see :mod:`sequential`) and its fp32 outputs ``y``,

    shift_c = mean over positions and images of (conv(x_q, W_q) + b - y)_c,    b_c <- b_c - shift_c.

On the samples it is measured on this can only lower the squared error (it removes the mean, leaving
the variance), and it moves into the bias, so every artifact (TensorRT Q/DQ, ONNX Runtime CPU int8) gets
it for free. The sums stream: one image at a time, only per-channel sums are kept.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ShiftAccumulator"]


class ShiftAccumulator:
    """Streaming per-channel mean of ``quantized - fp32`` outputs (``[P, G, O]`` column-form batches)."""

    def __init__(self) -> None:
        self.count = 0
        self.diff_sum: np.ndarray | None = None
        self.ref_sq = 0.0

    def add(self, quantized: np.ndarray, reference: np.ndarray) -> None:
        diff = (quantized - reference).astype(np.float64).sum(axis=0)
        self.diff_sum = diff if self.diff_sum is None else self.diff_sum + diff
        self.ref_sq += float(np.square(reference, dtype=np.float64).sum())
        self.count += reference.shape[0]

    def shift(self) -> np.ndarray:
        """Mean shift per channel ``[G, O]`` (zeros before any data)."""
        if self.diff_sum is None or self.count == 0:
            raise ValueError("no samples: add() before shift()")
        return (self.diff_sum / self.count).astype(np.float32)

    def relative_shift(self) -> float:
        """RMS over channels of the shift, over the outputs' RMS (the ``mean_shift`` of layer_error)."""
        if self.diff_sum is None or self.count == 0 or self.ref_sq <= 0:
            return 0.0
        channels = self.diff_sum.size
        rms = np.sqrt(self.ref_sq / (self.count * channels))
        return float(np.sqrt(np.mean(np.square(self.diff_sum / self.count))) / rms)
