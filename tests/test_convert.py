"""official resdcn_18 <-> mmdet r18-dcnv2 conversion: same outputs on the same normalised input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from centernet_edge.export.checkpoints import CheckpointError, load_checkpoint
from centernet_edge.export.convert import convert_checkpoint, mmdet_to_official, official_to_mmdet
from centernet_edge.export.models import build_model


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial BN statistics, DCN biases and offsets, so a wrong fold or offset mapping shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif name.endswith(("running_mean", "bn.bias")) or (name.endswith(".bias") and "deconv" in name):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
            elif name.startswith(("hm.", "wh.", "reg.", "bbox_head.")):  # init leaves wh/reg near zero
                tensor.copy_(
                    torch.randn(tensor.shape, generator=gen) * (0.5 if name.endswith("bias") else 0.05)
                )
            elif "conv_offset" in name:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.05)
            elif name.endswith("weight") and tensor.dim() == 1:
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(7))


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(x)


def _assert_close(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
    for name, x, y in zip(("heatmap", "wh", "reg"), a, b, strict=True):
        scale = float(x.abs().max())
        assert scale > 1e-3, f"{name} is all ~zero: the test would prove nothing"
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5 * max(1.0, scale), msg=name)


def test_official_to_mmdet_same_outputs(image: torch.Tensor) -> None:
    official = _randomise(build_model("resdcn_18"), seed=1)
    assert float(official.state_dict()["deconv_layers.6.bias"].abs().max()) > 0.1
    mmdet = build_model("mmdet_r18_dcnv2").eval()
    converted = official_to_mmdet(official.state_dict())
    mmdet.load_state_dict(converted, strict=True)
    _assert_close(_outputs(official, image), _outputs(mmdet, image))
    # The DCN bias lives on only in the BN mean.
    bias = official.state_dict()["deconv_layers.0.bias"]
    mean = official.state_dict()["deconv_layers.1.running_mean"]
    torch.testing.assert_close(converted["neck.deconv_layers.0.bn.running_mean"], mean - bias)


def test_mmdet_to_official_same_outputs(image: torch.Tensor) -> None:
    mmdet = _randomise(build_model("mmdet_r18_dcnv2"), seed=2)
    official = build_model("resdcn_18").eval()
    converted = mmdet_to_official(mmdet.state_dict())
    official.load_state_dict(converted, strict=True)
    assert all(float(converted[f"deconv_layers.{i}.bias"].abs().max()) == 0 for i in (0, 6, 12))
    _assert_close(_outputs(mmdet, image), _outputs(official, image))
    # Key order follows the official model, so a saved file reads like an official one.
    assert list(converted) == list(official.state_dict())


def test_round_trip_restores_official_up_to_the_fold(image: torch.Tensor) -> None:
    official = _randomise(build_model("resdcn_18"), seed=3)
    back = mmdet_to_official(official_to_mmdet(official.state_dict()))
    reloaded = build_model("resdcn_18").eval()
    reloaded.load_state_dict(back, strict=True)
    _assert_close(_outputs(official, image), _outputs(reloaded, image))


def test_file_conversion_writes_target_containers(tmp_path: Path, image: torch.Tensor) -> None:
    official = _randomise(build_model("resdcn_18", num_classes=20), seed=4)
    src = tmp_path / "ctdet_pascal_resdcn18.pth"
    torch.save({"epoch": 70, "state_dict": {f"module.{k}": v for k, v in official.state_dict().items()}}, src)

    ckpt = convert_checkpoint(src, "mmdet", tmp_path / "mm.pth")
    assert set(ckpt) == {"meta", "state_dict"} and ckpt["meta"]["epoch"] == 70
    loaded = load_checkpoint(tmp_path / "mm.pth")
    assert (loaded.arch, loaded.info.container, loaded.num_classes) == ("mmdet_r18_dcnv2", "mmdet", 20)
    _assert_close(_outputs(official, image), _outputs(loaded.model, image))

    back = convert_checkpoint(tmp_path / "mm.pth", "official", tmp_path / "back.pth")
    assert set(back) == {"epoch", "state_dict"} and back["epoch"] == 70
    again = load_checkpoint(tmp_path / "back.pth")
    assert (again.arch, again.info.container) == ("resdcn_18", "official")
    _assert_close(_outputs(official, image), _outputs(again.model, image))


def test_only_the_identical_pair_converts(tmp_path: Path) -> None:
    path = tmp_path / "res18.pth"
    torch.save({"epoch": 1, "state_dict": build_model("res_18").state_dict()}, path)
    with pytest.raises(CheckpointError, match="is 'res_18'; conversion to mmdet needs 'resdcn_18'"):
        convert_checkpoint(path, "mmdet")
    mm = {"meta": {}, "state_dict": build_model("mmdet_r18").state_dict()}
    with pytest.raises(
        CheckpointError, match="is 'mmdet_r18'; conversion to official needs 'mmdet_r18_dcnv2'"
    ):
        convert_checkpoint(mm, "official")
    with pytest.raises(ValueError, match="to must be 'mmdet' or 'official'"):
        convert_checkpoint(mm, "onnx")  # type: ignore[arg-type]
    extra = {**build_model("resdcn_18").state_dict(), "fc.weight": torch.zeros(2, 2)}
    with pytest.raises(CheckpointError, match="1 keys have no counterpart \\(e.g. fc.weight\\)"):
        official_to_mmdet(extra)
