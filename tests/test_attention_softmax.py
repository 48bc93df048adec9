"""Attention scores on onnxruntime: softmax(q @ k^T [* s] [+ bias]) keeps its logits float, so ONNX Runtime
runs the q @ k^T matmul as an integer kernel with a float output and a float Softmax, instead of fusing
DQ -> Softmax -> Q into QLinearSoftmax (whose probabilities land one step low on ~1% of the elements)."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
from torch import nn

import fxquant
from fxquant.backends import Backend, load_backend
from fxquant.check import ort_session
from fxquant.onnx.check import check_onnx

from conftest import assert_file_matches_int8

ATTENTION_ROWS = ("attention_scores", "attention_scores_bias", "attention_scores_scaled", "attention_scores_scaled_bias")
TOKENS, DIM = 10, 16


class Attention(nn.Module):
    """One head: out(softmax(q @ k^T [* 0.25] [+ bias]) @ v); `softmax=False`: out((q @ k^T) @ v)."""

    def __init__(self, scaled=False, bias=False, softmax=True):
        super().__init__()
        self.scaled, self.softmax = scaled, softmax
        self.q, self.k, self.v, self.out = (nn.Linear(DIM, DIM) for _ in range(4))
        self.bias = nn.Parameter(torch.randn(TOKENS, TOKENS)) if bias else None

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        scores = q @ k.transpose(-2, -1)
        if self.scaled:
            scores = scores * 0.25
        if self.bias is not None:
            scores = scores + self.bias
        if self.softmax:
            scores = scores.softmax(dim=-1)
        return self.out(scores @ v)


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, TOKENS, DIM, generator=g) for _ in range(n)]


def _export(model, path, backend="onnxruntime"):
    """(reference int8 graph, ONNX path, ORT's optimised graph) of `model`, calibrated on seeded data."""
    torch.manual_seed(0)
    model = model.eval()
    calib = _batches(6, seed=1)
    int8 = fxquant.convert(fxquant.quantize(model, calib[0], calib_data=calib, backend=backend, progress=False))
    fxquant.export_onnx(int8, path, calib[0], check=not isinstance(backend, Backend))
    ort_session(path, optimized_path=str(path) + ".opt.onnx")
    return int8, path, onnx.load(str(path) + ".opt.onnx").graph


def _scores_producer(graph) -> str:
    """The op type that computes the softmax's logits in ORT's graph (back through the scale Mul and bias Add)."""
    producer = {o: n for n in graph.node for o in n.output}
    node = producer[next(n for n in graph.node if n.op_type in ("Softmax", "QLinearSoftmax")).input[0]]
    while node.op_type in ("Mul", "Add"):  # the scale and the bias are initializers: no producer
        node = next(producer[i] for i in node.input if i in producer)
    return node.op_type


@pytest.mark.parametrize("scaled, bias, row", [(False, False, "attention_scores"), (False, True, "attention_scores_bias"),
                                               (True, False, "attention_scores_scaled"),
                                               (True, True, "attention_scores_scaled_bias")])
def test_attention_logits_stay_float_and_the_matmul_stays_integer(tmp_path, scaled, bias, row):
    int8, path, opt = _export(Attention(scaled, bias), tmp_path / "attn.onnx")
    rules = {n.name: n.meta["fxquant"].rule for n in int8.graph.nodes if "fxquant" in n.meta}
    assert rules["matmul"] == row and rules["matmul_1"] == "matmul"  # q @ k^T by the attention row, p @ v plain
    ops = Counter(n.op_type for n in opt.node)
    assert ops["QLinearSoftmax"] == 0 and ops["Softmax"] == 1
    assert _scores_producer(opt) == "MatMulIntegerToFloat"  # u8 q, k in; float logits out
    assert ops["QLinearMatMul"] == 1  # p @ v: quantized in and out
    assert check_onnx(path) == []

    assert_file_matches_int8(int8, path, _batches(1, seed=2)[0], f"attention ({row})")  # this CPU, AVX2, SSE4


def test_without_the_attention_rows_ort_fuses_qlinear_softmax(tmp_path):
    """The failure the rows avoid: the plain matmul row quantizes the logits, and ORT fuses DQ -> Softmax -> Q."""
    table = load_backend("onnxruntime")
    plain = Backend(table.name + "_no_attention", tuple(r for r in table.rules if r.name not in ATTENTION_ROWS),
                    table.activation, table.weight, table.bias, table.folded)
    _, _, opt = _export(Attention(), tmp_path / "attn.onnx", backend=plain)
    ops = Counter(n.op_type for n in opt.node)
    assert ops["QLinearSoftmax"] == 1 and ops["Softmax"] == 0 and ops["QLinearMatMul"] == 2


def test_a_matmul_not_followed_by_softmax_keeps_its_output_quantize(tmp_path):
    int8, path, opt = _export(Attention(softmax=False), tmp_path / "attn.onnx")
    rules = {n.name: n.meta["fxquant"].rule for n in int8.graph.nodes if "fxquant" in n.meta}
    assert rules["matmul"] == rules["matmul_1"] == "matmul"
    exported = onnx.load(str(path)).graph
    producer = {o: n for n in exported.node for o in n.output}
    qk = next(n for n in exported.node if n.name == "matmul")
    readers = [n.op_type for n in exported.node if qk.output[0] in n.input]
    assert readers == ["QuantizeLinear"] and producer[qk.input[0]].op_type == "DequantizeLinear"
    assert Counter(n.op_type for n in opt.node)["QLinearMatMul"] == 2
    assert check_onnx(path) == []


def _edited(path, edit):
    model = onnx.load(str(path))
    edit(model.graph)
    return model


def _drop_node(graph, node):
    """Remove a single-input-single-output Q or DQ, wiring its readers to its input."""
    for reader in graph.node:
        for i, name in enumerate(reader.input):
            if name == node.output[0]:
                reader.input[i] = node.input[0]
    graph.node.remove(node)


def test_checker_reads_the_attention_chain(tmp_path):
    """A dequantize missing before q @ k^T, or the quantize missing after the softmax, is named by the attention row."""
    _, path, _ = _export(Attention(bias=True), tmp_path / "attn.onnx")

    def drop_input_dq(graph):
        qk = next(n for n in graph.node if n.name == "matmul")
        _drop_node(graph, next(n for n in graph.node if n.output[0] == qk.input[0]))

    found = check_onnx(_edited(path, drop_input_dq))  # q also feeds nothing else: only the q @ k^T row is named
    assert [(v.node, v.rule) for v in found] == [("matmul", "attention_scores_bias")]
    assert "input 0 is not dequantized" in found[0].message

    def drop_softmax_q(graph):
        sm = next(n for n in graph.node if n.op_type == "Softmax")
        q = next(n for n in graph.node if sm.output[0] in n.input)
        dq = next(n for n in graph.node if q.output[0] in n.input)
        _drop_node(graph, dq)
        _drop_node(graph, q)

    found = check_onnx(_edited(path, drop_softmax_q))  # p @ v now reads a float p too
    assert [(v.node, v.rule) for v in found] == [("matmul", "attention_scores_bias"), ("matmul_1", "matmul")]
    assert "output is not quantized" in found[0].message and "input 0 is not dequantized" in found[1].message
