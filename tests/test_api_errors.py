"""The public API: bad arguments fail with an FxQuantError naming the argument; good calls leave the
user's model alone, train under QAT, and survive a state_dict round trip."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import fxquant
from fxquant import FxQuantError
from fxquant.nn import FakeQuantize


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(w_bits=0), r"^w_bits=0: "),
        (dict(w_bits=16), r"^w_bits=16: "),
        (dict(a_bits=9), r"^a_bits=9: "),
        (dict(a_bits=True), r"^a_bits=True: "),
        (dict(backend="no_such_runtime"), r"^backend='no_such_runtime': expected one of"),
        (dict(exclude="block"), r"^exclude='block': "),
    ],
    ids=["w_bits_0", "w_bits_16", "a_bits_9", "a_bits_bool", "unknown_backend", "exclude_string"],
)
def test_bad_option_names_the_argument(residual_cnn, image, kwargs, named):
    with pytest.raises(FxQuantError, match=named):
        fxquant.quantize(residual_cnn, (image,), progress=False, **kwargs)


def test_empty_calib_data_is_named(residual_cnn, image):
    with pytest.raises(FxQuantError, match=r"^calib_data is empty"):
        fxquant.quantize(residual_cnn, (image,), calib_data=[], progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_calib_data_is_named(residual_cnn, image, bad):
    poisoned = image.clone()
    poisoned[1, 2, 3, 4] = bad
    with pytest.raises(FxQuantError, match=r"^calib_data batch 1 contains NaN or Inf"):
        fxquant.quantize(residual_cnn, (image,), calib_data=[image, (poisoned, torch.tensor(0))], progress=False)


@pytest.mark.parametrize("model", [lambda x: x * 2, torch.randn(3), "resnet18"], ids=["function", "tensor", "string"])
def test_non_module_model_is_named(image, model):
    with pytest.raises(FxQuantError, match=r"^model: expected an nn.Module"):
        fxquant.quantize(model, (image,), progress=False)


@pytest.mark.parametrize(
    "inputs, named",
    [
        (lambda img: (img[:, :2],), r"^example_inputs: node 'stem'"),  # 2 channels into a 3-channel conv
        (lambda img: (img[:, :, :, 0],), r"^example_inputs: node '"),  # a dimension short
        (lambda img: (img, img), r"^example_inputs: the model takes 1 inputs"),
        (lambda img: (), r"^example_inputs: expected a tensor"),
        (lambda img: None, r"^example_inputs: expected a tensor"),
    ],
    ids=["wrong_channels", "wrong_rank", "too_many", "empty", "none"],
)
def test_bad_example_inputs_are_named(residual_cnn, image, inputs, named):
    with pytest.raises(FxQuantError, match=named):
        fxquant.quantize(residual_cnn, inputs(image), progress=False)


def test_a_single_tensor_is_accepted_as_example_inputs(residual_cnn, image):
    qm = fxquant.quantize(residual_cnn, image, calib_data=[image], progress=False)
    assert qm(image).shape == (2, 5)


@pytest.mark.parametrize("qat", [False, True], ids=["ptq", "qat"])
def test_quantize_does_not_modify_the_users_model(residual_cnn, image, calib_batches, qat):
    before = copy.deepcopy(residual_cnn.state_dict())
    modules_before = [type(m) for m in residual_cnn.modules()]
    qm = fxquant.quantize(residual_cnn, (image,), calib_data=calib_batches, qat=qat, progress=False)
    if qat:
        qm(image)  # a training-mode forward of the copy must not reach the original either
    assert residual_cnn.state_dict().keys() == before.keys()
    for key, value in residual_cnn.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert [type(m) for m in residual_cnn.modules()] == modules_before
    assert not residual_cnn.training  # it came in eval mode and stays there
    assert not any(p is q for p in residual_cnn.parameters() for q in qm.parameters())


def test_qat_model_trains(residual_cnn, image):
    g = torch.Generator().manual_seed(5)
    x, target = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)
    qm = fxquant.quantize(residual_cnn, (image,), qat=True, progress=False)
    assert qm.training and all(fq.observe and fq.enabled for fq in qm.modules() if isinstance(fq, FakeQuantize))
    opt = torch.optim.SGD(qm.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(6):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(qm(x), target)
        loss.backward()
        if step == 0:  # the STE lets gradients through the weight fake-quant to every float weight
            for name in ("stem", "block.conv1", "block.conv2", "fc"):
                grad = qm.get_submodule(name).weight.grad
                assert grad is not None and grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses  # 1.56 -> 1.15 on this seed


def test_state_dict_round_trip_gives_identical_outputs(residual_cnn, image, calib_batches, generator):
    qm = fxquant.quantize(residual_cnn, (image,), calib_data=calib_batches, progress=False)
    buffer = io.BytesIO()
    torch.save(qm.state_dict(), buffer)
    buffer.seek(0)
    restored = fxquant.quantize(residual_cnn, (image,), progress=False)  # the documented way back
    restored.load_state_dict(torch.load(buffer))
    x = torch.randn(4, 3, 16, 16, generator=generator) * 3  # wider than calibration: ranges must not move
    with torch.no_grad():
        assert torch.equal(restored(x), qm(x))
        assert torch.equal(restored(x), qm(x))  # and stay put on a second call
        assert torch.equal(fxquant.convert(restored)(x), fxquant.convert(qm)(x))


def test_qat_state_dict_round_trip_keeps_training_behaviour(residual_cnn, image):
    qm = fxquant.quantize(residual_cnn, (image,), qat=True, progress=False)
    qm(image)
    # a QAT checkpoint loads into a qat=True model (conv-bn stays ConvBnAct2d); flags turned off here come back on
    restored = fxquant.quantize(residual_cnn, (image,), qat=True, progress=False, calib_data=[image * 0.1])
    fxquant.set_fake_quant(restored, observe=False, enabled=False)
    restored.load_state_dict(qm.state_dict())
    restored.train()
    assert all(fq.observe and fq.enabled for fq in restored.modules() if isinstance(fq, FakeQuantize))
    x = image * 2
    with torch.no_grad():
        assert torch.equal(restored(x), qm(x))


def test_pickled_fake_quant_model_runs_the_same_and_convert_says_how_to_rebuild(calibrated_residual, image):
    back = pickle.loads(pickle.dumps(calibrated_residual))
    with torch.no_grad():
        assert torch.equal(back(image), calibrated_residual(image))
    with pytest.raises(FxQuantError, match=r"lost fxquant's annotations.*load_state_dict"):
        fxquant.convert(back)  # node.meta does not survive pickling; the message names the way back
