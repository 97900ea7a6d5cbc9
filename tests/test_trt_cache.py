"""TensorRT calibration cache text, calibration summary JSON and the stale-cache refusal."""

from __future__ import annotations

import json
import logging
import struct

import pytest

from centernet_edge.quantize.manifest import (
    StaleCacheError,
    calibration_summary,
    check_reusable,
    read_summary,
    summary_path_for,
    write_summary,
)
from centernet_edge.quantize.trt_cache import (
    CacheFormatError,
    amax_to_hex,
    hex_to_amax,
    parse_cache,
    read_cache,
    render_cache,
    trt_version_int,
    write_cache,
)


def test_hex_matches_the_published_example():
    # REFERENCE §2.3: "input: 3caa54fc" is scale 0.0207925, i.e. amax 2.6406
    (scale,) = struct.unpack(">f", bytes.fromhex("3caa54fc"))
    assert scale == pytest.approx(0.0207925, abs=1e-7)
    assert hex_to_amax("3caa54fc") == pytest.approx(2.6406, abs=1e-4)
    assert amax_to_hex(hex_to_amax("3caa54fc")) == "3caa54fc"
    assert amax_to_hex(127.0) == "3f800000"  # scale exactly 1.0
    assert amax_to_hex(0.0) == "0" and hex_to_amax("0") == 0.0
    assert amax_to_hex(127 * 2.0**-140) == "200"  # denormal scale 2**-140 = 512 ulps: no zero padding
    with pytest.raises(ValueError, match="finite"):
        amax_to_hex(float("nan"))
    with pytest.raises(ValueError, match=">= 0"):
        amax_to_hex(-1.0)


def test_version_numbers():
    assert trt_version_int("10.16.1") == 101601
    assert trt_version_int("10.14.1.48") == 101401
    assert trt_version_int("8.6.1") == 8601
    assert trt_version_int("10.1") == 100100
    assert trt_version_int(8401) == 8401
    with pytest.raises(ValueError, match="not a TensorRT version"):
        trt_version_int("ten")


def test_render_is_sorted_with_method_headers():
    amaxes = {"conv2_out": 4.0, "b_in": 2.6406446, "a": 0.0}
    text = render_cache(amaxes)
    assert text.splitlines() == ["TRT-101601-EntropyCalibration2", "a: 0", "b_in: 3caa54fc", "conv2_out: 3d010204"]
    assert text.endswith("\n")
    assert render_cache(amaxes, method="minmax").startswith("TRT-101601-MinMaxCalibration\n")
    assert render_cache(amaxes, method="percentile").startswith("TRT-101601-EntropyCalibration2\n")
    assert render_cache(amaxes, trt_version="8.6.1").startswith("TRT-8601-EntropyCalibration2\n")
    assert render_cache(amaxes, algorithm="LegacyCalibration").startswith("TRT-101601-LegacyCalibration\n")
    with pytest.raises(ValueError, match="unknown calibration method"):
        render_cache(amaxes, method="kl")
    with pytest.raises(ValueError, match="unknown TensorRT calibration algorithm"):
        render_cache(amaxes, algorithm="Entropy3")


def test_round_trip_and_byte_identical_rewrite(tmp_path, caplog):
    amaxes = {"tower_0/images:0": 255.0, "x/conv:0": 12.3456, "relu": 6.0, "zero": 0.0}
    path = tmp_path / "calib.cache"
    with caplog.at_level(logging.WARNING):
        write_cache(path, amaxes, method="entropy", trt_version="10.16.1")
    assert "contain ':'" in caplog.text  # ORT's TensorRT EP would split these names at the first ':'
    cache = read_cache(path)
    assert (cache.version, cache.algorithm, cache.header) == (101601, "EntropyCalibration2",
                                                              "TRT-101601-EntropyCalibration2")
    assert set(cache.amaxes) == set(amaxes)
    for name, amax in amaxes.items():
        assert cache.amaxes[name] == pytest.approx(amax, rel=1e-7)
    again = tmp_path / "again.cache"
    write_cache(again, cache.amaxes)
    assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize(("text", "message"), [
    ("", "is empty"),
    ("TRT-101601\nx: 3f800000\n", "line 1: expected 'TRT-<version>-<Algorithm>'"),
    ("TRT-101601-EntropyCalibration2\nx 3f800000\n", "line 2: expected '<tensor>: <hex>'"),
    ("TRT-101601-EntropyCalibration2\n: 3f800000\n", "line 2: expected '<tensor>: <hex>'"),
    ("TRT-101601-EntropyCalibration2\nx: 0x3f80\n", "line 2: '0x3f80' is not a float32 hex pattern"),
    ("TRT-101601-EntropyCalibration2\nx: 3f800000\ny: 3f8000001\n", "line 3: '3f8000001' is not"),
    ("TRT-101601-EntropyCalibration2\nx: 3f800000\nx: 3f800000\n", "line 3: tensor 'x' appears twice"),
    ("TRT-101601-EntropyCalibration2\nx: bf800000\n", "line 2: scale bf800000 is negative"),
    ("TRT-101601-EntropyCalibration2\nx: 7fc00000\n", "not finite"),
])
def test_malformed_caches_are_rejected_with_line_numbers(text, message):
    with pytest.raises(CacheFormatError, match=message.replace("(", "\\(").replace(")", "\\)")):
        parse_cache(text)


def test_trailing_blank_lines_and_uppercase_hex_are_accepted():
    cache = parse_cache("TRT-8601-MinMaxCalibration\nin: 3F800000\n\n\n")
    assert cache.version == 8601 and cache.algorithm == "MinMaxCalibration" and cache.amaxes == {"in": 127.0}


def _summary(**overrides):
    args = dict(model_sha256="a" * 64, dataset_hash="b" * 64, method="entropy",
                amaxes={"y": 2.0, "x": 1.0}, num_images=100, trt_header="TRT-101601-EntropyCalibration2")
    args.update(overrides)
    return calibration_summary(**args)


def test_summary_is_deterministic_and_complete(tmp_path):
    s = _summary(method_options={"expand": "nonempty"}, extra={"num_bins": 2048})
    assert list(s["amax"]) == ["x", "y"]
    for key in ("model_sha256", "dataset_hash", "method", "toolkit_version", "amax", "method_options"):
        assert key in s
    a, b = write_summary(tmp_path / "a.json", s), write_summary(tmp_path / "b.json", _summary(
        method_options={"expand": "nonempty"}, extra={"num_bins": 2048}))
    assert a.read_bytes() == b.read_bytes()
    assert read_summary(a)["amax"] == {"x": 1.0, "y": 2.0}
    with pytest.raises(ValueError, match="clash"):
        _summary(extra={"method": "x"})


def test_stale_cache_refusal(tmp_path):
    cache = tmp_path / "model.cache"
    current = dict(model_sha256="a" * 64, dataset_hash="b" * 64, method="entropy")
    assert check_reusable(cache, **current) is False  # nothing there yet
    write_cache(cache, {"x": 1.0})
    with pytest.raises(StaleCacheError, match="has no summary"):
        check_reusable(cache, **current)
    write_summary(summary_path_for(cache), _summary(method_options={"percentile": 99.99}))
    assert summary_path_for(cache).name == "model.cache.json"
    assert check_reusable(cache, **current) is True
    with pytest.raises(StaleCacheError, match=r"model_sha256 'aaaaaaaaaaaa' \(now 'cccccccccccc'\)"):
        check_reusable(cache, **{**current, "model_sha256": "c" * 64})
    with pytest.raises(StaleCacheError, match="dataset_hash") as err:
        check_reusable(cache, **{**current, "dataset_hash": "d" * 64, "method": "minmax"})
    assert "method 'entropy' (now 'minmax')" in str(err.value) and "--force" in str(err.value)
    with pytest.raises(StaleCacheError, match="method_options"):
        check_reusable(cache, **current, method_options={"percentile": 99.9})
    assert check_reusable(cache, **current, method_options={"percentile": 99.99}) is True
    assert check_reusable(cache, **{**current, "method": "mse"}, force=True) is False
    summary_path_for(cache).write_text("{not json")
    with pytest.raises(StaleCacheError, match="not valid JSON"):
        check_reusable(cache, **current)
    other = tmp_path / "elsewhere.json"
    other.write_text(json.dumps(_summary()))
    assert check_reusable(cache, **current, summary_path=other) is True
