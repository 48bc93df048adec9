"""Empirical bias correction after PTQ calibration (Nagel et al. 2019, "Data-Free Quantization Through
Weight Equalization and Bias Correction", sec. 4.2: the variant that compares the activations of the
quantized and the float model on data).

Quantizing weights and activations shifts the mean of a layer's output, and the shift travels on
through every later layer. Per output channel c of each weighted layer with a bias, in graph order:

    b[c] <- b[c] + mean(y_float[:, c]) - mean(y_quant[:, c])

y is the layer's pre-activation output (conv / linear plus bias, before a fused ReLU), the mean is over
the calibration batches and every position; y_float comes from the model with every fake-quant off (the
float model, BN folded), y_quant from the fake-quant model with the layers before this one corrected.
Afterwards mean(y_quant[:, c]) = mean(y_float[:, c]) on the calibration data within one step of the grid
the bias is kept on (s_x * s_w; the bias measured and the bias corrected each round by up to half a step,
alike in the fake-quant and the int8 model). The bias is the layer's own parameter (`output_bias`;
a ConvBnAct2d's beta), so convert and export_onnx carry the correction.

Left as they are: layers without a bias (a new parameter would not load into a fresh quantize() result),
layers kept float (`exclude`), and a module called at several sites (one bias, several outputs).
Cost: one pass over the calibration data for the float means, then one per corrected layer, each
stopped at the layer it measures.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx

from fxquant.errors import FxQuantError
from fxquant.nn import WeightedAct, set_fake_quant
from fxquant.per_layer import layer_by_layer, read_layer_inputs


def correctable_layers(qmodel: fx.GraphModule) -> list[tuple[str, WeightedAct]]:
    """(name, module) of every layer bias correction shifts, in graph order."""
    calls = Counter(n.target for n in qmodel.graph.nodes if n.op == "call_module")
    modules = [(n.target, qmodel.get_submodule(n.target)) for n in qmodel.graph.nodes if n.op == "call_module"]
    return [(name, m) for name, m in modules if calls[name] == 1 and isinstance(m, WeightedAct)
            and m.weight_fq is not None and m.output_bias is not None]


def _channel_means(qmodel: fx.GraphModule, layers: list[WeightedAct], batches, *, stop: bool) -> list[torch.Tensor]:
    """Per layer, the mean of its pre-activation output per channel over every batch and position (float64)."""
    sums: list = [0.0] * len(layers)
    counts = [0] * len(layers)

    def record(i: int, args) -> None:
        module = layers[i]
        y = module.pre_activation(*args).detach()
        y = y.movedim(module.channel_axis, -1).reshape(-1, y.shape[module.channel_axis])
        sums[i] = sums[i] + y.double().sum(0)
        counts[i] += y.shape[0]

    seen = read_layer_inputs(qmodel, layers, record, batches, stop=stop)
    if seen == 0:
        raise FxQuantError("calib_data: bias correction reads it once per corrected layer, and a pass found it empty; "
                           "pass a list or a DataLoader, not a generator")
    return [s / n for s, n in zip(sums, counts)]


@torch.no_grad()
def correct_bias(qmodel: fx.GraphModule, calib_data, *, n_inputs: int | None = None, progress: bool = True) -> list[str]:
    """Shift each layer's bias so its mean output per channel on `calib_data` is the float model's (see the
    module docstring). `qmodel` must be calibrated; its flags and train/eval mode are kept. Returns the
    names of the corrected layers."""
    from tqdm.auto import tqdm

    with layer_by_layer(qmodel, calib_data, n_inputs=n_inputs, who="correct_bias", option="bias_correction") as batches:
        layers = correctable_layers(qmodel)
        set_fake_quant(qmodel, observe=False, enabled=False)  # the float model
        float_means = _channel_means(qmodel, [m for _, m in layers], batches, stop=False)
        set_fake_quant(qmodel, enabled=True)
        for (_, m), target in tqdm(list(zip(layers, float_means)), desc="bias correction", disable=not progress, leave=False):
            (quant,) = _channel_means(qmodel, [m], batches, stop=True)
            m.output_bias.add_((target - quant).to(m.output_bias.dtype))
    return [name for name, _ in layers]
