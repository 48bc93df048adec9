"""fxquant.mixed_precision: a bit width per layer under a budget, solved as an integer program, then measured.

    plan = fxquant.mixed_precision(model, val_data, max_drop=0.5, w_bits=4, a_bits=4)
    qmodel = fxquant.quantize(model, example, calib_data=calib, **plan.quantize_options())
    print(plan)      # per layer: the choice, its measured single-unit drop; predicted vs measured metric

1. Costs, measured. For each width c in `bits` (w_bits = a_bits = c) one calibrated fake-quant model; per
   unit U (the layers that share an activation fake-quant, which layer_bits requires to agree; see
   fxquant.sensitivity) drop(U, c) = metric(float) - metric(only U's fake-quants on) and KL(U, c) (below), on
   `data`. The
   fake-quants no layer owns (a residual add's inputs) form one more unit, "rest", that cannot be float
   and takes its width from quantize's a_bits (every layer's own width is in layer_bits or exclude).
2. Choice, solved exactly (scipy.optimize.milp, HiGHS). Binary x[U, c] for c in bits + float, one per unit.
   Cost: the measured distortion of each choice, KL(float outputs || outputs with only that unit quantized)
   averaged over `data` (nats per sample; >= 0 and label-free), summed over units: additive to second order
   (1/2 d^T F d, F the Fisher information), the assumption of ModelOpt's auto_quantize and HAWQ. The top-1
   drops of single units are too coarse to add up (1 digit in 1,000 is 0.1 point) and a loss increase can be
   negative on a model that is not converged. Model size: sum params(U) * c * x[U, c],
   float = 32 bits. Ties are broken towards fewer bits per layer (a zero-parameter layer such as avgpool
   still prefers 2 to 8).
     avg_bits=B:  minimise the summed KL subject to size <= B * params (an average weight width)
     max_drop=D:  minimise size subject to summed KL <= L, where L is found by bisection (below)
3. Measured. Each plan is quantized through the public API (quantize(layer_bits=, exclude=), calibrate,
   convert) and its reference int8 graph evaluated on `data`. For max_drop, L is bisected geometrically over
   `rounds` solves: a plan within D of float on `data` raises L (fewer bits), one that is not lowers it; the
   smallest plan measured to meet the floor is returned, with every round in `rounds`. `predicted_metric` is
   float minus the sum of the chosen units' single-unit drops (what an additive model of the metric says).
   `holdout` data, when given, is measured last and never used to choose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fxquant.errors import FxQuantError
from fxquant.report_files import format_table
from fxquant.sensitivity import Batch, all_fqs, as_batches, check_callable, evaluate, mean_kl, only, outputs_of, prepare, units

FLOAT = 32  # the width a float layer counts as in the model size


@dataclass
class UnitChoice:
    layers: tuple[str, ...]
    params: int
    bits: int | None  # None: float (excluded)
    drops: dict  # {bits or "float": measured drop with only this unit quantized at that width}


@dataclass
class MixedPrecision:
    """The chosen widths, what the integer program predicted, and what quantizing that way measured."""

    units: list[UnitChoice]
    w_bits: int  # the base widths: of the fake-quants no layer owns (and the weights of any layer not listed)
    a_bits: int
    float_metric: float
    predicted_metric: float
    measured_metric: float  # the reference int8 graph on `data`
    holdout_float_metric: float | None = None
    holdout_metric: float | None = None  # the reference int8 graph on `holdout`
    predicted_loss: float = math.nan  # the summed KL of the chosen widths (nats per sample)
    rest_bits: int | None = None  # the width of the fake-quants no layer owns (quantize's a_bits); None: there are none
    rest_drops: dict = field(default_factory=dict)  # {width: measured drop with only those on}
    rounds: list = field(default_factory=list)  # per solve: allowed drop, predicted, measured
    budget: dict = field(default_factory=dict)

    @property
    def layer_bits(self) -> dict[str, tuple[int, int]]:
        return {name: (u.bits, u.bits) for u in self.units if u.bits is not None for name in u.layers}

    @property
    def exclude(self) -> list[str]:
        return [name for u in self.units if u.bits is None for name in u.layers]

    def quantize_options(self) -> dict:
        """Keyword arguments for fxquant.quantize that realise the plan."""
        return {"w_bits": self.w_bits, "a_bits": self.a_bits if self.rest_bits is None else self.rest_bits,
                "layer_bits": self.layer_bits, "exclude": self.exclude}

    @property
    def weight_bits(self) -> int:
        """Model size in bits: sum over layers of parameters x width (float: 32)."""
        return sum(u.params * (FLOAT if u.bits is None else u.bits) for u in self.units)

    @property
    def avg_weight_bits(self) -> float:
        params = sum(u.params for u in self.units)
        return self.weight_bits / params if params else float("nan")

    @property
    def below_8_fraction(self) -> float:
        """The fraction of layers quantized below 8 bits."""
        widths = [u.bits for u in self.units for _ in u.layers]
        return sum(b is not None and b < 8 for b in widths) / len(widths)

    def __str__(self) -> str:
        choices = sorted({k for u in self.units for k in u.drops}, key=lambda k: (k == "float", k if k != "float" else 0))
        rows = [(", ".join(u.layers), str(u.params), "float" if u.bits is None else str(u.bits),
                 *(f"{u.drops[k]:+.2f}" if k in u.drops else "" for k in choices)) for u in self.units]
        cols = ("unit (layers)", "params", "chosen", *(f"drop @{k}" for k in choices))
        lines = [format_table(cols, rows),
                 *([f"fake-quants no layer owns (residual add inputs...): {self.rest_bits} bits; measured drops "
                    + ", ".join(f"@{k} {v:+.2f}" for k, v in self.rest_drops.items())] if self.rest_bits else []),
                 f"float {self.float_metric:.2f}; predicted {self.predicted_metric:.2f} (sum of single-unit drops; "
                 f"summed KL {self.predicted_loss:.4f} nats); measured (int8 reference) {self.measured_metric:.2f}",
                 f"weights: {self.avg_weight_bits:.2f} bits on average (float = 32); "
                 f"{100 * self.below_8_fraction:.0f} % of layers below 8 bits"]
        if self.holdout_metric is not None:
            lines.append(f"held out: float {self.holdout_float_metric:.2f}, int8 reference {self.holdout_metric:.2f}")
        return "\n".join(lines)


def solve(harm: np.ndarray, params: np.ndarray, widths: list[int | None], *, max_harm: float | None = None,
          avg_bits: float | None = None, never_float=(), forbid=(), layers=None, min_narrow: int = 0) -> tuple[list[int], float]:
    """The integer program. harm (units, choices): the additive cost of each choice (a loss increase or a metric
    drop; negative values count as 0), params (units,), widths per choice (None: float). With max_harm: the
    smallest model whose summed harm is at most max_harm; with avg_bits: the least harm within that average
    width. Units in `never_float` (row indices) cannot take None; `forbid` lists earlier picks (choice index per
    unit) the solution must differ from; `layers` (units,) counts the layers of each unit, of which at least
    `min_narrow` must take a width below 8 bits. Returns (the choice index per unit, the summed harm).
    Raises FxQuantError when no assignment meets the budget."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if (max_harm is None) == (avg_bits is None):
        raise FxQuantError("solve: give exactly one budget, max_harm= or avg_bits=")
    n_units, n_choices = harm.shape
    bits = np.array([FLOAT if w is None else w for w in widths], dtype=float)
    size = (params[:, None] * bits[None, :]).ravel()  # bits of weights per (unit, choice)
    clipped = np.clip(harm, 0, None).ravel()
    tie = np.tile(bits, n_units) / (FLOAT * n_units + 1)  # < 1 in total: only breaks ties between equal sizes
    one_each = LinearConstraint(np.kron(np.eye(n_units), np.ones(n_choices)), 1, 1)
    if max_harm is not None:
        budget = LinearConstraint(clipped[None, :], -np.inf, max_harm)
        objective = size + tie + 1e-9 * clipped
    else:
        budget = LinearConstraint(size[None, :], -np.inf, avg_bits * params.sum())
        objective = clipped + 1e-9 * tie
    cuts = []
    for pick in forbid:  # sum of the picked x <= units - 1: at least one unit chooses otherwise
        row = np.zeros(n_units * n_choices)
        row[[u * n_choices + i for u, i in enumerate(pick)]] = 1
        cuts.append(LinearConstraint(row[None, :], -np.inf, n_units - 1))
    upper = np.ones((n_units, n_choices))
    if None in widths:
        upper[list(never_float), widths.index(None)] = 0
    if min_narrow:
        narrow = np.array([w is not None and w < 8 for w in widths], dtype=float)
        cuts.append(LinearConstraint(np.kron(np.asarray(layers, dtype=float), narrow)[None, :], min_narrow, np.inf))
    res = milp(objective, constraints=[one_each, budget, *cuts], integrality=np.ones_like(objective),
               bounds=Bounds(0, upper.ravel()))
    if res.x is None:
        what = f"a summed cost of at most {max_harm}" if max_harm is not None else f"an average of {avg_bits} weight bits"
        raise FxQuantError(f"mixed_precision: no choice of widths {widths} meets {what} ({res.message}); "
                           "allow float layers, wider widths, a higher base a_bits or a looser budget")
    pick = res.x.reshape(n_units, n_choices).argmax(1)
    return [int(i) for i in pick], float(sum(max(harm[u, i], 0.0) for u, i in enumerate(pick)))


def _meets(plan: MixedPrecision, max_drop: float | None) -> bool:
    return max_drop is None or plan.float_metric - plan.measured_metric <= max_drop


def measure(model: nn.Module, batches: list[Batch], calib, options: dict, metric=None) -> float:
    """The metric of the reference int8 graph of `model` quantized with `options` (calibrated on `calib`)."""
    from fxquant.api import convert, quantize

    qmodel = quantize(model, batches[0].inputs, calib_data=calib, progress=False, **options)
    return evaluate(convert(qmodel), batches, metric)[0]


def unit_costs(model, batches, calib, widths, *, metric=None, progress=False, **quantize_options):
    """The measured cost table: (units, {width: [(metric drop, KL) per unit] + [the rest's, when there is one]},
    float metric, the rest's fake-quant names). KL: mean KL(float outputs || outputs with only that unit
    quantized), nats per sample (fxquant.sensitivity.mean_kl)."""
    from tqdm.auto import tqdm

    table, groups, float_metric = {}, None, None
    for c in tqdm(widths, desc="unit sweep", unit="width", disable=not progress):
        _, qmodel, layers = prepare(model, batches, calib_data=calib, **{**quantize_options, "w_bits": c, "a_bits": c})
        groups = groups or units(layers)
        with only(qmodel, ()):
            reference = outputs_of(qmodel, batches)
        float_metric = evaluate(qmodel, batches, metric, outputs=reference)[0]
        owned = {fq for g in groups for layer in g for fq in layer.fqs}
        rest = [n for n in all_fqs(qmodel) if n not in owned]
        table[c] = []
        for fqs in [[fq for layer in g for fq in layer.fqs] for g in groups] + ([rest] if rest else []):
            with only(qmodel, fqs):
                out = outputs_of(qmodel, batches)
            table[c].append((float_metric - evaluate(qmodel, batches, metric, outputs=out)[0], mean_kl(reference, out)))
    return groups, table, float_metric, rest


def mixed_precision(model: nn.Module, data, *, max_drop: float | None = None, avg_bits: float | None = None,
                    bits=(2, 4, 8), allow_float: bool = True, w_bits: int = 8, a_bits: int = 8, metric=None,
                    narrow_fraction: float | None = None, calib_data=None, holdout=None, rounds: int = 8,
                    progress: bool = True, **quantize_options) -> MixedPrecision:
    """Choose a width per layer among `bits` (w = a) or float, under one budget; see the module docstring.

    data: (inputs, targets) batches the costs are measured on and the plan checked against (a validation split).
    max_drop: metric points below the float model allowed (floor = float - max_drop). avg_bits: the average
    weight width allowed, float layers counting 32. w_bits/a_bits: the base widths, also tried per layer.
    narrow_fraction: at least this fraction of the layers below 8 bits (a constraint of the program; the size
    objective alone keeps tiny layers such as a stem conv at 8 bits, where they cost almost nothing).
    rounds: solve-and-measure rounds of the bisection on the KL budget (max_drop). holdout: (inputs, targets)
    batches never used to choose, measured at the end.
    """
    from tqdm.auto import tqdm

    if (max_drop is None) == (avg_bits is None):
        raise FxQuantError("mixed_precision: give exactly one budget, max_drop= (metric points) or avg_bits=")
    check_callable("metric", metric)
    batches = as_batches(data)
    calib = calib_data if calib_data is not None else [b.inputs for b in batches[:8]]
    widths = sorted(set(bits) | {w_bits, a_bits})
    groups, table, float_metric, rest = unit_costs(model, batches, calib, widths, metric=metric, progress=progress,
                                                   **quantize_options)
    choices = [c for c in widths if c in bits or c == w_bits] + ([None] if allow_float else [])
    n_rows = len(groups) + bool(rest)
    drops = np.array([[table[c][u][0] if c is not None else 0.0 for c in choices] for u in range(n_rows)])
    losses = np.array([[table[c][u][1] if c is not None else 0.0 for c in choices] for u in range(n_rows)])
    params = np.array([sum(layer.params for layer in g) for g in groups] + [0] * bool(rest), dtype=float)
    never_float = [len(groups)] if rest else []
    n_layers = [len(g) for g in groups] + [0] * bool(rest)
    min_narrow = math.ceil(narrow_fraction * sum(n_layers) - 1e-9) if narrow_fraction else 0
    measured: dict[tuple, MixedPrecision] = {}

    def plan_for(budget: float | None, size_budget: float | None = avg_bits) -> MixedPrecision | None:
        try:
            pick, predicted_loss = solve(losses, params, choices, max_harm=budget, avg_bits=size_budget, never_float=never_float,
                                         layers=n_layers, min_narrow=min_narrow)
        except FxQuantError:
            return None  # nothing fits this KL budget
        if tuple(pick) in measured:
            return measured[tuple(pick)]
        plan = MixedPrecision(
            [UnitChoice(tuple(layer.name for layer in g), int(params[u]), choices[pick[u]],
                        {("float" if c is None else c): float(drops[u, j]) for j, c in enumerate(choices)})
             for u, g in enumerate(groups)],
            w_bits, a_bits, float_metric, float_metric - sum(max(drops[u, i], 0.0) for u, i in enumerate(pick)), math.nan,
            rest_bits=choices[pick[-1]] if rest else None,
            rest_drops={c: table[c][-1][0] for c in widths} if rest else {},
            budget={"max_drop": max_drop, "avg_bits": avg_bits, "bits": list(bits)})
        plan.predicted_loss = predicted_loss
        plan.measured_metric = measure(model, batches, calib, {**quantize_options, **plan.quantize_options()}, metric)
        measured[tuple(pick)] = plan
        history.append({"kl_budget": budget, "predicted_kl": predicted_loss, "predicted": plan.predicted_metric,
                        "measured": plan.measured_metric, "avg_weight_bits": plan.avg_weight_bits})
        return plan

    history: list = []
    if avg_bits is not None:
        best = plan_for(None)
        if best is None:
            raise FxQuantError(f"mixed_precision: no choice of widths {choices} fits an average of {avg_bits} weight bits; "
                               "allow narrower widths or a larger avg_bits")
    else:
        # bisect the KL budget (geometrically): a plan that meets the floor moves the budget up (fewer bits), one
        # that misses moves it down; the cheapest plan measured to meet the floor is kept
        positive = losses[losses > 0]
        hi = float(np.clip(losses, 0, None).max(1).sum()) if positive.size else 0.0
        lo = float(positive.min()) / 2 if positive.size else 0.0
        best = None
        for r in tqdm(range(max(1, rounds)), desc="solve and measure", disable=not progress, leave=False):
            budget = hi if r == 0 else math.sqrt(lo * hi)
            plan = plan_for(budget)
            if plan is None:  # no assignment fits so small a budget (with the narrow_fraction constraint): raise it
                lo = budget
            elif _meets(plan, max_drop):
                if best is None or plan.weight_bits < best.weight_bits:
                    best = plan
                lo = budget
                if r == 0:
                    break  # the cheapest assignment already meets it
            else:
                hi = budget
        if best is None:  # nothing measured met the floor: the least summed KL at any size (it misses the floor: see rounds)
            best = plan_for(None, size_budget=FLOAT)
    best.rounds = history
    if holdout is not None:
        held = as_batches(holdout, "holdout")
        best.holdout_float_metric = evaluate(model, held, metric)[0]
        best.holdout_metric = measure(model, held, calib, {**quantize_options, **best.quantize_options()}, metric)
    return best


def leave_k_float(model: nn.Module, data, ranking: list[str], *, max_drop: float, w_bits: int, a_bits: int,
                  metric=None, calib_data=None, **quantize_options) -> tuple[int, float, dict]:
    """The usual baseline: quantize everything at w_bits/a_bits but the k first layers of `ranking` (most
    sensitive first), the smallest k whose reference int8 graph is within `max_drop` of float on `data`.
    Returns (k, its metric, the quantize options)."""
    batches = as_batches(data)
    calib = calib_data if calib_data is not None else [b.inputs for b in batches[:8]]
    float_metric = evaluate(model, batches, metric)[0]
    for k in range(len(ranking) + 1):
        options = {**quantize_options, "w_bits": w_bits, "a_bits": a_bits, "exclude": list(ranking[:k])}
        value = measure(model, batches, calib, options, metric)
        if float_metric - value <= max_drop:
            return k, value, options
    return len(ranking), value, options


def weight_bits(model: nn.Module, layer_params: dict[str, int], options: dict) -> int:
    """Model size in bits of `options` (w_bits, layer_bits, exclude by name) over the layers in layer_params."""
    layer_bits, exclude = options.get("layer_bits") or {}, set(options.get("exclude") or ())
    return sum(p * (FLOAT if name in exclude else layer_bits.get(name, (options.get("w_bits", 8),))[0])
               for name, p in layer_params.items())
