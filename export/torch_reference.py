"""The PyTorch reference detector: upstream's Python pipeline around any CenterNet-style module.

Per image: cv2 warp + numpy normalisation -> torch forward -> upstream decode (torch) -> numpy
back-projection. Every exported graph and runtime is checked against this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from centernet_edge.runtime.decode import decode_torch, project_boxes
from centernet_edge.runtime.detections import Detections
from centernet_edge.runtime.geometry import InputGeometry, compute_geometry
from centernet_edge.runtime.preprocess import check_image, normalize_image, warp_image
from centernet_edge.runtime.spec import ModelSpec

__all__ = ["ReferenceDetector", "split_heads"]

_ALIASES = {"heatmap": ("hm", "heatmap"), "wh": ("wh",), "reg": ("reg",)}


def split_heads(out: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(heatmap, wh, reg) from a module's output.

    Accepts a (heatmap, wh[, reg]) tuple/list, a dict keyed hm|heatmap / wh / reg, or upstream's
    list of per-stack dicts (the last stack is the prediction, as in ``model(images)[-1]``).
    """
    if isinstance(out, (list, tuple)) and out and isinstance(out[-1], Mapping):
        out = out[-1]
    if isinstance(out, Mapping):
        found = {}
        for role, keys in _ALIASES.items():
            found[role] = next((out[k] for k in keys if k in out), None)
        if found["heatmap"] is None or found["wh"] is None:
            raise ValueError(f"model output dict lacks a heatmap or wh head: keys {sorted(out)}")
        return found["heatmap"], found["wh"], found["reg"]
    if isinstance(out, (list, tuple)) and len(out) in (2, 3):
        return out[0], out[1], (out[2] if len(out) == 3 else None)
    raise ValueError(f"model must return (heatmap, wh, reg) or a dict of heads; got {type(out).__name__}")


class ReferenceDetector:
    """Upstream-style inference for ``model`` under ``spec`` (preprocess + decode settings).

    ``model`` may be any ``nn.Module`` whose forward takes a float32 NCHW batch normalised per
    ``spec.preprocess`` and returns raw heads (see :func:`split_heads`); the heatmap is sigmoid-ed in
    decode when ``spec.decode.heatmap_activation`` is 'logits', exactly as upstream ``ctdet.py`` does.
    """

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, device: str | torch.device | None = None):
        self.model = model.eval()
        self.spec = spec
        if device is None:
            param = next(iter(model.parameters()), None)
            device = param.device if param is not None else "cpu"
        self.device = torch.device(device)

    # ---- pieces ------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[InputGeometry]]:
        """Per image: the normalised CHW float32 input and its geometry."""
        pre = self.spec.preprocess
        inputs, geoms = [], []
        for i, img in enumerate(images):
            check_image(img, i)
            geom = compute_geometry(img.shape[0], img.shape[1], pre)
            inputs.append(normalize_image(warp_image(img, geom, pre), pre))
            geoms.append(geom)
        return inputs, geoms

    @torch.no_grad()
    def _forward(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        # The input takes the parameters' dtype, so a float64 copy of a model runs wholly in float64 (the
        # export verification's noise floor); heads stay float64 then, anything else becomes float32.
        param = next(iter(self.model.parameters()), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        heatmap, wh, reg = split_heads(self.model(torch.from_numpy(batch).to(self.device, dtype)))

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t if t.dtype == torch.float64 else t.float()

        return cast(heatmap), cast(wh), (cast(reg) if reg is not None else None)

    @staticmethod
    def _groups(inputs: list[np.ndarray]) -> dict[tuple[int, ...], list[int]]:
        # Images whose network inputs share a shape run as one batch; others run separately.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(inputs):
            groups.setdefault(x.shape, []).append(i)
        return groups

    # ---- public API --------------------------------------------------------------------------

    def forward_heads(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Raw heads (NCHW float32, heatmap before any sigmoid the spec asks decode to apply).

        Keys: heatmap, wh and reg (when the model has it). The images' network inputs must share one
        size (always true for affine/stretch; keep_res needs same-size-class images).
        """
        inputs, _ = self.preprocess(images)
        if len({x.shape for x in inputs}) > 1:
            raise ValueError("forward_heads needs images whose network inputs share one size; call per image")
        heatmap, wh, reg = self._forward(np.stack(inputs))
        heads = {"heatmap": heatmap.cpu().numpy(), "wh": wh.cpu().numpy()}
        if reg is not None:
            heads["reg"] = reg.cpu().numpy()
        return heads

    def heads_and_detections(self, images: Sequence[np.ndarray]) -> tuple[dict[str, np.ndarray], list[Detections]]:
        """:meth:`forward_heads` and :meth:`detect` from one forward pass (same-size network inputs)."""
        inputs, geoms = self.preprocess(images)
        if len({x.shape for x in inputs}) > 1:
            raise ValueError("heads_and_detections needs images whose network inputs share one size")
        heatmap, wh, reg = self._forward(np.stack(inputs))
        heads = {"heatmap": heatmap.cpu().numpy(), "wh": wh.cpu().numpy()}
        if reg is not None:
            heads["reg"] = reg.cpu().numpy()
        return heads, self._decode(heatmap, wh, reg, geoms)

    def _decode(self, heatmap: torch.Tensor, wh: torch.Tensor, reg: torch.Tensor | None,
                geoms: Sequence[InputGeometry]) -> list[Detections]:
        decoded = decode_torch(heatmap, wh, reg, self.spec.decode)
        boxes = decoded.boxes.cpu().numpy()
        scores = decoded.scores.cpu().numpy()
        classes = decoded.classes.cpu().numpy()
        return [Detections(project_boxes(boxes[j], geom, self.spec.decode, frame="output"), scores[j], classes[j])
                for j, geom in enumerate(geoms)]

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detections per image (original pixels, top-K best first, unclipped)."""
        inputs, geoms = self.preprocess(images)
        results: list[Detections | None] = [None] * len(inputs)
        for members in self._groups(inputs).values():
            heatmap, wh, reg = self._forward(np.stack([inputs[i] for i in members]))
            for i, dets in zip(members, self._decode(heatmap, wh, reg, [geoms[i] for i in members]), strict=True):
                results[i] = dets
        return [r for r in results if r is not None]
