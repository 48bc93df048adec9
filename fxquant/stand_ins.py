"""Which modules trace through a stand-in, and the swap: one registry over fxquant.traceable (torch.nn's
MultiheadAttention, torchvision's Swin), fxquant.hf (Hugging Face) and the user's own (register_stand_in).

    with_stand_ins(model)   a shallow copy of `model` with every module that has a stand-in swapped for it,
                            the root first (a Hugging Face model's own forward), then its submodules
"""

from __future__ import annotations

import copy

from torch import nn

from fxquant.errors import FxQuantError
from fxquant.hf import hf_stand_in
from fxquant.meta import matches_names
from fxquant.traceable import (TracedMultiheadAttention, TracedTransformerDecoder, TracedTransformerDecoderLayer,
                               TracedTransformerEncoder, TracedTransformerEncoderLayer, TracedWindowAttention, swin_attention)

STAND_INS: dict = {}  # module type -> make(module) -> stand-in or None: register_stand_in fills it


def register_stand_in(module_type: type, make) -> None:
    """Trace every module of exactly `module_type` through `make(module)`: an nn.Module computing the same thing
    in ops torch.fx traces (called with the same arguments), or None to keep that module as it is. The stand-in
    may hold the original's submodules (their names stay the original's) or new ones; Linear layers it holds are
    quantized by the backend's rows, helpers that are FloatLeaf subclasses stay whole and float. The user's model
    is never modified. Registering a type again replaces its stand-in; `make=None` removes it.

        fxquant.register_stand_in(MyAttention, lambda m: MyTracedAttention(m))
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise FxQuantError(f"register_stand_in: expected an nn.Module subclass, got {module_type!r}")
    if make is None:
        STAND_INS.pop(module_type, None)
        return
    if not callable(make):
        raise FxQuantError(f"register_stand_in({module_type.__name__}, make): make must be callable, module -> nn.Module | None")
    STAND_INS[module_type] = make


def _builtin_stand_in(module: nn.Module) -> nn.Module | None:
    if type(module) is nn.MultiheadAttention and module.bias_k is None and not module.add_zero_attn:
        return TracedMultiheadAttention(module)
    if type(module) is nn.TransformerEncoderLayer:
        attention = stand_in(module.self_attn)
        return TracedTransformerEncoderLayer(module, attention) if attention is not None else None
    if type(module) is nn.TransformerEncoder:
        return TracedTransformerEncoder(module, [stand_in(layer) or layer for layer in module.layers])
    if type(module) is nn.TransformerDecoderLayer:
        attentions = stand_in(module.self_attn), stand_in(module.multihead_attn)
        return TracedTransformerDecoderLayer(module, *attentions) if None not in attentions else None
    if type(module) is nn.TransformerDecoder:
        return TracedTransformerDecoder(module, [stand_in(layer) or layer for layer in module.layers])
    v2 = swin_attention(module)
    if v2 is not None:
        return TracedWindowAttention(module, v2)
    if type(module).__module__.startswith("transformers."):  # Hugging Face: fxquant.hf's table, by class path
        return hf_stand_in(module)
    return None


def stand_in(module: nn.Module) -> nn.Module | None:
    """The traceable stand-in for `module`, or None when it has none (or a configuration it does not cover):
    a registered one (register_stand_in) first, then fxquant's own (MHA, Swin, Hugging Face)."""
    make = STAND_INS.get(type(module))
    return make(module) if make is not None else _builtin_stand_in(module)


def _replaced(root: nn.Module, qualname: str, new: nn.Module) -> nn.Module:
    """A shallow copy of `root` whose submodule `qualname` is `new`; `root` itself is left as it was."""
    head, _, rest = qualname.partition(".")
    root = copy.copy(root)
    root._modules = dict(root._modules)
    root._modules[head] = _replaced(root._modules[head], rest, new) if rest else new
    return root


def with_stand_ins(model: nn.Module, keep=()) -> nn.Module:
    """`model` with every module that has a stand-in swapped for it, except those `keep` names (or types);
    the root first (a Hugging Face model's own forward), then its submodules."""
    root = stand_in(model) if not matches_names("", model, tuple(k for k in keep if isinstance(k, type))) else None
    if root is not None:
        model = root.train(model.training)
    swapped = []
    for qualname, module in list(model.named_modules()):
        if not qualname or matches_names(qualname, module, keep) or any(qualname.startswith(s + ".") for s in swapped):
            continue
        new = stand_in(module)
        if new is not None:
            new.train(module.training)
            model = _replaced(model, qualname, new)
            swapped.append(qualname)
    return model
