"""Learned scales: LSQ (Esser et al. 2020) and LSQ+ (Bhalgat et al. 2020).

fxquant's _FakeQuantLSQ writes the gradients out by hand; here they are checked against autograd run
through the papers' formulation: a scale whose gradient is multiplied by g = 1 / sqrt(N * Qp), a
round with a straight-through gradient, a clamp, (q - zp) * s. A scale at zero or below is used as
SCALE_MIN, never divided by: the outputs, gradients and exports stay finite.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant import FxQuantError, QuantSpec
from fxquant.check import agreement, ort_session, run_onnx
from fxquant.nn import FakeQuantize
from fxquant.numerics import SCALE_MIN, dequantize, fake_quant_lsq, quantize


def _ste(t):
    return (t.round() - t).detach() + t


def _lsq_by_autograd(x, scale, zero_point, qmin, qmax, axis, g):
    """The LSQ/LSQ+ papers' forward, differentiated by autograd (a zero point rounded with an STE, as LSQ+)."""
    s = (scale - scale * g).detach() + scale * g  # value: scale, gradient: g * d/ds
    zp = (zero_point - zero_point * g).detach() + zero_point * g
    zp = _ste(zp.clamp(qmin, qmax))
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        s, zp = s.reshape(shape), zp.reshape(shape)
    t = _ste(x / s) + zp
    inside = (t >= qmin) & (t <= qmax)  # on the rounded value, bounds included: fxquant's STE convention
    q = torch.where(inside, t, t.detach().clamp(qmin, qmax))  # clipped: a constant, so d/ds = q - zp, d/dzp = -s
    return (q - zp) * s


@pytest.mark.parametrize("axis, qmin, qmax, learn_zp", [(None, 0, 15, True), (None, 0, 255, False), (1, -7, 7, False)],
                         ids=["uint4_lsq+", "uint8_lsq", "int4_per_channel_lsq"])
def test_lsq_forward_and_gradients_match_the_papers_formulation(generator, axis, qmin, qmax, learn_zp):
    x = (torch.randn(4, 3, 5, 5, generator=generator) * 2).requires_grad_()
    shape = (3,) if axis is not None else ()
    scale = (torch.rand(shape, generator=generator) * 0.2 + 0.1).requires_grad_()
    zp = torch.full(shape, float(3 if qmin == 0 else 0), requires_grad=learn_zp)
    upstream = torch.randn(4, 3, 5, 5, generator=generator)

    y = fake_quant_lsq(x, scale, zp, qmin, qmax, axis, learn_zero_point=learn_zp)
    grads = torch.autograd.grad(y, [x, scale] + ([zp] if learn_zp else []), upstream)

    n = x.numel() / max(1, scale.numel())
    qp = qmax if qmin < 0 else qmax - qmin
    g = 1 / math.sqrt(n * qp)
    x2, s2, zp2 = x.detach().requires_grad_(), scale.detach().requires_grad_(), zp.detach().requires_grad_(learn_zp)
    y2 = _lsq_by_autograd(x2, s2, zp2, qmin, qmax, axis, g)
    grads2 = torch.autograd.grad(y2, [x2, s2] + ([zp2] if learn_zp else []), upstream)

    assert torch.equal(y, dequantize(quantize(x.detach(), scale.detach(), zp, qmin, qmax, axis), scale.detach(), zp, axis))
    torch.testing.assert_close(y, y2, rtol=0, atol=1e-6)
    torch.testing.assert_close(grads[0], grads2[0], rtol=1e-6, atol=0)  # the STE mask (autograd's is up * (1/s) * s)
    for ours, theirs in zip(grads[1:], grads2[1:]):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    assert (grads[0] == 0).any() and (grads[0] != 0).any()  # clipped and unclipped elements were both exercised


@pytest.mark.parametrize("bad", [0.0, -0.5, -1e-30])
def test_a_scale_at_zero_or_below_is_used_as_scale_min_and_stays_finite(generator, bad):
    x = (torch.randn(2, 8, generator=generator)).requires_grad_()
    scale = torch.tensor(bad, requires_grad=True)
    y = fake_quant_lsq(x, scale, torch.tensor(8.0), 0, 15)
    y.sum().backward()
    expected = dequantize(quantize(x.detach(), torch.tensor(SCALE_MIN), torch.tensor(8.0), 0, 15), torch.tensor(SCALE_MIN), torch.tensor(8.0))
    assert torch.equal(y, expected)
    assert torch.isfinite(x.grad).all() and torch.isfinite(scale.grad)
    assert scale.grad != 0  # the gradient passes the clamp: an optimizer can push the scale back up


def test_training_that_drives_scales_negative_keeps_weights_finite_and_converts(residual_cnn, image, generator, tmp_path):
    qm = fxquant.quantize(residual_cnn, (image,), qat=True, calib_data=[image], fake_quant="lsq", progress=False)
    scales = [m.scale for m in qm.modules() if isinstance(m, FakeQuantize)]
    with torch.no_grad():
        for s in scales[:3]:
            s.fill_(-0.01)  # as a too large learning rate would leave them
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)
    for _ in range(3):
        x = torch.randn(4, 3, 16, 16, generator=generator)
        loss = qm(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in qm.parameters())
    qm.eval()
    int8 = fxquant.convert(qm)
    scale_buffers = [b for n, b in int8.named_buffers() if n.endswith(("_fq_scale", "_w_scale"))]  # not s_x * s_w
    assert scale_buffers and all((b >= SCALE_MIN).all() for b in scale_buffers)
    fxquant.export_onnx(qm, tmp_path / "m.onnx", image)
    assert np.isfinite(run_onnx(ort_session(tmp_path / "m.onnx"), image)).all()


def test_learned_scale_starts_from_the_observer_then_only_the_optimizer_moves_it(generator):
    fq = FakeQuantize(QuantSpec("uint8", 0, 255, fake_quant="lsq"))
    assert isinstance(fq.scale, nn.Parameter)
    first = torch.randn(64, generator=generator)
    fq(first)
    lo, hi = min(first.min().item(), 0.0), max(first.max().item(), 0.0)
    assert fq.scale.item() == pytest.approx((hi - lo) / 255, rel=1e-6)
    before = fq.scale.detach().clone()
    fq(torch.randn(64, generator=generator) * 10)  # a wider batch: an observer would widen, LSQ does not
    assert torch.equal(fq.scale.detach(), before)
    fq(first * 3).pow(2).sum().backward()
    torch.optim.SGD(fq.parameters(), lr=1.0).step()
    assert not torch.equal(fq.scale.detach(), before)


def test_lsq_plus_learns_the_zero_point_and_exports_an_integer_one(residual_cnn, image, generator, tmp_path):
    qm = fxquant.quantize(residual_cnn, (image,), qat=True, calib_data=[image], fake_quant="lsq+", progress=False)
    x_fq = qm.get_submodule("x_fq")  # the input: asymmetric, so its zero point is learned
    assert isinstance(x_fq.zero_point, nn.Parameter)
    assert not isinstance(qm.get_submodule("stem").weight_fq.zero_point, nn.Parameter)  # weights: lsq, zero point 0
    opt = torch.optim.Adam(qm.parameters(), lr=0.05)
    start = x_fq.zero_point.detach().clone()
    for _ in range(5):
        x = torch.randn(4, 3, 16, 16, generator=generator) * 3  # wide inputs clip, so the zero point has a gradient
        loss = F.mse_loss(qm(x), torch.zeros(4, 5))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(x_fq.zero_point.detach(), start)
    qm.eval()
    fxquant.set_fake_quant(qm, observe=False)
    int8 = fxquant.convert(qm)
    assert torch.equal(int8.x_fq_zero_point, int8.x_fq_zero_point.round()) and 0 <= int8.x_fq_zero_point <= 255
    x = torch.randn(64, 3, 16, 16, generator=generator)
    with torch.no_grad():
        got = agreement(qm(x).numpy(), int8(x).numpy(), float(qm.get_submodule("fc_fq").qparams()[0]))
    assert got.max_steps <= 1 + 1e-4 and got.within_one_step == 1.0, got


def test_lsq_plus_on_a_symmetric_spec_is_rejected_and_quantize_names_bad_kinds(residual_cnn, image):
    with pytest.raises(FxQuantError, match=r"QuantSpec\.fake_quant='lsq\+'.*symmetric"):
        QuantSpec("int8", -127, 127, symmetric=True, axis=0, fake_quant="lsq+")
    with pytest.raises(FxQuantError, match=r"^fake_quant='lsq2': expected None"):
        fxquant.quantize(residual_cnn, (image,), fake_quant="lsq2", progress=False)
    with pytest.raises(FxQuantError, match=r"^observer='histogram': expected None"):
        fxquant.quantize(residual_cnn, (image,), observer="histogram", progress=False)


def test_fake_quant_kind_reaches_every_spec(residual_cnn, image):
    qm = fxquant.quantize(residual_cnn, (image,), qat=True, fake_quant="lsq", progress=False)
    fqs = [m for m in qm.modules() if isinstance(m, FakeQuantize)]
    assert fqs and all(fq.spec.fake_quant == "lsq" and isinstance(fq.scale, nn.Parameter) for fq in fqs)
    learned = {id(p) for p in qm.parameters()}
    assert all(id(fq.scale) in learned for fq in fqs)  # an optimizer built on qm.parameters() trains them
