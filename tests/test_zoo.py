"""Zoo registry facts and the verified downloader against a local HTTP server."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from centernet_edge.export.zoo import ZOO, ChecksumError, DownloadError, download_checkpoint, get_entry

PAYLOAD = bytes(range(256)) * 4099  # ~1 MiB: more than one read chunk
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path, list[str]]]:
    root = tmp_path / "served"
    root.mkdir()
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    handler = type("Handler", (_Handler,), {"requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, handler.requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_download_verifies_full_sha256(server, tmp_path: Path) -> None:
    base, root, _ = server
    (root / "model.pth").write_bytes(PAYLOAD)
    path = download_checkpoint(
        f"{base}/model.pth", tmp_path / "dl", expected_sha256=PAYLOAD_SHA, progress=False
    )
    assert path == tmp_path / "dl" / "model.pth"
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pth"]


def test_checksum_mismatch_leaves_no_file(server, tmp_path: Path) -> None:
    base, root, _ = server
    (root / "model.pth").write_bytes(PAYLOAD)
    dest = tmp_path / "dl"
    with pytest.raises(
        ChecksumError, match=rf"checksum mismatch: expected sha256 {'0' * 64}, got {PAYLOAD_SHA}"
    ):
        download_checkpoint(f"{base}/model.pth", dest, expected_sha256="0" * 64, progress=False)
    assert list(dest.iterdir()) == []


def test_filename_prefix_is_verified(server, tmp_path: Path) -> None:
    base, root, _ = server
    good = f"centernet_test_20210101_000000-{PAYLOAD_SHA[:8]}.pth"
    (root / good).write_bytes(PAYLOAD)
    path = download_checkpoint(f"{base}/{good}", tmp_path / "ok", progress=False)
    assert path.read_bytes() == PAYLOAD

    bad = "centernet_test_20210101_000000-deadbeef.pth"
    (root / bad).write_bytes(PAYLOAD)
    with pytest.raises(ChecksumError, match=r"expected sha256 prefix \(8 hex digits\) deadbeef"):
        download_checkpoint(f"{base}/{bad}", tmp_path / "bad", progress=False)
    assert list((tmp_path / "bad").iterdir()) == []


def test_verified_file_is_reused_without_network(server, tmp_path: Path) -> None:
    base, root, requests = server
    (root / "model.pth").write_bytes(PAYLOAD)
    dest = tmp_path / "dl"
    first = download_checkpoint(f"{base}/model.pth", dest, expected_sha256=PAYLOAD_SHA, progress=False)
    (root / "model.pth").unlink()  # a second fetch would now 404
    second = download_checkpoint(f"{base}/model.pth", dest, expected_sha256=PAYLOAD_SHA[:12], progress=False)
    assert first == second and requests == ["/model.pth"]


def test_existing_file_that_fails_verification_is_reported(tmp_path: Path) -> None:
    (tmp_path / "model.pth").write_bytes(b"not the weights")
    with pytest.raises(ChecksumError, match="already exists but does not verify.*Delete it"):
        download_checkpoint(
            "http://127.0.0.1:9/model.pth", tmp_path, expected_sha256=PAYLOAD_SHA, progress=False
        )
    assert (tmp_path / "model.pth").read_bytes() == b"not the weights"


def test_http_errors_and_html_pages(server, tmp_path: Path) -> None:
    base, root, _ = server
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_checkpoint(f"{base}/missing.pth", tmp_path / "a", progress=False)
    (root / "page.html").write_text("<html>quota exceeded</html>")
    (root / "weights.pth").mkdir()  # SimpleHTTPRequestHandler redirects a folder to its listing page
    with pytest.raises(DownloadError, match="HTML page instead of the file"):
        download_checkpoint(f"{base}/weights.pth/", tmp_path / "b", progress=False)
    assert not any((tmp_path / "b").iterdir())


def test_bad_expected_hash_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="8 to 64 hex digits"):
        download_checkpoint("http://127.0.0.1:9/x.pth", tmp_path, expected_sha256="xyz", progress=False)
    with pytest.raises(DownloadError, match="unknown checkpoint name 'nope'.*ctdet_coco_resdcn18"):
        get_entry("nope")


def test_registry_facts() -> None:
    resdcn18, dla2x = ZOO["ctdet_coco_resdcn18"], ZOO["ctdet_coco_dla_2x"]
    assert resdcn18.sha256 == "f9e413f91cdb235adbcb41c5c4052b8f7ff53999374048949789c29d6df18eaa"
    assert dla2x.sha256 == "43bf4cc2efe00e02c1ae8484035b062a35543872d276c7dcfeb4db3e64203e4f"
    assert (resdcn18.arch, resdcn18.published_ap, dla2x.arch, dla2x.published_ap) == (
        "resdcn_18",
        28.1,
        "dla_34",
        37.4,
    )
    assert resdcn18.drive_id in resdcn18.url and resdcn18.page_url.startswith(
        "https://drive.google.com/file/d/"
    )
    mm = ZOO["centernet_resnet18_dcnv2_140e_coco"]
    assert mm.sha256 is None and mm.sha256_prefix == "c8cd631f" and mm.url.endswith("/" + mm.filename)
    assert mm.url.startswith("https://download.openmmlab.com/mmdetection/v2.0/centernet/")
    assert ZOO["centernet_resnet18_140e_coco"].sha256_prefix == "bb5b3bf7"
    assert {e.source for e in ZOO.values()} == {"official", "mmdet"}
    assert all(e.sha256 is None or len(e.sha256) == 64 for e in ZOO.values())
