"""fxquant.sensitivity and fxquant.mixed_precision on small models trained on sklearn's 8x8 digits (seconds).

Every numeric check computes the same quantity a second, independent way: the fake-quant math by the
oracle fxquant.numerics, the gradient of cross-entropy analytically, the integer program by enumeration.
"""

from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.mixed_precision import FLOAT, solve
from fxquant.nn import FakeQuantize
from fxquant.numerics import fake_quant
from fxquant.sensitivity import as_batches, evaluate, quantizable_layers, units


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    return (x - 0.3) / 0.4, torch.tensor(y)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class Block(nn.Module):
    """conv-bn-relu stem; conv1 and a 1x1 shortcut read the same activation (one unit); add, avgpool, fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1, self.shortcut = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x.reshape(-1, 1, 8, 8))
        x = F.relu(self.conv1(x) + self.shortcut(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _train(model, steps=150):
    torch.manual_seed(0)
    x, y = _digits()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(steps):
        idx = torch.arange(i * 64, i * 64 + 64) % 1500
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# Module fixtures are built before a test's autouse seed, so they seed themselves; unseeded, they drew whatever
# state the previous test left (xdist's order). No claim below depends on the init: the planted outlier is planted
# in the most active channel and is large enough that 4 bits zero every other channel, and the narrow-constraint
# floor is set from the measured all-4-bit plan. The whole file passes with FXQUANT_TEST_SEED=0, 1, ..., 9 (the
# pinned seed 5 it had before was the one of 1-6 where every claim held).
STARTUP_SEED = int(os.environ.get("FXQUANT_TEST_SEED", 0))


@pytest.fixture(scope="module")
def mlp():
    torch.set_num_threads(1)
    torch.manual_seed(STARTUP_SEED)
    return _train(MLP())


@pytest.fixture(scope="module")
def block():
    torch.set_num_threads(1)
    torch.manual_seed(STARTUP_SEED)
    return _train(Block(), steps=100)


def _val(n=200):
    x, y = _digits()
    return [(x[1500 + i: 1500 + i + 100], y[1500 + i: 1500 + i + 100]) for i in range(0, n, 100)]


def _bits(fq: FakeQuantize) -> int:
    return int(math.log2(fq.spec.qmax - fq.spec.qmin + 1) + 0.5)


# ---------------------------------------------------------------- which fake-quants a layer owns


def test_layers_own_exactly_what_layer_bits_sets(block):
    """quantize(layer_bits={name: (2, 2)}) narrows a set of fake-quants: it is the layer's fqs, no more, no less."""
    x = _val()[0][0]
    base = fxquant.quantize(block, x[:1], progress=False)
    layers = quantizable_layers(base)
    assert [layer.name for layer in layers] == ["stem.0", "conv1", "shortcut", "pool", "fc"]
    for layer in layers:
        narrowed = fxquant.quantize(block, x[:1], layer_bits={layer.name: (2, 2)}, progress=False)
        two_bit = {n for n, m in narrowed.named_modules() if isinstance(m, FakeQuantize) and _bits(m) == 2}
        assert two_bit == set(layer.fqs), layer.name
    grouped = [[layer.name for layer in g] for g in units(layers)]
    assert ["conv1", "shortcut"] in grouped and len(grouped) == 4


def test_no_quantizable_layer_is_an_error():
    model = nn.Sequential(nn.ReLU())
    with pytest.raises(fxquant.FxQuantError, match="nothing to quantize|no quantizable layer"):
        fxquant.sensitivity(model, [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))], progress=False)


@pytest.mark.parametrize("data, match", [
    ([], "empty"),
    ([torch.randn(4, 64)], "not an \\(inputs, targets\\) pair"),
    ([(torch.randn(4, 64), None)], "targets None"),
    (torch.randn(4, 64), "iterable of \\(inputs, targets\\)"),
])
def test_bad_data_is_named(mlp, data, match):
    with pytest.raises(fxquant.FxQuantError, match=match):
        fxquant.sensitivity(mlp, data, progress=False)


@pytest.mark.parametrize("metric, shown", [(lambda o, t: float("nan"), "nan"), (lambda o, t: "good", "'good'"),
                                           (lambda o, t: torch.tensor([1.0, 2.0]), "tensor")])
def test_bad_metric_is_named(mlp, metric, shown):
    with pytest.raises(fxquant.FxQuantError, match=f"metric returned {shown}"):
        fxquant.sensitivity(mlp, _val(100), metric=metric, progress=False)


# ---------------------------------------------------------------- numerics, two ways


def _fq(module: FakeQuantize, x):
    s = module.spec
    return fake_quant(x, module.scale, module.zero_point, s.qmin, s.qmax, s.axis)


def test_local_and_accumulated_sqnr_against_the_oracle(mlp):
    """fc1's local error and fc3's accumulated error recomputed with fxquant.numerics and the float nn.Linear."""
    data = _val(100)
    rep = fxquant.sensitivity(mlp, data, w_bits=4, a_bits=4, progress=False)
    qmodel = fxquant.quantize(mlp, data[0][0][:1], w_bits=4, a_bits=4, calib_data=[data[0][0]], progress=False)
    x = data[0][0]
    fq = dict(qmodel.named_modules())
    y = F.relu(mlp.fc1(x)).detach()  # fc1 fused with its ReLU: the layer's output is after it
    # the bias on the int32 grid s_x * s_w (what the layer does with both fake-quants on)
    b_scale = fq["x_fq"].scale * fq["fc1.weight_fq"].scale
    b_q = fake_quant(mlp.fc1.bias, b_scale, torch.zeros_like(b_scale), -(2**31), 2**31 - 1, 0)
    y_q = F.relu(F.linear(_fq(fq["x_fq"], x), _fq(fq["fc1.weight_fq"], mlp.fc1.weight), b_q)).detach()
    local = 10 * math.log10(float((y.double() ** 2).sum() / ((y_q.double() - y) ** 2).sum()))
    row = {r.name: r for r in rep.layers}
    assert row["fc1"].local_sqnr_db == pytest.approx(local, abs=0.01)

    with torch.no_grad():  # accumulated at fc3: the fully quantized model's fc3 output (before fc3's own output fq)
        seen = {}
        handle = qmodel.fc3.register_forward_hook(lambda m, i, o: seen.setdefault("y", o))
        qmodel(x)
        handle.remove()
    logits = mlp(x).detach()
    acc = 10 * math.log10(float((logits.double() ** 2).sum() / ((seen["y"].double() - logits) ** 2).sum()))
    assert row["fc3"].accumulated_sqnr_db == pytest.approx(acc, abs=0.01)
    assert row["fc1"].local_sqnr_db == pytest.approx(row["fc1"].accumulated_sqnr_db, abs=1e-6)  # nothing upstream


def test_grad_score_of_the_last_layer_with_the_analytic_gradient(mlp):
    """For the logits, d(sum CE)/dy = softmax(y) - onehot: the score 1/2 sum g^2 (y_q - y)^2 / N without autograd."""
    data = _val(100)
    x, t = data[0]
    rep = fxquant.sensitivity(mlp, data, w_bits=4, a_bits=4, progress=False)
    qmodel = fxquant.quantize(mlp, x[:1], w_bits=4, a_bits=4, calib_data=[x], progress=False)
    fq = dict(qmodel.named_modules())
    with torch.no_grad():
        h = F.relu(mlp.fc2(F.relu(mlp.fc1(x))))
        y = mlp.fc3(h)
        b_scale = fq["fc2_fq"].scale * fq["fc3.weight_fq"].scale
        b_q = fake_quant(mlp.fc3.bias, b_scale, torch.zeros_like(b_scale), -(2**31), 2**31 - 1, 0)
        y_q = _fq(fq["fc3_fq"], F.linear(_fq(fq["fc2_fq"], h), _fq(fq["fc3.weight_fq"], mlp.fc3.weight), b_q))
        g = torch.softmax(y, 1) - F.one_hot(t, 10)
        expected = 0.5 * float((g.double() ** 2 * (y_q.double() - y) ** 2).sum()) / len(x)
    row = {r.name: r for r in rep.layers}
    assert row["fc3"].grad_score == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------- a planted fault ranks first


def _plant_outlier(model: MLP, x: torch.Tensor, factor=300.0) -> tuple[MLP, int]:
    """fc1's most active output channel on `x` times `factor`, fc2's input column for it divided by it: the same
    function (ReLU is positively homogeneous), but every other channel of the activation fc2 reads is now below
    1/factor of its range: at 4 bits (a step of range/15) they all round to zero, whatever the init, because the
    channel chosen is the one with the largest values (a dead channel, all zeros, would plant nothing)."""
    import copy

    with torch.no_grad():
        channel = int(F.relu(model.fc1(x)).amax(0).argmax())
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.fc1.weight[channel] *= factor
        m.fc1.bias[channel] *= factor
        m.fc2.weight[:, channel] /= factor
    return m, channel


def test_planted_activation_outlier_is_ranked_first(mlp):
    data = _val(200)
    planted, channel = _plant_outlier(mlp, torch.cat([b[0] for b in data]))
    with torch.no_grad():  # by construction: at 4 bits only the planted channel of fc2's input survives
        h = F.relu(planted.fc1(torch.cat([b[0] for b in data])))
        others = torch.cat([h[:, :channel], h[:, channel + 1:]], 1)
        assert float(others.max()) < float(h[:, channel].max()) / 15 / 2
    rep = fxquant.sensitivity(planted, data, w_bits=4, a_bits=4, progress=False)
    assert abs(rep.float_metric - fxquant.sensitivity(mlp, data, w_bits=8, a_bits=8, progress=False).float_metric) <= 0.5
    ranked = rep.ranked()
    assert ranked[0].name == "fc2"
    assert rep.float_metric - ranked[0].only_a > 10  # the activation alone costs it
    assert max(rep.layers, key=lambda r: r.grad_score).name == "fc2"  # and the cheap score sees it
    assert min(rep.layers, key=lambda r: r.local_sqnr_db).name == "fc2"


def test_report_files_and_overlay_keyed_by_int8_node_names(mlp, tmp_path):
    data = _val(100)
    rep = fxquant.sensitivity(mlp, data, w_bits=4, a_bits=4, progress=False)
    paths = rep.save(str(tmp_path / "sens"))
    assert {p.rsplit(".", 1)[1] for p in paths} == {"json", "png", "svg"}
    doc = json.load(open(paths[0]))
    int8 = fxquant.convert(fxquant.quantize(mlp, data[0][0][:1], calib_data=[data[0][0]], progress=False))
    int8_nodes = {n.name for n in int8.graph.nodes}
    names = {o["name"]: o for o in doc["overlays"]}
    for key in ("local_sqnr_db", "accumulated_sqnr_db", "grad_score", "drop_only_quantized"):
        overlay = json.load(open(str(tmp_path / f"sens.{key}.json")))  # what `fxquant viz --overlay` reads
        assert overlay == names[key] and overlay["better"] in ("higher", "lower")
        assert set(overlay["values"]) == {"fc1", "fc2", "fc3"} <= int8_nodes
        assert all(isinstance(v, float) and math.isfinite(v) for v in overlay["values"].values())
    assert "spearman" in doc and "fc1" in str(rep)


# ---------------------------------------------------------------- mixed precision


def _brute_force(drops, params, widths, max_drop, never_float=()):
    best = None
    for pick in itertools.product(range(len(widths)), repeat=len(params)):
        if any(widths[pick[u]] is None for u in never_float):
            continue
        harm = sum(max(drops[u, i], 0) for u, i in enumerate(pick))
        size = sum(params[u] * (FLOAT if widths[i] is None else widths[i]) for u, i in enumerate(pick))
        if harm <= max_drop + 1e-9 and (best is None or size < best[0]):
            best = (size, harm)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_milp_matches_enumeration(seed):
    """The size the solver finds is the smallest of all 4**6 assignments that meet the budget; the last row
    (params 0, like the unowned fake-quants) cannot be float."""
    rng = np.random.default_rng(seed)
    widths = [2, 4, 8, None]
    drops = np.sort(rng.exponential(1.0, (6, 3)), axis=1)[:, ::-1]  # wider: less harm
    drops = np.concatenate([drops, np.zeros((6, 1))], 1) + rng.normal(0, 0.05, (6, 4))
    params = np.append(rng.integers(100, 10_000, 5), 0).astype(float)
    best = _brute_force(drops, params, widths, 1.5, never_float=[5])
    if best is None:  # no assignment meets the budget: the solver must say so
        with pytest.raises(fxquant.FxQuantError, match="no choice of widths"):
            solve(drops, params, widths, max_harm=1.5, never_float=[5])
        return
    pick, predicted = solve(drops, params, widths, max_harm=1.5, never_float=[5])
    size = sum(params[u] * (FLOAT if widths[i] is None else widths[i]) for u, i in enumerate(pick))
    assert size == best[0] and predicted <= 1.5 + 1e-9 and widths[pick[5]] is not None


def test_milp_infeasible_is_named():
    with pytest.raises(fxquant.FxQuantError, match="no choice of widths"):
        solve(np.array([[3.0, 2.0]]), np.array([10.0]), [2, 4], max_harm=1.0)


def test_mixed_precision_meets_the_floor_it_measures(mlp):
    data, holdout = _val(200), [(x, y) for x, y in [(_digits()[0][1700:], _digits()[1][1700:])]]
    plan = fxquant.mixed_precision(mlp, data, max_drop=1.0, w_bits=4, a_bits=4, bits=(2, 4, 8), holdout=holdout,
                                   progress=False)
    assert plan.float_metric - plan.measured_metric <= 1.0
    assert plan.holdout_metric is not None and plan.rounds
    # the options realise the plan: every layer's weight fake-quant has the width uniform quantization at the
    # chosen width gives it (8 is the target's widest: 7 for integer-GEMM weights on the portable default)
    q = fxquant.quantize(mlp, data[0][0][:1], progress=False, **plan.quantize_options())
    for name, (w, _) in plan.layer_bits.items():
        uniform = fxquant.quantize(mlp, data[0][0][:1], w_bits=w, a_bits=w, progress=False)
        assert _bits(q.get_submodule(f"{name}.weight_fq")) == _bits(uniform.get_submodule(f"{name}.weight_fq"))
    assert not ({n for n, _ in q.named_modules()} & {f"{e}.weight_fq" for e in plan.exclude})
    sized = fxquant.mixed_precision(mlp, data, avg_bits=3.0, w_bits=4, a_bits=4, progress=False, rounds=1)
    assert sized.avg_weight_bits <= 3.0


def test_mean_kl_against_torch_kl_div():
    from fxquant.sensitivity import mean_kl

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(7, 10, generator=g), torch.randn(7, 10, generator=g)
    expected = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="batchmean")
    assert mean_kl(a, b) == pytest.approx(float(expected), rel=1e-5)
    assert mean_kl(a, a) == 0.0 and mean_kl(a, b) > 0


def test_milp_keeps_the_narrow_fraction():
    """Tiny units cost nothing at 8 bits; min_narrow forces enough layers below 8 (checked against enumeration)."""
    widths = [2, 4, 8, None]
    drops = np.array([[5.0, 0.3, 0.0, 0.0], [5.0, 0.3, 0.0, 0.0], [0.2, 0.1, 0.0, 0.0]])
    params = np.array([10.0, 20.0, 5000.0])
    free, _ = solve(drops, params, widths, max_harm=0.5)
    assert [widths[i] for i in free] == [8, 4, 2]  # the 10-parameter unit stays at 8: 0.3 more harm does not fit
    forced, harm = solve(drops, params, widths, max_harm=0.7, layers=[1, 1, 1], min_narrow=3)
    assert [widths[i] for i in forced] == [4, 4, 4] and harm == pytest.approx(0.7)
    with pytest.raises(fxquant.FxQuantError):
        solve(drops, params, widths, max_harm=0.5, layers=[1, 1, 1], min_narrow=3)


def test_mixed_precision_with_the_narrow_constraint_still_bisects(mlp):
    """Budgets too small for narrow_fraction's constraint are infeasible: they must raise the budget, not end the
    search at the least-KL plan. 3 of 3 layers below 8 bits at a floor one narrow plan is measured to meet (every
    layer at 4 bits, plus a point): by construction a narrow plan within the floor exists, and the search finds one."""
    from fxquant.mixed_precision import measure

    data = _val(200)
    batches = as_batches(data)
    calib = [b.inputs for b in batches[:8]]  # what mixed_precision calibrates on by default
    floor = max(5.0, evaluate(mlp, batches)[0] - measure(mlp, batches, calib, dict(w_bits=4, a_bits=4)) + 1.0)
    plan = fxquant.mixed_precision(mlp, data, max_drop=floor, w_bits=4, a_bits=4, narrow_fraction=1.0, progress=False)
    assert plan.below_8_fraction == 1.0 and plan.float_metric - plan.measured_metric <= floor
    assert all(r["kl_budget"] is not None for r in plan.rounds)  # never fell back to the unconstrained plan
