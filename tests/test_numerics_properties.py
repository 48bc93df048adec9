"""Issue 14, item 9: properties of the numeric oracle (fxquant.numerics), drawn by hypothesis.

Each property states what ONNX QuantizeLinear / DequantizeLinear say and checks it against a second
computation in exact Python arithmetic (integers, fractions) or against the same call done another way
(per channel vs one slice at a time, float16 vs its float32 value)."""

import math
from fractions import Fraction

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.numerics import dequantize, fake_quant, qparams_from_range, quantize
from fxquant.specs import DTYPE_RANGES, QuantSpec

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None)
DTYPES = st.sampled_from(["uint8", "int8", "int32"])
POW2_SCALES = st.integers(-12, 6).map(lambda e: 2.0**e)  # x / s is then exact in float32
FLOATS = st.floats(-1e6, 1e6, allow_nan=False, width=32)


def _zp(dtype, draw_int):
    lo, hi = DTYPE_RANGES[dtype]
    return 0 if dtype == "int32" else draw_int(lo, hi)


@SETTINGS
@given(k=st.integers(-100, 100), scale=POW2_SCALES)
def test_a_half_rounds_to_the_even_integer(k, scale):
    x = torch.tensor([(k + 0.5) * scale])  # exactly halfway between k and k + 1
    q = int(quantize(x, torch.tensor(scale), torch.tensor(0.0), -(2**31), 2**31 - 1, None, "int32"))
    assert q == (k if k % 2 == 0 else k + 1)


@SETTINGS
@given(dtype=DTYPES, data=st.data(), values=st.lists(FLOATS, min_size=1, max_size=20), scale=POW2_SCALES)
def test_quantize_is_the_exact_formula_saturated(dtype, data, values, scale):
    lo, hi = DTYPE_RANGES[dtype]
    zp = 0 if dtype == "int32" else data.draw(st.integers(lo, hi))
    q = quantize(torch.tensor(values), torch.tensor(scale), torch.tensor(float(zp)), lo, hi, None, dtype)
    for v, got in zip(values, q.tolist()):
        exact = Fraction(v) / Fraction(scale)
        expected = round(exact) + zp  # Python's round: half to even, on the exact quotient
        assert got == min(max(expected, lo), hi)


@SETTINGS
@given(dtype=st.sampled_from(["uint8", "int8"]), data=st.data(), scale=st.floats(2.0**-20, 1e3, width=32))
def test_the_round_trip_is_within_half_a_step_inside_the_range(dtype, data, scale):
    lo, hi = DTYPE_RANGES[dtype]
    zp = data.draw(st.integers(lo, hi))
    inside = st.floats((lo - zp) * scale * (1 - 1e-6), (hi - zp) * scale * (1 - 1e-6))  # float32 rounding stays inside
    x = torch.tensor(data.draw(st.lists(inside, min_size=1, max_size=30)), dtype=torch.float32)
    s, z = torch.tensor(scale), torch.tensor(float(zp))
    back = dequantize(quantize(x, s, z, lo, hi, None, dtype), s, z)
    assert ((back.double() - x.double()).abs() <= scale / 2 * (1 + 1e-5) + 1e-30).all()


@SETTINGS
@given(data=st.data(), rank=st.integers(1, 4))
def test_per_channel_on_every_axis_is_one_scale_per_slice(data, rank):
    shape = data.draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))
    axis = data.draw(st.integers(0, rank - 1))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    x = torch.randn(shape, generator=g) * 3
    scale = torch.rand(shape[axis], generator=g) + 0.01
    q = quantize(x, scale, torch.zeros(shape[axis]), -127, 127, axis, "int8")
    back = dequantize(q, scale, torch.zeros(shape[axis]), axis)
    for c in range(shape[axis]):
        one = x.select(axis, c)
        q_c = quantize(one, scale[c], torch.tensor(0.0), -127, 127, None, "int8")
        assert torch.equal(q.select(axis, c), q_c)
        assert torch.equal(back.select(axis, c), dequantize(q_c, scale[c], torch.tensor(0.0)))


@SETTINGS
@given(value=st.floats(-1e4, 1e4, width=32), symmetric=st.booleans(), n=st.integers(1, 10))
def test_constant_and_all_zero_tensors_round_trip(value, symmetric, n):
    spec = QuantSpec("int8", -127, 127, symmetric=True) if symmetric else QuantSpec()
    x = torch.full((n,), value)
    scale, zp = qparams_from_range(x.min(), x.max(), spec)
    assert torch.isfinite(scale) and scale > 0
    back = dequantize(quantize(x, scale, zp, spec.qmin, spec.qmax, None, spec.dtype), scale, zp)
    assert ((back - x).abs() <= scale / 2 * (1 + 1e-5)).all()
    zero = dequantize(quantize(torch.zeros(n), scale, zp, spec.qmin, spec.qmax, None, spec.dtype), scale, zp)
    assert torch.equal(zero, torch.zeros(n))  # zero is exactly on every grid (zero padding, ReLU)


@SETTINGS
@given(dtype=DTYPES, sign=st.sampled_from([-1.0, 1.0]), exponent=st.integers(-45, 38), scale=st.floats(2.0**-26, 1e3, width=32))
def test_denormals_quantize_to_the_zero_point_and_huge_values_saturate(dtype, sign, exponent, scale):
    lo, hi = DTYPE_RANGES[dtype]
    x = torch.tensor([sign * 10.0**exponent], dtype=torch.float32)
    q = int(quantize(x, torch.tensor(scale), torch.tensor(0.0), lo, hi, None, dtype))
    exact = Fraction(float(x)) / Fraction(float(torch.tensor(scale)))
    if float(x) != 0 and abs(float(x)) < torch.finfo(torch.float32).tiny:  # a denormal: |x| / s < 0.5 for s >= 2**-26
        assert q == 0
    assert q == min(max(round(exact), lo), hi) or math.isinf(float(x) / scale)  # x / s overflowing float32 saturates
    if math.isinf(float(x) / scale):
        assert q == (hi if sign > 0 else lo)


@SETTINGS
@given(values=st.lists(st.floats(-300, 300, width=16), min_size=1, max_size=30), scale=st.floats(2.0**-10, 10, width=32),
       low=st.sampled_from([torch.float16, torch.bfloat16]), per_channel=st.booleans())
def test_float16_and_bfloat16_inputs_quantize_as_their_float32_values(values, scale, low, per_channel):
    x = torch.tensor(values).to(low)
    s = torch.full((len(values),), scale) if per_channel else torch.tensor(scale)
    zp = torch.zeros_like(s)
    axis = 0 if per_channel else None
    assert torch.equal(quantize(x, s, zp, -128, 127, axis, "int8"), quantize(x.float(), s, zp, -128, 127, axis, "int8"))
    fq = fake_quant(x, s, zp, -128, 127, axis)
    assert fq.dtype == low
    assert torch.equal(fq, fake_quant(x.float(), s, zp, -128, 127, axis).to(low))
