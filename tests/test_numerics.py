"""The numeric oracle (fxquant.numerics) and the observers, each checked a second, independent way.

QuantizeLinear / DequantizeLinear are compared bit-exactly with `onnx.reference` running a
one-node model; fake_quant with dequantize(quantize(x)); the STE gradient with a mask written
out by hand; observers with torch reductions over everything they were fed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from fxquant import FxQuantError, QuantSpec
from fxquant.nn import FakeQuantize
from fxquant.observers import CurrentMinMaxObserver, MinMaxObserver, MovingAverageMinMaxObserver
from fxquant.numerics import dequantize, fake_quant, qparams_from_range, quantize
from fxquant.specs import BIAS_SPEC, activation_spec, weight_spec

ONNX_TYPES = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8, "int32": TensorProto.INT32}
NP_TYPES = {"uint8": np.uint8, "int8": np.int8, "int32": np.int32}


def _one_node_model(op: str, axis: int, dtype: str):
    """QuantizeLinear(x, s, zp) -> y:dtype  or  DequantizeLinear(q:dtype, s, zp) -> float."""
    int_t = ONNX_TYPES[dtype]
    x_type, y_type = (TensorProto.FLOAT, int_t) if op == "QuantizeLinear" else (int_t, TensorProto.FLOAT)
    node = helper.make_node(op, ["x", "s", "zp"], ["y"], axis=axis)
    graph = helper.make_graph(
        [node],
        op,
        [
            helper.make_tensor_value_info("x", x_type, None),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("zp", int_t, None),
        ],
        [helper.make_tensor_value_info("y", y_type, None)],
    )
    return ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def onnx_quantize(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, dtype: str, axis: int | None) -> torch.Tensor:
    ev = _one_node_model("QuantizeLinear", 1 if axis is None else axis, dtype)
    feeds = {"x": x.numpy(), "s": scale.numpy().astype(np.float32), "zp": zp.numpy().astype(NP_TYPES[dtype])}
    return torch.from_numpy(ev.run(None, feeds)[0])


def onnx_dequantize(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, dtype: str, axis: int | None) -> torch.Tensor:
    ev = _one_node_model("DequantizeLinear", 1 if axis is None else axis, dtype)
    feeds = {"x": q.numpy(), "s": scale.numpy().astype(np.float32), "zp": zp.numpy().astype(NP_TYPES[dtype])}
    return torch.from_numpy(ev.run(None, feeds)[0])


# ---------------------------------------------------------------- quantize / dequantize vs onnx.reference

PER_TENSOR_U8 = dict(scale=torch.tensor(0.037), zp=torch.tensor(131.0), qmin=0, qmax=255, axis=None, dtype="uint8")


def _per_channel_i8(channels: int, axis: int, g: torch.Generator):
    return dict(
        scale=torch.rand(channels, generator=g) * 0.05 + 0.01,
        zp=torch.randint(-20, 21, (channels,), generator=g).float(),
        qmin=-128, qmax=127, axis=axis, dtype="int8",
    )


def test_quantize_per_tensor_uint8_matches_onnx_bit_exactly(generator):
    p = PER_TENSOR_U8
    x = torch.randn(4, 3, 8, 8, generator=generator) * 4  # wide enough that both ends saturate
    ours = quantize(x, p["scale"], p["zp"], p["qmin"], p["qmax"], p["axis"], p["dtype"])
    theirs = onnx_quantize(x, p["scale"], p["zp"], "uint8", None)
    assert ours.dtype == torch.uint8
    assert torch.equal(ours, theirs)
    assert (ours == 0).any() and (ours == 255).any()  # the comparison covered saturation


@pytest.mark.parametrize("axis, shape", [(0, (6, 3, 3, 3)), (1, (2, 6, 5, 5))])
def test_quantize_per_channel_int8_matches_onnx_bit_exactly(generator, axis, shape):
    p = _per_channel_i8(shape[axis], axis, generator)
    x = torch.randn(*shape, generator=generator) * 3
    ours = quantize(x, p["scale"], p["zp"], p["qmin"], p["qmax"], axis, "int8")
    theirs = onnx_quantize(x, p["scale"], p["zp"], "int8", axis)
    assert ours.dtype == torch.int8
    assert torch.equal(ours, theirs)


def test_quantize_rounds_half_to_even_like_onnx():
    scale = torch.tensor(0.5)  # a power of two: x / scale is exact, so the ties really are ties
    ties = torch.tensor([2.5, 3.5, -2.5, -3.5, 0.5, 1.5, -0.5, 4.5])
    x = ties * scale
    zp = torch.tensor(10.0)
    ours = quantize(x, scale, zp, 0, 255, None, "uint8")
    theirs = onnx_quantize(x, scale, zp, "uint8", None)
    by_hand = torch.tensor([2, 4, -2, -4, 0, 2, 0, 4]) + 10  # half to even, not half away from zero
    assert ours.tolist() == by_hand.tolist()
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype, qmin, qmax", [("uint8", 0, 255), ("int8", -128, 127)])
def test_quantize_saturates_like_onnx(dtype, qmin, qmax):
    scale, zp = torch.tensor(0.1), torch.tensor(0.0 if dtype == "int8" else 7.0)
    x = torch.tensor([-1e6, -1000.0, -12.8, 12.7, 25.4, 1000.0, 1e6])
    ours = quantize(x, scale, zp, qmin, qmax, None, dtype)
    theirs = onnx_quantize(x, scale, zp, dtype, None)
    assert torch.equal(ours, theirs)
    assert ours[0] == qmin and ours[-1] == qmax


def test_quantize_int32_saturates_without_wrapping():
    """The bias range: 2**31 - 1 is not a float32, so a float32 clamp would round the bound up to 2**31,
    which wraps to -2**31 on the cast. Checked by hand: onnx has no int32 QuantizeLinear."""
    bias = torch.tensor([5.0, -5.0, 1.0, -1.0])
    scale = torch.tensor([1e-9, 1e-9, 0.01, 0.01])  # 5e9 steps: beyond int32 either way
    q = quantize(bias, scale, torch.zeros(4), BIAS_SPEC.qmin, BIAS_SPEC.qmax, 0, "int32")
    assert q.dtype == torch.int32
    assert q.tolist() == [2**31 - 1, -(2**31) + 1, 100, -100]


def test_dequantize_int32_bias_matches_onnx_bit_exactly(generator):
    q = torch.randint(-(2**31) + 1, 2**31 - 1, (6,), generator=generator, dtype=torch.int64).to(torch.int32)
    scale = torch.rand(6, generator=generator) * 1e-4
    zp = torch.zeros(6)
    assert torch.equal(dequantize(q, scale, zp, 0), onnx_dequantize(q, scale, zp, "int32", 0))


def test_quantize_narrower_range_clamps_to_spec_not_dtype():
    """A 4-bit spec stored in uint8 saturates at 15 (onnx has no 4-bit uint8, so check by hand)."""
    x = torch.tensor([-1.0, 0.0, 0.7, 1.4, 100.0])
    q = quantize(x, torch.tensor(0.1), torch.tensor(0.0), 0, 15, None, "uint8")
    assert q.tolist() == [0, 0, 7, 14, 15]


def test_dequantize_per_tensor_uint8_matches_onnx_bit_exactly(generator):
    q = torch.randint(0, 256, (3, 4, 5), generator=generator, dtype=torch.uint8)
    scale, zp = torch.tensor(0.0213), torch.tensor(117.0)
    ours = dequantize(q, scale, zp)
    theirs = onnx_dequantize(q, scale, zp, "uint8", None)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("axis, shape", [(0, (6, 3, 3, 3)), (1, (2, 6, 5, 5))])
def test_dequantize_per_channel_int8_matches_onnx_bit_exactly(generator, axis, shape):
    p = _per_channel_i8(shape[axis], axis, generator)
    q = torch.randint(-128, 128, shape, generator=generator, dtype=torch.int8)
    ours = dequantize(q, p["scale"], p["zp"], axis)
    theirs = onnx_dequantize(q, p["scale"], p["zp"], "int8", axis)
    assert torch.equal(ours, theirs)


# ---------------------------------------------------------------- fake_quant and its STE


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor_uint8", "per_channel_int8_axis1"])
def test_fake_quant_equals_dequantize_of_quantize_exactly(generator, per_channel):
    x = torch.randn(2, 6, 5, 5, generator=generator) * 3
    p = _per_channel_i8(6, 1, generator) if per_channel else PER_TENSOR_U8
    fq = fake_quant(x, p["scale"], p["zp"], p["qmin"], p["qmax"], p["axis"])
    qdq = dequantize(quantize(x, p["scale"], p["zp"], p["qmin"], p["qmax"], p["axis"], p["dtype"]), p["scale"], p["zp"], p["axis"])
    assert torch.equal(fq, qdq)


def test_fake_quant_ste_gradient_is_one_inside_and_zero_when_clipped():
    # scale 0.5, zero point 10, range [0, 255]: x/scale + 10 must land in [0, 255] after rounding
    x = torch.tensor([-6.0, -5.5, -5.25, -5.0, 0.0, 122.25, 122.5, 122.75, 123.0], requires_grad=True)
    inside_by_hand = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    # the ties decide: -5.25/0.5 = -10.5 rounds (half to even) to -10 -> q = 0, inside;
    # 122.75/0.5 = 245.5 rounds to 246 -> q = 256, clipped; 122.25/0.5 = 244.5 -> 244 -> q = 254, inside
    upstream = torch.arange(1.0, 10.0)  # a non-uniform upstream gradient, so "1" is a pass-through
    y = fake_quant(x, torch.tensor(0.5), torch.tensor(10.0), 0, 255)
    (grad,) = torch.autograd.grad(y, x, grad_outputs=upstream)
    assert torch.equal(grad, upstream * inside_by_hand)


def test_fake_quant_ste_gradient_per_channel_matches_clip_mask(generator):
    x = (torch.randn(4, 3, 3, 3, generator=generator) * 2).requires_grad_()
    scale = torch.tensor([0.01, 0.02, 0.05, 0.5])  # small scales clip many elements, the last none
    zp = torch.zeros(4)
    y = fake_quant(x, scale, zp, -127, 127, axis=0)
    (grad,) = torch.autograd.grad(y.sum(), x)
    q_unclamped = torch.round(x.detach() / scale.reshape(4, 1, 1, 1))
    mask = ((q_unclamped >= -127) & (q_unclamped <= 127)).float()
    assert torch.equal(grad, mask)
    assert 0 < mask.sum() < mask.numel()  # both kinds of element were exercised
    assert mask[3].all()


# ---------------------------------------------------------------- qparams_from_range


@pytest.mark.parametrize("lo, hi", [(-1.0, 3.0), (2.0, 5.0), (-5.0, -2.0), (-0.013, 0.0071), (0.0, 6.0)])
def test_asymmetric_qparams_cover_the_range_and_zero_exactly(lo, hi):
    spec = activation_spec()
    scale, zp = qparams_from_range(torch.tensor(lo), torch.tensor(hi), spec)
    assert zp == torch.round(zp) and spec.qmin <= zp <= spec.qmax
    zero = torch.tensor(0.0)
    assert dequantize(quantize(zero, scale, zp, spec.qmin, spec.qmax, None, spec.dtype), scale, zp) == 0.0
    # the representable interval, from the grid ends, holds [min(lo, 0), max(hi, 0)] up to half a step
    grid_lo = (spec.qmin - zp) * scale
    grid_hi = (spec.qmax - zp) * scale
    assert grid_lo <= min(lo, 0.0) + scale / 2
    assert grid_hi >= max(hi, 0.0) - scale / 2
    # and the scale is the width of that interval over 255 steps, computed the textbook way
    width = max(hi, 0.0) - min(lo, 0.0)
    assert scale.item() == pytest.approx(width / 255, rel=1e-6)


def test_symmetric_qparams_have_zero_point_zero_and_use_the_larger_magnitude():
    spec = weight_spec()  # int8 [-127, 127]
    lo, hi = torch.tensor([-0.5, -2.0, 0.0]), torch.tensor([1.27, 0.3, 0.0])
    scale, zp = qparams_from_range(lo, hi, spec)
    assert torch.equal(zp, torch.zeros(3))
    assert scale[0].item() == pytest.approx(1.27 / 127)
    assert scale[1].item() == pytest.approx(2.0 / 127)
    assert scale[2] > 0  # an all-zero channel still gets a usable scale


@pytest.mark.parametrize("spec", [activation_spec(), weight_spec()], ids=["asymmetric", "symmetric"])
@pytest.mark.parametrize("value", [0.0, 3.0, -3.0])
def test_zero_width_range_gives_finite_positive_scale(spec, value):
    v = torch.tensor(value)
    scale, zp = qparams_from_range(v, v, spec)
    assert torch.isfinite(scale) and scale > 0
    assert torch.isfinite(zp)
    q = quantize(torch.tensor([0.0, value]), scale, zp, spec.qmin, spec.qmax, None, spec.dtype)
    back = dequantize(q, scale, zp)
    assert back[0] == 0.0
    assert abs(back[1].item() - value) <= scale.item() / 2 + 1e-6 * abs(value)


# ---------------------------------------------------------------- observers


def _feed(observer, batches):
    for b in batches:
        observer(b)
    return observer


def test_minmax_observer_keeps_running_extremes(generator):
    batches = [torch.randn(4, 5, generator=generator) * (i + 1) for i in range(3)]
    obs = _feed(MinMaxObserver(activation_spec()), batches)
    everything = torch.cat([b.flatten() for b in batches])
    assert obs.min_val == everything.min() and obs.max_val == everything.max()


def test_moving_average_observer_first_batch_sets_then_ema(generator):
    batches = [torch.randn(16, generator=generator) * s for s in (1.0, 3.0, 0.5)]
    obs = MovingAverageMinMaxObserver(activation_spec(observer="moving_average"))
    assert not obs.has_data
    obs(batches[0])
    assert obs.min_val == batches[0].min() and obs.max_val == batches[0].max()
    m_lo, m_hi = batches[0].min().item(), batches[0].max().item()  # the same recurrence, in float64
    for b in batches[1:]:
        obs(b)
        m_lo += 0.01 * (b.min().item() - m_lo)
        m_hi += 0.01 * (b.max().item() - m_hi)
    assert obs.min_val.item() == pytest.approx(m_lo, rel=1e-6)
    assert obs.max_val.item() == pytest.approx(m_hi, rel=1e-6)


def test_current_observer_forgets_earlier_batches(generator):
    first, last = torch.randn(8, generator=generator) * 10, torch.randn(8, generator=generator)
    obs = _feed(CurrentMinMaxObserver(activation_spec(observer="current")), [first, last])
    assert obs.min_val == last.min() and obs.max_val == last.max()


@pytest.mark.parametrize("cls", [MinMaxObserver, MovingAverageMinMaxObserver, CurrentMinMaxObserver])
@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_observer_ranges(generator, cls, axis):
    x = torch.randn(4, 6, 3, 3, generator=generator) * torch.arange(1.0, 7.0).reshape(1, 6, 1, 1)
    spec = QuantSpec("int8", -127, 127, symmetric=True, axis=axis)
    obs = cls(spec, channels=x.shape[axis])
    obs(x)  # one batch: every kind of observer holds exactly its range
    others = tuple(d for d in range(x.dim()) if d != axis)
    assert torch.equal(obs.min_val, x.amin(dim=others))
    assert torch.equal(obs.max_val, x.amax(dim=others))


@pytest.mark.parametrize("cls", [MinMaxObserver, MovingAverageMinMaxObserver, CurrentMinMaxObserver])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_observer_rejects_nan_and_inf_without_updating(cls, bad):
    obs = cls(activation_spec())
    obs(torch.tensor([-1.0, 2.0]))
    x = torch.tensor([0.5, bad, 1.0])
    with pytest.raises(FxQuantError, match="NaN or Inf"):
        obs(x)
    assert obs.min_val == -1.0 and obs.max_val == 2.0


def test_fake_quantize_module_takes_qparams_from_its_observer(generator):
    x = torch.randn(3, 7, generator=generator) * 2
    fq = FakeQuantize(activation_spec())
    y = fq(x)
    scale, zp = qparams_from_range(x.min(), x.max(), activation_spec())
    assert fq.scale == scale and fq.zero_point == zp
    assert torch.equal(y, dequantize(quantize(x, scale, zp, 0, 255, None, "uint8"), scale, zp))
    fq.enabled = False
    assert fq(x) is x
