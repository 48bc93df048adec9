"""lower_to_int8 through fxquant.convert: integer storage, dtypes on the wire, names, and numerics
against the fake-quant model it came from."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxquant
from fxquant import FxQuantError
from fxquant.nn import FakeQuantize
from fxquant.numerics import dequantize, quantize

WEIGHTED = {"stem": "x_fq", "block_conv1": "stem_fq", "block_conv2": "block_conv1_fq", "fc": "gap_fq"}  # op -> its input's fq


class DtypeRecorder(fx.Interpreter):
    """Runs the int8 graph and keeps every node's output dtype."""

    def run_node(self, n):
        value = super().run_node(n)
        if isinstance(value, torch.Tensor):
            self.dtypes[n.name] = value.dtype
        return value

    def record(self, *args):
        self.dtypes = {}
        self.run(*args)
        return self.dtypes


def steps_apart(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    return ((a - b).abs() / scale).max().item()


@pytest.fixture
def int8(calibrated_residual):
    return fxquant.convert(calibrated_residual)


def test_weights_are_int8_and_bias_int32_with_scale_sx_times_sw(calibrated_residual, int8):
    qm = calibrated_residual
    for op, source in WEIGHTED.items():
        module = qm.get_submodule(op.replace("block_", "block."))
        w_i8, b_i32 = getattr(int8, f"{op}_w_i8"), getattr(int8, f"{op}_b_i32")
        assert w_i8.dtype == torch.int8 and w_i8.shape == module.weight.shape, op
        assert w_i8.abs().max() <= 127  # the restricted symmetric range
        assert b_i32.dtype == torch.int32 and b_i32.shape == (module.weight.shape[0],), op
        s_x, s_w = qm.get_submodule(source).scale, module.weight_fq.scale
        assert torch.equal(getattr(int8, f"{op}_b_scale"), s_x * s_w), op
        assert torch.equal(getattr(int8, f"{op}_w_scale"), s_w), op
        # the int8 weight, dequantized, is exactly the fake-quant model's weight
        w_dq = dequantize(w_i8, s_w, torch.zeros_like(s_w), 0)
        with torch.no_grad():
            assert torch.equal(w_dq, module.weight_fq(module.weight)), op
        # and the int32 bias is the float bias on the s_x * s_w grid
        b_dq = dequantize(b_i32, s_x * s_w, torch.zeros_like(s_w), 0)
        assert ((b_dq - module.bias.detach()).abs() <= s_x * s_w / 2 * (1 + 1e-5)).all(), op


def test_no_float_weights_or_fake_quant_modules_remain(int8):
    assert not any(isinstance(m, FakeQuantize) for m in int8.modules())
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in int8.modules())
    float_params = [name for name, p in int8.named_parameters()]
    assert float_params == []


def test_activations_between_quantized_ops_are_uint8(int8, image):
    dtypes = DtypeRecorder(int8).record(image)
    quantize_nodes = [n for n in int8.graph.nodes if n.target is quantize]
    assert {n.name for n in quantize_nodes} == {
        "x_fq", "stem_fq", "pool_fq", "block_conv1_fq", "block_conv2_fq", "block_relu_1_fq", "gap_fq", "flatten_fq", "fc_fq",
    }
    assert all(dtypes[n.name] == torch.uint8 for n in quantize_nodes)
    # every float op input is the dequantize of a uint8 tensor (weights: int8, bias: int32)
    for n in int8.graph.nodes:
        if n.target in (F.conv2d, torch.conv2d, F.linear, torch._C._nn.linear):
            x, w, b = n.args[:3]
            assert x.target is dequantize and dtypes[x.args[0].name] == torch.uint8, n.name
            assert w.target is dequantize and dtypes[w.args[0].name] == torch.int8, n.name
            assert b.target is dequantize and dtypes[b.args[0].name] == torch.int32, n.name


def test_convert_matches_fake_quant_within_one_output_step(calibrated_residual, int8, generator):
    """Tolerance: 1 output quantization step. Weights and activations are bit-identical in both
    models; only the bias differs, rounded to int32 on the s_x*s_w grid (error <= s_x*s_w/2, far
    below one output step), which can move a value across a rounding boundary by one step."""
    x = torch.randn(8, 3, 16, 16, generator=generator) * 1.2
    with torch.no_grad():
        fake, real = calibrated_residual(x), int8(x)
    s_out = calibrated_residual.fc_fq.scale
    assert steps_apart(fake, real, s_out) <= 1 + 1e-4
    assert (fake == real).float().mean() > 0.9  # and almost all outputs agree exactly


def test_node_names_survive(calibrated_residual, int8):
    names = {n.name: n for n in int8.graph.nodes}
    for op in ("stem", "block_conv1", "block_conv2", "add", "block_relu_1", "gap", "flatten", "fc"):
        assert op in names, op
    assert names["block_conv2"].target in (F.conv2d, torch.conv2d)  # no act: the conv keeps the name
    assert names["stem"].target is F.relu and names["stem"].args[0].target in (F.conv2d, torch.conv2d)
    fq_names = {n.name for n in calibrated_residual.graph.nodes if n.op == "call_module" and "fq" in n.name}
    assert fq_names <= {n for n, node in names.items() if node.target is quantize}


def test_shared_ops_requantize_on_their_sources_grid(int8):
    names = {n.name: n for n in int8.graph.nodes}
    pool_q, flat_q = names["pool_fq"], names["flatten_fq"]
    assert pool_q.args[0].name == "pool" and pool_q.args[1].target == "stem_fq_scale"
    assert flat_q.args[0].name == "flatten" and flat_q.args[1].target == "gap_fq_scale"


def test_int8_model_pickles(int8, image):
    back = pickle.loads(pickle.dumps(int8))
    assert back.stem_w_i8.dtype == torch.int8
    with torch.no_grad():
        assert torch.equal(back(image), int8(image))


def test_convert_leaves_the_fake_quant_model_usable(calibrated_residual, image):
    with torch.no_grad():
        before = calibrated_residual(image)
        fxquant.convert(calibrated_residual)
        assert torch.equal(calibrated_residual(image), before)
    assert any(isinstance(m, FakeQuantize) for m in calibrated_residual.modules())


def test_convert_uncalibrated_names_the_node(residual_cnn, image):
    qm = fxquant.quantize(residual_cnn, (image,), progress=False)
    with pytest.raises(FxQuantError, match=r"fake-quant node 'x_fq' has seen no data.*[Cc]alibrate"):
        fxquant.convert(qm)


def test_convert_rejects_a_model_without_fake_quant(residual_cnn):
    with pytest.raises(FxQuantError, match="convert"):
        fxquant.convert(fx.symbolic_trace(residual_cnn))


class SideBranch(nn.Module):
    """The input feeds a quantized conv and, separately, an op the backend keeps float (softmax)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x), F.softmax(x, dim=1)


def test_float_branch_reading_a_quantized_value_stays_float(generator):
    x = torch.randn(2, 3, 8, 8, generator=generator)
    qm = fxquant.quantize(SideBranch().eval(), (x,), calib_data=[x], progress=False)
    int8 = fxquant.convert(qm)
    with torch.no_grad():
        (fake_conv, fake_soft), (real_conv, real_soft) = qm(x), int8(x)
    assert torch.equal(fake_soft, F.softmax(x, dim=1))
    assert torch.equal(real_soft, fake_soft)  # exact: the softmax never sees a quantized x
    assert steps_apart(fake_conv, real_conv, qm.conv_fq.scale) <= 1 + 1e-4


def test_excluded_conv_stays_float_in_the_int8_graph(residual_cnn, image, calib_batches):
    qm = fxquant.quantize(residual_cnn, (image,), calib_data=calib_batches, exclude=["block.conv2"], progress=False)
    int8 = fxquant.convert(qm)
    names = {n.name: n for n in int8.graph.nodes}
    assert names["block_conv2"].op == "call_module"
    assert not hasattr(int8, "block_conv2_w_i8")
    with torch.no_grad():
        assert steps_apart(qm(image), int8(image), qm.fc_fq.scale) <= 1 + 1e-4
