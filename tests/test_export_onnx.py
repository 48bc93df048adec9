"""export_onnx: the file's structure, its numerics against the reference int8 graph, and bad input."""

import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

import fxquant
from fxquant.check import agreement, ort_session, output_scale, run_onnx
from fxquant.onnx.export import weight_dequantize_count


class ResNetTiny(nn.Module):
    """conv-bn-relu stem, maxpool, one residual block (x += identity; relu), gap, flatten, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.stem(x))))
        y = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        y += x
        return self.fc(torch.flatten(self.gap(F.relu(y)), 1))


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    model = ResNetTiny().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    example = torch.randn(2, 1, 16, 16)
    qmodel = fxquant.quantize(model, example, calib_data=[torch.randn(16, 1, 16, 16) for _ in range(4)], progress=False)
    return model, qmodel, fxquant.convert(qmodel), example


@pytest.fixture(scope="module")
def exported(quantized, tmp_path_factory):
    _, qmodel, _, example = quantized
    path = tmp_path_factory.mktemp("export") / "tiny.onnx"
    fxquant.export_onnx(qmodel, path, example)
    return path, onnx.load(path)


def _inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_weights_are_int8_initializers_feeding_dequantize(exported):
    _, model = exported
    inits = _inits(model)
    weight_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.name.endswith("_w_dq")]
    assert len(weight_dqs) == 4  # stem, conv1, conv2, fc; each reads an int8 initializer
    for n in weight_dqs:
        assert inits[n.input[0]].dtype == np.int8
        assert inits[n.input[1]].ndim == 1  # per-channel scale
        assert [a.i for a in n.attribute if a.name == "axis"] == [0]
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in inits for n in model.graph.node)
    assert not any(v.dtype == np.float32 and v.ndim >= 2 for v in inits.values())  # no float weight left


def test_bias_is_int32_with_scale_input_times_weight(exported):
    _, model = exported
    inits = _inits(model)
    by_out = {o: n for n in model.graph.node for o in n.output}
    for conv in (n for n in model.graph.node if n.op_type in ("Conv", "Gemm")):
        x_dq, w_dq, b_dq = (by_out[i] for i in conv.input)
        assert inits[b_dq.input[0]].dtype == np.int32 and len(b_dq.input) == 2  # zero point 0: ONNX's default
        scale = by_out[b_dq.input[1]]  # s_b = s_x * s_w computed in the file, not stored as a third vector
        assert scale.op_type == "Mul" and list(scale.input) == [x_dq.input[1], w_dq.input[1]]
        assert inits[x_dq.input[1]].ndim == 0 and inits[w_dq.input[1]].shape == inits[b_dq.input[0]].shape


def test_bias_scale_in_the_file_is_the_reference_graphs_bit_for_bit(quantized, exported):
    _, _, int8, _ = quantized
    _, model = exported
    inits = _inits(model)
    by_out = {o: n for n in model.graph.node for o in n.output}
    for name in ("stem", "conv1", "conv2", "fc"):
        mul = by_out[f"{name}_b_dq/scale"]
        in_file = inits[mul.input[0]] * inits[mul.input[1]]  # float32 times float32, as ONNX Mul computes it
        np.testing.assert_array_equal(in_file, getattr(int8, f"{name}_b_scale").numpy())


def test_symmetric_conv_weights_leave_out_the_zero_point_linear_weights_keep_it(exported):
    _, model = exported
    inits = _inits(model)
    readers = {i: n.op_type for n in model.graph.node for i in n.input}
    weight_dqs = {n.name: n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.name.endswith("_w_dq")}
    for name, dq in weight_dqs.items():
        if readers[dq.output[0]] == "Conv":  # QLinearConv reads an absent zero point as 0
            assert len(dq.input) == 2, name
        else:  # ORT 1.32 leaves DQ -> Gemm float without it
            assert readers[dq.output[0]] == "Gemm" and not inits[dq.input[2]].any(), name
    assert sum(len(dq.input) == 2 for dq in weight_dqs.values()) == 3


def test_per_tensor_zero_points_are_one_initializer_per_value(exported):
    _, model = exported
    inits = _inits(model)
    zps = {n.input[2] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2
           and inits[n.input[2]].ndim == 0}
    values = [(inits[z].dtype, int(inits[z])) for z in zps]
    assert len(values) == len(set(values))  # no two initializers hold the same zero point
    assert all(z == f"zero_point_{dtype}_{v}" for z, (dtype, v) in zip(zps, values))


def test_default_opset_and_full_check(exported):
    _, model = exported
    assert model.opset_import[0].version == 17
    onnx.checker.check_model(model, full_check=True)


def test_onnxruntime_matches_reference_int8_within_one_step(quantized, exported):
    _, _, int8, _ = quantized
    path, _ = exported
    torch.manual_seed(1)
    x = torch.randn(64, 1, 16, 16)
    with torch.no_grad():
        ref = int8(x).numpy()
    got = agreement(ref, run_onnx(ort_session(path), x), output_scale(int8))
    assert got.within_one_step >= 0.999, got
    assert got.max_steps <= 1.0 + 1e-4, got
    assert got.top1 == 1.0, got


def test_onnx_reference_evaluator_matches_reference_int8(quantized, tmp_path):
    _, qmodel, int8, example = quantized
    path = tmp_path / "tiny21.onnx"
    fxquant.export_onnx(int8, path, example, opset=21)  # onnx.reference implements DequantizeLinear from opset 19
    x = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = int8(x).numpy()
    got = agreement(ref, ReferenceEvaluator(str(path)).run(None, {"x": x.numpy()})[0], output_scale(int8))
    assert got.max_steps <= 1.0 + 1e-4 and got.within_one_step >= 0.999, got


def test_onnxruntime_fuses_every_quantized_op(exported, tmp_path):
    path, model = exported
    optimized = tmp_path / "opt.onnx"
    ort_session(path, optimized_path=optimized)
    ops = [n.op_type for n in onnx.load(optimized).graph.node]
    assert ops.count("QLinearConv") == 3 and "Conv" not in ops
    assert ops.count("QGemm") == 1 and "Gemm" not in ops
    assert ops.count("QLinearAdd") == 1 and "Add" not in ops
    assert ops.count("DequantizeLinear") == 1  # only the model output leaves int8


def test_opset_13_is_accepted_and_12_rejected(quantized, tmp_path):
    _, _, int8, example = quantized
    fxquant.export_onnx(int8, tmp_path / "o13.onnx", example, opset=13)
    assert onnx.load(tmp_path / "o13.onnx").opset_import[0].version == 13
    with pytest.raises(fxquant.FxQuantError, match="opset"):
        fxquant.export_onnx(int8, tmp_path / "o12.onnx", example, opset=12)
    assert not (tmp_path / "o12.onnx").exists()


def test_onnxsim_keeps_every_weight_dequantize(quantized, exported, tmp_path):
    _, _, int8, example = quantized
    path, plain = exported
    simplified = fxquant.export_onnx(int8, tmp_path / "sim.onnx", example, simplify=True)
    assert weight_dequantize_count(simplified) == weight_dequantize_count(plain) == 8  # 4 weights + 4 biases (BN folding gave the stem one)
    x = torch.randn(4, 1, 16, 16)
    np.testing.assert_array_equal(run_onnx(ort_session(tmp_path / "sim.onnx"), x), run_onnx(ort_session(path), x))


def test_node_names_line_up_across_fake_quant_int8_and_onnx(quantized, exported):
    _, qmodel, int8, _ = quantized
    _, model = exported
    onnx_names = {n.name for n in model.graph.node}
    for name in ("stem", "conv1", "conv2", "fc", "add", "x_fq", "fc_fq"):
        assert name in {n.name for n in qmodel.graph.nodes}
        assert name in {n.name for n in int8.graph.nodes}
        assert name in onnx_names


def test_dynamic_batch(exported):
    path, _ = exported
    session = ort_session(path)
    for batch in (1, 7):
        assert run_onnx(session, torch.randn(batch, 1, 16, 16)).shape == (batch, 10)


def test_float_model_exports_and_matches_torch(quantized, tmp_path):
    model, _, _, example = quantized
    fxquant.export_onnx(model, tmp_path / "fp32.onnx", example)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(ort_session(tmp_path / "fp32.onnx"), x), model(x).numpy(), rtol=1e-4, atol=1e-5)


BYTES_PER_NODE = 200  # a node's name, its inputs' and output's names, attributes, its scalar qparams (~180 measured)


def test_file_is_the_integer_payload_plus_a_bounded_cost_per_node(tmp_path):
    """Every byte beyond int8 weights, int32 biases and per-channel weight scales is graph structure. A zero point
    vector per weight (1 byte a channel) or a stored bias scale (4 bytes a channel) would push mobilenet_v2 past it."""
    import torchvision

    from conftest import randomize_batchnorms

    torch.manual_seed(0)
    model = randomize_batchnorms(torchvision.models.mobilenet_v2()).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fxquant.export_onnx(fxquant.quantize(model, x, calib_data=[x], progress=False), tmp_path / "m.onnx", x)
    onnx_model = onnx.load(tmp_path / "m.onnx")
    inits = _inits(onnx_model)
    weight_dqs = [n for n in onnx_model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    weights = [inits[n.input[0]] for n in weight_dqs if inits[n.input[0]].dtype == np.int8]
    biases = [inits[n.input[0]] for n in weight_dqs if inits[n.input[0]].dtype == np.int32]
    scales = [inits[n.input[1]] for n in weight_dqs if inits[n.input[0]].dtype == np.int8]
    assert len(weights) == len(biases) == len(scales) == 53  # 52 convs and the classifier
    payload = sum(a.nbytes for a in weights + biases + scales)
    size = os.path.getsize(tmp_path / "m.onnx")
    assert payload < size <= payload + BYTES_PER_NODE * len(onnx_model.graph.node), (size - payload) / len(onnx_model.graph.node)


class Unexportable(nn.Module):
    def forward(self, x):
        return torch.mode(x, 1)[0]  # torch.onnx has no aten::mode at opset 17


def test_failed_export_leaves_no_file_and_keeps_an_old_one(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(fxquant.FxQuantError, match="node 'mode'.*aten::mode"):
        fxquant.export_onnx(Unexportable(), target, torch.randn(2, 3))
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["model.onnx"]  # no temporary file left behind


def test_missing_folder_is_named(quantized, tmp_path):
    _, _, int8, example = quantized
    with pytest.raises(fxquant.FxQuantError, match="does not exist"):
        fxquant.export_onnx(int8, tmp_path / "nope" / "m.onnx", example)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_a_float_conv_with_a_padding_mode_exports_as_pad_then_conv(tmp_path, mode):
    """nn.Conv with padding_mode != 'zeros' kept float (exclude=, or a float model) exports as Pad (Gathers for
    circular) then an unpadded Conv, as torch computes it; it used to be refused at export, after calibration."""
    torch.manual_seed(0)
    x2, x1 = torch.randn(2, 3, 9, 7), torch.randn(2, 3, 9)
    for conv, x in ((nn.Conv2d(3, 4, 3, padding=(1, 2), padding_mode=mode), x2), (nn.Conv1d(3, 4, 3, padding=2, padding_mode=mode), x1)):
        path = str(tmp_path / f"{mode}.onnx")
        fxquant.export_onnx(conv.eval(), path, x)
        got = run_onnx(ort_session(path), x)
        np.testing.assert_allclose(got, conv(x).detach().numpy(), atol=1e-5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, padding=1, padding_mode=mode), nn.ReLU())
    int8 = fxquant.convert(fxquant.quantize(model, x2, calib_data=[x2], exclude=["1"], progress=False))
    fxquant.export_onnx(int8, str(tmp_path / "q.onnx"))
    step = output_scale(int8) or 0.0  # ONNX Runtime's integer kernels against the reference: within one step
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(ort_session(str(tmp_path / "q.onnx")), x2), int8(x2).numpy(), atol=step + 1e-5)
