"""The model-spec schema: one JSON document that tells every stage how to feed a model and read it.

Export writes it into the ONNX file (``metadata_props[METADATA_KEY]``); a foreign CenterNet ONNX gets the
same document as a side-car JSON file. Evaluation, calibration, runtimes and the C bundle read only this,
so nothing downstream re-guesses mean/std, colour order, input mode or class names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SPEC_FORMAT_VERSION = 1
METADATA_KEY = "centernet_edge.model_spec"

RESIZE_MODES = ("affine", "keep_res", "stretch")
COLOR_ORDERS = ("BGR", "RGB")
LAYOUTS = ("NHWC", "NCHW")
TOPK_SCHEMES = ("two_stage", "single")
HEATMAP_ACTIVATIONS = ("logits", "sigmoid")
BACK_PROJECTIONS = ("affine_inverse", "border_shift")
GRAPH_PREPROCESS = ("warp", "normalize", "none")
DETECTION_FRAMES = ("original", "network_input")
OUTPUT_ROLES = ("detections", "heatmap", "wh", "reg")
SOURCES = ("official", "mmdet", "foreign")
OFFICIAL_NORMALIZATIONS = ("test", "demo")

# Official CenterNet has two normalisations (BGR order, on 0..1 pixels), ~0.2 grey levels apart. test.py,
# which produced the reported COCO AP, takes the dataset class's precise values
# (src/lib/datasets/dataset/coco.py); demo.py and opts().init() take the rounded defaults of src/lib/opts.py.
OFFICIAL_MEAN_BGR = (0.40789654, 0.44719302, 0.47026115)
OFFICIAL_STD_BGR = (0.28863828, 0.27408164, 0.27809835)
OFFICIAL_DEMO_MEAN_BGR = (0.408, 0.447, 0.470)
OFFICIAL_DEMO_STD_BGR = (0.289, 0.274, 0.278)
# mmdetection CenterNet normalisation (RGB order, on 0..255 pixels).
MMDET_MEAN_RGB = (123.675, 116.28, 103.53)
MMDET_STD_RGB = (58.395, 57.12, 57.375)
# The published mean/std a Preprocess may name (its mean/std must then be exactly these).
NORMALIZATIONS = {
    "official_test": (OFFICIAL_MEAN_BGR, OFFICIAL_STD_BGR),
    "official_demo": (OFFICIAL_DEMO_MEAN_BGR, OFFICIAL_DEMO_STD_BGR),
    "mmdet": (MMDET_MEAN_RGB, MMDET_STD_RGB),
}

COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
    33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
    60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)
COCO_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)


class SpecError(ValueError):
    """A model spec (or foreign model description) is missing a field or holds an invalid value."""


def _choice(value: Any, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise SpecError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    return value


@dataclass
class Preprocess:
    """How an original BGR uint8 image becomes the network's input tensor.

    resize:
      ``affine``   official fixed-size warp: c=(w/2, h/2), s=max(h, w), output ``input_size``;
      ``keep_res`` the paper protocol: pad to ((h|pad)+1, (w|pad)+1), image centred, no scaling;
      ``stretch``  plain cv2.resize to ``input_size`` (aspect ratio not kept; foreign models).
    ``scale`` multiplies 0..255 pixels before ``(x - mean) / std``; mean/std are in network channel order.
    ``normalization`` names which published mean/std these are (a key of ``NORMALIZATIONS``: official_test,
    official_demo, mmdet); None when they are stated by value only (foreign models, older specs).
    """

    resize: str = "affine"
    input_size: tuple[int, int] | None = (512, 512)  # (height, width); None for keep_res
    pad: int = 31
    color: str = "BGR"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = OFFICIAL_MEAN_BGR
    std: tuple[float, ...] = OFFICIAL_STD_BGR
    border_value: float = 0.0
    interpolation: str = "linear"
    normalization: str | None = None

    def validate(self) -> None:
        _choice(self.resize, RESIZE_MODES, "preprocess.resize")
        _choice(self.color, COLOR_ORDERS, "preprocess.color")
        if self.resize == "keep_res":
            if self.pad < 0 or (self.pad + 1) & self.pad:
                raise SpecError(f"preprocess.pad must be 2**k - 1 (31, 127); got {self.pad}")
        elif self.input_size is None or len(self.input_size) != 2 or min(self.input_size) <= 0:
            raise SpecError(f"preprocess.input_size must be (height, width) for resize={self.resize!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise SpecError("preprocess.mean and preprocess.std need 3 values each")
        if any(s == 0 for s in self.std):
            raise SpecError("preprocess.std must not contain 0")
        if self.interpolation != "linear":
            raise SpecError("preprocess.interpolation: only 'linear' is supported")
        if self.normalization is not None:
            _choice(self.normalization, tuple(NORMALIZATIONS), "preprocess.normalization")
            mean, std = NORMALIZATIONS[self.normalization]
            if tuple(self.mean) != mean or tuple(self.std) != std:
                raise SpecError(f"preprocess.normalization says {self.normalization} (mean {list(mean)}, std "
                                f"{list(std)}) but mean/std are {list(self.mean)} / {list(self.std)}")


@dataclass
class Decode:
    """How the heads become detections (CenterNet 'ctdet' decode)."""

    stride: int = 4
    K: int = 100
    topk: str = "two_stage"
    peak_kernel: int = 3
    heatmap_activation: str = "logits"
    reg_offset: bool = True
    back_projection: str = "affine_inverse"

    def validate(self) -> None:
        _choice(self.topk, TOPK_SCHEMES, "decode.topk")
        _choice(self.heatmap_activation, HEATMAP_ACTIVATIONS, "decode.heatmap_activation")
        _choice(self.back_projection, BACK_PROJECTIONS, "decode.back_projection")
        if not 0 < self.K < 3840:
            raise SpecError(f"decode.K must be in 1..3839 (TensorRT TopK limit); got {self.K}")
        if self.peak_kernel % 2 != 1:
            raise SpecError("decode.peak_kernel must be odd")
        if self.stride <= 0:
            raise SpecError("decode.stride must be positive")


@dataclass
class TensorInfo:
    """One graph input or output. ``shape`` uses strings for dynamic axes."""

    name: str
    dtype: str
    shape: list[int | str]
    layout: str | None = None
    description: str = ""


@dataclass
class GraphIO:
    """What the ONNX graph itself does and what its tensors mean.

    preprocess:
      ``warp``      input is raw uint8 images [N,H,W,3] in BGR (as cv2.imread returns them);
      ``normalize`` input is uint8 already warped to the network size, layout ``input.layout``, BGR;
      ``none``      input is the normalised float tensor in ``input.layout`` and ``preprocess.color``.
    outputs maps a role (detections, heatmap, wh, reg) to the tensor. Detection rows are
    (x1, y1, x2, y2, score, class_index) with 0-based class_index, in ``detections_frame`` coordinates.
    """

    preprocess: str = "warp"
    decode: bool = True
    input: TensorInfo = field(default_factory=lambda: TensorInfo("image", "uint8", ["N", "H", "W", 3], "NHWC"))
    outputs: dict[str, TensorInfo] = field(default_factory=dict)
    detections_frame: str = "original"
    batch: int | None = None

    def validate(self) -> None:
        _choice(self.preprocess, GRAPH_PREPROCESS, "graph.preprocess")
        _choice(self.detections_frame, DETECTION_FRAMES, "graph.detections_frame")
        if self.input.layout is not None:
            _choice(self.input.layout, LAYOUTS, "graph.input.layout")
        for role, info in self.outputs.items():
            _choice(role, OUTPUT_ROLES, "graph.outputs role")
            if info.layout is not None:
                _choice(info.layout, LAYOUTS, f"graph.outputs[{role}].layout")
        if self.decode and "detections" not in self.outputs:
            raise SpecError("graph.decode is true but no 'detections' output is described")
        if not self.decode and "detections" not in self.outputs and "heatmap" not in self.outputs:
            raise SpecError("graph describes neither a 'detections' nor a 'heatmap' output")
        if "heatmap" in self.outputs and "detections" not in self.outputs:
            missing = [r for r in ("wh",) if r not in self.outputs]
            if missing:
                raise SpecError(f"raw-head graph needs outputs {missing} to decode boxes")


@dataclass
class ModelSpec:
    """Everything downstream needs to know about one CenterNet model artifact."""

    name: str
    source: str
    arch: str
    num_classes: int
    class_names: list[str]
    preprocess: Preprocess
    decode: Decode
    graph: GraphIO
    category_ids: list[int] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = SPEC_FORMAT_VERSION

    def validate(self) -> ModelSpec:
        if self.format_version > SPEC_FORMAT_VERSION:
            raise SpecError(
                f"model spec format {self.format_version} is newer than this toolkit understands "
                f"({SPEC_FORMAT_VERSION}); upgrade centernet-edge"
            )
        _choice(self.source, SOURCES, "source")
        if self.num_classes <= 0:
            raise SpecError("num_classes must be positive")
        if len(self.class_names) != self.num_classes:
            raise SpecError(f"class_names has {len(self.class_names)} entries, num_classes is {self.num_classes}")
        if self.category_ids is not None and len(self.category_ids) != self.num_classes:
            raise SpecError(f"category_ids has {len(self.category_ids)} entries, num_classes is {self.num_classes}")
        self.preprocess.validate()
        self.decode.validate()
        self.graph.validate()
        return self

    # ---- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        if not isinstance(data, dict):
            raise SpecError("a model spec must be a JSON object")
        known = {"name", "source", "arch", "num_classes", "class_names", "preprocess", "decode", "graph",
                 "category_ids", "provenance", "format_version"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"unknown model-spec fields: {', '.join(unknown)}")
        try:
            pre = dict(data.get("preprocess", {}))
            if pre.get("input_size") is not None:
                pre["input_size"] = tuple(pre["input_size"])
            for key in ("mean", "std"):
                if key in pre:
                    pre[key] = tuple(float(v) for v in pre[key])
            graph = dict(data.get("graph", {}))
            if "input" in graph:
                graph["input"] = TensorInfo(**graph["input"])
            graph["outputs"] = {role: TensorInfo(**info) for role, info in graph.get("outputs", {}).items()}
            num_classes = int(data["num_classes"])
            spec = cls(
                name=str(data.get("name", "model")),
                source=data.get("source", "foreign"),
                arch=str(data.get("arch", "unknown")),
                num_classes=num_classes,
                class_names=list(data.get("class_names") or [f"class_{i}" for i in range(num_classes)]),
                preprocess=Preprocess(**pre),
                decode=Decode(**data.get("decode", {})),
                graph=GraphIO(**graph),
                category_ids=list(data["category_ids"]) if data.get("category_ids") is not None else None,
                provenance=dict(data.get("provenance", {})),
                format_version=int(data.get("format_version", SPEC_FORMAT_VERSION)),
            )
        except KeyError as exc:
            raise SpecError(f"model spec is missing required field {exc.args[0]!r}") from None
        except TypeError as exc:
            raise SpecError(f"model spec has an invalid field: {exc}") from None
        return spec.validate()

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"model spec is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelSpec:
        return cls.from_json(Path(path).read_text())

    # ---- ONNX metadata -------------------------------------------------------------------------

    def write_to_onnx(self, model: Any) -> None:
        """Store this spec in an ``onnx.ModelProto``'s metadata_props (replacing an older one)."""
        self.validate()
        kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        entry = model.metadata_props.add()
        entry.key = METADATA_KEY
        entry.value = self.to_json()

    @classmethod
    def from_onnx(cls, model: Any) -> ModelSpec:
        """Read the spec from an ``onnx.ModelProto`` or a path to an .onnx file."""
        if isinstance(model, (str, Path)):
            import onnx

            model = onnx.load(str(model), load_external_data=False)
        for prop in model.metadata_props:
            if prop.key == METADATA_KEY:
                return cls.from_json(prop.value)
        raise SpecError(
            "this ONNX file carries no centernet-edge model spec; describe a foreign model with a JSON "
            "model description (see eval/model_descriptions/) and pass it with --model-spec"
        )


def load_spec(model_path: str | Path, description: str | Path | None = None) -> ModelSpec:
    """The spec for a model file: its embedded metadata, or the given side-car description."""
    if description is not None:
        return ModelSpec.from_file(description)
    return ModelSpec.from_onnx(model_path)


def official_preprocess(keep_res: bool = False, input_size: tuple[int, int] = (512, 512), pad: int = 31,
                        normalization: str = "test") -> Preprocess:
    """Pre-processing of xingyizhou/CenterNet (BGR, /255, COCO BGR mean/std).

    ``normalization``: 'test' (default) is test.py's precise dataset mean/std, with which the published COCO
    AP was measured; 'demo' is the rounded mean/std of demo.py and ``opts().init()``.
    """
    key = f"official_{_choice(normalization, OFFICIAL_NORMALIZATIONS, 'official normalization')}"
    mean, std = NORMALIZATIONS[key]
    return Preprocess(
        resize="keep_res" if keep_res else "affine",
        input_size=None if keep_res else tuple(input_size),
        pad=pad,
        color="BGR",
        scale=1.0 / 255.0,
        mean=mean,
        std=std,
        normalization=key,
    )


def mmdet_preprocess(keep_res: bool = False, input_size: tuple[int, int] = (512, 512), pad: int = 31) -> Preprocess:
    """Pre-processing of mmdetection's CenterNet (RGB, ImageNet mean/std on 0..255)."""
    return Preprocess(
        resize="keep_res" if keep_res else "affine",
        input_size=None if keep_res else tuple(input_size),
        pad=pad,
        color="RGB",
        scale=1.0,
        mean=MMDET_MEAN_RGB,
        std=MMDET_STD_RGB,
        normalization="mmdet",
    )


def source_decode(source: str, K: int = 100) -> Decode:
    """Decode settings faithful to each source (official: two-stage top-K; mmdet: one flattened top-K)."""
    if source == "mmdet":
        return Decode(K=K, topk="single", back_projection="border_shift")
    return Decode(K=K, topk="two_stage", back_projection="affine_inverse")


def toolkit_version() -> str:
    try:
        from importlib.metadata import version

        return version("centernet-edge")
    except Exception:  # not installed (running from a source tree)
        return "0+unknown"
