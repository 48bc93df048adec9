"""Traceable stand-ins for torch.nn modules that torch.fx keeps whole, so their layers get quantized.

torch.fx treats every torch.nn module as a leaf. For most (Conv2d, Linear) that is what a backend
row wants; nn.MultiheadAttention, though, hides four Linear layers and two matmuls inside a forward
full of control flow. `fxquant.stand_ins.with_stand_ins` swaps each one for `TracedMultiheadAttention`, the same
computation written in traceable ops, before tracing:

    q, k, v = q_proj(query), k_proj(key), v_proj(value)       # nn.Linear each; 1/sqrt(d) folded into q_proj
    q, k, v = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))     # (N, H, L, d)
    attn = softmax(q @ k^T, dim=-1)
    out = out_proj((attn @ v).transpose(1, 2).flatten(2))

The user's model is not modified: the modules on the path to a swapped module are shallow copies.
attn_mask / key_padding_mask (bool: True is not attended, or float: added) become one additive float mask
(`AttentionMask`, a float helper) added to q @ k^T before the softmax, inside the attention row. A call the
stand-in does not cover (is_causal without attn_mask, which torch refuses too) raises `NotDecomposable` while
tracing, and trace_model keeps that attention whole (a float leaf) instead.

nn.TransformerEncoderLayer and nn.TransformerEncoder get `TracedTransformerEncoderLayer` / `TracedTransformerEncoder`
(and the decoder's two the same way, `TracedTransformerDecoderLayer` / `TracedTransformerDecoder`):
their own slow path (post- or pre-norm; each layer in turn, then the norm), the attention as above; their fused
fast path is chosen by checks on tensor flags that do not trace.

torchvision's Swin attention (ShiftedWindowAttention, and V2's cosine attention) gets
`TracedWindowAttention`: windows hold a (wh, ww) patch of tokens, the attention runs per window,
and the bookkeeping whose sizes depend on the input's H, W stays in small `FloatLeaf` modules
that trace keeps whole (they run in float and torch.onnx exports them):

    windows = partition(x)                             # FloatLeaf: pad, roll by -shift, (B, nH, nW, wh*ww, C)
    q, k, v = qkv(windows).chunk(3, dim=-1)            # nn.Linear; V1: 1/sqrt(d) folded into qkv's q rows
    attn = q @ k^T                                     # per head; V2: normalize(q) @ normalize(k)^T * logit_scale
    attn = softmax(attn + bias(x), dim=-1)             # FloatLeaf bias: relative position bias + shift mask (-100)
    out = merge(proj((attn @ v) heads merged), x)      # nn.Linear; FloatLeaf merge: windows back, roll, unpad
"""

from __future__ import annotations

import copy
import math
import sys

import torch
from torch import nn
from torchvision.models import swin_transformer



def is_wrapped(fn) -> bool:
    """A call_function fx did not trace into (torch.fx.wrap): not a torch op, operator or builtin."""
    module = getattr(fn, "__module__", None) or ""
    return module.split(".")[0] not in ("torch", "_operator", "operator", "builtins", "math")


class NotDecomposable(RuntimeError):
    """A stand-in was called with arguments it does not implement."""


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
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
            self.q_proj = linear_from(weights[0] * scale, None if biases[0] is None else biases[0] * scale)
        self.k_proj = linear_from(weights[1], biases[1])
        self.v_proj = linear_from(weights[2], biases[2])
        self.out_proj = linear_from(mha.out_proj.weight, mha.out_proj.bias)
        self.dropout = nn.Dropout(mha.dropout)
        self.mask = AttentionMask(mha.num_heads)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (N, L, E) -> (N, H, L, d)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if is_causal and attn_mask is None:  # torch refuses it too: is_causal is a hint about attn_mask
            raise NotDecomposable("is_causal without attn_mask is not decomposed; the attention stays whole")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        torch._assert(query.dim() == 3, "TracedMultiheadAttention: expected batched (N, L, E) inputs")
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        scores = torch.matmul(q, k.transpose(-2, -1))
        if attn_mask is not None or key_padding_mask is not None:
            scores = scores + self.mask(attn_mask, key_padding_mask)
        attn = scores.softmax(dim=-1)
        out = torch.matmul(self.dropout(attn), v).transpose(1, 2).flatten(2)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, attn.mean(dim=1) if average_attn_weights else attn


class TracedTransformerEncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer without its fused fast path, whose eligibility checks (tensor flags, the
    attention's in_proj_bias) do not trace: the computation of its own slow path, post-norm
        x = norm1(x + dropout1(self_attn(x))),  x = norm2(x + dropout2(linear2(dropout(act(linear1(x))))))
    or pre-norm (norm_first) x = x + sa(norm1(x)), x = x + ff(norm2(x)), with the attention as
    TracedMultiheadAttention (src_mask, src_key_padding_mask and is_causal passed on to it)."""

    def __init__(self, layer: nn.TransformerEncoderLayer, attention: TracedMultiheadAttention):
        super().__init__()
        self.self_attn, self.norm_first, self.activation = attention, layer.norm_first, layer.activation
        for name in ("linear1", "dropout", "linear2", "norm1", "norm2", "dropout1", "dropout2"):
            setattr(self, name, getattr(layer, name))

    def _sa(self, x, masks):
        return self.dropout1(self.self_attn(x, x, x, need_weights=False, **masks)[0])

    def _ff(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        masks = dict(attn_mask=src_mask, key_padding_mask=src_key_padding_mask, is_causal=is_causal)
        if self.norm_first:
            src = src + self._sa(self.norm1(src), masks)
            return src + self._ff(self.norm2(src))
        src = self.norm1(src + self._sa(src, masks))
        return self.norm2(src + self._ff(src))


class TracedTransformerEncoder(nn.Module):
    """nn.TransformerEncoder without its nested-tensor fast path: each layer (its stand-in where it has one) with
    the masks, then the optional norm. Where torch would take that path (enable_nested_tensor=True, eval, no grad,
    a padding mask) it returns norm(0) at the padded positions; this returns what the layers compute there, as
    torch's own path without nested tensors does: the unpadded positions are the same."""

    def __init__(self, encoder: nn.TransformerEncoder, layers: list[nn.Module]):
        super().__init__()
        self.layers, self.norm = nn.ModuleList(layers), encoder.norm

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        for layer in self.layers:
            src = layer(src, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        return src if self.norm is None else self.norm(src)


class TracedTransformerDecoderLayer(nn.Module):
    """nn.TransformerDecoderLayer as its own forward computes it, post-norm
        x = norm1(x + sa(x)),  x = norm2(x + mha(x, memory)),  x = norm3(x + ff(x))
    or pre-norm (norm_first) x = x + sa(norm1(x)), x = x + mha(norm2(x), memory), x = x + ff(norm3(x)), with both
    attentions as TracedMultiheadAttention (the masks passed on to them). torch.fx would keep the layer whole
    (a torch.nn module), so none of its Linear layers would be quantized."""

    def __init__(self, layer: nn.TransformerDecoderLayer, self_attn: TracedMultiheadAttention,
                 cross_attn: TracedMultiheadAttention):
        super().__init__()
        self.self_attn, self.multihead_attn, self.norm_first, self.activation = self_attn, cross_attn, layer.norm_first, layer.activation
        for name in ("linear1", "dropout", "linear2", "norm1", "norm2", "norm3", "dropout1", "dropout2", "dropout3"):
            setattr(self, name, getattr(layer, name))

    def _sa(self, x, mask, padding, causal):
        return self.dropout1(self.self_attn(x, x, x, attn_mask=mask, key_padding_mask=padding, is_causal=causal,
                                            need_weights=False)[0])

    def _mha(self, x, memory, mask, padding, causal):
        return self.dropout2(self.multihead_attn(x, memory, memory, attn_mask=mask, key_padding_mask=padding,
                                                 is_causal=causal, need_weights=False)[0])

    def _ff(self, x):
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
        self_masks, cross_masks = (tgt_mask, tgt_key_padding_mask, tgt_is_causal), (memory_mask, memory_key_padding_mask, memory_is_causal)
        x = tgt
        if self.norm_first:
            x = x + self._sa(self.norm1(x), *self_masks)
            x = x + self._mha(self.norm2(x), memory, *cross_masks)
            return x + self._ff(self.norm3(x))
        x = self.norm1(x + self._sa(x, *self_masks))
        x = self.norm2(x + self._mha(x, memory, *cross_masks))
        return self.norm3(x + self._ff(x))


class TracedTransformerDecoder(nn.Module):
    """nn.TransformerDecoder: each layer (its stand-in where it has one) with the masks, then the optional norm."""

    def __init__(self, decoder: nn.TransformerDecoder, layers: list[nn.Module]):
        super().__init__()
        self.layers, self.norm = nn.ModuleList(layers), decoder.norm

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
        for layer in self.layers:
            tgt = layer(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
                        memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=bool(tgt_is_causal),
                        memory_is_causal=memory_is_causal)
        return tgt if self.norm is None else self.norm(tgt)


class FloatLeaf(nn.Module):
    """A stand-in's helper that trace keeps whole: it runs in float and is exported by torch.onnx."""


class AttentionMask(FloatLeaf):
    """nn.MultiheadAttention's attn_mask and key_padding_mask as one additive float mask, (1 or N, 1 or H, L, S),
    added to the scores q k^T before the softmax: a bool entry True (not attended) is -inf, a float entry is
    added as it is (torch's own reading of the two masks). attn_mask is (L, S) or (N * H, L, S), key_padding_mask (N, S)."""

    def __init__(self, num_heads: int):
        super().__init__()
        self.num_heads = num_heads

    @staticmethod
    def _additive(mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype == torch.bool:  # float32: a float16 / bfloat16 model's masked attention is not covered
            return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(mask, float("-inf"))
        return mask

    def forward(self, attn_mask, key_padding_mask):
        mask = None
        if attn_mask is not None:
            mask = self._additive(attn_mask)
            mask = mask if mask.dim() == 2 else mask.unflatten(0, (-1, self.num_heads))
        if key_padding_mask is not None:
            padding = self._additive(key_padding_mask)[:, None, None, :]
            mask = padding if mask is None else mask + padding
        return mask


def _window_geometry(size, window, shift) -> tuple[int, int, list[int]]:
    """(pad_h, pad_w, shift) for an (H, W) input: padded up to whole windows; no shift along an axis one window covers."""
    pad = [(-size[i]) % window[i] for i in (0, 1)]
    shift = [0 if window[i] >= size[i] + pad[i] else shift[i] for i in (0, 1)]
    return pad[0], pad[1], shift


class WindowPartition(FloatLeaf):
    """(B, H, W, C) -> (B, nH, nW, wh*ww, C): pad to whole windows, roll by -shift, cut into windows."""

    def __init__(self, window_size, shift_size):
        super().__init__()
        self.window_size, self.shift_size = list(window_size), list(shift_size)

    def forward(self, x):
        (wh, ww), (B, H, W, C) = self.window_size, x.shape
        pad_h, pad_w, shift = _window_geometry((H, W), self.window_size, self.shift_size)
        x = nn.functional.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        x = x.view(B, (H + pad_h) // wh, wh, (W + pad_w) // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
        return x.flatten(3, 4)


class WindowMerge(FloatLeaf):
    """(B, nH, nW, wh*ww, C) and the (B, H, W, C) input -> (B, H, W, C): WindowPartition undone."""

    def __init__(self, window_size, shift_size):
        super().__init__()
        self.window_size, self.shift_size = list(window_size), list(shift_size)

    def forward(self, windows, x):
        (wh, ww), (B, H, W, C) = self.window_size, x.shape
        pad_h, pad_w, shift = _window_geometry((H, W), self.window_size, self.shift_size)
        out = windows.unflatten(3, (wh, ww)).permute(0, 1, 3, 2, 4, 5).reshape(B, H + pad_h, W + pad_w, windows.shape[-1])
        if sum(shift) > 0:
            out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
        return out[:, :H, :W, :].contiguous()


def _region_labels(length: int, window: int, shift: int) -> torch.Tensor:
    """Which of the three bands of a rolled axis each position came from: [0, -window), [-window, -shift), [-shift, end).
    With shift 0 the last band is the whole axis (the slice -0: starts at 0), as in the reference."""
    labels = torch.zeros(length, dtype=torch.int64)
    for label, (start, stop) in enumerate(((0, -window), (-window, -shift), (-shift, None))):
        labels[start:stop] = label
    return labels


class WindowAttentionBias(FloatLeaf):
    """The (nH, nW, heads, N, N) term added to the attention logits: relative position bias, and -100 between
    tokens of a shifted window that came from different regions of the image (the shift mask).

    V1: bias = table[index] per head; V2: bias = 16 * sigmoid(cpb_mlp(log-spaced coordinates)[index]).
    """

    def __init__(self, attn: nn.Module, v2: bool):
        super().__init__()
        self.window_size, self.shift_size = list(attn.window_size), list(attn.shift_size)
        self.num_heads, self.v2 = attn.num_heads, v2
        self.register_buffer("relative_position_index", attn.relative_position_index.clone())
        if v2:
            self.cpb_mlp = copy.deepcopy(attn.cpb_mlp)
            self.register_buffer("relative_coords_table", attn.relative_coords_table.clone())
        else:
            self.relative_position_bias_table = nn.Parameter(attn.relative_position_bias_table.detach().clone(),
                                                             attn.relative_position_bias_table.requires_grad)

    def relative_position_bias(self) -> torch.Tensor:
        if self.v2:
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        else:
            table = self.relative_position_bias_table
        n = self.window_size[0] * self.window_size[1]
        bias = table[self.relative_position_index].view(n, n, self.num_heads).permute(2, 0, 1)  # (heads, N, N)
        return 16 * torch.sigmoid(bias) if self.v2 else bias

    def forward(self, x):
        (wh, ww), (_, H, W, _) = self.window_size, x.shape
        pad_h, pad_w, shift = _window_geometry((H, W), self.window_size, self.shift_size)
        n_h, n_w = (H + pad_h) // wh, (W + pad_w) // ww
        bias = self.relative_position_bias().to(x.dtype)
        if sum(shift) == 0:
            return bias.expand(n_h, n_w, *bias.shape)
        rows = _region_labels(H + pad_h, wh, shift[0]).to(x.device)
        cols = _region_labels(W + pad_w, ww, shift[1]).to(x.device)
        region = (rows[:, None] * 3 + cols[None, :]).view(n_h, wh, n_w, ww).permute(0, 2, 1, 3).flatten(2)  # (nH, nW, N)
        apart = region[..., :, None] != region[..., None, :]  # (nH, nW, N, N): tokens from different regions
        mask = torch.where(apart, -100.0, 0.0).to(x.dtype)
        return bias + mask[:, :, None]


class L2Normalize(FloatLeaf):
    """x / max(||x||, 1e-12) over the last dimension (V2's cosine attention)."""

    def forward(self, x):
        return nn.functional.normalize(x, dim=-1)


class ChannelScale(FloatLeaf):
    """x * scale over the last dimension (passes/smooth_activations: SmoothQuant's 1 / s before a Linear)."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())

    def forward(self, x):
        return x * self.scale


# what a backend row keeps float: the helpers above, and torchvision's Swin patch-merging pad, a function it
# marks torch.fx.wrap (private to torchvision, named here once)
FLOAT_HELPERS = (WindowPartition, WindowMerge, WindowAttentionBias, L2Normalize, ChannelScale, AttentionMask,
                 swin_transformer._patch_merging_pad)


class TracedWindowAttention(nn.Module):
    """torchvision's ShiftedWindowAttention / ShiftedWindowAttentionV2 with qkv and proj as nn.Linear calls."""

    def __init__(self, attn: nn.Module, v2: bool):
        super().__init__()
        self.num_heads, self.v2 = attn.num_heads, v2
        dim = attn.proj.in_features
        weight, bias = attn.qkv.weight.detach().clone(), None if attn.qkv.bias is None else attn.qkv.bias.detach().clone()
        with torch.no_grad():
            if v2 and bias is not None:  # the reference zeroes k's bias on every call (here once: QAT may move it)
                bias[dim:2 * dim] = 0
            if not v2:  # softmax((s q) k^T): s = d ** -0.5 folded into qkv's q rows
                weight[:dim] *= (dim // self.num_heads) ** -0.5
                if bias is not None:
                    bias[:dim] *= (dim // self.num_heads) ** -0.5
        self.qkv = linear_from(weight, bias)
        for mine, theirs in zip(self.qkv.parameters(), attn.qkv.parameters()):
            mine.requires_grad_(theirs.requires_grad)
        self.proj = linear_from(attn.proj.weight, attn.proj.bias)
        self.partition = WindowPartition(attn.window_size, attn.shift_size)
        self.bias = WindowAttentionBias(attn, v2)
        self.merge = WindowMerge(attn.window_size, attn.shift_size)
        if v2:
            self.normalize = L2Normalize()
            self.logit_scale = nn.Parameter(attn.logit_scale.detach().clone(), attn.logit_scale.requires_grad)
        self.attention_dropout, self.dropout = nn.Dropout(attn.attention_dropout), nn.Dropout(attn.dropout)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, -1)).transpose(-3, -2)  # (..., N, C) -> (..., heads, N, d)

    def forward(self, x):
        windows = self.partition(x)  # (B, nH, nW, N, C)
        qkv = self.qkv(windows).chunk(3, dim=-1)
        q, k, v = self._heads(qkv[0]), self._heads(qkv[1]), self._heads(qkv[2])
        if self.v2:  # cosine attention, its per-head scale at most 100
            scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
            attn = torch.matmul(self.normalize(q), self.normalize(k).transpose(-2, -1)) * scale
        else:
            attn = torch.matmul(q, k.transpose(-2, -1))
        attn = torch.softmax(attn + self.bias(x), dim=-1)
        out = torch.matmul(self.attention_dropout(attn), v).transpose(-3, -2).flatten(-2)  # (B, nH, nW, N, C)
        return self.merge(self.dropout(self.proj(out)), x)


def swin_attention(module: nn.Module) -> bool | None:
    """For torchvision's Swin attention: whether it is V2; None for any other module (torchvision not imported)."""
    swin = sys.modules.get("torchvision.models.swin_transformer")
    if swin is None:
        return None
    return {swin.ShiftedWindowAttention: False, swin.ShiftedWindowAttentionV2: True}.get(type(module))
