"""ONNX Runtime CPU int8 speed-up on official architectures with dense convolutions (res_18, resdcn_18).

Random-weight checkpoints (accuracy is meaningless here, latency is real) are exported end to end
(uint8 BGR image in, detections out), calibrated with ``centernet-calibrate --budget none`` (every
eligible layer int8) and, with ``--mixed``, with the default head-error budget and ``--cpu-float mixed``
(the CPU model keeps the mixed-precision float layers too; with ``--cpu-float none`` it would equal the
all-int8 one). Then fp32 and model_int8_cpu.onnx are timed in one process, round-robin (so load from
other processes hits every model alike), with the same thread count for both:

* end to end: one raw calibration image (batch 1) -> detections;
* network only: the sub-graph between pre-processing and the decode tail (normalised NCHW in, head
  maps out), cut from each model at the same tensors.

    python scripts/bench_cpu_int8.py                          # res_18, resdcn_18; 1 and 2 threads
    python scripts/bench_cpu_int8.py --archs res_18 --threads 1 --runs 30 --mixed

Prints a Markdown table; the per-op profile of a model is one ``--profile`` away.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from centernet_edge.quantize.placement import graph_regions
from centernet_edge.runtime.onnx_session import create_session

REPO = Path(__file__).resolve().parents[1]
# Ops that carry weights: the layers whose precision decides the CPU speed.
WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm", "DeformConv")
# Integer kernels of ONNX Runtime's QOperator format (QDQ graphs are counted by their DQ-fed weights).
INTEGER_WEIGHTED = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")


def _shared() -> Path:
    env = os.environ.get("CENTERNET_EDGE_SHARED")
    return Path(env) if env else REPO.parent / "shared"


def _run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


# ---- models ---------------------------------------------------------------------------------------


def prepare(arch: str, work: Path, images: Path, num_images: int, size: int, method: str, mixed: bool,
            threads: int) -> dict[str, Path]:
    """fp32 / int8 model paths for one architecture; existing files are reused (delete ``work`` to redo)."""
    folder = work / arch
    folder.mkdir(parents=True, exist_ok=True)
    ckpt, fp32 = folder / f"{arch}.pth", folder / f"{arch}.onnx"
    if not ckpt.exists():
        _run([sys.executable, str(REPO / "scripts" / "make_demo_checkpoint.py"), arch, str(ckpt)])
    if not fp32.exists():
        _run([sys.executable, "-m", "centernet_edge.export.cli", str(ckpt), "-o", str(fp32),
              "--input-size", str(size), "--threads", str(threads), "-q"])
    calibrate = [sys.executable, "-m", "centernet_edge.quantize.cli", str(fp32), "--images", str(images),
                 "--num-images", str(num_images), "--sensitivity-images", str(min(num_images, 16)), "--int8",
                 "--method", method, "--threads", str(threads), "--stats-cache", str(folder / "stats"), "--quiet"]
    runs = {"int8 (all)": (folder / "calib_all", ["--budget", "none"])}
    if mixed:
        runs["int8 (mixed)"] = (folder / "calib_mixed", ["--cpu-float", "mixed"])
    paths = {"fp32": fp32}
    for label, (out, extra) in runs.items():
        model = out / "model_int8_cpu.onnx"
        if not model.exists():
            _run([*calibrate, "-o", str(out), "--force", *extra])
        paths[label] = model
    return paths


def weighted_counts(fp32: onnx.ModelProto, int8: onnx.ModelProto) -> tuple[int, int, dict[str, int]]:
    """(integer weighted layers, weighted layers of the fp32 network, op -> count of those left float)."""
    network = graph_regions(fp32).network
    total = sum(1 for n in fp32.graph.node if n.op_type in WEIGHTED and n.name in network)
    prod = {o: n for n in int8.graph.node for o in n.output}
    integer, left = 0, collections.Counter()
    for node in int8.graph.node:
        if node.op_type in INTEGER_WEIGHTED:
            integer += 1
        elif node.op_type in WEIGHTED:
            weight = prod.get(node.input[1]) if len(node.input) > 1 else None
            if weight is not None and weight.op_type == "DequantizeLinear":
                integer += 1  # QDQ format: ONNX Runtime fuses DQ -> Conv -> Q into an integer kernel
            else:
                # Every weighted op of a CenterNet export lies in the network region (the quantizer
                # renames nodes, so the region cannot be looked up in the int8 graph).
                left[node.op_type] += 1
    return integer, total, dict(left)


def network_boundary(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Tensors entering the network region from pre-processing, and leaving it for the decode tail."""
    regions = graph_regions(model)
    prod = {o: n.name for n in model.graph.node for o in n.output}
    inputs, outputs = [], []
    for node in model.graph.node:
        if node.name in regions.network:
            inputs += [t for t in node.input if prod.get(t) in regions.preprocess and t not in inputs]
        elif node.name in regions.decode:
            outputs += [t for t in node.input if prod.get(t) in regions.network and t not in outputs]
    return inputs, outputs


def cut(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """The sub-graph from ``inputs`` to ``outputs`` (both must name tensors of ``model``)."""
    from onnx.utils import Extractor

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    return Extractor(inferred).extract_model(inputs, outputs)


# ---- timing -----------------------------------------------------------------------------------------


def session(model: onnx.ModelProto | Path, threads: int, profile: str | None = None) -> Any:
    return create_session(model, threads=threads, profile_prefix=profile)


def interleaved(cases: dict[str, tuple[Any, dict[str, np.ndarray]]], runs: int, warmup: int = 3
                ) -> dict[str, float]:
    """Median ms per case, the cases run round-robin so that background load hits each alike."""
    for sess, feed in cases.values():
        for _ in range(warmup):
            sess.run(None, feed)
    times: dict[str, list[float]] = {label: [] for label in cases}
    for _ in range(runs):
        for label, (sess, feed) in cases.items():
            start = time.perf_counter()
            sess.run(None, feed)
            times[label].append(1e3 * (time.perf_counter() - start))
    return {label: float(np.median(t)) for label, t in times.items()}


def op_profile(model: onnx.ModelProto | Path, feed: dict[str, np.ndarray], threads: int, prefix: str,
               runs: int = 5) -> list[tuple[str, float]]:
    """ms per run by op type (kernel time from ONNX Runtime's profiler), largest first."""
    sess = session(model, threads, profile=prefix)
    for _ in range(runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"] / 1e3 / runs
    return sorted(by_op.items(), key=lambda kv: -kv[1])


def bench_arch(arch: str, paths: dict[str, Path], image: np.ndarray, threads: list[int], runs: int,
               profile_dir: Path | None) -> list[list[Any]]:
    protos = {label: onnx.load(str(p)) for label, p in paths.items()}
    fp32 = protos["fp32"]
    graph_input = fp32.graph.input[0].name
    e2e_feed = {graph_input: image[None]}
    net_in, net_out = network_boundary(fp32)
    preprocess = session(cut(fp32, [graph_input], net_in), 1)
    net_feed = dict(zip(net_in, preprocess.run(net_in, e2e_feed), strict=True))
    nets = {label: cut(m, net_in, net_out) for label, m in protos.items()}
    rows = []
    for n in threads:
        cases = {}
        for label in protos:
            cases[f"{label} e2e"] = (session(paths[label], n), e2e_feed)
            cases[f"{label} net"] = (session(nets[label], n), net_feed)
        ms = interleaved(cases, runs)
        for label, model in protos.items():
            if label == "fp32":
                continue
            integer, total, left = weighted_counts(fp32, model)
            floats = ", ".join(f"{v} {k}" for k, v in sorted(left.items())) or "-"
            rows.append([arch, label, n, f"{ms['fp32 e2e']:.1f}", f"{ms[f'{label} e2e']:.1f}",
                         f"{ms['fp32 e2e'] / ms[f'{label} e2e']:.2f}x", f"{ms['fp32 net']:.1f}",
                         f"{ms[f'{label} net']:.1f}", f"{ms['fp32 net'] / ms[f'{label} net']:.2f}x",
                         f"{integer}/{total}", floats])
        if profile_dir is not None:
            for label in protos:
                ops = op_profile(paths[label], e2e_feed, n, str(profile_dir / f"{arch}_{label[:4]}_{n}t"))
                top = ", ".join(f"{op} {t:.1f}" for op, t in ops[:8])
                print(f"profile {arch} {label} {n} thread(s), ms/run: {top}", file=sys.stderr)
    return rows


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="res_18,resdcn_18", help="comma-separated (default: %(default)s)")
    p.add_argument("--images", type=Path, default=_shared() / "data" / "coco" / "calib_val2017",
                   help="calibration images; the first one is also the timed image (default: shared data)")
    p.add_argument("--num-images", type=int, default=16, help="calibration images (default: %(default)s)")
    p.add_argument("--threads", default="1,2", help="intra-op thread counts (default: %(default)s)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per model (default: %(default)s)")
    p.add_argument("--size", type=int, default=512, help="network input size (default: %(default)s)")
    p.add_argument("--method", default="minmax",
                   help="calibration range method; latency does not depend on it (default: %(default)s)")
    p.add_argument("--mixed", action="store_true", help="also the default-budget mixed-precision CPU model")
    p.add_argument("--work", type=Path, default=Path("bench_cpu_int8"), help="models go here (reused)")
    p.add_argument("--profile", action="store_true", help="print per-op kernel time of every model")
    args = p.parse_args(argv)

    import cv2

    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    first = sorted(q for q in args.images.iterdir() if q.suffix.lower() in (".jpg", ".jpeg", ".png"))[0]
    image = cv2.imread(str(first))
    work = args.work.resolve()
    if args.profile:
        (work / "profiles").mkdir(parents=True, exist_ok=True)
    rows: list[list[Any]] = []
    for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
        paths = prepare(arch, work, args.images, args.num_images, args.size, args.method, args.mixed,
                        min(threads))
        rows += bench_arch(arch, paths, image, threads, args.runs, work / "profiles" if args.profile else None)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"ONNX Runtime CPU, batch 1, {args.size}x{args.size}, median of {args.runs} interleaved runs, "
          f"load average {load:.2f} at the end; image {first.name} ({image.shape[1]}x{image.shape[0]})\n")
    print(_table(["arch", "model", "threads", "fp32 e2e ms", "int8 e2e ms", "e2e speed-up", "fp32 net ms",
                  "int8 net ms", "net speed-up", "int8 / weighted layers", "weighted layers left float"],
                 rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
