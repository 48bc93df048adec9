"""The percentile and MSE observers, and the fake-quant shortcut that the observed range allows.

Each chosen range is checked against a second computation on the raw data: torch.quantile for the
percentile, a brute-force search of the quantization error for MSE. The histogram has 2048 bins, so
ranges agree to a bin width or two; errors are compared as ratios.
"""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant import FxQuantError, QuantSpec
from fxquant.nn import FakeQuantize
from fxquant.observers import HistogramObserver
from fxquant.numerics import dequantize, fake_quant, qparams_from_range, quantize
from fxquant.specs import activation_spec, weight_spec


def _qerror(x: torch.Tensor, lo, hi, spec: QuantSpec) -> float:
    scale, zp = qparams_from_range(torch.as_tensor(lo), torch.as_tensor(hi), spec)
    back = dequantize(quantize(x, scale, zp, spec.qmin, spec.qmax, None, spec.dtype), scale, zp)
    return float(((back - x) ** 2).sum())


def _heavy_tailed(g: torch.Generator, n: int = 50000) -> torch.Tensor:
    x = torch.randn(n, generator=g)
    x[:3] = torch.tensor([20.0, 30.0, 40.0])  # outliers far out on the right, 0.006 % of the values
    return x


def test_percentile_range_is_the_data_quantiles_within_a_bin(generator):
    batches = [_heavy_tailed(generator) for _ in range(3)]
    obs = HistogramObserver(activation_spec(observer="percentile"))
    for b in batches:
        obs(b)
    everything = torch.cat(batches)
    assert obs.histogram.sum() == everything.numel()  # re-binning kept every count
    lo, hi = obs._chosen_range()
    p = obs.percentile
    bin_width = (everything.max() - everything.min()) / obs.bins
    assert abs(lo - torch.quantile(everything, 1 - p)) <= 2 * bin_width
    assert abs(hi - torch.quantile(everything, p)) <= 2 * bin_width
    assert hi < everything.max() / 2  # the outliers were cut off


def test_mse_range_beats_minmax_and_is_near_the_brute_force_optimum(generator):
    x = _heavy_tailed(generator)
    spec = activation_spec(bits=4, observer="mse")
    obs = HistogramObserver(spec)
    obs(x)
    lo, hi = obs._chosen_range()
    chosen, minmax = _qerror(x, lo, hi, spec), _qerror(x, x.min(), x.max(), spec)
    best = min(_qerror(x, a * x.min(), a * x.max(), spec) for a in torch.linspace(0.005, 1, 200))
    assert chosen < 0.5 * minmax
    assert chosen <= 1.1 * best


def test_per_channel_mse_and_percentile_choose_on_the_latest_weight(generator):
    w = torch.randn(6, 64, 3, 3, generator=generator)
    w[0, 0, 0, 0] = 9.0  # one channel with an outlier
    spec = weight_spec(bits=4)
    for name in ("mse", "percentile"):
        obs = HistogramObserver(QuantSpec(spec.dtype, spec.qmin, spec.qmax, symmetric=True, axis=0, observer=name), channels=6)
        obs(torch.randn(6, 64, 3, 3, generator=generator) * 100)  # forgotten: per channel is the latest tensor only
        obs(w)
        assert (obs.max_val <= w.amax(dim=(1, 2, 3)) + 1e-6).all()
    mse_spec = QuantSpec(spec.dtype, spec.qmin, spec.qmax, symmetric=True, axis=0, observer="mse")
    obs = HistogramObserver(mse_spec, channels=6)
    obs(w)
    scale, zp = obs.qparams()
    for c in range(6):  # per channel, no worse than brute force over the same candidates, much better than min-max
        row = w[c].flatten()
        got = float(((dequantize(quantize(row, scale[c], zp[c], -7, 7, None, "int8"), scale[c], zp[c]) - row) ** 2).sum())
        amax = row.abs().max()
        best = min(_qerror(row, -a * amax, a * amax, QuantSpec("int8", -7, 7, symmetric=True)) for a in obs.channel_alphas)
        assert got <= best * (1 + 1e-5) + 1e-12
    assert obs.max_val[0] < 9.0 * 0.7  # the outlier channel is clipped


def test_histogram_grows_its_range_and_keeps_its_mass(generator):
    obs = HistogramObserver(activation_spec(observer="mse"))
    sizes = 0
    for scale in (0.1, 1.0, 5.0, 0.5):
        b = torch.randn(1000, generator=generator) * scale
        obs(b)
        sizes += b.numel()
    assert obs.histogram.sum() == sizes
    assert obs.min_val < -5 and obs.max_val > 5


def test_histogram_observers_reject_nan(generator):
    obs = HistogramObserver(activation_spec(observer="percentile"))
    obs(torch.randn(10, generator=generator))
    with pytest.raises(FxQuantError, match="NaN or Inf"):
        obs(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("observer, weights", [("mse", "mse"), ("percentile", "percentile"), ("moving_average", "current")])
def test_observer_choice_reaches_the_specs_and_converts(residual_cnn, image, calib_batches, observer, weights):
    qm = fxquant.quantize(residual_cnn, (image,), calib_data=calib_batches, observer=observer, w_bits=4, a_bits=4, progress=False)
    acts = [m for n, m in qm.named_modules() if isinstance(m, FakeQuantize) and m.spec.axis is None]
    assert acts and all(m.spec.observer == observer for m in acts)
    w_fqs = [m.weight_fq for m in qm.modules() if getattr(m, "weight_fq", None)]
    assert w_fqs and all(fq.spec.observer == weights for fq in w_fqs)  # weights: a range on the latest weight
    int8 = fxquant.convert(qm)
    with torch.no_grad():
        assert torch.isfinite(int8(image)).all()


# ---------------------------------------------------------------- the in-range shortcut


@pytest.mark.parametrize("spec, channels", [(weight_spec(), 6), (activation_spec(), None), (activation_spec(bits=4), None)],
                         ids=["weight_current", "act_minmax", "act_minmax_4bit"])
def test_fake_quant_on_the_range_just_observed_equals_the_general_path(generator, spec, channels):
    """A range taken from x itself: no element clips, so FakeQuantize skips the clamp and the mask.
    The result, and the gradient, must be those of the general fake_quant bit for bit."""
    x = (torch.randn(6, 4, 3, 3, generator=generator) * 2).requires_grad_()
    fq = FakeQuantize(spec, channels=channels)
    y = fq(x)
    assert fq._cannot_clip(*fq.observer.batch_range)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(x))
    y2 = fake_quant(x, fq.scale, fq.zero_point, spec.qmin, spec.qmax, spec.axis)
    (g2,) = torch.autograd.grad(y2, x, torch.ones_like(x))
    assert torch.equal(y, y2) and torch.equal(g, g2)


def test_a_range_that_clips_takes_the_general_path(generator):
    fq = FakeQuantize(activation_spec(observer="moving_average"))
    fq(torch.randn(100, generator=generator))
    x = (torch.randn(100, generator=generator) * 5).requires_grad_()  # wider than the average: clips
    y = fq(x)
    assert not fq._cannot_clip(*fq.observer.batch_range)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(x))
    assert (g == 0).any() and (g == 1).any()
    assert torch.equal(y, fake_quant(x.detach(), fq.scale, fq.zero_point, 0, 255))
