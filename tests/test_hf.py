"""Hugging Face transformers 5.x models, small and random-initialised: quantize(model) with no wrapper.

Each architecture: the stand-in computes the model's own output (fake-quant off), every Linear and both
attention matmuls of every layer are quantized, the mask and position ids stay float by rule, and the
exported file agrees with the reference int8 graph within one step per layer (this CPU).
"""

import math

import pytest
import torch
from torch import fx, nn

import fxquant
from fxquant.errors import FxQuantError
from fxquant.hf import AdditiveMask, PositionIds
from fxquant.meta import KEY, info
from fxquant.nn import EmbeddingQ, FakeQuantize, LinearAct

transformers = pytest.importorskip("transformers")
SEQ = 12


def _text_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, 8:] = 0  # the second sentence is padded
    return {"input_ids": ids, "attention_mask": mask}


def _models():
    T = transformers
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return {
        "bert": (T.BertModel, T.BertConfig(vocab_size=100, max_position_embeddings=64, **small), "text"),
        "roberta": (T.RobertaModel, T.RobertaConfig(vocab_size=100, max_position_embeddings=64, **small), "text"),
        "distilbert": (T.DistilBertModel, T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                             max_position_embeddings=64), "text"),
        "gpt2": (T.GPT2Model, T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64), "text"),
        "vit": (T.ViTModel, T.ViTConfig(image_size=32, patch_size=8, num_channels=3, **small), "image"),
    }


def _build(name):
    cls, config, kind = _models()[name]
    torch.manual_seed(0)
    model = cls(config).eval()
    if kind == "image":
        return model, {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
    return model, _text_inputs()


def _linears(model) -> int:
    from transformers.pytorch_utils import Conv1D

    return sum(isinstance(m, (nn.Linear, Conv1D)) for m in model.modules())


@pytest.mark.parametrize("name", ["bert", "roberta", "distilbert", "gpt2", "vit"])
def test_hf_model_quantizes_without_a_wrapper(name, tmp_path):
    model, inputs = _build(name)
    qmodel = fxquant.quantize(model, inputs, calib_data=[inputs], progress=False)
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
        fxquant.set_fake_quant(qmodel, enabled=False)
        assert torch.allclose(qmodel(**inputs)[0], expected, atol=1e-5), "the stand-ins compute another function"
        fxquant.set_fake_quant(qmodel, enabled=True)
    modules = dict(qmodel.named_modules())
    quantized_linears = [n for n in qmodel.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], LinearAct)
                         and modules[n.target].weight_fq is not None]
    assert len(quantized_linears) == _linears(model)  # every Linear (GPT-2's Conv1D included)
    matmuls = [n for n in qmodel.graph.nodes if n.target is torch.matmul]
    assert len(matmuls) == 2 * model.config.num_hidden_layers
    assert all(info(m).rule is not None and set(info(m).inputs) == {0, 1} for m in matmuls)  # q @ k^T and attn @ v
    floats = [n for n in qmodel.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], (AdditiveMask, PositionIds))]
    assert all(not isinstance(modules.get(u.target), FakeQuantize) for n in floats for u in n.users)  # never quantized
    if name != "vit":
        assert floats and any(isinstance(m, EmbeddingQ) for m in modules.values())  # the tables are int8
    int8 = fxquant.convert(qmodel)
    path = tmp_path / f"{name}.onnx"
    fxquant.export_onnx(int8, path)
    from fxquant.check import layerwise

    found = layerwise(int8, path, tuple(inputs.values()))
    assert found.max_steps <= 1, f"{name}: '{found.worst}' is {found.max_steps} steps from the reference"
    with torch.no_grad():
        ref = int8(**inputs)[0].numpy()
    assert abs(found.outputs[0] - ref).max() <= 1e-3 * max(1.0, abs(ref).max())


def test_tuple_inputs_fix_the_rest_at_their_defaults():
    model, inputs = _build("bert")
    qmodel = fxquant.quantize(model, (inputs["input_ids"], inputs["attention_mask"]), calib_data=[inputs], progress=False)
    assert [n.target for n in qmodel.graph.nodes if n.op == "placeholder"] == ["input_ids", "attention_mask"]
    with pytest.raises(FxQuantError, match="not inputs of"):
        fxquant.quantize(model, {"input_ids": inputs["input_ids"], "pixels": inputs["input_ids"]})


class _ScoresAttention(nn.Module):
    """An attention whose forward torch.fx cannot trace: `(*shape[:-1], h, -1)` iterates a Proxy."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = (t.view(*x.shape[:-1], self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return self.out((attn @ v).transpose(1, 2).flatten(2))


class _TracedScores(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.heads, self.qkv, self.out = m.heads, m.qkv, m.out

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)  # unpacked (fx reads the count), not iterated
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(8), dim=-1)  # the / sqrt(d) row
        return self.out(torch.matmul(attn, v).transpose(1, 2).flatten(2))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.fc = _ScoresAttention(), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.attn(x))


def test_register_stand_in_for_a_users_attention():
    x = torch.randn(2, 5, 16)
    plain = fxquant.quantize(_Block().eval(), x, calib_data=[x], progress=False)
    assert info(next(n for n in plain.graph.nodes if n.target == "attn")).leaf  # kept whole, reported by name
    assert "attn" in str(fxquant.report(plain))
    fxquant.register_stand_in(_ScoresAttention, _TracedScores)
    try:
        qmodel = fxquant.quantize(_Block().eval(), x, calib_data=[x], progress=False)
    finally:
        fxquant.register_stand_in(_ScoresAttention, None)
    rules = {info(n).rule for n in qmodel.graph.nodes if KEY in n.meta}
    assert {"attention_scores_div", "matmul"} <= rules
    assert sum(isinstance(m, LinearAct) and m.weight_fq is not None for m in qmodel.modules()) == 3
    with pytest.raises(FxQuantError, match="nn.Module subclass"):
        fxquant.register_stand_in("attn", _TracedScores)


class _KeepWhole(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, _ScoresAttention) or super().is_leaf_module(m, qualname)


def test_a_graph_module_is_taken_as_it_is():
    model = _Block().eval()
    gm = fx.GraphModule(model, _KeepWhole().trace(model))
    x = torch.randn(2, 5, 16)
    qmodel = fxquant.quantize(gm, x, calib_data=[x], progress=False)
    kept = [n for n in qmodel.graph.nodes if n.op == "call_module" and n.target == "attn"]
    assert kept, "fxquant traced the GraphModule again (into the module its tracer kept whole)"


class _MaskOutsideAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, mask):
        return self.fc(x + (1.0 - mask) * -1e9)  # a sentinel reaches a quantized add


def test_sentinel_dominated_activation_raises():
    x, mask = torch.randn(2, 8), torch.ones(2, 8)
    mask[1, 4:] = 0
    with pytest.raises(FxQuantError, match=r"sentinel.*exclude="):
        fxquant.quantize(_MaskOutsideAttention(), (x, mask), calib_data=[(x, mask)], progress=False)


class _Loud(nn.Module):
    """A conv-relu whose outputs reach millions (a deep random-init ResNet's do): large, but no sentinel."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight.mul_(1e6)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_a_large_range_without_a_sentinel_quantizes():
    x = torch.randn(2, 3, 8, 8)
    qmodel = fxquant.quantize(_Loud().eval(), x, calib_data=[x], progress=False)  # no FxQuantError
    highs = [float(m.observer.max_val.max()) for m in fxquant.nn.fake_quants(qmodel) if not m.of_weight]
    assert max(highs) >= 1e6  # the range really reaches a million
    assert torch.isfinite(fxquant.convert(qmodel)(x)).all()


def test_nothing_quantized_says_so():
    with pytest.raises(fxquant.FxQuantError, match="nothing to quantize"):
        fxquant.quantize(nn.Sequential(nn.LayerNorm(4)), torch.randn(2, 4), progress=False)


def test_smooth_keeps_the_function_and_needs_data():
    model, inputs = _build("bert")
    qmodel = fxquant.quantize(model, inputs, calib_data=[inputs], progress=False, smooth=0.5)
    scales = [m for m in qmodel.modules() if type(m).__name__ == "ChannelScale"]
    assert len(scales) == model.config.num_hidden_layers  # one per FFN output layer
    with torch.no_grad():
        fxquant.set_fake_quant(qmodel, enabled=False)
        assert torch.allclose(qmodel(**inputs)[0], model(**inputs).last_hidden_state, atol=1e-5)
    with pytest.raises(FxQuantError, match="smooth=0.5.*calib_data"):
        fxquant.quantize(model, inputs, smooth=0.5)


def test_block_output_projections_feed_the_float_residual_stream():
    model, inputs = _build("bert")
    qmodel = fxquant.quantize(model, inputs, calib_data=[inputs], progress=False)
    rules = {n.target: info(n).rule for n in qmodel.graph.nodes if n.op == "call_module" and KEY in n.meta}
    for i in range(model.config.num_hidden_layers):
        for name in (f"encoder.layer.{i}.attention.output.dense", f"encoder.layer.{i}.output.dense"):
            assert rules[name] == "linear_to_residual"
        assert rules[f"encoder.layer.{i}.attention.self.query"] == "linear"  # read by a matmul: output quantized
        assert rules[f"encoder.layer.{i}.intermediate.dense"] == "linear_to_float"  # read by the GELU only
    modules = dict(qmodel.named_modules())
    for n in qmodel.graph.nodes:
        if n.op == "call_module" and rules.get(n.target) in ("linear_to_residual", "linear_to_float"):
            assert not any(isinstance(modules.get(u.target), FakeQuantize) for u in n.users)


def test_ffn_input_layer_and_gelu_fuse_in_onnx_runtime(tmp_path):
    """The FFN's first Linear keeps its output float (linear_to_float): ONNX Runtime runs it as MatMulIntegerToFloat
    and fuses its bias Add with the GELU into BiasGelu, with no Q/DQ pair between them; the file matches."""
    import onnx
    import onnxruntime as ort

    from fxquant.check import layerwise

    model, inputs = _build("bert")
    int8 = fxquant.convert(fxquant.quantize(model, inputs, calib_data=[inputs], progress=False))
    path, optimized = tmp_path / "bert.onnx", tmp_path / "optimized.onnx"
    fxquant.export_onnx(int8, path, opset=20)  # opset 20: one Gelu op
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(optimized).graph
    producer = {o: n for n in graph.node for o in n.output}
    gelus = [n for n in graph.node if n.op_type in ("Gelu", "BiasGelu")]
    assert [n.op_type for n in gelus] == ["BiasGelu"] * model.config.num_hidden_layers
    assert all(producer[n.input[0]].op_type == "MatMulIntegerToFloat" for n in gelus)
    found = layerwise(int8, path, tuple(inputs.values()))
    assert found.max_steps <= 1, f"'{found.worst}' is {found.max_steps} steps from the reference"
