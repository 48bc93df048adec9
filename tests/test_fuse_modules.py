"""fuse_modules: BN folding and activation fusion.

Every test traces a deep copy (fusion folds BN into the traced module's weight in place) and
compares the fused graph with the untouched float model in eval mode, to float tolerance:
BN folding reorders a few float32 multiplications, nothing more.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxquant.meta import op_key
from fxquant.nn import ConvAct2d, LinearAct
from fxquant.passes import fuse_modules, trace_model

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
RELU_KEYS = {nn.ReLU, nn.ReLU6, F.relu, F.relu6, torch.relu, torch.relu_, "relu", "relu_"}


@pytest.fixture
def fused(randomize_bn):
    """fused(model, x) -> (fused GraphModule, float output) for an eval-mode model with non-trivial BN statistics."""

    def run(model: nn.Module, x: torch.Tensor):
        model = randomize_bn(model).eval()
        with torch.no_grad():
            expected = model(x)
        gm = fuse_modules(trace_model(copy.deepcopy(model), example_inputs=(x,)))
        gm.graph.lint()
        gm.recompile()
        return gm, expected

    return run


def count(gm, keys) -> int:
    """Nodes whose op key is in the set `keys`, or whose module is an instance of the types `keys`."""
    if isinstance(keys, set):
        return sum(op_key(gm, n) in keys for n in gm.graph.nodes)
    return sum(n.op == "call_module" and isinstance(gm.get_submodule(n.target), keys) for n in gm.graph.nodes)


def assert_same_output(gm, expected, x):
    with torch.no_grad():
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)


# activation forms: (id, module factory or None, function applied in forward or None, fused act)
ACT_FORMS = [
    ("nn.ReLU", nn.ReLU, None, "relu"),
    ("nn.ReLU_inplace", lambda: nn.ReLU(inplace=True), None, "relu"),
    ("F.relu", None, F.relu, "relu"),
    ("F.relu_inplace", None, lambda y: F.relu(y, inplace=True), "relu"),
    ("torch.relu", None, torch.relu, "relu"),
    ("torch.relu_", None, torch.relu_, "relu"),
    ("Tensor.relu", None, lambda y: y.relu(), "relu"),
    ("Tensor.relu_", None, lambda y: y.relu_(), "relu"),
    ("nn.ReLU6", nn.ReLU6, None, "relu6"),
    ("F.relu6", None, F.relu6, "relu6"),
]


class ConvBnAct(nn.Module):
    def __init__(self, act_module=None, act_fn=None, bn=True, bias=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(6) if bn else None
        self.act = act_module() if act_module else None
        self.act_fn = act_fn

    def forward(self, x):
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        if self.act is not None:
            y = self.act(y)
        if self.act_fn is not None:
            y = self.act_fn(y)
        return y


class LinearBnAct(nn.Module):
    def __init__(self, bn=True, act=True):
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.bn = nn.BatchNorm1d(4) if bn else None
        self.act = act

    def forward(self, x):
        y = self.fc(x)
        if self.bn is not None:
            y = self.bn(y)
        return F.relu(y) if self.act else y


def conv_input(seed=7):
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed)) * 2


# ---------------------------------------------------------------- structure + numerics: the rules fire


@pytest.mark.parametrize("name, act_module, act_fn, act", ACT_FORMS, ids=[f[0] for f in ACT_FORMS])
def test_conv_bn_act_fuses_into_one_conv(fused, name, act_module, act_fn, act):
    x = conv_input()
    model = ConvBnAct(act_module, act_fn)
    traced = trace_model(copy.deepcopy(model), example_inputs=(x,))
    assert count(traced, BN_TYPES) == 1 and count(traced, RELU_KEYS) == 1
    gm, expected = fused(model, x)
    assert count(gm, BN_TYPES) == 0 and count(gm, RELU_KEYS) == 0
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    assert type(gm.conv) is ConvAct2d and gm.conv.act == act
    assert not hasattr(gm, "bn") and not hasattr(gm, "act")  # the folded modules are gone
    assert_same_output(gm, expected, x)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_conv_bn_folds_without_activation(fused, bias):
    x = conv_input()
    gm, expected = fused(ConvBnAct(bn=True, bias=bias), x)
    assert count(gm, BN_TYPES) == 0
    assert type(gm.conv) is nn.Conv2d and gm.conv.bias is not None  # folding always gives a bias
    assert_same_output(gm, expected, x)


@pytest.mark.parametrize("name, act_module, act_fn, act", ACT_FORMS[::3], ids=[f[0] for f in ACT_FORMS[::3]])
def test_conv_act_fuses_without_bn(fused, name, act_module, act_fn, act):
    x = conv_input()
    gm, expected = fused(ConvBnAct(act_module, act_fn, bn=False, bias=True), x)
    assert count(gm, RELU_KEYS) == 0
    assert type(gm.conv) is ConvAct2d and gm.conv.act == act
    assert_same_output(gm, expected, x)


@pytest.mark.parametrize("bn", [False, True], ids=["linear_relu", "linear_bn1d_relu"])
def test_linear_relu_and_linear_bn1d_fuse(fused, bn):
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    gm, expected = fused(LinearBnAct(bn=bn), x)
    assert count(gm, BN_TYPES) == 0 and count(gm, RELU_KEYS) == 0
    assert type(gm.fc) is LinearAct and gm.fc.act == "relu"
    assert_same_output(gm, expected, x)


def test_linear_bn1d_folds_without_activation(fused):
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    gm, expected = fused(LinearBnAct(bn=True, act=False), x)
    assert count(gm, BN_TYPES) == 0 and type(gm.fc) is nn.Linear
    assert_same_output(gm, expected, x)


def test_bn_without_affine_folds(fused):
    model = ConvBnAct(nn.ReLU)
    model.bn = nn.BatchNorm2d(6, affine=False)
    x = conv_input()
    gm, expected = fused(model, x)
    assert count(gm, BN_TYPES) == 0 and type(gm.conv) is ConvAct2d
    assert_same_output(gm, expected, x)


def test_residual_cnn_fuses_every_conv_and_keeps_the_shared_relu(fused, residual_cnn, image):
    gm, expected = fused(residual_cnn, image)
    assert count(gm, BN_TYPES) == 0
    assert type(gm.stem) is ConvAct2d and gm.stem.act == "relu"
    assert type(gm.block.conv1) is ConvAct2d and gm.block.conv1.act == "relu"
    assert type(gm.block.conv2) is nn.Conv2d  # its output goes to the add, not a relu
    # block.relu was called twice: the call after bn1 is fused, the one after the add remains
    relu_nodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "block.relu"]
    assert len(relu_nodes) == 1 and relu_nodes[0].args[0].name == "add"
    assert isinstance(gm.block.relu, nn.ReLU)
    assert_same_output(gm, expected, image)


# ---------------------------------------------------------------- negatives: the rules must not fire


class TwoUsers(nn.Module):
    """The conv's output feeds the BN and is also returned, so neither BN nor relu may be folded into it."""

    def __init__(self, then_relu: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.then_relu = then_relu

    def forward(self, x):
        y = self.conv(x)
        if self.then_relu:
            return F.relu(y), y
        return self.bn(y) + y


@pytest.mark.parametrize("then_relu", [False, True], ids=["bn", "relu"])
def test_conv_with_two_users_is_not_fused(fused, then_relu):
    x = conv_input()
    gm, expected = fused(TwoUsers(then_relu), x)
    assert type(gm.conv) is nn.Conv2d
    assert count(gm, RELU_KEYS if then_relu else BN_TYPES) == 1
    assert_same_output(gm, expected, x)


class CalledTwice(nn.Module):
    def __init__(self, with_bn: bool):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if with_bn else None

    def forward(self, x):
        y = self.conv(self.conv(x))
        return F.relu(self.bn(y) if self.bn is not None else y)


@pytest.mark.parametrize("with_bn", [False, True], ids=["relu", "bn_relu"])
def test_module_called_twice_is_not_fused(fused, with_bn):
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(5))
    gm, expected = fused(CalledTwice(with_bn), x)
    assert type(gm.conv) is nn.Conv2d
    assert count(gm, BN_TYPES) == int(with_bn) and count(gm, RELU_KEYS) == 1
    assert_same_output(gm, expected, x)


class ReluThenBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.relu(self.conv(x)))


def test_relu_then_bn_keeps_the_bn(fused):
    x = conv_input()
    gm, expected = fused(ReluThenBn(), x)
    assert count(gm, BN_TYPES) == 1  # the BN sees activated values: nothing to fold
    assert type(gm.conv) is ConvAct2d and gm.conv.act == "relu"
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "bn"]
    assert_same_output(gm, expected, x)


def test_bn_without_running_stats_is_not_folded(fused):
    model = ConvBnAct()
    model.bn = nn.BatchNorm2d(6, track_running_stats=False)  # normalizes with batch statistics even in eval
    x = conv_input()
    gm, expected = fused(model, x)
    assert count(gm, BN_TYPES) == 1 and type(gm.conv) is nn.Conv2d
    assert_same_output(gm, expected, x)


class LinearOnSequence(nn.Module):
    """Linear on (N, L, C): BatchNorm1d(L) then normalizes the L axis, not the linear's output features."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


def test_linear_on_3d_input_does_not_fold_bn1d_over_the_wrong_axis(fused):
    x = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(11))
    gm, expected = fused(LinearOnSequence(), x)
    assert count(gm, BN_TYPES) == 1 and type(gm.fc) is nn.Linear
    assert_same_output(gm, expected, x)

