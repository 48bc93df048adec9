"""Issue 14, item 8: random valid networks (fxquant.tools.fuzz) through quantize -> convert -> export -> ONNX
Runtime. Each either agrees with the reference int8 graph within one step at every layer, or is refused
by quantize with an FxQuantError; the shrunk failures the fuzzer found are kept below as regression tests.
`python -m fxquant.tools.fuzz --graphs 1000` is the long run (README)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.tools.fuzz import Draw, Spec, check, draw_spec


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(st.data())
def test_random_networks_export_within_one_step_or_are_refused(data):
    spec = draw_spec(Draw(data=data), max_steps=5)
    verdict = check(spec)
    assert not verdict.failed, f"{verdict.kind}: {verdict.detail}\n{spec!r}"


FOUND = [
    # F.conv2d(y, w, b, groups=y.shape[1]): groups is a size node; the export wrote it as an attribute name, and
    # lift_functional left the conv float (now: the size is read off the recorded shape)
    Spec(dims=1, inputs=1, steps=(("slice", 1), ("conv", 1, 1, True, True), ("bn", None)), output="tuple", seed=46166),
    Spec(dims=2, inputs=2, steps=(("conv", 4, 1, True, False), ("conv", 4, 3, True, True), ("bn", None), ("resize",),
                                  ("pool", "max")), output="dict", seed=13227),
]


@pytest.mark.parametrize("spec", FOUND, ids=lambda s: "-".join(step[0] for step in s.steps))
def test_graphs_the_fuzzer_found(spec):
    verdict = check(spec)
    assert verdict.kind == "ok", f"{verdict.kind}: {verdict.detail}"


def test_a_dead_batchnorm_channel_in_a_random_graph_is_exact():
    """Kind 1 inside a graph: the folded dead channel's bias survives (the layer is within one step)."""
    spec = Spec(dims=2, inputs=1, steps=(("conv", 6, 3, False, False), ("bn", "dead"), ("act", "relu")), output="tensor")
    assert check(spec).kind == "ok"
