"""The page of python -m mxd_fast.inspect: one HTML file, its style, script and data inline (nothing loaded from
the network). The script reads the data from the <script id="report-data"> element, follows the address's
hash (#expert=5 shows expert 5, #q=text lists the experts whose promoted tokens or top tokens contain it), and
writes its state into the page: #status says "ready: ..." once it has drawn, #errors collects every error."""
from __future__ import annotations

import html
import json

NEWLINE, SHOWN_NEWLINE = "\n", "\u21b5"   # a newline in a token or a generation is shown as a return arrow

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #1d1d1f; background: #fafafa; }
header { padding: 12px 20px; background: #24292f; color: #fff; }
header h1 { font-size: 18px; margin: 0 0 4px; }
header p { margin: 0; color: #c9d1d9; font-size: 13px; }
main { display: grid; grid-template-columns: 360px 1fr; gap: 16px; padding: 16px 20px; }
section { background: #fff; border: 1px solid #d0d7de; border-radius: 6px; padding: 12px 14px; margin-bottom: 16px; }
h2 { font-size: 15px; margin: 0 0 8px; }
#search { width: 100%; box-sizing: border-box; padding: 6px 8px; font-size: 14px; margin-bottom: 8px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
td, th { padding: 3px 6px; border-bottom: 1px solid #eaeef2; text-align: left; vertical-align: top; }
tr.row { cursor: pointer; } tr.row:hover { background: #f3f6fa; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.chip { display: inline-block; border: 1px solid #d0d7de; border-radius: 4px; padding: 0 4px; margin: 1px 2px;
        font-family: ui-monospace, monospace; font-size: 12px; white-space: pre; }
.chip.up { background: #e6f4ea; } .chip.down { background: #fdecea; }
.context { font-family: ui-monospace, monospace; font-size: 12.5px; margin: 4px 0; padding: 4px 6px;
           border-left: 3px solid #d0d7de; white-space: pre-wrap; word-break: break-all; }
.tok { border-radius: 2px; } .tok.top { outline: 1.5px solid #b35900; }
.value { color: #57606a; font-size: 11px; margin-right: 6px; }
.gen { font-family: ui-monospace, monospace; font-size: 12.5px; white-space: pre-wrap; margin: 3px 0; }
.muted { color: #57606a; } #errors { color: #b00020; white-space: pre-wrap; }
#dead { font-family: ui-monospace, monospace; font-size: 12px; max-height: 120px; overflow: auto; }
"""

SCRIPT = r"""
(function () {
  var statusEl = document.getElementById('status'), errorsEl = document.getElementById('errors');
  function fail(message) {
    errorsEl.hidden = false;
    errorsEl.textContent += message + '\n';
    statusEl.textContent = 'error';
  }
  window.onerror = function (message, source, line) { fail('error: ' + message + ' (line ' + line + ')'); };
  window.addEventListener('unhandledrejection', function (e) { fail('unhandled rejection: ' + e.reason); });
  var D = JSON.parse(document.getElementById('report-data').textContent);
  var byId = {};
  D.experts.forEach(function (e) { byId[e.id] = e; });
  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function fmt(x) { return x === null || x === undefined ? '' : Number(x).toPrecision(3); }
  function show(text) { return text.replace(/\n/g, '\u21b5'); }
  function chips(parent, ids, cls) {
    ids.forEach(function (t) { parent.appendChild(el('span', 'chip ' + cls, show(D.tokens[t]))); });
  }
  function expertRow(e) {
    var tr = el('tr', 'row');
    tr.appendChild(el('td', 'num', String(e.id)));
    tr.appendChild(el('td', 'num', fmt(e.freq)));
    tr.appendChild(el('td', 'num', fmt(e.mean)));
    var td = el('td');
    chips(td, e.promoted.slice(0, 4), 'up');
    tr.appendChild(td);
    tr.onclick = function () { location.hash = 'expert=' + e.id; };
    return tr;
  }
  function listExperts(experts, title) {
    var list = document.getElementById('list');
    list.textContent = '';
    list.appendChild(el('p', 'muted', title));
    var table = el('table'), head = el('tr');
    ['expert', 'freq', 'mean', 'promotes'].forEach(function (h) { head.appendChild(el('th', '', h)); });
    table.appendChild(head);
    experts.slice(0, 200).forEach(function (e) { table.appendChild(expertRow(e)); });
    list.appendChild(table);
  }
  function contextLine(ctx, max) {
    var div = el('div', 'context');
    div.appendChild(el('span', 'value', fmt(ctx.value)));
    ctx.tokens.forEach(function (t, i) {
      var c = ctx.coefs[i], span = el('span', i === ctx.at ? 'tok top' : 'tok', show(D.tokens[t]));
      var alpha = max > 0 ? Math.max(0, Math.min(1, c / max)) : 0;
      span.style.background = 'rgba(255, 140, 0, ' + alpha.toFixed(3) + ')';
      span.title = 'coefficient ' + fmt(c);
      div.appendChild(span);
    });
    return div;
  }
  function renderExpert(id) {
    var detail = document.getElementById('detail'), e = byId[id];
    detail.textContent = '';
    if (!e) {
      detail.appendChild(el('p', 'muted', 'No expert ' + id + ' (this layer has ' + D.size + ', 0 .. ' +
                                               (D.size - 1) + ').'));
      return 'no expert ' + id;
    }
    detail.appendChild(el('h2', '', (D.arch === 'mxd' ? 'Expert ' : 'Latent ') + id));
    detail.appendChild(el('p', 'muted', 'firing frequency ' + (e.freq === null ? 'unknown' : fmt(e.freq)) +
      ' (' + D.frequency_source + '); held-out ' + fmt(e.held_freq) + '; mean coefficient when firing ' +
      fmt(e.mean)));
    var up = el('p', '', 'promotes: '), down = el('p', '', 'suppresses: ');
    chips(up, e.promoted, 'up'); chips(down, e.suppressed, 'down');
    detail.appendChild(up); detail.appendChild(down);
    var box = el('div', 'contexts');
    box.id = 'contexts';
    box.appendChild(el('h2', '', 'Top activating contexts (held-out text)'));
    var max = e.contexts.reduce(function (m, c) { return Math.max(m, c.value); }, 0);
    if (!e.contexts.length) box.appendChild(el('p', 'muted', 'It did not fire on the held-out text.'));
    e.contexts.forEach(function (c) { box.appendChild(contextLine(c, max)); });
    detail.appendChild(box);
    if (e.steered) {
      detail.appendChild(el('h2', '', 'Steered generations (scale ' + fmt(D.steering.scale) + ')'));
      e.steered.forEach(function (g, i) {
        detail.appendChild(el('div', 'gen', D.steering.prompts[i] + ' \u2192 ' + show(g)));
      });
    }
    return 'expert ' + id + ' (' + e.contexts.length + ' contexts)';
  }
  function matches(e, q) {
    var has = function (t) { return D.tokens[t].toLowerCase().indexOf(q) >= 0; };
    return e.promoted.some(has) || e.contexts.some(function (c) { return has(c.tokens[c.at]); });
  }
  function route() {
    var hash = decodeURIComponent(location.hash.replace(/^#/, '')), m;
    if ((m = /^expert=(\d+)$/.exec(hash))) {
      document.getElementById('search').value = m[1];
      listExperts(D.experts.filter(function (e) { return String(e.id) === m[1]; }), 'expert ' + m[1]);
      statusEl.textContent = 'ready: ' + renderExpert(Number(m[1]));
    } else if ((m = /^q=(.*)$/.exec(hash)) && m[1].trim()) {
      var q = m[1].trim().toLowerCase(), found = D.experts.filter(function (e) { return matches(e, q); });
      document.getElementById('search').value = m[1];
      listExperts(found, found.length + ' expert(s) with ' + JSON.stringify(q) + ' among their promoted or top tokens');
      statusEl.textContent = 'ready: search ' + JSON.stringify(q) + ', ' + found.length + ' found';
    } else {
      listExperts(D.by_frequency.map(function (id) { return byId[id]; }), 'the most frequently firing experts');
      statusEl.textContent = 'ready';
    }
  }
  document.getElementById('search').addEventListener('change', function (ev) {
    var v = ev.target.value.trim();
    location.hash = /^\d+$/.test(v) ? 'expert=' + v : 'q=' + encodeURIComponent(v);
  });
  window.addEventListener('hashchange', route);
  route();
})();
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>%(title)s</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>%(style)s</style></head>
<body>
<header><h1>%(title)s</h1><p>%(subtitle)s</p></header>
<main>
<div>
<section><h2>Search</h2>
<input id="search" type="search" placeholder="expert id, or a token (Enter)" autocomplete="off">
<div id="list"></div></section>
</div>
<div>
<section id="detail"><p class="muted">Choose an expert on the left, or search.</p></section>
<section><h2>Firing frequency (log10)</h2>%(histogram)s</section>
<section><h2>Dead experts: %(dead_count)s</h2><div id="dead">%(dead)s</div></section>
<section><h2>Unsteered generations</h2>%(baseline)s</section>
<p class="muted">status: <span id="status">loading</span></p>
<pre id="errors" hidden></pre>
</div>
</main>
<script type="application/json" id="report-data">%(data)s</script>
<script>%(script)s</script>
</body></html>
"""


def script_json(data) -> str:
    """JSON safe inside a <script> element: '<', '>' and '&' escaped (no '</script>' can close it)."""
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(title: str, subtitle: str, data: dict, histogram_svg: str, dead: list, baseline: list) -> str:
    """The whole page. `baseline`: (prompt, generation) pairs of the unsteered layer."""
    dead_text = ", ".join(map(str, dead)) if dead else "none"
    baseline_html = "".join(f'<div class="gen">{html.escape(p)} \u2192 {html.escape(g.replace(NEWLINE, SHOWN_NEWLINE))}'
                            '</div>' for p, g in baseline) \
        or '<p class="muted">none generated</p>'
    return PAGE % {"title": html.escape(title), "subtitle": html.escape(subtitle), "style": STYLE,
                   "histogram": histogram_svg, "dead_count": len(dead), "dead": html.escape(dead_text),
                   "baseline": baseline_html, "data": script_json(data), "script": SCRIPT}
