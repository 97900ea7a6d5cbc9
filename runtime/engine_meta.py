"""The side-car of a TensorRT engine: ``model.engine.json`` beside ``model.engine``.

The engine file stays exactly what TensorRT wrote (so ``trtexec --loadEngine`` and other tools load it
as is); everything the toolkit needs to run it lives in the side-car: the engine's sha256 (a rebuilt or
swapped engine is refused), the TensorRT version and GPU it was built with (engines only run on the
version that built them unless built version-compatible), the optimisation profile and the model spec.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .hashing import file_sha256
from .spec import ModelSpec, SpecError

__all__ = ["ENGINE_META_FORMAT", "EngineMeta", "EngineMetaError", "engine_meta_path", "read_engine_meta",
           "verify_engine", "write_engine_meta"]

ENGINE_META_FORMAT = 1


class EngineMetaError(SpecError):
    """An engine's side-car is missing, malformed, or does not describe this engine file."""


@dataclass
class EngineMeta:
    """What was built, with what, and for which model.

    ``profile`` maps an input name to its ``[min, opt, max]`` shapes; ``build`` records the options and
    the source artifact (names, sha256, builder flags) for reports.
    """

    engine_sha256: str
    tensorrt_version: str
    gpu_name: str | None
    precision: str
    spec: ModelSpec
    profile: dict[str, list[list[int]]] = field(default_factory=dict)
    version_compatible: bool = False
    dla_core: int | None = None
    build: dict[str, Any] = field(default_factory=dict)
    format: int = ENGINE_META_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "engine_sha256": self.engine_sha256,
            "tensorrt_version": self.tensorrt_version,
            "gpu_name": self.gpu_name,
            "precision": self.precision,
            "version_compatible": self.version_compatible,
            "dla_core": self.dla_core,
            "profile": {name: [list(s) for s in shapes] for name, shapes in self.profile.items()},
            "build": self.build,
            "model_spec": self.spec.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "engine side-car") -> EngineMeta:
        if not isinstance(data, dict):
            raise EngineMetaError(f"{source} is not a JSON object")
        if int(data.get("format", 0)) > ENGINE_META_FORMAT:
            raise EngineMetaError(f"{source} has format {data.get('format')}, newer than this toolkit understands")
        try:
            profile = {str(n): [[int(d) for d in s] for s in shapes] for n, shapes in data["profile"].items()}
            bad = [n for n, shapes in profile.items() if len(shapes) != 3]
            if bad:
                raise EngineMetaError(f"{source}: profile of {bad[0]!r} needs [min, opt, max] shapes")
            return cls(
                engine_sha256=str(data["engine_sha256"]),
                tensorrt_version=str(data["tensorrt_version"]),
                gpu_name=data.get("gpu_name"),
                precision=str(data["precision"]),
                spec=ModelSpec.from_dict(data["model_spec"]),
                profile=profile,
                version_compatible=bool(data.get("version_compatible", False)),
                dla_core=None if data.get("dla_core") is None else int(data["dla_core"]),
                build=dict(data.get("build", {})),
                format=int(data.get("format", ENGINE_META_FORMAT)),
            )
        except KeyError as exc:
            raise EngineMetaError(f"{source} is missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, SpecError):
                raise
            raise EngineMetaError(f"{source} has an invalid field: {exc}") from None


def engine_meta_path(engine_path: str | os.PathLike[str]) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def write_engine_meta(engine_path: str | os.PathLike[str], meta: EngineMeta) -> Path:
    return atomic_write_text(engine_meta_path(engine_path), json.dumps(meta.to_dict(), indent=2, sort_keys=True)
                             + "\n")


def read_engine_meta(engine_path: str | os.PathLike[str]) -> EngineMeta:
    """The side-car of ``engine_path``; :class:`EngineMetaError` when missing or malformed."""
    path = engine_meta_path(engine_path)
    if not path.is_file():
        raise EngineMetaError(
            f"{Path(engine_path).name} has no side-car {path.name}: build engines with centernet-build, which "
            "writes it (it holds the model spec and the engine's sha256)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EngineMetaError(f"{path.name} is not valid JSON: {exc}") from None
    return EngineMeta.from_dict(data, source=path.name)


def verify_engine(engine_path: str | os.PathLike[str], meta: EngineMeta) -> None:
    """Refuse an engine file whose bytes are not the ones its side-car was written for."""
    actual = file_sha256(engine_path)
    if actual != meta.engine_sha256:
        raise EngineMetaError(
            f"{Path(engine_path).name} does not match its side-car: sha256 {actual[:12]}, the side-car "
            f"describes {meta.engine_sha256[:12]} (the engine was rebuilt or replaced; rebuild both with "
            "centernet-build)"
        )
