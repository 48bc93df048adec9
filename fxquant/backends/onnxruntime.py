"""ONNX Runtime (CPU, QDQ format): Q/DQ placed so the runtime fuses each quantized row.

uint8 per-tensor activations, int8 per-channel symmetric weights, int32 bias (scale s_x*s_w).
Conv/Gemm -> QLinearConv/QGemm, Add -> QLinearAdd, GlobalAveragePool -> QLinearGlobalAveragePool;
a ReLU/Clip right before a Q is folded by the runtime, so it stays inside its producer's row.
"""

import operator

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.backends import FLOAT, QUANTIZE, SHARE, Rule
from fxquant.nn import ConvAct2d, LinearAct
from fxquant.specs import activation_spec, weight_spec

ACTIVATION = activation_spec()  # uint8 per-tensor affine: u8 activations x s8 weights is ORT's fast path
WEIGHT = weight_spec()  # int8 [-127, 127] per output channel, zero point 0

RELU = (nn.ReLU, F.relu, torch.relu, torch.relu_, "relu", "relu_")
ADD = (operator.add, torch.add, "add")



def _global_pool(module, node) -> bool:
    size = module.output_size if module is not None else node.args[1] if len(node.args) > 1 else node.kwargs["output_size"]
    return size in (1, (1, 1), [1, 1])


RULES = (
    Rule("conv", ((ConvAct2d, nn.Conv2d),), QUANTIZE, weight=True),  # y = act(conv(x, w) + b)
    Rule("linear", ((LinearAct, nn.Linear),), QUANTIZE, weight=True),  # y = act(x @ w.T + b)
    Rule("add_relu", (ADD, RELU), QUANTIZE, inputs=(0, 1)),  # y = relu(a + b): QLinearAdd, relu folded
    Rule("add", (ADD,), QUANTIZE, inputs=(0, 1)),  # y = a + b: QLinearAdd
    Rule("global_avgpool", ((nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d),), QUANTIZE, check=_global_pool),  # mean over H, W
    Rule("maxpool", ((nn.MaxPool2d, F.max_pool2d),), SHARE),  # picks input values: same grid
    Rule("relu", (RELU,), SHARE),  # max(x, 0) of on-grid values is on the grid (zero is on it)
    Rule("reshape", ((torch.flatten, nn.Flatten, "flatten", "view", "reshape", nn.Dropout, nn.Identity),), SHARE),
    Rule("float_ops", ((nn.Softmax, F.softmax, nn.Sigmoid, torch.sigmoid),), FLOAT),
)
