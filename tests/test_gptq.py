"""GPTQ rounding (fxquant.gptq, quantize(..., gptq=True) / calibrate(..., gptq=True)).

The oracle for the rounding is written apart from fxquant.gptq's Cholesky form: the greedy Optimal Brain
Quantization step as a least-squares solve, column after column in the same order, in float64: once columns
D are fixed at their integers, the free columns F are the minimiser of ||(W - W_orig) X||^2, i.e.
    W_F = W_orig,F - (q_D - W_orig,D) H_DF H_FF^-1      (H = X X^T + damp, the same dampening).
GPTQ computes the same sequence in float32 with the factor of H^-1; the integers agree within one step
(a float32 rounding can move a value across a rounding boundary) and almost all of them exactly.
End to end: the file exported after GPTQ runs in ONNX Runtime as an AVX2 CPU without VNNI (qemu) within
one step of the reference at every layer, and the portable weights keep their 7-bit range.
"""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant import FxQuantError
from fxquant.gptq import DAMP, gptq, gptq_round, roundable_layers
from fxquant.nn import WeightedAct, fake_quants
from fxquant.onnx.metadata import read_metadata


def _oracle(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Greedy OBQ by least squares (one group): w (rows, K), h (K, K), scale (rows, 1); act-order."""
    w0, k = w.double(), w.shape[1]
    h = h.double().clone()
    h += DAMP * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype)
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True).tolist()
    q = torch.zeros_like(w0)
    current, fixed = w0.clone(), []
    for j in order:
        q[:, j] = torch.clamp(torch.round(current[:, j] / scale[:, 0].double()), qmin, qmax)
        fixed.append(j)
        free = [i for i in range(k) if i not in fixed]
        if free:
            delta = (q[:, fixed] * scale.double() - w0[:, fixed]) @ h[fixed][:, free] @ torch.linalg.inv(h[free][:, free])
            current[:, free] = w0[:, free] - delta
    return q


@pytest.mark.parametrize("seed", range(4))
def test_gptq_round_matches_the_least_squares_oracle(seed):
    g = torch.Generator().manual_seed(seed)
    rows, k = 6, 12
    x = torch.randn(k, k, generator=g, dtype=torch.float64) @ torch.randn(k, 40, generator=g, dtype=torch.float64)
    x[3] = 0.0  # a dead input: diag(H) = 0 (after the mixing that correlates the others, where GPTQ differs from rounding)
    h = x @ x.T
    w = torch.randn(rows, k, generator=g)
    scale = w.abs().amax(1, keepdim=True) / 63
    got = gptq_round(w[None], h[None], scale[None], torch.zeros(()), -63, 63)[0].double()
    want = _oracle(w, h, scale, -63, 63)
    assert (got - want).abs().max() <= 1
    assert (got == want).float().mean() >= 0.95
    rounded = torch.round(w / scale).double()
    assert not torch.equal(want, rounded)  # the test would not see a GPTQ that only rounds
    assert got.min() >= -63 and got.max() <= 63


class Net(nn.Module):
    """conv-bn-relu, a grouped conv, a depthwise conv (8-bit on portable), a conv1d, linear layers, reflect padding."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4, padding_mode="reflect")
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv1d = nn.Conv1d(16, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8 * 64, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.depthwise(F.relu(self.grouped(x))))
        x = F.relu(self.conv1d(x.flatten(2)))  # (N, 16, 64) -> (N, 8, 64)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@pytest.fixture
def net(randomize_bn):
    return randomize_bn(torch.manual_seed(0) and Net()).eval()


@pytest.fixture
def calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(3, 3, generator=g)  # correlated colour channels
    return [torch.einsum("cd,ndhw->nchw", mix, torch.randn(8, 3, 8, 8, generator=g)) for _ in range(4)]


def _layer_errors(qmodel, net, calib) -> dict[str, float]:
    """Per layer: sum over the calibration data of |layer(x, fq(w)) - layer(x, w_float)|^2, x the layer's own
    (fake-quant) inputs, w_float the user's float weight with BN folded as fxquant folds it."""
    errors, inputs = {}, {}
    layers = dict(roundable_layers(qmodel))
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0])) for n, m in layers.items()]
    with torch.no_grad():
        for x in calib:
            qmodel(x)
    for hook in hooks:
        hook.remove()
    floats = {name: _float_weight(net, name) for name in layers}
    with torch.no_grad():
        for name, m in layers.items():
            quant = m.quant_weight(min_scale=m.bias_scale_floor(m.bias))
            errors[name] = sum(float(((m._apply_weight(x, quant, None) - m._apply_weight(x, floats[name], None)) ** 2).sum())
                               for x in inputs[name])
    return errors


def _float_weight(net: Net, name: str) -> torch.Tensor:
    if name == "conv1":
        bn = net.bn1
        return net.conv1.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1, 1, 1)
    return net.get_submodule(name).weight


def test_gptq_lowers_every_layers_output_error_and_keeps_the_grid(net, calib):
    rtn = fxquant.quantize(net, calib[0][:1], calib_data=calib, progress=False)
    rounded = fxquant.quantize(net, calib[0][:1], calib_data=calib, progress=False, gptq=True)
    assert [n for n, _ in roundable_layers(rounded)] == ["conv1", "grouped", "depthwise", "conv1d", "fc1", "fc2"]
    before, after = _layer_errors(rtn, net, calib), _layer_errors(rounded, net, calib)
    for name in before:
        assert after[name] < before[name], name
    assert sum(after.values()) < 0.8 * sum(before.values())
    for (name, a), (_, b) in zip(roundable_layers(rtn), roundable_layers(rounded)):
        assert torch.equal(a.weight_qparams()[0], b.weight_qparams()[0]), name  # the calibrated scales are kept
        on_grid = b.quant_weight(min_scale=b.bias_scale_floor(b.bias))  # the grid the forward uses, bias floor included
        assert torch.equal(b.weight, on_grid), name  # the weight is on its grid: fake-quant is the identity
    int8 = fxquant.convert(rounded)
    qmax = {n: int(m.weight_fq.spec.qmax) for n, m in roundable_layers(rounded)}
    assert qmax == {"conv1": 63, "grouped": 63, "depthwise": 127, "conv1d": 63, "fc1": 63, "fc2": 63}  # portable
    x = calib[0]
    with torch.no_grad():
        assert torch.allclose(int8(x), rounded(x), atol=1e-5)


def test_gptq_file_is_exact_on_avx2_without_vnni(net, calib, tmp_path):
    from fxquant.check import layerwise

    qmodel = fxquant.quantize(net, calib[0][:1], calib_data=calib, progress=False, gptq=True)
    int8 = fxquant.convert(qmodel)
    path = tmp_path / "gptq.onnx"
    fxquant.export_onnx(int8, path, calib[0][:1])
    assert fxquant.check_onnx(path) == []
    assert "gptq=True" in read_metadata(onnx.load(path))["fxquant.config"]
    found = layerwise(int8, path, calib[1], cpu="haswell")
    assert found.max_steps <= 1, found.worst


def test_gptq_from_the_config_or_from_calibrate(net, calib):
    pending = fxquant.quantize(net, gptq=True, progress=False)  # no inputs: built by calibrate's first batch
    fxquant.calibrate(pending, calib, progress=False)
    explicit = fxquant.calibrate(fxquant.quantize(net, calib[0][:1], progress=False), calib, gptq=True, progress=False)
    off = fxquant.calibrate(fxquant.quantize(net, calib[0][:1], progress=False, gptq=True), calib, gptq=False, progress=False)
    rtn = fxquant.quantize(net, calib[0][:1], calib_data=calib, progress=False)
    w = lambda m: m.get_submodule("fc1").weight  # noqa: E731
    assert torch.equal(w(pending), w(explicit))
    assert torch.equal(w(off), w(rtn)) and not torch.equal(w(off), w(explicit))
    state = explicit.state_dict()  # the rounded weights travel in a checkpoint
    fresh = fxquant.quantize(net, calib[0][:1], progress=False)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(calib[0]), explicit(calib[0]))


def test_gptq_bad_input(net, calib):
    with pytest.raises(FxQuantError, match="gptq='yes': expected True or False"):
        fxquant.quantize(net, calib[0][:1], gptq="yes")
    qmodel = fxquant.quantize(net, calib[0][:1], progress=False)
    with pytest.raises(FxQuantError, match="gptq=1: expected True, False or None"):
        fxquant.calibrate(qmodel, calib, gptq=1, progress=False)
    with pytest.raises(FxQuantError, match="gptq reads it once more per layer.*pass a list or a DataLoader"):
        fxquant.calibrate(qmodel, iter(calib), gptq=True, progress=False)
    assert not any(fq.calibrated for fq in fake_quants(qmodel))  # refused before anything was observed
    with pytest.raises(FxQuantError, match="gptq: fake-quant nodes .* have no range; calibrate first"):
        gptq(qmodel, calib)


def test_gptq_on_a_qat_model_rounds_folded_layers_and_keeps_the_flags(net, calib):
    from fxquant.nn import BnFolded

    rounded = fxquant.quantize(net, calib[0][:1], calib_data=calib, progress=False, qat=True, gptq=True)
    plain = fxquant.quantize(net, calib[0][:1], calib_data=calib, progress=False, qat=True)
    assert rounded.training  # QAT: train mode, observers back on after calibration and GPTQ
    assert all(fq.observe and fq.enabled for fq in fake_quants(rounded))
    conv1 = dict(roundable_layers(rounded))["conv1"]
    assert isinstance(conv1, BnFolded)  # the BN fold commutes with per-channel weights: GPTQ rounds the unfolded weight
    assert not torch.equal(conv1.weight, plain.get_submodule("conv1").weight)


def test_slicing_the_columns_changes_nothing_and_chunking_wide_layers_still_helps(net, calib, monkeypatch):
    import fxquant.gptq as gptq_module

    whole = fxquant.quantize(net, calib[0][:1], calib_data=calib, progress=False, gptq=True)
    monkeypatch.setattr(gptq_module, "COLUMN_ELEMENTS", 1000)  # im2col one sample at a time: H summed in another order
    sliced = fxquant.quantize(net, calib[0][:1], calib_data=calib, progress=False, gptq=True)
    for (name, a), (_, b) in zip(roundable_layers(whole), roundable_layers(sliced)):
        steps = ((a.weight - b.weight) / a.weight_qparams()[0].reshape(-1, *[1] * (a.weight.dim() - 1))).abs()
        assert steps.max() <= 1 + 1e-4 and (steps < 0.5).float().mean() >= 0.99, name  # float32 sums: a tie may flip
    monkeypatch.setattr(gptq_module, "MAX_COLUMNS", 100)  # fc1 (512 inputs) in 6 chunks of 86 (zero-padded to 516)
    square = torch.randn(1, 120, 120)  # a square weight is told from columns by the caller, not by its shape
    assert torch.equal(gptq_module._unchunked(gptq_module._chunked(square, 120, columns=False), 1, 120), square)
    chunked = fxquant.quantize(net, calib[0][:1], calib_data=calib, progress=False, gptq=True)
    rtn = fxquant.quantize(net, calib[0][:1], calib_data=calib, progress=False)
    errors = {name: _layer_errors(m, net, calib)["fc1"] for name, m in (("rtn", rtn), ("chunked", chunked), ("whole", whole))}
    assert errors["whole"] < errors["chunked"] < errors["rtn"]
    fc1 = chunked.get_submodule("fc1")
    assert torch.equal(fc1.weight, fc1.quant_weight())


def test_dict_batches_are_read_by_input_name():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(8, 32), nn.Linear(4, 32), nn.Linear(32, 3)

        def forward(self, img, meta):
            return self.head(F.relu(self.a(img) + self.b(meta)))

    torch.manual_seed(0)
    calib = [{"meta": torch.randn(16, 4), "img": torch.randn(16, 8)} for _ in range(4)]  # keys in another order
    model = TwoInputs().eval()
    rounded = fxquant.quantize(model, calib[0], progress=False, gptq=True)
    fxquant.calibrate(rounded, calib, bias_correction=True, progress=False)  # both per-layer passes read dicts
    layers = dict(roundable_layers(rounded))
    assert set(layers) == {"a", "b", "head"} and all(torch.equal(m.weight, m.quant_weight()) for m in layers.values())


def test_shrinkage_is_closer_to_the_true_second_moments_and_ends_at_the_diagonal():
    from fxquant.gptq import _shrunk

    k, g = 32, torch.Generator().manual_seed(0)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5
    truth = mix @ mix.T  # E[x x^T] of x = mix @ z, z standard normal
    raw_errors, shrunk_errors = [], []
    for _ in range(20):
        x = mix @ torch.randn(k, 16, generator=g, dtype=torch.float64)  # 16 samples of 32 inputs: S is rank 16
        h, h2 = (x @ x.T)[None], ((x * x) @ (x * x).T)[None]
        raw_errors.append(float(torch.linalg.norm(h[0] / 16 - truth)))
        shrunk_errors.append(float(torch.linalg.norm(_shrunk(h, h2, 16)[0] - truth)))
    assert sum(shrunk_errors) < 0.9 * sum(raw_errors)
    one = torch.randn(k, 1, generator=g, dtype=torch.float64)
    single = _shrunk((one @ one.T)[None], ((one * one) @ (one * one).T)[None], 1)[0]
    assert torch.equal(single, torch.diag(torch.diagonal(one @ one.T)))  # one sample: nothing but the diagonal
    many = mix @ torch.randn(k, 100_000, generator=g, dtype=torch.float64)
    h = (many @ many.T)[None]
    shrunk = _shrunk(h, ((many * many) @ (many * many).T)[None], 100_000)[0]
    assert torch.allclose(shrunk, h[0] / 100_000, rtol=0.02, atol=1e-3)  # plenty of samples: S as it is


def test_few_calibration_rows_do_not_make_a_linear_worse_on_new_data(monkeypatch):
    """An MLP calibrated on 32 rows of 64 inputs: without shrinkage GPTQ fits the sample's noise and loses to
    round-to-nearest on held-out rows (measured: -0.1 to -0.4 dB on seeds 0-2); with it, it does not lose."""
    import fxquant.gptq as gptq_module

    def sqnr(ref, out):
        return float(10 * torch.log10((ref**2).sum() / ((ref - out) ** 2).sum()))

    held_out = torch.randn(512, 64, generator=torch.Generator().manual_seed(99))
    gains, estimators = {"shrunk": [], "raw": []}, {"shrunk": gptq_module._shrunk, "raw": lambda h, h2, n: h / n}
    for seed in range(3):
        torch.manual_seed(seed)
        mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
        calib = [torch.randn(32, 64, generator=torch.Generator().manual_seed(seed + 7))]
        with torch.no_grad():
            ref = mlp(held_out)
            rtn = sqnr(ref, fxquant.quantize(mlp, calib[0][:1], calib_data=calib, progress=False)(held_out))
            for label in gains:
                monkeypatch.setattr(gptq_module, "_shrunk", estimators[label])
                q = fxquant.quantize(mlp, calib[0][:1], calib_data=calib, progress=False, gptq=True)
                gains[label].append(sqnr(ref, q(held_out)) - rtn)
    assert sum(gains["raw"]) < 0  # the failure the shrinkage is for (the test would not see it otherwise)
    assert sum(gains["shrunk"]) >= 0 and sum(gains["shrunk"]) > sum(gains["raw"])


def test_inputs_whose_fourth_power_overflows_float32_still_round():
    """A random-init resnet152 feeds its last convs inputs of ~5e9: x^4 (the shrinkage's h2) is past float32's
    3.4e38, and H came out NaN; those sums are taken in float64."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    for calib in ([torch.randn(32, 8) * 1e10 for _ in range(2)],  # one batch's x^4 sums overflow float32
                  [torch.full((1, 8), 3e9) + torch.randn(1, 8) for _ in range(10)]):  # each is finite, their sum is not
        rounded = fxquant.quantize(net, calib[0][:1], calib_data=calib, progress=False, gptq=True)
        for name, m in roundable_layers(rounded):
            assert torch.isfinite(m.weight).all() and torch.equal(m.weight, m.quant_weight(min_scale=m.bias_scale_floor(m.bias))), name


def test_gptq_round_is_invariant_to_the_scale_of_h_and_survives_huge_ones():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 60, generator=g, dtype=torch.float64)
    h = (x @ x.T)[None]
    w = torch.randn(1, 5, 24, generator=g)
    scale = w.abs().amax(-1, keepdim=True) / 63
    base = gptq_round(w, h, scale, torch.zeros(()), -63, 63)
    for factor in (1e6, 1e20, 1e40):  # 1e40 is past float32: the first factorisation fails, H is brought to mean(diag) 1
        assert (gptq_round(w, h * factor, scale, torch.zeros(()), -63, 63) - base).abs().max() <= 1
