"""A static HTML view of a pruned attribution graph: one self-contained file, no network.

Nodes sit in a grid, prompt positions left to right and layers bottom to top (embeddings at the
bottom, logits at the top); nodes sharing a cell sit side by side. Edges are drawn with widths by
|weight| (blue: positive, red: negative); a feature is labelled with its latent above and its top token
(what its decoder output raises most through the unembedding) below, its tooltip giving layer,
position and both; the summary says what share of the logit influence each kind carries (and says
loudly when the graph holds no feature). Clicking a node shows its details (kind, layer, position,
token, latent, activation, influence), its strongest incoming and outgoing edges and, for a feature,
its logit effects (the tokens it promotes and suppresses through the unembedding) and its top
activating contexts (``contexts.context_windows``, when the graph's JSON holds them; the active token
highlighted). A URL fragment naming a node id (``graph.html#f%3AL4%3Ap5%3A%23123``) opens the page
with that node selected. The graph's JSON (``pruning.graph_to_json``) is embedded in a
``<script type="application/json">`` block with every ``<`` escaped; every string reaches the page
through ``textContent``, so token text such as ``<script>`` is shown, never run.
"""
from __future__ import annotations

import json
from pathlib import Path

from sparsekit._util.atomic import atomic_write_bytes

from .attribution import Graph
from .pruning import graph_to_json

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; display: flex; height: 100vh; }
#canvas { flex: 1; overflow: auto; }
#details { width: 340px; border-left: 1px solid #ccc; padding: 10px; overflow: auto; font-size: 13px; }
.node { cursor: pointer; stroke: #333; stroke-width: 1; }
.node.selected { stroke: #000; stroke-width: 3; }
.feature { fill: #f0c36d; } .error { fill: #bbb; } .embedding { fill: #8fd19e; } .logit { fill: #9ab8f0; }
.edge { fill: none; opacity: 0.55; } .label { font-size: 10px; pointer-events: none; }
.axis { font-size: 11px; fill: #555; } .top-token { fill: #7a5a00; }
table { border-collapse: collapse; } td { padding: 1px 6px; border-bottom: 1px solid #eee; }
.context { font-family: ui-monospace, monospace; font-size: 12px; white-space: pre-wrap; margin: 3px 0;
  padding: 2px 4px; background: #fafafa; border-left: 3px solid #f0c36d; }
.context .active { background: #f0c36d; font-weight: bold; }
.context .value { color: #777; font-family: system-ui, sans-serif; font-size: 11px; }
"""

SCRIPT = r"""(() => {
const data = JSON.parse(document.getElementById('graph-data').textContent);
const svgNS = 'http://www.w3.org/2000/svg';
const nodes = data.nodes, edges = data.edges, T = data.tokens.length;
const layers = [...new Set(nodes.map(n => n.layer))].sort((a, b) => a - b);
const colW = 150, rowH = 70, left = 60, top = 30, r = 9;
const cells = {};
nodes.forEach(n => { const key = n.layer + ':' + n.position; (cells[key] = cells[key] || []).push(n); });
const pos = {};
Object.values(cells).forEach(list => list.forEach((n, i) => {
  const row = layers.length - 1 - layers.indexOf(n.layer);
  const spread = Math.min(24, (colW - 20) / Math.max(1, list.length));
  pos[n.id] = [left + n.position * colW + colW / 2 + (i - (list.length - 1) / 2) * spread, top + row * rowH + rowH / 2];
}));
const svg = document.createElementNS(svgNS, 'svg');
svg.setAttribute('width', left + T * colW + 20);
svg.setAttribute('height', top + layers.length * rowH + 60);
function el(tag, attrs, text) {
  const e = document.createElementNS(svgNS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
layers.forEach((layer, i) => {
  const name = layer < 0 ? 'emb' : (nodes.some(n => n.kind === 'logit' && n.layer === layer) ? 'logits' : 'L' + layer);
  svg.appendChild(el('text', {x: 4, y: top + (layers.length - 1 - i) * rowH + rowH / 2 + 4, class: 'axis'}, name));
});
data.tokens.forEach((tok, p) => svg.appendChild(
  el('text', {x: left + p * colW + colW / 2, y: top + layers.length * rowH + 20, class: 'axis', 'text-anchor': 'middle'},
     p + ': ' + tok)));
const maxW = Math.max(1e-12, ...edges.map(e => Math.abs(e.weight)));
edges.forEach(e => {
  const [x1, y1] = pos[e.source], [x2, y2] = pos[e.target];
  const path = el('path', {d: `M${x1},${y1} C${x1},${(y1 + y2) / 2} ${x2},${(y1 + y2) / 2} ${x2},${y2}`,
    class: 'edge', stroke: e.weight >= 0 ? '#2f6fd6' : '#d63a2f', 'stroke-width': 0.3 + 5 * Math.abs(e.weight) / maxW});
  svg.appendChild(path);
});
const details = document.getElementById('details');
function row(table, key, value) {
  const tr = document.createElement('tr');
  const a = document.createElement('td'); a.textContent = key;
  const b = document.createElement('td'); b.textContent = value;
  tr.append(a, b); table.appendChild(tr);
}
function fmt(v) { return typeof v === 'number' ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : String(v); }
function visible(tok) { return tok.replace(/\n/g, '\u21b5').replace(/\t/g, '\u2192'); }
function logitTable(n) {
  const h4 = document.createElement('h4'); h4.textContent = 'logit effects (through the unembedding)';
  details.appendChild(h4);
  const t = document.createElement('table'); t.className = 'logit-effects';
  const head = document.createElement('tr');
  for (const label of ['promotes', '', 'suppresses', '']) {
    const th = document.createElement('th'); th.textContent = label; head.appendChild(th);
  }
  t.appendChild(head);
  const rows = Math.max(n.promoted.length, n.suppressed.length);
  for (let i = 0; i < rows; i++) {
    const tr = document.createElement('tr');
    for (const [list, cls] of [[n.promoted, 'promoted'], [n.suppressed, 'suppressed']]) {
      const a = document.createElement('td'), b = document.createElement('td');
      if (list[i]) { a.textContent = visible(list[i][0]); b.textContent = fmt(list[i][1]); }
      a.className = cls; tr.append(a, b);
    }
    t.appendChild(tr);
  }
  details.appendChild(t);
}
function contexts(n) {
  const h4 = document.createElement('h4'); h4.textContent = 'top activating contexts';
  details.appendChild(h4);
  const box = document.createElement('div'); box.id = 'top-contexts'; details.appendChild(box);
  if (!n.contexts || !n.contexts.length) {
    const p = document.createElement('p'); p.className = 'no-contexts';
    p.textContent = n.contexts ? 'never fired in the contexts pass' : 'no contexts pass in this graph';
    box.appendChild(p); return;
  }
  n.contexts.forEach(c => {
    const div = document.createElement('div'); div.className = 'context';
    c.tokens.forEach((tok, i) => {
      const span = document.createElement('span'); span.textContent = visible(tok);
      if (i === c.active) { span.className = 'active'; span.title = fmt(c.value); }
      div.appendChild(span);
    });
    const v = document.createElement('span'); v.className = 'value'; v.textContent = '  ' + fmt(c.value);
    div.appendChild(v); box.appendChild(div);
  });
}
function show(n) {
  document.querySelectorAll('.node.selected').forEach(c => c.classList.remove('selected'));
  document.getElementById('node-' + nodes.indexOf(n)).classList.add('selected');
  details.replaceChildren();
  const h = document.createElement('h3'); h.id = 'details-title'; h.textContent = n.id; details.appendChild(h);
  const table = document.createElement('table'); table.id = 'details-table';
  for (const key of ['kind', 'layer', 'position', 'token', 'latent', 'activation', 'influence', 'probability']) {
    if (n[key] !== undefined && n[key] !== null) row(table, key, fmt(n[key]));
  }
  if (n.top_tokens) row(table, 'raises (unembedding)', n.top_tokens.join(' | '));
  details.appendChild(table);
  if (n.promoted) logitTable(n);
  if (n.kind === 'feature') contexts(n);
  for (const [title, mine, other] of [['strongest inputs', 'target', 'source'], ['strongest outputs', 'source', 'target']]) {
    const h4 = document.createElement('h4'); h4.textContent = title; details.appendChild(h4);
    const t = document.createElement('table'); t.className = title.replace(' ', '-');
    edges.filter(e => e[mine] === n.id).slice(0, 10).forEach(e => row(t, e[other], fmt(e.weight)));
    details.appendChild(t);
  }
}
nodes.forEach((n, i) => {
  const [x, y] = pos[n.id];
  const c = el('circle', {cx: x, cy: y, r: r, class: 'node ' + n.kind, id: 'node-' + i});
  const top = n.top_tokens && n.top_tokens.length ? n.top_tokens[0] : null;
  c.appendChild(el('title', {}, 'layer ' + n.layer + ', position ' + n.position + ' (' + JSON.stringify(n.token) + ')'
    + (n.kind === 'feature' ? ', latent ' + n.latent + (top !== null ? ', raises ' + JSON.stringify(top) : '') : '')
    + ' [' + n.id + ']'));
  c.addEventListener('click', () => show(n));
  svg.appendChild(c);
  const label = n.kind === 'feature' ? '#' + n.latent : (n.kind === 'logit' ? n.token : n.kind[0]);
  svg.appendChild(el('text', {x: x, y: y - r - 2, class: 'label', 'text-anchor': 'middle'}, label));
  if (top !== null) {  // a feature's top token (what its decoder output raises most), under it
    const short = top.length > 8 ? top.slice(0, 7) + '\u2026' : top;
    svg.appendChild(el('text', {x: x, y: y + r + 9, class: 'label top-token', 'text-anchor': 'middle'}, short));
  }
});
document.getElementById('canvas').appendChild(svg);
const wanted = decodeURIComponent(location.hash.slice(1));
const first = nodes.find(n => n.id === wanted);
if (first) {
  show(first);
  document.getElementById('node-' + nodes.indexOf(first)).scrollIntoView({block: 'center', inline: 'center'});
}
})();
"""


def graph_html(graph: Graph | dict, title: str = "attribution graph") -> str:
    """A pruned Graph (or its graph_to_json dict) -> the page's HTML."""
    data = graph_to_json(graph) if isinstance(graph, Graph) else graph
    if not isinstance(data, dict) or not {"nodes", "edges", "tokens"} <= set(data):
        raise ValueError("graph must be a Graph or graph_to_json's dict (nodes, edges, tokens)")
    payload = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    safe_title = json.dumps(str(title)).replace("<", "\\u003c")
    share = data.get("settings", {}).get("influence_share") or {}
    carried = ("" if not all(isinstance(share.get(kind), float) for kind in ("feature", "error", "embedding")) else
               f" Logit influence carried by features {share['feature']:.0%}, error nodes {share['error']:.0%}, "
               f"embeddings {share['embedding']:.0%}.")
    kinds = [node.get("kind") for node in data["nodes"]]
    summary = (f"{len(data['nodes'])} nodes ({kinds.count('feature')} features), {len(data['edges'])} edges; click a "
               f"node for its details; under a feature, the token it raises most. Edge width: |direct effect|; blue "
               f"positive, red negative.{carried}")
    if "feature" not in kinds:
        summary = "NO FEATURE NODES: this graph explains nothing about the transcoder. " + summary
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>attribution graph</title>"
            f"<style>{STYLE}</style></head><body><div id=\"canvas\"></div><div id=\"details\">"
            f"<p id=\"summary\">{summary}</p></div>"
            f"<script type=\"application/json\" id=\"graph-data\">{payload}</script>"
            f"<script>document.title = {safe_title};{SCRIPT}</script></body></html>")


def write_graph_html(graph: Graph | dict, path, title: str = "attribution graph") -> Path:
    """graph_html written atomically to path -> the path."""
    path = Path(path)
    atomic_write_bytes(path, graph_html(graph, title).encode("utf-8"))
    return path
