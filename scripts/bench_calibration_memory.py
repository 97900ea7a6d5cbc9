"""Wall time and peak memory of calibration statistics collection on a real model.

    python scripts/bench_calibration_memory.py --num-images 100
    python scripts/bench_calibration_memory.py --num-images 500 --threads 2 --thresholds

Defaults: the foreign mb3 CenterNet and ``coco/calib_val2017`` from the shared data folder beside the
checkout (or ``$CENTERNET_EDGE_SHARED``). Run one N per process: peak RSS is the process's lifetime peak.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import psutil

from centernet_edge.calib_data.sources import load_calibration_set
from centernet_edge.quantize.stats import collect_calibration_stats
from centernet_edge.quantize.thresholds import compute_amaxes
from centernet_edge.runtime.spec import load_spec

REPO = Path(__file__).resolve().parents[1]


def _shared() -> Path:
    env = os.environ.get("CENTERNET_EDGE_SHARED")
    return Path(env) if env else REPO.parent / "shared"


class RssSampler:
    """Highest RSS seen while running (ru_maxrss cannot be reset, this can be started late)."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def main(argv: list[str] | None = None) -> int:
    shared = _shared() / "data"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=shared / "models" / "mb3_centernet_coco.onnx")
    parser.add_argument("--spec", type=Path, default=REPO / "eval" / "model_descriptions" / "mb3_centernet_coco.json",
                        help="side-car model description (omit with --spec '' for models that embed one)")
    parser.add_argument("--images", type=Path, default=shared / "coco" / "calib_val2017")
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--thresholds", action="store_true", help="also time entropy thresholds")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)

    spec = load_spec(args.model, str(args.spec) if str(args.spec) else None)
    calib = load_calibration_set(args.images, num_images=args.num_images, seed=args.seed)
    proc = psutil.Process()
    baseline = proc.memory_info().rss
    start, cpu_start = time.perf_counter(), time.process_time()
    with RssSampler() as sampler:
        stats = collect_calibration_stats(args.model, spec, calib, progress=args.progress,
                                          intra_op_num_threads=args.threads)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    result = {
        "model": args.model.name,
        "num_images": stats.num_images,
        "num_tensors": len(stats.tensors),
        "threads": args.threads,
        "stats_wall_s": round(wall, 1),
        "s_per_image": round(wall / max(stats.num_images, 1), 3),
        # CPU seconds (all threads): what the run costs on an idle machine, whatever else shares the CPU now
        "stats_cpu_s": round(cpu, 1),
        "rss_before_mb": round(baseline / 2**20),
        "peak_rss_during_mb": round(sampler.peak / 2**20),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "skipped_images": stats.meta["read_report"]["skipped"],
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    if args.thresholds:
        start = time.perf_counter()
        compute_amaxes(stats.tensors, "entropy")
        result["entropy_thresholds_s"] = round(time.perf_counter() - start, 1)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
