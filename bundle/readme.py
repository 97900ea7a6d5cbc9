"""The README an embedded team gets inside a bundle (build, API walk-through, this bundle's parity numbers)."""

from __future__ import annotations

from typing import Any

__all__ = ["render_readme"]


def _parity_section(parity: dict[str, Any] | None) -> str:
    if not parity or "skipped" in parity:
        reason = (parity or {}).get("skipped", "not measured")
        return f"Not measured when this bundle was written: {reason}.\n"
    return (
        f"Measured when this bundle was written, on {parity['images']} (C library around `model/network.onnx` "
        f"vs the {parity['reference']}):\n\n"
        "| check | result |\n|---|---|\n"
        f"| warped uint8 image vs the reference warp (values differing) | {parity['warp_mismatched_values']} |\n"
        f"| normalised input, max abs difference | {parity['max_abs_input_diff']:.2e} |\n"
        f"| images with identical detection order and classes | {parity['images_with_identical_order_and_classes']}"
        f" / {parity['image_count']} |\n"
        f"| detection rows compared | {parity['detection_rows']} |\n"
        f"| boxes, max abs difference (px) | {parity['max_box_diff_px']:.2e} |\n"
        f"| scores, max abs difference | {parity['max_score_diff']:.2e} |\n"
    )


def render_readme(manifest: dict[str, Any]) -> str:
    spec = manifest["spec"]
    pre, dec = spec["preprocess"], spec["decode"]
    heads = "\n".join(f"| `{h['name']}` | {h['role']} | {h['dtype']} | {h['layout']} | {h['shape']} | "
                      f"{h['description']} |" for h in manifest["heads"])
    files = "\n".join(f"| `{f['path']}` | {role} | `{f['sha256'][:16]}…` |" for role, f in manifest["files"].items())
    kernel = f"{dec['peak_kernel']}x{dec['peak_kernel']}"
    size = f"keep_res: each image padded to ((h|{pre['pad']})+1, (w|{pre['pad']})+1)" \
        if pre["resize"] == "keep_res" else f"{pre['resize']} warp to {pre['input_size'][0]}x{pre['input_size'][1]}"
    return f"""# {manifest['model_name']}: CenterNet for embedded targets

Source `{spec['source']}`, architecture `{spec['arch']}`, {spec['num_classes']} classes. C ABI version
{manifest['c_abi_version']}. Everything here is described by `manifest.json` (model spec, heads, sha256 of every file).

## Build

    make                # lib/libcenternet_edge.a, lib/libcenternet_edge.so, bin/centernet_demo
    make CC=aarch64-linux-gnu-gcc BUILD=lib-aarch64 BIN=bin-aarch64   # Jetson / arm64
    cmake -S . -B build && cmake --build build                        # the same with CMake

C99, libc and libm only. The library never allocates after `cn_create` (or none at all with
`cn_context_init` in your own memory), holds no global state, and returns a `cn_status` for every bad
argument (`cn_status_string` explains it). One context per thread.

## Pipeline

1. `cn_preprocess(ctx, &image, CN_TENSOR_FLOAT32_NCHW, 0, 0, input, bytes, &transform)`: your image
   (BGR, RGB, BGRA or GRAY, any row stride) -> the network input ({size}, colour {pre['color']},
   mean/std of the spec). `CN_TENSOR_INT8_NCHW` / `CN_TENSOR_UINT8_NCHW` write it quantised for an int8 input.
2. Run `model/network.onnx` (input `input`, float32 NCHW) on your runtime: TensorRT, ONNX Runtime, a vendor SDK.
3. `cn_postprocess(ctx, &heads, &transform, -INFINITY, dets, K, counts)`: the heads (float32, fp16 or
   int8/uint8 with scale and zero point; NCHW or NHWC; any batch) -> up to K={dec['K']} detections per image,
   best first, `{{x1, y1, x2, y2, score, class_id}}` in original-image pixels. Peak NMS {kernel},
   top-K `{dec['topk']}`, stride {dec['stride']}, ties broken exactly as the exported graph breaks them.

`src/centernet_demo.c` is a complete program doing steps 1 and 3 around files:

    bin/centernet_demo preprocess IMAGE.ppm input.bin          # float32 NCHW [1, 3, H, W]
    bin/centernet_demo decode WIDTH HEIGHT heatmap.bin wh.bin reg.bin

## Heads of `model/network.onnx`

| tensor | role | dtype | layout | shape | meaning |
|---|---|---|---|---|---|
{heads}

## Files

| file | role | sha256 |
|---|---|---|
{files}

## Parity of this bundle

{_parity_section(manifest.get('parity'))}"""
