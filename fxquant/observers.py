"""Observers: what a fake-quant learns its range from (min-max, moving average, current batch, histogram).

    MinMaxObserver               running min / max of everything seen ("minmax")
    MovingAverageMinMaxObserver  exponential moving average of each batch's min / max ("moving_average")
    CurrentMinMaxObserver        this batch's min / max only ("current"; weights in QAT)
    HistogramObserver            a histogram, the range picked by percentile or by least squared error ("percentile", "mse")

Each holds its range as buffers (so it is state_dict-able) and returns qparams for its QuantSpec;
fxquant.nn.FakeQuantize owns one, chosen by the spec's `observer` through OBSERVER_CLASSES.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fxquant.errors import FxQuantError
from fxquant.numerics import SCALE_MIN, qparams_from_range
from fxquant.specs import QuantSpec



def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class MinMaxObserver(nn.Module):
    """Running min / max of everything seen (per tensor, or per channel along spec.axis).

    Distributed training: in training mode, with torch.distributed initialized, each batch's range is
    all-reduced (min of the mins, max of the maxes) before it is used, so every rank holds the same
    statistics and hence the same scales. In eval mode (calibration, convert, evaluating on one rank)
    nothing is communicated: calibrate on the same data on every rank, or before spawning.
    """

    def __init__(self, spec: QuantSpec, channels: int | None = None):
        super().__init__()
        self.spec = spec
        shape = (channels,) if spec.axis is not None else ()
        self.register_buffer("min_val", torch.full(shape, float("inf")))
        self.register_buffer("max_val", torch.full(shape, float("-inf")))

    @property
    def has_data(self) -> bool:
        return bool(torch.isfinite(self.min_val).all() and torch.isfinite(self.max_val).all())

    def _batch_range(self, x: torch.Tensor):
        if self.spec.axis is None:
            return torch.aminmax(x)
        per_channel = x.transpose(0, self.spec.axis).reshape(x.shape[self.spec.axis], -1)
        return per_channel.amin(1), per_channel.amax(1)  # several times faster than aminmax(dim=1) on CPU

    def _update(self, lo, hi):
        torch.minimum(self.min_val, lo, out=self.min_val)
        torch.maximum(self.max_val, hi, out=self.max_val)

    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        lo, hi = self._batch_range(x.detach().float())
        if not bool(torch.isfinite(torch.stack((lo, hi))).all()):
            where = f" of fake-quant '{self.label}'" if getattr(self, "label", None) else ""
            raise FxQuantError(f"observer{where} saw NaN or Inf: check the model's inputs (calib_data) and weights")
        if self.training and _distributed():
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        self.batch_range = (lo, hi)  # of the latest batch (over all ranks): FakeQuantize checks it for clipping
        self._update(lo, hi)
        return x

    def qparams(self):
        return qparams_from_range(self.min_val, self.max_val, self.spec)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """min/max as exponential moving averages: m <- m + c * (batch_m - m); the first batch sets them."""

    averaging_constant = 0.01

    def _update(self, lo, hi):
        if not self.has_data:
            return super()._update(lo, hi)
        c = self.averaging_constant
        self.min_val.add_(c * (lo - self.min_val))
        self.max_val.add_(c * (hi - self.max_val))


class CurrentMinMaxObserver(MinMaxObserver):
    """The range of the latest tensor only: a weight's qparams follow the weight as it trains."""

    def _update(self, lo, hi):
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)


def _squared_error(samples, counts, lo, hi, spec: QuantSpec) -> torch.Tensor:
    """Per row r: sum of counts * (fake_quant(samples[r]) - samples[r])**2, qparams covering [lo[r], hi[r]]."""
    scale, zp = qparams_from_range(lo, hi, spec)
    scale, zp = scale[:, None], zp[:, None]
    q = torch.clamp(torch.round(samples / scale) + zp, spec.qmin, spec.qmax)
    return (counts * ((q - zp) * scale - samples) ** 2).sum(1)


class HistogramObserver(MinMaxObserver):
    """A range chosen to cover most of the data (percentile) or to minimise the quantization error (mse).

    Per tensor (activations): a histogram of `bins` bins over the running [min_val, max_val] gathers every
    batch (re-binned when the range grows; summed over ranks like the min/max), and qparams() chooses
    the range on it. Per channel (weights): the range is chosen on the latest tensor alone, like
    CurrentMinMaxObserver, and min_val/max_val hold the chosen range.

    percentile: [q(1 - p), q(p)] with p = `percentile`; mse: the [a * min, a * max], a in `alphas`, whose
    round-to-grid error is smallest (on the histogram's bin centres, or on the channel's values).
    """

    bins = 2048
    percentile = 0.9999
    alphas = torch.linspace(0.01, 1.0, 100)  # candidate fractions of the full range (per tensor)
    channel_alphas = torch.linspace(0.1, 1.0, 25)  # per channel each candidate is a pass over the weight

    def __init__(self, spec: QuantSpec, channels: int | None = None):
        super().__init__(spec, channels)
        self.register_buffer("histogram", torch.zeros(self.bins if spec.axis is None else 0))

    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        if self.spec.axis is not None:
            super().forward(x)  # min_val/max_val: this tensor's range (see _update), NaN and Inf rejected
            rows = x.detach().float().transpose(0, self.spec.axis).reshape(x.shape[self.spec.axis], -1)
            lo, hi = self._choose_per_channel(rows)
            self.min_val.copy_(lo), self.max_val.copy_(hi)
            return x
        old = (self.min_val.item(), self.max_val.item())
        super().forward(x)
        self._rebin(*old)
        hist = torch.histc(x.detach().float(), self.bins, *self._edges_range())
        if self.training and _distributed():
            dist.all_reduce(hist)
        self.histogram += hist
        return x

    def _update(self, lo, hi):
        if self.spec.axis is None:
            return super()._update(lo, hi)
        self.min_val.copy_(lo)
        self.max_val.copy_(hi)

    def _edges_range(self) -> tuple[float, float]:
        lo, hi = self.min_val.item(), self.max_val.item()
        return lo, max(hi, lo + SCALE_MIN * max(1.0, abs(lo)))  # a zero-width range still gets bins

    def _rebin(self, old_lo: float, old_hi: float) -> None:
        """Move the counts gathered over [old_lo, old_hi] into the bins of the (wider) current range."""
        lo, hi = self._edges_range()
        if not self.histogram.any() or (old_lo, old_hi) == (lo, hi):
            return
        old_hi = max(old_hi, old_lo + SCALE_MIN * max(1.0, abs(old_lo)))
        centres = old_lo + (torch.arange(self.bins) + 0.5) * ((old_hi - old_lo) / self.bins)
        index = ((centres - lo) / ((hi - lo) / self.bins)).long().clamp(0, self.bins - 1)
        self.histogram.copy_(torch.zeros_like(self.histogram).index_add_(0, index, self.histogram))

    def _chosen_range(self):
        lo, hi = self._edges_range()
        edges = torch.linspace(lo, hi, self.bins + 1)
        if self.spec.observer == "percentile":
            cdf = self.histogram.cumsum(0) / self.histogram.sum()
            i_lo = int(torch.searchsorted(cdf, torch.tensor(1 - self.percentile)))
            i_hi = int(torch.searchsorted(cdf, torch.tensor(self.percentile)))
            return edges[min(i_lo, self.bins - 1)], edges[min(i_hi + 1, self.bins)]
        centres = (edges[:-1] + edges[1:]) / 2
        n = len(self.alphas)
        err = _squared_error(centres.expand(n, -1), self.histogram.expand(n, -1), self.alphas * lo, self.alphas * hi, self.spec)
        best = self.alphas[int(err.argmin())]
        return best * lo, best * hi

    def _choose_per_channel(self, rows: torch.Tensor):
        lo, hi = self.min_val.clone(), self.max_val.clone()
        if self.spec.observer == "percentile":
            n = rows.shape[1]
            k_lo, k_hi = max(1, int((1 - self.percentile) * n)), max(1, min(n, round(self.percentile * n)))
            return rows.kthvalue(k_lo, dim=1).values, rows.kthvalue(k_hi, dim=1).values
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for a in self.channel_alphas:
            err = _squared_error(rows, 1.0, lo * a, hi * a, self.spec)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo * a, best_lo), torch.where(better, hi * a, best_hi)
        return best_lo, best_hi

    def qparams(self):
        if self.spec.axis is not None or not self.has_data:
            return super().qparams()
        lo, hi = self._chosen_range()
        return qparams_from_range(lo, hi, self.spec)


OBSERVER_CLASSES = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "current": CurrentMinMaxObserver,
    "percentile": HistogramObserver,
    "mse": HistogramObserver,
}
