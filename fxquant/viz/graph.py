"""One stage of the pipeline as plain data the page draws: `Stage` (nodes in topological order, edges by index).

A node is a dict with short keys (the page holds ~10^5 of them for a 10,000-block model):

    n     name: the identity across stages (fxquant keeps node names from trace into the ONNX file)
    o     op label drawn in the box ("Conv2d", "ConvAct2d·relu", "FakeQuantize", "QLinearConv")
    k     kind, what the colour says: input, output, op, fq (fake-quant), q, dq, int (an integer kernel
          ONNX Runtime runs), float (an op kept float, or a float island in ONNX Runtime's graph), leaf
    g     module path ("layer1.0"; "" at the root): nodes nest by it
    i     input node indices (into the stage's node list)
    sh    output shape, e.g. "1×64×56×56" (fx stages; ONNX when the file records it)
    t     target / op type in full
    b     bit width of a q/dq/fq (or a weight's), for the colour
    q     a dict of quantization details: dtype, qmin, qmax, scale (a float, or a list per channel),
          zp, axis, observer, fake_quant, range [lo, hi] (the observer's, per tensor)
    w     the same for the weight of a conv/linear (fake-quant stage)
    rule  the backend row that claimed the node; rk its kind (quantize, share, share_inputs, float)
    why   why the node runs in float: fxquant.report's reason (the row, or the trace failure and its line)
    ab    names of earlier-stage nodes this one absorbed (a fused BatchNorm/ReLU; the Q/DQ and ops an
          ONNX Runtime integer kernel replaced)
    dom   ONNX domain of the op, at ONNX attributes (small ones only)
    s     1 when the value is not a tensor of data (shape arithmetic: x.shape, getitem on it, ONNX Shape -> Gather):
          the page hides these by default
    c     the constants the node reads (fx get_attr targets, ONNX initializers), ws a module's weight shape
    fg    the layer a node belongs to, for the box around them: in the traced stage the node whose fused module
          it will become part of; in the int8 and ONNX stages the layer it was lowered from (weight DQ, conv, act)

Constants (fx get_attr, ONNX initializers and Constant nodes) are not drawn: each node lists the ones it
reads in `c`, so a weight's int8 tensor does not become a box of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx

MAX_CHANNELS = 4096  # per-channel scales kept for the chart; beyond that every k-th one (the chart is 160 px wide)

# ONNX Runtime's integer kernels (the ops its QDQ fusion and quantization tools emit)
INTEGER_OPS = frozenset({
    "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "QAttention",
    "QEmbedLayerNormalization", "QOrderedMatMul", "QOrderedGelu", "QOrderedLayerNormalization", "QOrderedAttention",
})
QUANTIZE_OPS = frozenset({"QuantizeLinear", "DynamicQuantizeLinear"})
DEQUANTIZE_OPS = frozenset({"DequantizeLinear"})


@dataclass
class Stage:
    """One graph: `id` (stable key: traced, fused, ..., ort), `label` for the selector, the pass that made
    it, its nodes, and `error` when this stage could not be built (the page shows why)."""

    id: str
    label: str
    made_by: str = ""
    nodes: list[dict] = field(default_factory=list)
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    graph_name: str = ""  # an ONNX stage: the graph's name (Model Explorer's graph id)

    def names(self) -> dict[str, int]:
        return {node["n"]: i for i, node in enumerate(self.nodes)}

    def to_networkx(self):
        """The stage as a networkx.DiGraph: one node per drawn node (keyed by name, the record's fields as
        attributes), one edge per input; for analysis next to the page (descendants, paths, matching)."""
        import networkx as nx

        g = nx.DiGraph(stage=self.id)
        for rec in self.nodes:
            g.add_node(rec["n"], **{k: v for k, v in rec.items() if k not in ("n", "i")})
        g.add_edges_from((self.nodes[i]["n"], rec["n"]) for rec in self.nodes for i in rec["i"])
        return g

    def as_json(self) -> dict:
        return {"id": self.id, "label": self.label, "pass": self.made_by, "nodes": self.nodes, "error": self.error,
                "notes": self.notes}


def shape_text(shape) -> str | None:
    if shape is None:
        return None
    return "×".join(str(d) for d in shape) if len(shape) else "scalar"


def _number(x: float) -> float | None:
    """A float JSON can hold (NaN/Inf become null), rounded to 6 significant digits."""
    x = float(x)
    return float(f"{x:.6g}") if math.isfinite(x) else None


def tensor_values(t: torch.Tensor):
    """A scalar, or a list (every k-th value beyond MAX_CHANNELS), rounded for JSON."""
    t = t.detach().float().flatten()
    if t.numel() == 1:
        return _number(t.item())
    step = max(1, math.ceil(t.numel() / MAX_CHANNELS))
    return [_number(v) for v in t[::step].tolist()]


# ------------------------------------------------------------------ fx stages


def _fake_quant_details(fq) -> dict:
    """scale/zp/range of a fxquant.nn.FakeQuantize (the values its forward uses), its spec's fields."""
    spec = fq.spec
    details = {"dtype": spec.dtype, "qmin": spec.qmin, "qmax": spec.qmax, "axis": spec.axis, "observer": spec.observer,
               "fake_quant": spec.fake_quant, "symmetric": spec.symmetric, "calibrated": bool(fq.calibrated)}
    if fq.calibrated:
        scale, zp = fq.qparams()
        details["scale"], details["zp"] = tensor_values(scale), tensor_values(zp)
        observer = fq.observer
        details["range"] = [tensor_values(observer.min_val), tensor_values(observer.max_val)]
    return details


def _spec_details(spec) -> dict:
    return {"dtype": spec.dtype, "qmin": spec.qmin, "qmax": spec.qmax, "axis": spec.axis, "observer": spec.observer,
            "fake_quant": spec.fake_quant, "symmetric": spec.symmetric}


def _target_text(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    module = getattr(t, "__module__", None) or ""
    return f"{module}.{getattr(t, '__qualname__', getattr(t, '__name__', str(t)))}".lstrip(".")


def _module_group(node: fx.Node) -> str | None:
    """The module path the node was traced in (torch.fx's nn_module_stack); a call_module's is its parent."""
    if node.op == "call_module":
        return node.target.rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        return path[0] if isinstance(path, tuple) else str(path)
    return None


def fx_stage(gm: fx.GraphModule, stage: Stage, *, why: dict[str, str] | None = None) -> Stage:
    """Fill `stage` with `gm`'s graph. `why` maps node name -> the reason it runs float (from fxquant.report)."""
    from fxquant.meta import KEY
    from fxquant.nn import FakeQuantize
    from fxquant.numerics import dequantize, quantize

    why = why or {}
    drawn = [n for n in gm.graph.nodes if n.op != "get_attr"]
    index = {n: i for i, n in enumerate(drawn)}
    for node in drawn:
        rec: dict = {"n": node.name, "t": _target_text(node), "i": [index[a] for a in node.all_input_nodes if a in index]}
        consts = [a.target for a in node.all_input_nodes if a.op == "get_attr"]
        if consts:
            rec["c"] = consts
        group = _module_group(node)
        if group is not None:
            rec["g"] = group
        meta = node.meta.get(KEY)
        if meta is not None and meta.shape is not None:
            rec["sh"] = shape_text(meta.shape)
        if node.op == "placeholder":
            rec.update(o="input", k="input")
        elif node.op == "output":
            rec.update(o="output", k="output")
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            _describe_module(rec, module, FakeQuantize)
            if rec["k"] == "fq":
                rec.pop("g", None)  # fake-quants are named after their value, not a module path: placed by name
        elif node.target in (quantize, dequantize):
            _describe_qdq(gm, rec, node, quantize)
        else:
            rec.update(o=getattr(node.target, "__name__", str(node.target)), k="op")
        if meta is not None and meta.shape is None and meta.leaf is None and rec["k"] == "op":
            rec["s"] = 1  # not a tensor: shape arithmetic (x.shape, getitem, eq, _assert), hidden by default
        if meta is not None:
            if meta.rule is not None:
                rec["rule"], rec["rk"] = meta.rule, meta.kind
            if meta.leaf is not None:
                rec["why"] = f"kept whole by trace: {meta.leaf}"
                if rec["k"] == "op":
                    rec["k"] = "leaf"
        if node.name in why and rec["k"] in ("op", "leaf"):
            rec["why"] = why[node.name]
            rec["k"] = "float"
        stage.nodes.append(rec)
    return stage


def _describe_module(rec: dict, module, fake_quant_class) -> None:
    if isinstance(module, fake_quant_class):
        rec.update(o="FakeQuantize", k="fq", b=module.spec.bits, q=_fake_quant_details(module))
        return
    label = type(module).__name__
    act = getattr(module, "act", None)
    rec.update(o=f"{label}·{act}" if act else label, k="op")
    weight_fq = getattr(module, "weight_fq", None)
    if isinstance(weight_fq, fake_quant_class):
        rec["w"] = _fake_quant_details(weight_fq)
        rec["b"] = weight_fq.spec.bits
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        rec["ws"] = shape_text(tuple(weight.shape))


def _describe_qdq(gm: fx.GraphModule, rec: dict, node: fx.Node, quantize) -> None:
    """A reference int8 quantize(x, scale, zp, qmin, qmax, axis, dtype) / dequantize(q, scale, zp, axis) node."""
    is_q = node.target is quantize
    rec.update(o="quantize" if is_q else "dequantize", k="q" if is_q else "dq")
    args = node.args
    details: dict = {}
    for key, arg in (("scale", args[1]), ("zp", args[2])):
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            details[key] = tensor_values(_attr(gm, arg.target))
    if is_q:
        details.update(qmin=args[3], qmax=args[4], axis=args[5] if len(args) > 5 else None, dtype=args[6] if len(args) > 6 else "int32")
        rec["b"] = (int(args[4]) - int(args[3])).bit_length()
    else:
        details["axis"] = args[3] if len(args) > 3 else None
        source = args[0]
        if isinstance(source, fx.Node) and source.op == "get_attr":  # a weight/bias: int8 or int32 integers
            stored = _attr(gm, source.target)
            details["stored"] = source.target
            lo, hi = (int(stored.min()), int(stored.max())) if stored.numel() else (0, 0)
            details["int_range"] = [lo, hi]
            meta = node.meta.get("fxquant")
            spec = getattr(meta, "weight", None)
            rec["b"] = spec.bits if spec is not None else (32 if stored.dtype == torch.int32 else 8)
            details["dtype"] = "int32" if rec["b"] == 32 else (spec.dtype if spec is not None else str(stored.dtype))
        elif isinstance(source, fx.Node) and source.target is quantize:
            rec["b"] = (int(source.args[4]) - int(source.args[3])).bit_length()
    rec["q"] = details


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ------------------------------------------------------------------ ONNX stages


def _onnx_group(name: str) -> str | None:
    """torch.onnx's scope names ("/layer1/layer1.0/conv1/Conv") -> "layer1.0.conv1"; others: None."""
    if "/" not in name.strip("/"):
        return None
    parts = [p for p in name.strip("/").split("/")[:-1] if p]
    path: list[str] = []
    for p in parts:
        if path and p.startswith(".".join(path) + "."):
            path = p.split(".")
        else:
            path.append(p)
    return ".".join(path) or None


def _onnx_attrs(node) -> dict:
    from onnx import helper

    out = {}
    for a in node.attribute:
        value = helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if isinstance(value, (int, float, str)) or (isinstance(value, (list, tuple)) and len(value) <= 16
                                                     and all(isinstance(v, (int, float)) for v in value)):
            out[a.name] = list(value) if isinstance(value, (list, tuple)) else value
    return out


_ZP_BITS = {"UINT8": 8, "INT8": 8, "UINT4": 4, "INT4": 4, "UINT16": 16, "INT16": 16, "INT32": 32, "FLOAT8E4M3FN": 8}


def onnx_stage(model, stage: Stage, *, float_names: dict[str, str] | None = None, islands: bool = False,
               scopes: bool = False) -> Stage:
    """Fill `stage` with the ONNX graph of `model` (a ModelProto). Q/DQ details come from the initializers;
    `float_names` (name -> reason) marks ops kept float; `islands=True` (ONNX Runtime's optimised graph)
    marks float-valued compute between the integer kernels as kind "float". `scopes=True` nests nodes by
    torch.onnx's scope names (a file fxquant did not write; fxquant's files are placed by the model's names)."""
    from onnx import TensorProto, numpy_helper

    float_names = float_names or {}
    graph = model.graph
    stage.graph_name = graph.name
    inits = {t.name: t for t in graph.initializer}
    consts: dict[str, object] = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    inits.update(consts)
    shapes = _onnx_shapes(graph)
    producer: dict[str, int] = {}
    float_tensor: dict[str, bool] = {}
    shape_only: set[str] = set()  # tensors computed from shapes alone (Shape -> Gather -> Concat -> Reshape's shape)
    for vi in graph.input:
        float_tensor[vi.name] = vi.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
    for name, t in inits.items():
        float_tensor[name] = t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)

    def values(name):
        t = inits.get(name)
        return tensor_values(torch.from_numpy(numpy_helper.to_array(t).astype("float64"))) if t is not None else None

    nodes = stage.nodes
    for vi in graph.input:
        if vi.name in inits:
            continue
        producer[vi.name] = len(nodes)
        nodes.append({"n": vi.name, "o": "input", "k": "input", "t": "graph input", "i": [], **_shape(shapes, vi.name)})
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] in consts:
            continue
        name = node.name or (node.output[0] if node.output else f"{node.op_type}_{len(nodes)}")
        rec: dict = {"n": name, "o": node.op_type, "t": f"{node.domain}::{node.op_type}" if node.domain else node.op_type,
                     "i": sorted({producer[x] for x in node.input if x in producer}), **_shape(shapes, node.output[0] if node.output else "")}
        if node.domain:
            rec["dom"] = node.domain
        else:
            del rec["t"]  # the op type says it all (the page shows `o`)
        read = [x for x in node.input if x in inits]
        if read:
            rec["c"] = read
        attrs = _onnx_attrs(node)
        if attrs:
            rec["at"] = attrs
        group = _onnx_group(name) if scopes else None
        if group:
            rec["g"] = group
        op = node.op_type
        live = [x for x in node.input if x and x not in inits]
        if op in ("Shape", "Size") or (live and all(x in shape_only for x in live)):
            rec["s"] = 1
            shape_only.update(node.output)
        first = next((x for x in node.input if x and x not in inits), None)
        reads_float = float_tensor.get(first, True) if first is not None else False
        if op in QUANTIZE_OPS or op in DEQUANTIZE_OPS:
            is_q = op in QUANTIZE_OPS
            rec["k"] = "q" if is_q else "dq"
            zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
            zp_type = None
            if zp_name in inits:
                zp_type = TensorProto.DataType.Name(inits[zp_name].data_type)
            elif is_q:
                zp_type = "UINT8"  # ONNX's default output type
            elif node.input[0] in inits:
                zp_type = TensorProto.DataType.Name(inits[node.input[0]].data_type)
            rec["b"] = _ZP_BITS.get(zp_type or "UINT8", 8)
            q = {"dtype": (zp_type or "").lower() or None, "axis": attrs.get("axis"),
                 "scale": values(node.input[1]) if len(node.input) > 1 else None}
            if zp_name:
                q["zp"] = values(zp_name)
            if not is_q and node.input[0] in inits:
                q["stored"] = node.input[0]
            rec["q"] = q
            for out in node.output:
                float_tensor[out] = not is_q
        else:
            integer = op.startswith("QLinear") or op in INTEGER_OPS
            rec["k"] = "int" if integer else "op"
            for out in node.output:
                float_tensor[out] = (op == "MatMulIntegerToFloat") or (not integer and reads_float)
            if integer:
                zps = [x for x in node.input if x in inits and inits[x].data_type in (TensorProto.UINT8, TensorProto.INT8)]
                rec["b"] = 8 if zps else None
            elif islands and reads_float and "s" not in rec or name in float_names:
                rec["k"] = "float"
            if name in float_names:
                rec["why"] = float_names[name]
        for out in node.output:
            producer[out] = len(nodes)
        nodes.append(rec)
    outputs = [o.name for o in graph.output]
    for out in outputs:
        nodes.append({"n": f"output:{out}" if out in producer and nodes[producer[out]]["n"] == out else out,
                      "o": "output", "k": "output", "t": "graph output", "i": [producer[out]] if out in producer else []})
    return stage


def _onnx_shapes(graph) -> dict[str, str]:
    out = {}
    for vi in list(graph.value_info) + list(graph.output) + list(graph.input):
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []
        if dims:
            out[vi.name] = "×".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)
    return out


def _shape(shapes: dict[str, str], tensor: str) -> dict:
    return {"sh": shapes[tensor]} if tensor in shapes else {}


def onnx_outputs(model) -> dict[str, list[str]]:
    """node name -> the tensors it writes (ONNX Runtime names the fused kernels after one of the ops)."""
    return {(n.name or n.output[0]): list(n.output) for n in model.graph.node}
