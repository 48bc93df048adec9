"""Backends are tables of `Rule` rows; `load_backend` checks a table once when it is loaded."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from fxquant.errors import FxQuantError
from fxquant.specs import QuantSpec

BACKENDS = ("onnxruntime",)

QUANTIZE = "quantize"  # inputs and output quantized: the op runs as an integer kernel
SHARE = "share"  # output carries the input's qparams (the op moves or picks values)
FLOAT = "float"  # stays float between DQ and Q, by rule


@dataclass(frozen=True)
class Rule:
    """One row: a producer->consumer chain of op keys and how the chain is quantized.

    pattern: one tuple of op keys (module types, functions, method names) per chain step.
    inputs: positional args of the first node that are quantized activations.
    weight: the first node's module has a weight to fake-quantize (per-channel, axis 0).
    output: the chain's output gets its own fake-quant (False: the next op's input rule decides).
    check: optional `(module_or_None, node) -> bool`; a row whose check says False declines.
    """

    name: str
    pattern: tuple[tuple, ...]
    kind: str
    inputs: tuple[int, ...] = (0,)
    weight: bool = False
    output: bool = True
    check: Callable | None = None

    def __post_init__(self):
        if self.kind not in (QUANTIZE, SHARE, FLOAT):
            raise FxQuantError(f"rule {self.name!r}: kind={self.kind!r}, expected quantize, share or float")
        if not self.pattern or not all(isinstance(step, tuple) and step for step in self.pattern):
            raise FxQuantError(f"rule {self.name!r}: pattern must be a non-empty tuple of non-empty tuples")


@dataclass(frozen=True)
class Backend:
    """A backend module defines RULES, ACTIVATION and WEIGHT (the 8-bit specs; bit widths narrow them)."""

    name: str
    rules: tuple[Rule, ...]
    activation: QuantSpec
    weight: QuantSpec


def check_rules(name: str, rules: tuple[Rule, ...]) -> None:
    """Reject a table where one op key is claimed alone, unconditionally, by rows of different kinds."""
    single = {}
    for rule in rules:
        if len(rule.pattern) != 1 or rule.check is not None:
            continue
        for key in rule.pattern[0]:
            other = single.setdefault(key, rule)
            if other.kind != rule.kind:
                raise FxQuantError(
                    f"backend {name!r}: op {getattr(key, '__name__', key)!r} is {other.kind!r} in row "
                    f"{other.name!r} and {rule.kind!r} in row {rule.name!r}"
                )


def load_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise FxQuantError(f"backend={name!r}: expected one of {BACKENDS}")
    table = importlib.import_module(f"fxquant.backends.{name}")
    check_rules(name, table.RULES)
    return Backend(name, table.RULES, table.ACTIVATION, table.WEIGHT)
