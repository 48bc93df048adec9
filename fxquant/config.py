"""QuantConfig: every option of quantize() as one frozen value, validated when it is made.

    config = fxquant.QuantConfig(w_bits=4, exclude=["head"])
    qmodel = fxquant.quantize(model, example_inputs, config)            # or config=..., or the keywords alone
    qmodel = fxquant.quantize(model, example_inputs, config, qat=True)  # a keyword overrides one field
    repr(config)  ->  fxquant.QuantConfig(w_bits=4, exclude=('head',))  # the call that makes it again
    str(config)   ->  fxquant.quantize(model, example_inputs, w_bits=4, exclude=('head',))

The config a model was quantized with is kept in `qmodel.meta["fxquant_config"]` (CONFIG_META) and
written into the ONNX file's metadata (`fxquant.config`, its repr). A field that is not an option of the
quantized model itself (calibration data, progress bars) is an argument of quantize(), not a field.
Only the fields that differ from the defaults are printed; module types and functions print as the
dotted path that imports them (torch.nn.LayerNorm, torch.nn.functional.relu, operator.add).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass

from fxquant.backends import BACKENDS, Backend, load_backend
from fxquant.errors import FxQuantError
from fxquant.specs import FAKE_QUANTS, OBSERVERS, check_bits, check_layer_bits

CONFIG_META = "fxquant_config"  # GraphModule.meta key: the QuantConfig a model was quantized with


def _python(value) -> str:
    """`value` as Python source: a class or a function by its import path, containers element by element."""
    if isinstance(value, Backend):
        return repr(value.name)  # a shipped table by its name; a custom Backend prints its name only
    if isinstance(value, type) or callable(value) and hasattr(value, "__name__"):
        return _import_path(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(_python(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, list):
        return "[" + ", ".join(_python(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_python(k)}: {_python(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _import_path(obj) -> str:
    """The dotted path that imports `obj` (torch.add, not its home torch._C._VariableFunctions.add), checked to
    give `obj` back; its repr when none does (a lambda, a local class)."""
    module = getattr(obj, "__module__", None) or ""
    for base in dict.fromkeys(["torch", "torch.nn", "torch.nn.functional", "operator", module]):  # the public paths first
        for name in dict.fromkeys([getattr(obj, "__qualname__", ""), obj.__name__]):
            try:
                found = importlib.import_module(base)
                for part in name.split("."):
                    found = getattr(found, part)
            except (ImportError, AttributeError, ValueError):
                continue
            if found is obj:
                return f"{base}.{name}"
    return repr(obj)


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise FxQuantError(f"{name}={value!r}: expected True or False")


def _check_choice(name: str, value, allowed) -> None:
    if value is not None and value not in allowed:
        raise FxQuantError(f"{name}={value!r}: expected None (the backend's) or one of {allowed}")


def _check_names(name: str, value, what: str) -> tuple:
    if isinstance(value, (str, type)) or not isinstance(value, (tuple, list, set)):
        raise FxQuantError(f"{name}={value!r}: expected a list of {what}, e.g. {name}=['layer4']")
    bad = [v for v in value if not (isinstance(v, str) or callable(v))]
    if bad:
        raise FxQuantError(f"{name}={list(value)!r}: {bad} are not {what}, e.g. {name}=['layer4', nn.LayerNorm]")
    return tuple(value)


@dataclass(frozen=True, repr=False)
class QuantConfig:
    """What quantize() does to a model (see quantize's docstring for each option).

    backend       "onnxruntime" or "tensorrt" (or a Backend table)   qat           QAT (train mode, BN kept training)
    w_bits        weight bits, 2..8                                 a_bits        activation bits, 2..8
    reduce_range  weights at the backend's REDUCED_WEIGHT_BITS       layer_bits    {module name: (w_bits, a_bits)}
    target        where the file runs: one of the backend's TARGETS ("portable", "vnni"); None: its first
    fake_quant    "ste", "lsq", "lsq+" or None (the backend's)       observer      "minmax", "moving_average", ... or None
    exclude       module names / types / functions kept float        leaf_modules  module names / types kept whole
    concrete_args {forward argument: value} fixed while tracing
    smooth        SmoothQuant's alpha in (0, 1) for the Linear layers that read a GELU (passes/smooth_activations;
                  needs calib_data), or None
    gptq          calibration rounds the weights with GPTQ (fxquant.gptq: each layer's output error on the
                  calibration data, not each weight's own, is minimised; the scales stay as calibrated)

    Containers are stored as tuples (layer_bits and concrete_args as (key, value) pairs), so the
    value cannot change after it is validated; `as_kwargs()` gives them back as quantize() takes them.
    """

    backend: str | Backend = "onnxruntime"
    qat: bool = False
    w_bits: int = 8
    a_bits: int = 8
    reduce_range: bool = False
    target: str | None = None
    fake_quant: str | None = None
    observer: str | None = None
    layer_bits: tuple | None = None
    exclude: tuple = ()
    leaf_modules: tuple = ()
    concrete_args: tuple | None = None
    smooth: float | None = None
    gptq: bool = False

    def __post_init__(self):
        if not isinstance(self.backend, Backend) and self.backend not in BACKENDS:
            raise FxQuantError(f"backend={self.backend!r}: expected one of {BACKENDS}")
        _check_bool("qat", self.qat)
        _check_bool("reduce_range", self.reduce_range)
        _check_bool("gptq", self.gptq)
        check_bits("w_bits", self.w_bits)
        check_bits("a_bits", self.a_bits)
        _check_choice("fake_quant", self.fake_quant, FAKE_QUANTS)
        _check_choice("observer", self.observer, OBSERVERS)
        if self.smooth is not None and (isinstance(self.smooth, bool) or not isinstance(self.smooth, (int, float))
                                        or not 0.0 < self.smooth < 1.0):
            raise FxQuantError(f"smooth={self.smooth!r}: expected None or SmoothQuant's alpha in (0, 1), e.g. 0.5")
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen: normalise once)
        set_("layer_bits", None if self.layer_bits is None else check_layer_bits(self.layer_bits))
        set_("exclude", _check_names("exclude", self.exclude, "module names, module types or functions"))
        set_("leaf_modules", _check_names("leaf_modules", self.leaf_modules, "module names or module types"))
        if self.concrete_args is not None:
            if not isinstance(self.concrete_args, (dict, tuple)):
                raise FxQuantError(f"concrete_args={self.concrete_args!r}: expected a dict {{forward argument name: value}}")
            set_("concrete_args", tuple(self.concrete_args.items()) if isinstance(self.concrete_args, dict) else self.concrete_args)
        if self.reduce_range or self.target is not None:  # a backend without reduced-range weights, or that target, says so
            load_backend(self.backend, reduce_range=self.reduce_range, target=self.target)

    def replace(self, **changes) -> QuantConfig:
        """A copy with `changes` applied (validated); an unknown name raises, listing the fields."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise FxQuantError(f"{', '.join(unknown)}: not an option of fxquant.quantize(); options: "
                               f"{', '.join(f.name for f in dataclasses.fields(self))}, calib_data, progress, pass_trace")
        return dataclasses.replace(self, **changes) if changes else self

    def backend_table(self) -> Backend:
        """The backend's rule table, checked (reduce_range applied)."""
        return load_backend(self.backend, reduce_range=self.reduce_range, target=self.target)

    def changed(self) -> dict:
        """The fields that differ from the defaults, in declaration order, as quantize() takes them."""
        kwargs = self.as_kwargs()
        return {f.name: kwargs[f.name] for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}

    def as_kwargs(self) -> dict:
        """Every field as quantize() takes it (layer_bits and concrete_args as dicts)."""
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("layer_bits", "concrete_args"):
            if kwargs[name] is not None:
                kwargs[name] = dict(kwargs[name])
        return kwargs

    def _arguments(self) -> str:
        return ", ".join(f"{k}={_python(v)}" for k, v in self.changed().items())

    def __repr__(self) -> str:
        return f"fxquant.QuantConfig({self._arguments()})"

    def __str__(self) -> str:
        return f"fxquant.quantize(model, example_inputs{', ' if self.changed() else ''}{self._arguments()})"
