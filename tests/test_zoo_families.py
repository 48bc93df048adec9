"""One model per torchvision classification family, small, through quantize -> convert -> export_onnx ->
ONNX Runtime; ONNX Runtime must agree with the reference int8 graph.

Each family is built from torchvision's own classes (the same forward code as the zoo models) at
small widths and depths, so `make test` stays fast; `python -m fxquant.tools.coverage` runs the full
list at full size. BatchNorm statistics are measured on random images: a raw random init of a depthwise
net shrinks its signal to ~0 within a few blocks, and a comparison of zeros would prove nothing (each
test also checks the float logits are not flat; vit's zero-initialised head gets random weights).

Two checks, in quantization steps and dB:
- layer by layer, teacher-forced (fxquant.tools.coverage.layerwise_steps): every quantized tensor of
  ONNX Runtime equals the reference op computed from ONNX Runtime's own inputs within one step;
- at the output: SQNR of ONNX Runtime against the reference >= 30 dB, or, for a random network that
  amplifies noise (its int8-vs-float SQNR is below 30 dB), at least that int8-vs-float SQNR: the file
  adds less error than quantization does. Same top-1 on every row (any of the reference's tied maxima).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxquant
from fxquant.tools.zoo import FAMILIES, small_family_model
from conftest import assert_onnx_matches_int8


pytestmark = pytest.mark.usefixtures("one_thread")


# what trace keeps whole, in float (and reports): torchvision wraps swin's patch-merging pad with torch.fx.wrap (its
# attention, wrapped too, is traced through fxquant.traceable's stand-in)
LEAVES = {"swin": {"_patch_merging_pad"}, "swin_v2": {"_patch_merging_pad"}}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_reaches_onnxruntime_and_agrees_with_reference(family, tmp_path):
    model, size = small_family_model(family)
    g = torch.Generator().manual_seed(2)
    example = torch.randn(1, 3, size, size, generator=g)
    calib = [torch.randn(4, 3, size, size, generator=g) for _ in range(2)]
    qmodel = fxquant.quantize(model, example, calib_data=calib, progress=False)
    rep = fxquant.report(qmodel)
    assert {o.op for o in rep.leaves} == LEAVES.get(family, set()), str(rep)
    assert len(rep.quantized) >= len(rep.ops) // 5, str(rep)  # most of the compute is quantized
    assert not [o for o in rep.float_by_rule if o.op == "einsum"], str(rep)  # maxvit's einsums are matmuls: quantized
    adds = [o.rule for o in rep.ops if o.rule in ("add", "add_relu", "residual_add")]
    if family == "vit":  # pre-norm: every residual sum is read by LayerNorms and adds only (and x.dim())
        assert set(adds) == {"residual_add"}, str(rep)
    if family in ("resnet", "mobilenet_v2"):  # an integer kernel reads each sum: QLinearAdd
        assert adds and "residual_add" not in adds, str(rep)
    if family == "swin_v2":  # post-norm x + norm(f(x)): the next block's qkv reads the sum; only the last is float
        assert adds.count("residual_add") == 1 and "add" in adds, str(rep)
    int8 = fxquant.convert(qmodel)
    path = tmp_path / f"{family}.onnx"
    fxquant.export_onnx(int8, path, example)

    assert_onnx_matches_int8(model, int8, path, torch.randn(4, 3, size, size, generator=g), family)  # another batch size


class EinsumAttention(nn.Module):
    """maxvit's attention einsums (spaces and all), an ellipsis form, and two einsums that are no matmul."""

    def forward(self, q, k, v):
        attn = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k).softmax(dim=-1)
        out = torch.einsum("...ij,...jd->...id", attn, v)
        return out + torch.einsum("bghid,bghid->bghi", q, k).unsqueeze(-1) + torch.einsum("bghid->bghdi", v).mean()


def test_einsum_that_is_a_matmul_becomes_a_quantized_matmul():
    from fxquant.passes import decompose_ops, trace_model

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 2, 5, 4, generator=g) for _ in range(3))
    model = EinsumAttention()
    gm = decompose_ops(trace_model(model, example_inputs=(q, k, v)))
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.matmul) == 2 and ops.count(torch.transpose) == 1  # k^T for the first, none for the second
    assert ops.count(torch.functional.einsum) == 2  # a row-wise dot and a permutation are declined
    torch.testing.assert_close(gm(q, k, v), model(q, k, v))

    qmodel = fxquant.quantize(model, (q, k, v), calib_data=[(q, k, v)], progress=False)
    rules = {n.name: n.meta["fxquant"].rule for n in qmodel.graph.nodes if "fxquant" in n.meta}
    # the q k^T einsum feeds softmax: the attention row (scores float inside it); attn @ v: the matmul row
    assert rules["einsum"] == "attention_scores" and rules["einsum_1"] == "matmul" and rules["einsum_2"] == "float_math"
