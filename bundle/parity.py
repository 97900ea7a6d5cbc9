"""This bundle's parity numbers: the C library around the network-only ONNX against the end-to-end ONNX
(or, without one, against the numpy reference decode) and the numpy reference pre-processing."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from centernet_edge.runtime.clib import CLibrary, CLibraryError, build_shared_library, config_values, find_compiler
from centernet_edge.runtime.detections import Detections
from centernet_edge.runtime.onnx_session import create_session
from centernet_edge.runtime.postprocess import finalize
from centernet_edge.runtime.preprocess import prepare_batch, warp_image
from centernet_edge.runtime.spec import ModelSpec

__all__ = ["measure_parity"]

def _images(folder: Path | None, count: int) -> tuple[list[np.ndarray], str]:
    from centernet_edge.export.verify import load_images, synthetic_images

    if folder is None:
        return [img for _, img in synthetic_images(3)], "3 synthetic images"
    try:
        images = [img for _, img in load_images(folder, count)]
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from None
    return images, f"{len(images)} images from {Path(folder).name}"


def _session(path: Path) -> Any:
    return create_session(path, threads=1)


def _rows(rows: np.ndarray) -> Detections:
    return Detections(np.stack([rows["x1"], rows["y1"], rows["x2"], rows["y2"]], axis=1), rows["score"],
                      rows["class_id"])


def measure_parity(bundle: Path, spec: ModelSpec, *, images: Path | None = None, count: int = 20) -> dict[str, Any]:
    if spec.preprocess.resize == "stretch":
        return {"skipped": "the C pre-process does not implement 'stretch' (post-process only)"}
    if find_compiler() is None:
        return {"skipped": "no C compiler on this machine; run the parity tests where one is"}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            lib = CLibrary(build_shared_library(tmp))
        except CLibraryError as exc:
            return {"skipped": str(exc).splitlines()[0]}
        ctx = lib.context(config_values(spec))
        imgs, described = _images(images, count)
        network = _session(bundle / "model" / "network.onnx")
        e2e_path = bundle / "model" / "end_to_end.onnx"
        e2e = _session(e2e_path) if e2e_path.is_file() else None
        input_diff = box_diff = score_diff = 0.0
        warp_diff = 0
        rows = order_ok = 0
        for img in imgs:
            net_in, t = ctx.preprocess(img, "BGR")
            want, geoms = prepare_batch([img], spec)
            input_diff = max(input_diff, float(np.abs(net_in - want[0]).max()))
            warped, _ = ctx.preprocess(img, "BGR", "uint8_bgr_nhwc")
            warp_diff += int((warped != warp_image(img, geoms[0], spec.preprocess)).sum())
            heads = network.run(["heatmap", "wh", "reg"], {"input": net_in[None]})
            got = _rows(ctx.postprocess(*heads, [t])[0])
            if e2e is not None:
                ref = Detections.from_array(e2e.run(None, {e2e.get_inputs()[0].name: img[None]})[0][0])
                ref = Detections(ref.boxes[ref.scores >= 0], ref.scores[ref.scores >= 0], ref.labels[ref.scores >= 0])
            else:
                ref = finalize(dict(zip(("heatmap", "wh", "reg"), heads, strict=True)), spec, geoms)[0]
            rows += len(got)
            if len(got) == len(ref) and np.array_equal(got.labels, ref.labels):
                order_ok += 1
                box_diff = max(box_diff, float(np.abs(got.boxes - ref.boxes).max(initial=0.0)))
                score_diff = max(score_diff, float(np.abs(got.scores - ref.scores).max(initial=0.0)))
        return {
            "images": described,
            "reference": "end-to-end ONNX" if e2e is not None else "numpy reference decode",
            "max_abs_input_diff": input_diff,
            "warp_mismatched_values": warp_diff,
            "detection_rows": rows,
            "images_with_identical_order_and_classes": order_ok,
            "image_count": len(imgs),
            "max_box_diff_px": box_diff,
            "max_score_diff": score_diff,
        }
