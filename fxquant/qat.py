"""QAT: freeze BatchNorm statistics and observers on a schedule, a plain training loop, a DDP check.

The workflow (train float -> insert fake-quant -> calibrate -> QAT -> export):

    qmodel = fxquant.quantize(model, example, qat=True, calib_data=calib)   # conv-bn kept as ConvBnAct2d
    fxquant.qat.train(qmodel, batches, optimizer=torch.optim.SGD(qmodel.parameters(), 1e-3),
                      loss_fn=F.cross_entropy, epochs=2, freeze_bn_after=300, freeze_observers_after=400)
    fxquant.export_onnx(qmodel, "model.onnx", example)

Freezing BN (Krishnamoorthi 2018, sec. 3.2): after `freeze_bn`, training uses the running statistics, so
train and eval compute the same function for the last steps. Freezing observers fixes the ranges of
"ste" fake-quants; learned ("lsq") scales keep training, they are parameters.

Distributed training: observers all-reduce their batch ranges in training mode (fxquant.observers.MinMaxObserver),
learned scales are parameters whose gradients DDP averages, and ConvBnAct2d's BN statistics are
buffers that DDP broadcasts from rank 0 (its default broadcast_buffers=True), as for a plain BatchNorm.
`assert_ranks_agree` checks that every rank holds the same qparams.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fxquant.errors import FxQuantError
from fxquant.nn import BnFolded, FakeQuantize, fake_quants, set_fake_quant
from fxquant.pending import PendingQuantization, not_run_yet


def _bn_modules(qmodel: nn.Module) -> list[BnFolded]:
    return [m for m in qmodel.modules() if isinstance(m, BnFolded)]


def freeze_bn(qmodel: nn.Module) -> int:
    """Stop the BatchNorm batch statistics of every ConvBnAct2d / LinearBnAct; returns how many were frozen.

    The running mean/variance stay as they are and training continues on the eval-mode formula
    act(conv(x, fq(w_fold)) + b_fold). Raises FxQuantError on a model without any (a PTQ model, or one
    quantized without qat=True, has its BN folded into the weights already: nothing is left to freeze).
    """
    if isinstance(qmodel, PendingQuantization):
        raise not_run_yet("freeze_bn")
    modules = _bn_modules(qmodel)
    if not modules:
        raise FxQuantError(
            "freeze_bn: the model has no conv-bn or linear-bn kept for QAT (fxquant.nn.ConvBnAct2d, LinearBnAct). quantize(..., qat=True) "
            "keeps them; otherwise the BatchNorm is already folded into the weights (or there was none)"
        )
    for m in modules:
        m.freeze_bn()
    return len(modules)


def freeze_observers(qmodel: nn.Module) -> None:
    """Fix the current ranges: no observer updates from now on (learned scales keep training)."""
    set_fake_quant(qmodel, observe=False)


def _check_step(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise FxQuantError(f"{name}={value!r}: expected None (never) or a step count >= 0")


class QATSchedule:
    """Freezes on a step count: call `step()` after every optimizer step (step 0 freezes at once).

    freeze_bn_after: after that many steps, freeze_bn(qmodel).
    freeze_observers_after: after that many steps, freeze_observers(qmodel).
    """

    def __init__(self, qmodel: nn.Module, *, freeze_bn_after: int | None = None, freeze_observers_after: int | None = None):
        _check_step("freeze_bn_after", freeze_bn_after)
        _check_step("freeze_observers_after", freeze_observers_after)
        if freeze_bn_after is not None and not _bn_modules(qmodel):
            freeze_bn(qmodel)  # raises, naming the problem, before any training
        if not fake_quants(qmodel):
            raise FxQuantError("QATSchedule: the model has no fake-quant; pass the model fxquant.quantize() returned")
        self.qmodel, self.steps = qmodel, 0
        self.freeze_bn_after, self.freeze_observers_after = freeze_bn_after, freeze_observers_after
        self._apply()

    def _apply(self) -> None:
        if self.steps == self.freeze_bn_after:
            freeze_bn(self.qmodel)
        if self.steps == self.freeze_observers_after:
            freeze_observers(self.qmodel)

    def step(self) -> None:
        self.steps += 1
        self._apply()


def train(qmodel: nn.Module, data, *, optimizer: torch.optim.Optimizer, loss_fn, epochs: int = 1,
          freeze_bn_after: int | None = None, freeze_observers_after: int | None = None) -> QATSchedule:
    """A plain QAT loop over `data` ((inputs, target) batches) with the freezing schedule; returns it."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise FxQuantError(f"epochs={epochs!r}: expected an integer >= 1")
    schedule = QATSchedule(qmodel, freeze_bn_after=freeze_bn_after, freeze_observers_after=freeze_observers_after)
    qmodel.train()
    for _ in range(epochs):
        for inputs, target in data:
            loss = loss_fn(qmodel(inputs), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return schedule


def _flat_qparams(qmodel: nn.Module) -> tuple[list[str], list[int], torch.Tensor]:
    named = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, FakeQuantize)]
    values = [torch.cat([t.flatten() for t in m.qparams()]) for _, m in named]
    return [n for n, _ in named], [len(v) for v in values], torch.cat(values)


def assert_ranks_agree(qmodel: nn.Module) -> None:
    """Raise FxQuantError naming the first fake-quant whose scale or zero point differs between ranks.

    A collective: every rank must call it. Without torch.distributed initialized it checks nothing.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    names, sizes, flat = _flat_qparams(qmodel)
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    for name, differs in zip(names, (lo != hi).split(sizes)):
        if differs.any():
            raise FxQuantError(f"assert_ranks_agree: fake-quant '{name}' has different qparams on different ranks")
