"""fxquant.onnx.check: exported files pass their backend's rules; each deliberately broken file names its node."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

import fxquant
from fxquant.onnx.check import Violation, check_onnx

from conftest import ResidualCatNet, randomize_batchnorms


class Net(ResidualCatNet):
    """conv-bn-relu, maxpool, a residual block, two conv heads concatenated, gap, flatten, linear."""

    def __init__(self):
        super().__init__()
        self.gap, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.gap(super().forward(x)), 1))


EXAMPLE = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _qmodel(backend="onnxruntime", **options):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(2, 3, 16, 16, generator=g) for _ in range(3)]
    return fxquant.quantize(randomize_batchnorms(Net()).eval(), EXAMPLE, calib_data=calib, backend=backend, progress=False, **options)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("check")
    out = {}
    for backend in ("onnxruntime", "tensorrt"):
        fxquant.export_onnx(_qmodel(backend), folder / f"{backend}.onnx", EXAMPLE)
        out[backend] = onnx.load(folder / f"{backend}.onnx")
    return out


# ------------------------------------------------------------------ editing helpers


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _producer(model, value):
    return next(n for n in model.graph.node if value in n.output)


def _conv(model, fx_name):
    """The Conv node of an FX conv: named after it, or '<name>_conv2d' when a fused relu took the name."""
    convs = {n.name: n for n in model.graph.node if n.op_type == "Conv"}
    return convs.get(fx_name) or convs[f"{fx_name}_conv2d"]


def _set_init(model, name, array):
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(np.asarray(array), name))


def _get_init(model, name):
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def _violating_nodes(model, backend=None) -> set[str]:
    return {v.node for v in check_onnx(model, backend)}


def _messages(model, node, backend=None) -> str:
    return " | ".join(v.message for v in check_onnx(model, backend) if v.node == node)


# ------------------------------------------------------------------ good files


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_exported_files_follow_their_rules(files, backend):
    assert check_onnx(files[backend]) == []
    assert {p.key: p.value for p in files[backend].metadata_props}["fxquant.backend"] == backend


def test_reduce_range_file_passes_and_an_eight_bit_file_claiming_it_does_not(files, tmp_path):
    fxquant.export_onnx(_qmodel(reduce_range=True), tmp_path / "rr.onnx", EXAMPLE)
    assert check_onnx(tmp_path / "rr.onnx") == []
    fxquant.export_onnx(_qmodel(target="vnni"), tmp_path / "vnni.onnx", EXAMPLE)  # 8-bit weights everywhere
    lying = onnx.load(tmp_path / "vnni.onnx")
    helper.set_model_props(lying, {**{p.key: p.value for p in lying.metadata_props}, "fxquant.reduce_range": "1"})
    found = check_onnx(lying)
    assert {v.node for v in found} == {"stem_conv2d", "conv1_conv2d", "conv2", "head_a", "head_b", "fc"}
    assert all("outside the spec's [-63, 63]" in v.message for v in found)


# ------------------------------------------------------------------ broken files, each named by node


def test_a_removed_dequantize_is_named(files):
    model = copy.deepcopy(files["onnxruntime"])
    conv = _conv(model, "head_a")
    dq = _producer(model, conv.input[0])
    conv.input[0] = _producer(model, dq.input[0]).input[0]  # read the float value, skipping its Q/DQ
    assert _violating_nodes(model) == {"head_a", "add"}
    assert "input 0 is not dequantized" in _messages(model, "head_a")
    assert "the output is not quantized" in _messages(model, "add")  # add+relu now feeds a float reader too


def test_a_changed_weight_axis_is_named(files):
    model = copy.deepcopy(files["onnxruntime"])
    w_dq = _node(model, "head_b_w_dq")
    next(a for a in w_dq.attribute if a.name == "axis").i = 1
    assert _violating_nodes(model) == {"head_b"}
    assert "has axis 1; the spec is per-channel on axis 0" in _messages(model, "head_b")


def test_a_changed_weight_zero_point_is_named(files):
    model = copy.deepcopy(files["onnxruntime"])
    w_dq = _node(model, "conv2_w_dq")
    assert len(w_dq.input) == 2  # exported without one: 0, ONNX's default, is what the spec asks
    model.graph.initializer.append(numpy_helper.from_array(np.ones(8, np.int8), "conv2_w_zp"))
    w_dq.input.append("conv2_w_zp")
    assert _violating_nodes(model) == {"conv2"}
    assert "the spec is symmetric (zero point 0)" in _messages(model, "conv2")


def test_a_nonzero_tensorrt_activation_zero_point_is_named(files):
    model = copy.deepcopy(files["tensorrt"])
    q = _node(model, "pool_fq")
    _set_init(model, q.input[2], np.int8(3))
    assert {"pool_fq", "pool_fq_dq"} <= _violating_nodes(model)
    assert "zero point [3]" in _messages(model, "pool_fq")


def test_an_unshared_cat_scale_is_named(files):
    model = copy.deepcopy(files["onnxruntime"])
    cat = _node(model, "cat")
    dq = _producer(model, cat.input[1])
    _set_init(model, dq.input[1], _get_init(model, dq.input[1]) * 2)  # its Q and DQ agree, the cat's inputs do not
    assert _violating_nodes(model) == {"cat"}
    assert "input 1" in _messages(model, "cat") and "shares one set of qparams" in _messages(model, "cat")


def test_an_unquantized_conv_output_is_named(files):
    model = copy.deepcopy(files["onnxruntime"])
    pool = _node(model, "pool")
    dq = _producer(model, pool.input[0])
    pool.input[0] = _producer(model, dq.input[0]).input[0]  # the relu's float output, its Q/DQ skipped
    assert "stem_conv2d" in _violating_nodes(model)
    assert "the output is not quantized" in _messages(model, "stem_conv2d")


def test_a_float_bias_on_onnxruntime_is_named(files):
    model = copy.deepcopy(files["onnxruntime"])
    conv = _conv(model, "head_a")
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(4, np.float32), "float_bias"))
    conv.input[2] = "float_bias"
    assert _violating_nodes(model) == {"head_a"}
    assert "the bias is float" in _messages(model, "head_a")


def test_a_qdq_between_conv_and_relu_on_tensorrt_is_named(files):
    model = copy.deepcopy(files["tensorrt"])
    conv = _conv(model, "conv1")
    relu = _node(model, "conv1")
    qparams = list(_node(model, "conv1_fq").input[1:])  # the relu's own output qparams: only the wedge is wrong
    q = helper.make_node("QuantizeLinear", [conv.output[0], *qparams], ["wedge_q"], name="wedge_q")
    dq = helper.make_node("DequantizeLinear", ["wedge_q", *qparams], ["wedge_dq"], name="wedge_dq")
    relu.input[0] = "wedge_dq"
    model.graph.node.extend([q, dq])
    assert _violating_nodes(model) == {"conv1_conv2d"}
    assert "it blocks the op+activation fusion" in _messages(model, "conv1_conv2d")


def test_an_onnxruntime_file_read_by_tensorrt_rules(files):
    found = check_onnx(files["onnxruntime"], "tensorrt")
    text = "\n".join(map(str, found))
    assert "reads a float bias" in text and "has a uint8 zero point; the spec stores int8" in text
    assert "node 'head_a' (rule conv)" in text


# ------------------------------------------------------------------ export runs the check


def test_export_raises_on_a_violation_and_writes_nothing(tmp_path):
    qmodel = _qmodel()  # onnxruntime rules, exported as if for tensorrt
    with pytest.raises(fxquant.FxQuantError, match=r"(?s)breaks \d+ rule.*node 'stem_conv2d' \(rule conv\).*check=False"):
        fxquant.export_onnx(qmodel, tmp_path / "m.onnx", EXAMPLE, backend="tensorrt")
    assert not (tmp_path / "m.onnx").exists()
    fxquant.export_onnx(qmodel, tmp_path / "m.onnx", EXAMPLE, backend="tensorrt", check=False)
    assert check_onnx(tmp_path / "m.onnx")  # the file says tensorrt, and breaks its rules


def test_excluded_layers_are_exempt_but_only_by_name(tmp_path):
    qmodel = _qmodel(exclude=["head_b"])
    fxquant.export_onnx(qmodel, tmp_path / "m.onnx", EXAMPLE)  # passes: head_b is float by request
    assert check_onnx(tmp_path / "m.onnx") == []
    found = check_onnx(tmp_path / "m.onnx", float_nodes=())
    assert {v.node for v in found} == {"head_b"}


def test_a_file_without_a_recorded_backend_needs_one(files):
    model = copy.deepcopy(files["onnxruntime"])
    del model.metadata_props[:]
    with pytest.raises(fxquant.FxQuantError, match="records no fxquant backend; pass backend="):
        check_onnx(model)
    assert check_onnx(model, "onnxruntime") == []


def test_bad_model_argument_is_named():
    with pytest.raises(fxquant.FxQuantError, match="model: expected an onnx.ModelProto or the path"):
        check_onnx(42)


def test_violation_reads_as_node_rule_message():
    assert str(Violation("conv1", "conv", "input 0 is not dequantized")) == "node 'conv1' (rule conv): input 0 is not dequantized"


# ------------------------------------------------------------------ shape arithmetic is not an activation


class ShapeArithmetic(nn.Module):
    """Shapes that follow the batch: reshape(n, -1) and expand(n * 2 // 2, 3, 5) become int64 Gather, Concat,
    Mul and Div nodes in the file; the Concat shares its op type with the cat row, the Mul with the mul row."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        y = F.relu(self.conv(x))
        n = y.shape[0]
        out = self.fc(y.reshape(n, -1))
        return out.reshape(n, 1, 5).expand(n * 2 // 2, 3, 5)


@pytest.fixture(scope="module")
def shapes_file(tmp_path_factory):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    qmodel = fxquant.quantize(ShapeArithmetic().eval(), x, calib_data=[x], progress=False)
    path = tmp_path_factory.mktemp("shapes") / "shapes.onnx"
    fxquant.export_onnx(qmodel, path, x)  # the export's own check passes
    return onnx.load(path)


def test_int64_shape_nodes_are_not_read_as_activations(shapes_file):
    model = shapes_file
    by_type = {}
    for n in model.graph.node:
        by_type.setdefault(n.op_type, []).append(n.name)
    assert "reshape/shape" in by_type["Concat"] and "mul" in by_type["Mul"]  # int64 nodes of the row op types
    assert check_onnx(model) == []
    assert check_onnx(model, float_nodes=()) == []  # not by the name list: by type (mul and expand are unclaimed)


def test_a_missing_dequantize_on_a_float_op_is_still_named_beside_shape_nodes(shapes_file):
    model = copy.deepcopy(shapes_file)
    fc = _node(model, "fc")
    fc.input[0] = "reshape"  # the Reshape's float output, its Q/DQ skipped
    assert _violating_nodes(model) == {"fc", "reshape"}  # the reshape's output now has a float reader besides its Q
    assert "input 0 is not dequantized" in _messages(model, "fc")
    assert "the output is not re-quantized" in _messages(model, "reshape")
