"""A small CenterNet-like ONNX for the quantization tests (random weights, no shared data).

uint8 NHWC input -> in-graph normalisation -> conv/residual/maxpool/depthwise/SE/DeformConv/ConvTranspose
backbone -> hm/wh/reg heads -> in-graph decode (sigmoid, 3x3 peak NMS, TopK, box maths) -> detections.
Optionally one *fragile* conv: its input has a channel 1000x larger than the others (compensated in the
weights, so fp32 is unaffected) and a per-tensor int8 scale wipes out every other channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from centernet_edge.quantize.placement import Placement
from centernet_edge.runtime.onnx_graph import prune_to_outputs
from centernet_edge.runtime.spec import Decode, GraphIO, ModelSpec, Preprocess, TensorInfo

SIZE = 64
CLASSES = 3
K = 20
STRIDE = 2
FRAGILE = "fragile_conv"
MEAN = (0.408, 0.447, 0.470)
STD = (0.289, 0.274, 0.278)


def synthetic_spec(name: str = "synthetic_centernet") -> ModelSpec:
    return ModelSpec(
        name=name,
        source="foreign",
        arch="synthetic",
        num_classes=CLASSES,
        class_names=[f"c{i}" for i in range(CLASSES)],
        preprocess=Preprocess(resize="affine", input_size=(SIZE, SIZE), color="BGR", mean=MEAN, std=STD),
        decode=Decode(stride=STRIDE, K=K, topk="single", heatmap_activation="sigmoid", reg_offset=True),
        graph=GraphIO(
            preprocess="normalize",
            input=TensorInfo("image", "uint8", [1, SIZE, SIZE, 3], "NHWC"),
            outputs={
                "detections": TensorInfo("detections", "float32", [1, K, 6]),
                "heatmap": TensorInfo(
                    "heatmap", "float32", [1, CLASSES, SIZE // STRIDE, SIZE // STRIDE], "NCHW"
                ),
            },
            detections_frame="network_input",
            batch=1,
        ),
    ).validate()


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(
        self, op: str, inputs: list[str], name: str | None = None, outputs: int = 1, **attrs
    ) -> list[str]:
        self.count += 1
        name = name or f"{op.lower()}_{self.count}"
        outs = [f"{name}_out{i}" if outputs > 1 else f"{name}_out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int = 3,
        stride: int = 1,
        group: int = 1,
        name: str | None = None,
        w_scale: np.ndarray | None = None,
        out_scale: np.ndarray | None = None,
        bias: float = 0.0,
    ) -> str:
        self.count += 1
        name = name or f"conv_{self.count}"
        fan_in = cin // group * k * k
        w = self.rng.normal(0, np.sqrt(2.0 / fan_in), (cout, cin // group, k, k)).astype(np.float32)
        b = (self.rng.normal(0, 0.1, cout) + bias).astype(np.float32)
        if w_scale is not None:
            w *= w_scale.reshape(1, -1, 1, 1).astype(np.float32)
        if out_scale is not None:
            w *= out_scale.reshape(-1, 1, 1, 1).astype(np.float32)
            b *= out_scale.astype(np.float32)
        self.const(f"{name}_w", w)
        self.const(f"{name}_b", b)
        pad = k // 2
        return self.node(
            "Conv",
            [x, f"{name}_w", f"{name}_b"],
            name=name,
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[pad] * 4,
            group=group,
        )[0]

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])[0]


def build_synthetic_model(seed: int = 0, fragile: bool = False, deform: bool = True) -> onnx.ModelProto:
    b = _Builder(seed)
    # --- in-graph pre-processing: uint8 NHWC BGR -> normalised float NCHW
    x = b.node("Cast", ["image"], name="pre_cast", to=TensorProto.FLOAT)[0]
    x = b.node("Transpose", [x], name="pre_transpose", perm=[0, 3, 1, 2])[0]
    mean = np.array(MEAN, np.float32).reshape(1, 3, 1, 1) * 255
    std = np.array(STD, np.float32).reshape(1, 3, 1, 1) * 255
    x = b.node("Sub", [x, b.const("pre_mean", mean)], name="pre_sub")[0]
    x = b.node("Div", [x, b.const("pre_std", std)], name="pre_div")[0]
    # --- backbone
    c1 = b.relu(b.conv(x, 3, 8, stride=2, name="stem"))  # 32x32
    c2 = b.conv(b.relu(b.conv(c1, 8, 8, name="block_a")), 8, 8, name="block_b")
    r1 = b.node("Add", [c2, c1], name="residual_add")[0]
    p1 = b.node("MaxPool", [b.relu(r1)], name="pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])[
        0
    ]
    if fragile:
        boost = np.ones(8, np.float32)
        boost[0] = 1000.0
        a = b.relu(b.conv(p1, 8, 8, name="boost_conv", out_scale=boost))
        p1 = b.conv(a, 8, 8, name=FRAGILE, w_scale=1.0 / boost)
    c3 = b.relu(b.conv(p1, 8, 16, stride=2, name="down"))  # 16x16
    dw = b.relu(b.conv(c3, 16, 16, group=16, name="depthwise"))
    pw = b.conv(dw, 16, 16, k=1, name="pointwise")
    se = b.node("GlobalAveragePool", [pw], name="se_pool")[0]
    se = b.node(
        "Sigmoid",
        [b.conv(b.relu(b.conv(se, 16, 4, k=1, name="se_reduce")), 4, 16, k=1, name="se_expand")],
        name="se_sigmoid",
    )[0]
    feat = b.node("Mul", [pw, se], name="se_mul")[0]
    if deform:
        om = b.conv(feat, 16, 27, name="offset_conv")
        om_scaled = b.node(
            "Mul", [om, b.const("offset_gain", np.array(0.5, np.float32))], name="offset_gain_mul"
        )[0]
        offset = b.node(
            "Slice",
            [
                om_scaled,
                b.const("off_s", np.array([0], np.int64)),
                b.const("off_e", np.array([18], np.int64)),
                b.const("off_a", np.array([1], np.int64)),
            ],
            name="offset_slice",
        )[0]
        mask_l = b.node(
            "Slice",
            [
                om_scaled,
                b.const("msk_s", np.array([18], np.int64)),
                b.const("msk_e", np.array([27], np.int64)),
                b.const("msk_a", np.array([1], np.int64)),
            ],
            name="mask_slice",
        )[0]
        mask = b.node("Sigmoid", [mask_l], name="mask_sigmoid")[0]
        w = b.rng.normal(0, np.sqrt(2.0 / 144), (16, 16, 3, 3)).astype(np.float32)
        b.const("dcn_w", w)
        b.const("dcn_b", np.zeros(16, np.float32))
        feat = b.node(
            "DeformConv",
            [feat, "dcn_w", offset, "dcn_b", mask],
            name="dcn",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[1, 1],
            dilations=[1, 1],
            group=1,
            offset_group=1,
        )[0]
        feat = b.relu(feat)
    wt = b.rng.normal(0, 0.15, (16, 8, 4, 4)).astype(np.float32)
    b.const("up_w", wt)
    up = b.node(
        "ConvTranspose",
        [feat, "up_w"],
        name="upsample",
        kernel_shape=[4, 4],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
    )[0]
    up = b.relu(up)  # 32x32
    # --- heads
    hm = b.conv(b.relu(b.conv(up, 8, 8, name="hm_head_0")), 8, CLASSES, k=1, name="hm_head_1", bias=-2.19)
    wh = b.conv(b.relu(b.conv(up, 8, 8, name="wh_head_0")), 8, 2, k=1, name="wh_head_1", bias=4.0)
    reg = b.conv(b.relu(b.conv(up, 8, 8, name="reg_head_0")), 8, 2, k=1, name="reg_head_1")
    # --- decode tail (all fp32): sigmoid, 3x3 peak NMS, single top-K, boxes in input pixels
    h = w_ = SIZE // STRIDE
    heat = b.node("Sigmoid", [hm], name="heatmap")[0]
    b.nodes[-1].output[0] = "heatmap"
    heat = "heatmap"
    hmax = b.node(
        "MaxPool", [heat], name="peak_pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]
    )[0]
    keep = b.node(
        "Cast", [b.node("Equal", [heat, hmax], name="peak_equal")[0]], name="peak_cast", to=TensorProto.FLOAT
    )[0]
    peaks = b.node("Mul", [heat, keep], name="peak_mul")[0]
    flat = b.node("Reshape", [peaks, b.const("flat_shape", np.array([1, -1], np.int64))], name="flat")[0]
    scores, idx = b.node(
        "TopK", [flat, b.const("topk_k", np.array([K], np.int64))], name="topk", outputs=2, axis=1
    )
    hw = b.const("hw", np.array(h * w_, np.int64))
    cls = b.node("Div", [idx, hw], name="cls_div")[0]
    pos = b.node("Mod", [idx, hw], name="pos_mod")[0]
    ys = b.node(
        "Cast",
        [b.node("Div", [pos, b.const("w_i", np.array(w_, np.int64))], name="ys_div")[0]],
        name="ys_cast",
        to=TensorProto.FLOAT,
    )[0]
    xs = b.node(
        "Cast",
        [b.node("Mod", [pos, b.const("w_i2", np.array(w_, np.int64))], name="xs_mod")[0]],
        name="xs_cast",
        to=TensorProto.FLOAT,
    )[0]
    pos1 = b.node("Squeeze", [pos, b.const("sq0", np.array([0], np.int64))], name="pos_squeeze")[0]

    def gather(head: str, tag: str) -> str:
        flat_head = b.node(
            "Reshape", [head, b.const(f"{tag}_shape", np.array([1, 2, h * w_], np.int64))], name=f"{tag}_flat"
        )[0]
        return b.node("Gather", [flat_head, pos1], name=f"{tag}_gather", axis=2)[0]  # [1, 2, K]

    def channel(t: str, c: int, tag: str) -> str:
        return b.node(
            "Squeeze",
            [
                b.node(
                    "Slice",
                    [
                        t,
                        b.const(f"{tag}_s", np.array([c], np.int64)),
                        b.const(f"{tag}_e", np.array([c + 1], np.int64)),
                        b.const(f"{tag}_a", np.array([1], np.int64)),
                    ],
                    name=f"{tag}_slice",
                )[0],
                b.const(f"{tag}_sq", np.array([1], np.int64)),
            ],
            name=f"{tag}_squeeze",
        )[0]  # [1, K]

    g_wh, g_reg = gather(wh, "wh"), gather(reg, "reg")
    stride = b.const("stride", np.array(float(STRIDE), np.float32))
    half = b.const("half", np.array(0.5 * STRIDE, np.float32))
    cx = b.node("Mul", [b.node("Add", [xs, channel(g_reg, 0, "rx")], name="cx_add")[0], stride], name="cx")[0]
    cy = b.node("Mul", [b.node("Add", [ys, channel(g_reg, 1, "ry")], name="cy_add")[0], stride], name="cy")[0]
    bw = b.node("Mul", [channel(g_wh, 0, "bw"), half], name="bw_half")[0]
    bh = b.node("Mul", [channel(g_wh, 1, "bh"), half], name="bh_half")[0]
    x1 = b.node("Sub", [cx, bw], name="x1")[0]
    y1 = b.node("Sub", [cy, bh], name="y1")[0]
    x2 = b.node("Add", [cx, bw], name="x2")[0]
    y2 = b.node("Add", [cy, bh], name="y2")[0]
    clsf = b.node("Cast", [cls], name="cls_cast", to=TensorProto.FLOAT)[0]
    cols = [
        b.node("Unsqueeze", [t, b.const(f"unsq_{i}", np.array([2], np.int64))], name=f"col_{i}")[0]
        for i, t in enumerate([x1, y1, x2, y2, scores, clsf])
    ]
    b.nodes.append(helper.make_node("Concat", cols, ["detections"], name="detections_concat", axis=2))

    graph = helper.make_graph(
        b.nodes,
        "synthetic_centernet",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [1, SIZE, SIZE, 3])],
        [
            helper.make_tensor_value_info("detections", TensorProto.FLOAT, [1, K, 6]),
            helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, [1, CLASSES, h, w_]),
        ],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def write_model(path: Path, fragile: bool = False, seed: int = 0, embed_spec: bool = True) -> Path:
    model = build_synthetic_model(seed=seed, fragile=fragile)
    if embed_spec:
        synthetic_spec().write_to_onnx(model)
    onnx.save(model, str(path))
    return path


def write_images(folder: Path, n: int, seed: int = 0) -> Path:
    """Images with blobs and gradients (so activations have structure), various sizes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = int(rng.integers(48, 96)), int(rng.integers(48, 96))
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 255 / w), (yy * 255 / h), np.full((h, w), 128.0)], axis=-1)
        for _ in range(3):
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(4, 16)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
        img += rng.normal(0, 8, img.shape)
        cv2.imwrite(str(folder / f"img_{i:03d}.png"), np.clip(img, 0, 255).astype(np.uint8))
    return folder


def feeds(spec: ModelSpec, folder: Path, n: int) -> list[tuple[np.ndarray, list]]:
    from centernet_edge.runtime.preprocess import prepare_batch

    paths = sorted(folder.glob("*.png"))[:n]
    return [prepare_batch([cv2.imread(str(p))], spec) for p in paths]


def tensor_values(model: onnx.ModelProto, tensors: list[str], inputs: list[dict[str, np.ndarray]]
                  ) -> list[dict[str, np.ndarray]]:
    """The values of ``tensors`` (intermediate ones included) for each feed dict, in ONNX Runtime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(prune_to_outputs(model, tensors).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    return [dict(zip(tensors, sess.run(tensors, feed), strict=True)) for feed in inputs]


@dataclass
class QuantSetup:
    """The synthetic network (no DeformConv), its int8 placement, per-tensor absmax ranges measured on
    ``batches`` (graph-input batches with their geometries, as ``feeds`` returns them)."""

    model: onnx.ModelProto
    spec: ModelSpec
    placement: Placement
    amax: dict[str, float]
    batches: list[tuple[np.ndarray, list]]

    @property
    def inputs(self) -> list[np.ndarray]:
        return [x for x, _ in self.batches]


def quant_setup(folder: Path, images: int, image_seed: int) -> QuantSetup:
    """What the quantization unit tests share: :func:`build_synthetic_model` (seed 1, fragile layer) and
    absmax ranges over ``images`` synthetic images drawn with ``image_seed``."""
    from centernet_edge.quantize.placement import plan_placement
    from centernet_edge.runtime.onnx_graph import ensure_node_names

    model = ensure_node_names(build_synthetic_model(seed=1, fragile=True, deform=False))
    spec = synthetic_spec()
    batches = feeds(spec, write_images(folder, images, seed=image_seed), images)
    placement = plan_placement(model)
    tensors = placement.activation_tensors()
    values = tensor_values(model, tensors, [{"image": x} for x, _ in batches])
    amax = {t: max(float(np.abs(v[t]).max()) for v in values) for t in tensors}
    return QuantSetup(model, spec, placement, amax, batches)
