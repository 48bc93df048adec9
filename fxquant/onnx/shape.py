"""Shape and indexing: ops that move values without computing new ones.

    flatten / view / reshape / unflatten -> Flatten or Reshape (0 copies a dimension: the batch stays dynamic)
    permute / transpose / swapaxes       -> Transpose           unsqueeze / squeeze -> Unsqueeze / Squeeze
    cat                                  -> Concat              chunk / split       -> Split (one node, n outputs)
    expand                               -> Expand              pad / ZeroPad2d     -> Pad (constant, reflect, edge)
    x[ints, slices, None, ...]           -> Slice, then Squeeze / Unsqueeze        x[tensor] -> Gather
    x.size(i), x.shape, sizes[i]         -> Shape, Gather (only for sizes that follow the batch; others are constants)
"""

from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.errors import FxQuantError
from fxquant.onnx.emitter import Value, call_arg


def _flatten(e, node, start_dim=0, end_dim=-1):  # torch.flatten / x.flatten start at 0 (nn.Flatten passes its 1)
    rank = len(e.tensor_of(node.args[0]).shape)
    start, end = start_dim % rank, end_dim % rank
    if start == 1 and end == rank - 1:
        return e.op(node, "Flatten", [e.arg(node.args[0])], axis=1)
    dims = [0] * start + [-1] + list(e.tensor_of(node.args[0]).shape[end + 1:])
    return e.op(node, "Reshape", [e.arg(node.args[0]), e.shape_vector(node, dims, reshape=True)])


def _flatten_fn(e, node):
    return _flatten(e, node, *node.args[1:], **node.kwargs)


def _flatten_module(e, node):
    m = e.module(node)
    return _flatten(e, node, m.start_dim, m.end_dim)


def _reshape(e, node):
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], fx.Node) and isinstance(e.tensor_of(dims[0]), tuple):  # view(x.size()[:-2] + (d,))
        return e.op(node, "Reshape", [e.arg(node.args[0]), e.whole_shape(node, dims[0])])
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    return e.op(node, "Reshape", [e.arg(node.args[0]), e.shape_vector(node, list(e.arg(d) for d in dims), reshape=True)])


def _unflatten(e, node):
    x, dim, sizes = node.args[0], call_arg(node, 1, "dim"), list(call_arg(node, 2, "sizes"))
    shape = list(e.tensor_of(x).shape)
    dim %= len(shape)
    dims = [0] * dim + sizes + shape[dim + 1:]  # 0: ONNX Reshape copies that input dimension (batch stays dynamic)
    return e.op(node, "Reshape", [e.arg(x), e.shape_vector(node, dims, reshape=True)])


def _size(e, node):
    shape = e.op(node, "Shape", [e.arg(node.args[0])], "shape" if len(node.args) > 1 else "")
    if len(node.args) == 1:
        return shape
    return e.op(node, "Gather", [shape, e.const(node, np.array(node.args[1], dtype=np.int64), "index")], axis=0)


def _getattr(e, node):
    x, attr = node.args
    if attr != "shape":
        raise FxQuantError(f"export_onnx: node '{node.name}' reads .{attr} of a tensor per batch; only .shape is exported")
    return e.op(node, "Shape", [e.arg(x)])


def _cat(e, node):
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return e.op(node, "Concat", [e.arg(t) for t in tensors], axis=dim)


def _permute(e, node):
    dims = node.args[1:] or (node.kwargs["dims"],)
    dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
    rank = len(e.tensor_of(node.args[0]).shape)
    return e.op(node, "Transpose", [e.arg(node.args[0])], perm=[d % rank for d in dims])


def _transpose(e, node):
    dim0, dim1 = node.args[1:3] if len(node.args) == 3 else (node.kwargs["dim0"], node.kwargs["dim1"])
    rank = len(e.tensor_of(node.args[0]).shape)
    perm = list(range(rank))
    perm[dim0 % rank], perm[dim1 % rank] = perm[dim1 % rank], perm[dim0 % rank]
    return e.op(node, "Transpose", [e.arg(node.args[0])], perm=perm)


def _unsqueeze(e, node):
    dim = call_arg(node, 1, "dim") % (e.rank(node.args[0]) + 1)
    return e.op(node, "Unsqueeze", [e.arg(node.args[0]), e.int64(node, [dim], "axes")])


def _squeeze(e, node):
    dim = call_arg(node, 1, "dim")
    shape = e.tensor_of(node.args[0]).shape
    dims = [d for d in range(len(shape)) if shape[d] == 1] if dim is None else [dim] if isinstance(dim, int) else list(dim)
    dims = [d % len(shape) for d in dims if shape[d] == 1]  # torch leaves a dimension that is not 1 alone
    if not dims:
        return e.arg(node.args[0])
    return e.op(node, "Squeeze", [e.arg(node.args[0]), e.int64(node, dims, "axes")])


def _expand(e, node):
    sizes = node.args[1:] if node.op == "call_method" else (call_arg(node, 1, "size"),)
    sizes = list(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (list, tuple, torch.Size)) else list(sizes)
    dims = [e.arg(d) for d in sizes]
    dims = [1 if isinstance(d, int) and d == -1 else d for d in dims]  # ONNX Expand broadcasts: 1 keeps the input dim
    return e.op(node, "Expand", [e.arg(node.args[0]), e.shape_vector(node, dims)])


def _split_sizes(length: int, chunks: int) -> list[int]:
    """torch.chunk: pieces of ceil(length / chunks), the last one shorter; possibly fewer pieces."""
    step = -(-length // chunks)
    return [min(step, length - start) for start in range(0, length, step)]


def _split_into(e, node, x, sizes, dim) -> list[Value]:
    dim %= e.rank(x)
    return e.outputs(node, "Split", [e.arg(x), e.int64(node, sizes, "split")], len(sizes), axis=dim)


def _chunk(e, node):
    x, chunks, dim = node.args[0], call_arg(node, 1, "chunks"), call_arg(node, 2, "dim", 0)
    return _split_into(e, node, x, _split_sizes(e.tensor_of(x).shape[dim], chunks), dim)


def _split(e, node):
    x, size, dim = node.args[0], call_arg(node, 1, "split_size_or_sections", call_arg(node, 1, "split_size")), call_arg(node, 2, "dim", 0)
    length = e.tensor_of(x).shape[dim]
    sizes = list(size) if isinstance(size, (list, tuple)) else [min(size, length - s) for s in range(0, length, size)]
    return _split_into(e, node, x, sizes, dim)


def _pad_amounts(pad, rank: int) -> list[int]:
    """torch's (last_begin, last_end, prev_begin, prev_end, ...) as ONNX's (begins..., ends...) over all dims."""
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):
        begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    return begins + ends


def _wrap(e, node, x, pad, suffix: str = ""):
    """Circular padding as one Gather per padded dimension: along
    dim d of size n, the indices [n - begin, ..., n - 1, 0, ..., n - 1, 0, ..., end - 1]."""
    value, shape = e.arg(x), e.tensor_of(x).shape
    for i in range(len(pad) // 2):
        begin, end, d = pad[2 * i], pad[2 * i + 1], len(shape) - 1 - i
        if begin or end:
            n = shape[d]
            index = [j % n for j in range(-begin, n + end)]
            value = e.op(node, "Gather", [value, e.int64(node, index, f"index{d}")], f"wrap{d}", axis=d)
    return e.op(node, "Identity", [value], suffix)


def emit_pad(e, node, x, pad, mode="constant", value=None, suffix: str = ""):
    """F.pad as Pad (or Gathers for circular); `suffix` names its output when it is not the node's last op."""
    modes = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}
    if mode not in modes:
        raise FxQuantError(f"export_onnx: node '{node.name}' pads with mode={mode!r}; exported: {sorted(modes)}")
    if mode == "circular":  # Gathers: exact at every opset (Pad's "wrap" needs opset 19)
        return _wrap(e, node, x, list(pad), suffix)
    inputs = [e.arg(x), e.int64(node, _pad_amounts(list(pad), e.rank(x)), "pads")]
    if mode == "constant":
        inputs.append(e.const(node, np.array(value or 0.0, dtype=np.float32), "value"))
    return e.op(node, "Pad", inputs, suffix, mode=modes[mode])


def _pad_fn(e, node):
    return emit_pad(e, node, *node.args, **node.kwargs)


def _pad_module(e, node):
    m = e.module(node)
    return emit_pad(e, node, node.args[0], m.padding, "constant", getattr(m, "value", 0.0))


def _getitem(e, node):
    seq, index = node.args
    value = e.arg(seq)
    if isinstance(value, (list, tuple)):
        return value[index]
    if isinstance(e.tensor_of(seq), torch.Tensor):
        return _getitem_tensor(e, node, seq, index)
    if isinstance(index, int):  # an element of a shape that follows the batch (x.shape[0])
        return e.op(node, "Gather", [value, e.const(node, np.array(index, dtype=np.int64), "index")], axis=0)
    parsed = _index(index, len(e.tensor_of(seq)))
    if parsed is not None:  # x.size()[:-2]: a part of a shape that follows the batch
        start, end, step, _ = parsed
        return e.op(node, "Slice", [value, e.int64(node, [start], "starts"), e.int64(node, [end], "ends"),
                                    e.int64(node, [0], "axes"), e.int64(node, [step], "steps")])
    raise FxQuantError(f"export_onnx: node '{node.name}' indexes a shape with {index!r} ({node.format_node()}); not exported")


INT64_MAX = np.iinfo(np.int64).max


def _index(i, length: int):
    """A getitem entry as (start, end, step, squeeze) on a dimension of `length`."""
    if isinstance(i, int):
        return i, (i + 1) or INT64_MAX, 1, True
    if isinstance(i, slice) and all(v is None or isinstance(v, int) for v in (i.start, i.stop, i.step)):
        step = i.step or 1
        return (i.start if i.start is not None else 0 if step > 0 else -1,
                i.stop if i.stop is not None else INT64_MAX if step > 0 else -INT64_MAX, step, False)
    return None


def _getitem_tensor(e, node, x, index):
    """x[...] with ints, slices, None and Ellipsis: one Slice, then Squeeze / Unsqueeze; x[tensor]: Gather."""
    if isinstance(index, fx.Node):
        return e.op(node, "Gather", [e.arg(x), e.arg(index)], axis=0)
    index = e.arg(index if isinstance(index, tuple) else (index,))  # sizes in slices: their constant values
    shape = e.tensor_of(x).shape
    given = sum(i is not None and i is not Ellipsis for i in index)
    full = []
    for i in index:
        full += [slice(None)] * (len(shape) - given) if i is Ellipsis else [i]
    full += [slice(None)] * (len(shape) - sum(i is not None for i in full))
    starts, ends, axes, steps, squeeze, unsqueeze, dim, out = [], [], [], [], [], [], 0, 0
    for i in full:
        if i is None:
            unsqueeze.append(out)
            out += 1
            continue
        parsed = _index(i, shape[dim])
        if parsed is None:
            raise FxQuantError(f"export_onnx: node '{node.name}' indexes with {i!r}; exported: ints, slices, None, ..., a tensor")
        if parsed[:3] != (0, INT64_MAX, 1):
            starts, ends, axes, steps = starts + [parsed[0]], ends + [parsed[1]], axes + [dim], steps + [parsed[2]]
        squeeze += [dim] if parsed[3] else []
        out += 0 if parsed[3] else 1
        dim += 1
    steps_ = [("Slice", [e.int64(node, v, n) for v, n in ((starts, "starts"), (ends, "ends"), (axes, "axes"), (steps, "steps"))])] if starts else []
    steps_ += [("Squeeze", [e.int64(node, squeeze, "squeeze_axes")])] if squeeze else []
    steps_ += [("Unsqueeze", [e.int64(node, unsqueeze, "unsqueeze_axes")])] if unsqueeze else []
    y = e.arg(x)
    for k, (op_type, extra) in enumerate(steps_ or [("Identity", [])]):
        y = e.op(node, op_type, [y] + extra, "" if k == len(steps_) - 1 or not steps_ else op_type.lower())
    return y  # the last op carries the FX node's name


CONVERTERS = {
    **{k: _flatten_fn for k in (torch.flatten, "flatten")},
    nn.Flatten: _flatten_module,
    **{k: _reshape for k in ("view", "reshape", torch.reshape)},
    "unflatten": _unflatten,
    "size": _size,
    getattr: _getattr,
    **{k: _cat for k in (torch.cat, torch.concat)},
    **{k: _permute for k in (torch.permute, "permute")},
    **{k: _transpose for k in (torch.transpose, "transpose", torch.swapaxes, "swapaxes")},
    **{k: _unsqueeze for k in (torch.unsqueeze, "unsqueeze")},
    **{k: _squeeze for k in (torch.squeeze, "squeeze")},
    "expand": _expand,
    **{k: _chunk for k in (torch.chunk, "chunk")},
    **{k: _split for k in (torch.split, "split")},
    F.pad: _pad_fn,
    **{k: _pad_module for k in (nn.ZeroPad2d, nn.ConstantPad2d)},
    operator.getitem: _getitem,
}
