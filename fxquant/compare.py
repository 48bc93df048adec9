"""fxquant.compare: float, fake-quant, reference int8 and the ONNX file in ONNX Runtime, layer by layer, by node name.

    rep = fxquant.compare(model, qmodel, int8, "model.onnx", x)     # x: a batch of inputs
    print(rep)                      # one row per quantized value, graph order; the first divergent layer named
    rep.save("out/compare")         # JSON (+ viewer overlays), PNG, SVG

A *point* is a value the graphs quantize: a fake-quant node of `qmodel`, which `convert` turns into the int8
graph's quantize node of the same name and `export_onnx` into a QuantizeLinear whose output has that name
(shared-qparam ops such as maxpool add int8/ONNX points of their own, `<op>_fq`). Per point:

    sqnr_*_db      10 log10(sum f^2 / sum (f - v)^2), f the float model's value there, v the fake-quant model's
                   (fq), the int8 graph's (int8, dequantized) or ONNX Runtime's (onnx, dequantized with the same
                   scale): the error each accumulates from the input on, against float
    max_abs_*      max |f - v| (the value's units)
    steps_fq_int8  teacher-forced: the fake-quant model run with every fake-quant output replaced by the int8
                   graph's (dequantized) value at that point, max |fq - int8| in quantization steps of the point
    steps_int8_onnx  teacher-forced: the int8 graph run with every quantize output replaced by ONNX Runtime's,
                   max |int8 - ort| in steps: fxquant.check.layerwise, this function's core
Teacher forcing feeds each layer the other implementation's own inputs, so a difference does not compound
through depth: a correct file stays within one step everywhere (two float implementations round the last
bit differently), and the first point beyond one step is the first layer the deployed file computes
differently: `first_divergent`.

The float values come from `model` traced as `quantize` traces it (same node names, BatchNorm folded, every
fake-quant off), so a QAT model is compared with the float model it started from. `cpu=` runs ONNX Runtime
as that CPU under qemu-user (fxquant.check.CPUS: "haswell", AVX2 without VNNI; "nehalem", SSE4; "cortex-a72"
and "neoverse-n1", Arm without and with dot product).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import fx, nn

from fxquant.errors import FxQuantError
from fxquant.nn import FakeQuantize
from fxquant.numerics import along, dequantize, quantize
from fxquant.report_files import format_table, pyplot, save_figure, sqnr_db, viewer_overlay, write_report
from fxquant.sensitivity import only

ONE_STEP = 1 + 1e-4  # the float rounding of (q - zp) * scale itself (as fxquant.check.agreement)


@dataclass
class Point:
    name: str  # the quantize node / QuantizeLinear output, e.g. "layer1_conv1_fq"
    layer: str  # the op whose output it quantizes, e.g. "layer1_conv1" (what the graph viewer shows)
    scale: float
    sqnr_fq_db: float = math.nan
    sqnr_int8_db: float = math.nan
    sqnr_onnx_db: float = math.nan
    max_abs_fq: float = math.nan
    max_abs_int8: float = math.nan
    max_abs_onnx: float = math.nan
    steps_fq_int8: float = math.nan
    steps_int8_onnx: float = math.nan


@dataclass
class CompareReport:
    """fxquant.compare's result: `points` in the int8 graph's order."""

    points: list[Point]
    first_divergent: str | None  # the first point where ONNX Runtime is more than one step from the int8 graph
    cpu: str | None = None
    output_sqnr_db: dict = field(default_factory=dict)  # {"fq"|"int8"|"onnx": SQNR of the model output vs float}
    isa: str | None = None  # the integer-kernel ISA that ran the file (fxquant.check.host_isa, or the emulated CPU's)

    def overlays(self) -> list[dict]:
        """The graph viewer's overlays ({"name", "better", "values": {node: value}}), keyed by the layer (op)
        name; an error-free SQNR (inf) is drawn at 200 dB, NaN values are left out."""
        specs = [("sqnr_int8_db", "higher"), ("sqnr_onnx_db", "higher"), ("sqnr_fq_db", "higher"),
                 ("steps_int8_onnx", "lower"), ("steps_fq_int8", "lower")]
        return [viewer_overlay(key, better, ((p.layer, getattr(p, key)) for p in self.points)) for key, better in specs]

    def to_json(self) -> dict:
        clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
        return {"format": "fxquant.compare/1", "first_divergent": self.first_divergent, "cpu": self.cpu, "isa": self.isa,
                "output_sqnr_db": {k: clean(v) for k, v in self.output_sqnr_db.items()},
                "points": [{k: clean(v) for k, v in asdict(p).items()} for p in self.points], "overlays": self.overlays()}

    def __str__(self) -> str:
        f = lambda v, fmt: "" if math.isnan(v) else format(v, fmt)
        cols = ("point", "SQNR fq dB", "SQNR int8 dB", "SQNR onnx dB", "max|err| int8", "steps fq~int8", "steps int8~onnx")
        rows = [(p.name, f(p.sqnr_fq_db, ".1f"), f(p.sqnr_int8_db, ".1f"), f(p.sqnr_onnx_db, ".1f"), f(p.max_abs_int8, ".3g"),
                 f(p.steps_fq_int8, ".0f"), f(p.steps_int8_onnx, ".0f")) for p in self.points]
        where = f"ONNX Runtime ({self.cpu or 'this CPU'}, {self.isa})"
        verdict = (f"first layer where {where} leaves the int8 reference by more than one step: {self.first_divergent}"
                   if self.first_divergent else f"{where} is within one step of the int8 reference at every layer")
        return format_table(cols, rows) + "\n" + verdict

    def save(self, stem: str) -> list[str]:
        """STEM.json, STEM.png, STEM.svg, and one STEM.<overlay>.json per overlay (`fxquant viz --overlay`)."""
        paths = write_report(self.to_json(), self.overlays(), stem)
        return paths + plot_sqnr({"fake-quant": self, "int8": self, "ONNX Runtime": self},
                                 stem, keys=("sqnr_fq_db", "sqnr_int8_db", "sqnr_onnx_db"))


# ---------------------------------------------------------------- running each implementation


def _inputs(inputs) -> tuple:
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise FxQuantError("compare: inputs must be a tensor or a tuple of tensors (one batch)")
    return inputs


def _record(gm: fx.GraphModule, inputs, keep) -> dict[str, torch.Tensor]:
    seen = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if keep(n) and isinstance(value, torch.Tensor):
                seen[n.name] = value.detach()
            return value

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return seen


def _float_values(model: nn.Module, inputs) -> dict[str, torch.Tensor]:
    """Every node's value in `model` traced as quantize traces it, every fake-quant off (the float model)."""
    from fxquant.api import quantize as quantize_model  # numerics.quantize is the ONNX op here
    from fxquant.nn import set_fake_quant

    traced = quantize_model(model, inputs, progress=False).eval()
    set_fake_quant(traced, observe=False, enabled=False)
    return _record(traced, inputs, lambda n: True)


def _quantize_nodes(int8: fx.GraphModule) -> list[fx.Node]:
    return [n for n in int8.graph.nodes if n.op == "call_function" and n.target is quantize]


def _qparams(int8: fx.GraphModule, node: fx.Node):
    scale, zp = (getattr(int8, a.target) for a in node.args[1:3])
    return scale, zp, node.args[5] if len(node.args) > 5 else None


def _as_float(int8, node, q):
    scale, zp, axis = _qparams(int8, node)
    return dequantize(q, scale, zp, axis)


def _steps(int8, node, a_float: torch.Tensor, q: torch.Tensor) -> float:
    scale, zp, axis = _qparams(int8, node)
    if q.numel() == 0:
        return 0.0
    return float((a_float - dequantize(q, scale, zp, axis)).abs().div(along(scale, q, axis)).max())


def onnx_values(path: str, names: list[str], inputs, *, cpu: str | None = None) -> dict[str, np.ndarray]:
    """ONNX Runtime's value of each named tensor of the file (exposed as extra graph outputs), natively or as
    an emulated CPU (fxquant.check.run_file: qemu-user)."""
    import onnx

    from fxquant.check import run_file

    model = onnx.load(path)
    produced = {o for n in model.graph.node for o in n.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n in produced)
    with tempfile.TemporaryDirectory(prefix="fxquant-compare-") as tmp:
        exposed = os.path.join(tmp, "exposed.onnx")
        onnx.save_model(model, exposed)
        return run_file(exposed, inputs, cpu=cpu)


# ---------------------------------------------------------------- the comparison


def _check_names(int8: fx.GraphModule, path: str, qnodes: list[fx.Node]) -> None:
    import onnx

    model = onnx.load(path, load_external_data=False)
    in_file = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    ours = {n.name for n in qnodes}
    missing, extra = sorted(ours - in_file), sorted(in_file - ours)
    if missing or extra:
        raise FxQuantError(
            f"compare: {path} is not the file this int8 graph exports to: its QuantizeLinear outputs do not match the "
            f"graph's quantize nodes (missing from the file: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"not in the graph: {extra[:5]}{'...' if len(extra) > 5 else ''}). Export it with "
            "fxquant.export_onnx(int8, path, inputs) and compare that file")


def compare(model: nn.Module, qmodel: fx.GraphModule, int8: fx.GraphModule, onnx_path: str | None, inputs, *,
            cpu: str | None = None, reference: str = "model") -> CompareReport:
    """Line up float, fake-quant, int8 and ONNX Runtime by node name (see the module docstring).

    model: the float nn.Module; qmodel: its fake-quant GraphModule (calibrated or trained); int8: convert(qmodel);
    onnx_path: export_onnx(int8 or qmodel, onnx_path, ...), or None to leave ONNX Runtime out; inputs: one batch,
    a tensor (N, ...) or a tuple of tensors; cpu: None (this machine) or a name of fxquant.check.CPUS ("haswell",
    "nehalem", "cortex-a72", "neoverse-n1"; case ignored), run under qemu-user. reference: "model" (the float values are `model`'s) or "own"
    (qmodel's own weights with every fake-quant off: the quantization noise alone, for a QAT model whose
    weights have moved away from `model`'s).
    """
    inputs = _inputs(inputs)
    if not isinstance(int8, fx.GraphModule) or not _quantize_nodes(int8):
        raise FxQuantError("compare: int8 must be the reference int8 GraphModule from fxquant.convert(qmodel)")
    if not isinstance(qmodel, fx.GraphModule) or not any(isinstance(m, FakeQuantize) for m in qmodel.modules()):
        raise FxQuantError("compare: qmodel must be the fake-quant GraphModule from fxquant.quantize()")
    qnodes = _quantize_nodes(int8)
    if onnx_path is not None:
        if not os.path.exists(onnx_path):
            raise FxQuantError(f"compare: {onnx_path}: no such file")
        _check_names(int8, onnx_path, qnodes)
    qmodel = qmodel.eval()
    if reference not in ("model", "own"):
        raise FxQuantError(f"compare: reference={reference!r}; expected 'model' or 'own'")
    if reference == "model":
        floats = _float_values(model, inputs)
    else:
        with only(qmodel, ()):
            floats = _record(qmodel, inputs, lambda n: True)
    fq_values = _record(qmodel, inputs, lambda n: n.op == "call_module" and isinstance(qmodel.get_submodule(n.target), FakeQuantize))
    int8_q = _record(int8, inputs, lambda n: n.target is quantize)
    ort, forced = {}, None
    if onnx_path is not None:
        from fxquant.check import layerwise

        cpu = cpu.lower() if isinstance(cpu, str) else cpu
        forced = layerwise(int8, onnx_path, inputs, cpu=cpu)  # the teacher-forced check: steps per quantize node
        ort = onnx_values(onnx_path, [n.name for n in qnodes], inputs, cpu=cpu)

    points = []
    for node in qnodes:
        src = node.args[0]
        scale, _, _ = _qparams(int8, node)
        p = Point(node.name, src.name if isinstance(src, fx.Node) else node.name, float(scale.reshape(-1)[0]))
        f = floats.get(p.layer)
        candidates = {"int8": _as_float(int8, node, int8_q[node.name])}
        if node.name in fq_values:
            candidates["fq"] = fq_values[node.name]
        if node.name in ort:
            candidates["onnx"] = _as_float(int8, node, torch.from_numpy(np.asarray(ort[node.name])))
        if f is not None and f.shape == candidates["int8"].shape:
            for key, v in candidates.items():
                diff = (v.double() - f.double())
                setattr(p, f"sqnr_{key}_db", sqnr_db(float((f.double() ** 2).sum()), float((diff ** 2).sum())))
                setattr(p, f"max_abs_{key}", float(diff.abs().max()) if diff.numel() else 0.0)
        points.append(p)
    by_name = {p.name: p for p in points}
    _teacher_forced_fq(qmodel, int8, inputs, int8_q, by_name)
    if forced is not None:
        for name, steps in forced.steps.items():
            if name in by_name:
                by_name[name].steps_int8_onnx = steps
    first = next((p.name for p in points if p.steps_int8_onnx > ONE_STEP), None)
    isa = forced.isa if forced is not None else None
    return CompareReport(points, first, cpu, _output_sqnr(model if reference == "model" else None, qmodel, int8, inputs, forced), isa)


def _output_sqnr(model, qmodel, int8, inputs, forced) -> dict:
    """SQNR (dB) of each implementation's (first) output against the float model's (model None: qmodel's own
    weights, every fake-quant off)."""
    with torch.no_grad():
        if model is None:
            with only(qmodel, ()):
                ref = _first(qmodel(*inputs)).double()
        else:
            ref = _first(model.eval()(*inputs)).double()
        outs = {"fq": _first(qmodel(*inputs)), "int8": _first(int8(*inputs))}
    if forced is not None:
        outs["onnx"] = torch.from_numpy(np.asarray(forced.outputs[0]))  # the file as deployed, nothing exposed
    return {k: sqnr_db(float((ref ** 2).sum()), float(((v.double() - ref) ** 2).sum())) for k, v in outs.items()}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _teacher_forced_fq(qmodel, int8, inputs, int8_q, by_name):
    """Each fake-quant's output vs the int8 graph's at that point, the fake-quant model fed the int8 values."""
    qnode = {n.name: n for n in _quantize_nodes(int8)}

    class Forced(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.name in qnode and n.op == "call_module" and isinstance(self.module.get_submodule(n.target), FakeQuantize):
                theirs = int8_q[n.name]
                by_name[n.name].steps_fq_int8 = _steps(int8, qnode[n.name], value, theirs)
                value = _as_float(int8, qnode[n.name], theirs)
            return value

    with torch.no_grad():
        Forced(qmodel).run(*inputs)


# ---------------------------------------------------------------- several models against float: "what QAT improved"


def plot_sqnr(reports: dict, stem: str, *, keys=None, title: str = "SQNR against float, per layer") -> list[str]:
    """One line per report (label -> CompareReport), SQNR (dB) per point in graph order; STEM.png and STEM.svg.
    `keys` picks each report's column (default sqnr_int8_db for all)."""
    plt = pyplot()
    keys = keys or ("sqnr_int8_db",) * len(reports)
    first = next(iter(reports.values()))
    names = [p.name for p in first.points]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 4.5))
    for (label, rep), key in zip(reports.items(), keys):
        vals = {p.name: getattr(p, key) for p in rep.points}
        ax.plot(range(len(names)), [min(vals.get(n, math.nan), 200.0) for n in names], "o-", label=label, markersize=4)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("SQNR vs float (dB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, stem)


@dataclass
class Improvement:
    """Per point, the int8 graph's SQNR for each quantized model (e.g. PTQ and QAT) against the float model
    (`reports`) and against its own weights in float (`own`: the quantization noise alone)."""

    reports: dict  # label -> CompareReport against the float model (no ONNX file)
    own: dict  # label -> CompareReport against the model's own weights, fake-quants off

    def rows(self) -> list[tuple]:
        """(point, SQNR vs float per label..., SQNR vs own weights per label...)"""
        labels, first = list(self.reports), next(iter(self.reports.values()))
        by = {(kind, label): {p.name: p.sqnr_int8_db for p in rep.points}
              for kind, reps in (("float", self.reports), ("own", self.own)) for label, rep in reps.items()}
        return [(p.name, *(by[(kind, label)].get(p.name, math.nan) for kind in ("float", "own") for label in labels))
                for p in first.points]

    def __str__(self) -> str:
        labels = list(self.reports)
        cols = ("layer (quantize point)", *(f"{label} vs FP32" for label in labels), *(f"{label} vs own" for label in labels))
        fmt = lambda v: "" if math.isnan(v) else f"{v:.1f}"
        rows = [(name, *map(fmt, vals)) for name, *vals in self.rows()]
        outs = [rep.output_sqnr_db.get("int8", math.nan) for reps in (self.reports, self.own) for rep in reps.values()]
        rows.append(("model output (logits)", *map(fmt, outs)))
        return ("SQNR (dB) of each int8 reference graph against the float model (vs FP32) and against its own weights in\n"
                "float (vs own: the quantization noise alone; QAT moves the weights, so the two differ)\n"
                + format_table(cols, rows))

    def to_json(self) -> dict:
        clean = lambda v: None if not math.isfinite(v) else v
        return {"format": "fxquant.improvement/2", "labels": list(self.reports),
                "columns": [f"{label} {kind}" for kind in ("vs FP32", "vs own") for label in self.reports],
                "rows": [[name, *map(clean, vals)] for name, *vals in self.rows()],
                "output_sqnr_db": {f"{label} {kind}": clean(rep.output_sqnr_db.get("int8", math.nan))
                                   for kind, reps in (("vs FP32", self.reports), ("vs own", self.own)) for label, rep in reps.items()},
                "overlays": self.overlays()}

    def overlays(self) -> list[dict]:
        return [viewer_overlay(f"sqnr_int8_db_{label}{suffix}", "higher", ((p.layer, p.sqnr_int8_db) for p in rep.points))
                for suffix, reps in (("", self.reports), ("_own", self.own)) for label, rep in reps.items()]

    def save(self, stem: str) -> list[str]:
        """STEM.json, STEM.<overlay>.json, STEM.png and STEM.svg (SQNR per layer, one line per model and reference)."""
        paths = write_report(self.to_json(), self.overlays(), stem)
        lines = {**{f"{label} vs FP32": rep for label, rep in self.reports.items()},
                 **{f"{label} vs own weights": rep for label, rep in self.own.items()}}
        title = "what " + " -> ".join(self.reports) + " changed: int8 SQNR per layer"
        return paths + plot_sqnr(lines, stem, title=title)


def improvement(model: nn.Module, qmodels: dict, inputs) -> Improvement:
    """`compare` of each fake-quant model in `qmodels` (label -> qmodel, e.g. {"PTQ": ptq, "QAT": qat}) through its
    reference int8 graph (convert) on one batch `inputs`, against the float `model` and against its own weights:
    "what QAT improved"."""
    from fxquant.api import convert

    if not qmodels:
        raise FxQuantError("improvement: qmodels is empty; pass {label: fake-quant model}")
    int8 = {label: convert(q) for label, q in qmodels.items()}
    return Improvement({label: compare(model, q, int8[label], None, inputs) for label, q in qmodels.items()},
                       {label: compare(model, q, int8[label], None, inputs, reference="own") for label, q in qmodels.items()})
