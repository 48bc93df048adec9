"""The error catalogue (fxquant.tools.error_catalog): every example raises an FxQuantError from the call it names,
every place fxquant raises one is some example's raise site (or INTERNAL, with a reason), and README's section is
what the tool writes. Plus the messages this catalogue made right: each one's advice, followed, works."""

from __future__ import annotations

import operator
import re
import textwrap

import pytest
import torch
from torch import nn

import fxquant
from fxquant.errors import FxQuantError
from fxquant.tools import error_catalog as ec
from fxquant.tools import error_examples

README = ec.ROOT / "README.md"


@pytest.fixture(scope="module")
def outcomes():
    return ec.run_all()


def _token(call: str) -> str:
    """What the example's last line must contain for `call` to be the call that raised."""
    if call.endswith("(...)"):
        return call[: -len("...)")]
    return call if call.startswith("fxquant ") else call.rsplit(".", 1)[-1]


def test_every_example_raises_an_fxquant_error_from_its_last_line(outcomes):
    bad = [f"{o.example.call}: {o.example.what}: {type(o.error).__name__ if o.error else 'nothing raised'} at line "
           f"{o.line}: {o.message[:200]}" for o in outcomes if not o.ok]
    assert not bad, "\n".join(bad)
    assert len(outcomes) == len(error_examples.EXAMPLES) > 100


def test_the_call_named_is_the_call_that_raised(outcomes):
    """Raised early: the example's earlier lines (quantize, calibrate, convert) ran, the named call refused."""
    for o in outcomes:
        last = o.example.code.splitlines()[-1]
        assert _token(o.example.call) in last, (o.example.call, last)


def test_every_raise_site_has_an_example_or_a_reason(outcomes):
    sites = ec.raise_sites()
    assert len(sites) > 80  # the scan found them (98 functions when this test was written)
    covered = {o.site for o in outcomes if o.ok}
    missing = sorted(set(sites) - covered - set(ec.INTERNAL))
    assert not missing, ("raise sites no example of fxquant/tools/error_examples.py reaches (add one, or, if no input "
                         f"can reach it, add it to INTERNAL with the reason): {missing}")
    stale = sorted(s for s in ec.INTERNAL if s not in sites or s in covered)
    assert not stale, f"INTERNAL entries that raise nothing any more, or that an example reaches: {stale}"
    assert all(reason.strip() for reason in ec.INTERNAL.values())


def test_the_scan_finds_each_kind_of_raise(tmp_path, monkeypatch):
    """A direct raise, one in a method and in a nested function, a raise of a helper that returns an FxQuantError;
    not the helper itself, not another exception, not a caught-and-reraised one."""
    pkg = tmp_path / "fxquant"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(textwrap.dedent("""
        from fxquant.errors import FxQuantError
        import fxquant
        def helper(what):
            return FxQuantError(what)
        def direct(x):
            if x:
                raise FxQuantError("x")
            raise ValueError("not ours")
        def via_helper():
            raise helper("y")
        class Spec:
            def __post_init__(self):
                raise fxquant.FxQuantError("z")
        def outer():
            def inner():
                raise FxQuantError("w") from None
            try:
                inner()
            except FxQuantError:
                raise
    """))
    monkeypatch.setattr(ec, "SOURCES", {"fxquant": pkg})
    assert ec.raise_sites() == {("fxquant.mod", "direct"): [8], ("fxquant.mod", "via_helper"): [11],
                                ("fxquant.mod", "Spec.__post_init__"): [14], ("fxquant.mod", "outer.<locals>.inner"): [17]}


def test_the_real_scan_sees_the_helper_raises():
    sites = ec.raise_sites()
    assert ("fxquant.api", "convert") in sites and ("fxquant.pending", "PendingQuantization.parameters") in sites
    assert ("fxquant.pending", "not_run_yet") not in sites  # it builds the error; its callers raise it
    assert ("fxquant.passes.trace_model", "_trace") in sites  # passes/ installs as fxquant.passes


def test_readme_section_is_what_the_tool_writes(outcomes):
    text = README.read_text()
    assert ec.BEGIN in text and ec.END in text
    section = text.split(ec.BEGIN, 1)[1].split(ec.END, 1)[0]
    assert section == "\n" + ec.markdown(outcomes), (
        "README's error catalogue is stale: run python -m fxquant.tools.error_catalog --readme README.md")
    assert "/tmp/" not in section  # the temporary folder is written "."


def test_write_readme_replaces_only_the_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{ec.BEGIN}\nold\n{ec.END}\ntail\n")
    ec.write_readme(str(readme), "new\n")
    assert readme.read_text() == f"# x\n{ec.BEGIN}\nnew\n{ec.END}\ntail\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        ec.write_readme(str(plain), "new\n")
    assert plain.read_text() == "no markers\n"


# ---------------------------------------------------------------- messages the catalogue made right


class MaskedHead(nn.Module):
    """A conv (quantizable), then an additive -1e9 mask read by a Linear."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.conv(x) + torch.triu(torch.full((8, 8), -1e9), 1))


def _hinted_exclude(message: str) -> list:
    """The exclude= list a sentinel message suggests, as objects."""
    entries = re.search(r"exclude=\[([^\]]*)\]", message).group(1)
    return [eval(e, {"operator": operator, "torch": torch}) for e in entries.split(", ")]  # noqa: S307 - our own message


def test_the_sentinel_message_names_an_exclude_that_works():
    """Following the message's exclude= (each time it names more) ends with a quantized model: the conv stays int8."""
    torch.manual_seed(0)
    x, exclude = torch.randn(2, 3, 8, 8), []
    for _ in range(3):
        try:
            qmodel = fxquant.quantize(MaskedHead(), x, calib_data=[x], exclude=exclude, progress=False)
            break
        except FxQuantError as exc:
            assert "sentinel" in str(exc)
            hint = _hinted_exclude(str(exc))
            assert hint and not set(map(repr, hint)) <= set(map(repr, exclude)), str(exc)  # names something new
            exclude = exclude + [h for h in hint if repr(h) not in map(repr, exclude)]
    else:
        pytest.fail(f"still refused after exclude={exclude}")
    assert operator.add in exclude and "fc" in exclude
    assert [op.name for op in fxquant.report(qmodel).quantized] == ["conv"]  # the conv is still int8


def test_list_arithmetic_on_batch_sizes_exports_with_dynamic_batch_false(tmp_path):
    """The message for [x.shape[0]] + [1] * (x.ndim - 1) says dynamic_batch=False exports it: it does."""
    import torchvision

    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return torchvision.ops.stochastic_depth(self.conv(x), 0.2, "row", training=True)

    x = torch.randn(2, 3, 8, 8)
    int8 = fxquant.convert(fxquant.quantize(Drop(), x, calib_data=[x], progress=False))
    with pytest.raises(FxQuantError, match=r"node 'add' .*lists .*dynamic_batch=False"):
        fxquant.export_onnx(int8, str(tmp_path / "a.onnx"))
    fxquant.export_onnx(int8, str(tmp_path / "b.onnx"), dynamic_batch=False)
    assert (tmp_path / "b.onnx").stat().st_size > 0


def test_stochastic_depth_in_qat_exports_with_p_zero(tmp_path):
    """The QAT message's fix (StochasticDepth p=0 before quantize) exports; p=0.2 is refused, naming qat."""
    import torchvision

    x = torch.randn(2, 3, 8, 8)
    for p in (0.2, 0.0):
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), torchvision.ops.StochasticDepth(p, "row"))
        int8 = fxquant.convert(fxquant.quantize(model, x, calib_data=[x], qat=True, progress=False))
        if p:
            with pytest.raises(FxQuantError, match=r"training=True.*qat=True.*p to 0"):
                fxquant.export_onnx(int8, str(tmp_path / "a.onnx"))
        else:
            fxquant.export_onnx(int8, str(tmp_path / "b.onnx"))
            assert (tmp_path / "b.onnx").stat().st_size > 0


class RootConv(nn.Module):
    """A functional conv on the root's own weight (lift_functional names it 'conv2d'), then a Linear."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(torch.nn.functional.conv2d(x, self.weight))


def test_exclude_takes_the_names_quantize_gives_and_refuses_others():
    """exclude= is checked against the graph annotate_quant sees, so a name lift_functional made (what
    fxquant.sensitivity / mixed_precision hand back) is taken, and a misspelt one is refused at quantize."""
    x = torch.randn(2, 3, 8, 8)
    qmodel = fxquant.quantize(RootConv(), x, calib_data=[x], exclude=["conv2d"], progress=False)
    assert [op.name for op in fxquant.report(qmodel).quantized] == ["fc"]
    with pytest.raises(FxQuantError, match=r"exclude=\['conv2'\]: no module of RootConv .*conv2d, fc"):
        fxquant.quantize(RootConv(), x, calib_data=[x], exclude=["conv2"], progress=False)


def test_an_observer_that_sees_nan_names_its_fake_quant():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    net[0].weight.data[0, 0, 0, 0] = float("nan")
    with pytest.raises(FxQuantError, match=r"observer of fake-quant '0\.weight_fq' saw NaN"):
        fxquant.quantize(net, torch.randn(2, 3, 8, 8), calib_data=[torch.randn(2, 3, 8, 8)], progress=False)


def test_running_the_catalogue_leaves_the_callers_folder_path_and_environment(outcomes):
    """`outcomes` ran every example (one sets FXQUANT_AARCH64_ROOT); a test after it must see this process as it was."""
    import os
    import sys

    assert "FXQUANT_AARCH64_ROOT" not in os.environ or os.environ["FXQUANT_AARCH64_ROOT"] != "no-arm-root-here"
    assert not any("fxquant-errors-" in p for p in sys.path) and "fxquant-errors-" not in os.getcwd()
