/* fxquant viz: the page's logic. Data: the JSON in #fxviz-data (see fxquant/viz/graph.py for the node keys).
   Layout: elkjs (layered, hierarchical), recomputed for what is visible whenever groups expand or collapse.
   window.fxviz exposes the state and a few actions, for tests and for the curious. */
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("fxviz-data").textContent);
  const CHUNK = 48;          // a group with more children than this is split into runs of CHUNK (ranges)
  const BUDGET = 160;        // boxes drawn at first: groups open breadth-first while the total stays under this
  const EXPAND_ALL_MAX = 1500;  // "expand all" stops opening groups beyond this many boxes
  const NODE_H = 34;
  const SVGNS = "http://www.w3.org/2000/svg";
  const elk = new ELK();
  const $ = (id) => document.getElementById(id);
  const KIND_NAMES = { input: "input", output: "output", op: "op", fq: "fake-quant", q: "quantize (Q)", dq: "dequantize (DQ)",
    int: "integer kernel (ONNX Runtime)", float: "runs float (rule / no rule / island)", leaf: "kept whole by trace" };

  const state = {
    stage: 0, diff: false, a: 0, b: 0, overlay: DATA.overlays.length ? 0 : -1,
    expanded: new Set([""]), selected: null, hideShapes: true, panels: [], layoutCount: 0, lastLayoutMs: 0,
    search: { q: "", hits: [], at: -1 },
  };
  const models = new Map();  // stage index -> prepared model

  // ------------------------------------------------------------------ model: groups, chunks, names
  function model(si) {
    if (models.has(si)) return models.get(si);
    const st = DATA.stages[si];
    const nodes = st.nodes || [];
    const groups = new Map();
    const mk = (id, label, parent) => {
      const g = { id, label, parent, items: [], count: 0, kinds: {} };
      groups.set(id, g);
      if (parent !== null) groups.get(parent).items.push({ g: id });
      return g;
    };
    mk("", "(root)", null);
    const leafGroup = new Array(nodes.length);
    nodes.forEach((n, i) => {
      const path = n.g || "";
      if (!groups.has(path)) {
        const parts = path.split(".");
        let prev = "";
        for (let d = 1; d <= parts.length; d++) {
          const id = parts.slice(0, d).join(".");
          if (!groups.has(id)) mk(id, id, prev);
          prev = id;
        }
      }
      groups.get(path).items.push({ n: i });
      leafGroup[i] = path;
    });
    // split big groups into runs (nested when the runs are many)
    for (const g of Array.from(groups.values())) chunk(g, groups, leafGroup, nodes);
    // counts per group (all descendants)
    const parentOf = (id) => groups.get(id).parent;
    nodes.forEach((n, i) => {
      for (let id = leafGroup[i]; id !== null; id = parentOf(id)) {
        const g = groups.get(id); g.count++; g.kinds[n.k] = (g.kinds[n.k] || 0) + 1;
      }
    });
    const users = nodes.map(() => []);
    nodes.forEach((n, j) => n.i.forEach((i) => users[i].push(j)));
    const m = { ...stageIndex(si), groups, leafGroup, users };
    models.set(si, m);
    return m;
  }

  const indexes = new Map();  // stage index -> {si, st, nodes, byName, absorbedBy}: cheap, for lookups across stages
  function stageIndex(si) {
    if (indexes.has(si)) return indexes.get(si);
    const st = DATA.stages[si], nodes = st.nodes || [];
    const byName = new Map(nodes.map((n, i) => [n.n, i]));
    const absorbedBy = new Map();  // a name this stage no longer has -> the node that absorbed it (fusion, ORT kernel)
    nodes.forEach((n, i) => (n.ab || []).forEach((a) => { if (!byName.has(a) && !absorbedBy.has(a)) absorbedBy.set(a, i); }));
    const ix = { si, st, nodes, byName, absorbedBy };
    indexes.set(si, ix);
    return ix;
  }

  function chunk(g, groups, leafGroup, nodes) {
    let items = g.items;
    let level = 0;
    while (items.length > CHUNK) {
      const runs = [];
      for (let s = 0; s < items.length; s += CHUNK) {
        const part = items.slice(s, s + CHUNK);
        const id = `${g.id}#${level}:${s}`;
        const label = `${g.id || "graph"} [${rangeLabel(part, groups, nodes)}]`;
        const run = { id, label, parent: g.id, items: part, count: 0, kinds: {}, run: true };
        groups.set(id, run);
        for (const it of part) {
          if (it.g !== undefined) groups.get(it.g).parent = id; else leafGroup[it.n] = id;
        }
        runs.push({ g: id });
      }
      items = runs;
      level++;
    }
    // nested runs: the first level's runs hang under the next level's
    if (level > 0) {
      g.items = items;
      for (const it of items) groups.get(it.g).parent = g.id;
    }
  }

  function firstName(it, groups, nodes) {
    while (it.g !== undefined) { const g = groups.get(it.g); if (!g.items.length) return g.label; it = g.items[0]; }
    return nodes[it.n].n;
  }
  function lastName(it, groups, nodes) {
    while (it.g !== undefined) { const g = groups.get(it.g); if (!g.items.length) return g.label; it = g.items[g.items.length - 1]; }
    return nodes[it.n].n;
  }
  function rangeLabel(part, groups, nodes) {
    return `${firstName(part[0], groups, nodes)} … ${lastName(part[part.length - 1], groups, nodes)}`;
  }

  let aliases = null;  // name -> the names it absorbed (its `ab`, first stage that has it)
  let hosts = null;  // name -> the node that absorbed it in some stage (traced relu -> fused stem -> ORT's QLinearConv)
  function find(m, name, depth = 0) {  // the node `name` is in this stage: itself, or the node that absorbed it
    const i = m.byName.get(name);
    if (i !== undefined) return i;
    if (m.absorbedBy.has(name)) return m.absorbedBy.get(name);
    if (!hosts) {
      hosts = new Map(); aliases = new Map();
      for (const st of DATA.stages) for (const n of st.nodes || []) {
        for (const a of n.ab || []) if (a !== n.n && !hosts.has(a)) hosts.set(a, n.n);
        if (n.ab && !aliases.has(n.n)) aliases.set(n.n, n.ab);
      }
    }
    const host = hosts.get(name);
    if (host !== undefined && depth < 8) { const j = find(m, host, depth + 1); if (j !== undefined) return j; }
    // the other way: a node made of others (ORT's conv1_conv2d QLinearConv) is, in earlier stages, what it absorbed;
    // an op (conv1) rather than its Q/DQ/fake-quant
    const found = (aliases.get(name) || []).map((a) => m.byName.get(a)).filter((j) => j !== undefined);
    return found.find((j) => !["q", "dq", "fq"].includes(m.nodes[j].k)) ?? found[0];
  }

  function ancestors(m, i) {  // group ids from the node's innermost group up to the root
    const out = [];
    for (let id = m.leafGroup[i]; id !== null && id !== undefined; id = m.groups.get(id).parent) out.push(id);
    return out;
  }

  // the box a node is drawn in: itself, or its outermost collapsed group
  function representative(m, i) {
    const chain = ancestors(m, i);
    for (let k = chain.length - 1; k >= 0; k--) if (!state.expanded.has(chain[k])) return "g:" + chain[k];
    return "n:" + i;
  }

  function visibleCount(m) {
    let count = 0;
    const walk = (g) => { for (const it of g.items) { if (it.n !== undefined) count++; else if (state.expanded.has(it.g)) walk(m.groups.get(it.g)); else count++; } };
    walk(m.groups.get(""));
    return count;
  }

  function defaultExpand(m, budget) {
    let count = m.groups.get("").items.length;
    const queue = m.groups.get("").items.filter((it) => it.g !== undefined).map((it) => it.g);
    while (queue.length) {
      const id = queue.shift();
      const g = m.groups.get(id);
      if (count - 1 + g.items.length > budget) continue;
      state.expanded.add(id);
      count += g.items.length - 1;
      for (const it of g.items) if (it.g !== undefined) queue.push(it.g);
    }
  }

  // ------------------------------------------------------------------ diff
  function signature(m, i) {
    const n = m.nodes[i];
    return { op: n.k + "|" + n.o, ins: n.i.map((j) => m.nodes[j].n).sort().join(",") };
  }
  function diffOf(ma, mb) {
    const key = ma.si + ">" + mb.si;
    if (diffOf.cache[key]) return diffOf.cache[key];
    const status = new Map();
    const counts = { added: 0, removed: 0, rewritten: 0, rewired: 0, same: 0 };
    ma.nodes.forEach((n, i) => {
      const j = mb.byName.get(n.n);
      let s;
      if (j === undefined) s = "removed";
      else {
        const x = signature(ma, i), y = signature(mb, j);
        s = x.op !== y.op ? "rewritten" : x.ins !== y.ins ? "rewired" : "same";
      }
      status.set(n.n, s); counts[s]++;
    });
    mb.nodes.forEach((n) => { if (!ma.byName.has(n.n)) { status.set(n.n, "added"); counts.added++; } });
    return (diffOf.cache[key] = { status, counts });
  }
  diffOf.cache = {};

  // ------------------------------------------------------------------ overlay
  function overlay() { return state.overlay >= 0 ? DATA.overlays[state.overlay] : null; }
  function overlayRange(o) {
    if (!o._range) { const v = Object.values(o.values); o._range = [least(v), most(v)]; }
    return o._range;
  }
  function badness(o, v) {  // 0: best value on the page .. 1: worst
    const [lo, hi] = overlayRange(o);
    const t = hi === lo ? 0.5 : (v - lo) / (hi - lo);
    return o.better === "higher" ? 1 - t : t;
  }
  function heat(t) {  // green .. yellow .. red
    const stops = [[0, [26, 152, 80]], [0.5, [254, 224, 139]], [1, [215, 48, 39]]];
    for (let k = 0; k < stops.length - 1; k++) {
      const [t0, c0] = stops[k], [t1, c1] = stops[k + 1];
      if (t <= t1) { const f = (t - t0) / (t1 - t0); return `rgb(${c0.map((c, z) => Math.round(c + (c1[z] - c) * f)).join(",")})`; }
    }
    return "rgb(215,48,39)";
  }
  function paint(g, rect, rgb) {  // a heat-map fill, and white text where the fill is dark
    rect.style.fill = rgb;
    const [r, gg, b] = rgb.match(/\d+/g).map(Number);
    if (0.299 * r + 0.587 * gg + 0.114 * b < 140) g.classList.add("dark");
  }
  function nodeValue(o, n) {  // a node's own value, else the worst of what it absorbed (a fused kernel)
    if (n.n in o.values) return o.values[n.n];
    if (n.ab) return worst(o, n.ab.filter((x) => x in o.values).map((x) => o.values[x]));
    return undefined;
  }
  function worst(o, vals) {
    if (!vals.length) return undefined;
    return o.better === "higher" ? least(vals) : most(vals);
  }
  // loops, not Math.min(...v): spreading 10^5 values overflows the call stack
  function least(v) { let x = Infinity; for (const y of v) if (y < x) x = y; return x; }
  function most(v) { let x = -Infinity; for (const y of v) if (y > x) x = y; return x; }
  function groupValue(m, o, gid) {
    const key = "_v" + state.overlay;
    const g = m.groups.get(gid);
    if (g[key] !== undefined) return g[key] === null ? undefined : g[key];
    const vals = [];
    const walk = (gg) => { for (const it of gg.items) { if (it.n !== undefined) { const v = nodeValue(o, m.nodes[it.n]); if (v !== undefined) vals.push(v); } else walk(m.groups.get(it.g)); } };
    walk(g);
    const w = worst(o, vals);
    g[key] = w === undefined ? null : w;
    return w;
  }
  const fmt = (v) => (v === null || v === undefined) ? "–" : (Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0)) ? v.toExponential(3) : (+v.toPrecision(5)).toString();

  // ------------------------------------------------------------------ layout
  function textWidth(s, px) { return s.length * px * 0.6; }
  function nodeSize(n) {  // room for the name and its badge, and for "op  shape"
    const line2 = n.o + (n.sh ? "  " + n.sh : "");
    return Math.max(64, Math.min(260, Math.max(textWidth(n.n, 11) + 30, textWidth(line2, 10)) + 16));
  }

  // `seed(elkId, info)`: where a box was in the layout the user saw last ([x, y], its centre), or undefined. Seeded boxes
  // keep their left-right order (ELK layered's semi-interactive crossing minimisation reads elk.position), so a stage
  // switch, the other side of a diff or a click that opens a group moves the picture as little as elkjs allows.
  function buildElk(m, seed) {
    const root = { id: "root", layoutOptions: {
      "elk.algorithm": "layered", "elk.direction": "DOWN", "elk.hierarchyHandling": "INCLUDE_CHILDREN",
      "elk.layered.spacing.nodeNodeBetweenLayers": "22", "elk.spacing.nodeNode": "14", "elk.spacing.edgeNode": "8",
      "elk.layered.considerModelOrder.strategy": "NODES_AND_EDGES", "elk.json.shapeCoords": "ROOT", "elk.json.edgeCoords": "ROOT",
      "elk.layered.crossingMinimization.greedySwitch.type": "OFF", "elk.padding": "[top=28,left=12,bottom=12,right=12]",
    }, children: [], edges: [] };
    if (seed) {
      root.layoutOptions["elk.layered.crossingMinimization.semiInteractive"] = "true";
      root.layoutOptions["elk.layered.considerModelOrder.strategy"] = "NONE";  // model order would override the positions
    }
    const index = new Map();  // elk id -> {kind, ...}
    const place = (el, info) => {
      const at = seed && seed(el.id, info);
      if (at) (el.layoutOptions = el.layoutOptions || {})["elk.position"] = `(${at[0].toFixed(1)},${at[1].toFixed(1)})`;
    };
    const add = (container, g) => {
      for (const it of g.items) {
        if (it.n !== undefined && state.hideShapes && m.nodes[it.n].s) continue;
        if (it.n !== undefined) {
          const n = m.nodes[it.n];
          const el = { id: "n:" + it.n, width: nodeSize(n), height: NODE_H };
          container.children.push(el); index.set(el.id, { type: "node", i: it.n }); place(el, index.get(el.id));
        } else if (state.expanded.has(it.g)) {
          const sub = m.groups.get(it.g);
          const el = { id: "G:" + it.g, children: [], layoutOptions: { "elk.padding": "[top=24,left=10,bottom=10,right=10]" } };
          container.children.push(el); index.set(el.id, { type: "group", id: it.g }); place(el, index.get(el.id));
          add(el, sub);
        } else {
          const sub = m.groups.get(it.g);
          const el = { id: "g:" + it.g, width: Math.max(120, Math.min(260, textWidth(sub.label, 11) + 24)), height: NODE_H + 6 };
          container.children.push(el); index.set(el.id, { type: "cgroup", id: it.g }); place(el, index.get(el.id));
        }
      }
    };
    add(root, m.groups.get(""));
    const seen = new Set();
    const rep = m.nodes.map((_, i) => representative(m, i));
    m.nodes.forEach((n, j) => {
      if (state.hideShapes && n.s) return;
      for (const i of n.i) {
        if (state.hideShapes && m.nodes[i].s) continue;
        const a = rep[i], b = rep[j];
        if (a === b) continue;
        const key = a + ">" + b;
        if (seen.has(key)) continue;
        seen.add(key);
        root.edges.push({ id: "e" + root.edges.length, sources: [a], targets: [b], agg: a[0] === "g" || b[0] === "g" });
      }
    });
    return { root, index, rep };
  }

  async function layout(panel, from) {  // `from`: the panel whose places seed this one (see buildElk)
    const m = model(panel.si);
    const t0 = performance.now();
    const built = buildElk(m, from && from.places ? seeder(m, from) : null);
    const agg = new Map(built.root.edges.map((e) => [e.id, e.agg]));
    built.root.edges.forEach((e) => delete e.agg);
    const laid = await elk.layout(built.root);
    panel.layout = { laid, index: built.index, rep: built.rep, agg };
    draw(panel);
    state.lastLayoutMs = performance.now() - t0;
    state.layoutCount++;
  }

  // where a box of model `m` was in panel `from`: the same node, else the node of that stage that holds it (absorbed
  // it, or was absorbed: find), else the collapsed group it was drawn in; a node with none of these (a fake-quant a
  // pass inserted) goes just below its inputs (else just above its users), so it keeps its branch's side; a group:
  // the same group, open or not
  function seeder(m, from) {
    const fm = model(from.si), places = from.places;
    const pos = m.nodes.map((n) => {
      if (places.has("n:" + n.n)) return places.get("n:" + n.n);
      const j = find(fm, n.n);
      if (j === undefined) return undefined;
      const rep = from.layout && from.layout.rep[j];
      return places.get("n:" + fm.nodes[j].n) || (rep && rep[0] === "g" ? places.get(rep) : undefined);
    });
    const near = (list, dy) => {
      const at = list.map((j) => pos[j]).filter((q) => q);
      if (!at.length) return undefined;
      const y = dy > 0 ? most(at.map((q) => q[1])) : least(at.map((q) => q[1]));
      return [at.reduce((t, q) => t + q[0], 0) / at.length, y + dy];
    };
    m.nodes.forEach((n, i) => { if (!pos[i]) pos[i] = near(n.i, 1); });
    for (let i = m.nodes.length - 1; i >= 0; i--) if (!pos[i]) pos[i] = near(m.users[i], -1);
    return (id, info) => (info.type === "node" ? pos[info.i] : places.get("g:" + info.id));
  }

  // ------------------------------------------------------------------ drawing
  function el(tag, attrs, parent) {
    const e = document.createElementNS(SVGNS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function clip(s, width, px) {
    const max = Math.floor((width - 10) / (px * 0.6));
    return s.length > max ? s.slice(0, Math.max(1, max - 1)) + "…" : s;
  }

  function draw(panel) {
    const m = model(panel.si);
    const { laid, index } = panel.layout;
    const vp = panel.viewport;
    vp.textContent = "";
    const gGroups = el("g", {}, vp), gEdges = el("g", {}, vp), gNodes = el("g", {}, vp), gMarks = el("g", {}, vp);
    const o = overlay();
    const diff = state.diff ? diffOf(model(state.a), model(state.b)) : null;
    panel.boxes = new Map();
    panel.places = new Map();  // "n:name" / "g:group" -> [x, y]: each box's centre in graph coordinates
    const fusion = new Map();
    const walk = (c) => {
      for (const ch of c.children || []) {
        const info = index.get(ch.id);
        panel.places.set(info.type === "node" ? "n:" + m.nodes[info.i].n : "g:" + info.id, [ch.x + ch.width / 2, ch.y + ch.height / 2]);
        if (info.type === "group") {
          const g = m.groups.get(info.id);
          const wrap = el("g", { class: "group", "data-group": info.id }, gGroups);
          el("rect", { class: "frame", x: ch.x, y: ch.y, width: ch.width, height: ch.height }, wrap);
          const head = el("g", { class: "head" }, wrap);
          el("rect", { x: ch.x, y: ch.y, width: ch.width, height: 20 }, head);
          const t = el("text", { class: "label", x: ch.x + 8, y: ch.y + 14 }, head);
          t.textContent = "▾ " + clip(g.label, ch.width - 10, 11);
          head.addEventListener("click", (ev) => { ev.stopPropagation(); toggle(info.id, false); });
          walk(ch);
        } else if (info.type === "cgroup") {
          drawGroupBox(panel, m, ch, info.id, gNodes, o, diff);
        } else {
          drawNode(panel, m, ch, info.i, gNodes, o, diff, fusion);
        }
      }
    };
    walk(laid);
    for (const e of laid.edges || []) {
      for (const s of e.sections || []) {
        const pts = [s.startPoint, ...(s.bendPoints || []), s.endPoint];
        el("path", { class: "edge" + (panel.layout.agg.get(e.id) ? " agg" : ""), d: "M" + pts.map((p) => `${p.x},${p.y}`).join("L"), "marker-end": "url(#arrow)" }, gEdges);
      }
    }
    for (const [host, rects] of fusion) {  // the traced nodes one fused module will replace; the int8/ONNX nodes of one layer
      if (rects.length < 2) continue;
      const x0 = Math.min(...rects.map((r) => r.x)) - 5, y0 = Math.min(...rects.map((r) => r.y)) - 5;
      const x1 = Math.max(...rects.map((r) => r.x + r.width)) + 5, y1 = Math.max(...rects.map((r) => r.y + r.height)) + 5;
      el("rect", { class: "fusion", x: x0, y: y0, width: x1 - x0, height: y1 - y0, "data-fusion": host }, gMarks);
      const t = el("text", { class: "fusion", x: x1 + 3, y: y0 + 10 }, gMarks);
      t.textContent = (m.st.id === "traced" ? "fused → " : "layer ") + host;
    }
    panel.size = { w: laid.width || 100, h: laid.height || 100 };
    markSelection();
  }

  function drawNode(panel, m, box, i, parent, o, diff, fusion) {
    const n = m.nodes[i];
    let cls = `node k-${n.k}` + (n.b ? ` b${n.b}` : "");
    if (diff) cls += " d-" + (diff.status.get(n.n) || "same");
    const g = el("g", { class: cls, "data-name": n.n, "data-kind": n.k, transform: `translate(${box.x},${box.y})` }, parent);
    const r = el("rect", { class: "box", width: box.width, height: box.height }, g);
    if (o) { const v = nodeValue(o, n); if (v !== undefined) { paint(g, r, heat(badness(o, v))); g.setAttribute("data-value", v); } }
    const fusedIn = n.ab && n.k !== "int" && m.st.id !== "onnx" && m.st.id !== "ort";
    if (fusedIn || (n.k === "int" && n.ab)) el("rect", { class: "fused2", x: 3, y: 3, width: box.width - 6, height: box.height - 6, rx: 3 }, g);
    const t1 = el("text", { x: 7, y: 14 }, g); t1.textContent = clip(n.n, box.width, 11);
    const t2 = el("text", { class: "op", x: 7, y: 27 }, g);
    t2.textContent = clip(n.o + (n.sh ? "  " + n.sh : ""), box.width, 10);
    const badge = n.b && (n.k === "op" || n.k === "fq" || n.k === "q" || n.k === "dq") ? (n.k === "op" ? "W" : "") + n.b : (fusedIn ? "+" + n.ab.length : "");
    if (badge) {
      const w = 8 + badge.length * 6;
      el("rect", { class: "badge", x: box.width - w - 2, y: 2, width: w, height: 12, rx: 3 }, g);
      const tb = el("text", { class: "badge", x: box.width - w + 2, y: 11 }, g); tb.textContent = badge;
    }
    el("title", {}, g).textContent = `${n.n}\n${n.o}${n.sh ? "  " + n.sh : ""}`;
    g.addEventListener("click", (ev) => { ev.stopPropagation(); select(n.n, { center: false }); });
    panel.boxes.set("n:" + n.n, { g, box });
    if (n.fg) { if (!fusion.has(n.fg)) fusion.set(n.fg, []); fusion.get(n.fg).push(box); }
  }

  function drawGroupBox(panel, m, box, gid, parent, o, diff) {
    const grp = m.groups.get(gid);
    const g = el("g", { class: "cgroup", "data-group": gid, transform: `translate(${box.x},${box.y})` }, parent);
    el("rect", { class: "under", x: 4, y: 4, width: box.width, height: box.height }, g);
    const r = el("rect", { class: "box", width: box.width, height: box.height }, g);
    if (o) { const v = groupValue(m, o, gid); if (v !== undefined) { paint(g, r, heat(badness(o, v))); g.setAttribute("data-value", v); } }
    const t1 = el("text", { x: 8, y: 15 }, g); t1.textContent = "▸ " + clip(grp.label, box.width - 10, 11);
    const t2 = el("text", { class: "op", x: 8, y: 30 }, g);
    const q = (grp.kinds.q || 0) + (grp.kinds.dq || 0) + (grp.kinds.fq || 0);
    t2.textContent = `${grp.count} nodes` + (q ? ` · ${q} Q/DQ/FQ` : "") + (grp.kinds.int ? ` · ${grp.kinds.int} int` : "") + (grp.kinds.float ? ` · ${grp.kinds.float} float` : "");
    if (diff) {
      const changed = countChanges(m, gid, diff);
      if (changed) { const d = el("text", { class: "delta", x: box.width - 40, y: 15 }, g); d.textContent = "Δ" + changed; }
    }
    g.addEventListener("click", (ev) => { ev.stopPropagation(); showGroup(m, gid); toggle(gid, true); });
    panel.boxes.set("g:" + gid, { g, box });
  }

  function countChanges(m, gid, diff) {
    let c = 0;
    const walk = (gg) => { for (const it of gg.items) { if (it.n !== undefined) { const s = diff.status.get(m.nodes[it.n].n); if (s && s !== "same") c++; } else walk(m.groups.get(it.g)); } };
    walk(m.groups.get(gid));
    return c;
  }

  // ------------------------------------------------------------------ panels, pan and zoom
  function makePanel(si, caption) {
    const div = document.createElement("div");
    div.className = "panel";
    div.dataset.stage = DATA.stages[si].id;
    const cap = document.createElement("div"); cap.className = "caption"; cap.textContent = caption; div.appendChild(cap);
    const svg = el("svg", { "aria-label": "graph " + DATA.stages[si].id });
    const defs = el("defs", {}, svg);
    const mk = el("marker", { id: "arrow", viewBox: "0 0 8 8", refX: 8, refY: 4, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" }, defs);
    el("path", { d: "M0,0L8,4L0,8z", fill: "#888" }, mk);
    const viewport = el("g", { class: "viewport" }, svg);
    div.appendChild(svg);
    const panel = { si, div, svg, viewport, view: { x: 20, y: 20, k: 1 }, boxes: new Map() };
    let drag = null;
    svg.addEventListener("mousedown", (ev) => { drag = { x: ev.clientX, y: ev.clientY, vx: panel.view.x, vy: panel.view.y, moved: false }; svg.classList.add("dragging"); });
    window.addEventListener("mousemove", (ev) => {
      if (!drag) return;
      panel.view.x = drag.vx + ev.clientX - drag.x; panel.view.y = drag.vy + ev.clientY - drag.y;
      drag.moved = true; applyView(panel);
    });
    window.addEventListener("mouseup", () => { drag = null; svg.classList.remove("dragging"); });
    svg.addEventListener("wheel", (ev) => {
      ev.preventDefault();
      const r = svg.getBoundingClientRect();
      const px = ev.clientX - r.left, py = ev.clientY - r.top;
      const k = Math.max(0.02, Math.min(4, panel.view.k * Math.exp(-ev.deltaY * 0.0015)));
      panel.view.x = px - (px - panel.view.x) * (k / panel.view.k);
      panel.view.y = py - (py - panel.view.y) * (k / panel.view.k);
      panel.view.k = k; applyView(panel);
    }, { passive: false });
    return panel;
  }
  function applyView(p) { p.viewport.setAttribute("transform", `translate(${p.view.x},${p.view.y}) scale(${p.view.k})`); }
  function fit(p, readable) {  // the whole graph; `readable`: no smaller than fits the width (tall graphs: top first)
    const r = p.svg.getBoundingClientRect();
    const whole = Math.min((r.width - 30) / p.size.w, (r.height - 40) / p.size.h);
    const k = Math.min(1.1, Math.max(0.02, readable ? Math.max(whole, Math.min(0.9, (r.width - 30) / p.size.w)) : whole));
    p.view = { k, x: Math.max(10, (r.width - p.size.w * k) / 2), y: 28 };
    applyView(p);
  }
  function centerOn(p, key) {
    const b = p.boxes.get(key);
    if (!b) return;
    const r = p.svg.getBoundingClientRect();
    const k = Math.max(p.view.k, 0.6);
    p.view = { k, x: r.width / 2 - (b.box.x + b.box.width / 2) * k, y: r.height / 2 - (b.box.y + b.box.height / 2) * k };
    applyView(p);
  }

  // ------------------------------------------------------------------ actions
  let busy = 0;
  let queue = Promise.resolve();
  function run(fn) {  // actions run one after another (a click during a layout waits for it); body[data-busy] says when all are done
    busy++; document.body.dataset.busy = "1";
    const done = queue.then(fn).finally(() => { busy--; if (!busy) document.body.dataset.busy = "0"; });
    queue = done.catch((err) => console.error("fxquant viz:", err));
    return done;
  }

  async function render(opts = {}) {
    const old = state.panels;  // what was on the screen: it seeds the new layout and anchors the view
    const anchor = opts.center ? anchorOf(old) : null;
    const panelsDiv = $("panels");
    panelsDiv.textContent = "";
    state.panels = [];
    const shown = state.diff ? [[state.a, "before: " + DATA.stages[state.a].label], [state.b, "after: " + DATA.stages[state.b].label]]
      : [[state.stage, DATA.stages[state.stage].label]];
    for (const [si, cap] of shown) {
      const st = DATA.stages[si];
      if (st.error) continue;
      const p = makePanel(si, cap);
      panelsDiv.appendChild(p.div);
      state.panels.push(p);
    }
    banner();
    // a panel whose stage was on the screen is seeded by it, then the others by the first laid out (the two sides
    // of a diff share their places), else by what was on the screen
    const same = (p) => old.find((o) => o.si === p.si && o.places);
    const order = state.panels.filter(same).concat(state.panels.filter((p) => !same(p)));
    for (const p of order) await layout(p, same(p) || order.find((q) => q.places) || old.find((o) => o.places));
    for (const p of state.panels) {
      if (anchor && keep(p, anchor)) continue;
      const m = model(p.si);
      const i = state.selected ? find(m, state.selected) : undefined;
      const key = i !== undefined ? "n:" + m.nodes[i].n : null;
      if (opts.center && key && p.boxes.has(key)) centerOn(p, key); else fit(p, true);
    }
    legend();
    if (state.selected) showDetails(state.selected);
  }

  // the place of node `name` (or of what holds it: find, then its collapsed group) in panel p, [x, y, w, h]
  function locate(p, name) {
    const m = model(p.si), i = find(m, name);
    if (i === undefined || !p.places) return undefined;
    const rep = p.layout.rep[i];
    return p.places.get("n:" + m.nodes[i].n) || (rep[0] === "g" ? p.places.get(rep) : undefined);
  }
  // what stays put on the screen across a re-render: the selected node, else the nodes nearest the middle of the view
  // (the first of them that the new panel has), each with where it was on the screen
  function anchorOf(panels) {
    const p = panels.find((q) => q.places);
    if (!p) return null;
    const r = p.svg.getBoundingClientRect();
    const names = state.selected && locate(p, state.selected) ? [state.selected]
      : Array.from(p.places.keys()).filter((key) => key[0] === "n").map((key) => key.slice(2));
    const spots = names.map((name) => {
      const at = locate(p, name);
      return { name, x: p.view.x + at[0] * p.view.k, y: p.view.y + at[1] * p.view.k };
    });
    spots.sort((u, v) => Math.hypot(u.x - r.width / 2, u.y - r.height / 2) - Math.hypot(v.x - r.width / 2, v.y - r.height / 2));
    return { k: p.view.k, spots: spots.slice(0, 64) };
  }
  // put the anchor where it was (same zoom) if this panel has it and that spot is inside the panel; false: it could not
  function keep(p, anchor) {
    const r = p.svg.getBoundingClientRect();
    for (const spot of anchor.spots) {
      const at = locate(p, spot.name);
      if (!at) continue;
      if (spot.x < 0 || spot.y < 0 || spot.x > r.width || spot.y > r.height) return false;
      p.view = { k: anchor.k, x: spot.x - at[0] * anchor.k, y: spot.y - at[1] * anchor.k };
      applyView(p);
      return true;
    }
    return false;
  }

  async function relayout(centerName) {
    for (const p of state.panels) await layout(p, p);
    for (const p of state.panels) {
      if (!centerName) continue;
      const m = model(p.si);
      const i = find(m, centerName);
      if (i === undefined) continue;
      const key = p.layout.rep[i];
      centerOn(p, key[0] === "n" ? "n:" + m.nodes[i].n : key);
    }
  }

  function toggle(gid, open) {
    return run(async () => {
      if (open) state.expanded.add(gid);
      else for (const id of Array.from(state.expanded)) if (id === gid || id.startsWith(gid + ".") || id.startsWith(gid + "#")) state.expanded.delete(id);
      state.expanded.add("");
      await relayout();
    });
  }

  function reveal(name) {  // open the groups around `name` in every panel that has it
    for (const p of state.panels) {
      const m = model(p.si);
      const i = find(m, name);
      if (i !== undefined) for (const id of ancestors(m, i)) state.expanded.add(id);
    }
  }

  async function select(name, opts = {}) {
    state.selected = name;
    const here = find(currentModel(), name);
    if (opts.reveal && here !== undefined && currentModel().nodes[here].s && state.hideShapes) {  // show what was asked for
      state.hideShapes = false; $("show-shapes").checked = true;
    }
    if (opts.reveal) { reveal(name); await relayout(name); } else if (opts.center) { for (const p of state.panels) centerOn(p, "n:" + name); }
    markSelection();
    showDetails(name);
    remember();
  }

  function remember() {  // the URL's hash names the stage and the node, so a link opens the page there
    const st = DATA.stages[state.diff ? state.b : state.stage];
    const hash = `#stage=${encodeURIComponent(st.id)}` + (state.selected ? `&node=${encodeURIComponent(state.selected)}` : "");
    if (location.hash !== hash) history.replaceState(null, "", hash);
  }
  function fromHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    const si = DATA.stages.findIndex((s) => s.id === params.get("stage") && !s.error);
    if (si >= 0) state.stage = state.b = si;
    const node = params.get("node");
    if (node) state.selected = node;
  }

  function markSelection() {
    for (const p of state.panels) {
      p.viewport.querySelectorAll(".selected").forEach((e) => e.classList.remove("selected"));
      if (!state.selected) continue;
      const m = model(p.si);
      const i = find(m, state.selected);
      if (i === undefined) continue;
      const b = p.boxes.get("n:" + m.nodes[i].n);
      if (b) b.g.classList.add("selected");
      else if (p.layout) { const gb = p.boxes.get(p.layout.rep[i]); if (gb) gb.g.classList.add("selected"); }  // in a collapsed group
    }
  }

  function currentModel() { return model(state.diff ? state.b : state.stage); }

  // ------------------------------------------------------------------ side panel
  function row(tb, k, v) {
    if (v === undefined || v === null || v === "") return;
    const tr = document.createElement("tr");
    const a = document.createElement("td"); a.textContent = k;
    const b = document.createElement("td");
    if (v instanceof Node) b.appendChild(v); else b.textContent = String(v);
    tr.append(a, b); tb.appendChild(tr);
  }
  function link(text, fn) { const a = document.createElement("a"); a.textContent = text; a.addEventListener("click", fn); return a; }
  function names(list, m) {
    const span = document.createElement("span");
    list.forEach((nm, k) => {
      if (k) span.append(", ");
      if (m && m.byName.has(nm)) span.appendChild(link(nm, () => select(nm, { reveal: true }))); else span.append(nm);
    });
    return span;
  }
  function chart(values) {  // per-channel scales: one bar each, height by value (linear, from 0)
    const w = 300, h = 46, max = Math.max(...values.map((v) => v || 0)) || 1;
    const svg = el("svg", { class: "chart", width: w, height: h + 12, "data-channels": values.length });
    const bw = w / values.length;
    const path = values.map((v, c) => `M${(c * bw).toFixed(2)},${h}V${(h - ((v || 0) / max) * h).toFixed(2)}`).join("");
    el("path", { d: path, stroke: "#2166ac", "stroke-width": Math.max(0.5, bw * 0.8), fill: "none" }, svg);
    el("line", { x1: 0, y1: h, x2: w, y2: h, stroke: "#999" }, svg);
    const t = el("text", { x: 0, y: h + 11, "font-size": 10, fill: "#555" }, svg);
    t.textContent = `${values.length} channels · min ${fmt(Math.min(...values))} · max ${fmt(max)}`;
    return svg;
  }
  function quantTable(parent, title, q, bits) {
    const s = document.createElement("div"); s.className = "sect"; s.textContent = title; parent.appendChild(s);
    const tb = document.createElement("table"); parent.appendChild(tb);
    row(tb, "dtype", q.dtype); row(tb, "bits", bits);
    if (q.qmin !== undefined) row(tb, "range (int)", `[${q.qmin}, ${q.qmax}]`);
    row(tb, "granularity", q.axis === null || q.axis === undefined ? "per tensor" : `per channel, axis ${q.axis}`);
    if (Array.isArray(q.scale)) { row(tb, "scales", `${q.scale.length} (chart below)`); parent.appendChild(chart(q.scale)); }
    else row(tb, "scale", fmt(q.scale));
    if (Array.isArray(q.zp)) row(tb, "zero points", [...new Set(q.zp)].slice(0, 6).join(", ") + (new Set(q.zp).size > 6 ? " …" : ""));
    else row(tb, "zero point", q.zp);
    row(tb, "observer", q.observer); row(tb, "fake-quant", q.fake_quant);
    if (q.symmetric !== undefined) row(tb, "symmetric", q.symmetric ? "yes" : "no");
    if (q.range) {
      const [lo, hi] = q.range;
      row(tb, "observed range", Array.isArray(lo) ? `per channel: min ${fmt(Math.min(...lo))}, max ${fmt(Math.max(...hi))}` : `[${fmt(lo)}, ${fmt(hi)}]`);
    }
    if (q.calibrated === false) row(tb, "calibrated", "no (no data seen yet)");
    row(tb, "stored", q.stored); if (q.int_range) row(tb, "stored values", `[${q.int_range[0]}, ${q.int_range[1]}]`);
  }

  function showDetails(name) {
    const m = currentModel();
    const box = $("details");
    box.textContent = "";
    const i = find(m, name);
    const h = document.createElement("h3"); h.textContent = i === undefined ? name : m.nodes[i].n; box.appendChild(h);
    if (i !== undefined && m.nodes[i].n !== name) {
      const p = document.createElement("p"); p.className = "hint"; p.textContent = `${name} is absorbed into this node in stage "${m.st.label}".`; box.appendChild(p);
    }
    if (i === undefined) {
      const p = document.createElement("p"); p.textContent = `not in stage "${m.st.label}".`; box.appendChild(p);
    } else {
      const n = m.nodes[i];
      const tb = document.createElement("table"); box.appendChild(tb);
      row(tb, "op", n.o); row(tb, "kind", KIND_NAMES[n.k] || n.k); row(tb, "target", n.t);
      row(tb, "module", n.g || "(root)"); row(tb, "shape", n.sh); row(tb, "weight", n.ws);
      if (n.rule) row(tb, "backend row", `${n.rule} (${n.rk})`);
      if (n.dom) row(tb, "domain", n.dom);
      if (n.at) row(tb, "attributes", Object.entries(n.at).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(" "));
      if (state.diff) row(tb, "diff", diffOf(model(state.a), model(state.b)).status.get(name));
      for (const o of DATA.overlays) { const v = nodeValue(o, n); if (v !== undefined) row(tb, o.name, fmt(v) + (n.n in o.values ? "" : " (worst absorbed)")); }
      if (n.why) { const w = document.createElement("div"); w.className = "why"; w.textContent = n.why; box.appendChild(w); }
      if (n.q) quantTable(box, n.k === "op" ? "quantization" : "quantization of the value", n.q, n.b);
      if (n.w) quantTable(box, "weight (fake-quantized in the module)", n.w, n.b);
      const tb2 = document.createElement("table");
      const s = document.createElement("div"); s.className = "sect"; s.textContent = "graph"; box.append(s, tb2);
      row(tb2, "inputs", n.i.length ? names(n.i.map((j) => m.nodes[j].n), m) : "–");
      row(tb2, "users", m.users[i].length ? names(m.users[i].map((j) => m.nodes[j].n), m) : "–");
      if (n.c) row(tb2, "constants", n.c.join(", "));
      if (n.ab) row(tb2, m.st.id === "ort" ? "replaces" : "absorbed", names(n.ab, null));
      if (n.fg && n.fg !== n.n) row(tb2, "fused into", n.fg);
    }
    const s = document.createElement("div"); s.className = "sect"; s.textContent = "in stages"; box.appendChild(s);
    const p = document.createElement("div");
    DATA.stages.forEach((st, si) => {
      if (st.error) return;
      const sm = stageIndex(si), at = find(sm, name);
      if (p.childNodes.length) p.append(" · ");
      if (at === undefined) { const x = document.createElement("s"); x.textContent = st.label; p.appendChild(x); }
      else p.appendChild(link(st.label + (sm.nodes[at].n === name ? "" : ` (in ${sm.nodes[at].n})`), () => setStage(si, name)));
    });
    box.appendChild(p);
  }

  function showGroup(m, gid) {
    const g = m.groups.get(gid);
    const box = $("details");
    box.textContent = "";
    const h = document.createElement("h3"); h.textContent = g.label; box.appendChild(h);
    const tb = document.createElement("table"); box.appendChild(tb);
    row(tb, "nodes", g.count);
    row(tb, "by kind", Object.entries(g.kinds).map(([k, c]) => `${KIND_NAMES[k] || k}: ${c}`).join(", "));
    const o = overlay();
    if (o) row(tb, o.name + " (worst)", fmt(groupValue(m, o, gid)));
  }

  function legend() {
    const lg = $("legend");
    lg.textContent = "";
    const m = currentModel();
    const counts = {};
    m.nodes.forEach((n) => { counts[n.k] = (counts[n.k] || 0) + 1; });
    const title = document.createElement("div"); title.className = "sect"; title.textContent = `${m.st.label}: ${m.nodes.length} nodes`; lg.appendChild(title);
    for (const k of Object.keys(KIND_NAMES)) {
      if (!counts[k]) continue;
      const r = document.createElement("div"); r.className = "row";
      const sw = document.createElement("span"); sw.className = "sw sw-" + k; sw.style.cssText = swatch(k);
      r.append(sw, `${KIND_NAMES[k]}: ${counts[k]}`); lg.appendChild(r);
    }
    const bits = document.createElement("div"); bits.className = "row";
    bits.innerHTML = 'border: <span class="sw" style="border-color:#2166ac"></span>8-bit <span class="sw" style="border-color:#6a51a3"></span>6–7 <span class="sw" style="border-color:#ae017e"></span>4–5 <span class="sw" style="border-color:#e7298a"></span>2–3 <span class="sw" style="border-color:#737373;border-style:dotted"></span>32 (bias)';
    lg.appendChild(bits);
    if (m.nodes.some((n) => n.fg)) { const r = document.createElement("div"); r.className = "row"; r.innerHTML = '<span class="sw" style="border:1.5px dashed #c98f00"></span> ' + (m.st.id === "traced" ? "fused group (one module after fuse_modules)" : "one layer, lowered (weight/bias DQ, conv, activation)"); lg.appendChild(r); }
    if (state.diff) {
      const d = diffOf(model(state.a), model(state.b));
      const r = document.createElement("div"); r.className = "row diffsum";
      r.innerHTML = `<span class="added">+${d.counts.added} added</span><span class="removed">−${d.counts.removed} removed</span><span class="rewritten">~${d.counts.rewritten} rewritten</span><span class="rewired">${d.counts.rewired} rewired</span>`;
      lg.appendChild(r);
      const list = document.createElement("div");
      let shown = 0;
      for (const [nm, s] of d.status) {
        if (s === "same" || shown >= 200) continue;
        shown++;
        const a = link(`${s === "added" ? "+" : s === "removed" ? "−" : "~"} ${nm}`, () => select(nm, { reveal: true }));
        a.className = "hit " + s; a.style.display = "block"; list.appendChild(a);
      }
      lg.appendChild(list);
    }
    overlayLegend();
  }
  function overlayLegend() {  // floats over the graph, bottom left: what the heat map's colours mean
    const lg = $("overlay-legend");
    lg.textContent = "";
    const o = overlay();
    lg.hidden = !o;
    if (!o) return;
    const [lo, hi] = overlayRange(o);
    const t = document.createElement("div"); t.className = "sect"; t.textContent = `${o.name} (${o.better} is better)`; lg.appendChild(t);
    const r = document.createElement("div"); r.className = "row";
    const left = o.better === "higher" ? heat(1) : heat(0), right = o.better === "higher" ? heat(0) : heat(1);
    const bar = document.createElement("span"); bar.className = "bar"; bar.style.background = `linear-gradient(to right, ${left}, ${heat(0.5)}, ${right})`;
    r.append(fmt(lo), bar, fmt(hi)); lg.appendChild(r);
    const n = Object.keys(o.values).length;
    const p = document.createElement("div"); p.textContent = `${n} values; a collapsed group shows its worst child.`; lg.appendChild(p);
    if (o.unknown.length) {
      const u = document.createElement("div"); u.className = "unknown";
      u.textContent = `${o.unknown.length} overlay name(s) match no node in any stage: ${o.unknown.slice(0, 50).join(", ")}${o.unknown.length > 50 ? " …" : ""}`;
      lg.appendChild(u);
    }
  }
  function swatch(k) {
    const c = { input: "#eee;#555", output: "#eee;#555", op: "#fff;#444", fq: "#dbe9f6;#2166ac", q: "#dbe9f6;#2166ac", dq: "#e5f5e0;#238b45", int: "#a1d99b;#006d2c", float: "#fde0c5;#d95f02", leaf: "#fde0c5;#d95f02" }[k].split(";");
    return `background:${c[0]};border-color:${c[1]}` + (k === "float" || k === "leaf" ? ";border-style:dashed" : "");
  }

  function banner() {
    const b = $("banner");
    const msgs = [];
    const st = DATA.stages[state.diff ? state.b : state.stage];
    let error = false;
    for (const s of state.diff ? [DATA.stages[state.a], DATA.stages[state.b]] : [st]) if (s.error) { msgs.push(s.error); error = true; }
    msgs.push(...(DATA.notes || []));
    b.hidden = !msgs.length;
    b.className = error ? "error" : "";
    b.textContent = msgs.join("  ·  ");
  }

  // ------------------------------------------------------------------ search
  function runSearch(q) {
    const m = currentModel();
    q = q.trim().toLowerCase();
    state.search = { q, hits: [], at: -1 };
    const box = $("search-results");
    box.textContent = "";
    if (!q) { box.hidden = true; return; }
    const exact = [], prefix = [], rest = [];  // an exact name first, then names starting with q, then the rest
    m.nodes.forEach((n, i) => {
      const name = n.n.toLowerCase();
      if (name === q) exact.push(i);
      else if (name.startsWith(q)) prefix.push(i);
      else if (name.includes(q) || n.o.toLowerCase().includes(q)) rest.push(i);
    });
    state.search.hits = exact.concat(prefix, rest);
    box.hidden = false;
    const head = document.createElement("div"); head.className = "sect"; head.id = "search-count";
    head.textContent = `${state.search.hits.length} match${state.search.hits.length === 1 ? "" : "es"} for "${q}"`;
    box.appendChild(head);
    for (const i of state.search.hits.slice(0, 200)) {
      const n = m.nodes[i];
      const a = document.createElement("a"); a.className = "hit"; a.dataset.name = n.n;
      a.textContent = n.n; const op = document.createElement("span"); op.className = "op"; op.textContent = n.o; a.appendChild(op);
      a.addEventListener("click", () => run(() => select(n.n, { reveal: true })));
      box.appendChild(a);
    }
    if (state.search.hits.length > 200) { const more = document.createElement("div"); more.className = "hint"; more.textContent = `… and ${state.search.hits.length - 200} more: refine the search`; box.appendChild(more); }
  }
  function nextHit() {
    const s = state.search;
    if (!s.hits.length) return;
    s.at = (s.at + 1) % s.hits.length;
    const name = currentModel().nodes[s.hits[s.at]].n;
    document.querySelectorAll("#search-results .hit").forEach((a) => a.classList.toggle("current", a.dataset.name === name));
    return run(() => select(name, { reveal: true }));
  }

  // ------------------------------------------------------------------ controls
  function setStage(si, name) {
    return run(async () => {
      if (state.diff) { state.diff = false; $("diff-on").checked = false; }
      state.stage = si;
      if (name) state.selected = name;
      if (state.selected) reveal(state.selected);
      syncControls();
      await render({ center: true });
      remember();
      if (state.search.q) runSearch(state.search.q);
    });
  }
  function syncControls() {
    document.querySelectorAll("#stages button").forEach((b) => b.classList.toggle("active", !state.diff && +b.dataset.index === state.stage));
    $("diff-a").value = state.a; $("diff-b").value = state.b;
  }

  function setup() {
    $("title").textContent = DATA.title;
    $("title").title = DATA.title + (DATA.elk ? ` — layout: elkjs ${DATA.elk}` : "");
    const tabs = $("stages");
    DATA.stages.forEach((st, si) => {
      const b = document.createElement("button");
      b.dataset.index = si; b.dataset.stage = st.id; b.setAttribute("role", "tab");
      b.textContent = st.label;
      const c = document.createElement("span"); c.className = "count"; c.textContent = st.error ? "failed" : st.nodes.length; b.appendChild(c);
      if (st.error) { b.classList.add("failed"); b.title = st.error; }
      else b.title = `made by ${st.pass}`;
      b.addEventListener("click", () => { if (!st.error) setStage(si); else { $("banner").hidden = false; $("banner").className = "error"; $("banner").textContent = st.error; } });
      tabs.appendChild(b);
      for (const id of ["diff-a", "diff-b"]) {
        const o = document.createElement("option"); o.value = si; o.textContent = st.label; o.disabled = !!st.error; $(id).appendChild(o);
      }
    });
    const ok = DATA.stages.map((s, i) => [s, i]).filter(([s]) => !s.error).map(([, i]) => i);
    const pref = DATA.stages.findIndex((s) => s.id === "fake-quant" && !s.error);
    state.stage = pref >= 0 ? pref : (ok.length ? ok[ok.length - 1] : 0);
    state.b = state.stage; state.a = ok[Math.max(0, ok.indexOf(state.stage) - 1)] ?? state.stage;
    const ov = $("overlay");
    const none = document.createElement("option"); none.value = -1; none.textContent = "no overlay"; ov.appendChild(none);
    DATA.overlays.forEach((o, k) => { const op = document.createElement("option"); op.value = k; op.textContent = "overlay: " + o.name; ov.appendChild(op); });
    ov.value = state.overlay;
    ov.addEventListener("change", () => run(async () => { state.overlay = +ov.value; for (const p of state.panels) draw(p); legend(); if (state.selected) showDetails(state.selected); }));
    $("diff-on").addEventListener("change", (ev) => run(async () => {  // ticked: what the pass that made this stage did
      state.diff = ev.target.checked;
      if (state.diff) { state.b = state.stage; state.a = ok[Math.max(0, ok.indexOf(state.stage) - 1)] ?? state.stage; }
      else state.stage = state.b;
      syncControls(); await render({ center: true });
    }));
    for (const id of ["diff-a", "diff-b"]) $(id).addEventListener("change", () => run(async () => {
      state.a = +$("diff-a").value; state.b = +$("diff-b").value; state.diff = true; $("diff-on").checked = true; syncControls(); await render({ center: true });
    }));
    let timer = null;
    $("search").addEventListener("input", (ev) => { clearTimeout(timer); timer = setTimeout(() => runSearch(ev.target.value), 120); });
    $("search").addEventListener("keydown", (ev) => { if (ev.key === "Enter") { clearTimeout(timer); if (state.search.q !== ev.target.value.trim().toLowerCase()) runSearch(ev.target.value); nextHit(); } });
    $("expand-all").addEventListener("click", () => run(async () => { expandAll(); await relayout(); for (const p of state.panels) fit(p); }));
    $("collapse-all").addEventListener("click", () => run(async () => { state.expanded = new Set([""]); await relayout(); for (const p of state.panels) fit(p); }));
    $("fit").addEventListener("click", () => state.panels.forEach(fit));
    $("show-shapes").addEventListener("change", (ev) => run(async () => { state.hideShapes = !ev.target.checked; await relayout(); }));
    window.addEventListener("resize", () => state.panels.forEach(fit));
    document.addEventListener("keydown", (ev) => {  // "/" searches, Escape clears the search and the selection
      if (ev.key === "/" && document.activeElement !== $("search")) { ev.preventDefault(); $("search").focus(); }
      else if ((ev.key === "ArrowLeft" || ev.key === "ArrowRight") && !["INPUT", "SELECT"].includes(document.activeElement.tagName)) {
        const ok = DATA.stages.map((st, i) => (st.error ? -1 : i)).filter((i) => i >= 0);  // previous / next stage
        const at = ok.indexOf(state.diff ? state.b : state.stage) + (ev.key === "ArrowLeft" ? -1 : 1);
        if (at >= 0 && at < ok.length) setStage(ok[at]);
      }
      else if (ev.key === "Escape") { $("search").value = ""; runSearch(""); state.selected = null; markSelection(); remember(); }
    });
  }

  function expandAll() {
    for (const p of state.panels.length ? state.panels : [{ si: state.stage }]) {
      const m = model(p.si);
      const queue = [""];
      while (queue.length) {
        const id = queue.shift();
        const g = m.groups.get(id);
        if (visibleCount(m) - 1 + g.items.length > EXPAND_ALL_MAX && id !== "") continue;
        state.expanded.add(id);
        for (const it of g.items) if (it.g !== undefined) queue.push(it.g);
      }
    }
  }

  async function start() {
    const t0 = performance.now();
    setup();
    if (!DATA.stages.some((s) => !s.error)) { banner(); $("banner").textContent = DATA.stages.map((s) => s.error).join(" · ") || "no stage"; document.body.dataset.ready = "1"; document.body.dataset.busy = "0"; return; }
    fromHash();
    const m = model(state.stage);
    defaultExpand(m, BUDGET);
    if (state.selected) { const i = find(m, state.selected); if (i !== undefined) ancestors(m, i).forEach((id) => state.expanded.add(id)); }
    syncControls();
    await run(() => render({ center: true }));
    window.fxviz.startMs = performance.now() - t0;
    document.body.dataset.ready = "1";
  }

  window.fxviz = {
    data: DATA, state, model, diffOf,
    stage: (id) => setStage(DATA.stages.findIndex((s) => s.id === id)),
    select: (name) => run(() => select(name, { reveal: true })),
    search: (q) => { runSearch(q); return nextHit(); },
    expandAll: () => run(async () => { expandAll(); await relayout(); }),
    visible: () => state.panels.map((p) => p.boxes.size),
  };
  start().catch((err) => { console.error("fxquant viz:", err); document.body.dataset.ready = "error"; });
})();
