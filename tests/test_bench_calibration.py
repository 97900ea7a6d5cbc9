"""Helpers of scripts/bench_calibration.py that its tables rely on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "bench_calibration", Path(__file__).resolve().parents[1] / "scripts" / "bench_calibration.py")


@pytest.fixture(scope="module")
def bench():
    module = importlib.util.module_from_spec(_SPEC)
    _SPEC.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("flags", "expected"), [
    ("fpu sse2 avx avx2 fma", "avx2"),
    ("avx2 avx512f avx512bw avx512_vnni", "avx2+avx512+vnni"),
    ("avx2 avx_vnni", "avx2+vnni"),
    ("avx2 avx512f avx512_vnni amx_tile amx_int8", "avx2+avx512+vnni+amx"),
    ("fpu sse2", "none of avx2/avx512/vnni/amx"),
])
def test_cpu_isa_reads_the_integer_simd_flags(bench, flags, expected):
    assert bench.cpu_isa(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n") == expected


def test_method_runs_switch_one_method_each(bench):
    """The baseline turns every method off explicitly (defaults change); each "+" row adds one switch."""
    from centernet_edge.quantize.cli import build_parser

    runs = bench.METHOD_RUNS
    base = runs["baseline (percentile, nearest)"]
    parse = lambda flags: vars(build_parser().parse_args(["m.onnx", "--images", "i", *flags]))  # noqa: E731
    baseline = parse(base)
    assert baseline["rounding"] == "nearest" and not baseline["channel_scaling"] and not baseline["equalize"]
    assert not baseline["bias_correction"] and baseline["method"] == "percentile"
    singles = [label for label, flags in runs.items() if label.startswith("+")]
    assert len(singles) >= 5
    for label in singles:
        flags = runs[label]
        assert flags[:len(base)] == base, label
        changed = {k for k, v in parse(flags).items() if baseline[k] != v}
        assert len(changed) == 1, (label, changed)
        assert bench._last(flags, "--method") == parse(flags)["method"]


def test_weight_fit_reports_read_per_artifact(bench):
    doc = {"qdq": {"kept": False, "layers": []}, "cpu": {"kept": True, "layers": []}}
    assert bench._fits_kept(doc) == {"qdq": False, "cpu": True}
