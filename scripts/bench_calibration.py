"""The calibration benchmark of the issue, on the real mb3 CenterNet (foreign ONNX, COCO-trained).

    python scripts/bench_calibration.py --work bench_calib            # everything (~30 min on 1 core)
    python scripts/bench_calibration.py --work bench_calib --skip-calibration   # reuse the two runs

1. ``centernet-calibrate`` with 100 and with 500 images of ``coco/calib_val2017`` (``--method auto``:
   the range method and the float layers are chosen label-free on calibration images), each in its own
   process: wall time per stage and peak RSS of the process tree;
2. AP on ``coco/val2017`` + ``instances_val2017_dev103.json`` through the shared evaluator (the dev
   annotations only *measure*; nothing is tuned on them): fp32, fp16 (artifact as ONNX Runtime CPU runs
   it, and the fp16-rounding simulation), int8 Q/DQ mixed precision, int8 with every eligible layer for
   each range method, the ONNX Runtime CPU int8 model, and a trade-off curve over the number of layers
   kept float (most sensitive first);
3. CPU latency, inference only, batch 1, the same thread count for every model, interleaved
   round-robin in one process (so load changes hit every model alike): fp32 vs the int8 models, each
   speed-up printed with the CPU's integer ISA (avx2 / avx512 / vnni / amx, from /proc/cpuinfo);
4. the post-training methods one at a time (``--methods-images`` calibration images, every eligible layer
   int8, each calibration in its own process): channel scaling, equalization, AdaRound rounding, bias
   correction, downstream ranges, and the defaults together -> AP of the Q/DQ and CPU artifacts, label-free
   head error, calibration time.

Prints Markdown tables and writes ``<work>/bench_results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import psutil

from centernet_edge.eval.dataset import load_coco_dataset
from centernet_edge.eval.evaluate import evaluate_models, resolve_model
from centernet_edge.quantize.artifacts import derived_spec, save_model
from centernet_edge.quantize.fp16 import simulate_fp16
from centernet_edge.quantize.ort_cpu_int8 import CpuInt8Config
from centernet_edge.quantize.pipeline import (
    DOWNSTREAM_CANDIDATES,
    CalibrateOptions,
    build_cpu_model,
    compute_ranges,
    prepare_run,
)
from centernet_edge.quantize.qdq import build_qdq_model
from centernet_edge.quantize.range_search import search_ranges
from centernet_edge.quantize.thresholds import METHODS, compute_amaxes
from centernet_edge.runtime.onnx_session import create_session
from centernet_edge.runtime.preprocess import prepare_batch
from centernet_edge.runtime.runners import RunnerOptions
from centernet_edge.runtime.spec import ModelSpec, load_spec

REPO = Path(__file__).resolve().parents[1]
DESCRIPTION = REPO / "eval" / "model_descriptions" / "mb3_centernet_coco.json"


def _shared() -> Path:
    env = os.environ.get("CENTERNET_EDGE_SHARED")
    return Path(env) if env else REPO.parent / "shared"


# ---- 1. calibration runs ------------------------------------------------------------------------


def _tree_rss(proc: psutil.Process) -> int:
    """RSS of a process and its children; processes that exit while being read count as 0."""
    try:
        tree = [proc, *proc.children(recursive=True)]
    except psutil.Error:  # the process has exited
        return 0
    total = 0
    for p in tree:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_calibration(model: Path, images: Path, num: int, out: Path, stats_cache: Path, threads: int,
                    extra: tuple[str, ...] = ()) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "centernet_edge.quantize.cli",
        str(model),
        "--model-spec",
        str(DESCRIPTION),
        "--images",
        str(images),
        "--num-images",
        str(num),
        "--method",
        "auto",
        "-o",
        str(out),
        "--stats-cache",
        str(stats_cache),
        "--threads",
        str(threads),
        "--force",
        "--quiet",
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    ps = psutil.Process(proc.pid)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(ps))
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    stop.set()
    sampler.join()
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"centernet-calibrate failed ({code}) for {num} images")
    stages = json.loads((out / "timings.json").read_text())["seconds"]
    return {"images": num, "wall_s": round(wall, 1), "peak_rss_mb": round(peak / 2**20), "stages_s": stages}


# ---- 4. the post-training methods on/off ---------------------------------------------------------

# label -> centernet-calibrate flags; every run quantizes every eligible layer (no mixed precision), so
# each method's effect on int8 itself is what is measured. Every row is the baseline plus one switch
# (later flags override earlier ones), except the last, which combines the defaults.
METHOD_BASELINE = ("--method", "percentile", "--rounding", "nearest", "--no-channel-scaling")
METHOD_RUNS: dict[str, tuple[str, ...]] = {
    "baseline (percentile, nearest)": METHOD_BASELINE,
    "+ channel scaling": (*METHOD_BASELINE, "--channel-scaling"),
    "+ equalization": (*METHOD_BASELINE, "--equalize"),
    "+ AdaRound rounding": (*METHOD_BASELINE, "--rounding", "adaround"),
    "+ bias correction": (*METHOD_BASELINE, "--bias-correction"),
    "+ downstream ranges": (*METHOD_BASELINE, "--method", "downstream"),
    "channel scaling + AdaRound (the defaults)": (*METHOD_BASELINE, "--channel-scaling", "--rounding", "adaround"),
}


def _fits_kept(doc: dict[str, Any]) -> dict[str, bool]:
    """weight_fit.json -> whether each artifact's fit survived the guard."""
    return {key: bool(entry["kept"]) for key, entry in doc.items() if isinstance(entry, dict)}


def _last(flags: tuple[str, ...], name: str) -> str:
    return [flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag == name][-1]


def run_methods(model: Path, images: Path, num: int, work: Path, threads: int) -> dict[str, dict]:
    """One all-int8 calibration per row of METHOD_RUNS; wall time, head errors and whether a weight fit
    survived its label-free guard."""
    out: dict[str, dict] = {}
    for i, (label, flags) in enumerate(METHOD_RUNS.items()):
        folder = work / f"method{i}"
        stats = work / "stats"  # keyed by model: equalized / rescaled models get their own entries
        run = run_calibration(model, images, num, folder, stats, threads,
                              ("--int8", "--budget", "none", "--layer-report-images", "0", *flags))
        summary = json.loads((folder / "summary.json").read_text())
        fit = folder / "weight_fit.json"
        out[label] = {
            "folder": str(folder), "wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mb"],
            "method": _last(flags, "--method"),
            "qdq_head_error": summary["int8_head_error"]["head_error"],
            "cpu_head_error": (summary.get("cpu_int8") or {}).get("head_error"),
            "weight_fit_kept": _fits_kept(json.loads(fit.read_text())) if fit.exists() else None,
        }
    return out


# ---- 2. models to evaluate ------------------------------------------------------------------------


def _save(model: onnx.ModelProto, path: Path, spec: ModelSpec, precision: str, **extra: Any) -> Path:
    save_model(model, path, derived_spec(spec, precision, extra))
    return path


# ONNX Runtime CPU int8 configurations: label -> (format, head convs float, layers kept float)
# label -> (config, number of most sensitive layers kept float)
CPU_VARIANTS = {
    "CPU qoperator": (CpuInt8Config(), 0),
    "CPU qoperator, no kernel rewrites / shared concat ranges": (
        CpuInt8Config(kernel_rewrites=False, shared_concat_ranges=False), 0),
    "CPU qoperator, float heads": (CpuInt8Config(float_head_outputs=True), 0),
    "CPU qoperator, 8 float layers": (CpuInt8Config(), 8),
    "CPU qdq": (CpuInt8Config(fmt="qdq"), 0),
    "CPU qdq, float heads": (CpuInt8Config(fmt="qdq", float_head_outputs=True), 0),
    "CPU qdq, float heads, 8 float layers": (CpuInt8Config(fmt="qdq", float_head_outputs=True), 8),
    "CPU qdq, float heads, 32 float layers": (CpuInt8Config(fmt="qdq", float_head_outputs=True), 32),
}


def build_variants(
    model_path: Path,
    spec: ModelSpec,
    calib_dir: Path,
    work: Path,
    run_dir: Path,
    stats_cache: Path,
    num_images: int,
    curve: list[int],
    threads: int,
) -> dict[str, Any]:
    """Every extra model the tables need, written under ``work/models``; returns paths and notes."""
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    # The calibration's own stages, on the statistics the timed run cached (same model, images, method).
    options = CalibrateOptions(model=model_path, images=calib_dir, out_dir=run_dir, num_images=num_images,
                               method=summary["selected_method"], stats_cache=stats_cache, force=True,
                               progress=False, threads=threads)
    run = prepare_run(options, model_path, spec, models, models)
    ranges = compute_ranges(run)
    model, placement, calib, stats = run.model, run.placement, run.calib, ranges.stats
    assert stats is not None
    method = ranges.method
    ranking = [r["layer"] for r in json.loads((run_dir / "sensitivity.json").read_text())["ranking"]]
    out: dict[str, Any] = {
        "method": method,
        "float_layers": summary["float_layers"],
        "paths": {},
        "layers": len(placement.layers),
    }
    paths = out["paths"]
    paths["fp16 (simulated rounding)"] = _save(
        simulate_fp16(model, placement.regions),
        models / "fp16_sim.onnx",
        spec,
        "fp16",
        note="fp32 graph rounding like fp16",
    )
    amaxes = {}
    for m in METHODS:
        amaxes[m] = compute_amaxes(stats.tensors, m)
        paths[f"int8 Q/DQ, all layers, {m}"] = _save(
            build_qdq_model(model, placement.layers, amaxes[m]),
            models / f"qdq_all_{m}.onnx",
            spec,
            "int8",
            method=m,
        )
    # --method downstream: per-tensor range chosen by the reading layer's output error (4 images)
    import cv2

    start = time.perf_counter()
    labelled = {label: compute_amaxes(stats.tensors, label.split("_")[0], **opts)
                for label, opts in DOWNSTREAM_CANDIDATES}
    feeds = [prepare_batch([cv2.imread(str(p))], spec)[0] for p in list(calib.paths)[:4]]
    choice = search_ranges(model, placement.layers, labelled, iter(feeds), spec.graph.input.name, threads=threads)
    amaxes["downstream"] = {**labelled["percentile"], **choice.amax}
    out["downstream_search_s"] = round(time.perf_counter() - start, 1)
    paths["int8 Q/DQ, all layers, downstream"] = _save(
        build_qdq_model(model, placement.layers, amaxes["downstream"]), models / "qdq_all_downstream.onnx",
        spec, "int8", method="downstream")
    paths["CPU int8 (default config), downstream ranges"] = _save(
        build_cpu_model(run, dataclasses.replace(ranges, amax=amaxes["downstream"]), model, [],
                        CpuInt8Config())[0],
        models / "cpu_downstream.onnx", spec, "int8")
    amax = amaxes[method]
    for k in curve:
        paths[f"curve k={k} Q/DQ"] = _save(
            build_qdq_model(model, placement.select(ranking[:k]), amax),
            models / f"qdq_k{k}.onnx",
            spec,
            "int8-mixed" if k else "int8",
        )
    for i, (label, (config, k)) in enumerate(CPU_VARIANTS.items()):
        cpu = build_cpu_model(run, ranges, model, ranking[:k], config)[0]  # as model_int8_cpu.onnx is built
        paths[label] = _save(cpu, models / f"cpu_variant{i}.onnx", spec, "int8-mixed" if k else "int8")
    # label-free head error of every curve point on the probe images the calibration used
    probe = run.head_probe()
    out["head_error"] = {
        label: probe.measure(str(path)).head_error
        for label, path in paths.items()
        if label.startswith(("curve", "int8", "CPU"))
    }
    return out


def evaluate(entries: list[tuple[str, Path, Path | None]], coco: Path, threads: int) -> dict[str, dict]:
    dataset = load_coco_dataset(coco / "annotations" / "instances_val2017_dev103.json", coco / "val2017")
    resolved = [resolve_model(path, desc, "ort", label) for label, path, desc in entries]
    result = evaluate_models(
        resolved,
        dataset,
        baseline=0,
        options=RunnerOptions(providers=["cpu"], threads=threads),
        progress=True,
    )
    rows = {}
    for run in result.runs:
        stats = run.metrics.stats
        agreement = run.agreement.to_dict() if run.agreement else None
        rows[run.entry.label] = {
            "AP": round(100 * stats["AP"], 2),
            "AP50": round(100 * stats["AP50"], 2),
            "agreement_recall": agreement and agreement.get("recall"),
        }
    return rows


# ---- 3. latency ---------------------------------------------------------------------------------


def latency(models: dict[str, Path], feed: np.ndarray, input_name: str, threads: int, rounds: int) -> dict:
    """Median and min ms per model, and the speed-up over the first model as the median of per-round
    ratios (each round runs every model once, so a slow spell of the machine cancels out)."""
    sessions = {label: create_session(path, threads=threads) for label, path in models.items()}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {input_name: feed})
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(rounds):
        for label, s in sessions.items():  # interleaved: background load hits every model alike
            t0 = time.perf_counter()
            s.run(None, {input_name: feed})
            times[label].append(1e3 * (time.perf_counter() - t0))
    base = np.asarray(next(iter(times.values())))
    return {
        label: {"median_ms": round(float(np.median(t)), 2), "min_ms": round(float(np.min(t)), 2),
                "speedup": round(float(np.median(base / np.asarray(t))), 3)}
        for label, t in times.items()
    }


def cpu_isa(cpuinfo: str | None = None) -> str:
    """The integer SIMD the CPU offers ONNX Runtime's int8 kernels: avx2, avx512, vnni, amx (from the
    /proc/cpuinfo flags; "unknown" where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown"
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    found = [name for name, present in (
        ("avx2", "avx2" in flags),
        ("avx512", any(f.startswith("avx512") for f in flags)),
        ("vnni", "avx512_vnni" in flags or "avx_vnni" in flags),
        ("amx", "amx_int8" in flags),
    ) if present]
    return "+".join(found) or "none of avx2/avx512/vnni/amx"


# ---- report -------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("bench_calibration"))
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--small", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=100, help="latency rounds per model")
    p.add_argument("--curve", default="0,1,2,4,8,16,32,64,96")
    p.add_argument("--skip-calibration", action="store_true")
    p.add_argument("--methods-images", type=int, help="images of the methods on/off runs (default: --num-images)")
    p.add_argument("--skip-methods", action="store_true", help="no methods on/off table")
    args = p.parse_args(argv)

    shared = _shared() / "data"
    model_path = shared / "models" / "mb3_centernet_coco.onnx"
    calib_dir = shared / "coco" / "calib_val2017"
    spec = load_spec(model_path, DESCRIPTION)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    stats_cache = work / "stats"
    results: dict[str, Any] = {"threads": args.threads, "cpu_isa": cpu_isa()}

    runs = {n: work / f"calib{n}" for n in (args.small, args.num_images)}
    if not args.skip_calibration:
        results["calibration"] = [
            run_calibration(model_path, calib_dir, n, d, stats_cache, args.threads) for n, d in runs.items()
        ]
        (work / "calibration_runs.json").write_text(json.dumps(results["calibration"], indent=2))
    else:
        results["calibration"] = json.loads((work / "calibration_runs.json").read_text())
    main_run = runs[args.num_images]
    curve = [int(k) for k in args.curve.split(",") if k.strip()]
    variants = build_variants(
        model_path, spec, calib_dir, work, main_run, stats_cache, args.num_images, curve, args.threads
    )
    results["variants"] = {k: v for k, v in variants.items() if k != "paths"}

    entries: list[tuple[str, Path, Path | None]] = [("fp32", model_path, DESCRIPTION)]
    entries += [("fp16 (artifact, ORT CPU)", main_run / "model_fp16.onnx", None)]
    entries += [
        (f"int8 Q/DQ mixed ({args.num_images} img)", main_run / "model_int8_qdq.onnx", None),
        (f"int8 Q/DQ mixed ({args.small} img)", runs[args.small] / "model_int8_qdq.onnx", None),
        (f"int8 CPU artifact ({args.num_images} img)", main_run / "model_int8_cpu.onnx", None),
    ]
    entries += [(label, path, None) for label, path in variants["paths"].items()]
    if not args.skip_methods:
        results["methods"] = run_methods(model_path, calib_dir, args.methods_images or args.num_images,
                                         work / "methods", args.threads)
        for label, row in results["methods"].items():
            entries += [(f"method: {label} (Q/DQ)", Path(row["folder"]) / "model_int8_qdq.onnx", None),
                        (f"method: {label} (CPU)", Path(row["folder"]) / "model_int8_cpu.onnx", None)]
    results["accuracy"] = evaluate(entries, shared / "coco", args.threads)

    import cv2

    first = sorted(calib_dir.glob("*.jpg"))[0]
    feed, _ = prepare_batch([cv2.imread(str(first))], spec)
    timed = {
        "fp32": model_path,
        "fp16 (artifact, ORT CPU)": main_run / "model_fp16.onnx",
        "int8 Q/DQ mixed (TensorRT graph in ORT)": main_run / "model_int8_qdq.onnx",
        "int8 CPU artifact": main_run / "model_int8_cpu.onnx",
    }
    timed.update({label: path for label, path in variants["paths"].items() if label.startswith("CPU")})
    for label, row in results.get("methods", {}).items():
        timed[f"method: {label} (CPU)"] = Path(row["folder"]) / "model_int8_cpu.onnx"
    results["latency"] = latency(timed, feed, spec.graph.input.name, args.threads, args.rounds)
    (work / "bench_results.json").write_text(json.dumps(results, indent=2, default=str))
    print(report(results, args, curve))
    return 0


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def report(results: dict[str, Any], args: argparse.Namespace, curve: list[int]) -> str:
    acc, lat, var = results["accuracy"], results["latency"], results["variants"]
    fp32_ap = acc["fp32"]["AP"]
    out = [
        "## Calibration cost",
        "",
        _table(
            [
                "images",
                "wall s",
                "peak RSS MB",
                "statistics s",
                "weight fitting s",
                "sensitivity + mixed precision s",
                "int8 artifacts s",
            ],
            [
                [
                    c["images"],
                    c["wall_s"],
                    c["peak_rss_mb"],
                    c["stages_s"].get("statistics_and_ranges"),
                    c["stages_s"].get("weight_fitting"),
                    c["stages_s"].get("sensitivity_and_mixed_precision"),
                    c["stages_s"].get("int8_artifacts"),
                ]
                for c in results["calibration"]
            ],
        ),
    ]
    out += [
        "",
        f"## Accuracy (dev103, fp32 AP {fp32_ap}); selected method: {var['method']}, "
        f"{len(var['float_layers'])}/{var['layers']} layers kept float; downstream range search "
        f"{var.get('downstream_search_s')} s",
        "",
    ]
    he = var.get("head_error", {})
    rows = [
        [label, r["AP"], f"{r['AP'] - fp32_ap:+.2f}", r["AP50"], _fmt(he.get(label))]
        for label, r in acc.items()
    ]
    out.append(_table(["model", "AP", "ΔAP", "AP50", "head error (label-free)"], rows))
    isa = results.get("cpu_isa", "unknown")
    out += ["", f"## CPU latency (ONNX Runtime, {results['threads']} thread(s), batch 1, inference only; "
                f"CPU integer ISA: {isa})", ""]
    out.append(
        _table(
            ["model", "median ms", "min ms", "speed-up vs fp32 (median of paired rounds)", "CPU ISA"],
            [[k, v["median_ms"], v["min_ms"], f"{v['speedup']:.2f}x", isa] for k, v in lat.items()],
        )
    )
    out += ["", "## TensorRT Q/DQ graph: layers kept float (most sensitive first) vs AP", ""]
    rows = [
        [
            k,
            _fmt(he.get(f"curve k={k} Q/DQ")),
            acc[f"curve k={k} Q/DQ"]["AP"],
            f"{acc[f'curve k={k} Q/DQ']['AP'] - fp32_ap:+.2f}",
        ]
        for k in curve
        if f"curve k={k} Q/DQ" in acc
    ]
    out.append(_table(["float layers", "head error", "AP", "ΔAP"], rows))
    out += ["", "## ONNX Runtime CPU int8: speed vs accuracy", ""]
    rows = [
        [
            label,
            _fmt(he.get(label)),
            acc[label]["AP"],
            f"{acc[label]['AP'] - fp32_ap:+.2f}",
            lat[label]["median_ms"],
            f"{lat[label]['speedup']:.2f}x",
        ]
        for label in CPU_VARIANTS
        if label in acc and label in lat
    ]
    out.append(_table(["CPU model", "head error", "AP", "ΔAP", "median ms", "speed-up"], rows))
    if results.get("methods"):
        out += ["", "## Post-training methods on/off (every eligible layer int8; head error label-free on "
                    "calibration images; AP on dev103 only measures)", ""]
        rows = []
        for label, m in results["methods"].items():
            qdq, cpu = acc.get(f"method: {label} (Q/DQ)"), acc.get(f"method: {label} (CPU)")
            speed = lat.get(f"method: {label} (CPU)")
            rows.append([
                label, _fmt(m["qdq_head_error"]), qdq and qdq["AP"], qdq and f"{qdq['AP'] - fp32_ap:+.2f}",
                _fmt(m["cpu_head_error"]), cpu and cpu["AP"], cpu and f"{cpu['AP'] - fp32_ap:+.2f}",
                speed and f"{speed['speedup']:.2f}x ({isa})", m["wall_s"],
                "" if not m["weight_fit_kept"] else ", ".join(
                    f"{k}: {'kept' if v else 'dropped by guard'}" for k, v in sorted(m["weight_fit_kept"].items())),
            ])
        out.append(_table(["methods", "Q/DQ head error", "Q/DQ AP", "ΔAP", "CPU head error", "CPU AP", "ΔAP",
                           "CPU speed-up", "calibration s", "weight fit"], rows))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
