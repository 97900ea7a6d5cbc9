"""The C pre/post-processing library (runtime/c): the spec as C constants, building it, and a ctypes binding.

The binding exists so that the C rendering of the spec can be held to the numpy reference and to the
exported graph from Python (tests, benchmarks); embedded users call the C API directly.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .spec import ModelSpec

__all__ = [
    "ABI_VERSION",
    "C_DIR",
    "CLibrary",
    "CLibraryError",
    "LIBRARY_SOURCES",
    "STRICT_FLAGS",
    "build_shared_library",
    "config_header",
    "config_values",
]

C_DIR = Path(__file__).resolve().parent / "c"
LIBRARY_SOURCES = ("cn_core.c", "cn_preprocess.c", "cn_postprocess.c")
STRICT_FLAGS = ("-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-ffp-contract=off")
ABI_VERSION = 1  # must equal CN_ABI_VERSION in centernet_edge.h (a test checks)

STATUS = {0: "CN_OK", 1: "CN_ERR_NULL_ARGUMENT", 2: "CN_ERR_INVALID_ARGUMENT", 3: "CN_ERR_BAD_CONFIG",
          4: "CN_ERR_UNSUPPORTED", 5: "CN_ERR_BUFFER_TOO_SMALL", 6: "CN_ERR_SHAPE_MISMATCH"}
PIXEL_FORMATS = {"BGR": 0, "RGB": 1, "BGRA": 2, "GRAY": 3}
TENSOR_TYPES = {"float32": 0, "int8": 1, "uint8": 2, "uint8_bgr_nhwc": 3}
DTYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.int8): 2, np.dtype(np.uint8): 3}
LAYOUTS = {"NCHW": 0, "NHWC": 1}
_RESIZE = {"affine": 0, "keep_res": 1, "stretch": 2}
_RESIZE_C = ("CN_RESIZE_AFFINE", "CN_RESIZE_KEEP_RES", "CN_RESIZE_STRETCH")


class CLibraryError(RuntimeError):
    """A C call returned a status other than CN_OK; ``status`` holds the code."""

    def __init__(self, status: int, what: str) -> None:
        self.status = status
        super().__init__(f"{what}: {STATUS.get(status, status)}")


class Config(ctypes.Structure):
    _fields_ = [
        ("abi_version", ctypes.c_int), ("resize", ctypes.c_int), ("input_height", ctypes.c_int),
        ("input_width", ctypes.c_int), ("pad", ctypes.c_int), ("color", ctypes.c_int),
        ("scale", ctypes.c_double), ("mean", ctypes.c_double * 3), ("std", ctypes.c_double * 3),
        ("num_classes", ctypes.c_int), ("stride", ctypes.c_int), ("k", ctypes.c_int), ("topk", ctypes.c_int),
        ("peak_kernel", ctypes.c_int), ("heatmap_activation", ctypes.c_int), ("reg_offset", ctypes.c_int),
        ("back_projection", ctypes.c_int),
    ]


class Transform(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int) for name in ("image_width", "image_height", "input_width", "input_height",
                                                  "output_width", "output_height")] + \
               [(name, ctypes.c_float) for name in ("scale_x", "scale_y", "offset_x", "offset_y")]


class Image(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("width", ctypes.c_int), ("height", ctypes.c_int),
                ("stride_bytes", ctypes.c_size_t), ("format", ctypes.c_int)]


class Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int), ("layout", ctypes.c_int),
                ("scale", ctypes.c_float), ("zero_point", ctypes.c_int)]


class Heads(ctypes.Structure):
    _fields_ = [("heatmap", Tensor), ("wh", Tensor), ("reg", Tensor), ("batch", ctypes.c_int),
                ("height", ctypes.c_int), ("width", ctypes.c_int)]


class Detection(ctypes.Structure):
    _fields_ = [("x1", ctypes.c_float), ("y1", ctypes.c_float), ("x2", ctypes.c_float), ("y2", ctypes.c_float),
                ("score", ctypes.c_float), ("class_id", ctypes.c_int)]


DETECTION_DTYPE = np.dtype([("x1", "<f4"), ("y1", "<f4"), ("x2", "<f4"), ("y2", "<f4"), ("score", "<f4"),
                            ("class_id", "<i4")])


def config_values(spec: ModelSpec, heatmap_activation: str | None = None) -> dict[str, Any]:
    """The spec's pre/post-processing as ``cn_config`` field values.

    ``heatmap_activation`` overrides the spec's (the network-only graph already applies the sigmoid).
    """
    pre, dec = spec.preprocess, spec.decode
    size = pre.input_size or (0, 0)
    return {
        "abi_version": ABI_VERSION,
        "resize": _RESIZE[pre.resize],
        "input_height": int(size[0]),
        "input_width": int(size[1]),
        "pad": int(pre.pad),
        "color": 1 if pre.color == "RGB" else 0,
        "scale": float(pre.scale),
        "mean": [float(v) for v in pre.mean],
        "std": [float(v) for v in pre.std],
        "num_classes": int(spec.num_classes),
        "stride": int(dec.stride),
        "k": int(dec.K),
        "topk": 0 if dec.topk == "two_stage" else 1,
        "peak_kernel": int(dec.peak_kernel),
        "heatmap_activation": 0 if (heatmap_activation or dec.heatmap_activation) == "logits" else 1,
        "reg_offset": 1 if dec.reg_offset else 0,
        "back_projection": 0 if dec.back_projection == "affine_inverse" else 1,
    }


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').encode("ascii", "replace").decode() + '"'


def config_header(spec: ModelSpec, heatmap_activation: str | None = None) -> str:
    """``centernet_model_config.h``: the spec as C constants (``CN_MODEL_CONFIG_INIT`` fills a cn_config)."""
    v = config_values(spec, heatmap_activation)

    def doubles(values: Sequence[float]) -> str:
        return "{" + ", ".join(repr(float(x)) for x in values) + "}"

    names = ", ".join(_c_string(n) for n in spec.class_names)
    init = ", ".join([
        "CN_ABI_VERSION", _RESIZE_C[v["resize"]], str(v["input_height"]), str(v["input_width"]), str(v["pad"]),
        "CN_COLOR_RGB" if v["color"] else "CN_COLOR_BGR", repr(v["scale"]), doubles(v["mean"]),
        doubles(v["std"]), str(v["num_classes"]), str(v["stride"]), str(v["k"]),
        "CN_TOPK_SINGLE" if v["topk"] else "CN_TOPK_TWO_STAGE", str(v["peak_kernel"]),
        "CN_HEATMAP_SIGMOID" if v["heatmap_activation"] else "CN_HEATMAP_LOGITS", str(v["reg_offset"]),
        "CN_BACK_BORDER_SHIFT" if v["back_projection"] else "CN_BACK_AFFINE_INVERSE",
    ])
    return (
        f"/* The model spec of {spec.name} ({spec.source}, {spec.arch}) as C constants.\n"
        " * Generated by centernet-bundle from the same spec the ONNX files carry; do not edit. */\n"
        "#ifndef CENTERNET_MODEL_CONFIG_H\n#define CENTERNET_MODEL_CONFIG_H\n\n"
        '#include "centernet_edge.h"\n\n'
        f"#define CN_MODEL_NAME {_c_string(spec.name)}\n"
        f"#define CN_MODEL_NUM_CLASSES {spec.num_classes}\n"
        f"/* resize={spec.preprocess.resize}, colour={spec.preprocess.color}, topk={spec.decode.topk}, "
        f"K={spec.decode.K} */\n"
        f"#define CN_MODEL_CONFIG_INIT {{{init}}}\n"
        f"/* const char *const names[CN_MODEL_NUM_CLASSES] = CN_MODEL_CLASS_NAMES_INIT; */\n"
        f"#define CN_MODEL_CLASS_NAMES_INIT {{{names}}}\n\n"
        "#endif /* CENTERNET_MODEL_CONFIG_H */\n"
    )


def find_compiler(cc: str | None = None) -> str | None:
    for name in ([cc] if cc else ["cc", "gcc", "clang"]):
        if name and shutil.which(name):
            return name
    return None


def build_shared_library(out_dir: str | Path, cc: str | None = None, extra_flags: Sequence[str] = (),
                         opt: str = "-O2") -> Path:
    """Compile runtime/c into ``out_dir/libcenternet_edge.so`` with the strict flags; returns its path."""
    compiler = find_compiler(cc)
    if compiler is None:
        raise CLibraryError(-1, "no C compiler (cc, gcc or clang) on PATH")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lib = out / "libcenternet_edge.so"
    cmd = [compiler, *STRICT_FLAGS, opt, "-fPIC", "-shared", f"-I{C_DIR}", *extra_flags,
           *(str(C_DIR / s) for s in LIBRARY_SOURCES), "-o", str(lib), "-lm"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise CLibraryError(-1, f"compiling the C library failed:\n{result.stderr}")
    return lib


def _ptr(array: np.ndarray | None) -> int | None:
    return None if array is None else array.ctypes.data


class CLibrary:
    """ctypes binding of one built libcenternet_edge."""

    def __init__(self, path: str | Path) -> None:
        self.lib = ctypes.CDLL(str(path))
        lib = self.lib
        lib.cn_version.restype = ctypes.c_char_p
        lib.cn_status_string.restype = ctypes.c_char_p
        lib.cn_status_string.argtypes = [ctypes.c_int]
        lib.cn_context_size.restype = ctypes.c_size_t
        lib.cn_context_size.argtypes = [ctypes.POINTER(Config)]
        lib.cn_create.argtypes = [ctypes.POINTER(Config), ctypes.POINTER(ctypes.c_void_p)]
        lib.cn_destroy.argtypes = [ctypes.c_void_p]
        lib.cn_destroy.restype = None
        lib.cn_transform_for_image.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                               ctypes.POINTER(Transform)]
        lib.cn_input_bytes.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                       ctypes.POINTER(ctypes.c_size_t)]
        lib.cn_preprocess.argtypes = [ctypes.c_void_p, ctypes.POINTER(Image), ctypes.c_int, ctypes.c_float,
                                      ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(Transform)]
        lib.cn_postprocess.argtypes = [ctypes.c_void_p, ctypes.POINTER(Heads), ctypes.POINTER(Transform),
                                       ctypes.c_float, ctypes.c_void_p, ctypes.c_int,
                                       ctypes.POINTER(ctypes.c_int)]

    def version(self) -> str:
        return self.lib.cn_version().decode()

    def context(self, values: dict[str, Any]) -> CContext:
        return CContext(self, values)


class CContext:
    """One cn_context built from :func:`config_values`; released when garbage-collected."""

    def __init__(self, library: CLibrary, values: dict[str, Any]) -> None:
        self.library = library
        self.values = dict(values)
        cfg = Config()
        for key, value in values.items():
            if key in ("mean", "std"):
                getattr(cfg, key)[:] = [float(x) for x in value]
            else:
                setattr(cfg, key, value)
        self.config = cfg
        self.handle = ctypes.c_void_p()
        status = library.lib.cn_create(ctypes.byref(cfg), ctypes.byref(self.handle))
        if status:
            raise CLibraryError(status, "cn_create")

    def __del__(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None and handle.value:
            self.library.lib.cn_destroy(handle)
            self.handle = None

    def transform(self, width: int, height: int) -> Transform:
        t = Transform()
        status = self.library.lib.cn_transform_for_image(self.handle, width, height, ctypes.byref(t))
        if status:
            raise CLibraryError(status, "cn_transform_for_image")
        return t

    def preprocess(self, image: np.ndarray, pixel_format: str = "BGR", tensor: str = "float32",
                   quant_scale: float = 0.0, quant_zero_point: int = 0,
                   stride_bytes: int | None = None, width: int | None = None) -> tuple[np.ndarray, Transform]:
        """An HxWxC uint8 image, or a 2-D byte array of rows ``stride_bytes`` apart holding ``width`` pixels."""
        lib = self.library.lib
        if image.ndim == 2 and pixel_format != "GRAY":
            if width is None:
                raise ValueError("a 2-D array of packed rows needs the image width")
            height = image.shape[0]
        else:
            height, width = image.shape[0], image.shape[1]
        if stride_bytes is None:
            stride_bytes = image.strides[0]
        t = self.transform(width, height)
        if tensor == "uint8_bgr_nhwc":
            out = np.empty((t.input_height, t.input_width, 3), np.uint8)
        else:
            dtype = {"float32": np.float32, "int8": np.int8, "uint8": np.uint8}[tensor]
            out = np.empty((3, t.input_height, t.input_width), dtype)
        img = Image(image.ctypes.data, width, height, stride_bytes, PIXEL_FORMATS[pixel_format])
        status = lib.cn_preprocess(self.handle, ctypes.byref(img), TENSOR_TYPES[tensor], quant_scale,
                                   quant_zero_point, out.ctypes.data, out.nbytes, ctypes.byref(t))
        if status:
            raise CLibraryError(status, "cn_preprocess")
        return out, t

    def postprocess(self, heatmap: np.ndarray, wh: np.ndarray, reg: np.ndarray | None,
                    transforms: Sequence[Transform], *, layout: str | dict[str, str] = "NCHW",
                    quant: dict[str, tuple[float, int]] | None = None,
                    score_threshold: float = float("-inf")) -> list[np.ndarray]:
        """Heads [N, C, h, w] (or NHWC) of any supported dtype -> per image a DETECTION_DTYPE array."""
        lib = self.library.lib
        quant = quant or {}
        arrays = {"heatmap": np.ascontiguousarray(heatmap), "wh": np.ascontiguousarray(wh),
                  "reg": None if reg is None else np.ascontiguousarray(reg)}
        layouts = layout if isinstance(layout, dict) else dict.fromkeys(arrays, layout)
        n = arrays["heatmap"].shape[0]
        hm_shape = arrays["heatmap"].shape
        h, w = hm_shape[2:4] if layouts["heatmap"] == "NCHW" else hm_shape[1:3]

        def tensor(name: str) -> Tensor:
            a = arrays[name]
            if a is None:
                return Tensor(None, 0, 0, 0.0, 0)
            scale, zero = quant.get(name, (0.0, 0))
            return Tensor(_ptr(a), DTYPES[a.dtype], LAYOUTS[layouts[name]], scale, zero)

        heads = Heads(tensor("heatmap"), tensor("wh"), tensor("reg"), n, h, w)
        t_array = (Transform * n)(*transforms)
        capacity = int(self.values["k"])
        out = np.zeros(n * capacity, DETECTION_DTYPE)
        counts = (ctypes.c_int * n)()
        status = lib.cn_postprocess(self.handle, ctypes.byref(heads), t_array, score_threshold,
                                    out.ctypes.data, capacity, counts)
        if status:
            raise CLibraryError(status, "cn_postprocess")
        return [out[b * capacity: b * capacity + counts[b]].copy() for b in range(n)]
