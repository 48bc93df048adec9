"""Issue 14: the kinds of real user models that broke, each closed by its right behaviour.

Each test builds the smallest model of its kind, runs quantize -> convert -> export_onnx and checks the
file against the reference int8 graph (conftest's helpers: every layer within one step, on this CPU and
the emulated ones) or the FxQuantError that names the cause.
"""

from collections import namedtuple

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.check import ort_session

from conftest import assert_file_matches_int8


def _x(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _ort(path, *inputs):
    session = ort_session(path)
    names = [i.name for i in session.get_inputs()]
    outs = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
    return {o.name: v for o, v in zip(session.get_outputs(), outs)}


# ---------------------------------------------------------------- kind 2: output pytrees

Pair = namedtuple("Pair", ["boxes", "scores"])


class DictHead(nn.Module):
    """torchvision's segmentation / detection models return dicts; nested containers and None entries too."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, padding=1)
        self.out = nn.Conv2d(4, 2, 1)
        self.aux = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        y = F.relu(self.body(x))
        return {"out": self.out(y), "aux": [self.aux(y), None, Pair(y, y.flatten(1).sum(-1, keepdim=True))]}


@pytest.mark.parametrize("dynamic_batch", [True, False])
def test_dict_and_nested_outputs_export_named_after_their_keys(tmp_path, dynamic_batch):
    model, x = DictHead().eval(), _x(4, 3, 8, 8)
    qmodel = fxquant.quantize(model, calib_data=[x], progress=False)
    int8 = fxquant.convert(qmodel)
    path = tmp_path / "dict.onnx"
    fxquant.export_onnx(qmodel, path, x[:2], dynamic_batch=dynamic_batch)
    names = [o.name for o in onnx.load(path).graph.output]
    assert names == ["out", "aux.0", "aux.2.boxes", "aux.2.scores"]
    x2 = x[:2] if not dynamic_batch else _x(3, 3, 8, 8, seed=1)
    got = _ort(path, x2)
    with torch.no_grad():
        ref = int8(x2)
    step = float(int8.out_fq_scale)
    assert np.abs(got["out"] - ref["out"].numpy()).max() <= step * (1 + 1e-4)
    assert np.abs(got["aux.0"] - ref["aux"][0].numpy()).max() <= float(int8.aux_fq_scale) * (1 + 1e-4)
    assert np.allclose(got["aux.2.scores"], ref["aux"][2].scores.numpy(), rtol=1e-4, atol=1e-3)
    assert ref["aux"][1] is None


def test_an_output_key_that_names_a_node_keeps_the_graph_valid(tmp_path):
    class KeyIsNodeName(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return {"conv": self.conv(x), "relu": self.conv(x).relu()}

    model, x = KeyIsNodeName().eval(), _x(2, 3, 4, 4)
    qmodel = fxquant.quantize(model, calib_data=[x], progress=False)
    proto = fxquant.export_onnx(qmodel, tmp_path / "k.onnx")  # onnx.checker (run by export) rejects a name given twice
    assert [o.name for o in proto.graph.output] == ["conv", "relu"]
    got = _ort(tmp_path / "k.onnx", x)
    with torch.no_grad():
        ref = fxquant.convert(qmodel)(x)
    assert np.abs(got["relu"] - ref["relu"].numpy()).max() <= float(qmodel.conv_fq.qparams()[0]) * (1 + 1e-4)


# ---------------------------------------------------------------- kind 3: functional layers

class FunctionalConv(nn.Module):
    """A custom conv that calls F.conv2d on its own parameters (keywords), then a BN+act module that
    calls F.batch_norm itself, as model libraries fuse them; then F.linear positionally."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(6) * 0.1)
        self.bn = BatchNormAct(6)
        self.fc_w = nn.Parameter(torch.randn(5, 6) * 0.3)
        self.fc_b = nn.Parameter(torch.zeros(5))

    def forward(self, x):
        y = F.conv2d(x, weight=self.weight, bias=self.bias, stride=1, padding=1)
        y = self.bn(y).mean((2, 3))
        return F.linear(y, self.fc_w, self.fc_b)


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: F.batch_norm, then the activation, in one module."""

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps)
        return F.relu(x)


def _functional_model():
    torch.manual_seed(0)
    model = FunctionalConv().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.2, 0.2)
    return model


@pytest.mark.parametrize("qat", [False, True])
def test_functional_conv_linear_quantize_and_functional_batch_norm_folds(tmp_path, qat):
    model, x = _functional_model(), _x(8, 3, 8, 8)
    qmodel = fxquant.quantize(model, calib_data=[x], qat=qat, progress=False).eval()
    report = fxquant.report(qmodel)
    assert {o.name for o in report.quantized} >= {"conv2d", "linear"}
    assert not [o for o in report.ops if "batch_norm" in o.op.lower()]  # folded, not a float BN left in the graph
    conv = qmodel.get_submodule("conv2d")
    assert conv.weight_fq is not None and conv.weight_fq.scale.shape == (6,)  # per channel, from the parameter
    assert (type(conv).__name__, conv.act) == (("ConvBnAct2d" if qat else "ConvAct2d"), "relu")
    int8 = fxquant.convert(qmodel)
    with torch.no_grad():
        want, got = model(x), int8(x)
    assert (want - got).abs().max() < 0.05 * want.abs().max()  # the int8 model computes the float one
    fxquant.export_onnx(qmodel, tmp_path / "functional.onnx", x[:2])
    assert_file_matches_int8(int8, tmp_path / "functional.onnx", _x(3, 3, 8, 8, seed=1), "functional layers", cpus=(None,))


def test_a_model_with_nothing_to_quantize_is_refused_at_quantize_with_the_reasons():
    class ComputedWeight(nn.Module):  # weight standardisation: the weight is computed in forward, so no row applies
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))

        def forward(self, x):
            w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
            return torch.tanh(F.conv2d(x, w))

    with pytest.raises(fxquant.FxQuantError, match="nothing to quantize") as raised:
        fxquant.quantize(ComputedWeight(), _x(2, 3, 6, 6))
    assert "tanh  tanh                  row float_activations" in str(raised.value)  # the report's reasons
    assert "no rule (float):\n  conv2d" in str(raised.value)


# ---------------------------------------------------------------- kind 4: float ops between quantized layers

class FloatMath(nn.Module):
    """A hand-written LayerNorm (pow, mean, rsqrt), a padding mask (ne, where, masked_fill), leaky_relu,
    erf, group_norm, clamp, abs, exp, log, reshape_as and .float() between quantized convs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv1(x)
        mu = y.mean(1, keepdim=True)
        var = (y - mu).pow(2).mean(1, keepdim=True)
        y = (y - mu) * torch.rsqrt(var + 1e-5) * self.gamma
        mask = (x[:, :1] > 0.5).float().ne(0)
        y = torch.where(mask, y, -y).masked_fill(y.abs() > 3, 0.0)
        y = F.leaky_relu(self.conv2(y), 0.1) + torch.erf(y) * 0.1
        y = F.group_norm(y, 2) + torch.log(torch.exp(y.clamp(-2, 2)) + 1).reshape_as(y)
        return self.conv3(y)


def test_float_ops_export_through_torch_onnx_and_match_the_reference(tmp_path):
    model, x = FloatMath().eval(), _x(6, 3, 8, 8)
    qmodel = fxquant.quantize(model, calib_data=[x], progress=False)
    assert {o.name for o in fxquant.report(qmodel).quantized} >= {"conv1", "conv2", "conv3"}
    int8 = fxquant.convert(qmodel)
    proto = fxquant.export_onnx(qmodel, tmp_path / "float_math.onnx", x[:2])
    names = {n.name for n in proto.graph.node}
    assert {"rsqrt", "where", "masked_fill", "erf", "group_norm", "leaky_relu"} <= names  # the FX node names are kept
    assert_file_matches_int8(int8, tmp_path / "float_math.onnx", _x(3, 3, 8, 8, seed=1), "float math")


def test_every_issue_op_exports_where_torch_onnx_does():
    """The tool's measurement on the ops the issue names and on three it found exported wrongly (torch.flatten's
    start_dim 0, softmax's implicit dim, a conv of two activations)."""
    from fxquant.tools.float_ops import run

    names = ["abs", "pow", "sqrt", "rsqrt", "exp", "log", "clamp", "ne", "gt", "leaky_relu", "erf", "group_norm",
             "reshape_as", "float", "flatten", "softmax", "conv2d", "acos", "logit"]
    rows = run(names=names)
    assert len(rows) >= len(names)
    lost = [(r.name, r.fxquant) for r in rows if r.torch_onnx == "ok" and r.fxquant != "ok"]
    assert not lost


# ---------------------------------------------------------------- kind 6: refused too late (padding_mode)

class PaddedConvs(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, padding_mode=mode)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=(1, 2), padding_mode=mode)

    def forward(self, x):
        return self.conv2(F.relu(self.bn(self.conv1(x))))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_non_zero_padding_modes_lower_to_an_explicit_pad_and_export(tmp_path, mode):
    torch.manual_seed(0)
    model, x = PaddedConvs(mode).eval(), _x(4, 3, 8, 8)
    qmodel = fxquant.quantize(model, calib_data=[x], progress=False)
    assert {o.name for o in fxquant.report(qmodel).quantized} == {"conv1", "conv2"}
    int8 = fxquant.convert(qmodel)
    with torch.no_grad():
        assert torch.equal(qmodel(x), int8(x))  # the explicit pad is the conv's own padding, on the input's grid
    fxquant.export_onnx(qmodel, tmp_path / "pad.onnx", x[:2])
    assert_file_matches_int8(int8, tmp_path / "pad.onnx", _x(3, 3, 8, 8, seed=1), f"padding_mode={mode}", cpus=(None,))


def test_qat_with_reflect_padding_trains_and_converts():
    torch.manual_seed(0)
    model, x = PaddedConvs("reflect"), _x(4, 3, 8, 8)
    qmodel = fxquant.quantize(model, calib_data=[x], qat=True, progress=False)
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    for _ in range(2):
        loss = qmodel(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    qmodel.eval()
    with torch.no_grad():
        ref = fxquant.convert(qmodel)(x)
        assert (qmodel(x) - ref).abs().max() <= float(qmodel.conv2_fq.qparams()[0]) * (1 + 1e-4)


# ---------------------------------------------------------------- kind 7: the right diagnosis

class AnchorHead(nn.Module):
    """A detection head that caches its anchor grid in a plain attribute (not a buffer) and rebuilds it when
    the feature map's size changes: torch.fx cannot trace the branch, so it is kept whole, in float."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 1)
        self.grid = torch.zeros(1)

    def forward(self, x):
        y = self.conv(x)
        h, w = y.shape[2:]
        if self.grid.shape[2:4] != y.shape[2:4]:
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            self.grid = torch.stack((xs, ys), 0).view(1, 2, h, w).float()
        return torch.cat([y[:, :2] + self.grid, y[:, 2:]], 1)


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, padding=1)
        self.head = AnchorHead()

    def forward(self, x):
        return self.head(F.relu(self.body(x)))


def test_a_leaf_caching_a_tensor_in_a_plain_attribute_exports(tmp_path):
    torch.manual_seed(0)
    model, x = Detector().eval(), _x(4, 3, 8, 8)
    qmodel = fxquant.quantize(model, calib_data=[x], progress=False)
    assert [o.name for o in fxquant.report(qmodel).leaves] == ["head"]
    grid = qmodel.head.grid
    fxquant.export_onnx(qmodel, tmp_path / "head.onnx", x[:2])
    assert qmodel.head.grid is grid and grid.device.type == "cpu"  # the shape-only run left the cache alone
    int8 = fxquant.convert(qmodel)
    with torch.no_grad():
        ref = int8(x[:2])
    got = _ort(tmp_path / "head.onnx", x[:2])["output"]
    assert np.abs(got - ref.numpy()).max() < 1e-4 * (1 + np.abs(ref.numpy()).max())


def test_a_leaf_that_branches_on_values_is_refused_with_the_real_cause(tmp_path):
    class Gate(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.gate = nn.Conv2d(3, 4, 1), Gate()

        def forward(self, x):
            return self.gate(self.conv(x))

    x = _x(2, 3, 4, 4)
    qmodel = fxquant.quantize(Gated(), calib_data=[x], progress=False)
    with pytest.raises(fxquant.FxQuantError, match=r"node 'gate'.*fails on shapes alone.*meta.*branches on tensor values"):
        fxquant.export_onnx(qmodel, tmp_path / "gate.onnx")


class OptionalArgs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x, attn_mask=None, is_causal=False):
        y = self.conv(x)
        if attn_mask is not None:
            y = y + attn_mask
        return y.relu() if is_causal else y


def test_forward_arguments_left_out_take_their_defaults(tmp_path):
    model, x = OptionalArgs().eval(), _x(2, 3, 4, 4)
    qmodel = fxquant.quantize(model, x)  # example inputs: x alone
    assert [n.name for n in qmodel.graph.nodes if n.op == "placeholder"] == ["x"]
    qmodel = fxquant.quantize(model, calib_data=[(x, torch.zeros(2))], progress=False)  # a DataLoader's (x, label)
    with torch.no_grad():
        assert (qmodel(x) - model(x)).abs().max() <= float(qmodel.conv_fq.qparams()[0])
    fxquant.export_onnx(qmodel, tmp_path / "opt.onnx")
    mask = torch.full((1, 4, 1, 1), 0.5)
    with_mask = fxquant.quantize(model, (x, mask), calib_data=[(x, mask)], progress=False)  # given, it is an input
    assert [n.name for n in with_mask.graph.nodes if n.op == "placeholder"] == ["x", "attn_mask"]


# ---------------------------------------------------------------- kind 5: Conv1d, Conv3d, ConvTranspose

class Audio(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1, groups=8)  # depthwise
        self.up = nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1)

    def forward(self, x):
        return self.up(F.relu(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Video(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm3d(6)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x))).mean(2)
        return self.bn2(self.up(y))


def _optimized_ops(path, tmp_path) -> list[str]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]


@pytest.mark.parametrize("qat", [False, True])
@pytest.mark.parametrize("kind", ["Audio", "Video"])
def test_conv1d_conv3d_quantize_with_bn_folded_and_conv_transpose_stays_float(tmp_path, kind, qat):
    torch.manual_seed(0)
    model, shape = (Audio(), (4, 3, 16)) if kind == "Audio" else (Video(), (4, 3, 4, 6, 6))
    from conftest import randomize_batchnorms

    model = randomize_batchnorms(model).eval()
    x = _x(*shape)
    qmodel = fxquant.quantize(model, calib_data=[x], qat=qat, progress=False).eval()
    report = fxquant.report(qmodel)
    convs = {"conv1", "conv2"} if kind == "Audio" else {"conv1"}
    assert {o.name for o in report.quantized} == convs
    assert [o.rule for o in report.float_by_rule if o.name == "up"] == ["conv_transpose"]
    assert not any(o.name == "bn1" for o in report.ops)  # folded into conv1
    int8 = fxquant.convert(qmodel)
    with torch.no_grad():
        want, got = model(x), int8(x)
    assert (want - got).abs().max() < 0.05 * want.abs().max()
    path = tmp_path / f"{kind}.onnx"
    fxquant.export_onnx(qmodel, path, x[:2])
    assert _optimized_ops(path, tmp_path).count("QLinearConv") == len(convs)  # ORT runs them as integer convs
    assert_file_matches_int8(int8, path, _x(3, *shape[1:], seed=1), kind, cpus=(None, "haswell") if not qat else (None,))


# ---------------------------------------------------------------- a module called at several sites, each followed by a ReLU


class SharedBlocks(nn.Module):
    """A conv and a linear applied twice (weight sharing, an unrolled loop): fuse_modules cannot fold a ReLU into
    a module called twice, so each call's ReLU is a node of its own; the conv_relu / linear_relu rows take it."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.fc, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.conv(F.relu(self.conv(x))))
        x = x.mean((2, 3))
        return self.head(F.relu(self.fc(F.relu(self.fc(x)))))


def test_a_shared_module_followed_by_relu_exports_fused_and_exact(tmp_path):
    x = _x(2, 3, 8, 8)
    qmodel = fxquant.quantize(SharedBlocks().eval(), x, calib_data=[_x(4, 3, 8, 8, seed=s) for s in range(3)], progress=False)
    rules = {n.name: n.meta["fxquant"].rule for n in qmodel.graph.nodes if "fxquant" in n.meta and n.meta["fxquant"].rule}
    assert rules["conv"] == rules["conv_1"] == "conv_relu" and rules["fc"] == rules["fc_1"] == "linear_relu"
    int8 = fxquant.convert(qmodel)
    path = tmp_path / "shared.onnx"
    fxquant.export_onnx(int8, path, x)  # the checker refused it: a Q/DQ between each call and its ReLU
    ops = _optimized_ops(path, tmp_path)
    assert ops.count("QLinearConv") == 3 and ops.count("QGemm") == 3 and "Relu" not in ops  # every ReLU folded
    assert_file_matches_int8(int8, path, x, "shared blocks")
