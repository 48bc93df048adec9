"""ONNX Runtime (CPU, QDQ format): Q/DQ placed so the runtime fuses each quantized row.

uint8 per-tensor activations, int8 per-channel symmetric weights, int32 bias (scale s_x*s_w).
What ORT's QDQ selectors (level ENABLE_EXTENDED and up) make of each row, checked on ORT 1.32:
    DQ -> Conv/Gemm/MatMul -> Q            QLinearConv / QGemm / QLinearMatMul (MatMulIntegerToFloat
                                           when a float Add of the bias follows a MatMul)
    DQ -> MatMul -> Add -> Gelu            MatMulIntegerToFloat + BiasGelu: a linear only float activations read
                                           keeps its output float (linear_to_float)
    DQ, DQ -> MatMul [-> Mul] [-> Add] -> Softmax -> Q   MatMulIntegerToFloat + float Softmax (attention rows:
                                           no Q/DQ on the logits, so no QLinearSoftmax)
    DQ, DQ -> Add/Mul -> Q                 QLinearAdd / QLinearMul (contrib ops); an Add whose sum only
                                           normalizations and further Adds read (a transformer's residual
                                           stream) stays a float Add, no Q on the sum (residual_add)
    DQ -> Sigmoid/GlobalAveragePool -> Q   QLinearSigmoid / QLinearGlobalAveragePool
    DQ... -> Concat -> Q                   QLinearConcat (fxquant gives every input one scale: a copy)
    DQ -> MaxPool/Reshape/Flatten/Transpose -> Q   the Q/DQ pair is dropped: it needs equal qparams
                                           on both sides, hence the share rows
A ReLU/Clip right before a Q is folded by the runtime (FOLDED), so it stays inside its producer's row.
SiLU reaches this table as x * sigmoid(x) (passes/decompose_ops): QLinearSigmoid + QLinearMul.

Targets (the row column `pair_sums`, the TARGETS below): ONNX Runtime's MLAS multiplies u8 activations
by s8 weights, on CPUs without VNNI (AVX2, AVX-512F/BW without VNNI, SSE4), with vpmaddubsw (or its SSE4
form pmaddubsw), which adds two u8*s8 products in saturating int16: 2 * 255 * 127 = 64770 overflows 32767
and the sum clips. The kernels exposed: QLinearConv (but depthwise), QGemm, QLinearMatMul and
MatMulIntegerToFloat with a constant s8 weight. Measured on an AVX2 CPU without VNNI (ORT 1.32, weights
at 0.9-1.0 of their range, inputs uniform over the uint8 codes, teacher-forced against the reference):
a 3x3 conv 35 steps off, a grouped conv (2 channels per group) 42, a depthwise conv with channel
multiplier 2 44, a linear 54; a depthwise conv (group = in = out channels; MLAS's depthwise kernel
widens to int32) and the u8 x u8 matmul of two activations (attention: U8U8 widens to int16 first) 0.
    portable (default)  every x86 ISA and ARM: a pair_sums row stores weights with 2 * 255 * max|w| <=
                        32767, i.e. 7 bits [-63, 63] at 8-bit activations (8 bits at a_bits <= 7, where
                        2 * 127 * 127 fits), and full 8 bits on every other row (depthwise conv, the
                        activation matmuls). It costs one bit on those weights only; `gptq=True`
                        (fxquant.gptq) rounds them for each layer's output error instead of each weight's,
                        on the same 7-bit grid, which wins that bit back on the models measured (README,
                        "What the portable target costs in accuracy", tools/target_cost --gptq).
    vnni                full 8-bit weights everywhere: exact where the CPU has AVX-VNNI / AVX512-VNNI
                        (vpdpbusd adds in int32) and on Arm (NEON and dot-product kernels accumulate in
                        int32: measured as cortex-a72 and neoverse-n1 under qemu-aarch64, tests/test_targets.py);
                        on any other x86 CPU the pair sums
                        saturate (tens of steps per layer). ONNX Runtime's session option
                        session.x64quantprecision=1 rescues such a file there by running weights outside
                        [-64, 64] as u8 x u8 (about 40% slower on the integer GEMMs).
The target is recorded in the model (its Backend) and the file's metadata; fxquant.check_onnx names
every GEMM whose weights can saturate a pair sum on a portable file.
reduce_range: `quantize(..., reduce_range=True)` narrows every weight, depthwise ones too, to
REDUCED_WEIGHT_BITS = 7 (what ONNX Runtime's own quantizer calls reduce_range).
"""

import operator

import torch
import torch.nn.functional as F
from torch import nn

from torchvision.ops.stochastic_depth import stochastic_depth

from fxquant.backends import (FLOAT, QUANTIZE, SHARE, SHARE_INPUTS, Rule, Target, global_pool, inference_identity, read_only_by,
                              sentinel_operand)
from fxquant.meta import op_key
from fxquant.nn import ConvAct1d, ConvAct2d, ConvAct3d, LinearAct
from fxquant.specs import BIAS_SPEC, activation_spec, weight_spec
from fxquant.traceable import FLOAT_HELPERS

ACTIVATION = activation_spec()  # uint8 per-tensor affine: u8 activations x s8 weights is ORT's fast path
WEIGHT = weight_spec()  # int8 [-127, 127] per output channel, zero point 0
BIAS = BIAS_SPEC  # int32, scale s_x * s_w: what QLinearConv / QGemm read
FOLDED = ("Relu", "Clip")  # ORT removes these between a quantized op and its Q (zero point at qmin)
REDUCED_WEIGHT_BITS = 7  # reduce_range=True: [-63, 63], see above
TARGETS = (
    Target("portable", 32767, "every x86 CPU (SSE4, AVX2, AVX-512, VNNI) and ARM: weights of the integer GEMMs "
           "narrowed so no 16-bit pair sum can saturate"),
    Target("vnni", None, "CPUs with AVX-VNNI / AVX512-VNNI, or Arm, only: full 8-bit weights; on AVX2 "
           "without VNNI the pair sums saturate (ORT session option session.x64quantprecision=1 avoids it, slower)"),
)

RELU = (nn.ReLU, F.relu, torch.relu, torch.relu_, "relu", "relu_")
ADD = (operator.add, torch.add, "add")
MUL = (operator.mul, torch.mul, "mul")
DIV = (operator.truediv, torch.div, "div")
SIGMOID = (nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid")
MATMUL = (torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm")
SOFTMAX = (nn.Softmax, F.softmax, torch.softmax, "softmax")
LAYER_NORM = (nn.LayerNorm, F.layer_norm)
BATCH_NORM = (nn.BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm3d)
CONV = (ConvAct2d, nn.Conv2d, ConvAct1d, nn.Conv1d, ConvAct3d, nn.Conv3d)  # QLinearConv is N-dimensional
CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NORMS = LAYER_NORM + BATCH_NORM  # float rows below: ORT has no integer kernel
RESHAPE = (torch.flatten, nn.Flatten, "flatten", "view", "reshape", nn.Dropout, nn.Identity)
TRANSPOSE = (torch.permute, "permute", torch.transpose, "transpose")
MOVEMENT = (torch.swapaxes, "swapaxes", "unflatten", torch.unsqueeze, "unsqueeze", torch.squeeze, "squeeze", "contiguous",
            operator.getitem)
MOVES = RESHAPE + TRANSPOSE + MOVEMENT + (stochastic_depth,)  # move or pick values (identity in eval), never compute


def _pads_zero(module, node) -> bool:
    """F.pad / ZeroPad2d / ConstantPad2d that pad with the value 0 (constant mode)."""
    if module is not None:
        return float(getattr(module, "value", 0.0)) == 0.0
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
    return mode == "constant" and not value


def _nearest(module, node) -> bool:
    """Nearest-neighbour resizing: every output value is an input value."""
    mode = module.mode if module is not None else node.args[3] if len(node.args) > 3 else node.kwargs.get("mode", "nearest")
    return mode == "nearest"


def _not_depthwise(groups: int, in_channels: int, out_channels: int) -> bool:
    """MLAS runs a conv with one input and one output channel per group as its depthwise kernel, which
    widens to int32; every other conv (grouped, channel multiplier > 1) is an im2col u8 x s8 GEMM."""
    return not groups == in_channels == out_channels


def _residual_stream(module, node) -> bool:
    """A residual add whose sum only normalizations and further adds read, through dropout / stochastic
    depth / reshapes: a pre-norm transformer's residual stream (x + attn(ln(x)) -> ln, next add). No
    integer kernel reads that sum, so a Q/DQ on it would only add a rounding that every later block
    inherits (tools/coverage, vit_b_32: int8 vs float 26.8 -> 32.9 dB with it float); an add reading
    it quantizes its inputs as its own row says."""
    return read_only_by(node, NORMS + ADD, through=MOVES)


def _into_residual_stream(module, node) -> bool:
    """A linear whose output only residual adds (see _residual_stream) read, through dropout / reshapes: a
    transformer block's last projection (attention output, FFN output). Its output stays float: the int8 GEMM
    runs as MatMulIntegerToFloat and adds into the float stream, with no Q/DQ on a value nothing integer reads.
    On trained BERTs these outputs carry the outlier channels (|x| ~ 100 in a few of 384; all-MiniLM-L6-v2's FFN
    output: scale 0.78, embedding cosine 0.95 vs float with a Q/DQ there, 0.99 without: tools/bench_hf)."""
    gm, todo, adds = node.graph.owning_module, [node], []
    while todo:
        for user in todo.pop().users:
            key = op_key(gm, user)
            if key in MOVES:
                todo.append(user)
            elif key in ADD:
                adds.append(user)
            else:
                return False
    return bool(adds) and all(_residual_stream(None, add) for add in adds)


FLOAT_ACTIVATIONS = (nn.GELU, F.gelu, nn.Hardswish, F.hardswish, nn.Hardsigmoid, F.hardsigmoid, nn.Tanh, torch.tanh, "tanh")


def _into_float_activation(module, node) -> bool:
    """A linear whose output only float activations (GELU...) read, through dropout / reshapes: a transformer
    FFN's first layer. Its output stays float (MatMulIntegerToFloat), so ORT fuses its bias Add and the GELU
    into one BiasGelu and the file has no Q/DQ pair on the widest activation of the block, a rounding nothing
    integer reads (all-MiniLM-L6-v2, batch 16: Q + DQ + bias Add + Gelu 9.7% of the run, BiasGelu 6.7%)."""
    return bool(node.users) and read_only_by(node, FLOAT_ACTIVATIONS, through=MOVES)


RULES = (
    # a ReLU fuse_modules could not fold into its conv / linear (a module called at several sites): the row takes it,
    # so the Q goes after it and the runtime folds it (FOLDED) as it would a fused one
    Rule("conv_relu", (CONV, RELU), QUANTIZE, weight=True, onnx=("Conv",), pair_sums=_not_depthwise),  # relu(conv(x, w) + b)
    Rule("conv", (CONV,), QUANTIZE, weight=True, onnx=("Conv",), pair_sums=_not_depthwise),  # y = act(conv(x, w) + b)
    # ORT 1.32's CPU QDQ rules fuse DQ -> Conv -> Q only (ConvQDQRules registers "Conv"); a ConvTranspose
    # between Q/DQ would run float anyway, so it stays float by this row
    Rule("conv_transpose", (CONV_TRANSPOSE,), FLOAT, onnx=("ConvTranspose",)),
    Rule("linear_to_residual", ((LinearAct, nn.Linear),), QUANTIZE, weight=True, output=False, check=_into_residual_stream,
         onnx=("Gemm", "MatMul"), pair_sums=True),  # y = x @ w.T + b, float out, into the residual stream
    Rule("linear_to_float", ((LinearAct, nn.Linear),), QUANTIZE, weight=True, output=False, check=_into_float_activation,
         onnx=("Gemm", "MatMul"), pair_sums=True),  # y = x @ w.T + b, float out, read by GELU (a float row)
    # after the two rows above, which the export checker reads a Gemm by first (a float output is theirs)
    Rule("linear_relu", ((LinearAct, nn.Linear), RELU), QUANTIZE, weight=True, onnx=("Gemm", "MatMul"), pair_sums=True),
    Rule("linear", ((LinearAct, nn.Linear),), QUANTIZE, weight=True, onnx=("Gemm", "MatMul"), pair_sums=True),  # y = act(x @ w.T + b)
    Rule("mask_arithmetic", (ADD + MUL,), FLOAT, check=sentinel_operand),  # (1 - m) * finfo.min: an additive mask
    Rule("residual_add", (ADD,), FLOAT, check=_residual_stream),  # stays float: see _residual_stream
    Rule("add_relu", (ADD, RELU), QUANTIZE, inputs=(0, 1), onnx=("Add",)),  # y = relu(a + b): QLinearAdd, relu folded
    Rule("add", (ADD,), QUANTIZE, inputs=(0, 1), onnx=("Add",)),  # y = a + b: QLinearAdd
    Rule("mul", (MUL,), QUANTIZE, inputs=(0, 1), onnx=("Mul",)),  # y = a * b: QLinearMul (silu, squeeze-excitation)
    Rule("sigmoid", (SIGMOID,), QUANTIZE, onnx=("Sigmoid",)),  # y = 1 / (1 + exp(-x)): QLinearSigmoid, a 256-entry table
    Rule("global_avgpool", ((nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d),), QUANTIZE, check=global_pool, onnx=("GlobalAveragePool",)),  # mean over H, W
    Rule("cat", ((torch.cat, torch.concat),), SHARE_INPUTS, onnx=("Concat",)),  # QLinearConcat: one scale, a copy
    Rule("maxpool", ((nn.MaxPool2d, F.max_pool2d),), SHARE, onnx=("MaxPool",)),  # picks input values: same grid
    Rule("relu", (RELU,), SHARE, onnx=("Relu",)),  # max(x, 0) of on-grid values is on the grid (zero is on it)
    Rule("reshape", (RESHAPE,), SHARE, onnx=("Flatten", "Reshape")),
    Rule("transpose", (TRANSPOSE,), SHARE, onnx=("Transpose",)),
    Rule("stochastic_depth", ((stochastic_depth,),), SHARE, check=inference_identity),  # identity in eval
    Rule("float_ops", ((nn.Softmax, F.softmax),), FLOAT, onnx=("Softmax",)),
    # model zoo (issue 5): transformers, mobile nets. Ops ORT has no integer kernel for stay float by these rows.
    # attention scores: softmax(q @ k^T [* s] [+ bias]) with the logits float (no Q/DQ before the softmax). The matmul
    # reads quantized q, k and runs as MatMulIntegerToFloat; a Q/DQ pair on the logits would make DQ -> Softmax -> Q,
    # which ORT fuses into QLinearSoftmax, one step low on ~1% of the probabilities (vit_b_32: 19 dB vs the reference)
    Rule("attention_scores", (MATMUL, SOFTMAX), QUANTIZE, inputs=(0, 1), onnx=("MatMul",), onnx_chain=("Softmax",)),
    Rule("attention_scores_bias", (MATMUL, ADD, SOFTMAX), QUANTIZE, inputs=(0, 1), onnx=("MatMul",),
         onnx_chain=("Add", "Softmax")),  # + relative position bias or additive mask (maxvit)
    Rule("attention_scores_scaled", (MATMUL, MUL, SOFTMAX), QUANTIZE, inputs=(0, 1), onnx=("MatMul",),
         onnx_chain=("Mul", "Softmax")),  # (q @ k^T) * d ** -0.5
    Rule("attention_scores_scaled_bias", (MATMUL, MUL, ADD, SOFTMAX), QUANTIZE, inputs=(0, 1), onnx=("MatMul",),
         onnx_chain=("Mul", "Add", "Softmax")),
    Rule("attention_scores_div", (MATMUL, DIV, SOFTMAX), QUANTIZE, inputs=(0, 1), onnx=("MatMul",),
         onnx_chain=("Div", "Softmax")),  # (q @ k^T) / sqrt(d) (HF 4.x BERT)
    Rule("attention_scores_div_bias", (MATMUL, DIV, ADD, SOFTMAX), QUANTIZE, inputs=(0, 1), onnx=("MatMul",),
         onnx_chain=("Div", "Add", "Softmax")),  # ... + additive mask (finfo.min where padding): float inside the row
    Rule("matmul", (MATMUL,), QUANTIZE, inputs=(0, 1), onnx=("MatMul",)),  # y = a @ b (attention): QLinearMatMul
    Rule("avgpool", ((nn.AvgPool2d, F.avg_pool2d),), QUANTIZE, onnx=("AveragePool",)),  # QLinearAveragePool
    Rule("movement", (MOVEMENT,), SHARE),  # moves or picks values: the input's grid
    Rule("zero_pad", ((F.pad, nn.ZeroPad2d, nn.ConstantPad2d),), SHARE, check=_pads_zero),  # 0 is on every grid
    Rule("upsample_nearest", ((F.interpolate, nn.Upsample),), SHARE, check=_nearest),  # copies input values
    Rule("embedding", ((nn.Embedding,),), QUANTIZE, inputs=(), weight=True, output=False),  # int8 table, one scale
    # per row -> DequantizeLinear -> Gather: a weight-only lookup, its float rows go on as they are
    Rule("layer_norm", (LAYER_NORM,), FLOAT, onnx=("LayerNormalization",)),
    Rule("batchnorm", (BATCH_NORM,), FLOAT, onnx=("BatchNormalization",)),  # one fuse could not fold
    Rule("float_activations", (FLOAT_ACTIVATIONS,), FLOAT),
    Rule("float_helpers", (FLOAT_HELPERS,), FLOAT),  # Swin's window partition / merge /
    # attention bias / cosine-attention normalize (fxquant.traceable) and patch-merging pad: shuffles and small float math
    Rule("float_math", ((torch.mean, "mean", torch.softmax, "softmax", torch.einsum, F.scaled_dot_product_attention),),
         FLOAT),  # ORT's QDQ fusions have no integer einsum, reduce-mean or fused attention
)
