"""What the command-line tools share: ``--version`` and ``-q/--quiet``, and checking outputs before work.

Every tool spends seconds to minutes before it writes anything, so a destination that cannot be
written (a directory where a file goes, a file where a directory goes, a read-only place) is refused
before the work starts, in one line, instead of failing with a traceback at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .spec import toolkit_version

__all__ = ["QUIET_HELP", "OneLineParser", "OutputError", "add_common_flags", "check_output_dir", "check_output_file",
           "run_main"]

QUIET_HELP = ("no progress bars, step messages or tables: only the line saying what was written (and a "
              "verification verdict), warnings and errors")


class OutputError(ValueError):
    """The requested output location cannot be written."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (``prog: error: ...``, exit 2), without the usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_common_flags(parser: argparse.ArgumentParser, quiet_help: str = QUIET_HELP) -> None:
    """``-q/--quiet`` and ``--version`` (the installed package version), the same in every tool."""
    parser.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {toolkit_version()}")


def _nearest_existing(path: Path) -> Path:
    probe = path.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _check_writable_dir(directory: Path, shown: Path) -> None:
    if not directory.is_dir():
        raise OutputError(f"cannot write {shown}: {directory} is not a directory")
    # os.access honours read-only mounts even for root (EROFS), unlike a permission-bit check.
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {shown}: {directory} is not writable")


def check_output_file(path: str | os.PathLike[str]) -> Path:
    """Refuse a file destination that cannot be written; its folder must already exist."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"output {target} is a directory; give a file name (e.g. {target / 'model.onnx'})")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        ancestor = _nearest_existing(parent)
        if not ancestor.is_dir():
            raise OutputError(f"cannot write {target}: {ancestor} is not a directory")
        raise OutputError(f"output directory does not exist: {parent}")
    _check_writable_dir(parent, target)
    return target


def check_output_dir(path: str | os.PathLike[str]) -> Path:
    """Refuse a folder destination that cannot be created or written (missing parents may be created)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise OutputError(f"output folder {target} exists and is not a directory")
    _check_writable_dir(_nearest_existing(target), target)
    return target


def run_main(prog: str, body: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None,
             interrupted: str = "interrupted; nothing written") -> int:
    """Run a tool's ``body(argv)``; Ctrl-C anywhere in it (heavy imports included) is one line, exit 130.

    Each tool imports torch/ONNX Runtime inside its body, so an interrupt while they load is caught here
    too."""
    try:
        return body(argv)
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
