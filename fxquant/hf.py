"""Hugging Face transformers (5.x): traceable stand-ins for the models' own forward and their attention.

transformers' forwards do what torch.fx cannot trace: output-capturing decorators that assign into dicts,
masks built with data-dependent control flow, `(*x.shape[:-1], -1, d)` shapes. fxquant.traceable swaps a
module for its stand-in before tracing (the user's model is not modified); this file is the one table of
Hugging Face stand-ins, keyed by class path so transformers is never imported here:

    BertModel, RobertaModel      embeddings written out, one additive mask, encoder.layer[i] traced as they are
    DistilBertModel, ViTModel    the same shape; ViT's patch conv, class token and position table
    GPT2Model                    causal + padding mask; its Conv1D layers become nn.Linear
    *SelfAttention, ViTAttention, GPT2Attention    TracedSelfAttention below

The stand-ins keep the original submodules (their names: `encoder.layer.0.attention.self.query`), compute
the same function (tested against the model) and return a tuple, like `return_dict=False`:
(last_hidden_state, pooler_output) when the model has a pooler, (last_hidden_state,) otherwise.

Attention (one stand-in for every class above; 1/sqrt(d) folded into the query's weights):

    q, k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (query(x) * s, key(x), value(x)))
    attn = softmax(q @ k^T + mask, dim=-1)        # the backend's attention row: MatMul int8, + mask float
    out = (attn @ v).transpose(1, 2).flatten(2)   # then o_proj / out_lin / c_proj when the class has one

What stays float by rule: the additive mask (`AdditiveMask`, finfo.min where a token is padding or in the
future) and position / token-type ids (`PositionIds`, `TokenTypeIds`) are FloatLeaf modules that trace keeps
whole and torch.onnx exports; the mask is added inside the attention row, never quantized.
A user's own attention class: fxquant.register_stand_in(MyAttention, make) (fxquant.stand_ins).
"""

from __future__ import annotations

import torch
from torch import nn

from fxquant.traceable import FloatLeaf, NotDecomposable, linear_from


class AdditiveMask(FloatLeaf):
    """(B, L) 0/1 attention mask (or None) -> (B, 1, L or 1, L) float: 0 where attended, finfo.min elsewhere.
    causal: position i attends to j <= i only (GPT-2)."""

    def __init__(self, causal: bool = False):
        super().__init__()
        self.causal = causal

    def forward(self, attention_mask, hidden):
        length = hidden.shape[1]
        keep = torch.ones(1, 1, 1, length, dtype=torch.bool, device=hidden.device)
        if attention_mask is not None:
            keep = attention_mask[:, None, None, :].to(torch.bool)
        if self.causal:
            keep = keep & torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
        zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        return torch.where(keep, zero, torch.finfo(hidden.dtype).min)


class PositionIds(FloatLeaf):
    """input_ids (B, L) -> position ids: 0..L-1 (BERT, DistilBERT, GPT-2); RoBERTa counts non-padding
    tokens from padding_idx + 1 and gives padding tokens padding_idx."""

    def __init__(self, padding_idx: int | None = None):
        super().__init__()
        self.padding_idx = padding_idx

    def forward(self, input_ids):
        if self.padding_idx is None:
            return torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)
        real = input_ids.ne(self.padding_idx).long()
        return torch.cumsum(real, dim=1) * real + self.padding_idx


class TokenTypeIds(FloatLeaf):
    """input_ids -> zeros of its shape: BERT's token type when none is given."""

    def forward(self, input_ids):
        return torch.zeros_like(input_ids)


class TracedSelfAttention(nn.Module):
    """Multi-head self-attention from its Linear layers (see the module docstring). `names` are the
    original attribute names (query, key, value[, out]) or (qkv, out) for one fused projection."""

    def __init__(self, linears: dict, heads: int, scaling: float, dropout: float, fused: bool = False):
        super().__init__()
        self.heads, self.fused, self.names = heads, fused, tuple(linears)
        for i, (name, layer) in enumerate(linears.items()):
            weight, bias = layer.weight, layer.bias
            if i == 0:  # softmax((s q) k^T): s folded into the query rows
                rows = weight.shape[0] // 3 if fused else weight.shape[0]
                with torch.no_grad():
                    weight, bias = weight.detach().clone(), None if bias is None else bias.detach().clone()
                    weight[:rows] *= scaling
                    if bias is not None:
                        bias[:rows] *= scaling
            setattr(self, name, linear_from(weight, bias))
        self.dropout = nn.Dropout(dropout)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, L, H*d) -> (B, H, L, d)

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        if kwargs.get("encoder_hidden_states") is not None or kwargs.get("cache") is not None:
            raise NotDecomposable("cross-attention and the KV cache are not decomposed")
        projections = [getattr(self, name) for name in self.names]
        if self.fused:
            q, k, v = projections[0](hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = (p(hidden_states) for p in projections[:3])
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        scores = torch.matmul(q, k.transpose(-2, -1))
        if attention_mask is not None:
            scores = scores + attention_mask
        attn = self.dropout(torch.softmax(scores, dim=-1))
        out = torch.matmul(attn, v).transpose(1, 2).flatten(2)
        rest = projections[1 if self.fused else 3:]
        return (rest[0](out) if rest else out), None


def _attention(names, heads="num_attention_heads", head_dim="attention_head_size", fused=False):
    """make(module) for an attention class whose projections are the attributes `names`."""

    def make(module):
        linears = {name: getattr(module, name) for name in names}
        if fused:
            linears = {name: _conv1d_linear(layer) for name, layer in linears.items()}
        n_heads = getattr(module, heads)
        d = getattr(module, head_dim, None) or getattr(module, "head_dim")
        dropout = getattr(module, "dropout", None)
        p = dropout.p if isinstance(dropout, nn.Dropout) else getattr(module, "attention_dropout", 0.0) or 0.0
        if isinstance(getattr(module, "attn_dropout", None), nn.Dropout):
            p = module.attn_dropout.p
        return TracedSelfAttention(linears, n_heads, getattr(module, "scaling", d**-0.5), p, fused=fused)

    return make


def _conv1d_linear(conv1d) -> nn.Linear:
    """GPT-2's Conv1D (x @ W + b, W stored (in, out)) as the nn.Linear it is."""
    return conv1d if isinstance(conv1d, nn.Linear) else linear_from(conv1d.weight.t(), conv1d.bias)


def _gpt2_attention(module):
    if module.is_cross_attention or module.reorder_and_upcast_attn:
        return None
    return _attention(("c_attn", "c_proj"), heads="num_heads", head_dim="head_dim", fused=True)(module)


class TracedTextEncoder(nn.Module):
    """BertModel, RobertaModel, DistilBertModel: embeddings, one additive mask, the layers, the pooler."""

    def __init__(self, model, layers: str, padding_idx: int | None = None):
        super().__init__()
        self.embeddings, self.layers_at = model.embeddings, layers
        for name in layers.split(".")[:1]:
            setattr(self, name, getattr(model, name))
        self.pooler = getattr(model, "pooler", None)
        self.positions, self.token_types, self.mask = PositionIds(padding_idx), TokenTypeIds(), AdditiveMask()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        emb = self.embeddings
        if position_ids is None:
            position_ids = self.positions(input_ids)
        x = emb.word_embeddings(input_ids)
        if hasattr(emb, "token_type_embeddings"):
            if token_type_ids is None:
                token_type_ids = self.token_types(input_ids)
            x = x + emb.token_type_embeddings(token_type_ids)
        x = x + emb.position_embeddings(position_ids)
        x = emb.dropout(emb.LayerNorm(x))
        mask = self.mask(attention_mask, x) if attention_mask is not None else None
        for layer in self.get_submodule(self.layers_at):
            x = layer(x, mask)
        return (x, self.pooler(x)) if self.pooler is not None else (x,)


class TracedDistilBert(TracedTextEncoder):
    def forward(self, input_ids, attention_mask=None):  # DistilBertModel's order: (input_ids, attention_mask, ...)
        return super().forward(input_ids, attention_mask)


class TracedViT(nn.Module):
    """ViTModel: patch conv, class token, position table, layers, final norm, pooler."""

    def __init__(self, model):
        super().__init__()
        self.embeddings, self.layers, self.layernorm = model.embeddings, model.layers, model.layernorm
        self.pooler = model.pooler

    def forward(self, pixel_values):
        emb = self.embeddings
        x = emb.patch_embeddings.projection(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + emb.position_embeddings
        x = emb.dropout(x)
        for layer in self.layers:
            x = layer(x)
        x = self.layernorm(x)
        return (x, self.pooler(x)) if self.pooler is not None else (x,)


class TracedGPT2(nn.Module):
    """GPT2Model: token + position embeddings, a causal (and padding) mask, the blocks, ln_f."""

    def __init__(self, model):
        super().__init__()
        self.wte, self.wpe, self.drop, self.h, self.ln_f = model.wte, model.wpe, model.drop, model.h, model.ln_f
        self.positions, self.mask = PositionIds(), AdditiveMask(causal=True)

    def forward(self, input_ids, attention_mask=None):
        x = self.wte(input_ids) + self.wpe(self.positions(input_ids))
        x = self.drop(x)
        mask = self.mask(attention_mask, x)
        for block in self.h:
            x = block(x, None, mask)
        return (self.ln_f(x),)


def _text_encoder(layers, padding=False, cls=TracedTextEncoder):
    def make(model):
        if getattr(model.config, "is_decoder", False):
            return None  # a causal BERT: not covered, traced (and reported) as it is
        return cls(model, layers, model.config.pad_token_id if padding else None)

    return make


_BERT_ATTENTION = _attention(("query", "key", "value"))
HF_STAND_INS = {  # "module.Class" -> make(module) -> stand-in or None
    "transformers.models.bert.modeling_bert.BertModel": _text_encoder("encoder.layer"),
    "transformers.models.roberta.modeling_roberta.RobertaModel": _text_encoder("encoder.layer", padding=True),
    "transformers.models.distilbert.modeling_distilbert.DistilBertModel": _text_encoder("transformer.layer",
                                                                                      cls=TracedDistilBert),
    "transformers.models.vit.modeling_vit.ViTModel": TracedViT,
    "transformers.models.gpt2.modeling_gpt2.GPT2Model": TracedGPT2,
    "transformers.models.bert.modeling_bert.BertSelfAttention": _BERT_ATTENTION,
    "transformers.models.roberta.modeling_roberta.RobertaSelfAttention": _BERT_ATTENTION,
    "transformers.models.distilbert.modeling_distilbert.DistilBertSelfAttention": _attention(
        ("q_lin", "k_lin", "v_lin", "out_lin"), heads="n_heads"),
    "transformers.models.vit.modeling_vit.ViTAttention": _attention(
        ("q_proj", "k_proj", "v_proj", "o_proj"), heads="num_attention_heads", head_dim="head_dim"),
    "transformers.models.gpt2.modeling_gpt2.GPT2Attention": _gpt2_attention,
    "transformers.pytorch_utils.Conv1D": _conv1d_linear,
    "transformers.activations.GELUActivation": lambda m: nn.GELU(),  # the same functions as nn.GELU (a row of their own)
    "transformers.activations.NewGELUActivation": lambda m: nn.GELU(approximate="tanh"),
    "transformers.activations.GELUTanh": lambda m: nn.GELU(approximate="tanh"),
}


def hf_stand_in(module: nn.Module) -> nn.Module | None:
    make = HF_STAND_INS.get(f"{type(module).__module__}.{type(module).__qualname__}")
    return make(module) if make is not None else None
