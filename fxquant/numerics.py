"""The one numeric oracle: ONNX QuantizeLinear / DequantizeLinear, read like the spec.

    QuantizeLinear:   q = saturate(round_half_to_even(x / scale) + zero_point)
    DequantizeLinear: x = (q - zero_point) * scale

Everything fxquant computes (fake-quant in training, the reference int8 graph, the bias
quantization of export) goes through these functions, and the tests check them against
`onnx.reference`.
"""

from __future__ import annotations

import torch

from fxquant.specs import QuantSpec

TORCH_DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "int32": torch.int32}
_TINY_SCALE = torch.finfo(torch.float32).eps  # a range of zero width still gets a usable scale


def _along(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshape per-channel qparams `t` so they broadcast against `x` along `axis`."""
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def quantize(x_fp32, scale, zero_point, qmin: int, qmax: int, axis: int | None = None, dtype: str = "int32"):
    """QuantizeLinear. Returns the integer tensor stored as `dtype` (torch.round is half-to-even)."""
    scale, zero_point = _along(scale, x_fp32, axis), _along(zero_point, x_fp32, axis)
    q = torch.clamp(torch.round(x_fp32 / scale) + zero_point, qmin, qmax)
    return q.to(TORCH_DTYPES[dtype])


def dequantize(q_int, scale, zero_point, axis: int | None = None):
    """DequantizeLinear: (q - zero_point) * scale, in float32."""
    scale, zero_point = _along(scale, q_int, axis), _along(zero_point, q_int, axis)
    return (q_int.to(torch.float32) - zero_point.to(torch.float32)) * scale


class _FakeQuantSTE(torch.autograd.Function):
    """dequantize(quantize(x)) forward; straight-through gradient inside [qmin, qmax], zero outside."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):
        s, zp = _along(scale, x, axis), _along(zero_point, x, axis)
        q = torch.round(x / s) + zp
        ctx.save_for_backward((q >= qmin) & (q <= qmax))
        return (torch.clamp(q, qmin, qmax) - zp) * s

    @staticmethod
    def backward(ctx, grad_out):
        (inside,) = ctx.saved_tensors
        return grad_out * inside, None, None, None, None, None


def fake_quant(x, scale, zero_point, qmin: int, qmax: int, axis: int | None = None):
    """Float in, float out, on the quantization grid; differentiable with the STE."""
    return _FakeQuantSTE.apply(x, scale.to(x.dtype), zero_point.to(x.dtype), qmin, qmax, axis)


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
