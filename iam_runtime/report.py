"""``OUT/index.html``: a run at a glance, for a person. One self-contained page (no network; the
overlays it shows are OUT's own files): the run's summary, its failures with their reasons, then
a grid of every complete image's overlay with its instances (class, confidence), shown a page at a
time so that a folder of 10,000 images stays quick to open. Written atomically at the end of every
run, resumed runs included (then it covers the images of earlier runs too)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from urllib.parse import quote

from .files import atomic_write_text

PAGE_SIZE = 60  # images per page of the grid


def index_entry(record: dict, overlay: Path | None, out_dir: Path) -> dict:
    """What the grid shows of one image: its file, overlay (relative URL, or None) and
    instances as (class, confidence)."""
    return {"file": record["file_name"],
            "overlay": quote(overlay.relative_to(out_dir).as_posix()) if overlay is not None else None,
            "instances": [[p["category_name"], round(float(p["score"]), 3)] for p in record["instances"]]}


def _rows(pairs) -> str:
    return "".join(f"<tr><th>{html.escape(str(k))}</th><td id=\"{html.escape(i)}\">{html.escape(str(v))}</td></tr>"
                   for i, k, v in pairs)


def render_index(summary: dict, entries: list[dict], title: str = "iam-infer") -> str:
    """The page's HTML: ``summary`` as RunSummary's dict, ``entries`` from :func:`index_entry`."""
    stages = summary.get("stage_seconds", {})
    done = summary.get("completed", 0)
    facts = [("s-images", "images", summary.get("images", 0)),
             ("s-completed", "completed in this run", done),
             ("s-skipped", "already complete (resumed)", summary.get("skipped_complete", 0)),
             ("s-failed", "failed", summary.get("failed", 0)),
             ("s-instances", "instances found in this run", summary.get("instances", 0)),
             ("s-rate", "images/s", f"{summary.get('images_per_second', 0.0):.2f}"),
             ("s-seconds", "wall time (s)", f"{summary.get('seconds', 0.0):.1f}"),
             ("s-backend", "engine", summary.get("backend", "")),
             ("s-bundle", "bundle", summary.get("bundle", ""))]
    per_image = [(f"t-{name}", name, f"{seconds:.3f} s total, {seconds / done:.3f} s per image" if done
                  else f"{seconds:.3f} s total") for name, seconds in stages.items()]
    errors = summary.get("errors", [])
    failures = "".join(f"<tr><td>{html.escape(e['file'])}</td><td>{html.escape(e['stage'])}</td>"
                       f"<td>{html.escape(e['reason'])}</td></tr>" for e in errors)
    failure_block = (f"<details id=\"failures\" open><summary>{len(errors)} failed images</summary><table>"
                     f"<tr><th>file</th><th>stage</th><th>reason</th></tr>{failures}</table></details>"
                     if errors else "<p id=\"failures\">No image failed.</p>")
    data = json.dumps(entries, separators=(",", ":")).replace("</", "<\\/")
    return _PAGE.format(title=html.escape(title), facts=_rows(facts), stages=_rows(per_image),
                        failures=failure_block, data=data, page_size=PAGE_SIZE)


def write_index(out_dir: Path, summary: dict, entries: list[dict]) -> Path:
    path = out_dir / "index.html"
    atomic_write_text(path, render_index(summary, entries))
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title} results</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1em; }}
th, td {{ text-align: left; padding: .2em .8em .2em 0; vertical-align: top; }}
th {{ font-weight: 600; }}
#overview {{ display: flex; gap: 3em; flex-wrap: wrap; }}
#grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 1em; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: .5em; }}
.card img {{ width: 100%; height: auto; display: block; background: #eee; min-height: 120px; }}
.file {{ font-size: .85em; word-break: break-all; color: #555; margin: .3em 0; }}
.instances {{ font-size: .9em; margin: 0; padding-left: 1.2em; }}
nav {{ margin: 1em 0; display: flex; gap: 1em; align-items: center; flex-wrap: wrap; }}
</style></head><body>
<h1>{title} results</h1>
<div id="overview">
<section><h2>Run</h2><table>{facts}</table></section>
<section><h2>Time per stage</h2><table>{stages}</table></section>
</div>
{failures}
<h2>Images</h2>
<p id="grid-totals"></p>
<nav><button id="prev">&larr; previous</button><span id="page"></span><button id="next">next &rarr;</button>
<label>class <select id="filter"><option value="">all</option></select></label></nav>
<noscript>The grid needs JavaScript; the overlays are in the overlays folder.</noscript>
<div id="grid"></div>
<script id="entries" type="application/json">{data}</script>
<script>
const entries = JSON.parse(document.getElementById("entries").textContent);
const pageSize = {page_size};
let page = 0, shown = entries;
const classes = [...new Set(entries.flatMap(e => e.instances.map(i => i[0])))].sort();
const filter = document.getElementById("filter");
for (const c of classes) filter.add(new Option(c, c));
const total = entries.reduce((n, e) => n + e.instances.length, 0);
document.getElementById("grid-totals").textContent =
  `${{entries.length}} images with outputs, ${{total}} instances`;
function render() {{
  const pages = Math.max(1, Math.ceil(shown.length / pageSize));
  page = Math.min(page, pages - 1);
  document.getElementById("page").textContent = `page ${{page + 1}} of ${{pages}} (${{shown.length}} images)`;
  document.getElementById("prev").disabled = page === 0;
  document.getElementById("next").disabled = page >= pages - 1;
  const grid = document.getElementById("grid");
  grid.replaceChildren();
  for (const e of shown.slice(page * pageSize, (page + 1) * pageSize)) {{
    const card = document.createElement("div");
    card.className = "card";
    if (e.overlay) {{
      const img = document.createElement("img");
      img.loading = "lazy";
      img.alt = e.file;
      img.dataset.state = "loading";
      img.onload = () => {{ img.dataset.state = "loaded"; }};
      img.onerror = () => {{ img.dataset.state = "error"; }};
      img.src = e.overlay;
      card.append(img);
    }}
    const name = document.createElement("div");
    name.className = "file";
    name.textContent = e.file;
    const list = document.createElement("ul");
    list.className = "instances";
    for (const [c, s] of e.instances) {{
      const li = document.createElement("li");
      li.textContent = `${{c}} ${{s.toFixed(2)}}`;
      list.append(li);
    }}
    if (!e.instances.length) {{ const li = document.createElement("li"); li.textContent = "no instance"; list.append(li); }}
    card.append(name, list);
    grid.append(card);
  }}
}}
document.getElementById("prev").onclick = () => {{ page--; render(); window.scrollTo(0, 0); }};
document.getElementById("next").onclick = () => {{ page++; render(); window.scrollTo(0, 0); }};
filter.onchange = () => {{
  shown = filter.value ? entries.filter(e => e.instances.some(i => i[0] === filter.value)) : entries;
  page = 0; render();
}};
render();
</script></body></html>
"""
