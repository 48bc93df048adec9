"""Empirical bias correction (fxquant.bias_correction, calibrate(..., bias_correction=True)).

The oracle is computed apart from fxquant's fake-quant model: the float means come from the user's own
nn.Module (forward hooks on its BN / conv / linear outputs), the quantized means from the reference int8
graph that convert lowers (its pre-activation nodes, read with a torch.fx Interpreter). Tolerances are in
bias steps s_x * s_w, the grid the corrected bias is stored on.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxquant
from fxquant import FxQuantError
from fxquant.bias_correction import correct_bias
from fxquant.check import agreement, ort_session, run_onnx

CORRECTED = {"conv1": "bn1", "conv2": "conv2", "fc": "fc"}  # fxquant layer -> the user's module whose output is its pre-activation


class Net(nn.Module):
    """conv-bn-relu, conv(+bias)-relu, a conv without bias, pool, linear-relu, an excluded linear head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 6, 1, bias=False)  # no bias: nothing to shift
        self.fc = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)  # excluded: stays float

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.conv3(F.relu(self.conv2(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.head(F.relu(self.fc(x)))


@pytest.fixture
def net(randomize_bn):
    torch.manual_seed(0)
    return randomize_bn(Net()).eval()


@pytest.fixture
def calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(8, 3, 12, 12, generator=g) + 0.5 for _ in range(4)]


def _quantized(net, calib, bias_correction: bool):
    qm = fxquant.quantize(net, calib[0][:1], w_bits=4, exclude=["head"], progress=False)
    return fxquant.calibrate(qm, calib, bias_correction=bias_correction, progress=False)


def _float_means(net, calib) -> dict[str, torch.Tensor]:
    """Per-channel means of the user's modules' outputs (the layers' pre-activations) over the batches."""
    outs: dict[str, list] = {name: [] for name in CORRECTED.values()}
    handles = [net.get_submodule(name).register_forward_hook(lambda m, a, y, name=name: outs[name].append(y))
               for name in outs]
    with torch.no_grad():
        for x in calib:
            net(x)
    for h in handles:
        h.remove()
    return {layer: _per_channel_mean(outs[user]) for layer, user in CORRECTED.items()}


def _per_channel_mean(ys: list[torch.Tensor]) -> torch.Tensor:
    y = torch.cat(ys).double()
    return y.transpose(0, 1).reshape(y.shape[1], -1).mean(1)


class _Record(fx.Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        self.values.setdefault(n.name, []).append(out)
        return out


def _int8_means(qm, calib) -> dict[str, torch.Tensor]:
    """Per-channel means of the int8 graph's pre-activation nodes (the conv / linear before a fused relu)."""
    int8 = fxquant.convert(qm)
    rec = _Record(int8)
    rec.values = {}
    with torch.no_grad():
        for x in calib:
            rec.run(x)
    pre = {"conv1": "conv1_conv2d", "conv2": "conv2_conv2d", "fc": "fc_linear"}
    return {layer: _per_channel_mean(rec.values[node]) for layer, node in pre.items()}, int8


# ---------------------------------------------------------------- structure


def test_only_the_biases_of_quantized_layers_with_a_bias_change(net, calib):
    plain, corrected = _quantized(net, calib, False), _quantized(net, calib, True)
    a, b = plain.state_dict(), corrected.state_dict()
    assert list(a) == list(b)  # no parameter or buffer added or removed
    changed = {k for k in a if isinstance(a[k], torch.Tensor) and not torch.equal(a[k], b[k])}
    assert changed == {"conv1.bias", "conv2.bias", "fc.bias"}  # scales, weights, conv3, head: untouched
    assert corrected.conv3.bias is None and not corrected.training
    fqs = [m for m in corrected.modules() if isinstance(m, fxquant.nn.FakeQuantize)]
    assert all(fq.enabled and not fq.observe for fq in fqs)  # calibrate's flags, as without correction


def test_correct_bias_returns_the_layers_in_graph_order_and_keeps_mode_and_flags(net, calib):
    qm = _quantized(net, calib, False).train()
    fxquant.set_fake_quant(qm, observe=True)
    assert correct_bias(qm, calib, progress=False) == ["conv1", "conv2", "fc"]
    assert qm.training and all(fq.observe and fq.enabled for fq in qm.modules() if isinstance(fq, fxquant.nn.FakeQuantize))


# ---------------------------------------------------------------- numerics against the float module and the int8 graph


def test_corrected_int8_means_equal_the_float_means_within_one_bias_step(net, calib):
    target = _float_means(net, calib)
    before, _ = _int8_means(_quantized(net, calib, False), calib)
    after, int8 = _int8_means(_quantized(net, calib, True), calib)
    for layer in CORRECTED:
        step = getattr(int8, f"{layer}_b_scale").double()
        err_before, err_after = (before[layer] - target[layer]).abs(), (after[layer] - target[layer]).abs()
        # one step of the int32 grid: the bias measured and the bias corrected each round by half a step;
        # plus the float32 rounding of sums over thousands of products
        assert (err_after <= step + 1e-5 * target[layer].abs().max()).all(), layer
        assert err_before.max() > 20 * step.max(), layer  # without correction the mean is off by many steps


def test_first_layer_shift_is_the_float_minus_int8_mean(net, calib):
    """Nothing before conv1 is corrected, so its shift is exactly E[y_float] - E[y_int8] of the uncorrected model."""
    plain, corrected = _quantized(net, calib, False), _quantized(net, calib, True)
    expected = _float_means(net, calib)["conv1"] - _int8_means(plain, calib)[0]["conv1"]
    shift = (corrected.conv1.bias - plain.conv1.bias).double()
    torch.testing.assert_close(shift, expected, rtol=1e-4, atol=1e-6)


def test_convert_stores_the_corrected_bias_and_onnx_runtime_agrees_within_one_step(net, calib, tmp_path):
    qm = _quantized(net, calib, True)
    int8 = fxquant.convert(qm)
    b_scale = int8.conv2_b_scale
    assert torch.equal(int8.conv2_b_i32, torch.round(qm.conv2.bias.detach() / b_scale).to(torch.int32))
    fxquant.export_onnx(qm, tmp_path / "bc.onnx", calib[0][:1], opset=21)  # 4-bit weights: INT4
    x = torch.cat(calib)
    with torch.no_grad():
        ref, fq_out = int8(x).numpy(), qm(x).numpy()
    # the head stays float: one step of its input moves a logit by at most s_x * max_row sum |w|
    step = float(int8.fc_fq_scale) * float(net.head.weight.detach().abs().sum(1).max())
    got = agreement(ref, run_onnx(ort_session(tmp_path / "bc.onnx"), x), step)
    assert got.max_steps <= 1.0 + 1e-4, got
    assert agreement(ref, fq_out, step).max_steps <= 1.0 + 1e-4  # the fake-quant model computes what convert stores


# ---------------------------------------------------------------- negative cases


def test_a_model_with_nothing_to_correct_is_left_as_it_is(calib):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    qm = fxquant.quantize(model, calib[0][:1], exclude=["2"], calib_data=calib, progress=False)
    before = {k: v.clone() for k, v in qm.state_dict().items() if isinstance(v, torch.Tensor)}
    assert correct_bias(qm, calib, progress=False) == []
    assert all(torch.equal(v, qm.state_dict()[k]) for k, v in before.items())


def test_a_generator_is_rejected_because_correction_reads_the_data_again(net, calib):
    qm = fxquant.quantize(net, calib[0][:1], progress=False)
    with pytest.raises(FxQuantError, match=r"^calib_data: bias_correction reads it once more per layer.*generator"):
        fxquant.calibrate(qm, (x for x in calib), bias_correction=True, progress=False)
    assert not any(fq.calibrated for fq in fxquant.nn.fake_quants(qm))  # refused before calibrating, not after


def test_an_uncalibrated_model_is_rejected_naming_the_nodes(net, calib):
    qm = fxquant.quantize(net, calib[0][:1], progress=False)
    with pytest.raises(FxQuantError, match=r"^correct_bias: fake-quant nodes \[.*'x_fq'.*calibrate first"):
        correct_bias(qm, calib, progress=False)
