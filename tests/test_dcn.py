"""DCNv2 in plain PyTorch: numerics against a naive loop, and export as one ONNX DeformConv node."""

from __future__ import annotations

import io
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from centernet_edge.export.models.dcn import (
    DCN,
    ModulatedDeformConv2dPack,
    decomposed_deform_conv,
    modulated_deform_conv2d,
)


def _bilinear_zero_outside(img: np.ndarray, y: float, x: float) -> float:
    """DCNv2's dmcn_im2col_bilinear: corners outside the image read 0; points beyond (-1, H) read 0."""
    h, w = img.shape
    if not (-1 < y < h and -1 < x < w):
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    total = 0.0
    for yy, xx, wt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                       (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
        if 0 <= yy < h and 0 <= xx < w:
            total += wt * img[yy, xx]
    return total


def _naive(x, offset, mask, weight, bias, stride, pad, dil, groups):
    n, c, h, w = x.shape
    co, _, kh, kw = weight.shape
    oh = (h + 2 * pad - dil * (kh - 1) - 1) // stride + 1
    ow = (w + 2 * pad - dil * (kw - 1) - 1) // stride + 1
    cpg = c // groups
    out = np.zeros((n, co, oh, ow), np.float64)
    for b in range(n):
        for oy in range(oh):
            for ox in range(ow):
                cols = np.zeros((c, kh, kw))
                for ci in range(c):
                    gi = ci // cpg
                    for i in range(kh):
                        for j in range(kw):
                            k = i * kw + j
                            dy = offset[b, gi * 2 * kh * kw + 2 * k, oy, ox]
                            dx = offset[b, gi * 2 * kh * kw + 2 * k + 1, oy, ox]
                            m = mask[b, gi * kh * kw + k, oy, ox]
                            py = oy * stride - pad + i * dil + dy
                            px = ox * stride - pad + j * dil + dx
                            cols[ci, i, j] = m * _bilinear_zero_outside(x[b, ci], py, px)
                out[b, :, oy, ox] = np.tensordot(weight, cols, axes=3) + (0 if bias is None else bias)
    return out


CASES = [
    # (c_in, c_out, h, w, stride, pad, dil, groups, offset_scale)
    (3, 4, 6, 7, 1, 1, 1, 1, 2.0),
    (4, 5, 7, 6, 2, 1, 1, 2, 3.0),
    (2, 3, 8, 8, 1, 2, 2, 1, 1.5),
    (2, 2, 1, 1, 1, 1, 1, 1, 0.7),  # 1x1 map: grid_sample-style normalisation would divide by zero
]


@pytest.mark.parametrize("case", CASES)
def test_matches_naive_dcnv2(case):
    c_in, c_out, h, w, s, p, d, g, scale = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    x = torch.randn(2, c_in, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(c_out, c_in, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(c_out, generator=gen, dtype=torch.float64)
    oh = (h + 2 * p - d * 2 - 1) // s + 1
    ow = (w + 2 * p - d * 2 - 1) // s + 1
    # Large offsets push many taps fully or partly outside the image.
    offset = torch.randn(2, 2 * g * 9, oh, ow, generator=gen, dtype=torch.float64) * scale
    mask = torch.rand(2, g * 9, oh, ow, generator=gen, dtype=torch.float64)
    got = modulated_deform_conv2d(x, offset, mask, weight, bias, s, p, d, g)
    want = _naive(*(t.numpy() for t in (x, offset, mask, weight, bias)), s, p, d, g)
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want, atol=1e-9, rtol=1e-9)
    got32 = modulated_deform_conv2d(*(t.float() for t in (x, offset, mask, weight, bias)), s, p, d, g)
    np.testing.assert_allclose(got32.numpy(), want, atol=1e-5, rtol=1e-5)


def test_integer_offsets_reduce_to_shifted_conv():
    x = torch.randn(1, 3, 8, 8)
    weight = torch.randn(4, 3, 3, 3)
    offset = torch.zeros(1, 18, 8, 8)
    offset[:, 1::2] = 1.0  # every tap moves one pixel right
    mask = torch.ones(1, 9, 8, 8)
    got = modulated_deform_conv2d(x, offset, mask, weight, None)
    # Reading column x+j instead of x-1+j is a plain conv over an input padded 0 left / 2 right.
    want = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 2, 1, 1)), weight)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bad_offset_shape_is_reported():
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match=r"offset has shape \(1, 9, 5, 5\), expected \(1, 18, 5, 5\)"):
        modulated_deform_conv2d(x, torch.zeros(1, 9, 5, 5), torch.ones(1, 9, 5, 5), torch.zeros(3, 2, 3, 3), None)


def test_module_key_names():
    assert list(DCN(8, 4).state_dict()) == [
        "weight", "bias", "conv_offset_mask.weight", "conv_offset_mask.bias"]
    assert DCN(8, 4).conv_offset_mask.weight.shape == (27, 8, 3, 3)
    assert list(ModulatedDeformConv2dPack(8, 4, 3, padding=1, bias=False).state_dict()) == [
        "weight", "conv_offset.weight", "conv_offset.bias"]


def _randomised(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return module.eval()


def _export(module: torch.nn.Module, x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=19, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    return buf.getvalue()


def _ort(model_bytes: bytes, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x.numpy()})[0]


@pytest.mark.parametrize("module", [
    DCN(6, 5, 3, stride=1, padding=1),
    DCN(6, 5, 3, stride=2, padding=1),
    ModulatedDeformConv2dPack(6, 5, 3, padding=1, bias=False),
    ModulatedDeformConv2dPack(6, 5, 3, padding=2, dilation=2, deform_groups=2),
], ids=["dcn", "dcn-s2", "mmcv-nobias", "mmcv-dil2-g2"])
def test_exports_single_deformconv_node(module):
    module = _randomised(module)
    x = torch.randn(1, 6, 12, 10)
    with torch.no_grad():
        want = module(x).numpy()
    model = onnx.load_from_string(_export(module, x))
    deform = [n for n in model.graph.node if n.op_type == "DeformConv"]
    assert len(deform) == 1
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in deform[0].attribute}
    assert attrs["strides"] == [module.stride] * 2
    assert attrs["pads"] == [module.padding] * 4
    assert attrs["dilations"] == [module.dilation] * 2
    assert attrs["kernel_shape"] == [3, 3]
    assert attrs["group"] == 1
    assert len(deform[0].input) == 5  # X, W, offset, B, mask
    assert not any(n.op_type in ("GridSample", "GatherElements") for n in model.graph.node)
    got = _ort(model.SerializeToString(), x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    # The exported graph keeps working at another resolution (nothing was frozen by the placeholder).
    x2 = torch.randn(2, 6, 9, 16)
    with torch.no_grad():
        np.testing.assert_allclose(_ort(model.SerializeToString(), x2), module(x2).numpy(), atol=1e-5, rtol=1e-4)


def test_decomposed_export_has_no_deformconv_and_matches():
    module = _randomised(DCN(4, 3, 3, stride=1, padding=1))
    x = torch.randn(1, 4, 7, 9)
    with decomposed_deform_conv():
        data = _export(module, x)
    ops = {n.op_type for n in onnx.load_from_string(data).graph.node}
    assert "DeformConv" not in ops and "GatherElements" in ops
    with torch.no_grad():
        np.testing.assert_allclose(_ort(data, x), module(x).numpy(), atol=1e-5, rtol=1e-4)
    # Leaving the context restores the single-node export.
    assert "DeformConv" in {n.op_type for n in onnx.load_from_string(_export(module, x)).graph.node}


def test_gradients_flow_through_reference_path():
    module = DCN(3, 2)
    torch.nn.init.normal_(module.conv_offset_mask.weight, std=0.1)
    module(torch.randn(1, 3, 5, 5)).sum().backward()
    assert module.conv_offset_mask.weight.grad is not None and module.weight.grad.abs().sum() > 0
