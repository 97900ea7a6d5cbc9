"""The PyTorch runner: a checkpoint's model through the reference pre/post-processing.

It lives with export because it needs the architectures and the checkpoint loader; it follows the
runtime's :class:`~centernet_edge.runtime.runners.Runner` protocol like every other backend.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from centernet_edge.runtime.detections import Detections
from centernet_edge.runtime.runners import RunnerBase, RunnerError, StageTimes
from centernet_edge.runtime.spec import ModelSpec

__all__ = ["TorchReferenceRunner", "checkpoint_spec"]


def checkpoint_spec(info: Any, keep_res: bool = False) -> ModelSpec:
    """The reference spec of a checkpoint (its ``CheckpointInfo``): the same spec an export of it carries,
    for the plain network (normalised float input, raw heads out).

    Used when a .pth comes without ``--model-spec``; COCO class names and ids when it has 80 classes.
    """
    from dataclasses import replace

    from .models import ARCHITECTURES
    from .onnx_export import ExportOptions, build_spec

    options = ExportOptions(keep_res=keep_res, preprocess="none", decode=False)
    spec = build_spec(
        arch=info.arch, source=info.source, num_classes=int(info.num_classes), options=options,
        keep_res_pad=ARCHITECTURES[info.arch].keep_res_pad, class_names=getattr(info, "class_names", None),
        name=Path(info.path).stem, provenance={"checkpoint_sha256": info.sha256, "precision": "fp32"},
    )
    # The PyTorch modules return heatmap logits; an exported graph applies the sigmoid itself.
    spec.decode = replace(spec.decode, heatmap_activation="logits")
    return spec.validate()


class TorchReferenceRunner(RunnerBase):
    """The PyTorch model from a checkpoint through the reference pre/post-processing.

    fp16 is offered only on CUDA: CPU half-precision kernels are slow and not what any edge target runs.
    """

    backend = "torch"

    def __init__(
        self,
        checkpoint_path: str | Path,
        spec: ModelSpec | None = None,
        *,
        device: str | None = None,
        fp16: bool = False,
        threads: int | None = None,
        keep_raw: bool = False,
    ) -> None:
        import torch

        from .checkpoints import load_checkpoint
        from .torch_reference import ReferenceDetector

        super().__init__()
        self.model_path = Path(checkpoint_path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if fp16 and self.device.type != "cuda":
            raise RunnerError("torch fp16 is only supported on CUDA; drop fp16 or run on a GPU")
        if threads:
            torch.set_num_threads(int(threads))
        loaded = load_checkpoint(self.model_path)
        spec = spec if spec is not None else checkpoint_spec(loaded.info)
        # The PyTorch modules return heatmap logits for both sources, whatever an exported graph's spec
        # (which has sigmoid in-graph) says; decode must apply the sigmoid here.
        logits = dataclasses.replace(spec.decode, heatmap_activation="logits")
        self.spec = dataclasses.replace(spec, decode=logits)
        if self.spec.num_classes != loaded.num_classes:
            raise RunnerError(
                f"{self.model_path.name}: model spec has num_classes={self.spec.num_classes}, "
                f"the checkpoint {loaded.num_classes}"
            )
        self.dtype = torch.float16 if fp16 else torch.float32
        model = loaded.model.eval().to(self.device, dtype=self.dtype)
        self.precision = "fp16" if fp16 else "fp32"
        self.keep_raw = keep_raw
        self.detector = ReferenceDetector(model, self.spec, device=self.device)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "providers": [str(self.device)], "precision": self.precision}

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _forward(self, batch_nchw: np.ndarray) -> list[Any]:
        """The model's (heatmap logits, wh, reg) as float32 torch tensors, synchronised for timing."""
        import torch

        from .torch_reference import split_heads

        batch = torch.from_numpy(np.ascontiguousarray(batch_nchw)).to(self.device, self.dtype)
        with torch.no_grad():
            out = split_heads(self.detector.model(batch))
        heads = [h.float() if h is not None else None for h in out]
        self._sync()
        return heads

    def run_raw(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Raw heads by role (heatmap as logits) for a normalised float NCHW batch."""
        self._check_open()
        heads = self._forward(inputs)
        return {role: h.cpu().numpy() for role, h in zip(("heatmap", "wh", "reg"), heads, strict=True)
                if h is not None}

    def run(self, images: Sequence[np.ndarray]) -> list[Detections]:
        from centernet_edge.runtime.decode import decode_torch, project_boxes

        self._check_open()
        t0 = time.perf_counter()
        inputs, geoms = self.detector.preprocess(images)
        pre = time.perf_counter() - t0
        infer = post = 0.0
        results: list[Detections | None] = [None] * len(inputs)
        raw: dict[str, list[np.ndarray]] = {}
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(inputs):  # same-size inputs share a forward (keep_res sizes vary)
            groups.setdefault(x.shape, []).append(i)
        for members in groups.values():
            t1 = time.perf_counter()
            heads = self._forward(np.stack([inputs[i] for i in members]))
            t2 = time.perf_counter()
            decoded = decode_torch(heads[0], heads[1], heads[2], self.spec.decode)
            boxes, scores = decoded.boxes.cpu().numpy(), decoded.scores.cpu().numpy()
            classes = decoded.classes.cpu().numpy()
            for j, i in enumerate(members):
                projected = project_boxes(boxes[j], geoms[i], self.spec.decode, frame="output")
                results[i] = Detections(projected, scores[j], classes[j])
            t3 = time.perf_counter()
            infer, post = infer + t2 - t1, post + t3 - t2
            if self.keep_raw:
                for role, head in zip(("heatmap", "wh", "reg"), heads, strict=True):
                    if head is not None:
                        raw.setdefault(role, []).append(head.cpu().numpy())
        self._record(StageTimes(pre * 1e3, infer * 1e3, post * 1e3, len(images)))
        # Mixed-size groups cannot be concatenated; keep raw heads only when they share one shape.
        self.raw_outputs = (
            {r: np.concatenate(v) for r, v in raw.items()} if self.keep_raw and len(groups) == 1 else None
        )
        return [r for r in results if r is not None]

    def close(self) -> None:
        self.detector = None
        super().close()
