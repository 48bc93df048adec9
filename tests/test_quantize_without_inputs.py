"""fxquant.quantize(model): example inputs from the first calibration batch, or from the first call.

Each way must give the same model, bit for bit (graph code, every state_dict entry, the ONNX bytes), as
quantize(model, example_inputs) with inputs of the same shapes (other values: only shapes are read).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxquant
from fxquant import FxQuantError
from fxquant.demo import DigitNet
from fxquant.pending import PendingQuantization
from fxquant.tools.zoo import small_family_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _demo():
    torch.manual_seed(0)
    return DigitNet().eval(), 28


MODELS = {"demo": _demo, "resnet": lambda: small_family_model("resnet"), "vit": lambda: small_family_model("vit")}


def _loader(size: int, channels: int, seed: int = 3) -> DataLoader:
    """A DataLoader of (image, label) batches, 3 batches of 4."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(12, channels, size, size, generator=g)
    return DataLoader(TensorDataset(images, torch.randint(0, 10, (12,), generator=g)), batch_size=4)


def _channels(name: str) -> int:
    return 1 if name == "demo" else 3


def assert_same_model(a: torch.fx.GraphModule, b: torch.fx.GraphModule) -> None:
    assert a.code == b.code
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k], k
    assert a.training == b.training


def _onnx_bytes(qmodel, path, example) -> bytes:
    fxquant.export_onnx(fxquant.convert(qmodel.eval()), path, example)
    return path.read_bytes()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shapes_from_the_first_batch_of_a_dataloader(name, tmp_path):
    model, size = MODELS[name]()
    loader = _loader(size, _channels(name))
    implicit = fxquant.quantize(model, calib_data=loader, progress=False)
    same_shape = torch.randn(4, _channels(name), size, size)  # other values than the first batch's
    explicit = fxquant.quantize(model, same_shape, calib_data=loader, progress=False)
    assert_same_model(implicit, explicit)
    example = torch.randn(1, _channels(name), size, size)
    assert _onnx_bytes(implicit, tmp_path / "a.onnx", example) == _onnx_bytes(explicit, tmp_path / "b.onnx", example)


@pytest.mark.parametrize("name", ["demo", "resnet"])
def test_qat_from_a_dataloader(name):
    model, size = MODELS[name]()
    loader = _loader(size, _channels(name))
    implicit = fxquant.quantize(model, qat=True, calib_data=loader, progress=False)
    explicit = fxquant.quantize(model, torch.randn(4, _channels(name), size, size), qat=True, calib_data=loader, progress=False)
    assert implicit.training and all(fq.observe and fq.enabled for fq in fxquant.nn.fake_quants(implicit))
    assert_same_model(implicit, explicit)
    x = next(iter(loader))[0]
    torch.testing.assert_close(implicit(x), explicit(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_data_at_all_builds_at_the_first_call(name):
    model, size = MODELS[name]()
    x = torch.randn(2, _channels(name), size, size)
    pending = fxquant.quantize(model)
    assert isinstance(pending, PendingQuantization)
    same = pending
    out = pending(x)
    assert same is pending and isinstance(pending, torch.fx.GraphModule) and pending.graph.owning_module is pending
    explicit = fxquant.quantize(model, torch.randn(2, _channels(name), size, size))
    torch.testing.assert_close(out, explicit(x), rtol=0, atol=0)
    assert_same_model(pending, explicit)
    pending(x)  # built once: the second call runs the model
    assert pending.code == explicit.code


def test_no_data_then_calibrate_is_quantize_then_calibrate(tmp_path):
    model, size = _demo()
    loader = _loader(size, 1)
    pending = fxquant.quantize(model, progress=False)
    fxquant.calibrate(pending, loader, progress=False)
    explicit = fxquant.quantize(model, torch.randn(4, 1, size, size), progress=False)
    fxquant.calibrate(explicit, loader, progress=False)
    assert_same_model(pending, explicit)
    fxquant.export_onnx(fxquant.convert(pending), tmp_path / "m.onnx")  # the recorded inputs: one row of the first batch
    assert fxquant.check_onnx(tmp_path / "m.onnx") == []


def test_qat_with_no_data_builds_at_the_first_training_step():
    model, size = MODELS["resnet"]()
    x = torch.randn(4, 3, size, size)
    pending = fxquant.quantize(model, qat=True)
    explicit = fxquant.quantize(model, torch.randn(4, 3, size, size), qat=True)
    assert pending.training
    out_pending, out_explicit = pending(x), explicit(x)
    torch.testing.assert_close(out_pending, out_explicit, rtol=0, atol=0)
    assert_same_model(pending, explicit)  # BatchNorm statistics and observer ranges moved alike
    torch.optim.SGD(pending.parameters(), lr=0.1)  # the quantized model's parameters, now that it exists


def test_a_one_shot_iterator_keeps_its_first_batch_for_calibration():
    model, size = _demo()
    batches = [b for b, _ in _loader(size, 1)]
    from_generator = fxquant.quantize(model, calib_data=(b for b in batches), progress=False)
    from_list = fxquant.quantize(model, calib_data=batches, progress=False)
    assert_same_model(from_generator, from_list)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


def test_the_forward_signature_says_how_many_items_of_a_batch_are_inputs():
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g), torch.tensor([0, 1, 2])) for _ in range(2)]
    model = TwoInputs()
    implicit = fxquant.quantize(model, calib_data=batches, progress=False)  # (x, y, label): x and y
    explicit = fxquant.quantize(model, (torch.randn(3, 6), torch.randn(3, 6)), calib_data=batches, progress=False)
    assert_same_model(implicit, explicit)
    with pytest.raises(FxQuantError, match=r"^calib_data batch 0 holds 1 input\(s\) and the model's forward takes 2"):
        fxquant.quantize(model, calib_data=[torch.randn(3, 6)], progress=False)


@pytest.mark.parametrize(
    "call",
    [
        lambda p, path: fxquant.convert(p),
        lambda p, path: fxquant.export_onnx(p, path),
        lambda p, path: fxquant.export_onnx(p, path, torch.randn(1, 1, 28, 28)),
        lambda p, path: p.parameters(),
        lambda p, path: p.state_dict(),
        lambda p, path: fxquant.report(p),
        lambda p, path: fxquant.freeze_bn(p),
    ],
    ids=["convert", "export_onnx", "export_onnx_with_inputs", "parameters", "state_dict", "report", "freeze_bn"],
)
def test_what_needs_shapes_before_the_first_call_says_what_to_pass(call, tmp_path):
    pending = fxquant.quantize(_demo()[0])
    with pytest.raises(FxQuantError, match=r"has not run yet.*Fix: call it once, qmodel\(x\), or fxquant.calibrate"):
        call(pending, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_empty_data_and_no_inputs_for_a_float_export_are_named(tmp_path):
    model, _ = _demo()
    with pytest.raises(FxQuantError, match=r"^calib_data is empty"):
        fxquant.quantize(model, calib_data=[], progress=False)
    with pytest.raises(FxQuantError, match=r"^export_onnx: example_inputs: this model records none"):
        fxquant.export_onnx(model, tmp_path / "f.onnx")
    with pytest.raises(FxQuantError, match=r"^example_inputs: expected a tensor"):  # None given is a mistake, named
        fxquant.quantize(model, None)
