"""Issue 14, kind 1: a channel whose bias does not fit int32 at s_x * s_w gets a larger weight scale.

A BatchNorm with a dead channel (gamma ~ 1e-6, beta = 1.5) folded into a depthwise conv, on a small input
range, needs a bias of ~1.5 / (s_x * s_w) with s_w ~ 1e-8 / 127: far past 2**31. Clamped, the channel
would output ~0 instead of 1.5 in the fake-quant and the int8 model alike; raised, it outputs 1.5 within
one output step, and fxquant.report names the channel.
"""

import torch
from torch import nn

import fxquant

from conftest import assert_file_matches_int8


class DeadChannel(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.dw(x))


def _model(dead: bool = True) -> DeadChannel:
    torch.manual_seed(0)
    m = DeadChannel().eval()
    with torch.no_grad():
        m.bn.running_var.fill_(1.0)
        if dead:
            m.bn.weight[0], m.bn.bias[0] = 1e-6, 1.5
    return m


def _inputs(n=8, seed=0):
    return torch.rand(n, 4, 6, 6, generator=torch.Generator().manual_seed(seed)) * 0.05  # s_x ~ 2e-4


def _output_step(qmodel) -> float:
    return float(qmodel.dw_fq.qparams()[0])


def test_a_dead_channel_keeps_its_bias_in_fake_quant_and_int8(tmp_path):
    model, x = _model(), _inputs()
    qmodel = fxquant.quantize(model, calib_data=[x], progress=False)
    int8 = fxquant.convert(qmodel)
    step = _output_step(qmodel)
    with torch.no_grad():
        want, fq, ref = model(x)[:, 0], qmodel(x)[:, 0], int8(x)[:, 0]
    assert (want - 1.5).abs().max() < 1e-4  # the float channel is its beta
    assert (fq - want).abs().max() <= step, "the fake-quant model lost the dead channel's bias"
    assert (ref - want).abs().max() <= step, "the int8 model lost the dead channel's bias"
    assert torch.equal(fq, ref)  # QAT sees what convert stores
    w_scale = int8.dw_w_scale
    b_i32 = int8.dw_b_i32.double()
    assert b_i32.abs().max() < 2**31 - 1 and b_i32[0].abs() > 2**30  # on the grid, not clipped
    assert w_scale[0] > 100 * w_scale[1:].max() * 1e-6  # channel 0's scale was raised far above its weights' range
    assert fxquant.report(qmodel).raised == (("dw", (0,)),)
    assert "channels [0]" in str(fxquant.report(qmodel))
    fxquant.export_onnx(qmodel, tmp_path / "dead.onnx", x[:1])
    assert_file_matches_int8(int8, tmp_path / "dead.onnx", _inputs(3, seed=1), "dead-channel conv")


def test_qat_folding_raises_the_same_channel():
    model, x = _model(), _inputs()
    qmodel = fxquant.quantize(model, qat=True, calib_data=[x], progress=False).eval()
    int8 = fxquant.convert(qmodel)
    step = _output_step(qmodel)
    with torch.no_grad():
        want, fq, ref = model(x)[:, 0], qmodel(x)[:, 0], int8(x)[:, 0]
    assert (fq - want).abs().max() <= step and (ref - fq).abs().max() <= step
    assert fxquant.report(qmodel).raised == (("dw", (0,)),)


def test_a_healthy_layer_keeps_its_observed_scales():
    model, x = _model(dead=False), _inputs()
    qmodel = fxquant.quantize(model, calib_data=[x], progress=False)
    int8 = fxquant.convert(qmodel)
    weight = model.dw.weight * (model.bn.weight / torch.sqrt(model.bn.running_var + model.bn.eps)).reshape(-1, 1, 1, 1)
    observed = weight.detach().abs().amax(dim=(1, 2, 3)) / 127
    assert torch.allclose(int8.dw_w_scale, observed)
    assert fxquant.report(qmodel).raised == ()
