"""The one image reader of every tool: any decodable file becomes what ``cv2.imread`` returns.

Deployment reads images with ``cv2.imread(path)`` (``IMREAD_COLOR``): EXIF orientation applied, 8-bit,
3-channel BGR. Calibration must see the same pixels, but it also has to survive whatever a user's folder
holds, and report what it had to convert. So the file is decoded once keeping its depth and channel count
(``IMREAD_ANYDEPTH | IMREAD_ANYCOLOR``, which still applies EXIF orientation) and then converted exactly
the way ``IMREAD_COLOR`` would: 16-bit by dropping the low byte, gray replicated to BGR, alpha dropped.
Nothing here raises for a bad file: the caller gets ``None`` and a reason, and a :class:`ReadReport`
counts and names what was skipped. One policy for calibration, evaluation and export verification:
unreadable, truncated and non-image files are skipped, counted and named; a strict report (the tools'
``--strict``) raises :class:`UnreadableImageError` at the first one instead.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

__all__ = ["IMAGE_EXTENSIONS", "ReadReport", "UnreadableImageError", "decode_bgr", "read_bgr"]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm",
     ".pnm", ".jp2", ".sr", ".ras", ".hdr", ".pic", ".exr", ".avif"}
)

_DECODE_FLAGS = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
_LISTED = 10  # skipped files named in a one-line message before summarising


class UnreadableImageError(ValueError):
    """A strict read met a file that is not a readable image."""


@dataclass
class ReadReport:
    """Counts of what happened while reading a set of images (for reports, summaries and the log).

    ``strict``: the first unreadable file raises :class:`UnreadableImageError` instead of being skipped.
    """

    read: int = 0
    skipped: int = 0
    conversions: Counter = field(default_factory=Counter)
    skip_reasons: dict[str, str] = field(default_factory=dict)
    strict: bool = False

    def note_skip(self, name: str, reason: str) -> None:
        if self.strict:
            raise UnreadableImageError(f"cannot read image {name}: {reason} (--strict)")
        self.skipped += 1
        self.skip_reasons[name] = reason

    def skip_line(self, what: str = "image") -> str:
        """``skipped 2 unreadable image(s): a.jpg (empty file), b.png (...)``; empty when none was."""
        if not self.skipped:
            return ""
        items = sorted(self.skip_reasons.items())
        shown = ", ".join(f"{name} ({reason})" for name, reason in items[:_LISTED])
        more = f", ... ({len(items)} in all)" if len(items) > _LISTED else ""
        return f"skipped {self.skipped} unreadable {what}(s): {shown}{more}"

    def as_dict(self) -> dict[str, object]:
        return {
            "read": self.read,
            "skipped": self.skipped,
            "conversions": dict(sorted(self.conversions.items())),
            "skip_reasons": dict(sorted(self.skip_reasons.items())),
        }


def _to_uint8(img: np.ndarray) -> tuple[np.ndarray, str | None]:
    if img.dtype == np.uint8:
        return img, None
    if img.dtype == np.uint16:
        # IMREAD_COLOR keeps the high byte; doing the same keeps calibration pixels equal to deployment's.
        return (img >> 8).astype(np.uint8), "16bit_to_8bit"
    if img.dtype in (np.float32, np.float64):
        finite = np.nan_to_num(img.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        # Float files (EXR, float TIFF) are conventionally 0..1; anything larger is taken as 0..255.
        scale = 255.0 if finite.size and float(finite.max()) <= 1.0 else 1.0
        return np.clip(np.rint(finite * scale), 0, 255).astype(np.uint8), "float_to_8bit"
    if img.dtype == np.int8:
        return (img.astype(np.int16) + 128).astype(np.uint8), "int8_to_8bit"
    if img.dtype == np.int16:
        return ((img.astype(np.int32) + 32768) >> 8).astype(np.uint8), "int16_to_8bit"
    raise ValueError(f"unsupported pixel type {img.dtype}")


def _to_bgr(img: np.ndarray) -> tuple[np.ndarray, str | None]:
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        return cv2.cvtColor(img.reshape(img.shape[0], img.shape[1]), cv2.COLOR_GRAY2BGR), "gray_to_bgr"
    if img.ndim != 3:
        raise ValueError(f"unsupported image shape {img.shape}")
    channels = img.shape[2]
    if channels == 3:
        return img, None
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR), "4ch_to_bgr"
    if channels == 2:  # gray + alpha
        return cv2.cvtColor(np.ascontiguousarray(img[:, :, 0]), cv2.COLOR_GRAY2BGR), "gray_alpha_to_bgr"
    raise ValueError(f"unsupported channel count {channels}")


def decode_bgr(data: bytes | np.ndarray) -> tuple[np.ndarray | None, list[str], str | None]:
    """Decode encoded image bytes to uint8 HxWx3 BGR.

    Returns ``(image, conversions, None)`` or ``(None, [], reason)``; never raises for bad data.
    """
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data
    if buf.size == 0:
        return None, [], "empty file"
    try:
        img = cv2.imdecode(buf, _DECODE_FLAGS)
    except cv2.error as exc:
        return None, [], f"decoder error: {str(exc).strip().splitlines()[-1]}"
    if img is None:
        if buf[:2].tobytes() == b"\xff\xd8" and b"\xff\xd9" not in buf[-64:].tobytes():
            return None, [], "truncated JPEG (no end-of-image marker)"
        return None, [], "not a decodable image"
    if img.size == 0 or img.shape[0] == 0 or img.shape[1] == 0:
        return None, [], f"decoded to an empty image {img.shape}"
    conversions: list[str] = []
    try:
        img, note = _to_uint8(img)
        if note:
            conversions.append(note)
        img, note = _to_bgr(img)
        if note:
            conversions.append(note)
    except ValueError as exc:
        return None, [], str(exc)
    return np.ascontiguousarray(img), conversions, None


def read_bgr(path: str | os.PathLike[str], report: ReadReport | None = None, name: str | None = None
             ) -> np.ndarray | None:
    """Read ``path`` as cv2.imread would (BGR uint8), or return ``None`` (and note why in ``report``,
    under ``name``, by default the path as given)."""
    name = name or str(path)
    try:
        # np.fromfile + imdecode also handles non-ASCII paths, which cv2.imread does not on every platform.
        data = np.fromfile(Path(path), dtype=np.uint8)
    except OSError as exc:
        img, conversions, reason = None, [], f"cannot read file: {exc.strerror or exc}"
    else:
        img, conversions, reason = decode_bgr(data)
    if report is not None:
        if img is None:
            report.note_skip(name, reason or "unknown")
        else:
            report.read += 1
            report.conversions.update(conversions)
    return img


def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` in POSIX form (so names and hashes agree across operating systems)."""
    return Path(os.path.relpath(path, root)).as_posix()


def list_images(folder: str | os.PathLike[str], recursive: bool = False) -> list[Path]:
    """Image files (by extension) in ``folder``, sorted by relative name; hidden files are ignored.

    Every tool lists a folder this way; whether a listed file really decodes is :func:`read_bgr`'s call."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder does not exist: {root}")
    pattern = root.rglob("*") if recursive else root.iterdir()
    found = [p for p in pattern
             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
    return sorted(found, key=lambda p: relative_name(p, root))
