"""What `viz` writes: the one-file HTML page, Graphviz DOT / SVG / PNG, Model Explorer node data.

Every file is written atomically (a temporary file in the same folder, then os.replace): a failure or an
interrupt leaves the old file or none, never half a page.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from importlib import resources

from fxquant.errors import FxQuantError

ELK_VERSION = "0.12.1"  # static/elk.bundled.js: elkjs from npm (EPL-2.0, static/ELKJS-LICENSE.md)
DOT_MAX_BOXES = 1500  # beyond this, DOT draws module groups as single boxes (dot's layout is superlinear)
DOT_TIMEOUT_S = 120
KIND_COLOURS = {  # fill, border: the page's palette (viewer.css) in Graphviz terms
    "input": ("#eeeeee", "#555555"), "output": ("#eeeeee", "#555555"), "op": ("#ffffff", "#444444"),
    "fq": ("#dbe9f6", "#2166ac"), "q": ("#dbe9f6", "#2166ac"), "dq": ("#e5f5e0", "#238b45"),
    "int": ("#c7e9c0", "#006d2c"), "float": ("#fde0c5", "#d95f02"), "leaf": ("#fde0c5", "#d95f02"),
}


def write_atomic(path, data: bytes | str) -> str:
    """Write `data` to `path` through a temporary file in the same folder and os.replace."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FxQuantError(f"{path}: the folder {folder} does not exist; create it or choose another output path")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=".fxquant-viz-", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def _static(name: str) -> str:
    return resources.files("fxquant.viz").joinpath("static", name).read_text(encoding="utf-8")


def render_page(data: dict) -> str:
    """The page: template.html with the CSS, elkjs, the data (JSON) and viewer.js inlined. Nothing is fetched."""
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False)
    payload = payload.replace("</", "<\\/").replace("<!--", "<\\!--")  # cannot close the <script> it sits in
    values = {"{{TITLE}}": _html_escape(data.get("title", "fxquant viz")), "/*{{CSS}}*/": _static("viewer.css"),
              "/*{{ELK}}*/": _static("elk.bundled.js"), "/*{{APP}}*/": _static("viewer.js"), "{{DATA}}": payload}
    template = _static("template.html")
    missing = [k for k in values if k not in template]
    if missing:
        raise RuntimeError(f"template.html lacks {missing}")
    # one pass over the template: a value that happens to contain a marker is never substituted again
    return re.sub("|".join(re.escape(k) for k in values), lambda m: values[m.group(0)], template)


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


# ------------------------------------------------------------------ Graphviz


def _depth(group: str) -> int:
    return 0 if not group else group.count(".") + 1


def _ancestor(group: str, depth: int) -> str:
    return ".".join(group.split(".")[:depth]) if group else ""


def collapse_depth(nodes: list[dict], max_boxes: int) -> int:
    """The deepest module depth d at which drawing each group below it as one box keeps <= max_boxes boxes
    (nodes at depth <= d drawn one by one, the rest as their ancestor group at depth d + 1)."""
    deepest = max((_depth(n.get("g", "")) for n in nodes), default=0)
    best = 0
    for depth in range(deepest + 1):
        if len(_boxes(nodes, depth)) > max_boxes:
            break
        best = depth
    return best


def _boxes(nodes: list[dict], depth: int, chunk: int = 0) -> list[str]:
    """The box each node is drawn in; `chunk` > 0 also folds runs of `chunk` consecutive root nodes."""
    out = []
    for i, n in enumerate(nodes):
        g = n.get("g", "")
        if _depth(g) > depth:
            out.append("group:" + _ancestor(g, depth + 1))
        elif chunk and n["k"] not in ("input", "output"):
            out.append(f"range:{i // chunk * chunk}-{min(len(nodes), (i // chunk + 1) * chunk) - 1}")
        else:
            out.append(n["n"])
    return out


def dot_source(stage: dict, *, overlay: dict | None = None, max_boxes: int = DOT_MAX_BOXES) -> str:
    """Graphviz DOT of one stage: nodes coloured by kind (or by the overlay), module groups as clusters.
    Groups deeper than what fits in `max_boxes` boxes are drawn as one box (their node count in the label);
    a flat graph of more than `max_boxes` nodes is drawn as runs of consecutive nodes."""
    import graphviz

    nodes = stage["nodes"]
    depth = collapse_depth(nodes, max_boxes)
    box_of = _boxes(nodes, depth)
    if len(set(box_of)) > max_boxes:
        box_of = _boxes(nodes, depth, chunk=-(-2 * len(nodes) // max_boxes))
    counts: dict[str, int] = {}
    for box in box_of:
        counts[box] = counts.get(box, 0) + 1
    graph = graphviz.Digraph(name=stage["id"], graph_attr={"rankdir": "TB", "fontname": "Helvetica", "label": stage["label"]},
                             node_attr={"shape": "box", "style": "rounded,filled", "fontname": "Helvetica", "fontsize": "10"})
    colour = _overlay_colours(overlay) if overlay else None
    clusters: dict[str, graphviz.Digraph] = {}

    def container(group: str):
        if not group:
            return graph
        if group not in clusters:
            clusters[group] = graphviz.Digraph(name=f"cluster_{group}", graph_attr={"label": group, "style": "rounded",
                                                                                        "color": "#999999"})
        return clusters[group]

    members: dict[str, list[str]] = {}
    for n, box in zip(nodes, box_of):
        members.setdefault(box, []).append(n["n"])
    for n, box in zip(nodes, box_of):
        if box in members and box != n["n"]:
            names = members.pop(box)
            fill = colour(_worst(overlay, names)) if colour else "#f3f3f3"
            if box.startswith("group:"):
                group = box[len("group:"):]
                where, label = _ancestor(group, _depth(group) - 1), f"{group}\\n({counts[box]} nodes)"
            else:
                where, label = n.get("g", ""), f"{names[0]} … {names[-1]}\\n({counts[box]} nodes)"
            container(where).node(box, label, fillcolor=fill, style="filled,bold", color="#666666")
            continue
        if box != n["n"]:
            continue
        fill, border = KIND_COLOURS.get(n["k"], KIND_COLOURS["op"])
        if colour and n["n"] in overlay["values"]:
            fill = colour(overlay["values"][n["n"]])
        label = f"{n['n']}\\n{n['o']}" + (f"\\n{n['sh']}" if n.get("sh") else "")
        container(n.get("g", "")).node(box, label, fillcolor=fill, color=border)
    for group in list(clusters):  # every ancestor is a cluster too, so the nesting below reaches the root
        for d in range(1, _depth(group)):
            container(_ancestor(group, d))
    for group in sorted(clusters, key=_depth, reverse=True):  # nest clusters, deepest first
        parent = _ancestor(group, _depth(group) - 1)
        container(parent).subgraph(clusters[group])
    edges = set()
    for j, n in enumerate(nodes):
        for i in n["i"]:
            a, b = box_of[i], box_of[j]
            if a != b and (a, b) not in edges:
                edges.add((a, b))
                graph.edge(a, b)
    return graph.source


def _worst(overlay: dict, names: list[str]):
    vals = [overlay["values"][m] for m in names if m in overlay["values"]]
    if not vals:
        return None
    return min(vals) if overlay["better"] == "higher" else max(vals)


def _overlay_colours(overlay: dict):
    vals = list(overlay["values"].values())
    lo, hi = min(vals), max(vals)

    def colour(v):
        if v is None:
            return "#f3f3f3"
        t = 0.5 if hi == lo else (v - lo) / (hi - lo)
        bad = 1 - t if overlay["better"] == "higher" else t  # 0 good (green) .. 1 bad (red)
        stops = ((0.0, (26, 152, 80)), (0.5, (254, 224, 139)), (1.0, (215, 48, 39)))
        for (t0, c0), (t1, c1) in zip(stops, stops[1:]):
            if bad <= t1:
                f = (bad - t0) / (t1 - t0)
                return "#" + "".join(f"{round(a + (b - a) * f):02x}" for a, b in zip(c0, c1))
        return "#d73027"

    return colour


def render_dot(source: str, fmt: str) -> bytes:
    """Run Graphviz's `dot` on `source` (fmt 'svg' or 'png'); a clear FxQuantError when it is missing."""
    dot = shutil.which("dot")
    if dot is None:
        raise FxQuantError(f"--{fmt}: Graphviz's `dot` program is not installed, so no {fmt.upper()} can be drawn "
                           "(the DOT file can still be written with --dot). Install it: `apt-get install graphviz` "
                           "(Debian/Ubuntu), `brew install graphviz` (macOS), or conda's `graphviz`.")
    try:
        done = subprocess.run([dot, f"-T{fmt}"], input=source.encode("utf-8"), capture_output=True, timeout=DOT_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired:
        raise FxQuantError(f"--{fmt}: Graphviz's dot ran past {DOT_TIMEOUT_S} s on this graph; use the HTML page, "
                           "or write --dot and lay it out with another Graphviz engine (sfdp)") from None
    if done.returncode != 0:
        raise FxQuantError(f"--{fmt}: Graphviz's dot failed: {done.stderr.decode(errors='replace').strip()[:500]}")
    return done.stdout
