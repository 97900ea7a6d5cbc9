"""centernet-edge: CenterNet checkpoints to edge accelerators, with measured accuracy per precision.

The front door::

    from centernet_edge import export, calibrate, evaluate, Detector

    run = export("ctdet_coco_resdcn18.pth", "model.onnx")        # verified like centernet-export
    calibrate("model.onnx", "calib_images/", "calib_out/")       # like centernet-calibrate
    result = evaluate(["model.onnx", "calib_out/model_int8_cpu.onnx"], "val2017/", "instances_val2017.json")
    with Detector("model.onnx") as detector:
        dets = detector("image.jpg")[0]

Everything is imported on first use, so ``import centernet_edge`` stays cheap (no torch, no ONNX Runtime).
``export`` is the :mod:`centernet_edge.export` package itself, which is callable.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from centernet_edge.api import calibrate, evaluate
    from centernet_edge.detect.detector import Detector
    from centernet_edge.runtime.detections import Detections
    from centernet_edge.runtime.spec import ModelSpec, load_spec

__all__ = ["Detections", "Detector", "ModelSpec", "__version__", "calibrate", "evaluate", "export", "load_spec"]

_LAZY = {
    "calibrate": ("centernet_edge.api", "calibrate"),
    "evaluate": ("centernet_edge.api", "evaluate"),
    "Detector": ("centernet_edge.detect.detector", "Detector"),
    "Detections": ("centernet_edge.runtime.detections", "Detections"),
    "ModelSpec": ("centernet_edge.runtime.spec", "ModelSpec"),
    "load_spec": ("centernet_edge.runtime.spec", "load_spec"),
}


def __getattr__(name: str) -> Any:
    if name == "export":
        # Importing the subpackage binds it as this attribute; it is callable (see its docstring).
        return importlib.import_module("centernet_edge.export")
    if name == "__version__":
        from centernet_edge.runtime.spec import toolkit_version

        return toolkit_version()
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'centernet_edge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
