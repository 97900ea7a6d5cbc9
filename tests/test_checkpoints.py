"""Checkpoint reading: containers, architecture inference, strict loading and the bad-file corpus."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from centernet_edge.export import checkpoints
from centernet_edge.export.checkpoints import (
    CheckpointError,
    infer_architecture,
    inspect_checkpoint,
    load_checkpoint,
)
from centernet_edge.export.models import ARCHITECTURES, build_model

# Built and saved for real (hourglass is covered by shape-only inference below: it takes seconds to build).
ROUND_TRIP = ["res_18", "resdcn_18", "dla_34", "mmdet_r18", "mmdet_r18_dcnv2", "res_50"]


def _random_state(arch: str, num_classes: int = 80, head_conv: int | None = None, seed: int = 0) -> dict:
    """A state_dict with every float tensor random, so equality checks cannot pass by initialisation."""
    gen = torch.Generator().manual_seed(seed)
    sd = build_model(arch, num_classes=num_classes, head_conv=head_conv).state_dict()
    out = {}
    for key, value in sd.items():
        if value.is_floating_point():
            value = torch.rand(value.shape, generator=gen) + (0.5 if key.endswith("running_var") else 0.0)
        out[key] = value.clone()
    return out


def _container(arch: str, sd: dict) -> dict:
    if ARCHITECTURES[arch].source == "mmdet":
        return {
            "meta": {"mmdet_version": "2.14.0", "CLASSES": tuple(f"c{i}" for i in range(80))},
            "state_dict": sd,
        }
    return {"epoch": 140, "state_dict": sd}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for arch in ROUND_TRIP:
        sd = _random_state(arch)
        path = root / f"{arch}.pth"
        torch.save(_container(arch, sd), path)
        out[arch] = (path, sd)
    return out


def _meta_state(arch: str, **kwargs: int) -> dict:
    with torch.device("meta"):
        return build_model(arch, **kwargs).state_dict()


@pytest.mark.parametrize("arch", ROUND_TRIP)
def test_round_trip_infers_and_loads_exactly(saved, arch: str) -> None:
    path, sd = saved[arch]
    spec = ARCHITECTURES[arch]
    loaded = load_checkpoint(path)
    assert (loaded.arch, loaded.source, loaded.num_classes, loaded.has_dcn) == (
        arch,
        spec.source,
        80,
        spec.has_dcn,
    )
    assert loaded.head_conv == spec.default_head_conv
    assert loaded.dropped_keys == () and loaded.defaulted_keys == ()
    assert loaded.sha256 == checkpoints.file_sha256(path) and len(loaded.sha256) == 64
    assert not loaded.model.training
    got = loaded.model.state_dict()
    assert got.keys() == sd.keys()
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    info = loaded.info
    assert info.container == spec.source and info.epoch == (140 if spec.source == "official" else None)
    assert info.depth == spec.depth and info.num_tensors == len(sd) and not info.module_prefix
    if spec.source == "mmdet":
        assert info.class_names is not None and info.class_names[:2] == ("c0", "c1")


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_inference_from_shapes_for_every_architecture(arch: str) -> None:
    spec = ARCHITECTURES[arch]
    guess = infer_architecture(_meta_state(arch))
    assert (guess.arch, guess.source, guess.depth, guess.has_dcn) == (
        arch,
        spec.source,
        spec.depth,
        spec.has_dcn,
    )
    assert (guess.num_classes, guess.head_conv) == (80, spec.default_head_conv)
    custom = infer_architecture(_meta_state(arch, num_classes=16, head_conv=32))
    assert (custom.arch, custom.num_classes, custom.head_conv) == (arch, 16, 32)
    if spec.family not in ("mmdet", "hourglass"):  # official --head_conv 0: one 1x1 conv per head
        single = infer_architecture(_meta_state(arch, num_classes=20, head_conv=0))
        assert (single.arch, single.num_classes, single.head_conv) == (arch, 20, 0)


def test_official_keys_match_documented_layout() -> None:
    # shared/data/SOURCES.md: tensor counts of the official models.
    assert {a: len(_meta_state(a)) for a in ("res_18", "resdcn_18", "dla_34")} == {
        "res_18": 150,
        "resdcn_18": 177,
        "dla_34": 398,
    }


def test_legacy_serialization_and_bare_state_dict(saved, tmp_path: Path) -> None:
    _, sd = saved["resdcn_18"]
    legacy = tmp_path / "legacy.pth"  # the official files were written by PyTorch 0.4.1 (pre-zip format)
    torch.save({"epoch": 1, "state_dict": sd}, legacy, _use_new_zipfile_serialization=False)
    loaded = load_checkpoint(legacy)
    assert loaded.arch == "resdcn_18" and loaded.info.container == "official"
    assert torch.equal(loaded.model.state_dict()["deconv_layers.0.bias"], sd["deconv_layers.0.bias"])
    bare = tmp_path / "bare.pth"
    torch.save(sd, bare)
    assert inspect_checkpoint(bare).container == "bare"


def test_module_prefix_is_stripped(saved, tmp_path: Path) -> None:
    _, sd = saved["res_18"]
    path = tmp_path / "dp.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    loaded = load_checkpoint(path)
    assert loaded.arch == "res_18" and loaded.info.module_prefix
    assert torch.equal(loaded.model.state_dict()["hm.2.bias"], sd["hm.2.bias"])


def test_base_fc_is_dropped(saved, tmp_path: Path) -> None:
    _, sd = saved["dla_34"]
    path = tmp_path / "dla_2x_like.pth"
    extra = {"base.fc.weight": torch.randn(1000, 512, 1, 1), "base.fc.bias": torch.randn(1000)}
    torch.save({"epoch": 230, "state_dict": {**sd, **extra}}, path)
    info = inspect_checkpoint(path)
    assert info.arch == "dla_34" and info.num_tensors == 400 and info.dropped_keys == tuple(extra)
    loaded = load_checkpoint(path)
    assert loaded.dropped_keys == ("base.fc.weight", "base.fc.bias")
    assert "base.fc.weight" not in loaded.model.state_dict()


def test_missing_bn_counters_are_defaulted(saved, tmp_path: Path) -> None:
    _, sd = saved["mmdet_r18"]
    path = tmp_path / "old.pth"
    kept = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save({"meta": {}, "state_dict": kept}, path)
    loaded = load_checkpoint(path)
    assert len(loaded.defaulted_keys) == len(sd) - len(kept) > 0
    assert all(k.endswith("num_batches_tracked") for k in loaded.defaulted_keys)


@pytest.mark.parametrize(("arch", "classes", "head_conv"), [("res_18", 20, 64), ("mmdet_r18_dcnv2", 16, 32)])
def test_custom_heads(tmp_path: Path, arch: str, classes: int, head_conv: int) -> None:
    sd = _random_state(arch, num_classes=classes, head_conv=head_conv)
    path = tmp_path / "custom.pth"
    torch.save(_container(arch, sd), path)
    loaded = load_checkpoint(path)
    assert (loaded.arch, loaded.num_classes, loaded.head_conv) == (arch, classes, head_conv)
    out = loaded.model(torch.zeros(1, 3, 64, 64))
    assert [tuple(t.shape) for t in out] == [(1, classes, 16, 16), (1, 2, 16, 16), (1, 2, 16, 16)]
    assert load_checkpoint(path, num_classes=classes).num_classes == classes
    with pytest.raises(CheckpointError, match=rf"has {classes} classes .* but num_classes=80 was requested"):
        load_checkpoint(path, num_classes=80)


def test_explicit_arch_overrides_and_mismatch_is_explained(saved) -> None:
    path, _ = saved["resdcn_18"]
    assert load_checkpoint(path, arch="resdcn_18").arch == "resdcn_18"
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, arch="res_18")
    ckpt, model = _meta_state("resdcn_18"), _meta_state("res_18")
    missing = [k for k in model if k not in ckpt]
    unexpected = [k for k in ckpt if k not in model]
    shaped = [k for k in model if k in ckpt and model[k].shape != ckpt[k].shape]
    msg = str(err.value)
    assert "does not match architecture 'res_18'" in msg
    # res_18's deconv indices are a subset of resdcn_18's: nothing is missing, the rest is named.
    assert missing == [] and "missing keys" not in msg
    assert f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]}" in msg
    assert f"{len(shaped)} mis-shaped keys" in msg
    first = shaped[0]
    assert f"{first}: checkpoint {tuple(ckpt[first].shape)} vs model {tuple(model[first].shape)}" in msg
    assert "looks like 'resdcn_18': pass arch='resdcn_18'" in msg
    with pytest.raises(CheckpointError, match="unknown arch 'resnet18'; choose one of: .*res_18"):
        load_checkpoint(path, arch="resnet18")


def test_always_weights_only(saved, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "load", spy)
    load_checkpoint(saved["res_18"][0])
    assert calls == [{"map_location": "cpu", "weights_only": True}]


# --- the bad-checkpoint corpus -------------------------------------------------------------------------


class _Custom:
    def __init__(self) -> None:
        self.weights = [1.0]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch_zip", "torch_legacy", "raw_pickle"])
def test_code_executing_pickle_is_refused_not_run(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    payload = {"epoch": 1, "state_dict": _Evil(marker)}
    if how == "raw_pickle":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=how == "torch_zip")
    with pytest.raises(
        CheckpointError, match=r"refusing to load: the file pickles arbitrary Python objects \(posix\.system"
    ):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        inspect_checkpoint(path)
    assert not marker.exists()


def test_custom_class_and_whole_model_pickles_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "custom.pth"
    torch.save({"epoch": 1, "state_dict": _Custom()}, path)
    with pytest.raises(CheckpointError, match=r"arbitrary Python objects \([\w.]*_Custom\).*state_dict\(\)"):
        load_checkpoint(path)
    torch.save(torch.nn.Linear(2, 2), path)  # torch.save(model) instead of model.state_dict()
    with pytest.raises(
        CheckpointError, match=r"arbitrary Python objects \(.*torch\.nn\.modules\.linear\.Linear"
    ):
        load_checkpoint(path)


def _safetensors_bytes() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    return struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, 2.0)


def _truncated_zip(tmp_path: Path, sd: dict) -> bytes:
    torch.save({"epoch": 1, "state_dict": sd}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    return data[: len(data) // 2]


def _truncated_legacy(tmp_path: Path, sd: dict) -> bytes:
    torch.save({"epoch": 1, "state_dict": sd}, tmp_path / "full.pth", _use_new_zipfile_serialization=False)
    data = (tmp_path / "full.pth").read_bytes()
    return data[: len(data) // 2]


def _npz(tmp_path: Path, sd: dict) -> bytes:
    np.savez(tmp_path / "arrays.npz", a=np.zeros(3))
    return (tmp_path / "arrays.npz").read_bytes()


def _torch_bytes(obj: object) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _poisoned(sd: dict, key: str, value: float) -> bytes:
    bad = {k: v.clone() for k, v in sd.items()}
    bad[key].view(-1)[[0, -1]] = value
    return _torch_bytes({"epoch": 1, "state_dict": bad})


CORPUS = {
    "nan_weights": (
        lambda tmp, sd: _poisoned(sd, "layer2.0.conv1.weight", float("nan")),
        r"tensor 'layer2.0.conv1.weight' holds 2 NaN and 0 Inf value\(s\) of 73728; the weights are corrupt",
    ),
    "inf_weights": (
        lambda tmp, sd: _poisoned(sd, "hm.2.bias", float("-inf")),
        r"tensor 'hm.2.bias' holds 0 NaN and 2 Inf value\(s\) of 80",
    ),
    "empty": (lambda tmp, sd: b"", r"the file is empty \(0 bytes\); the download probably failed"),
    "random": (
        lambda tmp, sd: bytes(np.random.default_rng(0).integers(1, 0x50, 4096, dtype=np.uint8)),
        r"not a PyTorch checkpoint: unrecognised content \(starts with [0-9a-f]{16}\)",
    ),
    "random_after_pickle_proto": (
        lambda tmp, sd: b"\x80\x02" + b"\xff" * 512,
        r"neither a torch.save ZIP archive nor a valid pickle",
    ),
    "truncated_zip": (_truncated_zip, r"truncated or corrupted \(\d+ bytes\).*Download it again"),
    "truncated_legacy": (_truncated_legacy, r"truncated or corrupted \(\d+ bytes\).*Download it again"),
    "safetensors": (
        lambda tmp, sd: _safetensors_bytes(),
        r"is a safetensors file .*safetensors.torch.load_file",
    ),
    "hdf5": (lambda tmp, sd: b"\x89HDF\r\n\x1a\n" + b"\0" * 64, r"an HDF5 file \(e.g. a Keras .h5 model\)"),
    "npz": (_npz, r"a ZIP archive without data.pkl \(e.g. a NumPy .npz\)"),
    "list": (
        lambda tmp, sd: _torch_bytes([1, 2, 3]),
        r"holds a list, not a checkpoint; expected a dict like",
    ),
    "plain_pickle": (
        lambda tmp, sd: pickle.dumps([1, 2], protocol=5),
        r"a plain Python pickle, not a torch.save",
    ),
    "no_state_dict": (
        lambda tmp, sd: _torch_bytes({"epoch": 3, "model": "x"}),
        r"a dict with keys \['epoch', 'model'\] but no 'state_dict' and no tensors",
    ),
    "non_tensor_entries": (
        lambda tmp, sd: _torch_bytes({"epoch": 3, "state_dict": {"conv1.weight": [1.0]}}),
        r"state_dict entries that are not tensors: conv1.weight",
    ),
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_bad_checkpoint_corpus(saved, tmp_path: Path, case: str) -> None:
    make, message = CORPUS[case]
    path = tmp_path / f"{case}.pth"
    path.write_bytes(make(tmp_path, saved["res_18"][1]))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):
        inspect_checkpoint(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file; check the path or download it first"):
        load_checkpoint(tmp_path / "absent.pth")
    with pytest.raises(CheckpointError, match="is a directory; pass the .pth file inside it"):
        load_checkpoint(tmp_path)
    assert issubclass(CheckpointError, ValueError)


def test_unsupported_variants_are_named() -> None:
    dla = {k: v for k, v in _meta_state("dla_34").items() if "conv_offset_mask" not in k}
    with pytest.raises(CheckpointError, match="recognised 'dlav0_34', which this toolkit does not build"):
        infer_architecture(dla)
    r50 = {
        f"backbone.{k}": v
        for k, v in _meta_state("res_50").items()
        if k.startswith(("conv1", "bn1", "layer"))
    }
    head = {k: v for k, v in _meta_state("mmdet_r18").items() if not k.startswith("backbone.")}
    with pytest.raises(CheckpointError, match="recognised 'mmdet_r50'"):
        infer_architecture({**r50, **head})
    with pytest.raises(CheckpointError, match=r"No CenterNet heads .* Found: fc.\* \(2 tensors\)"):
        infer_architecture({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)})


def test_foreign_mobilenet_checkpoint_is_unsupported(shared_data: Path) -> None:
    path = shared_data / "weights" / "moviebat_centernet_mbv2trunc_16cls_model_best.pth"
    if not path.exists():
        pytest.skip("moviebat checkpoint not available")
    expected = (
        r"unsupported architecture: unknown backbone \(features\.\*: a MobileNet-style trunk with depthwise "
        r"convolutions\)\. It has CenterNet heads hm/wh/reg \(16 classes, "
        r"head_conv 64, head input 24 channels\), but the backbone is not one this toolkit builds\. "
        r"Found: features\.\* \(54 tensors\), hm\.\* \(4 tensors\), reg\.\* \(4 tensors\), "
        r"wh\.\* \(4 tensors\)"
    )
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=expected):
        inspect_checkpoint(path)
    # An explicit arch is tried and fails on keys, not silently half-loaded.
    with pytest.raises(CheckpointError, match=r"does not match architecture 'res_18': \d+ missing keys"):
        load_checkpoint(path, arch="res_18")
