"""TensorRT (explicit quantization, ONNX QDQ): Q/DQ placed the way TensorRT's optimizer fuses them.

Symmetric int8 everywhere: activations int8 [-128, 127] per tensor with zero point 0, weights int8
[-127, 127] per output channel (axis 0) with zero point 0. The bias stays float: TensorRT's Q/DQ
layers take int8, and it folds a float bias into the int8 conv itself.

Q/DQ go on the INPUTS of the ops that run in int8 (output=False); TensorRT moves DQ forward and Q
backward through the graph and fuses
    Q/DQ(x), DQ(w) -> Conv -> Relu           one int8 conv+bias+relu kernel, so no Q/DQ may sit
                                             between a conv and its activation (FOLDED)
    Conv -> Add <- Q/DQ(residual)            both add inputs quantized: the add fuses into the conv
An op's output is quantized only by the input rule of the op that reads it. Pointwise float ops
(sigmoid, mul of SiLU and squeeze-excitation, softmax) stay float: TensorRT fuses them into the
kernel before them. Concat inputs share one scale (no requantize), max-pool and reshapes keep theirs.
There is no reduce_range: TensorRT's s8 x s8 kernels (DP4A / IMMA) accumulate in int32.
"""

import operator

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.stochastic_depth import stochastic_depth

from fxquant.backends import FLOAT, QUANTIZE, SHARE, SHARE_INPUTS, Rule, Target, global_pool, inference_identity
from fxquant.nn import ConvAct2d, LinearAct
from fxquant.specs import QuantSpec, weight_spec
from fxquant.traceable import FLOAT_HELPERS

ACTIVATION = QuantSpec("int8", -128, 127, symmetric=True)  # scale = amax / 127.5, zero point 0
WEIGHT = weight_spec()  # int8 [-127, 127] per output channel (axis 0), zero point 0
BIAS = None  # float bias
FOLDED = ("Relu", "Clip")  # fused into the conv / gemm / add before them
TARGETS = (Target("tensorrt", None, "NVIDIA GPUs: s8 x s8 kernels (DP4A / IMMA) accumulate in int32"),)

RELU = (nn.ReLU, F.relu, torch.relu, torch.relu_, "relu", "relu_")
ADD = (operator.add, torch.add, "add")

RULES = (
    Rule("conv", ((ConvAct2d, nn.Conv2d),), QUANTIZE, weight=True, output=False, onnx=("Conv",)),  # act(conv(x, w) + b)
    Rule("linear", ((LinearAct, nn.Linear),), QUANTIZE, weight=True, output=False, onnx=("Gemm", "MatMul")),
    Rule("add_relu", (ADD, RELU), QUANTIZE, inputs=(0, 1), output=False, onnx=("Add",)),  # relu(a + b), fused into a's conv
    Rule("add", (ADD,), QUANTIZE, inputs=(0, 1), output=False, onnx=("Add",)),
    Rule("global_avgpool", ((nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d),), QUANTIZE, output=False, check=global_pool,
         onnx=("GlobalAveragePool",)),  # int8 pooling
    Rule("cat", ((torch.cat, torch.concat),), SHARE_INPUTS, onnx=("Concat",)),  # one scale: concat is a copy
    Rule("maxpool", ((nn.MaxPool2d, F.max_pool2d),), SHARE, onnx=("MaxPool",)),  # TensorRT moves Q/DQ across it
    Rule("relu", (RELU,), SHARE, onnx=("Relu",)),
    Rule("reshape", ((torch.flatten, nn.Flatten, "flatten", "view", "reshape", nn.Dropout, nn.Identity),), SHARE,
         onnx=("Flatten", "Reshape")),
    Rule("transpose", ((torch.permute, "permute", torch.transpose, "transpose"),), SHARE, onnx=("Transpose",)),
    Rule("stochastic_depth", ((stochastic_depth,),), SHARE, check=inference_identity),  # identity in eval
    Rule("pointwise_float", ((nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid", operator.mul, torch.mul, "mul",
                              nn.Softmax, F.softmax),), FLOAT, onnx=("Sigmoid", "Mul", "Softmax")),
    Rule("float_helpers", (FLOAT_HELPERS,), FLOAT),  # Swin's window partition / merge /
    # attention bias / cosine-attention normalize (fxquant.traceable) and patch-merging pad: shuffles and small float math
)
