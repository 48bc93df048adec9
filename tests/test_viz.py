"""fxquant.viz without a browser: the stages' data, overlays, DOT, Model Explorer JSON, bad input, atomic writes.

The page's data is read back from the written HTML (the JSON in #fxviz-data), and checked against what
fxquant's own API says about the same model: FakeQuantize modules, Q/DQ nodes of the exported file.
"""

from __future__ import annotations

import json
import math
import os
import re

import onnx
import pytest
import torch
from torch import nn

import fxquant
from fxquant import FxQuantError
from fxquant.viz import viz
from fxquant.viz.outputs import dot_source, render_page, write_atomic
from fxquant.viz.overlay import model_explorer_data, sqnr


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x))) + x


class Net(nn.Module):
    """stem conv-bn-relu, a residual block (module path "block"), a reshape by x.shape[0], a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.block = Block(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.block(self.relu(self.bn(self.stem(x))))
        return self.fc(self.pool(x).reshape(x.shape[0], -1))  # x.shape: shape arithmetic the page hides


def page_data(path) -> dict:
    html = open(path, encoding="utf-8").read()
    raw = re.search(r'<script type="application/json" id="fxviz-data">(.*?)</script>', html, re.S).group(1)
    return json.loads(raw.replace("<\\/", "</"))


def stage(data: dict, sid: str) -> dict:
    return next(s for s in data["stages"] if s["id"] == sid)


def by_name(st: dict) -> dict:
    return {n["n"]: n for n in st["nodes"]}


@pytest.fixture(scope="module")
def net_page(tmp_path_factory):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(1, 3, 16, 16)
    out = tmp_path_factory.mktemp("viz") / "net.html"
    result = viz(model, x, out, sqnr=True)
    return model, x, out, result, page_data(out)


def test_every_stage_is_drawn_and_the_page_is_self_contained(net_page):
    _, _, out, result, data = net_page
    assert list(result.stages) == ["traced", "fused", "decomposed", "annotated", "fake-quant", "int8", "onnx", "ort"]
    assert all(n > 0 for n in result.stages.values()), result.errors
    html = open(out, encoding="utf-8").read()
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", html), "the page must not load anything"
    assert data["elk"] == "0.12.1"
    assert not any(p.name.endswith(".part") for p in out.parent.iterdir())


def test_fake_quant_stage_has_every_fake_quant_and_its_qparams(net_page):
    model, x, _, _, data = net_page
    qmodel = fxquant.quantize(model, (x,), calib_data=[torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
                                                       for _ in range(4)], progress=False)
    fq_names = {n.name for n in qmodel.graph.nodes if n.op == "call_module"
                and isinstance(qmodel.get_submodule(n.target), fxquant.nn.FakeQuantize)}
    nodes = by_name(stage(data, "fake-quant"))
    assert {n for n, r in nodes.items() if r["k"] == "fq"} == fq_names
    for name in fq_names:
        q = nodes[name]["q"]
        assert q["dtype"] == "uint8" and q["calibrated"] and q["scale"] > 0 and 0 <= q["zp"] <= 255
        assert q["range"][0] <= q["range"][1]
        assert nodes[name]["b"] == 8
    stem = nodes["stem"]
    assert stem["w"]["axis"] == 0 and len(stem["w"]["scale"]) == 8 and all(s > 0 for s in stem["w"]["scale"])
    assert stem["o"] == "ConvAct2d·relu" and stem["rule"] == "conv" and stem["rk"] == "quantize"


def test_onnx_stages_match_the_exported_file(net_page, tmp_path):
    model, x, _, _, data = net_page
    qmodel = fxquant.quantize(model, (x,), calib_data=[torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
                                                       for _ in range(4)], progress=False)
    path = tmp_path / "net.onnx"
    fxquant.export_onnx(fxquant.convert(qmodel), path, (x,))
    graph = onnx.load(path).graph
    onnx_nodes = stage(data, "onnx")["nodes"]
    for op, kind in (("QuantizeLinear", "q"), ("DequantizeLinear", "dq")):
        assert sum(n.op_type == op for n in graph.node) == sum(n["k"] == kind for n in onnx_nodes) > 0
    ort = by_name(stage(data, "ort"))
    kernels = [n for n in ort.values() if n["o"] == "QLinearConv"]
    assert len(kernels) == 2 and all(n["k"] == "int" for n in kernels)
    # the stem's kernel replaced the file's conv, its ReLU and the Q/DQ around them
    stem_kernel = next(n for n in kernels if "stem" in n["n"])
    assert {"stem", "stem_fq", "stem_w_dq"} <= set(stem_kernel["ab"])


def test_fused_nodes_list_what_they_absorbed_and_keep_their_module_path(net_page):
    _, _, _, _, data = net_page
    traced, fused = by_name(stage(data, "traced")), by_name(stage(data, "fused"))
    assert "bn" in traced and "bn" not in fused
    assert fused["stem"]["ab"] == ["bn", "relu"]
    assert {traced[n]["fg"] for n in ("stem", "bn", "relu")} == {"stem"}
    assert fused["block_conv"]["ab"] == ["block_bn", "block_relu"]
    assert fused["block_conv"]["g"] == "block" and fused["add"]["g"] == "block" and fused["stem"].get("g", "") == ""
    fq = by_name(stage(data, "fake-quant"))
    assert fq["block_conv_fq"]["g"] == "block"  # a pass-made node is placed by the name it extends
    int8 = by_name(stage(data, "int8"))
    assert int8["block_conv_w_dq"]["g"] == "block"
    assert {n for n, r in int8.items() if r.get("fg") == "stem"} == {"stem", "stem_conv2d", "stem_w_dq", "stem_b_dq"}


def test_shape_arithmetic_is_flagged_and_nothing_else(net_page):
    _, _, _, _, data = net_page
    flagged = {st["id"]: sorted(n["n"] for n in st["nodes"] if n.get("s")) for st in data["stages"]}
    assert flagged["traced"] == flagged["int8"] == ["getattr_1", "getitem"]  # x.shape, x.shape[0]
    assert {"getattr_1", "getitem"} <= set(flagged["onnx"]) and all(
        n["o"] in ("Shape", "Gather", "Unsqueeze", "Concat") for n in stage(data, "onnx")["nodes"] if n.get("s"))


def test_each_stage_as_a_networkx_graph(net_page):
    import networkx as nx

    _, _, _, result, data = net_page
    g = result.graphs["fake-quant"]
    assert g.number_of_nodes() == len(stage(data, "fake-quant")["nodes"]) and nx.is_directed_acyclic_graph(g)
    assert g.has_edge("stem", "stem_fq") and g.nodes["stem_fq"]["k"] == "fq"
    assert "block_conv" in nx.ancestors(g, "fc")


def test_sqnr_overlay_is_per_layer_and_falls_with_depth(net_page):
    _, _, _, result, data = net_page
    (o,) = data["overlays"]
    assert result.overlays == ["SQNR (dB)"] and o["better"] == "higher" and o["unknown"] == []
    assert {"stem", "block_conv", "add", "fc"} <= set(o["values"])
    assert all(10 < v < 60 for v in o["values"].values()), o["values"]  # 8-bit: tens of dB, not exact, not noise


def test_sqnr_formula():
    ref = torch.tensor([3.0, 4.0])  # power 25
    assert sqnr(ref, ref + torch.tensor([0.5, 0.0])) == pytest.approx(10 * math.log10(25 / 0.25))
    assert sqnr(ref, ref) == 200.0


def test_overlay_from_json_lists_unknown_names_and_writes_model_explorer_data(tmp_path):
    torch.manual_seed(0)
    overlay = tmp_path / "steps.json"
    overlay.write_text(json.dumps({"stem": 0.5, "fc": 2.0, "no_such_node": 1.0}))
    out, me = tmp_path / "p.html", tmp_path / "me.json"
    result = viz(Net().eval(), torch.randn(1, 3, 8, 8), out, overlay=str(overlay), model_explorer=me, stages=["fused"])
    assert result.unknown == {"steps": ["no_such_node"]}
    data = page_data(out)
    assert data["overlays"][0]["better"] == "lower" and data["overlays"][0]["unknown"] == ["no_such_node"]
    me_data = json.loads(me.read_text())
    (graph,) = me_data.values()
    assert graph["results"]["stem"] == {"value": 0.5}
    assert [g["stop"] for g in graph["gradient"]] == [0, 0.5, 1]
    assert graph["gradient"][-1]["bgColor"] == "#d73027"  # lower is better: the highest value is red


def test_model_explorer_gradient_follows_better():
    data = model_explorer_data({"name": "SQNR", "better": "higher", "values": {"a": 30.0}}, "g")
    assert data["g"]["gradient"][0]["bgColor"] == "#d73027"


@pytest.mark.parametrize("bad, message", [
    ({"a": float("nan")}, "finite number"),
    ({"a": "big"}, "finite number"),
    ([1, 2], "expected a JSON object"),
    ({}, "no values"),
])
def test_bad_overlays_are_refused(bad, message, tmp_path):
    path = tmp_path / "o.json"
    path.write_text(json.dumps(bad) if not isinstance(bad, dict) or bad else "{}")
    with pytest.raises(FxQuantError, match=message):
        viz(Net().eval(), torch.randn(1, 3, 8, 8), tmp_path / "p.html", overlay=bad if isinstance(bad, dict) and bad else str(path))
    assert not (tmp_path / "p.html").exists()


def test_overlay_that_is_not_json(tmp_path):
    path = tmp_path / "o.json"
    path.write_text("{not json")
    with pytest.raises(FxQuantError, match="not JSON"):
        viz(Net().eval(), torch.randn(1, 3, 8, 8), tmp_path / "p.html", overlay=str(path))


def test_onnx_file_alone(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    qmodel = fxquant.quantize(Net().eval(), (x,), calib_data=[x], progress=False)
    path = tmp_path / "net.onnx"
    fxquant.export_onnx(fxquant.convert(qmodel), path, (x,))
    result = viz(str(path), output=tmp_path / "o.html")
    assert list(result.stages) == ["onnx", "ort"] and min(result.stages.values()) > 0
    with pytest.raises(FxQuantError, match="float model"):
        viz(str(path), output=tmp_path / "o.html", sqnr=True)


def test_corrupt_and_truncated_onnx_files(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    good = tmp_path / "good.onnx"
    fxquant.export_onnx(fxquant.convert(fxquant.quantize(Net().eval(), (x,), calib_data=[x], progress=False)), good, (x,))
    raw = good.read_bytes()
    truncated, corrupt = tmp_path / "truncated.onnx", tmp_path / "corrupt.onnx"
    truncated.write_bytes(raw[: len(raw) // 3])
    corrupt.write_bytes(b"\x00\xffnot a protobuf" * 10)
    out = tmp_path / "page.html"
    out.write_text("old page")
    for path in (truncated, corrupt):
        with pytest.raises(FxQuantError, match=re.escape(str(path))):
            viz(str(path), output=out)
    assert out.read_text() == "old page"  # never half a page: the old file stays


@pytest.mark.parametrize("spec, message", [
    ("not_a_model", "expected package.module:attr"),
    ("math:pi", "not an nn.Module"),
    ("no.such.module:x", "cannot import"),
    ("torch.nn:NoSuchThing", "has no attribute"),
    ("missing.py:Net", "no such file"),
])
def test_bad_model_specs(spec, message, tmp_path):
    with pytest.raises(FxQuantError, match=message):
        viz(spec, output=tmp_path / "p.html", input_shape=(1, 3, 8, 8))


def test_model_from_a_file_and_a_wrong_input_shape(tmp_path):
    src = tmp_path / "mynet.py"
    src.write_text("import torch\nfrom torch import nn\nnet = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())\n")
    result = viz(f"{src}:net", output=tmp_path / "p.html", input_shape="1,3,8,8", stages=["traced"])
    assert result.stages == {"traced": 4}  # input, conv, relu, output
    with pytest.raises(FxQuantError, match="--input-shape"):
        viz(f"{src}:net", output=tmp_path / "q.html", input_shape="1,5")
    with pytest.raises(FxQuantError, match="positive integers"):
        viz(f"{src}:net", output=tmp_path / "q.html", input_shape="1,three")
    with pytest.raises(FxQuantError, match="needs example inputs"):
        viz(f"{src}:net", output=tmp_path / "q.html")
    assert not (tmp_path / "q.html").exists()


def test_a_stage_that_fails_is_shown_with_its_error(tmp_path, monkeypatch):
    def broken_export(*args, **kwargs):
        raise FxQuantError("export_onnx: no converter for op 'frobnicate'")

    import fxquant.onnx

    monkeypatch.setattr(fxquant.onnx, "export_onnx", broken_export)  # what fxquant.viz.build calls
    result = viz(Net().eval(), torch.randn(1, 3, 8, 8), tmp_path / "p.html")
    assert result.stages["int8"] > 0 and result.stages["onnx"] == -1 and "ort" not in result.stages
    assert "frobnicate" in result.errors["onnx"]
    assert "frobnicate" in stage(page_data(tmp_path / "p.html"), "onnx")["error"]


def test_dot_svg_png(tmp_path):
    result = viz(Net().eval(), torch.randn(1, 3, 8, 8), tmp_path / "p.html", dot=tmp_path / "g.dot",
                 svg=tmp_path / "g.svg", png=tmp_path / "g.png", sqnr=True)
    dot = (tmp_path / "g.dot").read_text()
    assert "subgraph cluster_block" in dot and re.search(r"\bblock_conv \[label=", dot) and "block_conv -> block_conv_fq" in dot
    assert (tmp_path / "g.svg").read_text().lstrip().startswith("<?xml") and "block_conv" in (tmp_path / "g.svg").read_text()
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result.files) == 4


def test_svg_without_graphviz_is_a_clear_error_and_dot_is_still_written(tmp_path, monkeypatch):
    import fxquant.viz.outputs as outputs

    monkeypatch.setattr(outputs.shutil, "which", lambda name: None)
    with pytest.raises(FxQuantError, match="apt-get install graphviz"):
        viz(Net().eval(), torch.randn(1, 3, 8, 8), tmp_path / "p.html", dot=tmp_path / "g.dot", svg=tmp_path / "g.svg")
    assert (tmp_path / "g.dot").exists() and not (tmp_path / "g.svg").exists()


def chain_stage(n: int, groups: bool) -> dict:
    """A synthetic stage of n nodes in a chain, nested as blocks.<i // 3> (or flat)."""
    nodes = [{"n": "x", "o": "input", "k": "input", "i": []}]
    for i in range(1, n):
        rec = {"n": f"blocks_{i // 3}_op{i % 3}", "o": ("Conv2d", "BatchNorm2d", "ReLU")[i % 3], "k": "op", "i": [i - 1]}
        if groups:
            rec["g"] = f"blocks.{i // 3}"
        nodes.append(rec)
    return {"id": "traced", "label": "traced", "pass": "trace_model", "nodes": nodes, "error": None, "notes": []}


def test_dot_of_a_huge_graph_stays_small():
    for groups in (True, False):
        src = dot_source(chain_stage(50_000, groups), max_boxes=300)
        boxes = len(re.findall(r"^\s+\"?[\w:.\-]+\"? \[label=", src, re.M))
        assert 1 <= boxes <= 300, boxes


def test_write_atomic_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "p.html"
    path.write_text("old")

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_atomic(path, "new page")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["p.html"]
    with pytest.raises(FxQuantError, match="does not exist"):
        write_atomic(tmp_path / "no_dir" / "p.html", "x")


def test_page_data_cannot_close_its_script_tag():
    data = {"title": "t</script><script>alert(1)</script>{{DATA}}", "stages": [chain_stage(3, False)], "overlays": [], "notes": [],
            "metadata": {}, "elk": "0.12.1"}
    data["stages"][0]["nodes"][1]["n"] = "</script><!--"
    page = render_page(data)
    body = page.split('id="fxviz-data">', 1)[1].split("</script>", 1)[0]
    assert json.loads(body.replace("<\\/", "</").replace("<\\!--", "<!--"))["stages"][0]["nodes"][1]["n"] == "</script><!--"
    assert "<title>t&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;{{DATA}}</title>" in page


def test_cli(tmp_path, capsys):
    from fxquant.cli import main

    src = tmp_path / "mynet.py"
    src.write_text("import torch\nfrom torch import nn\nclass Net(nn.Sequential):\n"
                   "    def __init__(self):\n        super().__init__(nn.Conv2d(3, 4, 3), nn.ReLU())\n")
    overlay = tmp_path / "o.json"
    overlay.write_text(json.dumps({"0": 1.0, "ghost": 2.0}))
    out = tmp_path / "page.html"
    assert main(["viz", f"{src}:Net", "--input-shape", "1,3,8,8", "--overlay", str(overlay), "-o", str(out),
                 "--dot", str(tmp_path / "g.dot"), "--stages", "traced,fake-quant"]) == 0
    captured = capsys.readouterr()
    assert [st["id"] for st in page_data(out)["stages"]] == ["traced", "fake-quant"]
    assert f"wrote {out}" in captured.out and "ghost" in captured.err
    assert out.exists() and (tmp_path / "g.dot").exists()
    assert main(["viz", "nope", "-o", str(tmp_path / "x.html")]) == 1
    assert "expected package.module:attr" in capsys.readouterr().err


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, a, b):
        return self.conv(a) * b.mean()


def test_several_inputs_by_shape(tmp_path):
    result = viz(TwoInputs().eval(), output=tmp_path / "p.html", input_shape=["1,3,4,4", (1, 2)], stages=["traced"])
    inputs = [n for n in stage(page_data(tmp_path / "p.html"), "traced")["nodes"] if n["k"] == "input"]
    assert result.stages["traced"] > 0 and [n["sh"] for n in inputs] == ["1×3×4×4", "1×2"]


class FloatIsland(nn.Module):
    """conv -> LayerNorm (float by the backend's layer_norm row) -> conv; `cumsum=True` adds an op no row claims
    and that the exporter has no converter for."""

    def __init__(self, cumsum=False):
        super().__init__()
        self.a, self.b, self.ln, self.cumsum = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.LayerNorm(4), cumsum

    def forward(self, x):
        x = self.ln(self.a(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.b(torch.cumsum(x, 3) if self.cumsum else x)


def test_float_ops_carry_the_reason_and_are_islands_in_ort(tmp_path):
    viz(FloatIsland().eval(), torch.randn(1, 3, 8, 8), tmp_path / "p.html")
    data = page_data(tmp_path / "p.html")
    ln = by_name(stage(data, "fake-quant"))["ln"]
    assert ln["k"] == "float" and ln["why"] == "float by rule: backend row 'layer_norm'"
    ort = stage(data, "ort")["nodes"]
    assert {n["o"] for n in ort if n["k"] == "float"} == {"LayerNormalization"}
    assert next(n for n in ort if n["o"] == "LayerNormalization")["why"].startswith("float by rule")
    assert sum(n["k"] == "int" for n in ort) == 2  # the two convs run as QLinearConv around the float island


def test_an_op_the_exporter_lacks_stops_at_the_onnx_stage(tmp_path):
    result = viz(FloatIsland(cumsum=True).eval(), torch.randn(1, 3, 8, 8), tmp_path / "p.html")
    assert result.stages["int8"] > 0 and result.stages["onnx"] == -1 and "cumsum" in result.errors["onnx"]
    cumsum = by_name(stage(page_data(tmp_path / "p.html"), "fake-quant"))["cumsum"]
    assert cumsum["k"] == "float" and "no backend rule" in cumsum["why"]


def test_vendored_elkjs_is_the_recorded_file():
    import hashlib
    from importlib import resources

    from fxquant.viz.outputs import ELK_VERSION

    static = resources.files("fxquant.viz").joinpath("static")
    note = static.joinpath("VENDORED.md").read_text()
    digest = hashlib.sha256(static.joinpath("elk.bundled.js").read_bytes()).hexdigest()
    assert f"`elk.bundled.js` sha256: {digest}" in note and f"elkjs {ELK_VERSION}" in note
    assert "Eclipse Public License - v 2.0" in static.joinpath("ELKJS-LICENSE.md").read_text()


def test_an_onnx_file_from_elsewhere_nests_by_scope_names(tmp_path):
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["a"], name="/layer1/layer1.0/act/Relu"),
             helper.make_node("Neg", ["a"], ["y"], name="/head/Neg")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx")
    result = viz(str(tmp_path / "m.onnx"), output=tmp_path / "p.html")
    assert result.stages == {"onnx": 4, "ort": 4}  # input, Relu, Neg, output
    nodes = by_name(stage(page_data(tmp_path / "p.html"), "onnx"))
    assert nodes["/layer1/layer1.0/act/Relu"]["g"] == "layer1.0.act" and nodes["/head/Neg"]["g"] == "head"
    assert nodes["/head/Neg"]["sh"] == "1×4"  # the graph output's declared shape


def test_quantize_options_reach_the_pipeline(tmp_path):
    result = viz(Net().eval(), torch.randn(1, 3, 8, 8), tmp_path / "p.html", w_bits=4, a_bits=6, stages=["fake-quant"])
    nodes = stage(page_data(tmp_path / "p.html"), "fake-quant")["nodes"]
    assert result.stages["fake-quant"] > 0
    assert {n["w"]["qmax"] for n in nodes if "w" in n} == {7}  # 4-bit symmetric weights: [-7, 7]
    assert {n["b"] for n in nodes if n["k"] == "fq"} == {6}
    with pytest.raises(FxQuantError, match="w_bits"):
        viz(Net().eval(), torch.randn(1, 3, 8, 8), tmp_path / "q.html", w_bits=9)
    with pytest.raises(FxQuantError, match="config"):
        viz(Net().eval(), torch.randn(1, 3, 8, 8), tmp_path / "q.html", config={"w_bits": 4})


def test_sqnr_with_some_stages_still_matches_fused_layers(tmp_path, net_page):
    _, x, _, full, data = net_page
    torch.manual_seed(0)
    result = viz(Net().eval(), x, tmp_path / "p.html", sqnr=True, stages=["onnx"])
    assert list(result.stages) == ["onnx"]
    values = page_data(tmp_path / "p.html")["overlays"][0]["values"]
    assert values["stem"] == pytest.approx(data["overlays"][0]["values"]["stem"], abs=1e-3)  # against the traced ReLU


def test_fxquant_viz_is_callable_and_a_package(tmp_path):
    import fxquant.viz.outputs  # noqa: F401 - the package's modules still import

    result = fxquant.viz(Net().eval(), torch.randn(1, 3, 8, 8), tmp_path / "p.html", stages=["traced"])
    assert result.path == str(tmp_path / "p.html") and "viz" in fxquant.__all__


def test_model_stages_with_the_default_config(tmp_path):
    from fxquant.viz.build import model_stages

    built = model_stages(Net().eval(), (torch.randn(1, 3, 8, 8),), stages=["traced"])
    assert [s.id for s in built.stages] == ["traced"] and built.qmodel is not None


def test_fxquant_compare_overlays_load_as_they_are(tmp_path):
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(1, 3, 8, 8)
    qmodel = fxquant.quantize(model, (x,), calib_data=[x], progress=False)
    int8 = fxquant.convert(qmodel)
    path = tmp_path / "net.onnx"
    fxquant.export_onnx(int8, path, (x,))
    overlays = fxquant.compare(model, qmodel, int8, str(path), x).overlays()
    result = viz(model, x, tmp_path / "p.html", overlay=overlays, calib_data=[x])
    assert result.overlays == [o["name"] for o in overlays] and len(overlays) >= 3
    assert result.unknown == {}  # compare names layers the way the viewer's stages do
    data = page_data(tmp_path / "p.html")
    assert data["overlays"][0]["values"] and data["overlays"][0]["better"] == "higher"
