"""The one numeric oracle: ONNX QuantizeLinear / DequantizeLinear, read like the spec.

    QuantizeLinear:   q = saturate(round_half_to_even(x / scale) + zero_point)
    DequantizeLinear: x = (q - zero_point) * scale

Everything fxquant computes (fake-quant in training, the reference int8 graph, the bias
quantization of export) goes through these functions, and the tests check them against
`onnx.reference`.
"""

from __future__ import annotations

import math

import torch

from fxquant.specs import QuantSpec

TORCH_DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "int32": torch.int32}
_TINY_SCALE = torch.finfo(torch.float32).eps  # a range of zero width still gets a usable scale


def along(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshape per-channel qparams `t` so they broadcast against `x` along `axis`."""
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


LOW_PRECISION = (torch.float16, torch.bfloat16)  # quantized as their float32 values: x / s in float32, as ONNX Runtime does


def quantize(x_fp32, scale, zero_point, qmin: int, qmax: int, axis: int | None = None, dtype: str = "int32"):
    """QuantizeLinear. Returns the integer tensor stored as `dtype` (torch.round is half-to-even).
    A float16 / bfloat16 input is quantized as its float32 value (x / s in float16 would round twice)."""
    if x_fp32.dtype in LOW_PRECISION:
        x_fp32 = x_fp32.float()
    scale, zero_point = along(scale, x_fp32, axis), along(zero_point, x_fp32, axis)
    q = torch.round(x_fp32 / scale) + zero_point
    # float32 cannot hold the int32 bounds (2**31 - 1 rounds up to 2**31, which wraps on the cast): clamp in float64
    q = torch.clamp(q.double() if dtype == "int32" else q, qmin, qmax)
    return q.to(TORCH_DTYPES[dtype])


def dequantize(q_int, scale, zero_point, axis: int | None = None):
    """DequantizeLinear: (q - zero_point) * scale, in float32."""
    scale, zero_point = along(scale, q_int, axis), along(zero_point, q_int, axis)
    return (q_int.to(torch.float32) - zero_point.to(torch.float32)) * scale


def _bounds(zero_point: torch.Tensor, qmin: int, qmax: int, x: torch.Tensor, axis: int | None):
    """[qmin - zp, qmax - zp]: plain numbers when every channel has one zero point (clamps run faster)."""
    zp0 = zero_point.reshape(-1)[:1]
    if zero_point.numel() == 1 or bool((zero_point == zp0).all()):
        zp = float(zp0) if zp0.numel() else 0.0
        return qmin - zp, qmax - zp
    zp = along(zero_point, x, axis)
    return qmin - zp, qmax - zp


def _grid(x, scale, zero_point, qmin: int, qmax: int, axis: int | None, keep_v: bool = False):
    """v = x / s and q = clamp(round(v), qmin - zp, qmax - zp), with the mask of the unclipped elements.

    q * s is dequantize(quantize(x)) bit for bit: round(v) and zp are integers below 2**24, so adding zp,
    clamping to [qmin, qmax] and subtracting zp again is exact; shifting the bounds instead saves passes.
    """
    s = along(scale, x, axis)
    lo, hi = _bounds(zero_point, qmin, qmax, x, axis)
    v = torch.div(x, s)
    q = torch.round(v) if keep_v else v.round_()  # without keep_v, v is overwritten
    inside = q.ge(lo).logical_and_(q.le(hi))
    return s, v, q.clamp_(lo, hi), inside


class _FakeQuantSTE(torch.autograd.Function):
    """dequantize(quantize(x)) forward; straight-through gradient inside [qmin, qmax], zero outside."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):
        s, _, q, inside = _grid(x, scale, zero_point, qmin, qmax, axis)
        ctx.save_for_backward(inside)
        return q.mul_(s)

    @staticmethod
    def backward(ctx, grad_out):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad_out, 0.0), None, None, None, None, None


def _in_float32(fn):
    """`fn` on float32 for a float16 / bfloat16 input, the result cast back (autocast training): the grid is
    the one `quantize` uses, so x / s is not rounded to 11 (or 8) bits first."""

    def wrapped(x, *args, **kwargs):
        if x.dtype in LOW_PRECISION:
            return fn(x.float(), *args, **kwargs).to(x.dtype)
        return fn(x, *args, **kwargs)

    wrapped.__doc__, wrapped.__name__ = fn.__doc__, fn.__name__
    return wrapped


@_in_float32
def fake_quant(x, scale, zero_point, qmin: int, qmax: int, axis: int | None = None):
    """Float in, float out, on the quantization grid; differentiable with the STE."""
    return _FakeQuantSTE.apply(x, scale.to(x.dtype), zero_point.to(x.dtype), qmin, qmax, axis)


class _FakeQuantInRange(torch.autograd.Function):
    """fake_quant of a tensor that no element of can clip: round(x / s) * s, gradient 1 everywhere."""

    @staticmethod
    def forward(ctx, x, scale, axis):
        s = along(scale, x, axis)
        return torch.div(x, s).round_().mul_(s)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, None, None


@_in_float32
def fake_quant_in_range(x, scale, axis: int | None = None):
    """fake_quant(x, scale, zero_point, qmin, qmax, axis) when no element of x rounds outside [qmin, qmax]
    (the caller knows x's range): the clamp is then a no-op, the zero point cancels, (q + zp - zp) * s,
    and the STE gradient is 1 everywhere. Two passes fewer, and none in the backward."""
    return _FakeQuantInRange.apply(x, scale.to(x.dtype), axis)


SCALE_MIN = _TINY_SCALE  # a learned scale at or below this (zero, negative) is used as this: never a division by 0


def _sum_to(t: torch.Tensor, like: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Sum `t` over every dimension but `axis` (all of them per tensor), shaped like the qparam `like`."""
    if like.dim() == 0:
        return t.sum()
    return t.sum(dim=[d for d in range(t.dim()) if d != axis]).reshape(like.shape)


class _FakeQuantLSQ(torch.autograd.Function):
    """LSQ (Esser et al. 2020) and LSQ+ (Bhalgat et al. 2020): the STE forward, plus gradients for the qparams.

        v = x / s,   q = clamp(round(v), qmin - zp, qmax - zp),   y = q * s
        dy/dx  = 1 inside, 0 clipped                                        (the STE)
        dy/ds  = q - v inside, q clipped (q = qmin - zp or qmax - zp)      (round has an STE gradient)
        dy/dzp = 0 inside, -s clipped                                       (LSQ+ only)
    The qparam gradients are multiplied by g = 1 / sqrt(N * Qp): N elements per scale, Qp the positive levels.
    The scale used is max(scale, SCALE_MIN) and its gradient passes the clamp unchanged, so an optimizer can
    push a scale that went to zero or below back up; the zero point used is round(clamp(zp, qmin, qmax)).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, learn_zero_point):
        s_eff, zp_eff = scale.clamp(min=SCALE_MIN), zero_point.clamp(qmin, qmax).round()
        s, v, q, inside = _grid(x, s_eff, zp_eff, qmin, qmax, axis, keep_v=True)
        y = q * s
        ctx.save_for_backward(q.sub_(v.mul_(inside)), inside, s_eff, scale)  # q - v inside, q clipped: dy/ds
        ctx.axis, ctx.learn_zero_point = axis, learn_zero_point
        ctx.g = 1.0 / math.sqrt(x.numel() / max(1, scale.numel()) * (qmax if qmin < 0 else qmax - qmin))
        return y

    @staticmethod
    def backward(ctx, grad_out):
        dy_ds, inside, s_eff, scale = ctx.saved_tensors
        grad_scale = _sum_to(grad_out * dy_ds, scale, ctx.axis) * ctx.g
        grad_zp = None
        if ctx.learn_zero_point:
            clipped = grad_out * inside.logical_not()
            grad_zp = _sum_to(clipped, scale, ctx.axis) * (-s_eff * ctx.g)
        return torch.where(inside, grad_out, 0.0), grad_scale, grad_zp, None, None, None, None


@_in_float32
def fake_quant_lsq(x, scale, zero_point, qmin: int, qmax: int, axis: int | None = None, *, learn_zero_point: bool = False):
    """fake_quant with a learnable `scale` (and, with `learn_zero_point`, a learnable float `zero_point`)."""
    return _FakeQuantLSQ.apply(x, scale.to(x.dtype), zero_point.to(x.dtype), qmin, qmax, axis, learn_zero_point)


def qparams_from_range(min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec):
    """Scale and zero point that cover [min_val, max_val] (always widened to include 0).

    asymmetric: scale = (max - min) / (qmax - qmin), zero_point = qmin - round(min / scale)
    symmetric:  scale = max(|min|, |max|) / ((qmax - qmin) / 2), zero_point = 0
    """
    min_val = torch.clamp(min_val.float(), max=0.0)
    max_val = torch.clamp(max_val.float(), min=0.0)
    if spec.symmetric:
        amax = torch.maximum(-min_val, max_val)
        scale = torch.clamp(amax / ((spec.qmax - spec.qmin) / 2), min=_TINY_SCALE)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((max_val - min_val) / (spec.qmax - spec.qmin), min=_TINY_SCALE)
    zero_point = torch.clamp(spec.qmin - torch.round(min_val / scale), spec.qmin, spec.qmax)
    return scale, zero_point
