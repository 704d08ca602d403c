"""A small web page for the server: the loaded adapters (size, rank, hash, eval metrics, serving counters) and a
playground that sends one prompt to several adapters and the base side by side.

    GET /ui        the page: one self-contained HTML document (inline CSS + JS, nothing fetched from elsewhere)
    GET /ui/data   what the page shows, as JSON (below)

`app.create_app` includes `router` and calls `set_results`; the routes read `app.state.server`. The playground
calls the server's own /v1/completions (or /v1/chat/completions with "chat" ticked), one request per chosen
model, all at once, temperature 0. Query parameters fill the form: `/ui?prompt=Hi&models=base,legal&
max_tokens=16&chat=1&run=1` (run=1 sends it on load; the page sets <body data-state="done"> when all answered).

Metrics come from `loraplex eval --out` results: `loraplex serve --results FILE` (`set_results(app, path)`, or
an EvalResult), else ADAPTERS_DIR/eval_results.json when that file exists. A results file is read again for
every /ui/data, so a new eval run shows without a restart; when it cannot be read the page says why
(`results_error`) and still works. An adapter's metrics are shown only when the results scored the same
content hash (else marked stale).

/ui/data:
    {"base": "smollm2", "base_ids": [...], "metrics": ["loss", ...], "better": {"loss": "lower", ...},
     "results": {"data": ..., "examples": ...} | null, "results_error": "..." | null, "base_scores": {...} | null,
     "adapters": [{"name", "r", "layers", "content_hash", "bytes", "path", "scores": {...} | null, "stale",
                   "served": {"requests", "errors", "generated_tokens", "mean_latency_s"}}],
     "base_served": {...}}
"served" is the adapter's serving counters since start (metrics.Metrics.snapshot; what /metrics reports).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse

from ..errors import ConfigError
from ..workflows.results import BASE, METRICS, EvalResult

RESULTS_FILE = "eval_results.json"
ResultsLike = Union[EvalResult, str, os.PathLike, None]
router = APIRouter()


def set_results(app: FastAPI, results: ResultsLike) -> None:
    """Show the metrics of `results` on /ui: an EvalResult as it is, or a results JSON path (read now, so a
    missing or broken file raises ConfigError at start, and again on every /ui/data). None: the adapter
    folder's RESULTS_FILE when it exists."""
    if isinstance(results, (str, os.PathLike)):
        EvalResult.load(results)
        results = Path(results)
    app.state.eval_results = results


def _results(request: Request) -> tuple[Optional[EvalResult], Optional[str]]:
    """(the eval results to show or None, why a results file could not be read or None)."""
    given = getattr(request.app.state, "eval_results", None)
    if isinstance(given, EvalResult):
        return given, None
    path = given
    if path is None:
        folder = request.app.state.server.store.directory
        path = folder / RESULTS_FILE if folder is not None and (folder / RESULTS_FILE).is_file() else None
    if path is None:
        return None, None
    try:
        return EvalResult.load(path), None
    except ConfigError as exc:  # shown on the page; the adapters and the playground still work
        return None, str(exc)


def _bytes(path: str) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file()) if p.is_dir() else 0


def page_data(request: Request) -> dict[str, Any]:
    server = request.app.state.server
    results, error = _results(request)
    rows = []
    for name in server.store.names():
        info = server.store.info(name)
        scored = results is not None and name in results.adapters
        stale = scored and results.adapters[name].get("content_hash") != info.content_hash
        rows.append({"name": name, "r": info.rank, "layers": info.layers, "content_hash": info.content_hash,
                     "bytes": _bytes(info.path), "path": info.path, "stale": stale,
                     "scores": results.scores.get(name) if scored and not stale else None,
                     "served": server.metrics.snapshot(name)})
    return {"base": server.base_id, "base_ids": list(server.base_ids),
            "metrics": results.metrics if results else [], "better": METRICS,
            "results": {"data": results.data, "examples": results.examples} if results else None,
            "results_error": error,
            "base_scores": results.scores.get(BASE) if results else None, "adapters": rows,
            "base_served": server.metrics.snapshot(server.base_id)}


@router.get("/ui/data")
async def ui_data(request: Request):
    return page_data(request)


@router.get("/ui", response_class=HTMLResponse)
async def ui_page():
    return HTMLResponse(PAGE)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>loraplex</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
 h1 { font-size: 1.3em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .5em; }
 table { border-collapse: collapse; } th, td { padding: .3em .7em; border-bottom: 1px solid #ddd; text-align: left; }
 td.num { text-align: right; font-variant-numeric: tabular-nums; } code { font-size: .9em; color: #555; }
 textarea { width: 100%; max-width: 60em; height: 5em; font: inherit; }
 #outputs { display: grid; grid-template-columns: repeat(auto-fill, minmax(16em, 1fr)); gap: .8em; margin-top: 1em; }
 .card { border: 1px solid #ccc; border-radius: 6px; padding: .6em .8em; background: #fafafa; }
 .card h3 { font-size: 1em; margin: 0 0 .4em; } .card pre { white-space: pre-wrap; margin: 0; font: 13px monospace; }
 .card .meta { color: #777; font-size: .85em; margin-top: .4em; } .error { color: #b00; }
 label { margin-right: 1em; } .muted { color: #777; }
</style></head>
<body data-state="loading">
<h1>loraplex</h1><div id="base" class="muted"></div>
<h2>Adapters</h2><div id="results" class="muted"></div>
<table id="adapters"><thead></thead><tbody></tbody></table>
<h2>Playground</h2>
<form id="form">
 <textarea id="prompt" placeholder="One prompt, sent to every model ticked below"></textarea><br>
 <div id="models"></div>
 <label>max tokens <input id="max_tokens" type="number" min="1" value="32" style="width:5em"></label>
 <label><input id="chat" type="checkbox"> chat</label>
 <button id="run" type="submit">Send to all</button>
</form>
<div id="outputs"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const q = new URLSearchParams(location.search);
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls; return e; }
function fmt(metric, x, better) { if (x === null || x === undefined) return "-";
  return better[metric] === "higher" ? (100 * x).toFixed(1) + "%" : x.toFixed(4); }
function size(n) { const u = ["B", "KiB", "MiB", "GiB"]; let i = 0; while (n >= 1024 && i < 3) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i]; }

async function load() {
  const d = await (await fetch("/ui/data")).json();
  $("base").textContent = "base: " + d.base + " · " + d.adapters.length + " adapter(s) loaded";
  $("results").textContent = d.results ? "metrics: " + d.results.data + " (" + d.results.examples + " examples)"
    : d.results_error ? "eval results not shown: " + d.results_error
    : "no eval results (loraplex eval --out FILE, then loraplex serve --results FILE)";
  if (d.results_error) $("results").className = "error";
  const head = ["adapter", "rank", "layers", "size", "content hash", ...d.metrics, "requests", "tokens", "mean latency"];
  const tr = el("tr"); head.forEach((h) => tr.append(el("th", h))); $("adapters").tHead.append(tr);
  const rows = d.adapters.map((a) => [a.name, a, a.scores, a.served]);
  rows.push([d.base, null, d.base_scores, d.base_served]);
  for (const [name, a, scores, served] of rows) {
    const r = el("tr"); r.dataset.adapter = name;
    r.append(el("td", name + (a ? "" : " (base)")));
    r.append(el("td", a ? a.r : "-", "num"), el("td", a ? a.layers : "-", "num"), el("td", a ? size(a.bytes) : "-", "num"));
    const h = el("td"); if (a) { const c = el("code", a.content_hash.slice(0, 12)); c.title = a.content_hash; h.append(c); }
    r.append(h);
    for (const m of d.metrics) r.append(el("td", a && a.stale ? "stale" : fmt(m, scores ? scores[m] : null, d.better), "num"));
    r.append(el("td", served.requests + (served.errors ? " (" + served.errors + " failed)" : ""), "num"),
             el("td", served.generated_tokens, "num"),
             el("td", served.requests ? (1000 * served.mean_latency_s).toFixed(0) + " ms" : "-", "num"));
    $("adapters").tBodies[0].append(r);
  }
  const wanted = q.get("models") ? q.get("models").split(",") : null;
  for (const name of [d.base, ...d.adapters.map((a) => a.name)]) {
    const box = el("input"); box.type = "checkbox"; box.value = name; box.checked = !wanted || wanted.includes(name) ||
      (name === d.base && d.base_ids.some((b) => wanted.includes(b)));  // "base" names the base too
    const label = el("label"); label.append(box, " " + name); $("models").append(label);
  }
  if (q.get("prompt") !== null) $("prompt").value = q.get("prompt");
  if (q.get("max_tokens")) $("max_tokens").value = q.get("max_tokens");
  $("chat").checked = q.get("chat") === "1";
  document.body.dataset.state = "ready";
  if (q.get("run") === "1") await run();
}

async function ask(model, prompt, maxTokens, chat) {
  const body = { model, max_tokens: maxTokens, temperature: 0 };
  if (chat) body.messages = [{ role: "user", content: prompt }]; else body.prompt = prompt;
  const t0 = performance.now();
  const r = await fetch(chat ? "/v1/chat/completions" : "/v1/completions",
                        { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const j = await r.json();
  const ms = Math.round(performance.now() - t0);
  if (!r.ok) return { error: (j.error && j.error.message) || r.statusText, ms };
  const c = j.choices[0];
  return { text: chat ? c.message.content : c.text, finish: c.finish_reason, tokens: j.usage.completion_tokens, ms };
}

async function run() {
  document.body.dataset.state = "running";
  const models = [...$("models").querySelectorAll("input:checked")].map((b) => b.value);
  const prompt = $("prompt").value, maxTokens = parseInt($("max_tokens").value, 10) || 32, chat = $("chat").checked;
  $("outputs").replaceChildren();
  const cards = models.map((m) => { const c = el("div", undefined, "card"); c.dataset.model = m;
    c.append(el("h3", m), el("pre", "…")); $("outputs").append(c); return c; });
  await Promise.all(models.map(async (m, i) => {
    const card = cards[i], pre = card.querySelector("pre");
    try {
      const r = await ask(m, prompt, maxTokens, chat);
      if (r.error) { pre.textContent = r.error; pre.className = "error"; }
      else { pre.textContent = r.text; card.append(el("div", r.tokens + " tokens · " + r.finish + " · " + r.ms + " ms", "meta")); }
    } catch (e) { pre.textContent = String(e); pre.className = "error"; }
  }));
  document.body.dataset.state = "done";
}

$("form").addEventListener("submit", (e) => { e.preventDefault(); run(); });
load().catch((e) => { $("base").textContent = "failed to load: " + e; $("base").className = "error"; });
</script>
</body></html>
"""
