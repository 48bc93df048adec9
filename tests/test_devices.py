"""Fake-quant and a QAT step on every device this machine has (CPU always; CUDA where torch sees one).

Each case compares the device's result with the CPU oracle, so running this file on a GPU machine
is the CUDA check: `python -m pytest tests/test_devices.py -q`.
"""

import pytest
import torch
from torch import nn

import fxquant
from fxquant.numerics import dequantize, fake_quant, quantize

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_fake_quant_forward_and_ste_backward_match_the_cpu_oracle(device):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 5, 5, generator=g) * 3).requires_grad_()
    scale, zp = torch.tensor([0.05, 0.1, 0.02]), torch.zeros(3)
    oracle = dequantize(quantize(x.detach(), scale, zp, -127, 127, axis=1), scale, zp, axis=1)
    inside = (torch.round(x.detach() / scale.view(1, 3, 1, 1)).abs() <= 127).float()

    xd = x.detach().to(device).requires_grad_()
    y = fake_quant(xd, scale.to(device), zp.to(device), -127, 127, axis=1)
    y.sum().backward()
    assert y.device.type == device
    torch.testing.assert_close(y.detach().cpu(), oracle, rtol=0, atol=1e-6)  # same grid point: 0 steps apart
    torch.testing.assert_close(xd.grad.cpu(), inside, rtol=0, atol=0)  # STE: 1 inside the range, 0 where clipped


@pytest.mark.parametrize("device", DEVICES)
def test_qat_step_runs_on_device_and_converts(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    qmodel = fxquant.quantize(model, x, qat=True, calib_data=[x], progress=False).to(device)
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(qmodel(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    int8 = fxquant.convert(qmodel.cpu().eval())
    with torch.no_grad():
        assert torch.isfinite(int8(x)).all()
