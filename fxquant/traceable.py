"""Traceable stand-ins for torch.nn modules that torch.fx keeps whole, so their layers get quantized.

torch.fx treats every torch.nn module as a leaf. For most (Conv2d, Linear) that is what a backend
row wants; nn.MultiheadAttention, though, hides four Linear layers and two matmuls inside a forward
full of control flow. `with_stand_ins` swaps each one for `TracedMultiheadAttention`, the same
computation written in traceable ops, before tracing:

    q, k, v = q_proj(query), k_proj(key), v_proj(value)       # nn.Linear each; 1/sqrt(d) folded into q_proj
    q, k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))     # (N, H, L, d)
    attn = softmax(q @ k^T, dim=-1)
    out = out_proj((attn @ v).transpose(1, 2).flatten(2))

The user's model is not modified: the modules on the path to a swapped module are shallow copies.
A call the stand-in does not cover (masks, causal attention) raises `NotDecomposable` while
tracing, and trace_model keeps that attention whole (a float leaf) instead.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fxquant.meta import matches_names


class NotDecomposable(RuntimeError):
    """A stand-in was called with arguments it does not implement."""


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().clone(), weight.requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), bias.requires_grad)
    return layer


class TracedMultiheadAttention(nn.Module):
    """nn.MultiheadAttention (no bias_k/bias_v, no add_zero_attn) as Linear, matmul and softmax ops."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.num_heads, self.batch_first = mha.num_heads, mha.batch_first
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        scale = mha.head_dim**-0.5  # softmax(q k^T / sqrt(d)) = softmax((s q) k^T): s folded into q_proj
        with torch.no_grad():
            self.q_proj = _linear(weights[0] * scale, None if biases[0] is None else biases[0] * scale)
        self.k_proj = _linear(weights[1], biases[1])
        self.v_proj = _linear(weights[2], biases[2])
        self.out_proj = _linear(mha.out_proj.weight, mha.out_proj.bias)
        self.dropout = nn.Dropout(mha.dropout)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (N, L, E) -> (N, H, L, d)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise NotDecomposable("attention masks and is_causal are not decomposed; the attention stays whole")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        torch._assert(query.dim() == 3, "TracedMultiheadAttention: expected batched (N, L, E) inputs")
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        attn = torch.matmul(q, k.transpose(-2, -1)).softmax(dim=-1)
        out = torch.matmul(self.dropout(attn), v).transpose(1, 2).flatten(2)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, attn.mean(dim=1) if average_attn_weights else attn


def stand_in(module: nn.Module) -> nn.Module | None:
    """The traceable stand-in for `module`, or None when it has none (or a configuration it does not cover)."""
    if type(module) is nn.MultiheadAttention and module.bias_k is None and not module.add_zero_attn:
        return TracedMultiheadAttention(module)
    return None


def _replaced(root: nn.Module, qualname: str, new: nn.Module) -> nn.Module:
    """A shallow copy of `root` whose submodule `qualname` is `new`; `root` itself is left as it was."""
    head, _, rest = qualname.partition(".")
    root = copy.copy(root)
    root._modules = dict(root._modules)
    root._modules[head] = _replaced(root._modules[head], rest, new) if rest else new
    return root


def with_stand_ins(model: nn.Module, keep=()) -> nn.Module:
    """`model` with every module that has a stand-in swapped for it, except those `keep` names (or types)."""
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
