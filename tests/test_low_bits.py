"""Bit widths 2-8, mixed per layer with layer_bits, and how narrow integers reach ONNX.

export_onnx stores a weight in the narrowest ONNX integer type that holds its range (INT4 for 2-4
bits, opset 21; INT8 for 5-8 bits) and quantizes an activation only to a type whose range is exactly
the spec's (QuantizeLinear saturates to its type): 8 bits, or 4 bits as UINT4 at opset 21. Anything
else is an FxQuantError naming the node, never a silently wider file.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

import fxquant
from fxquant import FxQuantError
from fxquant.check import agreement, ort_session, output_scale, run_onnx
from fxquant.nn import FakeQuantize
from fxquant.numerics import dequantize


def _ptq(model, image, calib, **kw):
    return fxquant.quantize(model, (image,), calib_data=calib, progress=False, **kw)


def _fq(qm, name: str) -> FakeQuantize:
    return qm.get_submodule(name)


@pytest.mark.parametrize("w_bits, a_bits", [(2, 3), (5, 7), (4, 4)])
def test_bit_widths_reach_every_fake_quant(residual_cnn, image, calib_batches, w_bits, a_bits):
    qm = _ptq(residual_cnn, image, calib_batches, w_bits=w_bits, a_bits=a_bits)
    for m in qm.modules():
        if isinstance(m, FakeQuantize) and m.spec.axis is None:
            assert (m.spec.qmin, m.spec.qmax) == (0, 2**a_bits - 1)
        if getattr(m, "weight_fq", None) is not None:
            assert (m.weight_fq.spec.qmin, m.weight_fq.spec.qmax) == (-(2 ** (w_bits - 1) - 1), 2 ** (w_bits - 1) - 1)
    int8 = fxquant.convert(qm)
    assert int8.stem_w_i8.abs().max() <= 2 ** (w_bits - 1) - 1
    assert int8.block_conv1_w_i8.abs().max() == 2 ** (w_bits - 1) - 1  # the range is used, not just allowed


def test_layer_bits_sets_the_layer_weight_and_the_activation_it_reads(residual_cnn, image, calib_batches):
    qm = _ptq(residual_cnn, image, calib_batches, w_bits=4, a_bits=4, layer_bits={"fc": (8, 8), "block": (2, 4)},
              target="vnni")  # 8-bit fc weights: the portable target would narrow them to 7 (tests/test_targets.py)
    assert qm.fc.weight_fq.spec.qmax == 127
    assert _fq(qm, "gap_fq").spec.qmax == 255  # fc reads the average pool's output: 8 bits there
    assert qm.get_submodule("block.conv1").weight_fq.spec.qmax == 1  # a parent's name covers its children
    assert qm.get_submodule("block.conv2").weight_fq.spec.qmax == 1
    assert _fq(qm, "fc_fq").spec.qmax == 255  # fc's output leaves the model: no reader decides, fc does
    assert qm.stem.weight_fq.spec.qmax == 7 and _fq(qm, "x_fq").spec.qmax == 15 and _fq(qm, "block_conv2_fq").spec.qmax == 15


def test_layer_bits_first_layer_input(residual_cnn, image, calib_batches):
    qm = _ptq(residual_cnn, image, calib_batches, w_bits=4, a_bits=4, layer_bits={"stem": (8, 8)}, target="vnni")
    assert _fq(qm, "x_fq").spec.qmax == 255 and qm.stem.weight_fq.spec.qmax == 127
    assert _fq(qm, "stem_fq").spec.qmax == 15  # what stem writes is read by 4-bit layers


class TwoReaders(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.parametrize(
    "layer_bits, exclude, named",
    [
        ({"fc2": (8, 8)}, (), r"^layer_bits: no quantized layer is named 'fc2'.*quantized layers: .*block\.conv1"),
        ({"fc": (8, 8)}, ("fc",), r"^layer_bits: no quantized layer is named 'fc' \(is it excluded"),
        ({"fc": (8,)}, (), r"^layer_bits\['fc'\]=\(8,\): expected a pair"),
        ({"fc": (9, 8)}, (), r"^layer_bits\['fc'\] w_bits=9: expected an integer bit width from 2 to 8"),
        ({"fc": (8, 1)}, (), r"^layer_bits\['fc'\] a_bits=1: "),
        (["fc"], (), r"^layer_bits=\['fc'\]: expected a dict"),
    ],
)
def test_bad_layer_bits_are_named(residual_cnn, image, layer_bits, exclude, named):
    with pytest.raises(FxQuantError, match=named):
        fxquant.quantize(residual_cnn, (image,), layer_bits=layer_bits, exclude=exclude, progress=False)


def test_two_layers_reading_one_activation_at_different_widths_is_an_error(image):
    with pytest.raises(FxQuantError, match=r"^layer_bits: 'b' and 'a' read activation 'x' at 8 and 4 bits"):
        fxquant.quantize(TwoReaders(), (image,), layer_bits={"a": (8, 4), "b": (8, 8)}, progress=False)
    qm = fxquant.quantize(TwoReaders(), (image,), a_bits=4, layer_bits={"a": (8, 8), "b": (4, 8)}, progress=False)
    assert _fq(qm, "x_fq").spec.qmax == 255 and qm.b.weight_fq.spec.qmax == 7


# ---------------------------------------------------------------- ONNX storage


def _inits(model: onnx.ModelProto) -> dict:
    return {i.name: i for i in model.graph.initializer}


def _weight_types(model: onnx.ModelProto) -> set:
    inits = _inits(model)
    return {inits[n.input[0]].data_type for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.name.endswith("_w_dq")}


def test_4_bit_weights_are_int4_initializers_and_onnxruntime_agrees(residual_cnn, image, calib_batches, tmp_path):
    qm = _ptq(residual_cnn, image, calib_batches, w_bits=4)
    model = fxquant.export_onnx(qm, tmp_path / "w4.onnx", image, opset=21)
    assert _weight_types(model) == {TensorProto.INT4}
    values = numpy_helper.to_array(_inits(model)["block_conv1_w_i8/int4"]).astype(np.int64)
    assert values.min() >= -7 and values.max() <= 7 and values.max() == 7
    onnx.checker.check_model(model, full_check=True)
    int8 = fxquant.convert(qm)
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = int8(x).numpy()
    got = agreement(ref, run_onnx(ort_session(tmp_path / "w4.onnx"), x), output_scale(int8))
    assert got.max_steps <= 1 + 1e-4 and got.within_one_step >= 0.999 and got.top1 == 1.0, got


def test_4_bit_weights_below_opset_21_are_an_error_and_no_file(residual_cnn, image, calib_batches, tmp_path):
    qm = _ptq(residual_cnn, image, calib_batches, w_bits=4)
    with pytest.raises(FxQuantError, match=r"node 'stem_w_dq' stores integers in \[-7, 7\], which need ONNX int4 \(opset 21"):
        fxquant.export_onnx(qm, tmp_path / "w4.onnx", image, opset=17)
    assert not (tmp_path / "w4.onnx").exists()


@pytest.mark.parametrize("w_bits, container", [(2, TensorProto.INT4), (3, TensorProto.INT4), (6, TensorProto.INT8)])
def test_other_weight_widths_take_the_narrowest_type_that_holds_them(residual_cnn, image, calib_batches, tmp_path, w_bits, container):
    qm = _ptq(residual_cnn, image, calib_batches, w_bits=w_bits)
    model = fxquant.export_onnx(qm, tmp_path / "w.onnx", image, opset=21)
    assert _weight_types(model) == {container}
    int8 = fxquant.convert(qm)
    with torch.no_grad():
        ref = int8(image).numpy()
    assert agreement(ref, run_onnx(ort_session(tmp_path / "w.onnx"), image), output_scale(int8)).max_steps <= 1 + 1e-4


def test_4_bit_activations_are_uint4_quantize_linear(residual_cnn, image, calib_batches, tmp_path):
    """ONNX Runtime 1.32 runs UINT4 Q/DQ, but its extended-level QDQ fusions hand uint4 to MaxPool and
    QLinearConv, which reject it: such a file needs graph_optimization_level "basic"."""
    qm = _ptq(residual_cnn, image, calib_batches, w_bits=4, a_bits=4)
    model = fxquant.export_onnx(qm, tmp_path / "w4a4.onnx", image, opset=21)
    inits = _inits(model)
    q_types = {inits[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert q_types == {TensorProto.UINT4}
    int8 = fxquant.convert(qm)
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = int8(x).numpy()
    got = agreement(ref, run_onnx(ort_session(tmp_path / "w4a4.onnx", level="basic"), x), output_scale(int8))
    assert got.max_steps <= 1 + 1e-4 and got.within_one_step >= 0.999, got


@pytest.mark.parametrize("a_bits", [2, 6])
def test_activation_widths_onnx_cannot_store_are_an_error(residual_cnn, image, calib_batches, tmp_path, a_bits):
    qm = _ptq(residual_cnn, image, calib_batches, a_bits=a_bits)
    with pytest.raises(FxQuantError, match=rf"node 'x_fq' quantizes to \[0, {2**a_bits - 1}\] \({a_bits} bits\).*use a_bits=8 or a_bits=4"):
        fxquant.export_onnx(qm, tmp_path / "a.onnx", image, opset=21)
    assert not (tmp_path / "a.onnx").exists()


class OneConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_4_bit_bias_sits_on_the_int32_grid_so_fake_quant_equals_int8(generator):
    """At 4 bits s_x * s_w is coarse: a float bias would be off the int8 model's grid by a visible
    fraction of an output step. The fake-quant model puts it on that grid, so the two agree exactly."""
    model = OneConv().eval()
    with torch.no_grad():
        model.conv.bias.uniform_(-1, 1)
    calib = torch.randn(8, 3, 8, 8, generator=generator)
    qm = fxquant.quantize(model, (calib,), calib_data=[calib], w_bits=4, a_bits=4, progress=False)
    int8 = fxquant.convert(qm)
    x = torch.randn(32, 3, 8, 8, generator=generator)
    with torch.no_grad():
        assert torch.equal(qm(x), int8(x))
    bias_on_grid = dequantize(int8.conv_b_i32, int8.conv_b_scale, int8.conv_b_zp, 0)
    off_grid = (bias_on_grid - model.conv.bias).abs().max() / qm.conv_fq.qparams()[0]
    assert off_grid > 0.005  # the grid is coarse enough to matter: a float bias would not match


def test_qat_w4a4_converts_within_one_step_of_the_fake_quant_model(residual_cnn, image, generator):
    qm = fxquant.quantize(residual_cnn, (image,), qat=True, calib_data=[image], w_bits=4, a_bits=4, fake_quant="lsq",
                          progress=False)
    opt = torch.optim.SGD(qm.parameters(), lr=0.01)
    for _ in range(3):
        loss = qm(torch.randn(4, 3, 16, 16, generator=generator)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    qm.eval()
    int8 = fxquant.convert(qm)
    x = torch.randn(64, 3, 16, 16, generator=generator)
    with torch.no_grad():
        got = agreement(qm(x).numpy(), int8(x).numpy(), float(qm.fc_fq.qparams()[0]))
    assert got.max_steps <= 1 + 1e-4 and got.within_one_step == 1.0, got
