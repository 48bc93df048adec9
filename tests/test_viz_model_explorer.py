"""What `fxquant viz --model-explorer` writes, opened by Google Model Explorer itself (PyPI ai-edge-model-explorer,
in the dev extras): its data classes read our files, and its own web app, served by its own local server and
driven in Debian's chromium, draws our graph with our node data on it.

No skip when Model Explorer or the browser is missing: `make test` installs both (dev extras, chromium).
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from fxquant.viz import viz
from test_viz import Net  # pytest puts tests/ on sys.path (rootdir conftest)
from test_viz_browser import ARGS, CHROMIUM

SERVE = """
import sys, model_explorer
graph, node_data, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = model_explorer.config().add_model_from_path(graph).add_node_data_from_path(node_data)
print("URL_PARAM", config.to_url_param_value(), flush=True)
model_explorer.visualize_from_config(config, host="localhost", port=port, no_open_in_browser=True)
"""


def model_explorer():
    try:
        import model_explorer as me
    except ImportError:
        pytest.fail("Model Explorer is not installed: `pip install -e .[dev]` (make test does) installs ai-edge-model-explorer")
    return me


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("me")
    result = viz(Net().eval(), torch.randn(1, 3, 16, 16), folder / "net.html", sqnr=True, model_explorer=folder / "net_me.json")
    graph, data = json.loads((folder / "net_me.graph.json").read_text()), json.loads((folder / "net_me.json").read_text())
    return folder, result, graph, data


def test_model_explorer_data_classes_read_our_files(written):
    model_explorer()
    import dacite
    from model_explorer.graph_builder import GraphCollection
    from model_explorer.node_data_builder import GraphNodeData

    _, result, graph, data = written
    strict = dacite.Config(strict=True)  # an unknown or misspelt key fails, as a wrong type does
    collection = dacite.from_dict(GraphCollection, graph, config=strict)
    (graph_id, node_data), = data.items()
    nodes = dacite.from_dict(GraphNodeData, node_data, config=strict)
    (g,) = collection.graphs
    ids = {n.id for n in g.nodes}
    assert g.id == graph_id and len(ids) == len(g.nodes) == result.stages["onnx"]  # the ONNX stage, node for node
    assert nodes.results and set(nodes.results) <= ids  # every value lands on a node: its key is a node id
    assert all(e.sourceNodeId in ids for n in g.nodes for e in n.incomingEdges)
    assert [s.stop for s in nodes.gradient] == [0, 0.5, 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_model_explorer_draws_our_graph_with_our_node_data(written):
    """Model Explorer's server (its Python API, no browser opened by it) serves our two files; its page, in chromium,
    lists our node data against our nodes and paints the graph with our gradient's colours. The page asks the
    network for nothing but Google's web fonts (offline they fail and it falls back to local fonts)."""
    model_explorer()
    from PIL import Image
    from playwright.sync_api import sync_playwright

    folder, _, graph, data = written
    (values,) = [{k: v["value"] for k, v in d["results"].items()} for d in data.values()]
    port = free_port()
    log = open(folder / "server.log", "w+")  # a file, not a pipe: the server logs every request and would block on a full pipe
    server = subprocess.Popen([sys.executable, "-c", SERVE, str(folder / "net_me.graph.json"), str(folder / "net_me.json"),
                               str(port)], stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180  # importing model_explorer imports torch: slow on a busy machine
        while True:
            try:
                urllib.request.urlopen(f"http://localhost:{port}/check_health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (folder / "server.log").read_text()
                time.sleep(0.5)
        param = next(line.split(" ", 1)[1].strip() for line in (folder / "server.log").read_text().splitlines()
                     if line.startswith("URL_PARAM "))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            outside = []  # (a route that refuses them stalls Model Explorer's graph worker: watched, not blocked)
            page.on("request", lambda r: None if r.url.startswith((f"http://localhost:{port}/", "blob:", "data:")) else outside.append(r.url))
            page.goto(f"http://localhost:{port}/?data={param}")
            page.wait_for_function("document.body.innerText.includes('Aggregated stats')", timeout=180_000)  # drawn, data on it
            text = page.inner_text("body")
            shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
            browser.close()
        assert errors == [], errors
        assert all(u.startswith("https://fonts.gstatic.com/") for u in outside), outside  # its web fonts only
        assert f"{len(graph['graphs'][0]['nodes'])} nodes" in text  # our graph, every node
        assert "net_me.json" in text  # our node data, as a provider
        stats = text.split("Aggregated stats", 1)[1]
        assert f"Min\t{min(values.values())}" in stats and f"Max\t{max(values.values())}" in stats
        table = text.split("Node data\n", 1)[1]  # one row per node: index, op, its value or '-'
        shown = [line.split("\t")[-1] for line in table.splitlines() if line.count("\t") == 2 and line.split("\t")[0].isdigit()]
        assert sorted(float(v) for v in shown if v != "-") == sorted(values.values())  # each value on its node
        colours = {c for _, c in shot.getcolors(maxcolors=1400 * 900)}
        assert (0xd7, 0x30, 0x27) in colours and (0x1a, 0x98, 0x50) in colours  # the worst layer red, the best green
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
