"""insert_fake_quant: where the FakeQuantize nodes go, and what the fake-quant model computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.backends import load_backend
from fxquant.nn import ConvAct2d, FakeQuantize, LinearAct
from fxquant.numerics import dequantize, quantize
from fxquant.passes import annotate_quant, fuse_modules, insert_fake_quant, trace_model


def prepared(model: nn.Module, x: torch.Tensor, exclude=()):
    gm = fuse_modules(trace_model(model, example_inputs=(x,), exclude=exclude))
    gm = insert_fake_quant(annotate_quant(gm, backend=load_backend("onnxruntime"), exclude=exclude))
    gm.graph.lint()
    gm.recompile()
    return gm


def fq_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), FakeQuantize)]


def reads(gm, name) -> list[str]:
    """Names of the FakeQuantize nodes that read node `name` directly."""
    return [n.name for n in fq_nodes(gm) if n.args[0].name == name]


# ---------------------------------------------------------------- structure


def test_residual_cnn_fake_quant_count_and_placement(residual_cnn, image):
    gm = prepared(residual_cnn, image)
    placed = {n.name: n.args[0].name for n in fq_nodes(gm)}
    assert placed == {
        "x_fq": "x",  # the model input
        "stem_fq": "stem",  # one per quantized op output ...
        "block_conv1_fq": "block_conv1",
        "block_conv2_fq": "block_conv2",
        "block_relu_1_fq": "block_relu_1",  # ... on the last node of the add -> relu chain
        "gap_fq": "gap",
        "fc_fq": "fc",
    }
    assert reads(gm, "pool") == [] and reads(gm, "flatten") == [] and reads(gm, "add") == []
    order = [n.name for n in gm.graph.nodes]
    assert order[:3] == ["x", "x_fq", "stem"]
    for fq, src in placed.items():
        assert order.index(fq) == order.index(src) + 1, fq  # right after its value
    # every user of a quantized value reads the fake-quant, never the raw value
    by_name = {n.name: n for n in gm.graph.nodes}
    for fq, src in placed.items():
        assert [u.name for u in by_name[src].users] == [fq], src
    assert by_name["pool"].args[0].name == "stem_fq"
    assert by_name["add"].args == (by_name["block_conv2_fq"], by_name["pool"])  # pool shares stem_fq's grid


def test_weights_get_per_channel_fake_quant(residual_cnn, image):
    gm = prepared(residual_cnn, image)
    weighted = {"stem": ConvAct2d, "block.conv1": ConvAct2d, "block.conv2": ConvAct2d, "fc": LinearAct}
    for target, cls in weighted.items():
        mod = gm.get_submodule(target)
        assert type(mod) is cls, target
        assert isinstance(mod.weight_fq, FakeQuantize)
        spec = mod.weight_fq.spec
        # every conv and the linear reach a pair-summing GEMM: 7-bit on the default (portable) target
        assert (spec.dtype, spec.qmin, spec.qmax, spec.axis, spec.symmetric) == ("int8", -63, 63, 0, True)
        assert mod.weight_fq.scale.shape == (mod.weight.shape[0],)
    assert gm.block.conv2.act is None  # made a ConvAct2d only to carry the weight fake-quant


class TwoReaders(nn.Module):
    """One value read by two quantized consumers: the input, and a float op's (softmax's) output."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.c, self.d = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        s = F.softmax(self.a(x) + self.b(x), dim=1)
        return self.c(s) + self.d(s)


def test_a_value_read_by_two_quantized_consumers_gets_one_fake_quant():
    gm = prepared(TwoReaders(), torch.randn(1, 3, 4, 4))
    assert reads(gm, "x") == ["x_fq"]
    assert reads(gm, "softmax") == ["softmax_fq"]
    by_name = {n.name: n for n in gm.graph.nodes}
    assert by_name["a"].args[0].name == by_name["b"].args[0].name == "x_fq"
    assert by_name["c"].args[0].name == by_name["d"].args[0].name == "softmax_fq"
    # a, b, add, c, d, add_1 quantize their outputs; softmax (float) does not: 6 + x_fq + softmax_fq
    assert len(fq_nodes(gm)) == 8 and reads(gm, "add") == ["add_fq"]


class FloatTail(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        return F.softmax(y, dim=1), self.head(torch.tanh(y))


def test_float_ops_get_no_fake_quant_and_excluded_ops_none_of_their_own():
    gm = prepared(FloatTail(), torch.randn(1, 3, 4, 4), exclude=["head"])
    assert [n.name for n in fq_nodes(gm)] == ["x_fq", "conv_fq"]
    assert reads(gm, "softmax") == [] and reads(gm, "tanh") == [] and reads(gm, "head") == []
    assert type(gm.head) is nn.Conv2d  # excluded: no weight fake-quant either


def test_float_op_output_feeding_a_quantized_op_is_quantized_at_the_consumer():
    gm = prepared(FloatTail(), torch.randn(1, 3, 4, 4))
    assert reads(gm, "tanh") == ["tanh_fq"] and reads(gm, "softmax") == []
    assert reads(gm, "head") == ["head_fq"]


# ---------------------------------------------------------------- numerics against the oracle, by hand


class OneConv(nn.Module):
    def __init__(self, bias: bool, relu: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1, bias=bias)
        self.relu = relu

    def forward(self, x):
        y = self.conv(x)
        return F.relu(y) if self.relu else y


def _qparams_by_hand(x: torch.Tensor):
    """uint8 asymmetric from the textbook formula: range widened to 0, 255 steps, zp = -round(lo/scale)."""
    lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255
    return scale, torch.clamp(-torch.round(lo / scale), 0, 255)


@pytest.mark.parametrize("bias, relu", [(True, False), (False, False), (True, True)], ids=["bias", "no_bias", "relu"])
def test_single_conv_fake_quant_matches_the_oracle_by_hand(bias, relu):
    """Tolerance: 0 quantization steps. The by-hand path runs the same float ops on the same values
    (fake_quant is bit-equal to dequantize(quantize(.)), and the conv sees identical tensors), so
    any difference, even one step, is a real disagreement."""
    g = torch.Generator().manual_seed(21)
    model = OneConv(bias, relu).eval()
    calib = torch.randn(4, 3, 8, 8, generator=g)
    qm = fxquant.quantize(model, (calib,), calib_data=[calib], progress=False)
    x = torch.randn(2, 3, 8, 8, generator=g) * 1.5  # fresh data, partly outside the calibrated range

    w, b = model.conv.weight.detach(), (model.conv.bias.detach() if bias else None)
    s_x, zp_x = _qparams_by_hand(calib)
    qw = 63  # the portable target's 7-bit weights (a 3x3 conv reaches a pair-summing GEMM)
    s_w = w.abs().amax(dim=(1, 2, 3)) / qw  # symmetric per output channel, zero point 0
    float_out = F.conv2d(calib, w, b, padding=1)  # calibration observes with fake-quant off
    s_y, zp_y = _qparams_by_hand(F.relu(float_out) if relu else float_out)

    x_dq = dequantize(quantize(x, s_x, zp_x, 0, 255, None, "uint8"), s_x, zp_x)
    w_dq = dequantize(quantize(w, s_w, torch.zeros(5), -qw, qw, 0, "int8"), s_w, torch.zeros(5), 0)
    if bias:  # the bias sits on the int32 grid s_x * s_w, as the int8 model stores it
        b = dequantize(quantize(b, s_x * s_w, torch.zeros(5), -(2**31) + 1, 2**31 - 1, 0, "int32"), s_x * s_w, torch.zeros(5), 0)
    y = F.conv2d(x_dq, w_dq, b, padding=1)
    y = F.relu(y) if relu else y
    expected = dequantize(quantize(y, s_y, zp_y, 0, 255, None, "uint8"), s_y, zp_y)

    with torch.no_grad():
        got = qm(x)
    assert qm.x_fq.scale == s_x and qm.conv_fq.scale == s_y
    assert torch.equal(qm.conv.weight_fq.scale, s_w)
    steps = ((got - expected).abs() / s_y).max().item()
    assert steps == 0, f"{steps} quantization steps apart"
    saturated = (quantize(y, s_y, zp_y, 0, 255, None, "uint8") == 255).sum()
    assert saturated > 0  # the fresh input did exercise saturation
