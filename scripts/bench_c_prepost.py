"""C pre/post-processing speed (one thread), against the Python reference path.

Pre-process: a 1920x1080 BGR frame -> 512x512 float32 NCHW; C library vs cv2.warpAffine + numpy
normalisation (the runtime's reference, cv2 limited to one thread). Post-process: 80x128x128 heads after
sigmoid, K=100; C library vs the numpy reference decode. Prints medians in ms.

    python scripts/bench_c_prepost.py [--repeats 50] [--image PATH]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import cv2
import numpy as np

from centernet_edge.runtime.clib import CLibrary, build_shared_library, config_values
from centernet_edge.runtime.decode import decode_numpy
from centernet_edge.runtime.geometry import compute_geometry
from centernet_edge.runtime.preprocess import normalize_image, warp_image
from centernet_edge.runtime.spec import Decode, GraphIO, ModelSpec, TensorInfo, official_preprocess


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _spec() -> ModelSpec:
    graph = GraphIO(preprocess="none", decode=False, input=TensorInfo("input", "float32", [1, 3, 512, 512], "NCHW"),
                    outputs={r: TensorInfo(r, "float32", [1, c, 128, 128], "NCHW")
                             for r, c in (("heatmap", 80), ("wh", 2), ("reg", 2))})
    return ModelSpec("bench", "official", "any", 80, [f"c{i}" for i in range(80)], official_preprocess(),
                     Decode(K=100, heatmap_activation="sigmoid"), graph).validate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--image", default=None, help="a photo to resize to 1920x1080 (default: random pixels)")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    if args.image:
        frame = cv2.resize(cv2.imread(args.image), (1920, 1080))
    else:
        frame = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    spec = _spec()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = CLibrary(build_shared_library(tmp)).context(config_values(spec))
        geom = compute_geometry(1080, 1920, spec.preprocess)
        c_pre = _median_ms(lambda: ctx.preprocess(frame, "BGR"), args.repeats)
        py_pre = _median_ms(lambda: normalize_image(warp_image(frame, geom, spec.preprocess), spec.preprocess),
                            args.repeats)
        got = ctx.preprocess(frame, "BGR")[0]
        want = normalize_image(warp_image(frame, geom, spec.preprocess), spec.preprocess)
        assert np.abs(got - want).max() <= 1e-6

        logits = rng.normal(-4.0, 1.5, (1, 80, 128, 128)).astype(np.float32)
        heat = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        wh = rng.uniform(1, 40, (1, 2, 128, 128)).astype(np.float32)
        reg = rng.uniform(0, 1, (1, 2, 128, 128)).astype(np.float32)
        t = ctx.transform(1920, 1080)
        c_post = _median_ms(lambda: ctx.postprocess(heat, wh, reg, [t]), args.repeats)
        py_post = _median_ms(lambda: decode_numpy(heat, wh, reg, spec.decode), max(3, args.repeats // 10))
    print(f"pre-process 1920x1080 BGR -> 512x512 float32 NCHW: C {c_pre:.2f} ms | cv2.warpAffine + numpy "
          f"{py_pre:.2f} ms | {py_pre / c_pre:.2f}x")
    print(f"post-process 80x128x128 heads, K=100: C {c_post:.2f} ms (goal < 2 ms) | numpy reference "
          f"{py_post:.1f} ms")


if __name__ == "__main__":
    main()
