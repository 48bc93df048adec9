"""Distributed QAT: two CPU processes (gloo) train one model under DDP on different data.

Observers all-reduce their batch ranges in training mode and learned scales are parameters whose
gradients DDP averages, so every rank must end with the same qparams, and the activation ranges must
be those of the data of both ranks together. DDP runs with broadcast_buffers=False, so nothing but
fxquant's own synchronisation can make the observer buffers agree.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

WORLD = 2
STEPS = 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    scale = 1.0 + 3.0 * rank  # rank 1 sees much wider inputs than rank 0
    return torch.randn(4, 3, 8, 8, generator=g) * scale, torch.randint(0, 4, (4,), generator=g)


def _worker(rank: int, port: int, out_dir: str) -> None:
    import fxquant
    from fxquant.nn import FakeQuantize
    from fxquant.qat import assert_ranks_agree

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        example = torch.randn(2, 3, 8, 8)
        results = {}
        for kind in ("ste", "lsq"):
            qm = fxquant.quantize(Net(), example, qat=True, fake_quant=kind, progress=False)
            ddp = nn.parallel.DistributedDataParallel(qm, broadcast_buffers=False)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
            for step in range(STEPS):
                x, y = _batch(rank, step)
                loss = F.cross_entropy(ddp(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            assert_ranks_agree(qm)  # raises on any difference
            results[kind] = {n: [t.clone() for t in m.qparams()] for n, m in qm.named_modules() if isinstance(m, FakeQuantize)}
            results[kind + "_x_range"] = (qm.x_fq.observer.min_val.clone(), qm.x_fq.observer.max_val.clone())
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("torch.distributed with gloo is needed for this test")
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("kind", ["ste", "lsq"])
def test_scales_are_identical_on_every_rank(ranks, kind):
    r0, r1 = ranks[0][kind], ranks[1][kind]
    assert r0.keys() == r1.keys() and "x_fq" in r0 and "conv.weight_fq" in r0
    for name in r0:
        for a, b in zip(r0[name], r1[name]):
            assert torch.equal(a, b), name


def test_activation_ranges_cover_the_data_of_both_ranks(ranks):
    lo, hi = ranks[0]["ste_x_range"]
    everything = torch.cat([_batch(r, s)[0] for r in range(WORLD) for s in range(STEPS)])
    assert lo == everything.min() and hi == everything.max()  # minmax over all ranks' batches
    rank0_only = torch.cat([_batch(0, s)[0] for s in range(STEPS)])
    assert hi > rank0_only.max()  # so rank 0 really took rank 1's wider range
