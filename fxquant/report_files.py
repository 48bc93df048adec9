"""Files the analysis reports write: tables, JSON, the graph viewer's overlays, matplotlib figures.

Shared by fxquant.sensitivity, fxquant.mixed_precision and fxquant.compare.
"""

from __future__ import annotations

import json
import math
import os


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise) in dB; inf when the noise is 0."""
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


def viewer_overlay(name: str, better: str, pairs) -> dict:
    """An overlay in the graph viewer's format from (node, value) pairs: NaN left out, +-inf drawn at +-200
    (an error-free layer's SQNR), as fxquant viz does with its own SQNR."""
    values = {}
    for node, v in pairs:
        v = float(v)
        if not math.isnan(v):
            values[node] = max(-200.0, min(200.0, v))
    return {"name": name, "better": better, "values": values}


def write_report(doc: dict, overlays: list[dict], stem: str) -> list[str]:
    """STEM.json (the whole report) and STEM.<overlay name>.json per overlay; returns the paths."""
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    files = [(stem + ".json", doc)] + [(f"{stem}.{o['name']}.json", o) for o in overlays if o["values"]]
    for path, content in files:
        with open(path, "w") as f:
            json.dump(content, f, indent=1)
            f.write("\n")
    return [path for path, _ in files]


def json_number(v: float):
    """JSON has no inf: an error-free layer's SQNR is written as null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def format_table(cols, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cols), "-" * (sum(widths) + 2 * (len(widths) - 1)), *map(line, rows)])


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, stem: str) -> list[str]:
    """STEM.png (120 dpi) and STEM.svg; closes the figure."""
    fig.tight_layout()
    paths = [stem + ".png", stem + ".svg"]
    for p in paths:
        fig.savefig(p, dpi=120)
    pyplot().close(fig)
    return paths
