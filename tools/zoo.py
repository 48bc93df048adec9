"""Random-init torchvision models whose logits keep a spread: what the coverage and deployment tools run.

A raw random init is a poor test model. With BatchNorm statistics of 0 and 1 (torchvision's defaults)
a depthwise network (mobilenet, efficientnet) shrinks its activations block after block, to logits
that vary by ~1e-10..1e-14; ViT zero-initialises its head, so its logits are exactly 0. Comparing two
implementations of such a model says nothing. `random_model` therefore, after torchvision's own init:

    BatchNorm (every _BatchNorm, seeded)   running_mean ~ U(-0.1, 0.1)   running_var ~ U(0.5, 1.5)
                                           weight       ~ U(0.75, 1.25)  bias        ~ U(-0.1, 0.1)
    a Linear whose weight is all zero      weight ~ N(0, 1 / in_features) (seeded), bias 0
    any other all-zero parameter           ~ N(0, 1) (seeded; ViT's class token, which otherwise
                                           sits a few quantization steps from 0 in the residual stream)
    HE_INIT models' conv/linear weights     weight ~ N(0, 2 / fan_in) (seeded, He's scale for ReLU nets)

HE_INIT holds inception_v3: torchvision draws every one of its convs from N(0, 0.1^2) whatever the
fan-in (up to 2592), a gain of up to ~5 per layer. Its logits reach ~1e8 and the network is chaotic:
a handful of one-step rounding ties in its first layers (20 of 1.5M elements differ between two
exact-up-to-ties int8 implementations) spread to 20% of the elements by Mixed_6a, so any comparison of
two implementations drifts apart. At He's scale the gain per layer is ~1 and the logits std ~1.

Nothing is downloaded; the same (name, seed) gives the same model.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_batchnorms(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Every BatchNorm's statistics (and affine parameters) drawn around their defaults: see the module docstring."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.rand(m.num_features, generator=generator) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=generator) * 0.5 + 0.75)
                m.bias.copy_(torch.rand(m.num_features, generator=generator) * 0.2 - 0.1)
    return model


HE_INIT = ("inception_v3",)  # torchvision's init is chaotic here: see the module docstring


@torch.no_grad()
def he_init(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Every Conv2d / Linear weight drawn from N(0, 2 / fan_in), fan_in = in_channels/groups * kernel area."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * (2 / m.weight[0].numel()) ** 0.5)
    return model


@torch.no_grad()
def redraw_zero_parameters(model: nn.Module, generator: torch.Generator) -> list[str]:
    """Every all-zero parameter that is not a bias (torchvision: ViT's head weight and class token) drawn
    afresh, seeded: a Linear's weight from N(0, 1 / in_features), anything else from N(0, 1) (a token on
    the scale of the patch embeddings). Returns their names."""
    names = []
    for module_name, m in model.named_modules():
        for name, p in m.named_parameters(recurse=False):
            if name == "bias" or p.any():
                continue
            scale = m.in_features**-0.5 if isinstance(m, nn.Linear) and name == "weight" else 1.0
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
            names.append(f"{module_name}.{name}" if module_name else name)
    return names


def random_model(name: str, seed: int = 0) -> nn.Module:
    """torchvision model `name`, random init (seeded, eval), BatchNorms randomized, zero parameters re-drawn (HE_INIT: He init)."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None).eval()
    g = torch.Generator().manual_seed(seed + 1)
    if name in HE_INIT:
        he_init(model, torch.Generator().manual_seed(seed + 2))
    randomize_batchnorms(model, g)
    redraw_zero_parameters(model, g)
    return model
