"""Content hashes that tie a calibration result to the exact model and images it came from."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["dataset_hash"]


def dataset_hash(entries: Iterable[tuple[str, int]], seed: int) -> str:
    """sha256 over the sorted ``(relative name, size in bytes)`` pairs and the selection seed.

    Names and sizes (not pixel contents) keep this cheap for thousands of images while still changing
    when a file is added, removed, renamed or re-encoded; the seed is part of it because it fixes the
    subset and the order the images are fed in.
    """
    digest = hashlib.sha256()
    for name, size in sorted(entries):
        if "\n" in name or "\t" in name:
            raise ValueError(f"file name with a tab or newline cannot be hashed unambiguously: {name!r}")
        digest.update(f"{name}\t{int(size)}\n".encode())
    digest.update(f"seed\t{int(seed)}\n".encode())
    return digest.hexdigest()
