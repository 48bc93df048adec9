"""Backends are tables of `Rule` rows; `load_backend` checks a table once when it is loaded."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from fxquant.errors import FxQuantError
from fxquant.specs import QuantSpec

BACKENDS = ("onnxruntime", "tensorrt")
BACKEND_META = "fxquant_backend"  # GraphModule.meta key: the Backend a model was quantized for

QUANTIZE = "quantize"  # inputs and output quantized: the op runs as an integer kernel
SHARE = "share"  # output carries the input's qparams (the op moves or picks values)
SHARE_INPUTS = "share_inputs"  # every input and the output on ONE set of qparams (cat: a copy, no requantize)
FLOAT = "float"  # stays float between DQ and Q, by rule
KINDS = (QUANTIZE, SHARE, SHARE_INPUTS, FLOAT)


@dataclass(frozen=True)
class Rule:
    """One row: a producer->consumer chain of op keys and how the chain is quantized.

    pattern: one tuple of op keys (module types, functions, method names) per chain step.
    inputs: positional args of the first node that are quantized activations.
    weight: the first node's module has a weight to fake-quantize (per-channel, axis 0).
    output: the chain's output gets its own fake-quant (False: the next op's input rule decides).
    check: optional `(module_or_None, node) -> bool`; a row whose check says False declines.
    onnx: the ONNX op types the chain's first node exports to; `fxquant.onnx.check` reads the
        exported file through this column, so one table drives both placement and checking.
    spec: the activation spec of this row when it differs from the backend's ACTIVATION.
    onnx_chain: the ONNX op types the chain's later steps export to, in order, for a row whose first
        node's output stays float inside the chain (attention: MatMul -> Softmax, no Q/DQ between);
        the checker reads a first node followed by exactly these ops with this row and wants the
        output QuantizeLinear after the last of them.
    pair_sums: the row's weight reaches an integer GEMM that adds pairs of activation x weight products
        in a narrow accumulator on some CPUs (see `Target`): True, or `(groups, in_channels,
        out_channels) -> bool` for a conv whose kernel depends on its grouping. Read from the FX module
        by annotate_quant and from the ONNX Conv's group attribute and weight shape by fxquant.onnx.check.
    """

    name: str
    pattern: tuple[tuple, ...]
    kind: str
    inputs: tuple[int, ...] = (0,)
    weight: bool = False
    output: bool = True
    check: Callable | None = None
    onnx: tuple[str, ...] = ()
    spec: QuantSpec | None = None
    onnx_chain: tuple[str, ...] = ()
    pair_sums: bool | Callable = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise FxQuantError(f"rule {self.name!r}: kind={self.kind!r}, expected one of {KINDS}")
        if not self.pattern or not all(isinstance(step, tuple) and step for step in self.pattern):
            raise FxQuantError(f"rule {self.name!r}: pattern must be a non-empty tuple of non-empty tuples")
        if not isinstance(self.onnx, tuple) or not all(isinstance(t, str) and t for t in self.onnx):
            raise FxQuantError(f"rule {self.name!r}: onnx={self.onnx!r}, expected a tuple of ONNX op type names")
        if self.spec is not None and (not isinstance(self.spec, QuantSpec) or self.kind in (SHARE, FLOAT)):
            raise FxQuantError(f"rule {self.name!r}: spec= needs a QuantSpec on a quantize or share_inputs row")
        if not (isinstance(self.pair_sums, bool) or callable(self.pair_sums)) or (self.pair_sums and not self.weight):
            raise FxQuantError(f"rule {self.name!r}: pair_sums={self.pair_sums!r}, expected a bool or a check "
                               "(groups, in_channels, out_channels) -> bool on a row with weight=True")
        if self.onnx_chain and (not isinstance(self.onnx_chain, tuple) or not all(isinstance(t, str) and t for t in self.onnx_chain) or not self.onnx
                                or len(self.onnx_chain) != len(self.pattern) - 1 or self.kind != QUANTIZE):
            raise FxQuantError(f"rule {self.name!r}: onnx_chain={self.onnx_chain!r}, expected one ONNX op type per "
                               f"pattern step after the first ({len(self.pattern) - 1}) on a quantize row with onnx=")


@dataclass(frozen=True)
class Target:
    """A deployment target: the CPUs (or accelerators) a file is meant to run on, and the largest
    |a1*w1 + a2*w2| that the narrowest integer GEMM kernel among them adds exactly.

    pair_sum_max: None where every kernel accumulates in int32 (VNNI's vpdpbusd, ARM's sdot/udot,
        TensorRT's DP4A/IMMA). 32767 where a kernel adds two u8*s8 products in saturating int16
        (x86 vpmaddubsw: ONNX Runtime's MLAS on AVX2, AVX-512 without VNNI and SSE4); then a row with
        `pair_sums` gets weights narrow enough that 2 * (activation span) * max|w| <= pair_sum_max.
    """

    name: str
    pair_sum_max: int | None
    doc: str = ""

    def max_weight(self, activation: QuantSpec) -> int | None:
        """The largest |w| a pair_sums row may store when it reads `activation` (None: no limit). The
        activation's whole storage span counts (qmax - qmin): a kernel multiplies raw codes, and an
        int8 activation is shifted to uint8 before a u8 x s8 kernel."""
        return self.max_weight_for_span(activation.qmax - activation.qmin)

    def max_weight_for_span(self, span: int) -> int | None:
        """The largest |w| with 2 * span * |w| <= pair_sum_max, for activation codes spanning `span` (None: no limit)."""
        return None if self.pair_sum_max is None else self.pair_sum_max // (2 * span)

    def safe_weight(self, weight: QuantSpec, activation: QuantSpec) -> QuantSpec:
        """`weight` narrowed, a bit at a time, until max|w| <= max_weight(activation); unchanged if it fits."""
        limit = self.max_weight(activation)
        while limit is not None and weight.qmax > limit and weight.bits > 2:
            weight = weight.with_bits(weight.bits - 1)
        return weight


@dataclass(frozen=True)
class Backend:
    """A backend module defines RULES, ACTIVATION and WEIGHT (the 8-bit specs; bit widths narrow them),
    BIAS (the int32 bias spec, or None: bias stays float), FOLDED (ONNX activations the runtime fuses
    into the quantized op before them) and optionally REDUCED_WEIGHT_BITS (see `reduce_range`)."""

    name: str
    rules: tuple[Rule, ...]
    activation: QuantSpec
    weight: QuantSpec
    bias: QuantSpec | None = None
    folded: tuple[str, ...] = ()
    reduce_range: bool = False  # weights narrowed to the table's REDUCED_WEIGHT_BITS
    target: Target = Target("any", None)  # the deployment target (the table's TARGETS; the first is the default)

    def spec_of(self, rule: Rule) -> QuantSpec:
        return rule.spec or self.activation

    def rule(self, name: str) -> Rule:
        return next(r for r in self.rules if r.name == name)

    def __reduce_ex__(self, protocol):
        """A shipped backend pickles by name (its rows hold functions pickle cannot name, such as
        F.max_pool2d), so a quantized GraphModule carrying it in .meta stays picklable."""
        if self.name in BACKENDS:
            return _backend_by_name, (self.name, self.reduce_range, self.target.name)
        return super().__reduce_ex__(protocol)


def exposed_to_pair_sums(rule: Rule, groups: int, in_channels: int, out_channels: int) -> bool:
    """Whether `rule`'s op, with this grouping (1, in, out for a linear), reaches a pair-summing GEMM."""
    return rule.pair_sums(groups, in_channels, out_channels) if callable(rule.pair_sums) else bool(rule.pair_sums)


# row checks shared by tables: `(module_or_None, node) -> bool`

SENTINEL = 1e6  # |x| at or above this: a mask's stand-in for -inf (finfo.min, -1e9), never a value to quantize
SENTINEL_GAP = 1e3  # ... when an activation's minimum is that far below and this many times its maximum's magnitude


def sentinel_operand(module, node) -> bool:
    """An op with a constant operand of |c| >= SENTINEL: an additive mask's arithmetic, e.g. HF 4.x BERT's
    `(1.0 - attention_mask) * torch.finfo(dtype).min`. Its output is 0 or the sentinel; quantized, its scale
    would round every other value to zero, so the row that matches it keeps it float."""
    return any(isinstance(a, (int, float)) and not isinstance(a, bool) and abs(a) >= SENTINEL
               for a in (*node.args, *node.kwargs.values()))


def global_pool(module, node) -> bool:
    """adaptive_avg_pool2d to 1x1: a mean over H, W (GlobalAveragePool)."""
    size = module.output_size if module is not None else node.args[1] if len(node.args) > 1 else node.kwargs["output_size"]
    return size in (1, (1, 1), [1, 1])


def inference_identity(module, node) -> bool:
    """stochastic_depth(x, p, mode, training) is x when traced with training=False (eval) or p == 0."""
    args = dict(zip(("input", "p", "mode", "training"), node.args), **node.kwargs)
    return not args.get("training", True) or args.get("p") == 0.0


def read_only_by(node, readers: tuple, through: tuple = ()) -> bool:
    """Every reader of `node`'s output, looking through the ops in `through` (ops that only move
    values), is one of `readers` (op keys); readers of its shape alone (dim, size) do not count.
    False for a value that leaves the graph."""
    from fxquant.meta import op_key

    gm, todo = node.graph.owning_module, [node]
    while todo:
        for user in todo.pop().users:
            key = op_key(gm, user)
            if _reads_shape_only(user):
                continue  # reads no values: x.dim(), x.size(), x.shape
            if key in through:
                todo.append(user)
            elif key not in readers:
                return False
    return True


def _reads_shape_only(user) -> bool:
    """x.size(), x.dim(), x.numel(), x.shape / x.ndim: a reader of the shape, not of the values (a reader whose
    output is merely not a tensor, like unbind's tuple, reads values)."""
    if user.op == "call_method":
        return user.target in ("size", "dim", "numel")
    return user.op == "call_function" and user.target is getattr and user.args[1] in ("shape", "ndim", "dtype", "device")


def _name(key) -> str:
    return getattr(key, "__name__", str(key))


def _check_one_kind(name: str, rules, keys_of) -> None:
    """Each key (an op key or an ONNX op type) belongs to rows of one kind and one spec."""
    seen = {}
    for rule in rules:
        for key in keys_of(rule):
            other = seen.setdefault(key, rule)
            if other.kind != rule.kind:
                raise FxQuantError(
                    f"backend {name!r}: op {_name(key)!r} is {other.kind!r} in row {other.name!r} and {rule.kind!r} in row {rule.name!r}"
                )
            if other.spec != rule.spec:
                raise FxQuantError(f"backend {name!r}: op {_name(key)!r} has two specs, in rows {other.name!r} and {rule.name!r}")


def _check_shared_group(name: str, rules, activation: QuantSpec | None) -> None:
    """share_inputs rows merge the fake-quants of whatever quantized rows feed them: one spec for all."""
    if activation is None or not any(r.kind == SHARE_INPUTS for r in rules):
        return
    producers = [r for r in rules if r.kind == SHARE_INPUTS or (r.kind == QUANTIZE and r.output)]
    first = producers[0]
    for rule in producers[1:]:
        if (rule.spec or activation) != (first.spec or activation):
            raise FxQuantError(
                f"backend {name!r}: rows {first.name!r} and {rule.name!r} can feed one shared-qparam group "
                f"(share_inputs) with different specs; give them one spec"
            )


def check_rules(name: str, rules: tuple[Rule, ...], activation: QuantSpec | None = None) -> None:
    """Reject a table with a contradiction, naming the rows: an op claimed alone, unconditionally, by
    rows of different kinds or specs; an ONNX op type read as two kinds (the checker could not tell
    them apart); rows that feed one shared-qparam group with different specs."""
    _check_one_kind(name, rules, lambda r: r.pattern[0] if len(r.pattern) == 1 and r.check is None else ())
    _check_one_kind(name, rules, lambda r: r.onnx)
    _check_shared_group(name, rules, activation)


def _backend_by_name(name: str, reduce_range: bool, target: str | None = None) -> Backend:
    return load_backend(name, reduce_range=reduce_range, target=target)


def load_backend(name, *, reduce_range: bool = False, target: str | None = None) -> Backend:
    """The backend `name` (a Backend passes through), checked once; `reduce_range` needs REDUCED_WEIGHT_BITS;
    `target` names one of the table's TARGETS (None: its first, the default)."""
    if isinstance(name, Backend):
        if (name.reduce_range or not reduce_range) and target in (None, name.target.name):
            return name
        reduce_range, target = reduce_range or name.reduce_range, target or name.target.name
        name = name.name
    if name not in BACKENDS:
        raise FxQuantError(f"backend={name!r}: expected one of {BACKENDS}")
    table = importlib.import_module(f"fxquant.backends.{name}")
    known = {t.name: t for t in table.TARGETS}
    if target is not None and target not in known:
        raise FxQuantError(f"target={target!r}: backend {name!r} deploys to one of {tuple(known)} "
                           + "; ".join(f"{t.name}: {t.doc}" for t in table.TARGETS))
    check_rules(name, table.RULES, table.ACTIVATION)
    weight = table.WEIGHT
    if reduce_range:
        bits = getattr(table, "REDUCED_WEIGHT_BITS", None)
        if bits is None:
            raise FxQuantError(f"reduce_range=True: backend {name!r} has no reduced-range weights; leave reduce_range=False")
        weight = weight.with_bits(bits)
    return Backend(name, table.RULES, table.ACTIVATION, weight, table.BIAS, table.FOLDED, bool(reduce_range),
                   known[target] if target is not None else table.TARGETS[0])
