"""fxquant.onnx.check: verify an exported ONNX QDQ file against its backend's rule table, naming each node.

The file is read through the table's `onnx` column (the same rows that placed the Q/DQ): every
node whose op type a row names is checked the way that row's kind says.

    quantize      each input the row quantizes comes from a DequantizeLinear; the weight is an int8
                  initializer behind a DequantizeLinear with the weight spec's axis, zero point and
                  range; the bias is int32 with scale s_x * s_w (float where the backend has no BIAS);
                  output=True: one QuantizeLinear reads the output (through the FOLDED activations,
                  or after the row's onnx_chain: MatMul -> Softmax -> Q, the logits float inside the row);
                  output=False: no Q/DQ pair sits between the op and a FOLDED activation.
    share         DQ -> op -> Q with one scale and zero point on both sides (when the input is quantized)
    share_inputs  every input's DQ and the output's Q on one scale and zero point
    float         nothing to check: the op runs on whatever its neighbours give it

Every activation QuantizeLinear / DequantizeLinear carries the dtype, zero point and per-tensor scale
of the activation spec, and a DQ reads back the qparams of the Q it follows. Ops the user kept float
(exclude=) are listed in the file's metadata and skipped, and so are nodes that compute no activation:
a constant (a bias scale Mul(s_x, s_w)) or no floating-point tensor (the int64 Concat that builds a
Reshape's shape), typed by ONNX shape inference. An absent zero point is 0 of its type, as ONNX says.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from fxquant.backends import QUANTIZE, SHARE, SHARE_INPUTS, Backend, Rule, exposed_to_pair_sums, load_backend
from fxquant.errors import FxQuantError
from fxquant.onnx.metadata import BACKEND_KEY, FLOAT_NODES_KEY, REDUCE_RANGE_KEY, TARGET_KEY, read_metadata
from fxquant.specs import QuantSpec

Q, DQ = "QuantizeLinear", "DequantizeLinear"
STORAGE = {"uint8": ("uint8", "uint4"), "int8": ("int8", "int4"), "int32": ("int32",)}  # 4-bit: a narrowed spec (opset 21)


@dataclass(frozen=True)
class Violation:
    node: str  # the ONNX node name (fxquant names it after the FX node it came from)
    rule: str | None
    message: str

    def __str__(self):
        return f"node '{self.node}'" + (f" (rule {self.rule})" if self.rule else "") + f": {self.message}"


class _Graph:
    """Producers, consumers and constants of an ONNX graph, by value name."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes = list(model.graph.node)
        self.consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for n in self.nodes:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
            elif n.op_type == "Mul" and len(n.input) == 2 and all(i in self.consts for i in n.input):
                self.consts[n.output[0]] = self.consts[n.input[0]] * self.consts[n.input[1]]  # a bias scale s_x * s_w
        self.types = _elem_types(model)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in model.graph.output}

    def input_node(self, node, i: int, through=()):
        """The node producing input `i` of `node` (None for a graph input, constant or absent input)."""
        name = node.input[i] if i < len(node.input) else ""
        p = self.producer.get(name)
        while p is not None and p.op_type in through:
            p = self.producer.get(p.input[0])
        return p

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def computes_activation(self, node) -> bool:
        """False for a node that computes a constant (every input constant) or no floating-point tensor
        (int64 shape arithmetic: the Concat / Mul / Gather that build a Reshape's or Expand's shape)."""
        if all(self.is_const(i) for i in node.input if i):
            return False
        types = [self.types.get(v) for v in (*node.input, *node.output) if v]
        return None in types or any(t in FLOAT_TYPES for t in types)

    def qparams(self, qdq) -> tuple[np.ndarray, np.ndarray]:
        """(scale, zero point) of a Q or DQ node. An absent zero point is 0, as ONNX says: of the type
        of a DequantizeLinear's constant input, else uint8."""
        scale = self.consts.get(qdq.input[1], np.array(np.nan, np.float32))
        if len(qdq.input) > 2 and qdq.input[2]:
            return scale, self.consts.get(qdq.input[2], np.array(-1))
        x = self.consts.get(qdq.input[0]) if qdq.op_type == DQ else None
        return scale, np.zeros((), x.dtype if x is not None else np.uint8)


FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value ONNX shape inference can type (value_info, inputs, outputs, initializers)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a file shape inference rejects: types of the graph's declared values only
        inferred = model
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output) if v.type.HasField("tensor_type")}
    types.update({t.name: t.data_type for t in g.initializer})
    return {name: t for name, t in types.items() if t}  # 0: undefined


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)  # ONNX's default axis is 1


def _same(a, b) -> bool:
    return a[0].shape == b[0].shape and np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[1].dtype == b[1].dtype


def _fmt(qp) -> str:
    scale, zp = qp
    return f"scale {np.array2string(scale.ravel()[:3], precision=6)}, zero point {zp.ravel()[:3].tolist()} ({zp.dtype})"


# ------------------------------------------------------------------ Q/DQ format against a spec


def _spec_problems(g: _Graph, qdq, spec: QuantSpec, what: str, value=None) -> list[str]:
    scale, zp = g.qparams(qdq)
    if zp.dtype.name not in STORAGE[spec.dtype]:  # the wrong type: its values say nothing more
        return [f"{what} {qdq.op_type} '{qdq.name}' has a {zp.dtype} zero point; the spec stores {spec.dtype}"]
    zp, value = zp.astype(np.int64), None if value is None else value.astype(np.int64)
    found = []
    if spec.axis is None and scale.size != 1:
        found.append(f"{what} {qdq.op_type} '{qdq.name}' has {scale.size} scales; the spec is per-tensor")
    if spec.axis is not None and value is not None and value.ndim > 1:
        if _axis(qdq) != spec.axis:
            found.append(f"{what} {qdq.op_type} '{qdq.name}' has axis {_axis(qdq)}; the spec is per-channel on axis {spec.axis}")
        elif scale.size != value.shape[spec.axis]:
            found.append(f"{what} {qdq.op_type} '{qdq.name}' has {scale.size} scales for {value.shape[spec.axis]} channels")
    if spec.symmetric and np.any(zp != 0):
        found.append(f"{what} {qdq.op_type} '{qdq.name}' has zero point {zp.ravel()[:3].tolist()}; the spec is symmetric (zero point 0)")
    if np.any(zp < spec.qmin) or np.any(zp > spec.qmax):
        found.append(f"{what} {qdq.op_type} '{qdq.name}' has zero point outside [{spec.qmin}, {spec.qmax}]")
    if value is not None and value.size and (value.min() < spec.qmin or value.max() > spec.qmax):
        found.append(f"{what} values span [{value.min()}, {value.max()}], outside the spec's [{spec.qmin}, {spec.qmax}]")
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        found.append(f"{what} {qdq.op_type} '{qdq.name}' has a missing, non-finite or non-positive scale")
    return found


def _activation_problems(g: _Graph, node, specs) -> list[str]:
    """An activation Q/DQ: one of the table's activation specs; a DQ reads back its Q's qparams."""
    if node.op_type == DQ and g.is_const(node.input[0]):
        return []  # a weight or bias: checked by the op that reads it
    options = [_spec_problems(g, node, spec, "activation") for spec in specs]
    found = min(options, key=len)
    q = g.input_node(node, 0)
    if node.op_type == DQ and q is not None and q.op_type == Q and not _same(g.qparams(q), g.qparams(node)):
        found.append(f"DequantizeLinear reads {_fmt(g.qparams(node))}, its QuantizeLinear '{q.name}' wrote {_fmt(g.qparams(q))}")
    return found


# ------------------------------------------------------------------ per-kind checks of the op nodes


def _end_of_op(g: _Graph, backend: Backend, node):
    """The last node of the op: through a bias Add after a MatMul, then FOLDED activations."""
    end = node
    users = g.consumers[end.output[0]]
    if node.op_type == "MatMul" and len(users) == 1 and users[0].op_type == "Add" and _bias_input(g, users[0]) is not None:
        end = users[0]
    while len(g.consumers[end.output[0]]) == 1 and g.consumers[end.output[0]][0].op_type in backend.folded:
        end = g.consumers[end.output[0]][0]
    return end


def _bias_input(g: _Graph, add) -> str | None:
    """The input of a MatMul's Add that is a constant or the DQ of a constant (its bias), if any."""
    for name in add.input:
        p = g.producer.get(name)
        if g.is_const(name) or (p is not None and p.op_type == DQ and g.is_const(p.input[0])):
            return name
    return None


def _check_inputs(g: _Graph, rule: Rule, node) -> list[str]:
    found = []
    for i in rule.inputs:
        if i >= len(node.input) or not node.input[i] or g.is_const(node.input[i]):
            continue  # absent, or a float constant operand (x * 0.5): nothing to dequantize
        p = g.input_node(node, i)
        if p is None or p.op_type != DQ:
            found.append(f"input {i} is not dequantized: the row quantizes it, so a DequantizeLinear must feed it")
    return found


def _check_weight(g: _Graph, backend: Backend, node) -> list[str]:
    w_dq = g.input_node(node, 1, through=("Transpose",))
    if w_dq is None or w_dq.op_type != DQ or not g.is_const(w_dq.input[0]):
        return ["the weight is not an integer initializer behind a DequantizeLinear"]
    return _spec_problems(g, w_dq, backend.weight, "weight", g.consts[w_dq.input[0]])


CODE_SPAN = {np.dtype(np.uint8): 255, np.dtype(np.int8): 255}  # raw codes a kernel multiplies (4-bit: 15)


def _check_pair_sums(g: _Graph, backend: Backend, rule: Rule, node) -> list[str]:
    """A pair_sums row on a target with a narrow accumulator: 2 * (input code span) * max|w| must fit."""
    x_dq, w_dq = g.input_node(node, 0), g.input_node(node, 1, through=("Transpose",))
    if backend.target.pair_sum_max is None or x_dq is None or x_dq.op_type != DQ or w_dq is None or w_dq.op_type != DQ:
        return []
    w = g.consts.get(w_dq.input[0])
    if w is None or not w.size:
        return []
    groups = next((a.i for a in node.attribute if a.name == "group"), 1)
    grouping = (groups, w.shape[1] * groups, w.shape[0]) if node.op_type == "Conv" else (1, 1, 1)
    if not exposed_to_pair_sums(rule, *grouping):
        return []
    span = CODE_SPAN.get(g.qparams(x_dq)[1].dtype, 15)
    peak = int(np.abs(w.astype(np.int64)).max())
    limit = backend.target.max_weight_for_span(span)
    if peak <= limit:
        return []
    return [f"integer GEMM weights reach +-{peak}: two products of {span}-code activations sum to up to {2 * span * peak}, "
            f"past the {backend.target.pair_sum_max} of a 16-bit pair sum (vpmaddubsw on x86 CPUs without VNNI), which "
            f"saturates; target {backend.target.name!r} allows +-{limit}. Re-export with target='portable' (the default), "
            "or deploy only to VNNI or Arm CPUs (target='vnni'; ONNX Runtime's session option "
            "session.x64quantprecision=1 runs such a file exactly, slower, elsewhere)"]


def _bias_of(g: _Graph, node) -> str | None:
    """Input 2 of Conv/Gemm; for MatMul, the bias operand of the Add after it."""
    if node.op_type in ("Conv", "Gemm"):
        return node.input[2] if len(node.input) > 2 and node.input[2] else None
    users = g.consumers[node.output[0]]
    return _bias_input(g, users[0]) if len(users) == 1 and users[0].op_type == "Add" else None


def _check_bias(g: _Graph, backend: Backend, node) -> list[str]:
    name = _bias_of(g, node)
    if name is None:
        return []
    b_dq = g.producer.get(name)
    quantized = b_dq is not None and b_dq.op_type == DQ and g.is_const(b_dq.input[0])
    if backend.bias is None:
        return [f"the bias goes through DequantizeLinear '{b_dq.name}'; backend {backend.name!r} reads a float bias"] if quantized else []
    if not quantized:
        return [f"the bias is float; the backend reads it as {backend.bias.dtype} with scale s_x * s_w"]
    found = _spec_problems(g, b_dq, backend.bias, "bias", g.consts[b_dq.input[0]])
    x_dq, w_dq = g.input_node(node, 0), g.input_node(node, 1, through=("Transpose",))
    if x_dq is not None and x_dq.op_type == DQ and w_dq is not None and w_dq.op_type == DQ:
        expected = g.qparams(x_dq)[0] * g.qparams(w_dq)[0]
        if not np.allclose(g.qparams(b_dq)[0], expected, rtol=1e-5, atol=0):
            found.append(f"bias DequantizeLinear '{b_dq.name}' scale is not s_x * s_w (input scale times weight scale)")
    return found


def _chain(g: _Graph, rule: Rule, node) -> list | None:
    """The nodes after `node` that the row's onnx_chain names, each the one consumer of the node before
    it ([] for a row without a chain); None where the graph differs."""
    found = []
    for op_type in rule.onnx_chain:
        users = g.consumers[node.output[0]]
        if len(users) != 1 or users[0].op_type != op_type or node.output[0] in g.outputs:
            return None
        node = users[0]
        found.append(node)
    return found


def _check_output(g: _Graph, backend: Backend, rule: Rule, node) -> list[str]:
    end = (_chain(g, rule, node) or [node])[-1] if rule.onnx_chain else _end_of_op(g, backend, node)
    users = g.consumers[end.output[0]]
    if rule.output:
        if len(users) != 1 or users[0].op_type != Q or end.output[0] in g.outputs:
            seen = [u.op_type for u in users] + (["graph output"] if end.output[0] in g.outputs else [])
            return [f"the output is not quantized: one QuantizeLinear must read '{end.output[0]}', found {seen}"]
        return []
    found = []
    for q in (u for u in g.consumers[node.output[0]] if u.op_type == Q):
        for dq in (u for u in g.consumers[q.output[0]] if u.op_type == DQ):
            for act in (u for u in g.consumers[dq.output[0]] if u.op_type in backend.folded):
                found.append(f"Q/DQ '{q.name}' sits between the op and its {act.op_type} '{act.name}': it blocks the op+activation fusion")
    return found


def _check_quantize(g: _Graph, backend: Backend, rule: Rule, node) -> list[str]:
    found = _check_inputs(g, rule, node)
    if rule.weight:
        found += _check_weight(g, backend, node)
        found += _check_pair_sums(g, backend, rule, node)
        found += _check_bias(g, backend, node)
    return found + _check_output(g, backend, rule, node)


def _check_share(g: _Graph, backend: Backend, rule: Rule, node) -> list[str]:
    dq = g.input_node(node, 0)
    if dq is None or dq.op_type != DQ or g.is_const(dq.input[0]):
        return []  # a float input (or a weight being transposed): nothing is shared
    users = g.consumers[node.output[0]]
    if len(users) != 1 or users[0].op_type != Q:
        return [f"the input is dequantized but the output is not re-quantized (found {[u.op_type for u in users]}); "
                "the row keeps the op between DQ and Q on one set of qparams"]
    if not _same(g.qparams(dq), g.qparams(users[0])):
        return [f"output QuantizeLinear '{users[0].name}' has {_fmt(g.qparams(users[0]))}, input DequantizeLinear "
                f"'{dq.name}' has {_fmt(g.qparams(dq))}; the row shares one set"]
    return []


def _check_share_inputs(g: _Graph, backend: Backend, rule: Rule, node) -> list[str]:
    found, first = [], None
    for i, name in enumerate(node.input):
        if g.is_const(name):
            continue
        dq = g.input_node(node, i)
        if dq is None or dq.op_type != DQ:
            found.append(f"input {i} is not dequantized; the row puts every input on one set of qparams")
        elif first is None:
            first = (i, dq)
        elif not _same(g.qparams(dq), g.qparams(first[1])):
            found.append(f"input {i} ('{dq.name}') has {_fmt(g.qparams(dq))}, input {first[0]} ('{first[1].name}') "
                         f"has {_fmt(g.qparams(first[1]))}; the row shares one set of qparams across its inputs")
    users = g.consumers[node.output[0]]
    if first is not None and (len(users) != 1 or users[0].op_type != Q or not _same(g.qparams(users[0]), g.qparams(first[1]))):
        found.append("the output is not re-quantized with its inputs' shared qparams")
    return found


KIND_CHECKS = {QUANTIZE: _check_quantize, SHARE: _check_share, SHARE_INPUTS: _check_share_inputs}


def _bias_adds(g: _Graph) -> set[str]:
    """Adds that only add a MatMul's bias (a linear on 3-D input): part of the linear row, not add rows."""
    adds = (g.consumers[n.output[0]] for n in g.nodes if n.op_type == "MatMul")
    return {u[0].name for u in adds if len(u) == 1 and u[0].op_type == "Add" and _bias_input(g, u[0]) is not None}


def _row_for(g: _Graph, rows: list[Rule], node) -> Rule:
    """The row an ONNX node is read by: among rows naming its op type, the one whose weight column fits,
    then the one with the longest onnx_chain the node's consumers follow (a MatMul -> Softmax is read by
    the attention row, whose matmul output stays float; a MatMul -> Q by the plain matmul row)."""
    if len(rows) > 1:
        w = g.input_node(node, 1, through=("Transpose",))
        has_weight = w is not None and w.op_type == DQ and g.is_const(w.input[0])
        rows = [r for r in rows if r.weight == has_weight] or rows
        rows = [r for r in rows if _chain(g, r, node) is not None] or [r for r in rows if not r.onnx_chain] or rows
        return max(rows, key=lambda r: len(r.onnx_chain))
    return rows[0]


# ------------------------------------------------------------------ entry points


def _load(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)) and os.path.isfile(model):
        return onnx.load(os.fspath(model))
    if isinstance(model, (str, os.PathLike)):
        raise FxQuantError(f"model={os.fspath(model)!r}: no such file")
    raise FxQuantError(f"model: expected an onnx.ModelProto or the path of an .onnx file, got {model!r}")


def check_onnx(model, backend=None, *, target: str | None = None, float_nodes=None) -> list[Violation]:
    """Every place where `model` (a ModelProto or path) breaks its backend's rules, by node name.

    `backend` (a name or Backend) defaults to the one the file records; `target` (a deployment target of
    that backend, e.g. "portable" or "vnni") to the one the file records, else the backend's default, so
    a file exported for "vnni" checked as "portable" lists every integer GEMM whose weights can saturate
    a 16-bit pair sum; `float_nodes` (node names the user kept float) defaults to the file's list.
    """
    model = _load(model)
    meta = read_metadata(model)
    if backend is None and BACKEND_KEY not in meta:
        raise FxQuantError("check_onnx: the file records no fxquant backend; pass backend='onnxruntime' or 'tensorrt'")
    if backend is None:
        backend = load_backend(meta[BACKEND_KEY], reduce_range=meta.get(REDUCE_RANGE_KEY) == "1")
    recorded = meta.get(TARGET_KEY) if meta.get(BACKEND_KEY) == getattr(backend, "name", backend) else None
    backend = load_backend(backend, target=target or recorded)
    if float_nodes is None:
        float_nodes = [n for n in meta.get(FLOAT_NODES_KEY, "").split(",") if n]
    g = _Graph(model)
    skip = set(float_nodes) | _bias_adds(g)
    rows = defaultdict(list)
    for rule in backend.rules:
        for op_type in rule.onnx:
            rows[op_type].append(rule)
    specs = [backend.activation] + [r.spec for r in backend.rules if r.spec is not None]
    read_by = {}  # node name -> the row it is read by
    for node in g.nodes:
        if node.op_type in rows and node.name.split("/")[0] not in skip and node.name not in skip and g.computes_activation(node):
            read_by[node.name] = rule = _row_for(g, rows[node.op_type], node)
            skip.update(n.name for n in (_chain(g, rule, node) or ()))  # a row's chain: float inside the row
    found = []
    for node in g.nodes:
        if node.op_type in (Q, DQ):
            found += [Violation(node.name, None, m) for m in _activation_problems(g, node, specs)]
        elif node.name in read_by and node.name not in skip:
            rule = read_by[node.name]
            check = KIND_CHECKS.get(rule.kind)
            found += [Violation(node.name, rule.name, m) for m in (check(g, backend, rule, node) if check else [])]
    return found


def assert_valid(model, backend=None, *, float_nodes=None, limit: int = 20, quantized_for: str | None = None) -> None:
    """Raise FxQuantError listing the violations (the first `limit`), if any. `quantized_for`: the backend the
    model was quantized for, named in the message when the file is checked against another one."""
    found = check_onnx(model, backend, float_nodes=float_nodes)
    if found:
        more = f"\n  ... and {len(found) - limit} more" if len(found) > limit else ""
        name = getattr(backend, "name", backend) or read_metadata(_load(model)).get(BACKEND_KEY)
        other = (f" (the model was quantized for {quantized_for!r}: export it with that backend, or quantize it with "
                 f"backend={name!r})") if quantized_for and quantized_for != name else ""
        raise FxQuantError(
            f"export_onnx: the file breaks {len(found)} rule(s) of backend {name!r}{other}:\n  "
            + "\n  ".join(map(str, found[:limit])) + more
            + "\n(check=False writes it anyway)"
        )
