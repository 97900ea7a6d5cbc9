"""``centernet-export`` as a Python API: checkpoint -> ONNX, verified against PyTorch before it is written.

:func:`export_verified` is the one path the command line and :func:`export` (the front door's
``centernet_edge.export(...)``) share: export in memory, verify, then write atomically. Whether a failed
verification is an error is the caller's choice: the CLI exits 1, :func:`export` raises
:class:`VerificationFailed`; with ``keep_unverified`` both write the file anyway.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .onnx_export import ExportError, ExportOptions, ExportResult

if TYPE_CHECKING:
    import onnx

    from centernet_edge.runtime.spec import ModelSpec

    from .verify import Tolerances, VerifyReport

__all__ = ["ExportRun", "VerificationFailed", "check_export_paths", "export", "export_verified"]

VerifyImages = str | Path | Sequence[np.ndarray] | Sequence[tuple[str, np.ndarray]]


@dataclass
class ExportRun:
    """One export: the model as written (or refused), its spec and the verification report.

    ``path`` is None when nothing was written (verification failed without ``keep_unverified``);
    ``report`` is None when verification was skipped.
    """

    model: onnx.ModelProto
    spec: ModelSpec
    report: VerifyReport | None
    path: Path | None

    @property
    def verified(self) -> bool:
        """True when ONNX Runtime reproduced the PyTorch reference within the tolerances."""
        return self.report is not None and self.report.passed


class VerificationFailed(ExportError):
    """The exported graph does not reproduce the checkpoint; ``run`` holds the report (nothing written)."""

    def __init__(self, message: str, run: ExportRun) -> None:
        super().__init__(message)
        self.run = run


def check_export_paths(checkpoint: str | Path, output: str | Path) -> Path:
    """Everything about the files that can be refused before the checkpoint is loaded; returns ``output``."""
    from centernet_edge.runtime.cli_common import check_output_file

    checkpoint = Path(checkpoint)
    target = check_output_file(output)
    if checkpoint.is_dir():
        raise ExportError(f"checkpoint {checkpoint} is a directory; pass the .pth file inside it")
    if not checkpoint.is_file():
        raise ExportError(f"checkpoint not found: {checkpoint}")
    return target


def _verify_images(images: VerifyImages | None, count: int) -> list[tuple[str, np.ndarray]]:
    from .verify import load_images, synthetic_images

    if images is None:
        return synthetic_images(count)
    if isinstance(images, (str, Path)):
        try:
            return load_images(images, count)
        except ValueError as exc:
            raise ExportError(str(exc)) from None
    named = [item if isinstance(item, tuple) else (f"image_{i}", item) for i, item in enumerate(images)]
    if not named:
        raise ExportError("verify_images is empty")
    return named[:count]


def export_verified(
    checkpoint: str | Path,
    output: str | Path,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    options: ExportOptions | None = None,
    verify: bool = True,
    verify_images: VerifyImages | None = None,
    verify_count: int = 3,
    tolerances: Tolerances | None = None,
    keep_unverified: bool = False,
    threads: int | None = None,
    on_exported: Callable[[ExportResult], None] | None = None,
) -> ExportRun:
    """Export ``checkpoint``, verify the graph on ``verify_images`` and write it to ``output``.

    verify_images: a folder, BGR arrays, or (name, array) pairs; default: synthetic images of several
    sizes. ``on_exported`` is called between export and verification (the CLI reports progress there).
    The file is written only when verification passed, was skipped, or ``keep_unverified`` is set.
    """
    import torch

    from .onnx_export import export_checkpoint, save_onnx
    from .verify import verify_export

    options = (options or ExportOptions()).validate()
    checkpoint, output = Path(checkpoint), check_export_paths(checkpoint, output)
    if verify_count < 1:
        raise ExportError(f"verify_count must be >= 1; got {verify_count}")
    images = _verify_images(verify_images, verify_count) if verify else []
    if threads:
        torch.set_num_threads(threads)

    result = export_checkpoint(checkpoint, arch=arch, num_classes=num_classes, options=options)
    if on_exported is not None:
        on_exported(result)
    report = None
    if verify:
        report = verify_export(result.model, result.torch_model, result.spec, images, tolerances,
                               threads=threads)
        # The artifact carries its own evidence: head errors against the float64 reference and the floor.
        result.spec.provenance["verification"] = report.summary()
        result.spec.write_to_onnx(result.model)
    run = ExportRun(result.model, result.spec, report, None)
    if report is None or report.passed or keep_unverified:
        try:
            run.path = save_onnx(result.model, output)
        except OSError as exc:
            raise ExportError(f"cannot write {output}: {exc.strerror or exc}") from None
    return run


def export(
    checkpoint: str | Path,
    output: str | Path | None = None,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    verify: bool = True,
    verify_images: VerifyImages | None = None,
    verify_count: int = 3,
    tolerances: Tolerances | None = None,
    keep_unverified: bool = False,
    threads: int | None = None,
    **graph_options: Any,
) -> ExportRun:
    """Export a CenterNet checkpoint (official or mmdetection .pth) to a verified, self-describing ONNX.

    Same as ``centernet-export``: the graph is written to ``output`` (default: the checkpoint's path with
    ``.onnx``) only after ONNX Runtime reproduced the PyTorch reference; otherwise
    :class:`VerificationFailed` is raised and nothing is written (``keep_unverified=True`` writes it and
    returns the failing report; ``verify=False`` skips the check).

    graph_options: the fields of :class:`ExportOptions` (``input_size=(384, 384)``, ``keep_res=True``,
    ``preprocess="warp"``, ``decode=True``, ``batch=None``, ``topk=100``, ``opset``, ``name``,
    ``optimize``). Tolerances: :class:`centernet_edge.export.verify.Tolerances`.
    """
    known = {f.name for f in dataclasses.fields(ExportOptions)}
    unknown = sorted(set(graph_options) - known)
    if unknown:
        raise ExportError(f"unknown export option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if graph_options.get("input_size") is not None:
        size = graph_options["input_size"]
        graph_options["input_size"] = (int(size), int(size)) if np.isscalar(size) else tuple(size)
    options = ExportOptions(**graph_options)
    target = Path(output) if output is not None else Path(checkpoint).with_suffix(".onnx")
    run = export_verified(checkpoint, target, arch=arch, num_classes=num_classes, options=options,
                          verify=verify, verify_images=verify_images, verify_count=verify_count,
                          tolerances=tolerances, keep_unverified=keep_unverified, threads=threads)
    if run.report is not None and not run.report.passed and not keep_unverified:
        raise VerificationFailed(
            f"{target.name} not written: verification failed: {'; '.join(run.report.failures)}", run)
    return run
