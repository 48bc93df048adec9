"""trace_model: the GraphModule, the shapes it records, and the errors it gives for untraceable code."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
from torch import nn

from fxquant import FxQuantError
from fxquant.meta import KEY, info
from fxquant.passes import trace_model

from conftest import RootBranch


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace through the `if`."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


GATE_LINE = next(i for i, line in enumerate(inspect.getsourcelines(Gate.forward)[0]) if "if x.sum()" in line)
GATE_LINENO = inspect.getsourcelines(Gate.forward)[1] + GATE_LINE


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = Body()

    def forward(self, x):
        return self.body(self.stem(x))


def _hooked_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple]:
    """Output shape of every leaf module by qualified name, from forward hooks on the eager model."""
    shapes = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
        for name, m in model.named_modules()
        if not list(m.children())
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return shapes


def test_trace_records_shapes_and_dtypes_that_match_eager_hooks(residual_cnn, image):
    gm = trace_model(residual_cnn, example_inputs=(image,))
    hooked = _hooked_shapes(residual_cnn, image)
    module_nodes = [n for n in gm.graph.nodes if n.op == "call_module"]
    # block.relu is called twice; its two nodes are checked through the function nodes below
    for node in module_nodes:
        if node.target != "block.relu":
            assert info(node).shape == hooked[node.target], node.name
    by_name = {n.name: n for n in gm.graph.nodes}
    assert info(by_name["x"]).shape == (2, 3, 16, 16)
    assert info(by_name["relu"]).shape == (2, 8, 16, 16)  # F.relu after the stem
    assert info(by_name["add"]).shape == (2, 8, 8, 8)
    assert info(by_name["flatten"]).shape == (2, 8)
    assert info(by_name["fc"]).shape == (2, 5)
    tensors = [n for n in gm.graph.nodes if n.op != "output"]
    assert all(info(n).dtype == torch.float32 and info(n).is_float_tensor for n in tensors)


def test_trace_output_equals_the_model(residual_cnn, image):
    gm = trace_model(residual_cnn, example_inputs=(image,))
    with torch.no_grad():
        assert torch.equal(gm(image), residual_cnn(image))


def test_traced_graph_pickles(residual_cnn, image):
    gm = trace_model(residual_cnn, example_inputs=(image,))
    back = pickle.loads(pickle.dumps(gm))
    assert [n.name for n in back.graph.nodes] == [n.name for n in gm.graph.nodes]
    with torch.no_grad():
        assert torch.equal(back(image), gm(image))


def test_non_tensor_values_get_meta_without_shape():
    class Reshaper(nn.Module):
        def forward(self, x):
            n = x.size(0)
            return x.reshape(n, -1)

    gm = trace_model(Reshaper(), example_inputs=(torch.randn(2, 3, 4),))
    size = next(n for n in gm.graph.nodes if n.target == "size")
    reshape = next(n for n in gm.graph.nodes if n.target == "reshape")
    assert KEY in size.meta and info(size).shape is None and not info(size).is_float_tensor
    assert info(reshape).shape == (2, 12)


def test_recording_shapes_does_not_move_batchnorm_statistics(residual_cnn, image):
    residual_cnn.train()
    before = copy.deepcopy(residual_cnn.state_dict())
    gm = trace_model(residual_cnn, example_inputs=(image,))
    assert gm.training  # the mode the model came in with
    for key, value in residual_cnn.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_data_dependent_branch_in_submodule_names_module_line_and_fix():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(FxQuantError) as err:
        trace_model(GatedNet(), example_inputs=(x,))
    msg = str(err.value)
    assert "'body.gate'" in msg and "(Gate)" in msg
    assert f"{__file__}:{GATE_LINENO}" in msg
    assert "`if x.sum() > 0:`" in msg
    assert "exclude=['body.gate']" in msg and "leaf_modules=" in msg


def test_data_dependent_branch_in_root_forward_points_at_concrete_args():
    with pytest.raises(FxQuantError, match=r"the model's own forward at .*`if y\.mean\(\) > 0:`.*concrete_args="):
        trace_model(RootBranch(), example_inputs=(torch.randn(1, 3, 4, 4),))


@pytest.mark.parametrize(
    "option, value",
    [("exclude", ["body.gate"]), ("leaf_modules", ["body.gate"]), ("leaf_modules", [Gate]), ("exclude", ["body"])],
    ids=["exclude_name", "leaf_name", "leaf_type", "exclude_parent"],
)
def test_untraceable_submodule_traces_when_kept_whole(option, value):
    model = GatedNet().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = trace_model(model, example_inputs=(x,), **{option: value})
    kept = value[0] if isinstance(value[0], str) else "body.gate"
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert kept in targets
    assert not any(t.startswith(kept + ".") for t in targets)  # nothing inside it was traced
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
        assert torch.equal(gm(-x.abs()), model(-x.abs()))  # both branches still live in the leaf


def test_wrong_shaped_example_inputs_name_the_failing_node():
    model = GatedNet()
    with pytest.raises(FxQuantError, match=r"example_inputs: node 'stem' .* failed on them"):
        trace_model(model, example_inputs=(torch.randn(1, 5, 8, 8),), exclude=["body.gate"])


def test_wrong_number_of_example_inputs_is_named():
    with pytest.raises(FxQuantError, match=r"example_inputs: the model takes 1 inputs \['input'\], got 2"):
        trace_model(RootBranch().conv, example_inputs=(torch.randn(1, 3, 4, 4), torch.randn(1)))
