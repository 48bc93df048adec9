"""Small inline models and seeded inputs shared by the pass and oracle tests.

Nothing here touches the network; every tensor comes from a generator seeded by the fixture
that asks for it, so a test sees the same numbers whatever order the suite runs in.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant


def randomize_batchnorms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so folding is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model


class RootBranch(nn.Module):
    """The untraceable `if` is in the model's own forward, not in a submodule."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:
            return y
        return -y


class ResidualCatNet(nn.Module):
    """conv-bn-relu, maxpool, a residual block (relu(conv2(relu(conv1 x)) + x)), two conv heads, cat."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.MaxPool2d(2)
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head_a, self.head_b = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.stem(x))))
        x = F.relu(self.conv2(F.relu(self.conv1(x))) + x)
        return torch.cat([self.head_a(x), self.head_b(x)], 1)


class BasicBlock(nn.Module):
    """torchvision's resnet BasicBlock: one `self.relu` module called at two sites."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu(out)


class ResidualCNN(nn.Module):
    """stem conv-bn-F.relu, maxpool, a BasicBlock, global avgpool, flatten, linear.

    After trace + fuse the graph is, by node name:
        x, stem, pool, block_conv1, block_conv2, add, block_relu_1, gap, flatten, fc, output
    """

    def __init__(self, channels: int = 8, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.pool = nn.MaxPool2d(2)
        self.block = BasicBlock(channels)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.pool(x)
        x = self.block(x)
        x = torch.flatten(self.gap(x), 1)
        return self.fc(x)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Module initialisation in every test starts from the same seed."""
    torch.manual_seed(0)


@pytest.fixture
def randomize_bn():
    """`randomize_batchnorms` for tests that build their own models."""
    return randomize_batchnorms


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def residual_cnn() -> ResidualCNN:
    torch.manual_seed(0)
    return randomize_batchnorms(ResidualCNN()).eval()


@pytest.fixture
def image(generator) -> torch.Tensor:
    """One example batch for ResidualCNN: (2, 3, 16, 16)."""
    return torch.randn(2, 3, 16, 16, generator=generator)


@pytest.fixture
def calib_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return [torch.randn(2, 3, 16, 16, generator=g) for _ in range(4)]


@pytest.fixture
def calibrated_residual(residual_cnn, image, calib_batches) -> torch.fx.GraphModule:
    """ResidualCNN through fxquant.quantize with PTQ calibration: the fake-quant model."""
    return fxquant.quantize(residual_cnn, (image,), calib_data=calib_batches, progress=False)


CPUS = (None, "haswell", "nehalem")  # this CPU, AVX2 without VNNI, SSE4 (qemu-user): every test run checks all three


def assert_file_matches_int8(int8, path, x, what: str = "model", cpus=CPUS, level: str = "extended") -> list:
    """The file at `path` against the reference `int8` graph on `x`, on this CPU and each emulated one:
    every quantized tensor within one step teacher-forced, and the file's own output (nothing exposed)
    within one output step where the graph ends in a dequantize, with the same top-1. Returns the
    fxquant.check.Layerwise of each CPU."""
    from fxquant.check import agreement, layerwise, output_scale

    with torch.no_grad():
        ref = int8(x).numpy()
    step, found = output_scale(int8), []
    for cpu in cpus:
        run = layerwise(int8, path, x, cpu=cpu, level=level)
        on = f"{what} on {run.cpu} ({run.isa})"
        assert run.max_steps <= 1, f"{on}: ONNX Runtime's '{run.worst}' is {run.max_steps} steps from the reference op"
        if step is not None:
            got = agreement(ref, run.outputs[0], step)
            assert got.max_steps <= 1 + 1e-4 and got.top1 == 1.0, f"{on}: output {got}"
        found.append(run)
    return found


def assert_onnx_matches_int8(model, int8, path, x, what: str = "model", cpus=CPUS) -> None:
    """The exported file at `path` against the reference `int8` graph on `x` (a batch size other than the
    example's), on this CPU and on each emulated one: every layer within one step teacher-forced, output
    SQNR >= 30 dB (or the int8 graph's own SQNR against float, when the random network is noisier than
    that) and the same top-1."""
    from fxquant.check import layerwise
    from fxquant.tools.coverage import same_top1, sqnr_db

    with torch.no_grad():
        ref, floats = int8(x).numpy(), model(x).numpy()
    assert floats.std() > 1e-3, "the float model's logits are flat: the comparison would prove nothing"
    bound = min(30.0, sqnr_db(floats, ref))
    for cpu in cpus:
        found = layerwise(int8, path, x, cpu=cpu)
        on = f"{what} on {found.cpu} ({found.isa})"
        assert found.max_steps <= 1, f"{on}: ONNX Runtime's '{found.worst}' is {found.max_steps} steps from the reference op on the same inputs"
        got = found.outputs[0]
        assert sqnr_db(ref, got) >= bound, f"{on}: ONNX Runtime vs reference int8 SQNR {sqnr_db(ref, got):.1f} dB < {bound:.1f}"
        assert same_top1(ref, got), f"{on}: ONNX Runtime's top-1 differs from the reference's"


@pytest.fixture
def one_thread():
    """Small models: one thread is faster than a pool (and the numbers do not depend on the pool size)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
