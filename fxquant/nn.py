"""fxquant's modules: observers, the fake-quant module, and the fused conv/linear modules.

Fake-quant model                      Reference int8 model (after `convert`)
  FakeQuantize(x)                       dequantize(quantize(x))
  ConvAct2d(x) with weight_fq           act(conv2d(x, dequantize(w_i8), dequantize(b_i32)))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.errors import FxQuantError
from fxquant.numerics import fake_quant, qparams_from_range
from fxquant.specs import QuantSpec

# ---------------------------------------------------------------- observers


class MinMaxObserver(nn.Module):
    """Running min / max of everything seen (per tensor, or per channel along spec.axis)."""

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
        return torch.aminmax(per_channel, dim=1)

    def _update(self, lo, hi):
        self.min_val.copy_(torch.minimum(self.min_val, lo))
        self.max_val.copy_(torch.maximum(self.max_val, hi))

    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        lo, hi = self._batch_range(x.detach().float())
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise FxQuantError("observer saw NaN or Inf: check the model's inputs (calib_data) and weights")
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


OBSERVER_CLASSES = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "current": CurrentMinMaxObserver,
}

# ---------------------------------------------------------------- fake quant


class FakeQuantize(nn.Module):
    """Observe (optional) then fake-quantize with the observer's current qparams.

    `observe` and `enabled` are plain flags: calibration turns `enabled` off and `observe` on,
    PTQ inference the reverse, QAT keeps both on.
    """

    def __init__(self, spec: QuantSpec, channels: int | None = None):
        super().__init__()
        self.spec = spec
        self.observer = OBSERVER_CLASSES[spec.observer](spec, channels)
        shape = (channels,) if spec.axis is not None else ()
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))
        self.observe = True
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe:
            self.observer(x)
            scale, zero_point = self.observer.qparams()
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        if not self.enabled:
            return x
        return fake_quant(x, self.scale, self.zero_point, self.spec.qmin, self.spec.qmax, self.spec.axis)

    @property
    def calibrated(self) -> bool:
        return self.observer.has_data

    def extra_repr(self) -> str:
        s = self.spec
        where = "per-tensor" if s.axis is None else f"per-channel axis={s.axis}"
        return f"{s.dtype}[{s.qmin},{s.qmax}] {where} {s.observer} observe={self.observe} enabled={self.enabled}"


# ---------------------------------------------------------------- fused modules

ACTIVATIONS = {None: lambda y: y, "relu": F.relu, "relu6": F.relu6}


class _WeightedAct:
    """Shared by ConvAct2d and LinearAct: an optional fused activation and weight fake-quant."""

    act: str | None
    weight_fq: FakeQuantize | None

    def _init_fused(self, act: str | None):
        if act not in ACTIVATIONS:
            raise FxQuantError(f"act={act!r}: expected one of {list(ACTIVATIONS)}")
        self.act = act
        self.weight_fq = None

    def quant_weight(self) -> torch.Tensor:
        return self.weight if self.weight_fq is None else self.weight_fq(self.weight)

    @classmethod
    def from_float(cls, mod, act: str | None = None):
        """A fused copy of `mod` sharing its parameters; keeps an activation it already fused."""
        fused = cls.__new__(cls)
        fused.__dict__ = mod.__dict__.copy()
        fused._parameters = dict(mod._parameters)
        fused._modules = dict(mod._modules)
        fused._buffers = dict(mod._buffers)
        if not isinstance(mod, _WeightedAct):
            fused._init_fused(act)
        elif act is not None:
            fused.act = act
        return fused

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act}"


class ConvAct2d(_WeightedAct, nn.Conv2d):
    """act(conv2d(x, fq(weight), bias)): conv with folded BN and a fused activation."""

    def __init__(self, *args, act: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fused(act)

    def forward(self, x):
        return ACTIVATIONS[self.act](self._conv_forward(x, self.quant_weight(), self.bias))


class LinearAct(_WeightedAct, nn.Linear):
    """act(linear(x, fq(weight), bias))."""

    def __init__(self, *args, act: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fused(act)

    def forward(self, x):
        return ACTIVATIONS[self.act](F.linear(x, self.quant_weight(), self.bias))


FUSED_CLASSES = {nn.Conv2d: ConvAct2d, nn.Linear: LinearAct}


def fused_class(mod: nn.Module):
    """The fused class for a conv/linear module (or None); exact types only, subclasses are the user's."""
    if isinstance(mod, _WeightedAct):
        return type(mod)
    return FUSED_CLASSES.get(type(mod))
