"""How fast fxquant viz's page is on big graphs, in headless Chromium: load, stage switch, search.

    python -m fxquant.tools.bench_viz [--models resnet50,vit_b_16,chain] [--blocks 10000] [--keep DIR]
    python -m fxquant.tools.bench_viz --build-only --blocks 250,500,1000,2000


For each model (random init; nothing is downloaded) it builds the page with every stage (traced .. ONNX
Runtime optimised), opens it in Debian's chromium (Playwright) and measures, in seconds of wall time:

    load     from navigation to the first stage drawn (parse the inlined data, group, lay out with elkjs, draw)
    switch   the slowest stage switch (click a stage tab until it is drawn), over every stage
    search   the slowest search, over every stage: type the name of a node 90% of the way down the graph,
             press Enter, until that node is drawn, selected and its details shown (groups around it opened)

and prints a Markdown table (the README's). `chain` is a conv-bn-relu chain of --blocks blocks (4 channels, 8×8).
--build-only times only the building of the chain's page (every stage, no browser), for each of --blocks in turn,
in one process.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch
from torch import nn

CHROMIUM = os.environ.get("FXQUANT_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


class Chain(nn.Module):
    """`blocks` conv(3×3)-BatchNorm-ReLU blocks in a row, `channels` wide: the deep-and-narrow stress case."""

    def __init__(self, blocks: int, channels: int = 4):
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
                                      for _ in range(blocks)])

    def forward(self, x):
        return self.blocks(x)


def build(name: str, blocks: int) -> tuple[nn.Module, torch.Tensor]:
    if name == "chain":
        return Chain(blocks).eval(), torch.randn(1, 4, 8, 8)
    from fxquant.tools.zoo import random_model

    return random_model(name).eval(), torch.randn(1, 3, 224, 224)


def measure(browser, path: str) -> dict:
    """Open the page and time load, every stage switch and a search on every stage."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    start = time.perf_counter()
    page.goto(f"file://{path}")
    page.wait_for_function("document.body.dataset.ready !== '0'", timeout=600_000)
    load = time.perf_counter() - start
    boxes_at_load = page.evaluate("document.querySelectorAll('g.node, g.cgroup').length")
    stages = page.evaluate("window.fxviz.data.stages.filter(s => !s.error).map(s => s.id)")
    switches, searches = [], []
    for sid in stages:
        t0 = time.perf_counter()
        page.click(f"#stages button[data-stage='{sid}']")
        page.wait_for_function("document.body.dataset.busy === '0'", timeout=600_000)
        switches.append(time.perf_counter() - t0)
        target = page.evaluate(f"""(() => {{ const s = window.fxviz.data.stages.find(s => s.id === '{sid}');
            const ops = s.nodes.filter(n => n.k !== 'input' && n.k !== 'output'); return ops[Math.floor(ops.length * 0.9)].n; }})()""")
        t0 = time.perf_counter()
        page.fill("#search", target)
        page.press("#search", "Enter")
        page.wait_for_function("name => document.querySelector(`g.node.selected[data-name=\"${name}\"]`) !== null && "
                               "document.querySelector('#details h3').textContent === name && document.body.dataset.busy === '0'",
                               arg=target, timeout=600_000)
        searches.append(time.perf_counter() - t0)
    boxes = page.evaluate("document.querySelectorAll('g.node, g.cgroup').length")
    page.close()
    if errors:
        raise RuntimeError(f"{path}: the page logged errors: {errors[:3]}")
    return {"load": load, "switch": max(switches), "switch_median": statistics.median(switches), "search": max(searches),
            "search_median": statistics.median(searches), "boxes": boxes, "boxes_at_load": boxes_at_load}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        flags = next(line for line in info.splitlines() if line.startswith("flags"))
        isa = "AVX-512 VNNI" if "avx512_vnni" in flags else "AVX2" if "avx2" in flags else "no AVX2"
        return f"{model}, {os.cpu_count()} cores, {isa}"
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def build_times(blocks: list[int], keep: str | None) -> int:
    """Seconds fxquant.viz takes to build the chain's page (every stage), for each length in turn."""
    from fxquant.viz import viz

    folder = keep or tempfile.mkdtemp(prefix="bench-viz-")
    os.makedirs(folder, exist_ok=True)
    import resource

    print("| blocks | build s | nodes (all stages) | load average before / after | peak RSS so far MiB |\n|---|---|---|---|---|")
    for n in blocks:
        model, x = build("chain", n)
        before = os.getloadavg()[0]
        t0 = time.perf_counter()
        result = viz(model, x, os.path.join(folder, f"chain{n}.html"))
        built = time.perf_counter() - t0
        print(f"| {n:,} | {built:.1f} | {sum(c for c in result.stages.values() if c > 0):,} | {before:.1f} / "
              f"{os.getloadavg()[0]:.1f} | {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024:,} |", flush=True)
    print(f"\nCPU: {cpu_name()}; torch threads: {torch.get_num_threads()}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,vit_b_16,chain")
    parser.add_argument("--blocks", default="10000", help="blocks of the conv-bn-relu chain (default 10000); with "
                        "--build-only, a comma-separated list")
    parser.add_argument("--build-only", action="store_true", help="time building the chain's page for each --blocks")
    parser.add_argument("--keep", metavar="DIR", help="keep the pages in DIR")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while building (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.build_only:
        return build_times([int(b) for b in args.blocks.split(",")], args.keep)
    args.blocks = int(args.blocks)
    from playwright.sync_api import sync_playwright

    from fxquant.viz import viz

    folder = args.keep or tempfile.mkdtemp(prefix="bench-viz-")
    os.makedirs(folder, exist_ok=True)
    rows = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for name in args.models.split(","):
            model, x = build(name, args.blocks)
            label = f"chain of {args.blocks} conv-bn-relu" if name == "chain" else name
            path = os.path.join(folder, f"{name}.html")
            t0 = time.perf_counter()
            result = viz(model, x, path)
            built = time.perf_counter() - t0
            m = measure(browser, path)
            largest = max(result.stages.values())
            rows.append((label, len(result.stages), largest, sum(n for n in result.stages.values() if n > 0),
                         os.path.getsize(path) / 2**20, built, m))
            print(f"{label}: built in {built:.1f} s, {m}", flush=True)
        browser.close()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nCPU: {cpu_name()}; torch threads while building: {args.threads}; load average at the end {load:.1f}; "
          "Chromium headless, 1400×900\n")
    print("| model | stages | nodes (largest stage) | nodes (all stages) | page MiB | build s | load s | stage switch s (median / max) "
          "| search s (median / max) | boxes drawn at load / after the searches |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, n_stages, largest, total, mib, built, m in rows:
        print(f"| {label} | {n_stages} | {largest:,} | {total:,} | {mib:.1f} | {built:.1f} | {m['load']:.2f} | "
              f"{m['switch_median']:.2f} / {m['switch']:.2f} | {m['search_median']:.2f} / {m['search']:.2f} | {m['boxes_at_load']} / {m['boxes']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
