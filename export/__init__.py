"""Foundation: CenterNet architectures, checkpoints and ONNX export.

The package is also the front door's ``export``: ``from centernet_edge import export`` gives this module,
and calling it runs :func:`centernet_edge.export.pipeline.export` (verified export). The subpackage and
the function share the name, so the module itself is made callable rather than one shadowing the other.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .pipeline import export

        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
