"""Backend tables: what ONNX Runtime makes of the onnxruntime rows, the TensorRT conventions of the
tensorrt rows, shared cat qparams, reduce_range, SiLU decomposition, and contradictory tables."""

from __future__ import annotations

import copy
import operator
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import torchvision
from onnx import numpy_helper
from torch import nn

import fxquant
from fxquant.backends import BACKEND_META, FLOAT, QUANTIZE, SHARE, SHARE_INPUTS, Backend, Rule, check_rules, load_backend
from fxquant.check import agreement, layerwise, ort_session, output_scale, run_onnx
from fxquant.meta import info
from fxquant.nn import FakeQuantize
from fxquant.passes import decompose_ops, trace_model
from fxquant.specs import QuantSpec

from conftest import ResidualCatNet, assert_file_matches_int8, assert_onnx_matches_int8, randomize_batchnorms


class EveryRow(nn.Module):
    """One op per onnxruntime row: conv-bn-relu, maxpool, cat of two conv-relus, SiLU, residual add,
    squeeze-excitation (gap -> conv -> sigmoid -> mul), transpose, gap, flatten, linear.

    (A conv-relu whose cat sibling goes negative cannot fuse: the shared zero point is then above
    0, and ORT folds a Relu into the Q only when the zero point is qmin.)"""

    def __init__(self):
        super().__init__()
        self.stem, self.bn, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.MaxPool2d(2)
        self.left, self.right = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.mix, self.act, self.skip = nn.Conv2d(16, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 16, 1)
        self.se_pool, self.se_fc = nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 16, 1)
        self.gap, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 5)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.stem(x))))
        y = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], 1)  # >= 0 both: the shared zero point stays 0
        y = self.act(self.mix(y)) + self.skip(x)
        y = y * torch.sigmoid(self.se_fc(self.se_pool(y)))
        y = y.transpose(2, 3)
        return self.fc(torch.flatten(self.gap(y), 1))


def _batches(n=4, shape=(2, 3, 16, 16), seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _quantized(model, backend="onnxruntime", **options):
    calib = _batches(options.pop("n", 4), shape=options.pop("shape", (2, 3, 16, 16)))
    return fxquant.quantize(randomize_batchnorms(model).eval(), calib[0], calib_data=calib, backend=backend,
                            progress=False, **options)


def _optimized_ops(path, tmp_path) -> Counter:
    optimized = tmp_path / "optimized.onnx"
    ort_session(path, optimized_path=optimized, level="extended")
    return Counter(n.op_type for n in onnx.load(optimized).graph.node)


def _ort_agrees(int8, path, x):
    with torch.no_grad():
        ref = int8(x).numpy()
    return agreement(ref, run_onnx(ort_session(path), x), output_scale(int8))


@pytest.fixture(scope="module")
def every_row(tmp_path_factory):
    torch.manual_seed(0)
    qmodel = _quantized(EveryRow())
    int8 = fxquant.convert(qmodel)
    path = tmp_path_factory.mktemp("ort") / "every_row.onnx"
    fxquant.export_onnx(qmodel, path, _batches(1)[0])
    return qmodel, int8, path


# ------------------------------------------------------------------ onnxruntime


def test_onnxruntime_runs_every_row_as_an_integer_kernel(every_row, tmp_path):
    _, _, path = every_row
    ops = _optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] == 6 and ops["QGemm"] == 1  # stem, left, right, mix, skip, se_fc; fc
    assert ops["QLinearConcat"] == 1 and ops["QLinearAdd"] == 1
    assert ops["QLinearSigmoid"] == 2 and ops["QLinearMul"] == 2  # SiLU and squeeze-excitation, each sigmoid + mul
    assert ops["QLinearGlobalAveragePool"] == 2
    assert ops["MaxPool"] == 1 and ops["Transpose"] == 1  # kept, their Q/DQ pairs dropped ...
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1  # ... only the input and the output cross
    assert not {"Conv", "Gemm", "MatMul", "Add", "Mul", "Sigmoid", "Concat", "GlobalAveragePool"} & set(ops)


def test_onnxruntime_matches_the_reference_int8_graph_within_one_step(every_row):
    _, int8, path = every_row
    got = _ort_agrees(int8, path, torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3)))
    assert got.within_one_step >= 0.999 and got.max_steps <= 2 + 1e-4, got


def test_cat_inputs_are_one_fake_quant_whose_range_covers_both(every_row):
    qmodel, int8, _ = every_row
    cat = next(n for n in qmodel.graph.nodes if n.target is torch.cat)
    fq_nodes = cat.args[0]
    assert [n.name for n in fq_nodes] == ["left_fq", "right_fq"]  # each input keeps its own node (and name) ...
    assert fq_nodes[0].target == fq_nodes[1].target  # ... calling one module
    assert not hasattr(qmodel, "right_fq")  # the merged module is gone
    shared = qmodel.get_submodule(fq_nodes[0].target)
    float_model = copy.deepcopy(qmodel)
    fxquant.set_fake_quant(float_model, observe=False, enabled=False)  # as calibration ran it
    with torch.no_grad():
        x = float_model.pool(float_model.stem(torch.cat(_batches())))
        left, right = float_model.left(x), float_model.right(x)
    assert left.max() < 0.9 * right.max() or right.max() < 0.9 * left.max()  # two different ranges were merged into one
    torch.testing.assert_close(shared.observer.max_val, torch.maximum(left.max(), right.max()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared.observer.min_val, torch.minimum(left.min(), right.min()), rtol=1e-5, atol=1e-6)
    q_nodes = [n for n in int8.graph.nodes if n.name in ("left_fq", "right_fq", "cat_fq")]
    scales = {float(getattr(int8, n.args[1].target)) for n in q_nodes}
    assert len(q_nodes) == 3 and len(scales) == 1  # both inputs and the output: one scale


def test_cat_of_a_graph_input_and_a_conv_output_shares_too():
    class InputCat(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return torch.cat([x, self.conv(x) * 4], 1)  # x4: the two ranges differ

    qmodel = _quantized(InputCat())
    cat = next(n for n in qmodel.graph.nodes if n.target is torch.cat)
    sources = {a.target for a in cat.args[0]}
    assert len(sources) == 1 and isinstance(qmodel.get_submodule(sources.pop()), FakeQuantize)


def test_efficientnet_b0_every_conv_is_qlinearconv_and_agrees(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0()
    qmodel = _quantized(model, shape=(2, 3, 32, 32), n=1)
    int8 = fxquant.convert(qmodel)
    path = tmp_path / "effnet.onnx"
    fxquant.export_onnx(int8, path, torch.randn(1, 3, 32, 32))
    ops = _optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] == sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 81
    assert not {"Conv", "FusedConv", "Gemm", "Sigmoid", "Mul"} & set(ops), ops
    got = _ort_agrees(int8, path, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4)))
    assert got.within_one_step >= 0.999 and got.top1 == 1.0, got


# ------------------------------------------------------------------ reduce_range


def _weight_initializers(path):
    model = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [inits[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.name.endswith("_w_dq")]


@pytest.mark.parametrize("reduce_range, target, bound", [(False, "vnni", 127), (False, None, 63), (True, "vnni", 63)])
def test_reduce_range_caps_the_weights_at_seven_bits(residual_cnn, image, calib_batches, tmp_path, reduce_range, target, bound):
    """Every weight of ResidualCNN reaches an integer GEMM (3x3 convs, the linear): 7-bit on the portable
    target, 8-bit on vnni unless reduce_range narrows them all."""
    qmodel = fxquant.quantize(residual_cnn, image, calib_data=calib_batches, reduce_range=reduce_range, target=target,
                              progress=False)
    path = tmp_path / "m.onnx"
    fxquant.export_onnx(qmodel, path, image)
    weights = _weight_initializers(path)
    assert len(weights) == 4
    for w in weights:  # per channel, symmetric: every channel's largest |w| lands exactly on the bound
        assert w.dtype == np.int8 and np.abs(w).reshape(len(w), -1).max(1).tolist() == [bound] * len(w)
    assert _optimized_ops(path, tmp_path)["QLinearConv"] == 3
    int8 = fxquant.convert(qmodel)
    runs = {run.cpu: run for run in [layerwise(int8, path, torch.randn(8, 3, 16, 16), cpu=cpu) for cpu in (None, "haswell")]}
    if bound == 127:  # 8-bit weights: exact where the CPU has VNNI; the AVX2 pair sums saturate somewhere
        assert runs["haswell"].max_steps > 1, runs["haswell"]
    else:
        assert all(run.max_steps <= 1 for run in runs.values()), runs


@pytest.mark.parametrize("w_bits, bound", [(8, 63), (7, 63), (4, 7)])
def test_reduce_range_narrows_never_widens(residual_cnn, image, w_bits, bound):
    qmodel = fxquant.quantize(residual_cnn, image, reduce_range=True, w_bits=w_bits)
    specs = {m.weight_fq.spec for m in qmodel.modules() if getattr(m, "weight_fq", None) is not None}
    assert {(s.qmin, s.qmax) for s in specs} == {(-bound, bound)}


def test_reduce_range_on_a_backend_without_it_is_refused(residual_cnn, image):
    with pytest.raises(fxquant.FxQuantError, match="reduce_range=True: backend 'tensorrt'"):
        fxquant.quantize(residual_cnn, image, backend="tensorrt", reduce_range=True)


# ------------------------------------------------------------------ tensorrt


@pytest.fixture(scope="module")
def tensorrt_file(tmp_path_factory):
    torch.manual_seed(0)
    qmodel = _quantized(ResidualCatNet(), backend="tensorrt")
    path = tmp_path_factory.mktemp("trt") / "trt.onnx"
    fxquant.export_onnx(qmodel, path, _batches(1)[0])
    return qmodel, path, onnx.load(path)


def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def test_tensorrt_qdq_is_symmetric_int8_with_per_channel_weights_and_float_bias(tensorrt_file):
    _, _, model = tensorrt_file
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    weights = [n for n in qdq if n.input[0] in inits]
    for n in qdq:  # a conv weight leaves its zero point out: 0 of the weight's type (int8), ONNX's default
        zp = inits[n.input[2]] if len(n.input) > 2 else np.zeros((), inits[n.input[0]].dtype)
        assert zp.dtype == np.int8 and not zp.any(), n.name
    assert len(weights) == 5  # the five conv weights; no bias goes through a DequantizeLinear
    for n in weights:
        assert inits[n.input[0]].dtype == np.int8 and [a.i for a in n.attribute if a.name == "axis"] == [0]
        assert inits[n.input[1]].shape == (inits[n.input[0]].shape[0],)
    assert not [v for v in inits.values() if v.dtype == np.int32]
    assert all(inits[c.input[2]].dtype == np.float32 for c in model.graph.node if c.op_type == "Conv")


def test_tensorrt_quantizes_inputs_not_outputs(tensorrt_file):
    _, _, model = tensorrt_file
    prod = _producers(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert all(prod[c.input[0]].op_type == "DequantizeLinear" for c in convs)  # Q/DQ on every conv input
    for relu in (n for n in model.graph.node if n.op_type == "Relu"):  # nothing between an op and its relu
        assert prod[relu.input[0]].op_type in ("Conv", "Add"), relu.name
    (add,) = [n for n in model.graph.node if n.op_type == "Add"]
    assert [prod[i].op_type for i in add.input] == ["DequantizeLinear", "DequantizeLinear"]  # both residual inputs
    (cat,) = [n for n in model.graph.node if n.op_type == "Concat"]
    scales = {prod[i].input[1] for i in cat.input}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert len({float(inits[s]) for s in scales}) == 1


def test_tensorrt_file_runs_in_onnxruntime_within_one_step_of_the_reference(tensorrt_file):
    """TensorRT's s8 x s8 kernels accumulate in int32: exactly what ONNX Runtime computes running the Q/DQ
    as written (level basic, no integer kernels). Its extended level would fuse the s8 convs into MLAS
    kernels that saturate 16-bit pair sums on AVX2 CPUs, which a TensorRT file is not made for."""
    qmodel, path, _ = tensorrt_file
    int8 = fxquant.convert(qmodel)
    assert_file_matches_int8(int8, path, torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(5)),
                             "tensorrt file", level="basic")


def test_the_backend_is_recorded_through_convert_and_into_the_file(tensorrt_file):
    qmodel, _, model = tensorrt_file
    assert qmodel.meta[BACKEND_META].name == "tensorrt"
    assert fxquant.convert(qmodel).meta[BACKEND_META].name == "tensorrt"
    assert {p.key: p.value for p in model.metadata_props}["fxquant.backend"] == "tensorrt"


# ------------------------------------------------------------------ decompose_ops


def test_silu_becomes_x_times_sigmoid_x_keeping_its_name():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = decompose_ops(trace_model(model, example_inputs=(x,)))
    targets = {n.name: n.target for n in gm.graph.nodes}
    assert targets["_1"] is __import__("operator").mul and targets["_1_sigmoid"] is torch.sigmoid
    assert not any(isinstance(m, nn.SiLU) for m in gm.modules())
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)


def test_excluded_silu_stays_whole_and_float(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Conv2d(4, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    qmodel = fxquant.quantize(model, x, calib_data=[x], exclude=[nn.SiLU], progress=False)
    assert any(isinstance(m, nn.SiLU) for m in qmodel.modules())
    fxquant.export_onnx(qmodel, tmp_path / "m.onnx", x)  # the float SiLU exports as Sigmoid and Mul; the check passes
    nodes = onnx.load(tmp_path / "m.onnx").graph.node
    ops = [n.op_type for n in nodes if not n.name.endswith("_b_dq/scale")]  # not the bias scales' s_x * s_w
    assert ops.count("Sigmoid") == 1 and ops.count("Mul") == 1


# ------------------------------------------------------------------ contradictory tables


CONV = ((nn.Conv2d,),)


@pytest.mark.parametrize("name", ["onnxruntime", "tensorrt"])
def test_shipped_tables_load(name):
    backend = load_backend(name)
    onnx_types = {t for r in backend.rules for t in r.onnx}
    assert backend.name == name and {"Conv", "Gemm", "MatMul", "Add", "Concat", "MaxPool", "Flatten"} <= onnx_types


def test_an_op_both_quantized_and_float_names_both_rows():
    rules = (Rule("conv", CONV, QUANTIZE, weight=True), Rule("keep_float", CONV, FLOAT))
    with pytest.raises(fxquant.FxQuantError, match="'quantize' in row 'conv' and 'float' in row 'keep_float'"):
        check_rules("t", rules)


def test_an_onnx_op_type_read_two_ways_names_both_rows():
    rules = (Rule("sig_q", ((torch.sigmoid,),), QUANTIZE, onnx=("Sigmoid",)), Rule("sig_f", ((nn.Sigmoid,),), FLOAT, onnx=("Sigmoid",)))
    with pytest.raises(fxquant.FxQuantError, match="'Sigmoid' is 'quantize' in row 'sig_q' and 'float' in row 'sig_f'"):
        check_rules("t", rules)


def test_a_shared_qparam_group_with_two_specs_names_the_rows():
    int8 = QuantSpec("int8", -128, 127, symmetric=True)
    rules = (Rule("conv", CONV, QUANTIZE, weight=True), Rule("cat", ((torch.cat,),), SHARE_INPUTS, spec=int8))
    with pytest.raises(fxquant.FxQuantError, match="rows 'conv' and 'cat' can feed one shared-qparam group"):
        check_rules("t", rules, QuantSpec())
    check_rules("t", rules[:1] + (Rule("cat", ((torch.cat,),), SHARE_INPUTS),), QuantSpec())  # one spec: accepted


def test_one_op_with_two_specs_names_the_rows():
    rules = (Rule("a", ((torch.sigmoid,),), QUANTIZE), Rule("b", ((torch.sigmoid,),), QUANTIZE, spec=QuantSpec("uint8", 0, 127)))
    with pytest.raises(fxquant.FxQuantError, match="two specs, in rows 'a' and 'b'"):
        check_rules("t", rules)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="bogus"), "kind='bogus'"),
    (dict(kind=QUANTIZE, onnx="Conv"), "onnx='Conv'"),
    (dict(kind=SHARE, spec=QuantSpec()), "spec= needs"),
])
def test_a_malformed_row_is_rejected_by_name(kwargs, message):
    with pytest.raises(fxquant.FxQuantError, match=f"rule 'bad'.*{message}"):
        Rule("bad", CONV, **kwargs)


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(fxquant.FxQuantError, match="expected one of .*'onnxruntime', 'tensorrt'"):
        load_backend("tvm")


def test_fake_quants_with_different_specs_cannot_be_merged_into_one_cat_input():
    """A table built by hand, past check_rules: the merge itself refuses and names the cat node."""
    ort = load_backend("onnxruntime")
    int8 = QuantSpec("int8", -128, 127, symmetric=True)
    rules = (
        Rule("conv_a", CONV, QUANTIZE, weight=True, check=lambda module, node: node.name == "a"),
        Rule("conv_b", CONV, QUANTIZE, weight=True, spec=int8),
        Rule("cat", ((torch.cat,),), SHARE_INPUTS),
    )
    unchecked = Backend("hand_made", rules, ort.activation, ort.weight, ort.bias, ort.folded)

    class TwoConvCat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], 1)

    with pytest.raises(fxquant.FxQuantError, match="node 'cat' .*fake-quants 'a_fq' and 'b_fq' have different specs"):
        fxquant.quantize(TwoConvCat(), torch.randn(1, 3, 4, 4), backend=unchecked)
    with pytest.raises(fxquant.FxQuantError, match="rows 'conv_a' and 'conv_b' can feed one shared-qparam group"):
        check_rules("hand_made", rules, ort.activation)  # what load_backend would have said


def test_onnxruntime_runs_every_matmul_as_an_integer_kernel(tmp_path):
    class Tokens(nn.Module):
        """linear on (N, L, C) exports as MatMul (+ bias Add); then an activation x activation matmul."""

        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8, bias=False)

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))
            return torch.matmul(y, y.transpose(1, 2))

    qmodel = _quantized(Tokens(), shape=(2, 5, 16))
    fxquant.export_onnx(qmodel, tmp_path / "tokens.onnx", _batches(1, shape=(2, 5, 16))[0])
    ops = _optimized_ops(tmp_path / "tokens.onnx", tmp_path)
    integer = ops["QLinearMatMul"] + ops["MatMulIntegerToFloat"] + ops["MatMulInteger"]
    assert integer == 3 and not {"MatMul", "Gemm", "FusedMatMul"} & set(ops), ops


# ------------------------------------------------------------------ the residual stream of a pre-norm transformer


class PreNorm(nn.Module):
    """Two pre-norm blocks (x + fc(ln(x))), a final LayerNorm and a head; the second block's residual
    stream is also read by a Linear (`tap`) and its shape by torch._assert, as torchvision's ViT does."""

    def __init__(self, d=32, post_norm=False):
        super().__init__()
        self.ln1, self.fc1, self.ln2, self.fc2 = nn.LayerNorm(d), nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, d)
        self.ln, self.head, self.drop, self.post_norm = nn.LayerNorm(d), nn.Linear(d, 10), nn.Dropout(0.1), post_norm

    def forward(self, x):
        torch._assert(x.dim() == 3, "tokens")
        x = x + self.drop(self.fc1(self.ln1(x)))
        torch._assert(x.dim() == 3, "tokens")
        if self.post_norm:  # Swin V2: x + ln(f(x)), f a Linear reading the sum: that sum stays quantized
            return self.head(x + self.ln2(self.fc2(x)))
        x = x + self.fc2(self.ln2(x))
        return self.head(self.ln(x))


def _tokens(n=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 7, 32, generator=g) * 3 + torch.randn(32, generator=g) for _ in range(n)]


def _kinds(gm, target):
    return [(n.name, info(n).rule, info(n).kind) for n in gm.graph.nodes if n.target is target]


def test_a_residual_sum_read_only_by_norms_and_adds_stays_float(tmp_path):
    torch.manual_seed(0)
    model, calib = PreNorm().eval(), _tokens()
    qmodel = fxquant.quantize(model, calib[0], calib_data=calib, progress=False)
    assert _kinds(qmodel, operator.add) == [("add", "residual_add", FLOAT), ("add_1", "residual_add", FLOAT)]
    for name in ("ln2", "ln"):  # each LayerNorm reads the exact float sum, no fake-quant between
        ln = next(n for n in qmodel.graph.nodes if n.target == name)
        assert ln.args[0].target is operator.add
    int8 = fxquant.convert(qmodel)
    path = tmp_path / "prenorm.onnx"
    fxquant.export_onnx(int8, path, calib[0])  # the file checker reads the float Adds as float by rule
    ops = _optimized_ops(path, tmp_path)
    assert ops["Add"] >= 2 and "QLinearAdd" not in ops
    assert_onnx_matches_int8(model, int8, path, _tokens(1, seed=9)[0], "pre-norm blocks")


def test_a_float_residual_stream_is_closer_to_float_than_a_quantized_one():
    """The point of the row: with the residual sums quantized (the row removed), every block inherits
    their rounding; kept float, the int8 model is closer to the float one on held-out tokens."""
    torch.manual_seed(0)
    model, calib, x = PreNorm().eval(), _tokens(), _tokens(1, seed=11)[0]
    ort = load_backend("onnxruntime")
    without = Backend(ort.name + "-no-residual-row", tuple(r for r in ort.rules if r.name != "residual_add"),
                      ort.activation, ort.weight, ort.bias, ort.folded)
    with torch.no_grad():
        floats = model(x)
        errors = {}
        for label, backend in (("float sums", ort), ("quantized sums", without)):
            int8 = fxquant.convert(fxquant.quantize(model, calib[0], calib_data=calib, backend=backend, progress=False))
            errors[label] = float((int8(x) - floats).pow(2).mean())
    assert _kinds(fxquant.quantize(model, calib[0], backend=without, progress=False), operator.add)[0][1] == "add"
    assert errors["float sums"] < errors["quantized sums"], errors


def test_a_residual_sum_an_integer_kernel_reads_stays_quantized():
    torch.manual_seed(0)
    calib = _tokens()
    qmodel = fxquant.quantize(PreNorm(post_norm=True).eval(), calib[0], calib_data=calib, progress=False)
    assert _kinds(qmodel, operator.add) == [("add", "add", QUANTIZE), ("add_1", "add", QUANTIZE)]
