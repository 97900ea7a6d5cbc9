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
    runs = bench.METHOD_RUNS
    assert runs["baseline (percentile, nearest)"] == ("--method", "percentile")
    switches = {"--equalize", "--rounding", "--bias-correction"}
    singles = [label for label, flags in runs.items() if label.startswith("+")]
    for label in singles:
        assert len(switches & set(runs[label])) == 1, label
