"""Tracing that explains itself: leaves kept whole (and why), concrete_args, the report, attention
stand-ins, leaves and batch-dependent sizes in the ONNX file, external data."""

from __future__ import annotations

import inspect
import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant import FxQuantError
from fxquant.check import agreement, ort_session, output_scale, run_onnx
from fxquant.nn import FakeQuantize
from fxquant.passes import trace_model

from conftest import RootBranch


def _line_of(fn, text: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace the `if`."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 1), Gate())
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def _images(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ptq(model, x, batches=3, **kwargs):
    calib = [_images(*x.shape, seed=10 + i) for i in range(batches)]
    return fxquant.quantize(model.eval(), x, calib_data=calib, progress=False, **kwargs)


# ------------------------------------------------------------------ leaves kept whole, and why


def test_untraceable_submodule_becomes_a_reported_float_leaf():
    model, x = GatedNet().eval(), _images(2, 3, 8, 8)
    qmodel = _ptq(model, x)
    (leaf,) = fxquant.report(qmodel).leaves
    assert leaf.name == "body_1" and leaf.op == "Gate" and leaf.rule is None
    assert f"{__file__}:{_line_of(Gate.forward, 'if x.sum()')}" in leaf.leaf and "`if x.sum() > 0:`" in leaf.leaf
    assert "TraceError" in leaf.leaf
    targets = [n.target for n in qmodel.graph.nodes if n.op == "call_module"]
    assert "body.1" in targets and not any(t.startswith("body.1.") for t in targets)
    assert not any(isinstance(m, FakeQuantize) for m in qmodel.get_submodule("body.1").modules())
    fxquant.set_fake_quant(qmodel, enabled=False)  # the float graph around the leaf: both branches still live
    with torch.no_grad():
        for sign in (1, -1):
            xs = sign * x.abs()
            assert torch.allclose(qmodel(xs), model(xs), atol=1e-6)


def test_report_text_names_the_leaf_and_its_line():
    text = str(fxquant.report(_ptq(GatedNet(), _images(2, 3, 8, 8))))
    assert text.splitlines()[0].startswith("4 ops: 3 quantized")
    assert "leaves (kept whole by trace, run in float):" in text and "`if x.sum() > 0:`" in text


def test_without_auto_leaf_trace_model_raises_naming_module_and_line():
    with pytest.raises(FxQuantError, match=r"module 'body\.1' \(Gate\) at .*`if x\.sum\(\) > 0:`.*exclude=\['body\.1'\]"):
        trace_model(GatedNet(), example_inputs=(_images(1, 3, 8, 8),))


def test_control_flow_in_the_root_forward_is_a_clear_error():
    with pytest.raises(FxQuantError, match=r"the model's own forward at .*`if y\.mean\(\) > 0:`.*concrete_args="):
        fxquant.quantize(RootBranch(), _images(1, 3, 4, 4), progress=False)


def test_export_refuses_a_leaf_that_reads_tensor_values(tmp_path):
    x = _images(2, 3, 8, 8)
    with pytest.raises(FxQuantError, match=r"node 'body_1' .*fails on shapes alone.*branches on tensor values.*torch\.where"):
        fxquant.export_onnx(_ptq(GatedNet(), x), tmp_path / "gated.onnx", x)
    assert os.listdir(tmp_path) == []


class Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x, use_relu=True):
        y = self.conv(x)
        if use_relu:
            return F.relu(y)
        return y - 1


def test_concrete_args_fix_a_python_flag():
    model, x = Flagged().eval(), _images(2, 3, 4, 4)
    qmodel = fxquant.quantize(model, x, concrete_args={"use_relu": False}, progress=False)
    assert [n.op for n in qmodel.graph.nodes].count("placeholder") == 1
    assert not any(n.target in (F.relu, "relu") for n in qmodel.graph.nodes)
    fxquant.set_fake_quant(qmodel, observe=False, enabled=False)
    with torch.no_grad():
        assert torch.equal(qmodel(x), model(x, use_relu=False))
        assert not torch.allclose(qmodel(x), model(x))  # the default (relu) branch is not what was traced


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(x))


class BlockNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Block()
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.head(F.relu(self.block(self.stem(x))))


def _ort_vs_reference(qmodel, path, x_export, x_test):
    int8 = fxquant.convert(qmodel)
    fxquant.export_onnx(int8, path, x_export)
    with torch.no_grad():
        ref = int8(x_test).numpy()
    return agreement(ref, run_onnx(ort_session(path), x_test), output_scale(int8))


def test_user_leaf_module_stays_float_and_exports_through_torch_onnx(tmp_path):
    x = _images(2, 3, 8, 8)
    qmodel = _ptq(BlockNet(), x, leaf_modules=[Block])
    (leaf,) = fxquant.report(qmodel).leaves
    assert (leaf.name, leaf.op) == ("block", "Block") and "leaf_modules" in leaf.leaf
    assert not any(isinstance(m, FakeQuantize) for m in qmodel.block.modules())
    got = _ort_vs_reference(qmodel, tmp_path / "leaf.onnx", x, _images(5, 3, 8, 8, seed=3))  # batch 5: dynamic
    assert got.max_steps <= 1 + 1e-4 and got.within_one_step >= 0.999, got
    assert any(n.name.startswith("block/") for n in onnx.load(tmp_path / "leaf.onnx").graph.node)


class Mixed(nn.Module):
    """conv (quantized), LayerNorm (float by rule), cumsum (no row: float)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        y = self.norm(self.conv(x).permute(0, 2, 3, 1))
        return torch.cumsum(y, 1)


def test_report_sorts_ops_into_quantized_float_by_rule_and_no_rule():
    qmodel = _ptq(Mixed(), _images(2, 3, 4, 4))
    rep = fxquant.report(qmodel)
    assert [o.name for o in rep.quantized] == ["conv"]
    assert [(o.name, o.rule) for o in rep.float_by_rule] == [("norm", "layer_norm")]
    assert [o.name for o in rep.no_rule] == ["cumsum"]
    assert [o.name for o in rep.shared] == ["permute"] and rep.leaves == ()
    fq_inputs = {n.args[0].name for n in qmodel.graph.nodes if n.op == "call_module" and isinstance(qmodel.get_submodule(n.target), FakeQuantize)}
    assert "cumsum" not in fq_inputs and "norm" not in fq_inputs  # nothing after them asked for a grid
    lowered = fxquant.report(fxquant.convert(qmodel))  # the int8 graph: the same ops, conv now F.conv2d
    assert [(o.name, o.kind) for o in lowered.ops] == [(o.name, o.kind) for o in rep.ops]


class ScaledByParameter(nn.Module):
    """Swin V2's logit scale in small: math on a parameter alone, then applied to an activation."""

    def __init__(self):
        super().__init__()
        self.conv, self.logit_scale = nn.Conv2d(3, 4, 1), nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return torch.cumsum(self.conv(x), 1) * torch.clamp(self.logit_scale, max=3.0).exp()


def test_math_on_parameters_alone_is_no_op_of_the_report():
    rep = fxquant.report(_ptq(ScaledByParameter(), _images(2, 3, 4, 4)))
    assert [o.name for o in rep.ops] == ["conv", "cumsum", "mul"]  # clamp and exp compute a constant
    assert [o.name for o in rep.no_rule] == ["cumsum"]


def test_report_rejects_a_plain_module():
    with pytest.raises(FxQuantError, match="report: expected a GraphModule"):
        fxquant.report(Mixed())


# ------------------------------------------------------------------ nn.MultiheadAttention stand-in


class Attention(nn.Module):
    def __init__(self, batch_first=True, masked=False):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.batch_first, self.masked = batch_first, masked
        self.register_buffer("mask", torch.triu(torch.ones(5, 5, dtype=torch.bool), 1))

    def forward(self, x):  # x: (N, L, 8)
        h = self.proj(x)
        h = h if self.batch_first else h.transpose(0, 1)
        out, _ = self.attn(h, h, h, need_weights=False, attn_mask=self.mask if self.masked else None)
        out = out if self.batch_first else out.transpose(0, 1)
        return out + h if self.batch_first else out + h.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_stand_in_computes_what_torch_does(batch_first):
    model, x = Attention(batch_first).eval(), _images(3, 5, 8)
    gm = trace_model(model, example_inputs=(x,))
    assert not any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.MultiheadAttention) for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)  # decomposed ops vs torch's fused kernel
    assert model.attn.in_proj_weight is not None  # the user's module is untouched


def test_attention_linears_and_matmuls_are_quantized():
    qmodel = _ptq(Attention(), _images(3, 5, 8))
    rep = fxquant.report(qmodel)
    quantized = {o.name for o in rep.quantized}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert f"attn_{proj}" in quantized
    assert {"matmul", "softmax", "matmul_1"} <= quantized and rep.leaves == () and rep.float_by_rule == ()
    rules = {n.name: n.meta["fxquant"].rule for n in qmodel.graph.nodes if "fxquant" in n.meta}
    # q k^T -> softmax is one row: the scores stay float inside it (ONNX Runtime's QLinearSoftmax is not ONNX's)
    assert rules["matmul"] == rules["softmax"] == "attention_scores" and rules["matmul_1"] == "matmul"


def test_masked_attention_decomposes_and_matches_torch(tmp_path):
    """A bool attn_mask (True: not attended) becomes -inf, as torch reads it (a float mask, added as it is, is the
    encoder tests' causal mask); it goes through the AttentionMask float helper and adds to the float scores
    inside the attention row."""
    model, x = Attention(masked=True).eval(), _images(3, 5, 8)
    gm = trace_model(model, example_inputs=(x,))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    qmodel = _ptq(model, x)
    rep = fxquant.report(qmodel)
    assert rep.leaves == () and {"attn_q_proj", "attn_k_proj", "attn_v_proj", "attn_out_proj", "matmul", "matmul_1"} <= {
        o.name for o in rep.quantized}
    rules = {n.name: n.meta["fxquant"].rule for n in qmodel.graph.nodes if "fxquant" in n.meta}
    assert rules["matmul"] == rules["add"] == rules["softmax"] == "attention_scores_bias"
    got = _ort_vs_reference(qmodel, tmp_path / "masked.onnx", x, _images(6, 5, 8, seed=4))
    assert got.max_steps <= 1 + 1e-4 and got.top1 == 1.0, got


def test_attention_onnx_matches_the_reference_at_another_batch(tmp_path):
    x = _images(2, 5, 8)
    got = _ort_vs_reference(_ptq(Attention(), x), tmp_path / "attn.onnx", x, _images(6, 5, 8, seed=4))
    assert got.max_steps <= 1 + 1e-4 and got.within_one_step >= 0.999 and got.top1 == 1.0, got


@pytest.mark.parametrize("options", [{"batch_first": True}, {"batch_first": False}, {"batch_first": True, "norm_first": True},
                                     {"batch_first": True, "activation": "gelu"}, {"batch_first": True, "activation": nn.GELU()}],
                         ids=["post_norm", "sequence_first", "pre_norm", "gelu", "gelu_module"])
def test_transformer_encoder_layer_stand_in_computes_what_torch_does(options):
    layer, x = nn.TransformerEncoderLayer(16, 4, 32, **options).eval(), _images(3, 5, 16)
    gm = trace_model(layer, example_inputs=(x,))
    linears = [n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)]
    assert linears == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "linear1", "linear2"]
    with torch.no_grad():  # torch runs its fused fast path here where it can (batch_first): the stand-in against it
        torch.testing.assert_close(gm(x), layer(x), rtol=1e-5, atol=1e-5)


class Encoder(nn.Module):
    def __init__(self, masked=False):
        super().__init__()
        self.embed, self.head, self.masked = nn.Linear(8, 16), nn.Linear(16, 3), masked
        layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=False)

    def forward(self, x, padding=None):  # (N, L, 8), (N, L) bool: True past each sequence's end
        if not self.masked:
            return self.head(self.encoder(self.embed(x)).mean(1))
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])  # float, -inf above the diagonal
        return self.head(self.encoder(self.embed(x), mask=causal, src_key_padding_mask=padding, is_causal=True))


def _padded(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 6, (n,), generator=g)
    return torch.randn(n, 5, 8, generator=g), torch.arange(5)[None, :] >= lengths[:, None]


def test_transformer_encoder_quantizes_every_linear_and_matches_onnx_runtime(tmp_path):
    x = _images(2, 5, 8)
    qmodel = _ptq(Encoder(), x)
    rep = fxquant.report(qmodel)
    quantized = {o.name for o in rep.quantized}
    for i in (0, 1):
        for proj in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "linear1", "linear2"):
            assert f"encoder_layers_{i}_{proj}" in quantized
    assert rep.leaves == ()
    got = _ort_vs_reference(qmodel, tmp_path / "encoder.onnx", x, _images(4, 5, 8, seed=4))
    assert got.max_steps <= 1 + 1e-4 and got.top1 == 1.0, got


def test_causal_and_padding_masked_encoder_decomposes_and_matches_onnx_runtime(tmp_path):
    from fxquant.check import layerwise

    model, x = Encoder(masked=True).eval(), _padded(3, 0)
    qmodel = fxquant.quantize(model, x, calib_data=[_padded(4, 1), _padded(4, 2)], progress=False)
    assert fxquant.report(qmodel).leaves == ()
    fxquant.set_fake_quant(qmodel, enabled=False)
    with torch.no_grad():  # the decomposed float graph against torch's own masked encoder, every position
        torch.testing.assert_close(qmodel(*x), model(*x), rtol=1e-5, atol=1e-5)
        unpadded = model(x[0], torch.zeros_like(x[1]))
        assert (unpadded - model(*x)).abs().max() > 1e-3  # the padding mask changes what is compared
    fxquant.set_fake_quant(qmodel, enabled=True)
    int8 = fxquant.convert(qmodel)
    path = tmp_path / "masked_encoder.onnx"
    fxquant.export_onnx(int8, path, x)
    assert layerwise(int8, path, _padded(6, 3)).max_steps <= 1


class Decoder(nn.Module):
    def __init__(self, norm_first: bool):
        super().__init__()
        self.embed, self.head = nn.Linear(8, 16), nn.Linear(16, 3)
        layer = nn.TransformerDecoderLayer(16, 4, 32, batch_first=True, norm_first=norm_first)
        self.decoder = nn.TransformerDecoder(layer, 2)

    def forward(self, x, memory, memory_padding):  # (N, L, 8), (N, S, 16), (N, S) bool
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.decoder(self.embed(x), memory, tgt_mask=causal, tgt_is_causal=True,
                                      memory_key_padding_mask=memory_padding))


def _decoder_inputs(n: int, seed: int):
    x, padding = _padded(n, seed)
    return x, torch.randn(n, 5, 16, generator=torch.Generator().manual_seed(seed + 50)), padding


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_transformer_decoder_quantizes_both_attentions_and_matches_onnx_runtime(norm_first, tmp_path):
    """torch.fx keeps an nn.TransformerDecoder whole (a torch.nn module): nothing in it was quantized."""
    from fxquant.check import layerwise

    model, x = Decoder(norm_first).eval(), _decoder_inputs(3, 0)
    qmodel = fxquant.quantize(model, x, calib_data=[_decoder_inputs(4, 1), _decoder_inputs(4, 2)], progress=False)
    quantized = {o.name for o in fxquant.report(qmodel).quantized}
    for attention in ("self_attn", "multihead_attn"):
        assert {f"decoder_layers_1_{attention}_{p}_proj" for p in "qkv"} <= quantized
    assert {"decoder_layers_0_linear1", "decoder_layers_1_linear2"} <= quantized
    fxquant.set_fake_quant(qmodel, enabled=False)
    with torch.no_grad():
        torch.testing.assert_close(qmodel(*x), model(*x), rtol=1e-5, atol=1e-5)
    fxquant.set_fake_quant(qmodel, enabled=True)
    int8 = fxquant.convert(qmodel)
    fxquant.export_onnx(int8, tmp_path / "decoder.onnx", x)
    assert layerwise(int8, tmp_path / "decoder.onnx", _decoder_inputs(5, 3)).max_steps <= 1


class Sdpa(nn.Module):
    def __init__(self, causal=False, mask=None):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.causal, self.mask = causal, mask

    def forward(self, x):  # (N, L, 8) -> 2 heads of 4
        q, k, v = self.qkv(x).unflatten(-1, (2, 12)).transpose(1, 2).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal)


@pytest.mark.parametrize("kwargs", [{}, {"causal": True}, {"mask": _images(5, 5) > 0}, {"mask": _images(5, 5)}],
                         ids=["plain", "causal", "bool_mask", "additive_mask"])
def test_scaled_dot_product_attention_is_float_by_rule_and_exports(kwargs, tmp_path):
    model, x = Sdpa(**kwargs).eval(), _images(2, 5, 8)
    assert [(o.op, o.rule) for o in fxquant.report(_ptq(model, x)).float_by_rule] == [("scaled_dot_product_attention", "float_math")]
    fxquant.export_onnx(model, tmp_path / "sdpa.onnx", x)
    xt = _images(3, 5, 8, seed=9)
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(ort_session(tmp_path / "sdpa.onnx"), xt), model(xt).numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ wrapped functions, batch-dependent sizes


def pad_to_multiple(x, m: int):
    """Pads H and W up to a multiple of m: Python arithmetic on the shape, which fx cannot trace."""
    h, w = x.shape[-2:]
    if h % m or w % m:
        x = F.pad(x, (0, (m - w % m) % m, 0, (m - h % m) % m))
    return x


torch.fx.wrap("pad_to_multiple")


class Padded(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.head = nn.Conv2d(4, 2, 2, stride=2)

    def forward(self, x):
        return self.head(pad_to_multiple(F.relu(self.conv(x)), 4))


def test_wrapped_function_is_a_leaf_exported_whole(tmp_path):
    x = _images(2, 3, 13, 13)
    qmodel = _ptq(Padded(), x)
    (leaf,) = fxquant.report(qmodel).leaves
    assert leaf.op == "pad_to_multiple" and "torch.fx.wrap" in leaf.leaf
    got = _ort_vs_reference(qmodel, tmp_path / "padded.onnx", x, _images(5, 3, 13, 13, seed=5))
    assert got.max_steps <= 1 + 1e-4 and got.within_one_step >= 0.999, got


def times(x, n: int):
    return x * n


torch.fx.wrap("times")


class TimesBatch(nn.Module):
    def forward(self, x):
        return times(x, x.size(0))


def test_a_leaf_reading_a_batch_size_refuses_a_dynamic_batch(tmp_path):
    x = _images(2, 3)
    with pytest.raises(FxQuantError, match=r"leaf 'times' reads \['size'\], sizes that follow the batch.*dynamic_batch=False"):
        fxquant.export_onnx(TimesBatch(), tmp_path / "t.onnx", x)
    fxquant.export_onnx(TimesBatch(), tmp_path / "t.onnx", x, dynamic_batch=False)
    np.testing.assert_allclose(run_onnx(ort_session(tmp_path / "t.onnx"), x), (x * 2).numpy())


class ClassToken(nn.Module):
    """vit's pattern: sizes read from the input (x.shape[0], x.size(0)) feed expand, cat and view."""

    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, 6))
        self.proj = nn.Linear(6, 6)

    def forward(self, x):  # x: (N, 4, 6)
        n = x.shape[0]
        y = torch.cat([self.token.expand(n, -1, -1), self.proj(x)], dim=1)
        return y.view(x.size(0), -1)[:, 1::2]


def test_sizes_that_follow_the_batch_stay_dynamic_in_the_file(tmp_path):
    model = ClassToken().eval()
    fxquant.export_onnx(model, tmp_path / "tok.onnx", _images(1, 4, 6))
    session = ort_session(tmp_path / "tok.onnx")
    for batch in (1, 3, 7):
        x = _images(batch, 4, 6, seed=batch)
        with torch.no_grad():
            np.testing.assert_allclose(run_onnx(session, x), model(x).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size, out", [(1, 6), (9, 4), (5, 7)])
def test_uneven_adaptive_avgpool_exports_as_pooling_matrices(tmp_path, size, out):
    model, x = nn.AdaptiveAvgPool2d(out).eval(), _images(2, 3, size, size)
    fxquant.export_onnx(model, tmp_path / "pool.onnx", x)
    np.testing.assert_allclose(run_onnx(ort_session(tmp_path / "pool.onnx"), x), model(x).numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ external data, shape recording


def test_external_data_writes_two_files_that_onnxruntime_reads(tmp_path):
    x = _images(2, 3, 8, 8)
    int8 = fxquant.convert(_ptq(BlockNet(), x))
    fxquant.export_onnx(int8, tmp_path / "inline.onnx", x)
    fxquant.export_onnx(int8, tmp_path / "split.onnx", x, external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["inline.onnx", "split.onnx", "split.onnx.data"]
    inits = onnx.load(tmp_path / "split.onnx", load_external_data=False).graph.initializer
    assert inits and all(t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data for t in inits)
    xt = _images(4, 3, 8, 8, seed=7)
    np.testing.assert_array_equal(run_onnx(ort_session(tmp_path / "split.onnx"), xt), run_onnx(ort_session(tmp_path / "inline.onnx"), xt))


def test_external_data_switches_on_past_protobufs_limit(tmp_path, monkeypatch):
    import fxquant.onnx.save as onnx_save

    x = _images(2, 3, 8, 8)
    monkeypatch.setattr(onnx_save, "PROTOBUF_LIMIT", 64 * 2**20 + 10)  # as if this model were 2 GB
    fxquant.export_onnx(BlockNet().eval(), tmp_path / "big.onnx", x)
    assert os.path.exists(tmp_path / "big.onnx.data")
    monkeypatch.undo()
    fxquant.export_onnx(BlockNet().eval(), tmp_path / "small.onnx", x)
    assert not os.path.exists(tmp_path / "small.onnx.data")


class DeviceSpy(nn.Module):
    """Records the device of every input it sees."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.device.type)
        return x + 1


@pytest.mark.parametrize("side, device", [(8, "cpu"), (256, "meta")])
def test_shapes_are_recorded_on_meta_for_big_tensors(side, device):
    spy = DeviceSpy()
    gm = trace_model(nn.Sequential(nn.Identity(), spy), example_inputs=(torch.zeros(1, 3, side, side),), leaf_modules=[DeviceSpy])
    assert spy.seen == [device]  # small: a real call; big: shapes only, no arithmetic
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "1")
    assert node.meta["fxquant"].shape == (1, 3, side, side)
