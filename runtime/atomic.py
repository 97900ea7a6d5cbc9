"""Atomic file writing: a file either appears complete under its final name or not at all.

Writers produce a temporary file in the destination's own directory (so ``os.replace`` is a rename on
one filesystem, never a copy) and only rename it once everything succeeded. Any failure, including
KeyboardInterrupt, removes the temporary file, so a killed export never leaves a truncated model behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    The caller writes the temporary path however it likes (``onnx.save``, ``np.save``, ...). If the block
    raises (any ``BaseException``) or leaves no file behind, ``path`` is untouched and the temporary is
    removed.
    """
    final = Path(path)
    directory = final.parent if str(final.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {directory}")
    # The ".tmp" prefix keeps half-written files out of globs like "*.onnx" that other tools might run.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written for {final.name}")
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the final path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically and return the final path."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; when the block succeeds its entries move into
    ``path`` (created if missing, existing entries of the same name replaced).

    If the block raises (KeyboardInterrupt included) the temporary folder and everything in it are removed
    and ``path`` is untouched. Creating the temporary folder up front also proves the destination writable
    before any work is done.
    """
    import shutil

    final = Path(path)
    parent = final.parent if str(final.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"output directory's parent does not exist: {parent}")
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"output path exists and is not a directory: {final}")
    if final.is_dir() and not os.access(final, os.W_OK | os.X_OK):
        raise PermissionError(f"output directory is not writable: {final}")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=parent))
    except PermissionError:
        raise PermissionError(f"output directory is not writable: {parent}") from None
    try:
        yield tmp
        if not final.exists():
            os.replace(tmp, final)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(final, 0o777 & ~umask)  # mkdtemp makes 0700 folders; give what mkdir would
            return
        for entry in sorted(tmp.iterdir()):
            os.replace(entry, final / entry.name)
        tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
