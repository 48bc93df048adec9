"""fxquant's modules: the fake-quant module and the fused conv/linear modules (observers: fxquant.observers).

Fake-quant model                      Reference int8 model (after `convert`)
  FakeQuantize(x)                       dequantize(quantize(x))
  ConvAct2d(x) with weight_fq           act(conv2d(x, dequantize(w_i8), dequantize(b_i32)))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.errors import FxQuantError
from fxquant.numerics import SCALE_MIN, fake_quant, fake_quant_in_range, fake_quant_lsq, quantize
from fxquant.observers import OBSERVER_CLASSES
from fxquant.specs import QuantSpec

# ---------------------------------------------------------------- fake quant


class FakeQuantize(nn.Module):
    """Observe (optional) then fake-quantize with the observer's current qparams.

    `observe` and `enabled` are plain flags: calibration turns `enabled` off and `observe` on,
    PTQ inference the reverse, QAT keeps both on. Like a BatchNorm's statistics, the ranges of data
    move only in training mode: in eval mode a fake-quant observes only while calibrating (`enabled` off)
    or before it has any range, so evaluating a QAT model leaves its activation ranges as training left
    them. A weight's fake-quant (`of_weight`) observes a parameter, not data: in either mode.
    """

    of_weight = False

    def __init__(self, spec: QuantSpec, channels: int | None = None, *, of_weight: bool = False):
        super().__init__()
        self.spec = spec
        self.of_weight = of_weight
        self.observer = OBSERVER_CLASSES[spec.observer](spec, channels)
        shape = (channels,) if spec.axis is not None else ()
        self._qparam("scale", torch.ones(shape), learnable=self.learnable)
        self._qparam("zero_point", torch.zeros(shape), learnable=spec.fake_quant == "lsq+")
        self.observe = True
        self.enabled = True

    def _qparam(self, name: str, value: torch.Tensor, learnable: bool) -> None:
        if learnable:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    @property
    def learnable(self) -> bool:
        """lsq / lsq+: the scale (and zero point) are nn.Parameters the optimizer trains."""
        return self.spec.fake_quant != "ste"

    @property
    def observing(self) -> bool:
        """Whether the next forward updates the observer and takes the qparams from it.

        With `observe` on: in training mode; in eval mode only for a weight, while calibrating (fake-quant
        off) or while the observer has seen nothing (a scale of 1 would mean nothing). A learned scale is
        taken from the observer while calibrating and on the first batch it sees; after that it is
        learned, whatever `observe` says.
        """
        if not self.observe or (self.learnable and self.enabled and self.observer.has_data):
            return False
        return self.training or self.of_weight or not self.enabled or not self.observer.has_data

    def forward(self, x: torch.Tensor, min_scale: torch.Tensor | None = None) -> torch.Tensor:
        """fq(x); `min_scale` (per channel, a weight's: see WeightedAct.bias_scale_floor) raises the scale
        used where it is larger; the stored scale is left as observed or learned."""
        observed = self.observing
        if observed:
            self.observer(x)
            scale, zero_point = self.observer.qparams()
            with torch.no_grad():
                self.scale.copy_(scale)
                self.zero_point.copy_(zero_point)
        if not self.enabled:
            return x
        s = self.spec
        scale = self.scale if min_scale is None else torch.maximum(self.scale, min_scale.to(self.scale.dtype))
        if self.learnable:
            return fake_quant_lsq(x, scale, self.zero_point, s.qmin, s.qmax, s.axis, learn_zero_point=s.fake_quant == "lsq+")
        if observed and x.dtype == torch.float32 and self._cannot_clip(*self.observer.batch_range):
            return fake_quant_in_range(x, scale, s.axis)  # e.g. a weight, on the range just taken from it (a larger scale clips less)
        return fake_quant(x, scale, self.zero_point, s.qmin, s.qmax, s.axis)

    def _cannot_clip(self, lo: torch.Tensor, hi: torch.Tensor) -> bool:
        """Whether every element of a float32 batch with range [lo, hi] rounds into [qmin, qmax]. Exact:
        x / s (IEEE division by s > 0) and round are monotone, so the two ends decide for all elements."""
        q = torch.round(torch.stack([lo.reshape(self.scale.shape), hi.reshape(self.scale.shape)]) / self.scale) + self.zero_point
        return torch.equal(q, q.clamp(self.spec.qmin, self.spec.qmax))

    def qparams(self, min_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The (scale, zero_point) the forward uses, detached: a learned scale below SCALE_MIN (zero,
        negative) counts as SCALE_MIN, a learned zero point is rounded and clamped into [qmin, qmax];
        `min_scale` as in forward."""
        scale = self.scale.detach() if min_scale is None else torch.maximum(self.scale.detach(), min_scale)
        scale = scale.clamp(min=SCALE_MIN)
        return scale, self.zero_point.detach().clamp(self.spec.qmin, self.spec.qmax).round()

    # the flags travel with the scales: a PTQ checkpoint loaded into a fresh quantize() result must not observe
    def get_extra_state(self) -> dict:
        return {"observe": self.observe, "enabled": self.enabled}

    def set_extra_state(self, state: dict) -> None:
        self.observe, self.enabled = bool(state["observe"]), bool(state["enabled"])

    @property
    def calibrated(self) -> bool:
        return self.observer.has_data

    def extra_repr(self) -> str:
        s = self.spec
        where = "per-tensor" if s.axis is None else f"per-channel axis={s.axis}"
        return f"{s.dtype}[{s.qmin},{s.qmax}] {where} {s.observer} {s.fake_quant} observe={self.observe} enabled={self.enabled}"


# ---------------------------------------------------------------- fused modules

ACTIVATIONS = {None: lambda y: y, "relu": F.relu, "relu6": F.relu6}


class WeightedAct:
    """Shared by ConvAct2d and LinearAct: an optional fused activation and weight fake-quant.

    forward(x) = act(pre_activation(x)); a subclass gives `_apply_weight(x, w, b)` (conv2d / linear) and
    `channel_axis`, the output's channel dimension.
    """

    act: str | None
    weight_fq: FakeQuantize | None
    channel_axis: int

    def forward(self, x):
        return ACTIVATIONS[self.act](self.pre_activation(x))

    def pre_activation(self, x):
        """The layer's output before its fused activation: conv / linear with fq(weight) plus the bias."""
        floor = self.bias_scale_floor(self.bias)
        return self._apply_weight(x, self.quant_weight(min_scale=floor), self.quant_bias(self.bias, min_scale=floor))

    @property
    def output_bias(self) -> nn.Parameter | None:
        """The parameter added to every pre-activation output of its channel (None: the layer has none)."""
        return self.bias

    def _init_fused(self, act: str | None):
        if act not in ACTIVATIONS:
            raise FxQuantError(f"act={act!r}: expected one of {list(ACTIVATIONS)}")
        self.act = act
        self.weight_fq = None

    def bind_input(self, input_fq: FakeQuantize | None, bias_spec: QuantSpec | None) -> None:
        """The fake-quant whose grid the input is on, and the bias spec: the bias is then fake-quantized
        on the int32 grid s_x * s_w the int8 model stores it on (at 4 bits that grid is coarse enough to
        matter). Kept out of the module tree (it is another node's module), so not in the state_dict."""
        self.__dict__["input_fq"], self.__dict__["bias_spec"] = input_fq, bias_spec

    def quant_bias(self, bias: torch.Tensor | None, weight_scale: torch.Tensor | None = None,
                   min_scale: torch.Tensor | None = None) -> torch.Tensor | None:
        """bias on the s_x * s_w grid (STE gradient), when both fake-quants are on; else bias as it is.
        s_w is `weight_scale`, else the weight fake-quant's scale raised to `min_scale` (bias_scale_floor)."""
        input_fq, spec = self.__dict__.get("input_fq"), self.__dict__.get("bias_spec")
        if bias is None or spec is None or input_fq is None or self.weight_fq is None:
            return bias
        if not (input_fq.enabled and self.weight_fq.enabled and input_fq.calibrated):
            return bias
        w_scale = self.weight_fq.qparams(min_scale)[0] if weight_scale is None else weight_scale
        b_scale = input_fq.qparams()[0] * w_scale
        return fake_quant(bias, b_scale, torch.zeros_like(b_scale), spec.qmin, spec.qmax, 0 if b_scale.dim() else None)

    @torch.no_grad()
    def bias_scale_floor(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The smallest weight scale per output channel at which `bias` fits its integer grid, or None
        (no bias, a float bias, an input not calibrated yet).

        The bias is stored as round(b / (s_x * s_w)) in [qmin_b, qmax_b] (int32). A channel with a real
        bias and near-zero weights (a BatchNorm with gamma ~ 0 folded into a conv) has a tiny s_w, and its
        bias would clip: its output would be wrong with no hint. So s_w is raised to at least
            floor = |b| / (s_x * qmax_b) * (1 + 2**-10)
        (the margin covers float32 rounding of s_x * s_w and of the division, ~1e-7 relative), which
        costs that channel's weight precision, not its bias: ONNX Runtime's own quantizer does the same.
        The fake-quant forward and `lowered` use the raised scale alike, so QAT trains what convert stores;
        `raised_channels` lists the channels it changed (fxquant.report prints them)."""
        input_fq, spec = self.__dict__.get("input_fq"), self.__dict__.get("bias_spec")
        if bias is None or spec is None or input_fq is None or self.weight_fq is None or not input_fq.calibrated:
            return None
        s_x = input_fq.qparams()[0]
        return bias.detach().abs() / (s_x * spec.qmax) * (1 + 2**-10)

    def _note_raised(self, scale: torch.Tensor, floor: torch.Tensor | None) -> None:
        """Remember which channels `floor` raised (a plain attribute: not in the state_dict)."""
        raised = [] if floor is None else torch.nonzero(floor > scale.reshape(floor.shape)).flatten().tolist()
        self.__dict__["bias_raised"] = raised

    @property
    def raised_channels(self) -> list[int]:
        """Output channels whose weight scale was raised so the int32 bias fits (see bias_scale_floor),
        as of the latest forward or convert."""
        return list(self.__dict__.get("bias_raised", ()))

    def quant_weight(self, weight: torch.Tensor | None = None, min_scale: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        if self.weight_fq is None:
            return weight
        out = self.weight_fq(weight, min_scale)
        self._note_raised(self.weight_fq.scale.detach(), min_scale)
        return out

    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) with which the eval forward quantizes `self.weight` (raised by bias_scale_floor)."""
        return self.weight_fq.qparams(self.bias_scale_floor(self.bias))

    @torch.no_grad()
    def lowered(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, min_scale=None):
        """(w_int, w_scale, w_zero_point, float bias) that convert stores: `weight` (default: self.weight)
        quantized with the qparams the forward's fake-quant uses (observed, frozen or learned), its scale
        raised where the bias needs it (bias_scale_floor of `bias`, or `min_scale` when given)."""
        weight = (self.weight if weight is None else weight).detach()
        bias = self.bias if bias is None else bias
        floor = self.bias_scale_floor(bias) if min_scale is None else min_scale
        self.weight_fq(weight)  # runs the observer exactly when the forward would
        self._note_raised(self.weight_fq.scale.detach(), floor)
        scale, zero_point = self.weight_fq.qparams(floor)
        spec = self.weight_fq.spec
        w_int = quantize(weight, scale, zero_point, spec.qmin, spec.qmax, spec.axis, spec.dtype)
        return w_int, scale, zero_point, None if bias is None else bias.detach()

    @classmethod
    def from_float(cls, mod, act: str | None = None):
        """A fused copy of `mod` sharing its parameters; keeps an activation it already fused."""
        fused = cls.__new__(cls)
        fused.__dict__ = mod.__dict__.copy()
        fused._parameters = dict(mod._parameters)
        fused._modules = dict(mod._modules)
        fused._buffers = dict(mod._buffers)
        if not isinstance(mod, WeightedAct):
            fused._init_fused(act)
        elif act is not None:
            fused.act = act
        return fused

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act}"


class ConvAct(WeightedAct):
    """act(convNd(x, fq(weight), bias)): conv with folded BN and a fused activation (1-, 2- or 3-D)."""

    channel_axis = 1

    def __init__(self, *args, act: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fused(act)

    def _apply_weight(self, x, w, b):
        return self._conv_forward(x, w, b)

    @property
    def conv_function(self):
        """F.conv1d / F.conv2d / F.conv3d: what convert lowers this module to."""
        return CONV_FUNCTIONS[self.weight.dim() - 2]


CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvAct1d(ConvAct, nn.Conv1d):
    """act(conv1d(x, fq(weight), bias))."""


class ConvAct2d(ConvAct, nn.Conv2d):
    """act(conv2d(x, fq(weight), bias)): conv with folded BN and a fused activation."""


class ConvAct3d(ConvAct, nn.Conv3d):
    """act(conv3d(x, fq(weight), bias))."""


class LinearAct(WeightedAct, nn.Linear):
    """act(linear(x, fq(weight), bias))."""

    channel_axis = -1

    def __init__(self, *args, act: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fused(act)

    def _apply_weight(self, x, w, b):
        return F.linear(x, w, b)


class BnFolded:
    """QAT conv-bn(-act) and linear-bn(-act): the BN is folded into the fake-quantized weight while its
    statistics still train.

    Jacob et al. 2018 (sec. 3.2), Krishnamoorthi 2018 (sec. 3.2); per output channel, with
    sigma = sqrt(running_var + eps) and b the layer's bias (or 0):
        k = gamma / sigma,   w_fold = w * k,   b_fold = (b - running_mean) * k + beta
        eval, or BN frozen:  y = act(conv(x, fq(w_fold)) + b_fold)                   <- what convert lowers
        training:            y = act(bn(conv(x, fq(w_fold)) / k + b))                 bn on batch statistics
                               = act(conv(x, fq(w_fold)) * sigma / sigma_B + beta - gamma * (mu_B - b) / sigma_B)
    so batch statistics normalise (and update running_mean/var, as a BN would) while the fake-quant sees
    the folded weight the int8 model keeps. (Linear: the same with linear for conv, on (N, C) outputs.)

    With per-channel symmetric weights (axis 0, qmin = -qmax: every fxquant backend) the fold commutes
    with the fake-quant, fq(w * k) = k * fq'(w), where fq' has scales s / |k|: round half to even is odd
    and the range symmetric, and a range observer or a learned scale scales with its channel. So the
    module computes the same function without touching the weight tensor:
        eval / frozen:  y = act(conv(x, fq'(w)) * k + b_fold)
        training:       y = act(bn(conv(x, fq'(w)) + b))                  (the / k and * k cancel)
    and convert stores the integers sign(k) * q'(w) with scales |k| * s' (see `lowered`). Other weight
    specs (per tensor, asymmetric) fold explicitly as in the formulas above; a channel with gamma = 0
    divides by 1 there (its folded weight is 0 and bn returns beta for it either way).

    After freeze_bn() training uses the eval formula and the running statistics stay as they are
    (`bn_frozen` is a buffer, so a checkpoint keeps it).
    """

    @classmethod
    def from_layer_bn(cls, layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm, act: str | None = None):
        fused = cls.from_float(layer, act)
        fused.bn = bn
        fused.register_buffer("bn_frozen", torch.tensor(False))
        return fused

    def freeze_bn(self) -> None:
        self.bn_frozen.fill_(True)

    def _bn_factors(self):
        """k = gamma / sqrt(running_var + eps) and b_fold = (b - running_mean) * k + beta, per channel."""
        bn = self.bn
        k = 1 / torch.sqrt(bn.running_var + bn.eps)
        k = bn.weight * k if bn.affine else k
        bias = self.bias if self.bias is not None else torch.zeros_like(bn.running_mean)
        return k, (bias - bn.running_mean) * k + (bn.bias if bn.affine else 0.0)

    @property
    def commutes(self) -> bool:
        """Whether fq(w * k) = k * fq'(w) holds for the weight spec (per channel on axis 0, symmetric)."""
        spec = None if self.weight_fq is None else self.weight_fq.spec
        return spec is None or (spec.axis == 0 and spec.symmetric and spec.qmin == -spec.qmax)

    def _per_channel(self, t: torch.Tensor) -> torch.Tensor:
        """Per output channel values shaped to broadcast against the output: (1, C, 1, 1) or (1, C)."""
        return t.reshape(1, -1, *[1] * (self.weight.dim() - 2))

    def _per_row(self, t: torch.Tensor) -> torch.Tensor:
        """Per output channel values shaped to broadcast against the weight: (C, 1, 1, 1) or (C, 1)."""
        return t.reshape(-1, *[1] * (self.weight.dim() - 1))

    @property
    def output_bias(self) -> nn.Parameter | None:
        """beta: in eval and in training it adds to every pre-activation output of its channel."""
        return self.bn.bias if self.bn.affine else None

    def pre_activation(self, x):
        batch_stats = self.training and not bool(self.bn_frozen)
        if not self.commutes:
            return self._forward_folded(x, *self._bn_factors(), batch_stats)
        if not batch_stats:
            k, b_fold = self._bn_factors()
            floor = self.bias_scale_floor(b_fold)
            y = self._apply_weight(x, self.quant_weight(min_scale=self._unfolded_floor(k, floor)), None)
            b_fold = self.quant_bias(b_fold, self._folded_scale(k, floor) if self.weight_fq is not None else None)
            return torch.addcmul(self._per_channel(b_fold), y, self._per_channel(k))
        y = self._apply_weight(x, self.quant_weight(), None)  # conv(x, fq(w_fold)) / k
        if self.bias is not None:
            y = y + self._per_channel(self.bias)
        return self.bn(y)

    def _forward_folded(self, x, k, b_fold, batch_stats: bool):
        if not batch_stats:
            floor = self.bias_scale_floor(b_fold)
            w_q = self.quant_weight(self.weight * self._per_row(k), min_scale=floor)
            return self._apply_weight(x, w_q, self.quant_bias(b_fold, min_scale=floor))
        w_q = self.quant_weight(self.weight * self._per_row(k))
        y = self._apply_weight(x, w_q, None) / self._per_channel(torch.where(k == 0, 1.0, k))
        if self.bias is not None:
            y = y + self._per_channel(self.bias)
        return self.bn(y)

    def weight_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) with which the eval / frozen forward quantizes `self.weight` (the commuting case:
        the scales s' of the unfolded weight, see above)."""
        if not self.commutes:
            raise FxQuantError("weight_qparams: this weight spec folds the BatchNorm into the weight explicitly; "
                               "the weight quantized is weight * k, not self.weight")
        k, b_fold = self._bn_factors()
        return self.weight_fq.qparams(self._unfolded_floor(k, self.bias_scale_floor(b_fold)))

    @torch.no_grad()
    def lowered(self, weight=None, bias=None):
        """The folded weight's integers and qparams, and b_fold: what the eval / frozen forward computes."""
        k, b_fold = self._bn_factors()
        if not self.commutes:
            return super().lowered(self.weight * self._per_row(k), b_fold)
        floor = self.bias_scale_floor(b_fold)
        w_int, scale, zero_point, _ = super().lowered(min_scale=self._unfolded_floor(k, floor))
        w_int = w_int * torch.sign(self._per_row(k)).to(w_int.dtype)
        return w_int, self._folded_scale(k, floor), zero_point, b_fold.detach()

    @staticmethod
    def _unfolded_floor(k: torch.Tensor, floor: torch.Tensor | None) -> torch.Tensor | None:
        """The floor of the folded scale |k| * s' as a floor of s' (a channel with k = 0 has a zero folded
        weight whatever s' is: no floor; `_folded_scale` gives it the floor itself)."""
        if floor is None:
            return None
        k = k.detach().abs()
        return torch.where(k > 0, floor / torch.where(k > 0, k, 1.0), 0.0)

    def _folded_scale(self, k: torch.Tensor, floor: torch.Tensor | None = None) -> torch.Tensor:
        """The folded weight's scales |k| * s' (commuting case), as convert stores them, at least `floor`."""
        scale = (self.weight_fq.qparams(self._unfolded_floor(k, floor))[0] * k.detach().abs()).clamp(min=SCALE_MIN)
        return scale if floor is None else torch.maximum(scale, floor)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bn_frozen={bool(self.bn_frozen)}"


class ConvBnAct2d(BnFolded, ConvAct2d):
    """QAT conv-bn(-act), see BnFolded."""

    match_as = ConvAct2d  # backend rows written for ConvAct2d claim it


class ConvBnAct1d(BnFolded, ConvAct1d):
    """QAT conv1d-BatchNorm1d(-act), see BnFolded."""

    match_as = ConvAct1d


class ConvBnAct3d(BnFolded, ConvAct3d):
    """QAT conv3d-BatchNorm3d(-act), see BnFolded."""

    match_as = ConvAct3d


class LinearBnAct(BnFolded, LinearAct):
    """QAT linear-bn(-act) on (N, C) outputs (BatchNorm1d), see BnFolded."""

    match_as = LinearAct


class EmbeddingQ(WeightedAct, nn.Embedding):
    """embedding(ids, fq(weight)): a weight-only int8 table (one scale per row), read by Gather; no bias, no act."""

    channel_axis = -1

    def __init__(self, *args, act: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fused(act)

    bias = None

    def _apply_weight(self, x, w, b):
        return F.embedding(x, w, self.padding_idx)


FUSED_CLASSES = {nn.Conv1d: ConvAct1d, nn.Conv2d: ConvAct2d, nn.Conv3d: ConvAct3d, nn.Linear: LinearAct, nn.Embedding: EmbeddingQ}
BN_FOLDED_CLASSES = {nn.Conv1d: ConvBnAct1d, nn.Conv2d: ConvBnAct2d, nn.Conv3d: ConvBnAct3d, nn.Linear: LinearBnAct}  # qat=True: the layer keeps its BN training


def fused_class(mod: nn.Module):
    """The fused class for a conv/linear module (or None); exact types only, subclasses are the user's."""
    if isinstance(mod, WeightedAct):
        return type(mod)
    return FUSED_CLASSES.get(type(mod))


def fake_quants(model: nn.Module) -> list[FakeQuantize]:
    """Every FakeQuantize in `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, FakeQuantize)]


def set_fake_quant(model: nn.Module, *, observe: bool | None = None, enabled: bool | None = None) -> None:
    """Turn observing and fake-quantizing on or off for every FakeQuantize in the model."""
    for fq in fake_quants(model):
        if observe is not None:
            fq.observe = observe
        if enabled is not None:
            fq.enabled = enabled
