"""Atomic writes: the final name holds either the complete new content or what was there before."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from centernet_edge.export.onnx_export import save_onnx
from centernet_edge.runtime.atomic import atomic_path, atomic_write_bytes, atomic_write_text


def test_success_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # not visible before the block ends
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_keeps_previous_content_and_cleans_up(tmp_path: Path, exc: BaseException) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(exc)):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise exc
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_nothing_written_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(tmp_path / "x") as tmp:
            tmp.unlink()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="output directory does not exist"):
        atomic_write_bytes(tmp_path / "missing" / "x", b"1")


def test_text_and_onnx_helpers(tmp_path: Path, monkeypatch) -> None:
    atomic_write_text(tmp_path / "a.txt", "héllo")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    save_onnx(model, tmp_path / "m.onnx")
    assert onnx.load(str(tmp_path / "m.onnx")) == model

    def disk_full(self: Path, data: bytes) -> int:
        with open(self, "wb") as fh:
            fh.write(data[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_onnx(model, tmp_path / "m2.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "m.onnx"]
