"""Read official CenterNet and mmdetection CenterNet checkpoints safely and build the matching model.

Checkpoints are untrusted files: they are only ever unpickled with ``torch.load(weights_only=True)``, so a
file that needs arbitrary Python objects is refused, never executed. When that loader fails, the pickle
stream is scanned statically (``pickletools``, nothing is imported or called) so the error can say *why*:
truncated download, foreign pickled objects, another file format, or plain garbage.

Architecture, depth, DCN, class count and head width are inferred from key names and tensor shapes
(REFERENCE.md §6), so a user only has to name a file.
"""

from __future__ import annotations

import io
import pickletools
import re
import struct
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from centernet_edge.runtime.hashing import file_sha256

__all__ = [
    "ArchitectureGuess",
    "CheckpointError",
    "RawCheckpoint",
    "CheckpointInfo",
    "LoadedCheckpoint",
    "inspect_checkpoint",
    "load_checkpoint",
    "infer_architecture",
    "extract_state_dict",
    "file_sha256",
    "safe_torch_load",
]

# Keys the released files carry but no CenterNet model uses: the ImageNet classifier of the DLA backbone
# left in ctdet_coco_dla_2x.pth (shared/data/SOURCES.md).
DROPPABLE_KEYS = ("base.fc.weight", "base.fc.bias")

# Old checkpoints (PyTorch < 0.4.1) have no BN batch counter; it does not affect inference.
_TOLERATED_MISSING_SUFFIX = ".num_batches_tracked"

_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_EXAMPLES = 4


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message says what was found and what to do."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint file holds, read without building a model."""

    path: Path
    sha256: str
    size_bytes: int
    container: str  # 'official' ({'epoch','state_dict'}), 'mmdet' ({'meta','state_dict'}) or 'bare'
    source: str  # 'official' | 'mmdet'
    arch: str
    family: str
    depth: int | None
    has_dcn: bool
    num_classes: int
    head_conv: int | None
    num_tensors: int
    module_prefix: bool  # keys were saved from a DataParallel wrapper ('module.')
    epoch: int | None = None
    class_names: tuple[str, ...] | None = None  # mmdet meta['CLASSES'] when present
    dropped_keys: tuple[str, ...] = ()


@dataclass
class LoadedCheckpoint:
    """A model in eval mode with the checkpoint's weights loaded strictly."""

    model: nn.Module
    arch: str
    source: str
    num_classes: int
    head_conv: int | None
    has_dcn: bool
    sha256: str
    dropped_keys: tuple[str, ...]
    info: CheckpointInfo
    defaulted_keys: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class ArchitectureGuess:
    """Result of reading a state_dict's key layout."""

    arch: str
    source: str
    family: str
    depth: int | None
    has_dcn: bool
    num_classes: int
    head_conv: int | None


@dataclass
class _Heads:
    source: str
    num_classes: int
    head_conv: int | None
    in_channels: int
    names: str


@dataclass
class RawCheckpoint:
    state_dict: dict[str, torch.Tensor]
    container: str
    module_prefix: bool
    epoch: int | None
    class_names: tuple[str, ...] | None


# ----------------------------------------------------------------------------------------------------------
# File level: hashing, format sniffing, safe unpickling


def _other_format(head: bytes, path: Path) -> str | None:
    """Name a known non-PyTorch format from the first bytes, or None."""
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < header_len < 100_000_000:
            return (
                "a safetensors file (8-byte header length + JSON header), not a PyTorch pickle checkpoint; "
                "load it with safetensors.torch.load_file() and torch.save({'state_dict': tensors}, 'x.pth')"
            )
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "an HDF5 file (e.g. a Keras .h5 model), not a PyTorch checkpoint"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array file, not a PyTorch checkpoint"
    if head[4:8] == b"TFL3":
        return "a TensorFlow Lite flatbuffer, not a PyTorch checkpoint"
    if head.startswith(b"GGUF"):
        return "a GGUF file, not a PyTorch checkpoint"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip-compressed file; decompress it first"
    if path.suffix.lower() == ".onnx" or (len(head) > 3 and head[0] == 0x08 and head[2] == 0x12):
        return "an ONNX model (protobuf), not a PyTorch checkpoint; it is already exported"
    return None


@dataclass
class _PickleScan:
    globals: list[str]
    truncated: bool
    first_int: int | None  # torch legacy files start with a pickled magic number


def _scan_pickle(stream: io.BufferedIOBase | io.BytesIO) -> _PickleScan:
    """List the globals one pickle would import, without importing anything.

    STACK_GLOBAL (protocol >= 4) takes module and name from the stack; tracking string pushes and the memo
    is enough to name them for an error message."""
    found: list[str] = []
    strings: list[str] = []
    memo: dict[int, str | None] = {}
    last: str | None = None  # value pushed by the previous opcode when it was a string
    first_int: int | None = None
    try:
        for opcode, arg, _pos in pickletools.genops(stream):
            name = opcode.name
            if first_int is None and isinstance(arg, int) and name in ("LONG1", "LONG4", "BININT", "LONG"):
                first_int = arg
            if name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                memo[len(memo) if name == "MEMOIZE" else int(arg)] = last
                continue  # memo ops leave the stack as it is
            last = None
            if name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif name == "STACK_GLOBAL":
                found.append(".".join(strings[-2:]) if len(strings) >= 2 else "<stack global>")
            elif "UNICODE" in name or name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
                last = str(arg)
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                last = memo.get(int(arg))
            if last is not None:
                strings.append(last)
    except ValueError as exc:
        # genops raises ValueError both for a stream cut short and for bytes that are no pickle at all.
        truncated = "exhausted" in str(exc) or "not enough data" in str(exc)
        if not truncated:
            raise
        return _PickleScan(found, True, first_int)
    return _PickleScan(found, False, first_int)


def _allowed_globals() -> set[str]:
    """Names torch's weights-only unpickler accepts; used only to explain a refusal, never to allow one."""
    try:
        from torch import _weights_only_unpickler

        return set(_weights_only_unpickler._get_allowed_globals())
    except (ImportError, AttributeError):  # private API: fall back to the names torch.save itself emits
        return {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "_codecs.encode", "torch.Size"}


def _unsafe_globals(names: Iterable[str]) -> list[str]:
    allowed = _allowed_globals()
    # Storage classes (torch.FloatStorage, ...) are how legacy files reference tensor data.
    return sorted({n for n in names if n not in allowed and not re.fullmatch(r"torch\.\w*Storage", n)})


def _refuse_objects(path: Path, names: list[str]) -> CheckpointError:
    shown = ", ".join(names[:_EXAMPLES]) + (
        f" (+{len(names) - _EXAMPLES} more)" if len(names) > _EXAMPLES else ""
    )
    return CheckpointError(
        f"{path}: refusing to load: the file pickles arbitrary Python objects ({shown}), which unpickling "
        "would import and call (it may run code). Only tensor state_dicts are loaded "
        "(torch.load weights_only=True). "
        "If you trust the file, re-save just the weights in a separate environment: "
        "torch.save({'state_dict': obj.state_dict()}, 'clean.pth')."
    )


def _diagnose_failed_load(path: Path, head: bytes, exc: Exception) -> CheckpointError:
    """Turn a failed weights-only load into a message that names the actual problem."""
    size = path.stat().st_size
    truncated_msg = (
        f"{path}: the file is truncated or corrupted ({size} bytes); the download or copy was probably "
        "interrupted. Download it again and compare its sha256 with the published one."
    )
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not pickles:
                    return CheckpointError(
                        f"{path}: a ZIP archive without data.pkl (e.g. a NumPy .npz), "
                        "not a torch.save checkpoint"
                    )
                scan = _scan_pickle(io.BytesIO(archive.read(pickles[0])))
        except (zipfile.BadZipFile, EOFError, OSError, ValueError):
            return CheckpointError(truncated_msg)
        if scan.truncated:
            return CheckpointError(truncated_msg)
        if unsafe := _unsafe_globals(scan.globals):
            return _refuse_objects(path, unsafe)
        if "EOF" in str(exc) or "corrupt" in str(exc):
            return CheckpointError(truncated_msg)
        return CheckpointError(f"{path}: torch.load(weights_only=True) failed: {_last_line(exc)}")

    with open(path, "rb") as handle:
        scans: list[_PickleScan] = []
        try:
            # A legacy torch.save file is: magic, protocol, sys_info, the object, storage keys, raw data.
            for _ in range(4):
                scans.append(_scan_pickle(handle))
                if scans[-1].truncated or scans[0].first_int != _TORCH_LEGACY_MAGIC:
                    break
        except Exception:  # noqa: BLE001 - any parse failure means the bytes are not a pickle
            return CheckpointError(
                f"{path}: not a PyTorch checkpoint: the content is neither a torch.save ZIP archive nor a "
                f"valid pickle (starts with {head[:8].hex()}). Check that the file is the .pth you meant "
                "to use."
            )
    unsafe = _unsafe_globals(g for s in scans for g in s.globals)
    if unsafe and not any(s.truncated for s in scans):
        return _refuse_objects(path, unsafe)
    if any(s.truncated for s in scans) or "EOF" in str(exc) or "corrupt" in str(exc):
        return CheckpointError(truncated_msg)
    if scans and scans[0].first_int != _TORCH_LEGACY_MAGIC:
        return CheckpointError(
            f"{path}: a plain Python pickle, not a torch.save checkpoint, and it cannot be read as tensors "
            "only. "
            "Save the weights with torch.save({'state_dict': model.state_dict()}, path)."
        )
    return CheckpointError(f"{path}: torch.load(weights_only=True) failed: {_last_line(exc)}")


def _last_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if "documentation" not in line]
    return (useful or lines or [type(exc).__name__])[-1]


def safe_torch_load(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file; check the path or download it first")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory; pass the .pth file inside it")
    with open(path, "rb") as handle:
        head = handle.read(64)
    if not head:
        raise CheckpointError(
            f"{path}: the file is empty (0 bytes); the download probably failed, fetch it again"
        )
    if not head.startswith((b"PK", b"\x80")):
        other = _other_format(head, path)
        raise CheckpointError(
            f"{path}: is {other}."
            if other
            else f"{path}: not a PyTorch checkpoint: unrecognised content (starts with {head[:8].hex()}); "
            "expected a torch.save file (ZIP archive or legacy pickle)."
        )
    try:
        with warnings.catch_warnings():
            # Plain pickles (protocol 4/5) trigger a torch warning; the failure is explained below instead.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure is translated into a CheckpointError
        raise _diagnose_failed_load(path, head, exc) from exc


# ----------------------------------------------------------------------------------------------------------
# Container level


def extract_state_dict(obj: Any, where: str = "checkpoint") -> RawCheckpoint:
    """Unwrap an official / mmdet / bare container into a flat tensor dict without a 'module.' prefix."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{where}: holds a {type(obj).__name__}, not a checkpoint; expected a dict like "
            "{'epoch', 'state_dict'} (official), {'meta', 'state_dict'} (mmdetection) or a bare state_dict"
        )
    epoch: int | None = None
    class_names: tuple[str, ...] | None = None
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        state = obj["state_dict"]
        if "meta" in obj:
            container = "mmdet"
            meta = obj["meta"] if isinstance(obj["meta"], Mapping) else {}
            classes = meta.get("CLASSES") or (meta.get("dataset_meta") or {}).get("classes")
            if isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes):
                class_names = tuple(classes)
            epoch = meta.get("epoch") if isinstance(meta.get("epoch"), int) else None
        else:
            container = "official"
            epoch = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, container = obj, "bare"
    else:
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise CheckpointError(
            f"{where}: a dict with keys [{keys}] but no 'state_dict' and no tensors; not a CenterNet "
            "checkpoint. Expected {'epoch', 'state_dict'} (official), {'meta', 'state_dict'} (mmdetection) "
            "or a bare state_dict."
        )
    if not state:
        raise CheckpointError(f"{where}: the state_dict is empty")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{where}: state_dict entries that are not tensors: {', '.join(map(str, bad[:4]))}"
        )
    _refuse_non_finite(state, where)
    prefixed = all(str(k).startswith("module.") for k in state)
    tensors = {(k[len("module.") :] if prefixed else k): v for k, v in state.items()}
    return RawCheckpoint(tensors, container, prefixed, epoch, class_names)


def _refuse_non_finite(state: Mapping[str, torch.Tensor], where: str) -> None:
    """NaN/Inf weights would only surface minutes later as a failed verification: refuse them at load."""
    bad = [(k, v) for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not bad:
        return
    name, tensor = bad[0]
    nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
    raise CheckpointError(
        f"{where}: tensor '{name}' holds {nan} NaN and {inf} Inf value(s) of {tensor.numel()}{more}; "
        "the weights are corrupt (a diverged training run or a damaged file)"
    )


# ----------------------------------------------------------------------------------------------------------
# Architecture inference from key names and shapes

_RESNET_DEPTHS = {
    (False, (2, 2, 2, 2)): 18,
    (False, (3, 4, 6, 3)): 34,
    (True, (3, 4, 6, 3)): 50,
    (True, (3, 4, 23, 3)): 101,
    (True, (3, 8, 36, 3)): 152,
}


def _resnet_depth(sd: Mapping[str, torch.Tensor], prefix: str) -> int | None:
    counts = []
    for layer in range(1, 5):
        pattern = re.compile(rf"^{re.escape(prefix)}layer{layer}\.(\d+)\.")
        blocks = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
        counts.append(max(blocks) + 1 if blocks else 0)
    bottleneck = f"{prefix}layer1.0.conv3.weight" in sd
    return _RESNET_DEPTHS.get((bottleneck, tuple(counts)))


def _find_heads(sd: Mapping[str, torch.Tensor]) -> _Heads | None:
    def out_in(key: str) -> tuple[int, int]:
        return int(sd[key].shape[0]), int(sd[key].shape[1])

    if "bbox_head.heatmap_head.2.weight" in sd and "bbox_head.heatmap_head.0.weight" in sd:
        classes, _ = out_in("bbox_head.heatmap_head.2.weight")
        conv, cin = out_in("bbox_head.heatmap_head.0.weight")
        return _Heads("mmdet", classes, conv, cin, "bbox_head.heatmap_head/wh_head/offset_head")
    names = "/".join(h for h in ("hm", "wh", "reg") if any(k.startswith(h + ".") for k in sd))
    if "hm.2.weight" in sd and "hm.0.weight" in sd:
        classes, _ = out_in("hm.2.weight")
        conv, cin = out_in("hm.0.weight")
        return _Heads("official", classes, conv, cin, names)
    if "hm.0.1.weight" in sd and "hm.0.0.conv.weight" in sd:  # hourglass: one head per stack
        classes, _ = out_in("hm.0.1.weight")
        conv, cin = out_in("hm.0.0.conv.weight")
        return _Heads("official", classes, conv, cin, names)
    if "hm.weight" in sd:  # head_conv <= 0: a single 1x1 conv per head
        classes, cin = out_in("hm.weight")
        return _Heads("official", classes, 0, cin, names)
    return None


def _describe_keys(sd: Mapping[str, Any]) -> str:
    groups = Counter(k.split(".")[0] for k in sd)
    return ", ".join(f"{name}.* ({n} tensors)" for name, n in sorted(groups.items()))


def _describe_backbone(sd: Mapping[str, torch.Tensor]) -> str:
    trunk = [v for k, v in sd.items() if k.startswith("features.") and k.endswith(".weight") and v.dim() == 4]
    if any(v.shape[1] == 1 and v.shape[-1] > 1 for v in trunk):
        return "unknown backbone (features.*: a MobileNet-style trunk with depthwise convolutions)"
    return "unknown backbone"


def _supported() -> list[str]:
    from centernet_edge.export.models import ARCHITECTURES

    return sorted(ARCHITECTURES)


def _unsupported(what: str, sd: Mapping[str, Any], heads: _Heads | None, where: str) -> CheckpointError:
    head_text = (
        f"It has CenterNet heads {heads.names} ({heads.num_classes} classes, head_conv {heads.head_conv}, "
        f"head input {heads.in_channels} channels), but "
        if heads
        else "No CenterNet heads (hm/wh/reg or bbox_head.heatmap_head) were found, and "
    )
    return CheckpointError(
        f"{where}: unsupported architecture: {what}. {head_text}the backbone is not one this toolkit builds. "
        f"Found: {_describe_keys(sd)}. Supported: {', '.join(_supported())}. For another CenterNet variant, "
        "export it to ONNX with its own code and describe it with a model-spec side-car JSON "
        "(source 'foreign')."
    )


def infer_architecture(sd: Mapping[str, torch.Tensor], where: str = "checkpoint") -> ArchitectureGuess:
    """Name the architecture a state_dict (no 'module.' prefix) was saved from."""
    heads = _find_heads(sd)
    if heads is None:
        raise _unsupported("no known head layout", sd, None, where)
    family: str
    depth: int | None
    if heads.source == "mmdet":
        if "backbone.layer1.0.conv1.weight" not in sd:
            raise _unsupported("mmdetection heads on an unknown backbone", sd, heads, where)
        depth = _resnet_depth(sd, "backbone.")
        has_dcn = any(k.startswith("neck.") and ".conv_offset." in k for k in sd)
        family = "mmdet_resnet"
        arch = f"mmdet_r{depth}" + ("_dcnv2" if has_dcn else "")
    elif "layer1.0.conv1.weight" in sd and "conv1.weight" in sd:
        depth = _resnet_depth(sd, "")
        has_dcn = any(k.startswith("deconv_layers.") and "conv_offset_mask" in k for k in sd)
        family = "resdcn" if has_dcn else "res"
        arch = f"{family}_{depth}"
    elif "base.base_layer.0.weight" in sd and any(k.startswith("dla_up.") for k in sd):
        has_dcn = any("conv_offset_mask" in k for k in sd)
        family, depth = ("dla", 34) if has_dcn else ("dlav0", 34)
        arch = f"{family}_{depth}"
    elif any(k.startswith("kps.") for k in sd) and any(k.startswith("pre.") for k in sd):
        family, depth, has_dcn = "hourglass", 104, False
        stacks = {k.split(".")[1] for k in sd if k.startswith("kps.")}
        if len(stacks) != 2:
            raise _unsupported(
                f"an hourglass with {len(stacks)} stacks (only 2-stack Hourglass-104)", sd, heads, where
            )
        arch = "hourglass_104"
    else:
        raise _unsupported(_describe_backbone(sd), sd, heads, where)
    if depth is None:
        raise _unsupported(f"a {family} ResNet with an unrecognised block layout", sd, heads, where)
    if arch not in _supported():
        raise _unsupported(f"recognised '{arch}', which this toolkit does not build", sd, heads, where)
    return ArchitectureGuess(arch, heads.source, family, depth, has_dcn, heads.num_classes, heads.head_conv)


# ----------------------------------------------------------------------------------------------------------
# Public entry points


def _read(path: str | Path) -> tuple[Path, RawCheckpoint]:
    path = Path(path)
    raw = extract_state_dict(safe_torch_load(path), where=str(path))
    return path, raw


def _droppable(sd: Mapping[str, Any], model_keys: Iterable[str] | None = None) -> tuple[str, ...]:
    keep = set(model_keys or ())
    return tuple(k for k in DROPPABLE_KEYS if k in sd and k not in keep)


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Describe a checkpoint file (container, architecture, classes, head width) without building a model."""
    path, raw = _read(path)
    guess = infer_architecture(raw.state_dict, where=str(path))
    return _info(path, raw, guess, _droppable(raw.state_dict))


def _info(
    path: Path, raw: RawCheckpoint, guess: ArchitectureGuess, dropped: tuple[str, ...]
) -> CheckpointInfo:
    return CheckpointInfo(
        path=path,
        sha256=file_sha256(path),
        size_bytes=path.stat().st_size,
        container=raw.container,
        source=guess.source,
        arch=guess.arch,
        family=guess.family,
        depth=guess.depth,
        has_dcn=guess.has_dcn,
        num_classes=guess.num_classes,
        head_conv=guess.head_conv,
        num_tensors=len(raw.state_dict),
        module_prefix=raw.module_prefix,
        epoch=raw.epoch,
        class_names=raw.class_names,
        dropped_keys=dropped,
    )


def _examples(keys: list[str]) -> str:
    shown = ", ".join(keys[:_EXAMPLES])
    return shown + (", ..." if len(keys) > _EXAMPLES else "")


def _mismatch_message(
    where: str,
    arch: str,
    sd: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    guess: str | None,
) -> str | None:
    missing = [k for k in expected if k not in sd and not k.endswith(_TOLERATED_MISSING_SUFFIX)]
    unexpected = [k for k in sd if k not in expected]
    shaped = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in sd and sd[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or shaped):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {_examples(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {_examples(unexpected)})")
    if shaped:
        parts.append(f"{len(shaped)} mis-shaped keys (e.g. {'; '.join(shaped[:_EXAMPLES])})")
    hint = (
        f"The checkpoint looks like '{guess}': pass arch='{guess}' or leave arch out to infer it."
        if guess and guess != arch
        else "Check that arch names the network this checkpoint was trained with, or leave arch out to "
        "infer it."
    )
    return f"{where}: checkpoint does not match architecture '{arch}': {'; '.join(parts)}. {hint}"


def load_checkpoint(
    path: str | Path, arch: str | None = None, num_classes: int | None = None
) -> LoadedCheckpoint:
    """Build the checkpoint's model (inferred, or `arch` when given) and load its weights strictly.

    `num_classes`, when given, must equal the checkpoint's class count: this loader never silently
    re-initialises a head (the official loader does, and prints a warning that is easy to miss)."""
    from centernet_edge.export.models import ARCHITECTURES, build_model

    path, raw = _read(path)
    sd = raw.state_dict
    where = str(path)
    if arch is not None and arch not in ARCHITECTURES:
        raise CheckpointError(f"unknown arch '{arch}'; choose one of: {', '.join(sorted(ARCHITECTURES))}")

    try:
        guess: ArchitectureGuess | None = infer_architecture(sd, where=where)
    except CheckpointError:
        if arch is None:
            raise
        guess = None
    heads = _find_heads(sd)
    ckpt_classes = heads.num_classes if heads else None
    if num_classes is not None and ckpt_classes is not None and num_classes != ckpt_classes:
        raise CheckpointError(
            f"{where}: the checkpoint has {ckpt_classes} classes (heatmap head output channels) but "
            f"num_classes={num_classes} was requested. Leave num_classes out to use the checkpoint's "
            "classes; a different class count needs a re-trained heatmap head."
        )

    target = arch if arch is not None else guess.arch if guess else ""  # guess is set when arch is None
    spec = ARCHITECTURES[target]
    classes = num_classes or ckpt_classes or 80
    head_conv = heads.head_conv if heads else None
    try:
        model = build_model(target, num_classes=classes, head_conv=head_conv)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{where}: cannot build '{target}' with head_conv={head_conv}: {exc}") from exc
    expected = model.state_dict()
    dropped = _droppable(sd, expected)
    usable = {k: v for k, v in sd.items() if k not in dropped}
    problem = _mismatch_message(where, target, usable, expected, guess.arch if guess else None)
    if problem:
        raise CheckpointError(problem)
    defaulted = tuple(k for k in expected if k not in usable)
    for key in defaulted:
        usable[key] = expected[key]
    model.load_state_dict(usable, strict=True)
    model.eval()

    if guess is None or guess.arch != target:
        guess = ArchitectureGuess(
            target, spec.source, spec.family, spec.depth, spec.has_dcn, classes, head_conv
        )
    info = _info(path, raw, guess, dropped)
    return LoadedCheckpoint(
        model=model,
        arch=target,
        source=spec.source,
        num_classes=classes,
        head_conv=head_conv,
        has_dcn=spec.has_dcn,
        sha256=info.sha256,
        dropped_keys=dropped,
        info=info,
        defaulted_keys=defaulted,
    )
