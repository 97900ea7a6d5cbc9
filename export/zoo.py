"""Public CenterNet checkpoints and a verified downloader.

Official weights (xingyizhou/CenterNet ``readme/MODEL_ZOO.md``) live only on Google Drive, addressed by file
id; Drive has no stable direct URL and may answer with an HTML confirmation or quota page instead of the
file, which the downloader detects and reports (download those files in a browser and pass the path).
mmdetection weights are plain HTTPS files (``configs/centernet/metafile.yml``). Their full sha256 is not
published, but mmdetection names files ``<name>-<first 8 hex of sha256>.pth`` (the torch.hub convention),
so that prefix is verified when no full hash is known.

AP values are COCO val2017 box AP as published: official without augmentation (flip in ``published_ap_flip``),
mmdetection single-scale (flip likewise).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from centernet_edge.runtime.hashing import file_sha256

__all__ = [
    "ZooEntry",
    "ZOO",
    "DownloadError",
    "ChecksumError",
    "download_checkpoint",
    "get_entry",
    "verify_file",
]

_CHUNK = 1 << 20
_HUB_SUFFIX = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
_HEX = re.compile(r"^[0-9a-f]+$")


class DownloadError(RuntimeError):
    """A checkpoint could not be fetched; no partial file is left behind."""


class ChecksumError(DownloadError):
    """The fetched bytes do not match the expected sha256 (or its published prefix)."""


@dataclass(frozen=True)
class ZooEntry:
    name: str
    url: str
    sha256: str | None  # full hash; None where nobody published it
    source: str  # 'official' | 'mmdet'
    arch: str  # centernet_edge.export.models architecture name
    published_ap: float
    filename: str
    published_ap_flip: float | None = None
    drive_id: str | None = None  # Google Drive file id for official weights
    notes: str = ""

    @property
    def sha256_prefix(self) -> str | None:
        """The hash prefix carried in a torch.hub-style filename, if any."""
        match = _HUB_SUFFIX.search(self.filename)
        return match.group(1) if match else None

    @property
    def page_url(self) -> str:
        """Where a person can download the file in a browser."""
        return f"https://drive.google.com/file/d/{self.drive_id}/view" if self.drive_id else self.url


def _official(
    name: str, drive_id: str, arch: str, ap: float, ap_flip: float, sha256: str | None = None, notes: str = ""
) -> ZooEntry:
    # The usercontent endpoint with confirm=t skips Drive's "cannot scan for viruses" page for large files.
    url = f"https://drive.usercontent.google.com/download?id={drive_id}&export=download&confirm=t"
    return ZooEntry(name, url, sha256, "official", arch, ap, f"{name}.pth", ap_flip, drive_id, notes)


def _mmdet(config: str, stamp: str, arch: str, ap: float, ap_flip: float) -> ZooEntry:
    filename = f"{config}_{stamp}.pth"
    url = f"https://download.openmmlab.com/mmdetection/v2.0/centernet/{config}/{filename}"
    return ZooEntry(config, url, None, "mmdet", arch, ap, filename, ap_flip)


ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        _official("ctdet_coco_hg", "13F904yXltGIqa_K3g3-FLleaNX0n7c9O", "hourglass_104", 40.3, 42.2),
        _official("ctdet_coco_dla_1x", "1xqFsdA3DANMq1MfnXG8n7nQPe4AfXTHv", "dla_34", 36.3, 38.2),
        _official(
            "ctdet_coco_dla_2x", "18Q3fzzAsha_3Qid6mn4jcIFPeOGUaj1d", "dla_34", 37.4, 39.2,
            sha256="43bf4cc2efe00e02c1ae8484035b062a35543872d276c7dcfeb4db3e64203e4f",
            notes="carries the unused ImageNet classifier base.fc; the loader drops it",
        ),
        _official("ctdet_coco_resdcn101", "1tKkSyzC3iWmM6XTYNJrC4XLCIToDmnHz", "resdcn_101", 34.6, 36.2),
        _official(
            "ctdet_coco_resdcn18", "1RtFps3kQAyLjQyzCao7pPDclOBQ64Vyp", "resdcn_18", 28.1, 30.0,
            sha256="f9e413f91cdb235adbcb41c5c4052b8f7ff53999374048949789c29d6df18eaa",
        ),
        _mmdet("centernet_resnet18_140e_coco", "20210705_093630-bb5b3bf7", "mmdet_r18", 25.9, 27.3),
        _mmdet(
            "centernet_resnet18_dcnv2_140e_coco", "20210702_155131-c8cd631f", "mmdet_r18_dcnv2", 29.5, 30.9
        ),
    )
}  # fmt: skip


def get_entry(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise DownloadError(
            f"unknown checkpoint name {name!r}; known: {', '.join(sorted(ZOO))}, or pass a URL"
        ) from None


def _normalise_hash(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip().lower()
    if len(value) < 8 or len(value) > 64 or not _HEX.match(value):
        raise ValueError(
            f"expected_sha256 must be 8 to 64 hex digits (a full sha256 or its prefix), got {value!r}"
        )
    return value


def verify_file(path: str | Path, expected: str | None) -> str:
    """Return the file's sha256; ChecksumError unless it starts with `expected` (full hash or prefix)."""
    actual = file_sha256(path)
    if expected and not actual.startswith(expected):
        raise ChecksumError(_mismatch(Path(path).name, expected, actual))
    return actual


def _mismatch(name: str, expected: str, actual: str) -> str:
    kind = "sha256" if len(expected) == 64 else f"sha256 prefix ({len(expected)} hex digits)"
    return (
        f"{name}: checksum mismatch: expected {kind} {expected}, got {actual}. The download is corrupted "
        "or the server returned a different file; nothing was kept. Retry, or check the URL."
    )


def _resolve(name_or_url: str, expected_sha256: str | None) -> tuple[str, str, str | None, ZooEntry | None]:
    """(url, filename, expected hash or prefix, zoo entry)."""
    explicit = _normalise_hash(expected_sha256)
    if "://" in name_or_url:
        filename = Path(urllib.parse.urlparse(name_or_url).path).name
        if not filename:
            raise DownloadError(f"cannot derive a file name from URL {name_or_url!r}")
        match = _HUB_SUFFIX.search(filename)
        return name_or_url, filename, explicit or (match.group(1) if match else None), None
    entry = get_entry(name_or_url)
    return entry.url, entry.filename, explicit or entry.sha256 or entry.sha256_prefix, entry


def download_checkpoint(
    name_or_url: str,
    dest_dir: str | Path,
    expected_sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Fetch a zoo checkpoint (by name) or any URL into `dest_dir` and return its path.

    The body streams into a hidden temp file in `dest_dir`, which is renamed onto the final name only after
    the checksum passes, so an interrupted or corrupted download never looks like a finished file. The
    expected hash is `expected_sha256`, else the zoo's full hash, else the prefix in a
    ``name-<hex>.pth`` filename; with none of these the file is kept unverified. An existing file that passes
    verification is reused without any network access."""
    url, filename, expected, entry = _resolve(name_or_url, expected_sha256)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / filename
    if final.exists():
        try:
            verify_file(final, expected)
        except ChecksumError as exc:
            raise ChecksumError(
                f"{final} already exists but does not verify: {exc} Delete it to download again."
            ) from None
        return final

    handle = tempfile.NamedTemporaryFile(dir=dest_dir, prefix=f".{filename}.", suffix=".part", delete=False)
    tmp = Path(handle.name)
    try:
        with handle:
            actual = _stream(url, handle, filename, progress, timeout, entry)
        if expected and not actual.startswith(expected):
            raise ChecksumError(_mismatch(filename, expected, actual))
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def _stream(url: str, out, filename: str, progress: bool, timeout: float, entry: ZooEntry | None) -> str:
    """Copy the response body into `out`; return its sha256."""
    request = urllib.request.Request(url, headers={"User-Agent": "centernet-edge"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"{filename}: HTTP {exc.code} {exc.reason} from {url}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"{filename}: cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    digest = hashlib.sha256()
    with response:
        if response.headers.get_content_type() == "text/html" and not filename.endswith((".html", ".htm")):
            where = entry.page_url if entry else url
            raise DownloadError(
                f"{filename}: the server sent an HTML page instead of the file (Google Drive does this for "
                f"quota or confirmation pages). Download it in a browser from {where} and put it in the "
                "destination folder; it is verified and reused from there."
            )
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        with tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=filename, disable=not progress
        ) as bar:
            while block := response.read(_CHUNK):
                out.write(block)
                digest.update(block)
                received += len(block)
                bar.update(len(block))
        out.flush()
        os.fsync(out.fileno())
    if total is not None and received != total:
        raise DownloadError(f"{filename}: connection closed after {received} of {total} bytes; retry")
    return digest.hexdigest()
