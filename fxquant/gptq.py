"""GPTQ: weights rounded to minimise each layer's output error on calibration data, not each weight's own.

Frantar, Ashkboos, Hoefler, Alistarh 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (Algorithm 1, with the "act-order" column order of their reference code), the
Optimal Brain Quantization update of Frantar & Alistarh 2022. Per layer, with its weight W (rows = output
channels, columns = the K inputs one output reads: in_features, or in_channels/groups * kernel size) and
the inputs X (K x n) the layer reads in the fake-quant model on the calibration data:

    minimise ||W X - Q X||^2 over Q on the weight's grid,   H = shrunk(X X^T / n) + damp * mean(diag) * I

column by column (largest diag(H) first): q = quant(w_j), then the columns not yet quantized absorb its
error, W[:, rest] -= (w_j - q) / U[j, j] * U[j, rest], U the upper Cholesky factor of H^-1. Each weight
still lands on the layer's own grid, the scales (from calibration) and clip range are not changed: a
portable file stays pair-sum safe and `convert` / `export_onnx` store the integers GPTQ chose.

(shrunk: the off-diagonal second moments scaled down by how noisy they are on n columns, see _shrunk; few
calibration rows for a wide layer would otherwise be fitted, and lose to round-to-nearest on new data).
Layers go in graph order, each reading inputs from the model with the layers before it rounded already
(one pass over the calibration data per layer, stopped at that layer). A layer's weight is replaced by its
dequantized integers (q - zero_point) * scale, so the fake-quant forward, `convert` and a checkpoint agree.
With qat=True the weight ranges are observed again at every training step, so GPTQ's integers are where
training starts, no more.

Left as they are (round to nearest): layers kept float, 3-D convs, QAT layers whose BatchNorm fold does not
commute with the weight fake-quant (per-tensor weights). The dampening's mean(diag) counts the dead inputs'
placeholder 1s and a chunked layer's zero padding (the reference code counts the former too).
"""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx

from fxquant.errors import FxQuantError
from fxquant.nn import BnFolded, ConvAct, LinearAct, WeightedAct, set_fake_quant
from fxquant.per_layer import layer_by_layer, read_layer_inputs

DAMP = 0.01  # H + DAMP * mean(diag(H)) * I: the paper's dampening (keeps H^-1 stable when X is rank-deficient)
BLOCK = 128  # columns updated lazily together (the paper's B): the result is the same, the updates are matmuls
COLUMN_ELEMENTS = 2**25  # im2col columns are built this many elements at a time (128 MB of float32)
MAX_COLUMNS = 8192  # a wider layer (VGG's first classifier: 25,088 inputs) is rounded in equal chunks of at most
# this many columns, each with its own block of H (H's off-diagonal blocks are dropped): H costs K^2 memory and
# its factorisation K^3 time, 5 GB and minutes at 25,088


def roundable_layers(qmodel: fx.GraphModule) -> list[tuple[str, WeightedAct]]:
    """(name, module) of every layer GPTQ rounds, in graph order, each once."""
    seen, layers = set(), []
    for node in qmodel.graph.nodes:
        if node.op != "call_module" or node.target in seen:
            continue
        m = qmodel.get_submodule(node.target)
        seen.add(node.target)
        if (isinstance(m, (LinearAct, ConvAct)) and m.weight_fq is not None and m.weight_fq.enabled
                and m.weight.dim() in (2, 3, 4) and (not isinstance(m, BnFolded) or m.commutes)):
            layers.append((node.target, m))
    return layers


def _columns(module: WeightedAct, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as (groups, K, n): column i of group g is what one output of group g reads at one
    position (a linear: one row of x; a conv: one im2col patch, ordered as weight[o].flatten())."""
    x = x.detach().float()
    if isinstance(module, LinearAct):
        return x.reshape(-1, x.shape[-1]).T.unsqueeze(0)
    if module.weight.dim() == 3:  # conv1d as a conv2d of height 1
        x, kernel = x.unsqueeze(2), (1, *module.kernel_size)
        stride, dilation = (1, *module.stride), (1, *module.dilation)
        pad = [*module._reversed_padding_repeated_twice, 0, 0]
    else:
        kernel, stride, dilation, pad = module.kernel_size, module.stride, module.dilation, module._reversed_padding_repeated_twice
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, pad, mode=mode)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, C * kernel, L)
    n, k, length = cols.shape
    cols = cols.reshape(n, module.groups, k // module.groups, length)
    return cols.permute(1, 2, 0, 3).reshape(module.groups, k // module.groups, n * length)


def _chunked(t: torch.Tensor, k: int, *, columns: bool) -> torch.Tensor:
    """(groups, K, n) `columns`, or else a (groups, rows, K) weight, as (groups * chunks, K / chunks, ...) with K
    zero-padded to a multiple of `chunks` (see MAX_COLUMNS); unchanged when K <= MAX_COLUMNS."""
    chunks = -(-k // MAX_COLUMNS)
    if chunks == 1:
        return t
    width = -(-k // chunks)
    if columns:
        t = F.pad(t, (0, 0, 0, chunks * width - k))
        return t.reshape(t.shape[0] * chunks, width, t.shape[-1])
    t = F.pad(t, (0, chunks * width - k)).reshape(t.shape[0], t.shape[1], chunks, width)  # weight (groups, rows, K)
    return t.permute(0, 2, 1, 3).reshape(-1, t.shape[1], width)


def _unchunked(q: torch.Tensor, groups: int, k: int) -> torch.Tensor:
    """The inverse of _chunked for a (groups * chunks, rows, width) weight: (groups, rows, K)."""
    chunks = q.shape[0] // groups
    if chunks == 1:
        return q
    q = q.reshape(groups, chunks, q.shape[1], q.shape[2]).permute(0, 2, 1, 3)
    return q.reshape(groups, q.shape[1], -1)[..., :k]


def _layer_hessian(qmodel: fx.GraphModule, name: str, module: WeightedAct, batches, stop: bool) -> torch.Tensor:
    """H, the layer's inputs' second moments X X^T / n (groups, K, K), shrunk towards their diagonal (_shrunk)."""
    acc = {"h": 0.0, "h2": 0.0, "n": 0}

    def record(_, args) -> None:
        x = args[0]
        im2col = math.prod(module.kernel_size) if isinstance(module, ConvAct) else 1  # a conv's columns repeat each input
        for part in x.split(max(1, COLUMN_ELEMENTS // max(1, x[:1].numel() * im2col))):  # samples, a slice at a time
            cols = _columns(module, part)
            cols = _chunked(cols, cols.shape[1], columns=True)
            h, squares = cols @ cols.transpose(1, 2), cols * cols  # float32 sums: ~1e-7 relative per batch added
            h2 = squares @ squares.transpose(1, 2)
            if not bool(torch.isfinite(h2).all()):  # x^4 past float32 (a random-init resnet152: inputs ~5e9)
                cols = cols.double()
                h, h2 = cols @ cols.transpose(1, 2), (cols * cols) @ (cols * cols).transpose(1, 2)
            acc["h"], acc["h2"] = acc["h"] + h, acc["h2"] + h2.double()  # h2 summed in float64: it may pass 3.4e38
            acc["n"] += cols.shape[-1]

    read_layer_inputs(qmodel, [module], record, batches, stop=stop)
    if not acc["n"]:  # every call_module node runs on every forward: no batch came
        raise FxQuantError(f"gptq: calib_data gave no batch (at layer {name!r}); pass a non-empty list or DataLoader of "
                           "input batches (not a generator: GPTQ reads it once per layer)")
    return _shrunk(acc["h"].double(), acc["h2"].double(), acc["n"])  # float64 from here: h2 may hold 1e40


def _shrunk(h: torch.Tensor, h2: torch.Tensor, n: int) -> torch.Tensor:
    """S = H / n with its off-diagonal entries shrunk by lambda, per group: Schaefer & Strimmer 2005 ("A
    Shrinkage Approach to Large-Scale Covariance Matrix Estimation", target D: the diagonal kept as it is),

        lambda = sum_{i != j} Var(s_ij) / sum_{i != j} s_ij^2,  clipped to [0, 1],
        Var(s_ij) = (sum_k x_ki^2 x_kj^2 - n s_ij^2) / (n (n - 1))   (the variance of a mean of n terms)

    from h = sum x x^T and h2 = sum (x*x)(x*x)^T. With few columns for a wide layer (a classifier's K = 512
    inputs on a few calibration images) S's off-diagonal is mostly noise and GPTQ fitted to it rounds worse
    than nearest on new data; lambda -> 1 there, and a diagonal H makes GPTQ round to nearest (no error
    propagates). With many columns (a conv's im2col patches) lambda -> 0: plain GPTQ."""
    s = h / n
    diag = torch.diagonal(s, dim1=-2, dim2=-1)
    if n < 2:
        return torch.diag_embed(diag)
    off_sum = lambda t: t.sum((-2, -1)) - torch.diagonal(t, dim1=-2, dim2=-1).sum(-1)  # noqa: E731 (sum over i != j)
    squared = s * s
    spread = off_sum(squared)
    lam = torch.where(spread > 0, (off_sum(h2) - n * spread) / (n * (n - 1)) / spread.clamp(min=1e-300), 1.0).clamp(0.0, 1.0)
    shrunk = s * (1.0 - lam[:, None, None])
    torch.diagonal(shrunk, dim1=-2, dim2=-1).copy_(diag)
    return shrunk


def _inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """U, upper triangular with U^T U = (H + damp)^-1, per group (float32); dead inputs (diag 0) get diag 1.
    With R the reversal of rows and columns and R H R = L L^T (Cholesky), U = R L^-1 R: one factorisation
    and one triangular inverse. The dampening grows tenfold until the factorisation succeeds."""
    h = h.clone()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    diag[diag == 0] = 1.0
    eye = torch.eye(h.shape[-1], dtype=torch.float32).expand_as(h)
    damp = DAMP
    for attempt in range(7):
        if attempt == 1:  # GPTQ is invariant to a positive scale of H: bring mean(diag) to 1 (float32 range) first
            h /= diag.mean(-1)[:, None, None]
            damp = DAMP
        damped = h.to(torch.float32, copy=True)
        torch.diagonal(damped, dim1=-2, dim2=-1).add_((damp * diag.mean(-1)[:, None]).float())
        chol, info = torch.linalg.cholesky_ex(damped.flip(-1, -2))
        if not bool(info.any()):
            return torch.linalg.solve_triangular(chol, eye, upper=False).flip(-1, -2)
        damp *= 10
    raise FxQuantError("gptq: a layer's input second-moment matrix is not positive definite even when damped "
                       f"by {damp / 10:g} * mean(diag) at mean(diag) 1; leave gptq off for this model")


def gptq_round(weight: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               qmin: int, qmax: int) -> torch.Tensor:
    """GPTQ's integers for `weight` (groups, rows, K) given H, the inputs' second moments (groups, K, K; any
    positive multiple) and the grid (scale, zero_point: per row (groups, rows, 1) or one value, qmin..qmax).
    Runs in float32 (as the paper's code does). Returns float32 integers (groups, rows, K), every one in
    [qmin, qmax], rounded half to even as the fake-quant rounds."""
    w = weight.float().clone()
    scale, zero_point = scale.float(), zero_point.float()
    order = torch.argsort(torch.diagonal(h, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)  # act-order
    h = h.gather(1, order[:, :, None].expand_as(h)).gather(2, order[:, None, :].expand_as(h))
    w = w.gather(2, order[:, None, :].expand_as(w))
    u = _inverse_factor(h)
    q = torch.empty_like(w)
    k = w.shape[-1]
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        err = torch.empty_like(w[..., start:end])
        for j in range(start, end):
            col = w[..., j:j + 1]
            q[..., j:j + 1] = torch.clamp(torch.round(col / scale) + zero_point, qmin, qmax)
            e = (col - (q[..., j:j + 1] - zero_point) * scale) / u[:, None, j:j + 1, j]
            w[..., j:end] -= e * u[:, None, j, j:end]
            err[..., j - start:j - start + 1] = e
        w[..., end:] -= err @ u[:, start:end, end:]
    return torch.empty_like(q).scatter_(2, order[:, None, :].expand_as(q), q)


def _round_layer(module: WeightedAct, h: torch.Tensor) -> None:
    """Replace module.weight by GPTQ's integers dequantized on its own grid (h: from _layer_hessian)."""
    scale, zero_point = module.weight_qparams()
    spec = module.weight_fq.spec
    weight = module.weight.detach()
    groups = module.groups if isinstance(module, ConvAct) else 1
    rows, k = weight.shape[0] // groups, weight[0].numel()
    chunks = h.shape[0] // groups

    def per_row(t: torch.Tensor) -> torch.Tensor:  # (groups * chunks, rows, 1), or one value
        if not t.dim():
            return t.float()
        return t.float().reshape(groups, 1, rows, 1).expand(groups, chunks, rows, 1).reshape(-1, rows, 1)

    q = gptq_round(_chunked(weight.reshape(groups, rows, k), k, columns=False), h, per_row(scale), per_row(zero_point), spec.qmin, spec.qmax)
    dequantized = _unchunked((q - per_row(zero_point)) * per_row(scale), groups, k)
    module.weight.data.copy_(dequantized.reshape(weight.shape).to(weight.dtype))


@torch.no_grad()
def gptq(qmodel: fx.GraphModule, calib_data, *, n_inputs: int | None = None, progress: bool = True) -> list[str]:
    """Round every eligible layer's weight with GPTQ (see the module docstring), in place: each weight tensor
    keeps its shape and dtype and holds (q - zero_point) * scale afterwards. `qmodel` is the calibrated
    fake-quant GraphModule (its weight scales are kept; its flags and train/eval mode are restored);
    `calib_data` a list or DataLoader of batches as calibrate takes them, read once per layer. Returns the names
    of the rounded layers. Raises FxQuantError, before rounding anything, for a model that is not a calibrated
    fake-quant model or for an iterator as `calib_data`; for an empty `calib_data` at the first layer."""
    from tqdm.auto import tqdm

    with layer_by_layer(qmodel, calib_data, n_inputs=n_inputs, who="gptq", option="gptq") as batches:
        calls = Counter(n.target for n in qmodel.graph.nodes if n.op == "call_module")
        layers = roundable_layers(qmodel)
        set_fake_quant(qmodel, observe=False)
        for name, m in tqdm(layers, desc="gptq", disable=not progress, leave=False):
            _round_layer(m, _layer_hessian(qmodel, name, m, batches, stop=calls[name] == 1))
    return [name for name, _ in layers]
