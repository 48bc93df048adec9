"""QAT with simulated BN folding (fxquant.nn.ConvBnAct2d), freeze_bn, the QAT schedule, resuming.

ConvBnAct2d is checked against the formulas of Jacob et al. / Krishnamoorthi written out here with
plain torch ops (fold, fake-quantize the folded weight with its own per-channel range, conv, / k, BN on
batch statistics); convert against the QAT model in eval mode, in output quantization steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant import FxQuantError
from fxquant.check import agreement
from fxquant.nn import ConvAct2d, ConvBnAct2d, FakeQuantize, LinearAct, LinearBnAct
from fxquant.numerics import dequantize, quantize
from fxquant.qat import QATSchedule, freeze_bn, train
from fxquant.specs import QuantSpec, weight_spec


def _qat(model, image, **kw):
    return fxquant.quantize(model, (image,), qat=True, calib_data=[image], progress=False, **kw)


def _steps(qmodel, n: int, seed: int, schedule=None, lr=0.05):
    """n SGD steps on seeded random batches (regression to random targets keeps every layer moving)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(qmodel.parameters(), lr=lr)
    qmodel.train()
    for _ in range(n):
        x = torch.randn(4, 3, 16, 16, generator=g)
        loss = (qmodel(x) - torch.randn(4, 5, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
    return opt


def _fold_by_hand(conv: ConvBnAct2d):
    bn = conv.bn
    k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = conv.bias if conv.bias is not None else torch.zeros_like(k)
    return k, conv.weight * k.reshape(-1, 1, 1, 1), (b - bn.running_mean) * k + bn.bias


def _fq_by_hand(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-channel symmetric fake-quant with the channel's own range: the textbook formula."""
    scale = (w.detach().abs().amax(dim=(1, 2, 3)) / spec.qmax).clamp(min=torch.finfo(torch.float32).eps)
    return dequantize(quantize(w, scale, torch.zeros_like(scale), spec.qmin, spec.qmax, 0, "int8"), scale, torch.zeros_like(scale), 0)


# ---------------------------------------------------------------- structure


def test_qat_keeps_conv_bn_as_conv_bn_act_and_ptq_folds(residual_cnn, image):
    qat = _qat(residual_cnn, image)
    ptq = fxquant.quantize(residual_cnn, (image,), calib_data=[image], progress=False)
    for name in ("stem", "block.conv1", "block.conv2"):
        assert type(qat.get_submodule(name)) is ConvBnAct2d and isinstance(qat.get_submodule(name).bn, nn.BatchNorm2d)
        assert type(ptq.get_submodule(name)) is ConvAct2d and not hasattr(ptq.get_submodule(name), "bn")
    assert qat.get_submodule("stem").act == "relu" and qat.get_submodule("block.conv2").act is None
    ops = [n.target for n in qat.graph.nodes if n.op == "call_module"]
    assert not any(isinstance(qat.get_submodule(t), nn.BatchNorm2d) for t in ops)  # no BN left in the graph
    assert qat.get_submodule("stem").weight_fq is not None  # backend rows written for ConvAct2d claimed it


# ---------------------------------------------------------------- numerics against the formulas


def test_training_forward_is_bn_of_conv_with_fake_quantized_folded_weight_over_k(residual_cnn, image, generator):
    stem = _qat(residual_cnn, image).get_submodule("stem").train()
    x = torch.randn(6, 3, 16, 16, generator=generator)
    ref_bn = nn.BatchNorm2d(8).train()
    ref_bn.load_state_dict(stem.bn.state_dict())
    k, w_fold, _ = _fold_by_hand(stem)
    z = F.conv2d(x, _fq_by_hand(w_fold, stem.weight_fq.spec), None, padding=1) / k.reshape(1, -1, 1, 1) + stem.bias.reshape(1, -1, 1, 1)
    expected = F.relu(ref_bn(z))
    got = stem(x)
    # the module computes conv(x, fq'(w)) without forming w * k (see its docstring): the same up to float rounding
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stem.bn.running_mean, ref_bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stem.bn.running_var, ref_bn.running_var, rtol=1e-5, atol=1e-6)
    assert not torch.equal(stem.bn.running_mean, torch.zeros(8))  # batch statistics moved them


def test_eval_forward_is_conv_with_fake_quantized_folded_weight_plus_folded_bias(residual_cnn, image, generator):
    qm = _qat(residual_cnn, image)
    stem = qm.get_submodule("stem").eval()
    x = torch.randn(6, 3, 16, 16, generator=generator)
    _, w_fold, b_fold = _fold_by_hand(stem)
    qw = stem.weight_fq.spec.qmax
    s_b = qm.x_fq.qparams()[0] * w_fold.detach().abs().amax(dim=(1, 2, 3)) / qw  # the int32 grid s_x * s_w_fold
    b_q = dequantize(quantize(b_fold, s_b, torch.zeros_like(s_b), -(2**31) + 1, 2**31 - 1, 0, "int32"), s_b, torch.zeros_like(s_b), 0)
    expected = F.relu(F.conv2d(x, _fq_by_hand(w_fold, stem.weight_fq.spec), b_q, padding=1))
    torch.testing.assert_close(stem(x), expected, rtol=1e-5, atol=1e-5)


def test_per_tensor_weights_fold_explicitly_and_match_the_formula(generator):
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -1.5, 2.0, 0.0]))  # a negative and a zero gamma
        bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 1.5]))
    m = ConvBnAct2d.from_layer_bn(conv, bn, act="relu")
    spec = QuantSpec("int8", -127, 127, symmetric=True, axis=None, observer="current")
    m.weight_fq = FakeQuantize(spec, of_weight=True)
    assert not m.commutes
    x = torch.randn(5, 3, 8, 8, generator=generator)
    k, w_fold, b_fold = _fold_by_hand(m)
    scale = w_fold.detach().abs().max() / 127
    w_q = dequantize(quantize(w_fold, scale, torch.tensor(0.0), -127, 127, None, "int8"), scale, torch.tensor(0.0))
    ref_bn = nn.BatchNorm2d(4).train()
    ref_bn.load_state_dict(bn.state_dict())
    z = F.conv2d(x, w_q, None, padding=1) / torch.where(k == 0, 1.0, k).reshape(1, -1, 1, 1) + conv.bias.reshape(1, -1, 1, 1)
    expected_train = F.relu(ref_bn(z))
    got_train = m.train()(x)
    torch.testing.assert_close(got_train, expected_train, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(got_train).all()
    _, w_fold, b_fold = _fold_by_hand(m)  # running statistics moved: fold again
    scale = w_fold.detach().abs().max() / 127
    w_q = dequantize(quantize(w_fold, scale, torch.tensor(0.0), -127, 127, None, "int8"), scale, torch.tensor(0.0))
    torch.testing.assert_close(m.eval()(x), F.relu(F.conv2d(x, w_q, b_fold, padding=1)), rtol=1e-4, atol=1e-4)


def test_zero_gamma_channel_outputs_beta_and_no_nan(residual_cnn, image, generator):
    qm = _qat(residual_cnn, image)
    stem = qm.get_submodule("stem")
    with torch.no_grad():
        stem.bn.weight[2] = 0.0
        stem.bn.bias[2] = 0.3
    x = torch.randn(4, 3, 16, 16, generator=generator)
    for mode in (True, False):
        y = stem.train(mode)(x)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y[:, 2], torch.full_like(y[:, 2], 0.3))  # relu(beta), beta > 0
    assert fxquant.convert(qm.eval()) is not None  # folds to a zero weight with a positive scale


def test_convert_matches_the_qat_model_in_eval_mode_within_one_step(residual_cnn, image, generator):
    """Tolerance: 1 output step. The int8 graph holds sign(k) * q'(w) with scales |k| * s' where the QAT
    model computes conv(x, fq'(w)) * k, and an int32 bias where it adds b_fold: float rounding and the bias
    grid (<= s_x * s_w / 2) can move a value across a rounding boundary, by one step."""
    qm = _qat(residual_cnn, image)
    _steps(qm, 4, seed=3)  # weights, BN statistics and observer ranges all move
    qm.eval()
    fxquant.set_fake_quant(qm, observe=False)  # else evaluating qm would move its ranges past the converted ones
    int8 = fxquant.convert(qm)
    x = torch.randn(256, 3, 16, 16, generator=generator)
    with torch.no_grad():
        got = agreement(qm(x).numpy(), int8(x).numpy(), float(qm.get_submodule("fc_fq").qparams()[0]))
    assert got.max_steps <= 1.0 + 1e-4, got
    assert got.within_one_step == 1.0 and got.top1 >= 0.99, got


def test_convert_folds_bn_into_int8_weights_and_int32_bias(residual_cnn, image):
    qm = _qat(residual_cnn, image)
    _steps(qm, 2, seed=4)
    stem = qm.get_submodule("stem")
    k, w_fold, _ = _fold_by_hand(stem)
    int8 = fxquant.convert(qm.eval())
    assert int8.stem_w_i8.dtype == torch.int8 and int8.stem_b_i32.dtype == torch.int32
    w_back = dequantize(int8.stem_w_i8, int8.stem_w_scale, int8.stem_w_zp, 0)
    step = int8.stem_w_scale.reshape(-1, 1, 1, 1)
    assert ((w_back - w_fold.detach()).abs() <= step / 2 * (1 + 1e-4)).all()  # the folded weight, to half a step
    assert not any(isinstance(m, nn.BatchNorm2d) for m in int8.modules())


# ---------------------------------------------------------------- linear-bn: the same simulated folding


class LinearBnNet(nn.Module):
    """conv-bn-relu, global pool, linear-BatchNorm1d-relu, linear: (N, 3, 16, 16) -> (N, 5)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.bn1 = nn.Linear(8, 16), nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.flatten(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1), 1)
        return self.fc2(F.relu(self.bn1(self.fc1(x))))


@pytest.fixture
def linear_bn_net(randomize_bn):
    torch.manual_seed(0)
    return randomize_bn(LinearBnNet()).eval()


def test_qat_keeps_linear_bn_as_linear_bn_act_and_ptq_folds(linear_bn_net, image):
    qat = _qat(linear_bn_net, image)
    ptq = fxquant.quantize(linear_bn_net, (image,), calib_data=[image], progress=False)
    fc1 = qat.get_submodule("fc1")
    assert type(fc1) is LinearBnAct and isinstance(fc1.bn, nn.BatchNorm1d) and fc1.act == "relu"
    assert fc1.weight_fq is not None  # backend rows written for LinearAct claimed it
    assert type(ptq.get_submodule("fc1")) is LinearAct and not hasattr(ptq.get_submodule("fc1"), "bn")
    assert freeze_bn(qat) == 2  # the conv-bn and the linear-bn


def test_linear_bn_training_forward_is_bn_of_linear_with_fake_quantized_folded_weight_over_k(linear_bn_net, image, generator):
    fc1 = _qat(linear_bn_net, image).get_submodule("fc1").train()
    x = torch.randn(6, 8, generator=generator)
    ref_bn = nn.BatchNorm1d(16).train()
    ref_bn.load_state_dict(fc1.bn.state_dict())
    k = fc1.bn.weight / torch.sqrt(fc1.bn.running_var + fc1.bn.eps)
    w_fold = fc1.weight * k[:, None]
    qw = fc1.weight_fq.spec.qmax
    scale = w_fold.detach().abs().amax(dim=1) / qw
    w_q = dequantize(quantize(w_fold, scale, torch.zeros_like(scale), -qw, qw, 0, "int8"), scale, torch.zeros_like(scale), 0)
    expected = F.relu(ref_bn(F.linear(x, w_q) / k + fc1.bias))
    torch.testing.assert_close(fc1(x), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fc1.bn.running_mean, ref_bn.running_mean, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fc1.bn.running_mean, fc1.bn.running_mean.new_zeros(16))


def test_linear_bn_convert_matches_the_qat_model_in_eval_mode_within_one_step(linear_bn_net, image, generator):
    qm = _qat(linear_bn_net, image)
    _steps(qm, 4, seed=21)  # weights, both BNs' statistics and the ranges move
    fxquant.set_fake_quant(qm.eval(), observe=False)
    int8 = fxquant.convert(qm)
    assert int8.fc1_w_i8.dtype == torch.int8 and int8.fc1_b_i32.dtype == torch.int32
    assert not any(isinstance(m, nn.BatchNorm1d) for m in int8.modules())
    x = torch.randn(256, 3, 16, 16, generator=generator)
    with torch.no_grad():
        got = agreement(qm(x).numpy(), int8(x).numpy(), float(qm.get_submodule("fc2_fq").qparams()[0]))
    assert got.max_steps <= 1.0 + 1e-4 and got.within_one_step == 1.0, got


# ---------------------------------------------------------------- evaluating does not move ranges


def test_evaluating_a_qat_model_leaves_its_activation_ranges_as_training_left_them(residual_cnn, image, generator):
    qm = _qat(residual_cnn, image)
    _steps(qm, 2, seed=22)  # observers on, as before freeze_observers
    acts = {n: m for n, m in qm.named_modules() if isinstance(m, FakeQuantize) and not m.of_weight}
    before = {n: {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)} for n, m in acts.items()}
    x = torch.randn(8, 3, 16, 16, generator=generator) * 5  # far wider than anything seen
    with torch.no_grad():
        qm.eval()(x)
    for n, m in acts.items():
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in before[n].items()), n
    # a weight's range follows the weight (a parameter, not data): the last SGD step moved it
    stem = qm.get_submodule("stem")
    assert torch.equal(stem.weight_fq.observer.max_val, stem.weight.detach().amax(dim=(1, 2, 3)))
    with torch.no_grad():
        qm.train()(x)  # the control: training mode observes
    assert not torch.equal(acts["x_fq"].scale, before["x_fq"]["scale"])


def test_calibration_in_eval_mode_still_observes(residual_cnn, image, calib_batches):
    qm = fxquant.quantize(residual_cnn, (image,), progress=False)  # eval mode, no range yet
    fxquant.calibrate(qm, calib_batches, progress=False)
    lo = min(float(x.min()) for x in calib_batches)
    assert float(qm.x_fq.observer.min_val) == lo  # every batch was seen, in eval mode


# ---------------------------------------------------------------- freezing


def test_freeze_bn_stops_running_statistics_and_train_equals_eval(residual_cnn, image, generator):
    qm = _qat(residual_cnn, image)
    _steps(qm, 2, seed=5)
    assert freeze_bn(qm) == 3
    stem = qm.get_submodule("stem")
    before = (stem.bn.running_mean.clone(), stem.bn.running_var.clone())
    _steps(qm, 3, seed=6)
    assert torch.equal(stem.bn.running_mean, before[0]) and torch.equal(stem.bn.running_var, before[1])
    fxquant.set_fake_quant(qm, observe=False)
    x = torch.randn(4, 3, 16, 16, generator=generator)
    with torch.no_grad():
        assert torch.equal(qm.train()(x), qm.eval()(x))  # frozen BN: training runs the eval formula
    assert bool(qm.state_dict()["stem.bn_frozen"])


def test_freeze_bn_without_bn_to_freeze_is_an_error(residual_cnn, image):
    ptq = fxquant.quantize(residual_cnn, (image,), calib_data=[image], progress=False)
    with pytest.raises(FxQuantError, match=r"^freeze_bn: the model has no conv-bn or linear-bn kept for QAT"):
        freeze_bn(ptq)
    no_bn = fxquant.quantize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (image,), qat=True, progress=False)
    with pytest.raises(FxQuantError, match=r"^freeze_bn: "):
        fxquant.freeze_bn(no_bn)
    with pytest.raises(FxQuantError, match=r"^freeze_bn: "):
        QATSchedule(no_bn, freeze_bn_after=10)  # fails before any training


def test_schedule_freezes_at_the_given_steps(residual_cnn, image):
    qm = _qat(residual_cnn, image)
    schedule = QATSchedule(qm, freeze_bn_after=2, freeze_observers_after=3)
    fqs = [m for m in qm.modules() if isinstance(m, FakeQuantize)]
    _steps(qm, 1, seed=7, schedule=schedule)
    assert not bool(qm.get_submodule("stem").bn_frozen) and all(fq.observe for fq in fqs)
    _steps(qm, 1, seed=8, schedule=schedule)
    assert bool(qm.get_submodule("stem").bn_frozen) and all(fq.observe for fq in fqs)
    _steps(qm, 1, seed=9, schedule=schedule)
    assert not any(fq.observe for fq in fqs) and schedule.steps == 3
    scales = [fq.scale.clone() for fq in fqs if fq.spec.axis is None]
    _steps(qm, 1, seed=10, schedule=schedule)
    assert all(torch.equal(a, fq.scale) for a, fq in zip(scales, [f for f in fqs if f.spec.axis is None]))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "10"])
def test_schedule_rejects_bad_steps(residual_cnn, image, bad):
    with pytest.raises(FxQuantError, match=r"^freeze_observers_after="):
        QATSchedule(_qat(residual_cnn, image), freeze_observers_after=bad)


def test_train_helper_runs_the_schedule(residual_cnn, image, generator):
    qm = _qat(residual_cnn, image)
    data = [(torch.randn(4, 3, 16, 16, generator=generator), torch.randint(0, 5, (4,), generator=generator)) for _ in range(3)]
    schedule = train(qm, data, optimizer=torch.optim.SGD(qm.parameters(), lr=0.01), loss_fn=F.cross_entropy,
                     epochs=2, freeze_bn_after=4)
    assert schedule.steps == 6 and bool(qm.get_submodule("block.conv1").bn_frozen)
    with pytest.raises(FxQuantError, match=r"^epochs=0"):
        train(qm, data, optimizer=torch.optim.SGD(qm.parameters(), lr=0.01), loss_fn=F.cross_entropy, epochs=0)


def test_convert_before_any_observer_saw_data_names_the_node(residual_cnn, image):
    qm = fxquant.quantize(residual_cnn, (image,), qat=True, progress=False)  # no calib_data, no step yet
    with pytest.raises(FxQuantError, match=r"fake-quant node 'x_fq' has seen no data.*Calibrate first"):
        fxquant.convert(qm)


# ---------------------------------------------------------------- resuming


def test_state_dict_mid_training_resumes_with_identical_scales_and_outputs(residual_cnn, image, tmp_path):
    a = _qat(residual_cnn, image, fake_quant="lsq")
    opt_a = _steps(a, 3, seed=11)
    freeze_bn(a)
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "ckpt.pt")

    b = _qat(residual_cnn, image * 3, fake_quant="lsq")  # other calibration data: everything must come from the file
    ckpt = torch.load(tmp_path / "ckpt.pt")
    b.load_state_dict(ckpt["model"])
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05)
    opt_b.load_state_dict(ckpt["opt"])
    assert bool(b.get_submodule("stem").bn_frozen)
    for m in (a, b):  # two more steps each, same data
        _steps(m, 2, seed=12)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        if isinstance(ta, torch.Tensor):
            assert torch.equal(ta, tb), name
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        assert torch.equal(a.train()(x), b.train()(x))
        assert torch.equal(a.eval()(x), b.eval()(x))
