"""fxquant.sensitivity: which layers quantization hurts, measured by sweeps and estimated from one backward pass.

    rep = fxquant.sensitivity(model, [(x, y), ...], w_bits=4, a_bits=4)   # PTQ at W4A4, calibrated on the x's
    print(rep)                  # ranked table
    rep.save("out/sens")        # out/sens.json (with the viewer overlay), out/sens.png, out/sens.svg

A *layer* is a module that `quantize(..., exclude=[name], layer_bits={name: (w, a)})` acts on: a module
node claimed by a quantize row that owns a weight or reads an activation (conv, linear, avgpool...). It
owns the fake-quants `layer_bits` sets: its weight's, those of the activations it reads (through
shared-qparam ops such as maxpool), and its output's when nothing quantized reads it (the logits).
Layers that read one activation (a residual block's conv1 and its 1x1 shortcut) share that fake-quant,
so they form one *unit*: `layer_bits` requires them to take the same activation width.

Every measurement toggles the fake-quants of ONE calibrated fake-quant model (`FakeQuantize.enabled`);
the ranges come from calibration with every fake-quant off (float activations), so they are the
same whichever subset is on. Per layer (AIMET QuantAnalyzer's per-layer sweeps):
    only_*   the metric with only this layer's fake-quants on (w: its weight; a: its activations; wa: both);
             only_wa_loss and only_wa_kl: the mean loss, and KL(float outputs || these outputs) (mean_kl)
    float_*  the metric with every fake-quant on but this layer's
    local_sqnr_db        10 log10(sum y^2 / sum (y - y_q)^2), y the layer's float output, y_q its output with
                         its own fake-quants on and float inputs (its own noise; PPQ's "layerwise error")
    accumulated_sqnr_db  the same with y_q the layer's output in the fully quantized model (all upstream
                         noise included; PPQ's "graphwise error")
    grad_score           1/2 * sum over samples and elements of g^2 (y_q - y)^2 / N, g = d loss_i / d y from one
                         backward pass of the float model with per-sample losses (the diagonal-Fisher, second-order
                         estimate of the mean loss increase, nats per sample; the score NVIDIA ModelOpt's
                         auto_quantize ranks by). Needs one forward and one backward per batch for all layers.
`spearman` reports how well grad_score ranks the layers against the measured sweep with only that layer
quantized (metric drop, loss increase, and KL(float outputs || those outputs)), Spearman's rho
(scipy.stats.spearmanr).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.errors import FxQuantError
from fxquant.meta import KEY, info, qparams_source
from fxquant.nn import FakeQuantize
from fxquant.report_files import format_table, json_number, pyplot, save_figure, sqnr_db, viewer_overlay, write_report

# ---------------------------------------------------------------- data and metric


def top1_percent(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The default metric: top-1 accuracy in percent (0..100) of outputs (N, classes) against targets (N,) int64."""
    return 100.0 * (outputs.argmax(-1) == targets).sum().item() / len(targets)


def sum_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The default loss of the gradient score: cross-entropy summed over the batch (nats), so d loss / d y is
    each sample's own gradient."""
    return F.cross_entropy(outputs, targets, reduction="sum")


@dataclass(frozen=True)
class Batch:
    inputs: tuple  # the model's positional inputs
    targets: object  # whatever the metric takes (a tensor of class indices by default)


def as_batches(data, name: str = "data") -> list[Batch]:
    """`data` (an iterable of (inputs, targets); inputs a tensor or a tuple of tensors) as a list of Batch."""
    if data is None or isinstance(data, torch.Tensor):
        raise FxQuantError(f"{name}: expected an iterable of (inputs, targets) batches, got "
                           f"{type(data).__name__}; e.g. [(x, y) for x, y in loader]")
    out = []
    for i, batch in enumerate(data):
        if isinstance(batch, Batch):
            out.append(batch)
            continue
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise FxQuantError(f"{name} batch {i} is a {type(batch).__name__}, not an (inputs, targets) pair: "
                               "sensitivity needs targets for its metric; pass [(x, y), ...]")
        inputs = batch[0] if isinstance(batch[0], (tuple, list)) else (batch[0],)
        if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
            raise FxQuantError(f"{name} batch {i}: the inputs must be a tensor or a tuple of tensors")
        if batch[-1] is None:
            raise FxQuantError(f"{name} batch {i} has targets None: the metric needs them")
        out.append(Batch(tuple(inputs), batch[-1]))
    if not out:
        raise FxQuantError(f"{name} is empty: pass at least one (inputs, targets) batch")
    return out


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _cat(values):
    return torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for vs in values for v in vs]


def check_callable(name: str, fn) -> None:
    """`fn` is None (the default) or a function (outputs, targets) -> number."""
    if fn is not None and not callable(fn):
        raise FxQuantError(f"{name}={fn!r}: expected None (the default) or a function (outputs, targets) -> number")


def _number(value, what: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FxQuantError(f"{what} returned {value!r}: expected a finite number (a float); "
                           "check the metric on the float model's outputs")
    return float(value)


@torch.no_grad()
def outputs_of(model: nn.Module, batches: list[Batch]) -> torch.Tensor:
    """The model's (first) output on every batch, concatenated along dim 0."""
    return torch.cat([_first(model(*b.inputs)) for b in batches])


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch], metric=None, loss=None, outputs=None) -> tuple[float, float | None]:
    """(metric over all batches at once, mean loss per sample or None): outputs and targets are concatenated
    before `metric(outputs, targets) -> float` is called, so any metric (F1, mAP...) is exact, not averaged.
    `outputs` (from outputs_of) saves running the model again."""
    metric = metric or top1_percent
    outputs = outputs_of(model, batches) if outputs is None else outputs
    targets = _cat([b.targets for b in batches])
    value = _number(metric(outputs, targets), "metric")
    mean_loss = None
    if loss is not None:
        mean_loss = _number(loss(outputs, targets), "loss") / len(outputs)
    return value, mean_loss


def mean_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over rows of KL(softmax(reference) || softmax(other)) in nats: >= 0, label-free, and to second order
    the Fisher-weighted distortion (1/2 d^T F d) that the gradient score estimates. Rows: outputs (N, classes)."""
    p_log, q_log = F.log_softmax(reference.double(), -1), F.log_softmax(other.double(), -1)
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


# ---------------------------------------------------------------- layers and the fake-quants they own


@dataclass(frozen=True)
class Layer:
    """A quantizable layer: the name `exclude=` / `layer_bits=` take, its fx node names (what compare and the
    graph viewer key on), its parameter count, and the FakeQuantize module names it owns (see the module doc)."""

    name: str
    nodes: tuple[str, ...]
    params: int
    weight_fqs: tuple[str, ...]
    act_fqs: tuple[str, ...]

    @property
    def fqs(self) -> tuple[str, ...]:
        return self.weight_fqs + self.act_fqs


def _fq_name(gm: fx.GraphModule, node: fx.Node | None) -> str | None:
    return node.target if node is not None and node.op == "call_module" else None


def quantizable_layers(qmodel: fx.GraphModule) -> list[Layer]:
    """The layers of a fake-quant GraphModule from `fxquant.quantize`, in graph order."""
    found: dict[str, dict] = {}
    for node in qmodel.graph.nodes:
        if node.op != "call_module" or KEY not in node.meta or info(node).kind != "quantize":
            continue
        module, meta = qmodel.get_submodule(node.target), info(node)
        weight_fq = getattr(module, "weight_fq", None)
        acts = [_fq_name(qmodel, qparams_source(qmodel, node.args[i])) for i in meta.inputs if i < len(node.args)]
        fq_users = [u for u in node.users if u.op == "call_module" and isinstance(qmodel.get_submodule(u.target), FakeQuantize)]
        for fq in fq_users:  # the output's fake-quant is the layer's when no quantized op reads it (annotate's rule)
            if not any(KEY in u.meta and info(u).rule for u in fq.users):
                acts.append(fq.target)
        if weight_fq is None and not acts:
            continue
        entry = found.setdefault(node.target, {"nodes": [], "w": [], "a": [], "params": 0})
        entry["nodes"].append(node.name)
        if weight_fq is not None and f"{node.target}.weight_fq" not in entry["w"]:
            entry["w"].append(f"{node.target}.weight_fq")
            entry["params"] = sum(p.numel() for n, p in module.named_parameters() if "fq" not in n)
        entry["a"] += [a for a in acts if a is not None and a not in entry["a"]]
    return [Layer(name, tuple(e["nodes"]), e["params"], tuple(e["w"]), tuple(e["a"])) for name, e in found.items()]


def units(layers: list[Layer]) -> list[tuple[Layer, ...]]:
    """Layers grouped so that layers sharing an activation fake-quant are in one group (union-find), graph order."""
    parent = list(range(len(layers)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, layer in enumerate(layers):
        for fq in layer.act_fqs:
            if fq in owner:
                parent[root(i)] = root(owner[fq])
            owner.setdefault(fq, i)
    groups: dict[int, list[Layer]] = {}
    for i, layer in enumerate(layers):
        groups.setdefault(root(i), []).append(layer)
    return [tuple(g) for g in groups.values()]


def all_fqs(qmodel: nn.Module) -> list[str]:
    return [name for name, m in qmodel.named_modules() if isinstance(m, FakeQuantize)]


class only:
    """Context: only the named FakeQuantize modules of `qmodel` are enabled; the flags are restored after."""

    def __init__(self, qmodel: nn.Module, names):
        self.modules = {n: m for n, m in qmodel.named_modules() if isinstance(m, FakeQuantize)}
        self.names = set(names)

    def __enter__(self):
        self.saved = {n: m.enabled for n, m in self.modules.items()}
        for n, m in self.modules.items():
            m.enabled = n in self.names

    def __exit__(self, *exc):
        for n, m in self.modules.items():
            m.enabled = self.saved[n]


# ---------------------------------------------------------------- local / accumulated error and the gradient score


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps each layer node's output; with `local`, also the node's output recomputed from
    the same (float) inputs with only its own fake-quants on."""

    def __init__(self, gm, layers: list[Layer], local: bool):
        super().__init__(gm)
        self.by_node = {n: layer for layer in layers for n in layer.nodes}
        self.local = local
        self.outputs: dict[str, torch.Tensor] = {}
        self.local_outputs: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        value = super().run_node(n)
        layer = self.by_node.get(n.name)
        if layer is not None and isinstance(value, torch.Tensor):
            if value.requires_grad:
                value.retain_grad()
            self.outputs[n.name] = value
            if self.local:
                with torch.no_grad(), only(self.module, layer.fqs):
                    args = [self._quantized_arg(n, i, a) for i, a in enumerate(self.map_nodes_to_values(n.args, n))]
                    y_q = self.module.get_submodule(n.target)(*args, **self.map_nodes_to_values(n.kwargs, n))
                    for fq in n.users:
                        if fq.op == "call_module" and fq.target in layer.act_fqs:
                            y_q = self.module.get_submodule(fq.target)(y_q)
                self.local_outputs[n.name] = y_q
        return value

    def _quantized_arg(self, n, i, value):
        if i not in info(n).inputs or not isinstance(value, torch.Tensor):
            return value
        src = qparams_source(self.module, n.args[i])
        return value if src is None else self.module.get_submodule(src.target)(value)


@dataclass
class _Errors:
    signal: dict = field(default_factory=dict)
    local_noise: dict = field(default_factory=dict)
    acc_noise: dict = field(default_factory=dict)
    grad: dict = field(default_factory=dict)

    def add(self, d: dict, key: str, value: float):
        d[key] = d.get(key, 0.0) + value


def layer_errors(qmodel: fx.GraphModule, layers: list[Layer], batches: list[Batch], loss=None, progress=False):
    """Per layer node: (local SQNR dB, accumulated SQNR dB, gradient score); see the module docstring.

    The float run is `qmodel` with every fake-quant off; the quantized run has every fake-quant on.
    """
    from tqdm.auto import tqdm

    loss = loss or sum_cross_entropy
    e, n_samples = _Errors(), 0
    every = all_fqs(qmodel)
    qmodel.eval()
    for b in tqdm(batches, desc="layer errors", leave=False, disable=not progress):
        with only(qmodel, ()):
            rec = _Recorder(qmodel, layers, local=True)
            with torch.enable_grad():
                inputs = [t.detach().requires_grad_(True) if t.is_floating_point() else t for t in b.inputs]
                out = _first(rec.run(*inputs))
                value = loss(out, b.targets)
                _number(value.detach(), "loss")
                value.backward()
        with torch.no_grad(), only(qmodel, every):
            acc = _Recorder(qmodel, layers, local=False)
            acc.run(*b.inputs)
        n_samples += len(out)
        for name, y in rec.outputs.items():
            y = y.detach()
            e.add(e.signal, name, float((y.double() ** 2).sum()))
            e.add(e.local_noise, name, float(((rec.local_outputs[name].double() - y) ** 2).sum()))
            e.add(e.acc_noise, name, float(((acc.outputs[name].double() - y) ** 2).sum()))
            g = rec.outputs[name].grad
            dy = rec.local_outputs[name].double() - y
            e.add(e.grad, name, 0.0 if g is None else float((g.double() ** 2 * dy ** 2).sum()))
        qmodel.zero_grad(set_to_none=True)
    return {name: (sqnr_db(e.signal[name], e.local_noise[name]), sqnr_db(e.signal[name], e.acc_noise[name]),
                   0.5 * e.grad[name] / n_samples) for name in e.signal}


# ---------------------------------------------------------------- the report


@dataclass
class LayerSensitivity:
    """One layer's row. Metric values are in the metric's units (top-1 %, by default); losses in nats/sample."""

    name: str
    nodes: tuple[str, ...]
    unit: str  # the first layer of its unit (layers sharing an activation fake-quant)
    params: int
    only_w: float
    only_a: float
    only_wa: float
    float_w: float
    float_a: float
    float_wa: float
    only_wa_loss: float  # mean loss with only this layer quantized
    only_wa_kl: float  # mean KL(float outputs || outputs with only this layer quantized), nats (mean_kl)
    local_sqnr_db: float
    accumulated_sqnr_db: float
    grad_score: float

    def drop(self, reference: float) -> float:
        """How much quantizing only this layer costs: reference (float metric) - only_wa."""
        return reference - self.only_wa


@dataclass
class SensitivityReport:
    """fxquant.sensitivity's result. `layers` in graph order; `ranked()` most harmful first."""

    layers: list[LayerSensitivity]
    float_metric: float
    quantized_metric: float  # every fake-quant on
    float_loss: float
    w_bits: int
    a_bits: int
    spearman: dict  # {"drop": rho, "loss": rho}: grad_score vs the measured only_wa sweep
    rest_fqs: tuple[str, ...] = ()  # fake-quants no layer owns (a residual add's inputs...)
    options: dict = field(default_factory=dict)

    def ranked(self) -> list[LayerSensitivity]:
        """Most sensitive first: by the metric drop with only that layer quantized, ties (one test sample is a
        whole step of top-1) by the KL of the outputs from float."""
        return sorted(self.layers, key=lambda r: (r.only_wa, -r.only_wa_kl))

    def overlays(self) -> list[dict]:
        """The graph viewer's overlays (`fxquant viz --overlay`): {"name", "better", "values": {node name: number}}, one
        per metric. Node names are the fx node names the fake-quant, the int8 graph and the ONNX file share."""
        per_node = [
            ("local_sqnr_db", "higher", lambda r: r.local_sqnr_db),
            ("accumulated_sqnr_db", "higher", lambda r: r.accumulated_sqnr_db),
            ("grad_score", "lower", lambda r: r.grad_score),
            ("drop_only_quantized", "lower", lambda r: self.float_metric - r.only_wa),
            ("gain_left_float", "lower", lambda r: r.float_wa - self.quantized_metric),
        ]
        return [viewer_overlay(key, better, ((node, fn(r)) for r in self.layers for node in r.nodes)) for key, better, fn in per_node]

    def to_json(self) -> dict:
        return {
            "format": "fxquant.sensitivity/1",
            "w_bits": self.w_bits, "a_bits": self.a_bits,
            "float_metric": self.float_metric, "quantized_metric": self.quantized_metric, "float_loss": self.float_loss,
            "spearman": self.spearman, "rest_fqs": list(self.rest_fqs), "options": self.options,
            "layers": [{k: json_number(v) if isinstance(v, float) else v for k, v in asdict(r).items()} for r in self.ranked()],
            "overlays": self.overlays(),
        }

    def __str__(self) -> str:
        head = (f"sensitivity at W{self.w_bits}A{self.a_bits}: float {self.float_metric:.2f}, all quantized "
                f"{self.quantized_metric:.2f}; grad score vs measured: Spearman rho {self.spearman['drop']:+.2f} "
                f"(metric drop), {self.spearman['loss']:+.2f} (loss increase), {self.spearman['kl']:+.2f} (KL)")
        cols = ("layer", "params", "only w", "only a", "only wa", "float w", "float a", "float wa", "local dB", "accum dB", "grad score")
        rows = [(r.name, str(r.params), *(f"{v:.2f}" for v in (r.only_w, r.only_a, r.only_wa, r.float_w, r.float_a, r.float_wa)),
                 f"{r.local_sqnr_db:.1f}", f"{r.accumulated_sqnr_db:.1f}", f"{r.grad_score:.2e}") for r in self.ranked()]
        return head + "\n" + format_table(cols, rows)

    def save(self, stem: str) -> list[str]:
        """Write STEM.json, one STEM.<metric>.json per overlay, STEM.png and STEM.svg; returns the paths."""
        return write_report(self.to_json(), self.overlays(), stem) + plot_sensitivity(self, stem)


def plot_sensitivity(rep: SensitivityReport, stem: str) -> list[str]:
    """Two panels, graph order: the metric drop with only / all but each layer quantized, and local vs accumulated SQNR."""
    plt = pyplot()
    names = [r.name for r in rep.layers]
    x = range(len(names))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.55 * len(names) + 2), 7), sharex=True)
    top.bar([i - 0.2 for i in x], [rep.float_metric - r.only_wa for r in rep.layers], 0.4, label="only this layer quantized: drop")
    top.bar([i + 0.2 for i in x], [r.float_wa - rep.quantized_metric for r in rep.layers], 0.4, label="only this layer float: gain")
    top.axhline(0, color="black", linewidth=0.5)
    top.set_ylabel("metric points")
    top.set_title(f"W{rep.w_bits}A{rep.a_bits}: float {rep.float_metric:.2f}, all quantized {rep.quantized_metric:.2f}")
    top.legend(fontsize=8)
    finite = lambda v: v if math.isfinite(v) else float("nan")
    bottom.plot(list(x), [finite(r.local_sqnr_db) for r in rep.layers], "o-", label="local (own noise, float inputs)")
    bottom.plot(list(x), [finite(r.accumulated_sqnr_db) for r in rep.layers], "s-", label="accumulated (float vs quantized model)")
    bottom.set_ylabel("SQNR (dB)")
    bottom.set_xticks(list(x), names, rotation=60, ha="right", fontsize=8)
    bottom.legend(fontsize=8)
    return save_figure(fig, stem)


# ---------------------------------------------------------------- the entry point


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")  # no ranking to compare (fewer than 3 layers, or all tied)
    return float(spearmanr(a, b).statistic)


def prepare(model: nn.Module, data, *, calib_batches: int = 8, progress: bool = False, calib_data=None, **quantize_options):
    """(batches, calibrated fake-quant model, its layers) for `data`; calib_data defaults to the inputs of the
    first `calib_batches` batches."""
    from fxquant.api import quantize

    batches = as_batches(data)
    calib = calib_data if calib_data is not None else [b.inputs for b in batches[:calib_batches]]
    qmodel = quantize(model, batches[0].inputs, calib_data=calib, progress=progress, **quantize_options)
    qmodel.eval()
    layers = quantizable_layers(qmodel)
    if not layers:
        raise FxQuantError("the model has no quantizable layer (no module the backend's quantize rows claim: conv, "
                           "linear, pooling...); check exclude= and that the model has such modules")
    return batches, qmodel, layers


def sensitivity(model: nn.Module, data, *, metric=None, loss=None, calib_data=None, progress: bool = True,
                **quantize_options) -> SensitivityReport:
    """Per-layer sensitivity of `model` to quantization (see the module docstring for every column).

    data: an iterable of (inputs, targets); inputs a tensor (N, ...) or a tuple of them. It is read into memory.
    metric(outputs, targets) -> float over all batches at once; default top-1 accuracy in percent.
    loss(outputs, targets) -> scalar tensor summed over the batch; default cross-entropy (for grad_score).
    calib_data: batches of inputs for calibration; default the inputs of the first 8 batches of `data`.
    quantize_options: as fxquant.quantize (w_bits, a_bits, backend, observer, reduce_range, exclude...).
    Cost: 6 evaluations of `data` per layer plus one forward/backward pass; a sweep's result is exact for the
    model it toggles, the grad score a first estimate.
    """
    from tqdm.auto import tqdm

    check_callable("metric", metric)
    check_callable("loss", loss)
    loss = loss or sum_cross_entropy
    batches, qmodel, layers = prepare(model, data, progress=progress, calib_data=calib_data, **quantize_options)
    every = all_fqs(qmodel)
    groups = units(layers)
    unit_of = {layer.name: g[0].name for g in groups for layer in g}

    def run(names, keep=False):
        with only(qmodel, names):
            out = outputs_of(qmodel, batches)
        value = evaluate(qmodel, batches, metric, loss, outputs=out)
        return (*value, out) if keep else value

    float_metric, float_loss, float_out = run((), keep=True)
    quantized_metric, _ = run(every)
    errors = layer_errors(qmodel, layers, batches, loss)
    rows = []
    for layer in tqdm(layers, desc="sensitivity", unit="layer", disable=not progress):
        rest = lambda owned: [n for n in every if n not in owned]
        only_wa, only_wa_loss, out = run(layer.fqs, keep=True)
        node = layer.nodes[0]
        local, acc, grad = errors[node]
        rows.append(LayerSensitivity(
            layer.name, layer.nodes, unit_of[layer.name], layer.params,
            only_w=run(layer.weight_fqs)[0], only_a=run(layer.act_fqs)[0], only_wa=only_wa,
            float_w=run(rest(layer.weight_fqs))[0], float_a=run(rest(layer.act_fqs))[0], float_wa=run(rest(layer.fqs))[0],
            only_wa_loss=only_wa_loss, only_wa_kl=mean_kl(float_out, out), local_sqnr_db=local, accumulated_sqnr_db=acc,
            grad_score=sum(errors[n][2] for n in layer.nodes)))
    owned = {fq for layer in layers for fq in layer.fqs}
    w_bits, a_bits = quantize_options.get("w_bits", 8), quantize_options.get("a_bits", 8)
    spearman = {
        "drop": _spearman([r.grad_score for r in rows], [float_metric - r.only_wa for r in rows]),
        "loss": _spearman([r.grad_score for r in rows], [r.only_wa_loss - float_loss for r in rows]),
        "kl": _spearman([r.grad_score for r in rows], [r.only_wa_kl for r in rows]),
    }
    options = {k: v for k, v in quantize_options.items() if isinstance(v, (int, float, str, bool))}
    return SensitivityReport(rows, float_metric, quantized_metric, float_loss, w_bits, a_bits, spearman,
                             tuple(n for n in every if n not in owned), options)
