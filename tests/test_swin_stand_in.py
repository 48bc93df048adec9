"""torchvision's Swin attention through fxquant.traceable.TracedWindowAttention: qkv and proj quantize, the window
bookkeeping (pad, roll, partition, relative position bias, shift mask, merge) stays float in FloatLeaf modules.

Numerics run the stand-in and torchvision's module on the same input (float tolerance); end to end, a small
SwinTransformer whose windows need padding and a shift goes quantize -> convert -> export_onnx -> ONNX Runtime, and
ONNX Runtime must equal the reference int8 graph within one quantization step, layer by layer.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models as M
from torchvision.models import swin_transformer as st

import fxquant
from fxquant.passes import trace_model
from conftest import assert_onnx_matches_int8
from fxquant.stand_ins import stand_in
from fxquant.traceable import FloatLeaf, TracedWindowAttention

ATTENTION = {"v1": st.ShiftedWindowAttention, "v2": st.ShiftedWindowAttentionV2}


pytestmark = pytest.mark.usefixtures("one_thread")


def _attention(version: str, shift: list[int]) -> nn.Module:
    torch.manual_seed(0)
    attn = ATTENTION[version](16, [4, 4], shift, num_heads=2).eval()
    with torch.no_grad():  # torchvision starts some of these at 0 or tiny: make every term count
        attn.qkv.bias.normal_()
        attn.proj.bias.normal_()
        if version == "v1":
            attn.relative_position_bias_table.normal_()
        else:
            attn.logit_scale.uniform_(0.5, 5.0)  # per head; exp(5) > 100 exercises the clamp
    return attn


# (H, W): whole windows; padding on both axes; one window (no shift applies); one row of windows
SIZES = [(8, 8), (6, 10), (4, 4), (3, 9)]


@pytest.mark.parametrize("version", sorted(ATTENTION))
@pytest.mark.parametrize("shift", [[0, 0], [2, 2]], ids=["plain", "shifted"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_stand_in_equals_torchvision_attention(version, shift, size):
    attn = _attention(version, shift)
    traced = stand_in(attn).eval()
    assert isinstance(traced, TracedWindowAttention)
    assert type(traced.qkv) is nn.Linear and type(traced.proj) is nn.Linear
    x = torch.randn(2, *size, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), attn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version", sorted(ATTENTION))
def test_shift_mask_and_relative_bias_change_the_output(version):
    """Guards the test above: with the same weights, dropping the shift (mask, roll) or the bias changes the result."""
    x = torch.randn(2, 8, 8, 16, generator=torch.Generator().manual_seed(1))
    shifted, plain = _attention(version, [2, 2]), _attention(version, [0, 0])
    plain.load_state_dict(shifted.state_dict())
    with torch.no_grad():
        assert (stand_in(shifted)(x) - plain(x)).abs().max() > 1e-2
        unbiased = stand_in(shifted)
        unbiased.bias.relative_position_bias = lambda: torch.zeros(2, 16, 16)
        assert (unbiased(x) - shifted(x)).abs().max() > 1e-2


def test_only_torchvision_swin_attention_gets_the_stand_in():
    class Subclass(st.ShiftedWindowAttention):  # another forward: the stand-in would not be that computation
        pass

    assert stand_in(Subclass(16, [4, 4], [0, 0], 2)) is None
    assert stand_in(nn.Linear(4, 4)) is None


def _swin(version: str) -> nn.Module:
    extra = dict(block=st.SwinTransformerBlockV2, downsample_layer=st.PatchMergingV2) if version == "v2" else {}
    torch.manual_seed(0)
    return M.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                             stochastic_depth_prob=0.0, num_classes=10, **extra).eval()


SIZE = 40  # 10x10 tokens, then 5x5: both padded to whole 4x4 windows, and shifted in every second block


@pytest.mark.parametrize("version", sorted(ATTENTION))
def test_swin_qkv_and_proj_quantize_and_the_model_is_left_alone(version):
    model = _swin(version)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    gm = trace_model(model, example_inputs=(x,), auto_leaf=True)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)
    assert all(type(m) is ATTENTION[version] for n, m in model.named_modules() if n.endswith(".attn"))  # not swapped
    helpers = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), FloatLeaf)]
    assert len(helpers) == 4 * (3 if version == "v1" else 5)  # partition, bias, merge (+ 2 normalize) per block

    qmodel = fxquant.quantize(model, x, calib_data=[x], progress=False)
    rules = {n.target: n.meta["fxquant"] for n in qmodel.graph.nodes if n.op == "call_module" and "fxquant" in n.meta}
    projections = [t for t in rules if t.endswith((".attn.qkv", ".attn.proj"))]
    assert len(projections) == 8 and all(rules[t].kind == "quantize" and rules[t].rule == "linear" for t in projections)
    matmuls = [n for n in qmodel.graph.nodes if n.target is torch.matmul]
    assert len(matmuls) == 8 and all(n.meta["fxquant"].kind == "quantize" for n in matmuls)  # q @ k^T, attn @ v
    rep = fxquant.report(qmodel)
    assert {o.op for o in rep.leaves} == {"_patch_merging_pad"}
    pads = [n for n in qmodel.graph.nodes if getattr(n.target, "__name__", "") == "_patch_merging_pad"]
    float_helpers = [o for o in rep.float_by_rule if o.rule == "float_helpers"]  # float by the table's row, not by accident
    assert len(pads) == 1 and len(float_helpers) == len(helpers) + len(pads)

    whole = fxquant.report(fxquant.quantize(model, x, calib_data=[x], leaf_modules=[ATTENTION[version]], progress=False))
    assert {o.op for o in whole.leaves} == {ATTENTION[version].__name__, "_patch_merging_pad"}  # the old behaviour
    assert len(fxquant.report(qmodel).quantized) >= len(whole.quantized) + 16  # + qkv, proj, two matmuls per block


@pytest.mark.parametrize("version", sorted(ATTENTION))
def test_swin_onnxruntime_agrees_with_reference_int8(version, tmp_path):
    model = _swin(version)
    g = torch.Generator().manual_seed(2)
    example = torch.randn(1, 3, SIZE, SIZE, generator=g)
    calib = [torch.randn(4, 3, SIZE, SIZE, generator=g) for _ in range(2)]
    int8 = fxquant.convert(fxquant.quantize(model, example, calib_data=calib, progress=False))
    path = tmp_path / f"swin_{version}.onnx"
    fxquant.export_onnx(int8, path, example)

    assert_onnx_matches_int8(model, int8, path, torch.randn(3, 3, SIZE, SIZE, generator=g), f"swin {version}")
