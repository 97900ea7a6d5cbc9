"""CenterNet architectures: state-dict layouts of the originals, forward shapes, ONNX export."""

from __future__ import annotations

import io
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from centernet_edge.export.models import (
    ARCHITECTURES,
    DCN,
    build_model,
    count_macs,
    count_parameters,
)

ALL = list(ARCHITECTURES)


def _meta(arch: str, **kw) -> nn.Module:
    # Shape-only construction: hourglass_104 alone would allocate ~760 MB of random weights.
    with torch.device("meta"):
        return build_model(arch, **kw)


def _shapes(arch: str, **kw) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _meta(arch, **kw).state_dict().items()}


# Tensor counts of the official model code (shared/data/SOURCES.md); dla_34 excludes base.fc.
@pytest.mark.parametrize(("arch", "count"), [("res_18", 150), ("resdcn_18", 177), ("dla_34", 398)])
def test_official_tensor_counts(arch, count):
    assert len(_shapes(arch)) == count


@pytest.mark.parametrize("arch", ALL)
def test_registry_matches_built_model(arch):
    info = ARCHITECTURES[arch]
    shapes = _shapes(arch)
    hm, wh, reg = info.head_names
    first_hm = next(k for k in shapes if k.startswith(hm + ".") and k.endswith("weight"))
    assert shapes[first_hm][1] == info.head_in_channels
    assert shapes[first_hm][0] == info.default_head_conv
    assert any(k.startswith(wh + ".") for k in shapes) and any(k.startswith(reg + ".") for k in shapes)
    assert info.has_dcn == any("conv_offset" in k for k in shapes)
    assert info.keep_res_pad == (127 if info.family == "hourglass" else 31)
    assert info.input_multiple == info.keep_res_pad + 1
    assert info.source == ("mmdet" if info.family == "mmdet" else "official")


def test_official_resnet_layouts():
    res = _shapes("res_18")
    assert res["conv1.weight"] == (64, 3, 7, 7)
    assert res["layer4.1.bn2.running_var"] == (512,)
    assert res["deconv_layers.0.weight"] == (512, 256, 4, 4)  # ConvTranspose: (in, out, k, k)
    assert res["deconv_layers.6.weight"] == (256, 256, 4, 4)
    assert res["deconv_layers.7.running_mean"] == (256,)
    assert "deconv_layers.0.bias" not in res and max(int(k.split(".")[1]) for k in res if
                                                      k.startswith("deconv_layers")) == 7
    assert res["hm.0.weight"] == (64, 256, 3, 3) and res["hm.2.weight"] == (80, 64, 1, 1)
    assert res["wh.2.weight"] == (2, 64, 1, 1) and res["reg.2.weight"] == (2, 64, 1, 1)
    # msra_resnet registers heads in sorted() order.
    assert [k for k in res if k.endswith(".2.bias")] == ["hm.2.bias", "reg.2.bias", "wh.2.bias"]

    dcn = _shapes("resdcn_18")
    assert dcn["deconv_layers.0.weight"] == (256, 512, 3, 3)
    assert dcn["deconv_layers.0.bias"] == (256,)
    assert dcn["deconv_layers.0.conv_offset_mask.weight"] == (27, 512, 3, 3)
    assert dcn["deconv_layers.6.conv_offset_mask.bias"] == (27,)
    assert dcn["deconv_layers.12.weight"] == (64, 128, 3, 3)
    assert dcn["deconv_layers.15.weight"] == (64, 64, 4, 4)
    assert dcn["deconv_layers.16.running_var"] == (64,)
    assert dcn["hm.0.weight"] == (64, 64, 3, 3) and dcn["hm.2.weight"] == (80, 64, 1, 1)
    assert [k for k in dcn if k.endswith(".2.bias")] == ["hm.2.bias", "wh.2.bias", "reg.2.bias"]
    assert _shapes("resdcn_101")["deconv_layers.0.conv_offset_mask.weight"] == (27, 2048, 3, 3)


def test_dla34_layout():
    dla = _shapes("dla_34")
    assert dla["base.base_layer.0.weight"] == (16, 3, 7, 7)
    assert dla["base.level1.0.weight"] == (32, 16, 3, 3)
    assert dla["base.level3.tree1.root.conv.weight"] == (128, 256, 1, 1)
    assert dla["base.level3.tree2.root.conv.weight"] == (128, 448, 1, 1)  # 2*128 + 64 (level_root) + 128
    assert dla["base.level5.project.0.weight"] == (512, 256, 1, 1)
    assert not any(k.startswith("base.fc") for k in dla)
    assert dla["dla_up.ida_0.proj_1.conv.conv_offset_mask.weight"] == (27, 512, 3, 3)
    assert dla["dla_up.ida_0.proj_1.actf.0.weight"] == (256,)
    assert dla["dla_up.ida_2.up_3.weight"] == (64, 1, 4, 4)
    assert dla["ida_up.up_2.weight"] == (64, 1, 8, 8)
    assert dla["ida_up.node_2.conv.weight"] == (64, 64, 3, 3)
    assert dla["hm.0.weight"] == (256, 64, 3, 3) and dla["hm.2.weight"] == (80, 256, 1, 1)


def test_hourglass_layout():
    hg = _shapes("hourglass_104")
    assert hg["pre.0.conv.weight"] == (128, 3, 7, 7)
    assert hg["pre.1.skip.0.weight"] == (256, 128, 1, 1)
    assert hg["kps.1.low1.0.conv1.weight"] == (256, 256, 3, 3)
    assert hg["kps.0.low2.low1.0.conv1.weight"] == (384, 256, 3, 3)
    assert hg["kps.0.low2.low2.low2.low2.low2.3.conv2.weight"] == (512, 512, 3, 3)
    assert hg["inters_.0.0.weight"] == (256, 256, 1, 1) and "inters_.1.0.weight" not in hg
    assert hg["hm.0.0.conv.weight"] == (256, 256, 3, 3) and hg["hm.0.0.conv.bias"] == (256,)
    assert hg["hm.1.1.weight"] == (80, 256, 1, 1) and hg["reg.1.1.weight"] == (2, 256, 1, 1)
    assert not any(".bn." in k for k in hg if k.startswith(("hm.", "wh.", "reg.")))


def test_mmdet_layouts():
    dcn = _shapes("mmdet_r18_dcnv2")
    assert dcn["backbone.layer4.0.downsample.0.weight"] == (512, 256, 1, 1)
    assert dcn["neck.deconv_layers.0.conv.weight"] == (256, 512, 3, 3)
    assert dcn["neck.deconv_layers.0.conv.conv_offset.weight"] == (27, 512, 3, 3)
    assert "neck.deconv_layers.0.conv.bias" not in dcn
    assert dcn["neck.deconv_layers.1.conv.weight"] == (256, 256, 4, 4)
    assert dcn["neck.deconv_layers.5.bn.running_mean"] == (64,)
    assert dcn["bbox_head.heatmap_head.0.weight"] == (64, 64, 3, 3)
    assert dcn["bbox_head.heatmap_head.2.weight"] == (80, 64, 1, 1)
    assert dcn["bbox_head.offset_head.2.bias"] == (2,)
    plain = _shapes("mmdet_r18")
    assert plain["neck.deconv_layers.4.conv.weight"] == (64, 128, 3, 3)
    assert not any("conv_offset" in k for k in plain)


def test_resdcn18_maps_one_to_one_onto_mmdet_dcnv2():
    """REFERENCE §6.2: only the DCN bias (foldable into the next BN) and the naming differ."""
    official, mmdet = _shapes("resdcn_18"), _shapes("mmdet_r18_dcnv2")
    heads = {"hm.": "bbox_head.heatmap_head.", "wh.": "bbox_head.wh_head.", "reg.": "bbox_head.offset_head."}
    stage = {0: "0.conv", 1: "0.bn", 3: "1.conv", 4: "1.bn"}
    mapped = {}
    for key, shape in official.items():
        if key.startswith("deconv_layers."):
            _, idx, rest = key.split(".", 2)
            s, j = divmod(int(idx), 6)
            if j == 0 and rest == "bias":
                continue
            rest = rest.replace("conv_offset_mask", "conv_offset")
            key = f"neck.deconv_layers.{2 * s + int(stage[j][0])}.{stage[j][2:]}.{rest}"
        elif key.startswith(tuple(heads)):
            prefix = key.split(".")[0] + "."
            key = heads[prefix] + key[len(prefix):]
        else:
            key = "backbone." + key
        mapped[key] = shape
    assert mapped == mmdet


def test_parameter_counts_match_published_sizes():
    # res18 CenterNet ~15.8M; mmdet CenterNet-R18 (no DCN) ~14.2M.
    assert count_parameters(_meta("res_18")) / 1e6 == pytest.approx(15.8, abs=0.05)
    assert count_parameters(_meta("mmdet_r18")) / 1e6 == pytest.approx(14.2, abs=0.05)
    assert count_parameters(_meta("resdcn_18")) > count_parameters(_meta("mmdet_r18"))


def test_head_initialisation():
    official = build_model("res_18")
    torch.testing.assert_close(official.hm[2].bias, torch.full((80,), -2.19))
    mmdet = build_model("mmdet_r18")
    prior = -math.log((1 - 0.1) / 0.1)  # mmcv bias_init_with_prob(0.1)
    torch.testing.assert_close(mmdet.bbox_head.heatmap_head[2].bias, torch.full((80,), prior))


def test_num_classes_and_head_conv_arguments():
    assert _shapes("dla_34", num_classes=20)["hm.2.weight"] == (20, 256, 1, 1)
    assert _shapes("res_18", head_conv=128)["wh.0.weight"] == (128, 256, 3, 3)
    single = _shapes("resdcn_18", head_conv=0)
    assert single["hm.weight"] == (80, 64, 1, 1) and "hm.0.weight" not in single
    assert _shapes("mmdet_r18", num_classes=3)["bbox_head.heatmap_head.2.weight"] == (3, 64, 1, 1)
    with pytest.raises(ValueError, match="mmdet_r18 has no single-conv head"):
        build_model("mmdet_r18", head_conv=0)


def test_unknown_arch_lists_known():
    with pytest.raises(ValueError, match=r"unknown architecture 'res_19'; known: .*res_18.*dla_34.*mmdet_r18"):
        build_model("res_19")


# One of each module family (the other depths only change block counts, covered by the layout tests).
@pytest.mark.parametrize("arch", ["res_18", "resdcn_18", "res_50", "dla_34", "mmdet_r18", "mmdet_r18_dcnv2"])
def test_forward_shapes(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    assert isinstance(out, tuple) and len(out) == 3
    assert [tuple(t.shape) for t in out] == [(2, 5, 16, 24), (2, 2, 16, 24), (2, 2, 16, 24)]
    assert all(torch.isfinite(t).all() for t in out)


def test_hourglass_forward_shape():
    torch.manual_seed(0)
    model = build_model("hourglass_104", num_classes=3).eval()
    with torch.no_grad():
        hm, wh, reg = model(torch.randn(1, 3, 128, 128))
    assert hm.shape == (1, 3, 32, 32) and wh.shape == reg.shape == (1, 2, 32, 32)


def _randomise(model: nn.Module) -> nn.Module:
    """Non-trivial weights everywhere (DCN offsets start at zero, regression heads near zero)."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "conv_offset" in name:
                p.normal_(0, 0.02)
            elif name.startswith(("wh.", "reg.")) or ".wh_head." in name or ".offset_head." in name:
                p.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize(("arch", "deform_nodes"), [("resdcn_18", 3), ("dla_34", 16), ("mmdet_r18_dcnv2", 3)])
def test_onnx_export_matches_torch(arch, deform_nodes):
    model = _randomise(build_model(arch, num_classes=4))
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), buf, dynamo=False, opset_version=19,
                      input_names=["input"], output_names=["hm", "wh", "reg"],
                      dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}})
    graph = onnx.load_from_string(buf.getvalue()).graph
    assert sum(n.op_type == "DeformConv" for n in graph.node) == deform_nodes
    assert not any(n.domain not in ("", "ai.onnx") for n in graph.node)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 96, 64)  # a different size than the export trace
    with torch.no_grad():
        want = model(x)
    got = sess.run(None, {"input": x.numpy()})
    for g, w in zip(got, want, strict=True):
        assert g.shape == tuple(w.shape)
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-3, atol=1e-4 * max(1.0, float(w.abs().max())))


def test_count_macs_is_analytic():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1))
    assert count_macs(conv, (16, 16)) == 16 * 16 * 8 * 3 * 9 + 16 * 16 * 8 * 4 * 16
    dcn = nn.Sequential(nn.Conv2d(3, 6, 1), DCN(6, 5))
    # main 3x3 conv + the 27-channel offset/mask conv
    assert count_macs(dcn, (8, 8)) == 64 * 6 * 3 + 64 * 5 * 6 * 9 + 64 * 27 * 6 * 9
    assert count_parameters(dcn) == 6 * 3 + 6 + 5 * 6 * 9 + 5 + 27 * 6 * 9 + 27
