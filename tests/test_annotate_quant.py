"""annotate_quant: which onnxruntime rule claims each node, and the specs it writes into node.meta."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxquant import QuantSpec
from fxquant.backends import load_backend
from fxquant.meta import info
from fxquant.passes import annotate_quant, fuse_modules, trace_model

ORT = load_backend("onnxruntime")
U8 = QuantSpec("uint8", 0, 255)
W8 = QuantSpec("int8", -127, 127, symmetric=True, axis=0, observer="current")
W7 = W8.with_bits(7)  # the portable target's weights on a pair-summing GEMM (every conv and linear here)


def annotated(model: nn.Module, x: torch.Tensor, **options):
    exclude = options.get("exclude", ())
    gm = fuse_modules(trace_model(model, example_inputs=(x,), exclude=exclude))
    return annotate_quant(gm, backend=ORT, **options)


def rules(gm) -> dict[str, str | None]:
    return {n.name: info(n).rule for n in gm.graph.nodes}


def node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def test_residual_cnn_rule_names(residual_cnn, image):
    gm = annotated(residual_cnn, image)
    assert rules(gm) == {
        "x": None,
        "stem": "conv",
        "pool": "maxpool",
        "block_conv1": "conv",
        "block_conv2": "conv",
        "add": "add_relu",
        "block_relu_1": "add_relu",
        "gap": "global_avgpool",
        "flatten": "reshape",
        "fc": "linear",
        "output": None,
    }


def test_residual_cnn_specs(residual_cnn, image):
    gm = annotated(residual_cnn, image)
    for name in ("stem", "block_conv1", "block_conv2", "fc"):  # weighted rows
        meta = info(node(gm, name))
        assert meta.weight == W7, name
        assert meta.inputs == {0: U8} and meta.output == U8 and not meta.share, name
    add, relu = info(node(gm, "add")), info(node(gm, "block_relu_1"))
    assert add.inputs == {0: U8, 1: U8} and add.output is None and add.weight is None
    assert relu.inputs == {} and relu.output == U8  # the chain's output spec sits on its last node
    gap = info(node(gm, "gap"))
    assert gap.inputs == {0: U8} and gap.output == U8 and gap.weight is None
    for name in ("pool", "flatten"):  # shared-qparam rows quantize nothing themselves
        meta = info(node(gm, name))
        assert meta.share and meta.inputs == {} and meta.output is None and meta.weight is None, name


@pytest.mark.parametrize("w_bits, a_bits", [(4, 8), (8, 4), (2, 3)])
def test_bit_widths_narrow_the_specs(residual_cnn, image, w_bits, a_bits):
    gm = annotated(residual_cnn, image, w_bits=w_bits, a_bits=a_bits)
    meta = info(node(gm, "block_conv1"))
    half = 2 ** (w_bits - 1) - 1
    assert (meta.weight.qmin, meta.weight.qmax) == (-half, half)
    assert (meta.output.qmin, meta.output.qmax) == (0, 2**a_bits - 1)
    assert meta.inputs[0] == meta.output


@pytest.mark.parametrize(
    "exclude, unclaimed",
    [
        (["block.conv2"], {"block_conv2"}),
        (["block"], {"block"}),  # a parent name keeps the whole block float (traced as one leaf)
        ([nn.Linear], {"fc"}),
        ([nn.Conv2d], {"stem", "block_conv1", "block_conv2"}),  # fused ConvAct2d is still a Conv2d
        ([nn.MaxPool2d, nn.AdaptiveAvgPool2d], {"pool", "gap"}),
    ],
    ids=["name", "parent_name", "type_linear", "type_conv", "types_pools"],
)
def test_excluded_modules_get_no_rule(residual_cnn, image, exclude, unclaimed):
    gm = annotated(residual_cnn, image, exclude=exclude)
    got = rules(gm)
    for name in unclaimed:
        meta = info(node(gm, name))
        assert meta.rule is None and meta.weight is None and meta.output is None and meta.inputs == {}, name
    everything = annotated(residual_cnn, image)  # the other nodes keep their rules
    others = {k: v for k, v in got.items() if k not in unclaimed}
    assert others == {k: v for k, v in rules(everything).items() if k in others}


def test_excluded_function_leaves_add_float_and_relu_stands_alone(residual_cnn, image):
    gm = annotated(residual_cnn, image, exclude=[operator.add])
    assert info(node(gm, "add")).rule is None
    relu = info(node(gm, "block_relu_1"))
    assert relu.rule == "relu" and relu.share and relu.output is None


class AddThenRelu(nn.Module):
    def __init__(self, add_has_second_user: bool):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.second = add_has_second_user

    def forward(self, x):
        s = self.a(x) + self.b(x)
        r = torch.relu(s)
        return (r, s) if self.second else r


def test_add_relu_is_one_chain():
    gm = annotated(AddThenRelu(False), torch.randn(1, 3, 4, 4))
    assert rules(gm)["add"] == rules(gm)["relu"] == "add_relu"
    assert info(node(gm, "relu")).output == U8 and info(node(gm, "add")).output is None


def test_add_with_two_users_is_not_chained_with_its_relu():
    gm = annotated(AddThenRelu(True), torch.randn(1, 3, 4, 4))
    assert rules(gm)["add"] == "add" and info(node(gm, "add")).output == U8
    assert rules(gm)["relu"] == "relu" and info(node(gm, "relu")).share


class Pools(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(size)

    def forward(self, x):
        y = self.conv(x)
        return self.pool(y), F.adaptive_avg_pool2d(y, self.pool.output_size), F.adaptive_avg_pool2d(y, output_size=self.pool.output_size)


@pytest.mark.parametrize("size, claimed", [(1, True), ((1, 1), True), (2, False), ((1, 2), False)])
def test_adaptive_avgpool_is_global_only_for_output_size_one(size, claimed):
    gm = annotated(Pools(size), torch.randn(1, 3, 8, 8))
    pools = [n for n in gm.graph.nodes if n.name.startswith(("pool", "adaptive_avg_pool2d"))]
    assert len(pools) == 3
    for n in pools:
        assert info(n).rule == ("global_avgpool" if claimed else None), n.name
        assert (info(n).output == U8) is claimed


class Mixed(nn.Module):
    """Integer arithmetic, a float-only op, and the same input read by two quantized ops."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        n = x.size(0) + 1  # an add on ints: not a tensor, not claimed
        y = F.softmax(self.conv(x), dim=1)
        return y.flatten(1)[:, :4].reshape(n - 1, 4), self.fc(x.mean((2, 3)))


def test_non_float_values_and_float_ops_are_not_quantized():
    gm = annotated(Mixed(), torch.randn(2, 3, 4, 4))
    got = rules(gm)
    assert got["add"] is None and got["sub"] is None and got["size"] is None
    assert got["softmax"] == "float_ops" and info(node(gm, "softmax")).output is None
    assert got["getitem"] == "movement" and info(node(gm, "getitem")).output is None  # slicing keeps its input's grid (none here)
    assert got["mean"] == "float_math"  # float by rule: the fc reads a float value, which it quantizes itself
    assert info(node(gm, "fc")).inputs == {0: U8}
