"""ONNX Runtime CPU kernel costs behind the CPU int8 rewrites (quantize/cpu_rewrites.py), one thread.

1. depthwise convolution, uint8 (NHWC integer kernel) vs fp32 (NCHWc), over channel counts: the integer
   kernel works in blocks of 16 channels, hence the channel padding;
2. a 2x bilinear upsampling (``Resize``, TensorFlow's asymmetric coordinates) between two integer
   convolutions: uint8 Resize vs DequantizeLinear -> float Resize -> QuantizeLinear;
3. ``QLinearConcat`` of two integer convolutions whose outputs have the concat's scale (a copy) or their
   own (requantized), the reason for ``shared_concat_ranges``;
4. the peak mask ``heat * Cast(is_peak)`` vs ``Where(is_peak, heat, 0)`` on an mb3-sized heatmap.

Each case is a small model in its own session; the time is the mean kernel time over ``--runs`` calls
from ONNX Runtime's profiler (so Q/DQ at the model's edges are not counted).

    python scripts/bench_cpu_kernels.py
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from centernet_edge.runtime.onnx_session import create_session


def _model(nodes: list, inits: list, channels: int, size: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            [1, channels, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    return model


def _quantize_in(nodes: list, inits: list) -> None:
    inits += [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
              numpy_helper.from_array(np.array(128, np.uint8), "z")]
    nodes.append(helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q_in"]))


def _qconv(index: int, source: str, target: str, channels: int, kernel: int, group: int, nodes: list,
           inits: list) -> None:
    rng = np.random.default_rng(index)
    weight = rng.integers(-127, 128, (channels, channels // group, kernel, kernel)).astype(np.int8)
    inits += [numpy_helper.from_array(weight, f"w{index}"),
              numpy_helper.from_array(np.full(channels, 0.002, np.float32), f"ws{index}"),
              numpy_helper.from_array(np.zeros(channels, np.int8), f"wz{index}")]
    nodes.append(helper.make_node("QLinearConv", [source, "s", "z", f"w{index}", f"ws{index}", f"wz{index}", "s", "z"],
                                  [target], group=group, pads=[kernel // 2] * 4, name=f"conv{index}"))


def depthwise_model(channels: int, size: int, kernel: int, integer: bool) -> onnx.ModelProto:
    nodes: list = []
    inits: list = []
    if integer:
        _quantize_in(nodes, inits)
        _qconv(0, "q_in", "q_out", channels, kernel, channels, nodes, inits)
        nodes.append(helper.make_node("DequantizeLinear", ["q_out", "s", "z"], ["y"]))
    else:
        weight = np.random.default_rng(0).normal(0, 0.3, (channels, 1, kernel, kernel)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, "w"))
        nodes.append(helper.make_node("Conv", ["x", "w"], ["y"], group=channels, pads=[kernel // 2] * 4,
                                      name="conv0"))
    return _model(nodes, inits, channels, size)


def upsample_model(channels: int, size: int, integer_resize: bool) -> onnx.ModelProto:
    nodes: list = []
    inits: list = [numpy_helper.from_array(np.array([], np.float32), "roi"),
                   numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    _quantize_in(nodes, inits)
    _qconv(0, "q_in", "a", channels, 1, 1, nodes, inits)
    resize = {"mode": "linear", "coordinate_transformation_mode": "asymmetric"}
    if integer_resize:
        nodes.append(helper.make_node("Resize", ["a", "roi", "scales"], ["b"], name="resize", **resize))
    else:
        nodes += [helper.make_node("DequantizeLinear", ["a", "s", "z"], ["a_float"], name="resize_dq"),
                  helper.make_node("Resize", ["a_float", "roi", "scales"], ["b_float"], name="resize", **resize),
                  helper.make_node("QuantizeLinear", ["b_float", "s", "z"], ["b"], name="resize_q")]
    _qconv(1, "b", "c", channels, 1, 1, nodes, inits)
    nodes.append(helper.make_node("DequantizeLinear", ["c", "s", "z"], ["y"]))
    return _model(nodes, inits, channels, size)


def concat_model(channels: int, size: int, shared_scale: bool) -> onnx.ModelProto:
    nodes: list = []
    inits: list = [numpy_helper.from_array(np.array(0.03, np.float32), "s_own"),
                   numpy_helper.from_array(np.array(100, np.uint8), "z_own")]
    _quantize_in(nodes, inits)
    _qconv(0, "q_in", "a", channels, 1, 1, nodes, inits)
    _qconv(1, "q_in", "b", channels, 1, 1, nodes, inits)
    if not shared_scale:  # b written at its own scale, as each tensor's own range gives it
        nodes[-1].input[6], nodes[-1].input[7] = "s_own", "z_own"
    b_scale = ["s", "z"] if shared_scale else ["s_own", "z_own"]
    nodes.append(helper.make_node("QLinearConcat", ["s", "z", "a", "s", "z", "b", *b_scale], ["c"], axis=1,
                                  domain="com.microsoft", name="concat"))
    nodes.append(helper.make_node("DequantizeLinear", ["c", "s", "z"], ["y"]))
    model = _model(nodes, inits, channels, size)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def peak_mask_model(channels: int, size: int, where: bool) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    nodes = [helper.make_node("Sigmoid", ["x"], ["heat"]),
             helper.make_node("MaxPool", ["heat"], ["hmax"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Equal", ["heat", "hmax"], ["is_peak"])]
    if where:
        nodes.append(helper.make_node("Where", ["is_peak", "heat", "zero"], ["y"], name="mask_where"))
    else:
        nodes += [helper.make_node("Cast", ["is_peak"], ["mask"], to=TensorProto.FLOAT, name="mask_cast"),
                  helper.make_node("Mul", ["heat", "mask"], ["y"], name="mask_mul")]
    return _model(nodes, inits, channels, size)


def kernel_ms(model: onnx.ModelProto, channels: int, size: int, runs: int, ops: set[str]) -> float:
    """Mean time per call of the nodes named in ``ops`` (by op type or node name), from the profiler."""
    with tempfile.TemporaryDirectory() as folder:
        session = create_session(model, threads=1, profile_prefix=os.path.join(folder, "profile"))
        x = np.random.default_rng(1).random((1, channels, size, size), dtype=np.float32) * 4
        for _ in range(runs):
            session.run(None, {"x": x})
        with open(session.end_profiling()) as f:
            events = json.load(f)
    total: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = event["name"][: -len("_kernel_time")]
            if event["args"]["op_name"] in ops or any(node.startswith(o) for o in ops):
                total["ms"] += event["dur"] / 1e3
    return total["ms"] / runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args(argv)
    print(f"ONNX Runtime {ort.__version__}, one thread\n")
    print("| depthwise | uint8 ms | fp32 ms |\n|---|---:|---:|")
    for channels, size, kernel in [(72, 128, 3), (80, 128, 3), (18, 128, 5), (32, 128, 5), (16, 256, 3),
                                   (128, 128, 3), (720, 16, 5)]:
        convs = {"Conv", "QLinearConv"}  # by op type: ONNX Runtime renames the NCHWc conv node
        integer = kernel_ms(depthwise_model(channels, size, kernel, True), channels, size, args.runs, convs)
        floating = kernel_ms(depthwise_model(channels, size, kernel, False), channels, size, args.runs, convs)
        print(f"| {channels} ch, {size}x{size}, {kernel}x{kernel} | {integer:.3f} | {floating:.3f} |")
    print("\n| 2x bilinear upsampling, 64 ch, 64x64 -> 128x128 | ms |\n|---|---:|")
    for label, integer_resize in (("uint8 Resize", True), ("DQ -> float Resize -> Q", False)):
        ms = kernel_ms(upsample_model(64, 64, integer_resize), 64, 64, args.runs, {"resize"})
        print(f"| {label} | {ms:.3f} |")
    print("\n| QLinearConcat, 2 x 64 ch, 128x128 | ms |\n|---|---:|")
    for label, shared in (("inputs at the output's scale", True), ("one input requantized", False)):
        print(f"| {label} | {kernel_ms(concat_model(64, 128, shared), 64, 128, args.runs, {'concat'}):.3f} |")
    print("\n| peak mask, 80 ch, 128x128 | ms |\n|---|---:|")
    for label, where in (("Cast + Mul", False), ("Where", True)):
        ms = kernel_ms(peak_mask_model(80, 128, where), 80, 128, args.runs, {"mask_"})
        print(f"| {label} | {ms:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
