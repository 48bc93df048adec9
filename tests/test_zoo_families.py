"""One model per torchvision classification family, small, through quantize -> convert -> export_onnx ->
ONNX Runtime; ONNX Runtime must agree with the reference int8 graph.

Each family is built from torchvision's own classes (the same forward code as the zoo models) at
small widths and depths, so `make test` stays fast; `python -m fxquant.tools.coverage` runs the full
list at full size. BatchNorm statistics are measured on random images: a raw random init of a depthwise
net shrinks its signal to ~0 within a few blocks, and a comparison of zeros would prove nothing (each
test also checks the float logits are not flat; vit's zero-initialised head gets random weights).

Two checks, in quantization steps and dB:
- layer by layer, teacher-forced (fxquant.tools.coverage.layerwise_steps): every quantized tensor of
  ONNX Runtime equals the reference op computed from ONNX Runtime's own inputs within one step;
- at the output: SQNR of ONNX Runtime against the reference >= 30 dB, or, for a random network that
  amplifies noise (its int8-vs-float SQNR is below 30 dB), at least that int8-vs-float SQNR: the file
  adds less error than quantization does. Same top-1 on every row (any of the reference's tied maxima).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision import models as M
from torchvision.models import efficientnet, mobilenetv3, regnet, resnet, swin_transformer, vgg

import fxquant
from conftest import assert_onnx_matches_int8


pytestmark = pytest.mark.usefixtures("one_thread")


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
# what trace keeps whole, in float (and reports): torchvision wraps swin's patch-merging pad with torch.fx.wrap (its
# attention, wrapped too, is traced through fxquant.traceable's stand-in)
LEAVES = {"swin": {"_patch_merging_pad"}, "swin_v2": {"_patch_merging_pad"}}


def _measured_batchnorms(model: nn.Module, size: int) -> nn.Module:
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


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_reaches_onnxruntime_and_agrees_with_reference(family, tmp_path):
    build, size = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    if family == "vit":
        nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision starts it at zero: flat logits
    model = _measured_batchnorms(model, size)
    g = torch.Generator().manual_seed(2)
    example = torch.randn(1, 3, size, size, generator=g)
    calib = [torch.randn(4, 3, size, size, generator=g) for _ in range(2)]
    qmodel = fxquant.quantize(model, example, calib_data=calib, progress=False)
    rep = fxquant.report(qmodel)
    assert {o.op for o in rep.leaves} == LEAVES.get(family, set()), str(rep)
    assert len(rep.quantized) >= len(rep.ops) // 5, str(rep)  # most of the compute is quantized
    assert not [o for o in rep.float_by_rule if o.op == "einsum"], str(rep)  # maxvit's einsums are matmuls: quantized
    adds = [o.rule for o in rep.ops if o.rule in ("add", "add_relu", "residual_add")]
    if family == "vit":  # pre-norm: every residual sum is read by LayerNorms and adds only (and x.dim())
        assert set(adds) == {"residual_add"}, str(rep)
    if family in ("resnet", "mobilenet_v2"):  # an integer kernel reads each sum: QLinearAdd
        assert adds and "residual_add" not in adds, str(rep)
    if family == "swin_v2":  # post-norm x + norm(f(x)): the next block's qkv reads the sum; only the last is float
        assert adds.count("residual_add") == 1 and "add" in adds, str(rep)
    int8 = fxquant.convert(qmodel)
    path = tmp_path / f"{family}.onnx"
    fxquant.export_onnx(int8, path, example)

    assert_onnx_matches_int8(model, int8, path, torch.randn(4, 3, size, size, generator=g), family)  # another batch size


class EinsumAttention(nn.Module):
    """maxvit's attention einsums (spaces and all), an ellipsis form, and two einsums that are no matmul."""

    def forward(self, q, k, v):
        attn = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k).softmax(dim=-1)
        out = torch.einsum("...ij,...jd->...id", attn, v)
        return out + torch.einsum("bghid,bghid->bghi", q, k).unsqueeze(-1) + torch.einsum("bghid->bghdi", v).mean()


def test_einsum_that_is_a_matmul_becomes_a_quantized_matmul():
    from fxquant.passes import decompose_ops, trace_model

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 2, 5, 4, generator=g) for _ in range(3))
    model = EinsumAttention()
    gm = decompose_ops(trace_model(model, example_inputs=(q, k, v)))
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.matmul) == 2 and ops.count(torch.transpose) == 1  # k^T for the first, none for the second
    assert ops.count(torch.functional.einsum) == 2  # a row-wise dot and a permutation are declined
    torch.testing.assert_close(gm(q, k, v), model(q, k, v))

    qmodel = fxquant.quantize(model, (q, k, v), calib_data=[(q, k, v)], progress=False)
    rules = {n.name: n.meta["fxquant"].rule for n in qmodel.graph.nodes if "fxquant" in n.meta}
    # the q k^T einsum feeds softmax: the attention row (scores float inside it); attn @ v: the matmul row
    assert rules["einsum"] == "attention_scores" and rules["einsum_1"] == "matmul" and rules["einsum_2"] == "float_math"
