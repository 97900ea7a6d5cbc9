"""The C library as C: strict-flag unit tests, the demo's exact command line, a sanitizer fuzz loop,
and the aarch64 cross-build run under qemu."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from c_runtime_support import c_to_detections

from centernet_edge.runtime.clib import (
    C_DIR,
    LIBRARY_SOURCES,
    STRICT_FLAGS,
    CLibrary,
    build_shared_library,
    config_values,
    find_compiler,
)
from centernet_edge.runtime.spec import ModelSpec

TESTS_C = Path(__file__).resolve().parent / "c"
SOURCES = [str(C_DIR / s) for s in LIBRARY_SOURCES]


def _compiler() -> str:
    cc = find_compiler()
    if cc is None:
        pytest.skip("no C compiler on PATH")
    return cc


def _compile(cc: str, out: Path, *sources: str, flags: tuple[str, ...] = ()) -> Path:
    cmd = [cc, *STRICT_FLAGS, "-O2", f"-I{C_DIR}", *flags, *sources, "-o", str(out), "-lm"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    return out


def _assert_all_passed(result: subprocess.CompletedProcess) -> None:
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and lines and lines[-1].endswith(" passed, 0 failed"), \
        result.stdout[-2000:] + result.stderr[-2000:]


def test_c_unit_tests_under_strict_flags(tmp_path: Path) -> None:
    exe = _compile(_compiler(), tmp_path / "unit", *SOURCES, str(TESTS_C / "test_centernet_edge.c"))
    _assert_all_passed(subprocess.run([str(exe)], capture_output=True, text=True, timeout=60))


def test_makefile_builds_library_and_demo(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    _compiler()
    result = subprocess.run(["make", "-C", str(C_DIR), f"BUILD={tmp_path}/build", f"BIN={tmp_path}/bin"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in ("build/libcenternet_edge.a", "build/libcenternet_edge.so", "bin/centernet_demo"):
        assert (tmp_path / name).is_file(), name


def _write_ppm(path: Path, rgb: np.ndarray, comment: bool = True) -> None:
    h, w = rgb.shape[:2]
    header = f"P6\n{'# made by a test' + chr(10) if comment else ''}{w} {h}\n255\n".encode()
    path.write_bytes(header + np.ascontiguousarray(rgb).tobytes())


def _demo_spec() -> ModelSpec:
    text = (C_DIR / "centernet_model_config.h").read_text()
    assert "CN_RESIZE_AFFINE, 512, 512" in text and "CN_MODEL_NUM_CLASSES 80" in text
    from centernet_edge.export.onnx_export import ExportOptions, build_spec

    return build_spec(arch="res_18", source="official", num_classes=80,
                      options=ExportOptions(preprocess="none", decode=False), name="official_coco_512")


def test_committed_demo_config_is_what_the_generator_writes() -> None:
    from centernet_edge.runtime.clib import config_header

    assert (C_DIR / "centernet_model_config.h").read_text() == config_header(_demo_spec())


def test_demo_command_line(tmp_path: Path) -> None:
    cc = _compiler()
    demo = _compile(cc, tmp_path / "centernet_demo", *SOURCES, str(C_DIR / "centernet_demo.c"))
    lib = CLibrary(build_shared_library(tmp_path / "lib"))
    ctx = lib.context(config_values(_demo_spec()))
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    _write_ppm(tmp_path / "img.ppm", rgb)
    run = subprocess.run([str(demo), "preprocess", str(tmp_path / "img.ppm"), str(tmp_path / "in.bin")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == '{"input_shape": [1, 3, 512, 512]}'
    got = np.fromfile(tmp_path / "in.bin", dtype="<f4").reshape(1, 3, 512, 512)
    want, t = ctx.preprocess(np.ascontiguousarray(rgb[:, :, ::-1]), "BGR")
    np.testing.assert_array_equal(got[0], want)

    heat = rng.uniform(0, 1, (1, 80, 128, 128)).astype("<f4")
    wh = rng.uniform(1, 30, (1, 2, 128, 128)).astype("<f4")
    reg = rng.uniform(0, 1, (1, 2, 128, 128)).astype("<f4")
    for name, arr in (("hm", heat), ("wh", wh), ("reg", reg)):
        arr.tofile(tmp_path / f"{name}.bin")
    args = [str(demo), "decode", "131", "97", *(str(tmp_path / f"{n}.bin") for n in ("hm", "wh", "reg"))]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = np.array([[float(v) for v in line.split()] for line in run.stdout.strip().splitlines()])
    want = c_to_detections(ctx.postprocess(heat, wh, reg, [ctx.transform(131, 97)])[0])
    assert rows.shape == (100, 6)
    np.testing.assert_array_equal(rows[:, 5].astype(int), want.labels)
    np.testing.assert_array_equal(rows[:, :4].astype(np.float32), want.boxes)
    np.testing.assert_array_equal(rows[:, 4].astype(np.float32), want.scores)

    # bad input: exit 2, one line on stderr, nothing on stdout
    (tmp_path / "short.bin").write_bytes(struct.pack("<3f", 1, 2, 3))
    (tmp_path / "bad.ppm").write_bytes(b"P3\n1 1\n255\n0 0 0\n")
    _write_ppm(tmp_path / "cut.ppm", rgb)
    (tmp_path / "cut.ppm").write_bytes((tmp_path / "cut.ppm").read_bytes()[:-10])
    for bad in ([str(demo)], [str(demo), "decode", "0", "97", *args[4:]],
                [str(demo), "decode", "131", "97", str(tmp_path / "short.bin"), *args[5:]],
                [str(demo), "decode", "131", "97", str(tmp_path / "none.bin"), *args[5:]],
                [str(demo), "preprocess", str(tmp_path / "bad.ppm"), str(tmp_path / "o.bin")],
                [str(demo), "preprocess", str(tmp_path / "cut.ppm"), str(tmp_path / "o.bin")],
                [str(demo), "frobnicate"]):
        run = subprocess.run(bad, capture_output=True, text=True)
        assert run.returncode == 2, bad
        assert run.stdout == "" and len(run.stderr.strip().splitlines()) == 1, run.stderr


def _sanitizer_works(cc: str, tmp_path: Path) -> bool:
    probe = tmp_path / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    result = subprocess.run([cc, "-fsanitize=address,undefined", str(probe), "-o", str(tmp_path / "probe")],
                            capture_output=True, text=True)
    return result.returncode == 0 and subprocess.run([str(tmp_path / "probe")]).returncode == 0


def test_fuzz_loop_under_address_and_undefined_sanitizers(tmp_path: Path) -> None:
    cc = _compiler()
    if not _sanitizer_works(cc, tmp_path):
        pytest.skip(f"{cc} cannot build and run -fsanitize=address,undefined programs here")
    exe = _compile(cc, tmp_path / "fuzz", *SOURCES, str(TESTS_C / "fuzz_centernet_edge.c"),
                   flags=("-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                          "-fno-omit-frame-pointer"))
    env = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"}
    result = subprocess.run([str(exe), "60", "2024"], capture_output=True, text=True, timeout=300, env=env)
    report = result.stderr
    assert "runtime error" not in report and "AddressSanitizer" not in report and "LeakSanitizer" not in report, \
        report[-3000:]
    _assert_all_passed(result)


def _aarch64_tools() -> tuple[str, str]:
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if not cc or not qemu:
        pytest.skip("aarch64 cross tools absent (apt-get install gcc-aarch64-linux-gnu qemu-user; .ci/run does)")
    return cc, qemu


def test_aarch64_cross_build_runs_unit_tests_and_matches_native_output(tmp_path: Path) -> None:
    cross, qemu = _aarch64_tools()
    native_cc = _compiler()
    flags = ("-static",)
    unit = _compile(cross, tmp_path / "unit-aarch64", *SOURCES, str(TESTS_C / "test_centernet_edge.c"), flags=flags)
    assert b"aarch64" in subprocess.run(["file", str(unit)], capture_output=True).stdout.lower() \
        or shutil.which("file") is None
    _assert_all_passed(subprocess.run([qemu, str(unit)], capture_output=True, text=True, timeout=120))
    # Same bytes as the native build: pre-processing of a photo-sized image and decode of random heads.
    demo_arm = _compile(cross, tmp_path / "demo-aarch64", *SOURCES, str(C_DIR / "centernet_demo.c"), flags=flags)
    demo_x = _compile(native_cc, tmp_path / "demo-native", *SOURCES, str(C_DIR / "centernet_demo.c"))
    rng = np.random.default_rng(1)
    _write_ppm(tmp_path / "img.ppm", rng.integers(0, 256, (333, 500, 3), dtype=np.uint8))
    for name, shape in (("hm", (80, 128, 128)), ("wh", (2, 128, 128)), ("reg", (2, 128, 128))):
        rng.uniform(0, 20 if name == "wh" else 1, shape).astype("<f4").tofile(tmp_path / f"{name}.bin")
    outputs = []
    for prefix, demo in (([qemu], demo_arm), ([], demo_x)):
        out_bin = tmp_path / f"in-{demo.name}.bin"
        pre = subprocess.run([*prefix, str(demo), "preprocess", str(tmp_path / "img.ppm"), str(out_bin)],
                             capture_output=True, text=True, timeout=120)
        dec = subprocess.run([*prefix, str(demo), "decode", "500", "333",
                              *(str(tmp_path / f"{n}.bin") for n in ("hm", "wh", "reg"))],
                             capture_output=True, text=True, timeout=120)
        assert pre.returncode == 0 and dec.returncode == 0, pre.stderr + dec.stderr
        outputs.append((out_bin.read_bytes(), dec.stdout))
    assert outputs[0][0] == outputs[1][0], "aarch64 pre-processing differs from the native build"
    assert outputs[0][1] == outputs[1][1], "aarch64 detections differ from the native build"
