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
from torchvision import models as M
from torchvision.models import efficientnet, mobilenetv3, regnet, resnet, swin_transformer, vgg


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


# ------------------------------------------------------------------ one small model per torchvision family
# Built from torchvision's own classes (the zoo models' forward code) at small widths and depths: what
# tests/test_zoo_families.py runs through ONNX Runtime and tools/export_fingerprint.py exports.


def _head(features: int) -> nn.Sequential:
    """alexnet/vgg's classifier (dropout, linear, relu x2, linear) at 32 wide instead of 4096."""
    return nn.Sequential(nn.Dropout(), nn.Linear(features, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 32),
                         nn.ReLU(True), nn.Linear(32, 10))


def _alexnet():
    model = M.AlexNet(num_classes=10)
    model.classifier = _head(256 * 6 * 6)
    return model


def _vgg():
    model = M.VGG(vgg.make_layers([8, "M", 16, "M", 32, "M"], batch_norm=True), num_classes=10)
    model.classifier = _head(32 * 7 * 7)
    return model


def _efficientnet():
    settings, last = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return M.EfficientNet(settings, dropout=0.2, last_channel=last, num_classes=10)


def _efficientnet_v2():
    settings = [efficientnet.FusedMBConvConfig(1, 3, 1, 8, 8, 1), efficientnet.FusedMBConvConfig(4, 3, 2, 8, 16, 2),
                efficientnet.MBConvConfig(4, 3, 2, 16, 24, 1)]
    return M.EfficientNet(settings, dropout=0.2, last_channel=64, num_classes=10)


def _mobilenet_v3():
    settings, last = mobilenetv3._mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.5)
    return M.MobileNetV3(settings, last, num_classes=10)


def _swin(v2: bool):
    extra = dict(block=swin_transformer.SwinTransformerBlockV2, downsample_layer=swin_transformer.PatchMergingV2) if v2 else {}
    return M.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=[4, 4],
                             stochastic_depth_prob=0.0, num_classes=10, **extra)


FAMILIES = {  # family: (builder, input size)
    "alexnet": (_alexnet, 64),
    "convnext": (lambda: M.ConvNeXt([M.convnext.CNBlockConfig(16, 32, 1), M.convnext.CNBlockConfig(32, None, 1)],
                                    layer_scale=0.5, num_classes=10), 32),
    "densenet": (lambda: M.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2, num_classes=10), 32),
    "efficientnet": (_efficientnet, 32),
    "efficientnet_v2": (_efficientnet_v2, 32),
    "googlenet": (lambda: M.GoogLeNet(num_classes=10, aux_logits=False, init_weights=True), 32),
    "inception": (lambda: M.Inception3(num_classes=10, aux_logits=False, init_weights=True), 75),
    "maxvit": (lambda: M.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
                                block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10), 32),
    "mnasnet": (lambda: M.MNASNet(0.5, num_classes=10), 32),
    "mobilenet_v2": (lambda: M.MobileNetV2(width_mult=0.35, num_classes=10), 32),
    "mobilenet_v3": (_mobilenet_v3, 32),
    "regnet": (lambda: M.RegNet(regnet.BlockParams.from_init_params(depth=4, w_0=8, w_a=8.0, w_m=2.0, group_width=8,
                                                                     se_ratio=0.25), num_classes=10, stem_width=8), 32),
    "resnet": (lambda: M.ResNet(resnet.Bottleneck, [1, 1, 1, 1], groups=2, width_per_group=16, num_classes=10), 32),
    "shufflenet": (lambda: M.ShuffleNetV2([2, 2, 2], [8, 16, 32, 64, 128], num_classes=10), 32),
    "squeezenet": (lambda: M.SqueezeNet("1_1", num_classes=10), 48),
    "swin": (lambda: _swin(False), 32),
    "swin_v2": (lambda: _swin(True), 32),
    "vgg": (_vgg, 32),
    "vit": (lambda: M.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                        mlp_dim=64, num_classes=10), 32),
}


def measured_batchnorms(model: nn.Module, size: int) -> nn.Module:
    """Every BatchNorm's statistics measured on 8 random images (seeded): see tests/test_zoo_families.py."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # the plain average of the batches
            m.train()
        if norms:
            model(torch.randn(8, 3, size, size, generator=g))
    return model.eval()


def small_family_model(family: str) -> tuple[nn.Module, int]:
    """(the small eval model of `family`, seeded, BatchNorms measured; its input size)."""
    build, size = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    if family == "vit":
        nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts it at zero: flat logits
    return measured_batchnorms(model, size), size
