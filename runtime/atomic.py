"""Atomic file writing: a file either appears complete under its final name or not at all.

Writers produce a temporary file in the destination's own directory (so ``os.replace`` is a rename on
one filesystem, never a copy) and only rename it once everything succeeded. Any failure, including
KeyboardInterrupt, removes the temporary file, so a killed export never leaves a truncated model behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
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
def staged_dir(path: str | os.PathLike[str], keep: Callable[[str], bool] | None = None,
               last: Sequence[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; move what it holds into ``path`` on success.

    A run that writes several files either leaves all of them under ``path`` or none: on any failure
    (KeyboardInterrupt included) the temporary folder is removed and ``path`` is as it was. A missing
    ``path`` appears by one rename (its missing parents are created only then); an existing one keeps its
    other files and gets the new ones moved in by name. ``keep(name)`` (optional) is asked, before the
    move, about each file already in ``path``; those it returns False for are deleted (stale outputs).
    Files named in ``last`` are moved after the others (e.g. the summary that vouches for them).
    """
    final = Path(path)
    anchor = final.parent.absolute()
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent  # same filesystem as the final folder will be, so the move is a rename
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=anchor))
    try:
        yield stage
        if not final.exists():
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(stage, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the folder's mode
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage, final)
            return
        if keep is not None:
            for old in final.iterdir():
                if old.is_file() and not keep(old.name):
                    old.unlink()
        for new in sorted(stage.iterdir(), key=lambda p: (p.name in last, p.name)):
            os.replace(new, final / new.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
