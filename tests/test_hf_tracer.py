"""A GraphModule from HFTracer (transformers 4.x's `transformers.utils.fx`) is quantized as it is.

transformers 5 dropped `transformers.utils.fx`; `make venv` installs transformers 4.57.6 (with the
huggingface-hub and tokenizers it needs) into .venv/hf4, apart from the venv's 5.x. A subprocess with
PYTHONPATH=.venv/hf4 (where 4.x shadows 5.x, checked) traces small random-init BertModel and RobertaModel
(eager attention: HF 4.x's `scores / sqrt(d) + (1 - mask) * finfo.min`) with HFTracer, quantizes that
GraphModule without tracing it again, converts, exports, and runs the file in ONNX Runtime against the
reference int8 graph layer by layer (this CPU). The worker reports facts as JSON; this file asserts them.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HF4 = Path(__file__).resolve().parents[1] / ".venv" / "hf4"

WORKER = r'''
import json, sys
import torch
import transformers
from transformers.utils import fx as hf_fx
import fxquant
from fxquant.check import layerwise
from fxquant.meta import KEY, info
from fxquant.nn import FakeQuantize, LinearAct

T, SEQ, out = transformers, 12, {"version": transformers.__version__, "file": transformers.__file__}
small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, vocab_size=100, attn_implementation="eager")
configs = {"bert": (T.BertModel, T.BertConfig(**small)), "roberta": (T.RobertaModel, T.RobertaConfig(**small))}
g = torch.Generator().manual_seed(0)
ids = torch.randint(3, 100, (2, SEQ), generator=g)
mask = torch.ones(2, SEQ, dtype=torch.long)
mask[1, 8:] = 0  # the second sentence is padded
inputs = {"input_ids": ids, "attention_mask": mask}
for name, (cls, config) in configs.items():
    torch.manual_seed(0)
    model = cls(config).eval()
    gm = hf_fx.symbolic_trace(model, input_names=list(inputs))
    traced_names = {n.name for n in gm.graph.nodes}
    qmodel = fxquant.quantize(gm, inputs, calib_data=[inputs], progress=False)
    modules = dict(qmodel.named_modules())
    rules = {n.name: info(n).rule for n in qmodel.graph.nodes if KEY in n.meta}
    with torch.no_grad():
        fxquant.set_fake_quant(qmodel, enabled=False)
        same = (qmodel(**inputs)["last_hidden_state"] - model(**inputs).last_hidden_state).abs().max().item()
        fxquant.set_fake_quant(qmodel, enabled=True)
    matmuls = [n for n in qmodel.graph.nodes if n.target is torch.matmul]
    mask_ops = [n for n in qmodel.graph.nodes if n.target in (__import__("operator").mul,)
                and any(isinstance(a, float) and a < -1e30 for a in n.args)]
    int8 = fxquant.convert(qmodel)
    path = f"{sys.argv[1]}/{name}.onnx"
    fxquant.export_onnx(int8, path)
    found = layerwise(int8, path, tuple(inputs.values()))
    with torch.no_grad():
        ref = int8(**inputs)["last_hidden_state"].numpy()
    out[name] = dict(
        linears=sum(isinstance(m, torch.nn.Linear) for m in model.modules()),
        quantized_linears=sum(isinstance(m, LinearAct) and m.weight_fq is not None for m in modules.values()),
        layers=config.num_hidden_layers,
        matmul_rules=[rules.get(n.name) for n in matmuls],
        matmul_inputs=[sorted(info(n).inputs) for n in matmuls],
        div_rules=sorted({rules.get(n.name) for n in qmodel.graph.nodes if n.name.startswith("truediv")}),
        kept_names=sorted(traced_names & {n.name for n in qmodel.graph.nodes}),
        traced_names=sorted(traced_names),
        mask_rules=[rules.get(n.name) for n in mask_ops],
        mask_quantized=any(isinstance(modules.get(u.target), FakeQuantize) for n in mask_ops for u in n.users),
        stand_in_error=same, max_steps=found.max_steps, worst=found.worst,
        output_error=float(abs(found.outputs[0] - ref).max()), output_scale=float(abs(ref).max()))
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def hf4_facts(tmp_path_factory):
    if not (HF4 / "transformers").is_dir():
        pytest.fail(f"transformers 4.x is not installed in {HF4}: `make venv` installs it")  # fail, never skip unseen
    folder = tmp_path_factory.mktemp("hf4")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HF4), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", WORKER, str(folder)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_transformers_4_shadows_5(hf4_facts):
    assert hf4_facts["version"].startswith("4."), hf4_facts["version"]
    assert Path(hf4_facts["file"]).resolve().is_relative_to(HF4.resolve())


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_hftracer_graph_module_quantizes_as_it_is(hf4_facts, name):
    facts = hf4_facts[name]
    # taken as it is: every node of HFTracer's graph is still there by name, its dead `mask.dim() == 2` checks
    # included (plain torch.fx cannot trace HF's forward at all; a re-trace would not give these names)
    assert facts["kept_names"] == facts["traced_names"]
    assert facts["stand_in_error"] < 1e-5  # fake-quant off, the quantized GraphModule computes HFTracer's function
    assert facts["quantized_linears"] == facts["linears"]  # every Linear (the pooler's too)
    assert len(facts["matmul_rules"]) == 2 * facts["layers"]
    assert all(r is not None for r in facts["matmul_rules"]) and all(i == [0, 1] for i in facts["matmul_inputs"])
    assert facts["div_rules"] == ["attention_scores_div_bias"]  # q @ k^T / sqrt(d) + mask -> softmax: one row
    assert facts["mask_rules"] == ["mask_arithmetic"] and not facts["mask_quantized"]  # (1 - m) * finfo.min: float
    assert facts["max_steps"] <= 1, f"{name}: '{facts['worst']}' is {facts['max_steps']} steps from the reference"
    assert facts["output_error"] <= 1e-3 * max(1.0, facts["output_scale"])


# What HFTracer's graphs need, each on a small inline model (these run without transformers 4.x).

import torch  # noqa: E402
from torch import fx, nn  # noqa: E402

import fxquant  # noqa: E402
from fxquant.check import layerwise  # noqa: E402
from fxquant.meta import KEY, info  # noqa: E402
from fxquant.nn import FakeQuantize, LinearAct  # noqa: E402


class _Conv1DBlock(nn.Module):
    """GPT-2's Conv1D as HFTracer records it: torch.addmm(bias, x, weight) on the block's own (in, out) weight;
    shapes as HF 4.x computes them: x.size()[:-1] + (out,), a buffer sliced to the sequence length."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight, self.bias = nn.Parameter(torch.randn(8, 6, generator=g)), nn.Parameter(torch.randn(6, generator=g))
        self.register_buffer("table", torch.randn(1, 20, 6, generator=g))

    def forward(self, x):
        shape = x.size()[:-1] + (6,)
        y = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(shape)
        return y  # + self.table[:, :x.size(1)], which plain fx cannot trace: see _plus_table


def _plus_table(gm: fx.GraphModule, table: torch.Tensor) -> fx.GraphModule:
    """`+ self.table[:, :x.size(1)]` at the output, as HFTracer records it: a slice whose bound is a size node."""
    x, output = next(n for n in gm.graph.nodes if n.op == "placeholder"), next(n for n in gm.graph.nodes if n.op == "output")
    g = gm.graph
    gm.register_buffer("table", table)
    with g.inserting_before(output):
        length = g.call_method("size", (x, 1))
        table = g.call_function(__import__("operator").getitem, (g.get_attr("table"), (slice(None), slice(None, length))))
        total = g.call_function(__import__("operator").add, (output.args[0], table))
    output.args = (total,)
    gm.recompile()
    return gm


def test_addmm_lifts_to_a_linear_and_shape_arithmetic_exports(tmp_path):
    model, x = _Conv1DBlock().eval(), torch.randn(2, 5, 8)
    gm = _plus_table(fx.symbolic_trace(model), model.table)
    expected = model(x) + model.table[:, :5]
    qmodel = fxquant.quantize(gm, x, calib_data=[x, 2 * x], progress=False)
    linears = [m for m in qmodel.modules() if isinstance(m, LinearAct)]
    assert len(linears) == 1 and linears[0].weight_fq is not None and tuple(linears[0].weight.shape) == (6, 8)
    with torch.no_grad():
        fxquant.set_fake_quant(qmodel, enabled=False)
        assert torch.allclose(qmodel(x), expected, atol=1e-5)
    int8 = fxquant.convert(qmodel)
    fxquant.export_onnx(int8, tmp_path / "m.onnx")  # dynamic batch: x.size()[:-1] is a Slice of the runtime shape
    x3 = torch.randn(3, 5, 8)
    for inputs in (x, x3):
        found = layerwise(int8, tmp_path / "m.onnx", (inputs,))
        assert found.max_steps <= 1 and found.outputs[0].shape == (inputs.shape[0], 5, 6)


class _MaskedScores(nn.Module):
    """HF 4.x BERT's attention, mask made in the graph: softmax(q k^T / sqrt(d) + (1 - m) * finfo.min) v."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.scale = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), 0.5

    def forward(self, x, mask):
        additive = (1.0 - mask[:, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
        scores = torch.matmul(self.q(x), self.k(x).transpose(-1, -2)) / 2.0 + additive
        return torch.matmul(torch.softmax(scores, dim=-1), self.v(x)) * self.scale  # * 0.5: an ordinary mul


def test_mask_arithmetic_stays_float_and_other_muls_quantize():
    x, mask = torch.randn(2, 5, 8), torch.ones(2, 5)
    mask[1, 3:] = 0
    qmodel = fxquant.quantize(_MaskedScores().eval(), (x, mask), calib_data=[(x, mask)], progress=False)
    modules = dict(qmodel.named_modules())
    rules = {n.name: (info(n).rule, n) for n in qmodel.graph.nodes if KEY in n.meta and n.target in (torch.mul, __import__("operator").mul)}
    by_rule = {r: n for r, n in rules.values()}
    assert set(by_rule) == {"mask_arithmetic", "mul"}  # the sentinel one float, the * 0.5 quantized (QLinearMul)
    assert not any(isinstance(modules.get(u.target), FakeQuantize) for u in by_rule["mask_arithmetic"].users)
    assert any(isinstance(modules.get(u.target), FakeQuantize) for u in by_rule["mul"].users)
