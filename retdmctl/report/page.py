"""The evaluation report page: one self-contained HTML file (inline CSS, SVG and a few
lines of JS; no external URL), rendered from the plain data that
:func:`retdmctl.report.build.build_report` gathers.

Every string that comes from data (class names, image ids, config values, paths) goes
through :func:`~retdmctl.report.fragments.esc` (``html.escape(..., quote=True)``) before
it reaches the page; the one script on the page reads only numbers and index lists from
``data-`` attributes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from retdmctl.metrics import HIGHER_IS_BETTER, METRIC_NAMES
from retdmctl.report.fragments import esc, fmt, nice_ticks, tick_label

METRIC_LABELS = {
    "mAP": "mAP (mean of per-class AP)",
    "C-P": "C-P (per-class precision, averaged)",
    "C-R": "C-R (per-class recall, averaged)",
    "C-F1": "C-F1 (F1 of C-P and C-R)",
    "O-P": "O-P (overall precision)",
    "O-R": "O-R (overall recall)",
    "O-F1": "O-F1 (overall F1)",
    "hamming_loss": "hamming loss",
    "ranking_loss": "ranking loss",
    "coverage": "coverage (0-based)",
    "one_error": "one-error",
    "average_precision": "avg. precision (label ranking)",
}

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f6f9; color: #1f2933;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
.container { max-width: 1180px; margin: 0 auto; padding: 24px 20px 40px; }
h1 { margin: 0 0 6px; font-size: 24px; font-weight: 650; }
h2 { margin: 0 0 10px; font-size: 17px; font-weight: 600; }
h3 { margin: 12px 0 4px; font-size: 14px; font-weight: 600; color: #374151; }
section, header { background: #fff; border: 1px solid #e3e8ef; border-radius: 10px;
  padding: 16px 20px; margin: 14px 0; }
.sub { color: #6b7280; margin: 0 0 10px; }
table { border-collapse: collapse; }
th, td { padding: 4px 9px; text-align: left; border-bottom: 1px solid #eef1f5; vertical-align: top; }
th { font-size: 12px; color: #6b7280; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 10px 18px; }
.kv th { color: #4b5563; font-size: 13px; padding-left: 0; white-space: nowrap; }
.kv td { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; word-break: break-all; }
.cfg h3 { margin-top: 4px; }
.bar { position: relative; height: 10px; width: 120px; background: #eef2f7; border-radius: 5px; overflow: hidden;
  display: inline-block; vertical-align: middle; margin-left: 6px; }
.bar span { position: absolute; left: 0; top: 0; bottom: 0; background: #3b82f6; }
.bar.f1 span { background: #10b981; }
.na { color: #9ca3af; }
.muted { color: #6b7280; }
.best { font-weight: 700; }
.paper { color: #6d28d9; }
.note { background: #fffbeb; border: 1px solid #fde68a; border-radius: 8px; padding: 8px 12px; margin: 8px 0; }
svg.chart { width: 100%; height: auto; display: block; max-width: 600px; }
svg#proj { max-width: 760px; }
.grid.wide { grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); }
.grid.wide .kv td { word-break: normal; overflow-wrap: anywhere; }
svg.chart text { font: 11px system-ui, Arial, sans-serif; fill: #4b5563; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 8px 20px; }
.cooc td { text-align: center; font-size: 12px; min-width: 38px; border: 1px solid #fff; }
.cooc th.rot { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; max-height: 140px; }
.thumbs { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; }
.thumb { border: 1px solid #e5e7eb; border-radius: 8px; padding: 6px; font-size: 11.5px; background: #fafafa; }
.thumb img { width: 100%; height: 110px; object-fit: cover; border-radius: 4px; display: block; }
.thumb .id { color: #6b7280; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.tp { color: #047857; } .fp { color: #b91c1c; } .fn { color: #b45309; text-decoration: underline dotted; }
.legend span { display: inline-block; margin-right: 12px; font-size: 12px; }
.legend i { display: inline-block; width: 10px; height: 10px; border-radius: 5px; margin-right: 4px; vertical-align: -1px; }
select { font: inherit; }
footer { color: #9ca3af; font-size: 12px; text-align: center; }
"""

# Highlight the images that carry a chosen label in the embedding scatter.
_JS = """
(function () {
  var sel = document.getElementById('proj-label');
  if (!sel) { document.body.setAttribute('data-report-ready', '1'); return; }
  var pts = document.querySelectorAll('#proj circle');
  function apply() {
    var v = sel.value;
    for (var i = 0; i < pts.length; i++) {
      var labels = (pts[i].getAttribute('data-l') || '').split(' ');
      var on = v === '' || labels.indexOf(v) >= 0;
      pts[i].setAttribute('fill-opacity', on ? '0.85' : '0.08');
      pts[i].setAttribute('r', on && v !== '' ? '3.6' : '2.8');
    }
  }
  sel.addEventListener('change', apply);
  apply();
  document.body.setAttribute('data-report-ready', '1');
})();
"""


def color(i: int, n: int) -> str:
    """A distinct colour for class ``i`` of ``n`` (golden-angle hues)."""
    palette = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d", "#4b5563")
    if n <= len(palette):
        return palette[i]
    return f"hsl({(i * 137.508) % 360:.1f},65%,45%)"


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


# --- charts ------------------------------------------------------------------------------


def line_chart(
    series: Sequence[tuple[str, str, Sequence[tuple[float, float]]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
    width: int = 560,
    height: int = 300,
    legend: bool = True,
    markers: bool = True,
) -> str:
    """An SVG line chart: ``series`` = [(name, colour, [(x, y), ...])]; None/NaN y leave gaps."""
    left, right, top, bottom = 62, (175 if legend else 14), 24, 40
    pts = [(x, y) for _, _, p in series for x, y in p if _num(x) and _num(y)]
    head = (f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">'
            f"<title>{esc(title)}</title>"
            f'<text x="{left}" y="14" style="font-weight:600">{esc(title)}</text>')
    if not pts:
        return head + f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no values recorded</text></svg>'
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xt = nice_ticks(*(x_range or (min(xs), max(xs))), 6, integer=x_range is None and all(float(x).is_integer() for x in xs))
    yt = nice_ticks(*(y_range or (min(ys), max(ys))), 5)
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / ((y1 - y0) or 1) * ph

    out = [head]
    for t in yt:
        out.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{left + pw}" y2="{py(t):.1f}" stroke="#eef1f5"/>'
                   f'<text x="{left - 5}" y="{py(t) + 4:.1f}" text-anchor="end">{tick_label(t)}</text>')
    for t in xt:
        out.append(f'<line x1="{px(t):.1f}" y1="{top + ph}" x2="{px(t):.1f}" y2="{top + ph + 4}" stroke="#9ca3af"/>'
                   f'<text x="{px(t):.1f}" y="{top + ph + 16}" text-anchor="middle">{tick_label(t)}</text>')
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#9ca3af"/>'
               f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#9ca3af"/>'
               f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle">{esc(x_label)}</text>'
               f'<text transform="translate(13,{top + ph / 2}) rotate(-90)" text-anchor="middle">{esc(y_label)}</text>')
    for k, (name, col, points) in enumerate(series):
        run: list[str] = []
        runs: list[list[str]] = []
        for x, y in points:
            if _num(x) and _num(y):
                run.append(f"{px(x):.1f},{py(y):.1f}")
            elif run:
                runs.append(run)
                run = []
        runs.append(run)
        for r in runs:
            if not r:
                continue
            out.append(f'<polyline fill="none" stroke="{col}" stroke-width="1.8" stroke-linejoin="round" points="{" ".join(r)}"/>')
            if markers and len(points) <= 60:
                out.extend(f'<circle cx="{c.split(",")[0]}" cy="{c.split(",")[1]}" r="2.2" fill="{col}"/>' for c in r)
        if legend:
            ly, lx = top + 6 + k * 16, left + pw + 12
            if ly < height - 10:
                out.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 16}" y2="{ly}" stroke="{col}" stroke-width="3"/>'
                           f'<text x="{lx + 21}" y="{ly + 4}">{esc(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def scatter(points: Sequence[Sequence[float]], labels: Sequence[Sequence[int]], class_names: Sequence[str],
            *, width: int = 640, height: int = 460) -> str:
    """The 2-D embedding projection: each point coloured by its first true label (grey: none)."""
    pad = 18
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    sx = (width - 2 * pad) / ((x1 - x0) or 1)
    sy = (height - 2 * pad) / ((y1 - y0) or 1)
    n = len(class_names)
    out = [f'<svg id="proj" class="chart" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="2-D projection of the image embeddings"><title>2-D projection of the image embeddings</title>'
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fcfcfd" stroke="#eef1f5"/>']
    for (x, y), labs in zip(points, labels):
        col = color(labs[0], n) if labs else "#9ca3af"
        out.append(f'<circle cx="{pad + (x - x0) * sx:.1f}" cy="{height - pad - (y - y0) * sy:.1f}" r="2.8" '
                   f'fill="{col}" fill-opacity="0.85" data-l="{" ".join(str(int(i)) for i in labs)}"/>')
    out.append("</svg>")
    return "".join(out)


# --- sections ----------------------------------------------------------------------------


def _kv(items: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_show(v))}</td></tr>" for k, v in items.items())
    return f'<table class="kv">{rows}</table>'


def _show(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_show(x) for x in v)
    if v == "":
        return '""'
    return str(v)


def _header(d: Mapping[str, Any]) -> str:
    ds = d["dataset"]
    splits = ", ".join(f"{k} {v}" for k, v in ds.get("splits", {}).items())
    dataset = {
        "name": ds.get("name", ""),
        "source": ds.get("source", ""),
        "fingerprint": ds.get("fingerprint", ""),
        "images": ds.get("images", ""),
        "classes": ds.get("classes", ""),
        "splits": splits,
    }
    return (f'<header><h1>{esc(d["title"])}</h1><p class="sub">{esc(d.get("subtitle", ""))}</p>'
            f'<div class="grid wide"><div><h3>Dataset</h3>{_kv(dataset)}</div>'
            f'<div><h3>Model</h3>{_kv(d.get("model", {}))}</div></div></header>')


def _config_section(config: Mapping[str, Mapping[str, Any]]) -> str:
    if not config:
        return ""
    cards = "".join(f"<div><h3>[{esc(name)}]</h3>{_kv(values)}</div>" for name, values in config.items() if values)
    return (f'<section class="cfg"><h2>Configuration</h2><p class="sub">Every hyperparameter of every stage, as resolved '
            f'in retdm.toml (the stage checkpoints record the sections they were trained with).</p>'
            f'<div class="grid">{cards}</div></section>')


def _metrics_section(d: Mapping[str, Any]) -> str:
    ours: Mapping[str, Mapping[str, float]] = d["metrics"]
    paper: Mapping[str, Mapping[str, float]] = d.get("paper") or {}
    cols = list(ours)
    head = "".join(f'<th class="num">{esc(c)}</th>' for c in cols)
    head += "".join(f'<th class="num paper">{esc(c)}</th>' for c in paper)
    rows = []
    for name in METRIC_NAMES:
        if not any(name in m for m in ours.values()):
            continue
        better = HIGHER_IS_BETTER[name]
        vals = [m.get(name) for m in ours.values()]
        finite = [v for v in vals if _num(v)]
        best = (max(finite) if better else min(finite)) if len(finite) > 1 else None
        cells = "".join(
            f'<td class="num{" best" if best is not None and v == best else ""}">{fmt(v)}</td>' for v in vals)
        cells += "".join(
            f'<td class="num paper">{fmt(p[name]) if _num(p.get(name)) else "&ndash;"}</td>' for p in paper.values())
        arrow = "&#8593; higher" if better else "&#8595; lower"
        rows.append(f'<tr><td>{esc(METRIC_LABELS.get(name, name))}</td>{cells}<td class="muted">{arrow} is better</td></tr>')
    note = ""
    if paper:
        note = f'<p class="sub paper">{esc(d.get("paper_note", ""))}</p>'
    if split_note := d.get("split_note"):
        note += f'<div class="note">{esc(split_note[0].upper() + split_note[1:])}.</div>'
    thr = d.get("threshold_note", "")
    return (f'<section><h2>Metrics</h2><p class="sub">{esc(thr)}</p>{note}<table><thead><tr><th>metric</th>{head}'
            f'<th></th></tr></thead><tbody>{"".join(rows)}</tbody></table></section>')


def _bar(v: float | None, cls: str = "") -> str:
    if not _num(v):
        return ""
    return f'<span class="bar {cls}"><span style="width:{min(max(float(v), 0), 1) * 100:.1f}%"></span></span>'


def _per_class_section(d: Mapping[str, Any]) -> str:
    names: list[str] = d["class_names"]
    pc: list[Mapping[str, Any]] = d["per_class"]

    def key(i: int) -> tuple[int, float]:
        ap = pc[i].get("ap")
        return (1, 0.0) if not _num(ap) else (0, -float(ap))

    rows = []
    for i in sorted(range(len(names)), key=key):
        c = pc[i]
        rows.append(
            f'<tr><td><i style="display:inline-block;width:9px;height:9px;border-radius:5px;background:{color(i, len(names))}"></i> '
            f'{esc(names[i])}</td><td class="num">{int(c["support"])}</td><td class="num">{fmt(c.get("threshold"), 2)}</td>'
            f'<td class="num">{fmt(c.get("precision"), 3)}</td><td class="num">{fmt(c.get("recall"), 3)}</td>'
            f'<td class="num">{fmt(c.get("f1"), 3)}{_bar(c.get("f1"), "f1")}</td>'
            f'<td class="num">{fmt(c.get("ap"), 3)}{_bar(c.get("ap"))}</td></tr>')
    missing = [names[i] for i in range(len(names)) if not _num(pc[i].get("ap"))]
    note = ""
    if missing:
        note = (f'<div class="note">{len(missing)} class(es) have no positive image in this split: '
                f'{esc(", ".join(missing))}. Their AP and recall are undefined: they are left out of mAP, C-P, '
                f'C-R and C-F1 alike (their false positives still count in O-P and the hamming loss).</div>')
    return (f'<section><h2>Per-class results</h2><p class="sub">{esc(d.get("per_class_note", ""))}</p>{note}'
            '<table><thead><tr><th>class</th><th class="num">positives (split)</th><th class="num">threshold</th>'
            '<th class="num">precision</th><th class="num">recall</th><th class="num">F1 (class)</th>'
            f'<th class="num">AP (class)</th></tr></thead><tbody>{"".join(rows)}</tbody></table></section>')


def _pr_section(d: Mapping[str, Any]) -> str:
    names: list[str] = d["class_names"]
    curves = d.get("pr_curves") or []
    series = [(f"{names[i]} (AP {c['ap']:.3f})", color(i, len(names)), list(zip(c["recall"], c["precision"])))
              for i, c in enumerate(curves) if c]
    if not series:
        return ""
    charts = []
    chunk = 10  # classes per chart: a legend of 80 lines helps nobody
    for start in range(0, len(series), chunk):
        part = series[start:start + chunk]
        title = "Precision-recall per class" + (f" ({start + 1}-{start + len(part)})" if len(series) > chunk else "")
        charts.append(line_chart(part, title=title, x_label="recall", y_label="precision", x_range=(0, 1),
                                 y_range=(0, 1), markers=False, width=560, height=320))
    return f'<section><h2>Precision-recall curves</h2><div class="charts">{"".join(charts[:8])}</div></section>'


def _calibration_section(d: Mapping[str, Any]) -> str:
    cal = d.get("calibration")
    if not cal:
        return ""
    rel, hist = cal["reliability"], cal["histogram"]
    curve = [(m, p) for m, p in zip(rel["mean_score"], rel["positive_fraction"]) if m is not None]
    reliability_chart = line_chart(
        [("y = x (calibrated)", "#9ca3af", [(0.0, 0.0), (1.0, 1.0)]), ("scores", "#2563eb", curve)],
        title=f"Reliability ({rel['bins']} bins)", x_label="mean score in the bin", y_label="fraction positive",
        x_range=(0, 1), y_range=(0, 1))
    edges = hist["edges"]

    def steps(counts: Sequence[int]) -> list[tuple[float, float]]:  # a histogram's outline
        return [pt for i, c in enumerate(counts) for pt in ((edges[i], c), (edges[i + 1], c))]

    hist_chart = line_chart(
        [(f"positives ({sum(hist['positives']):,})", "#059669", steps(hist["positives"])),
         (f"negatives ({sum(hist['negatives']):,})", "#dc2626", steps(hist["negatives"]))],
        title=f"Scores ({len(edges) - 1} bins)", x_label="score", y_label="entries", x_range=(0, 1),
        y_range=(0, max([1, *hist["positives"], *hist["negatives"]])), markers=False)
    if cal["entries"]:
        line = (f"ECE {cal['ece']:.3f} over {cal['entries']:,} entries; "
                f"{cal['distinct']:,} distinct values (to 3 decimals)")
    else:
        line = "No known entry: nothing to calibrate."
    return (f'<section><h2>Calibration</h2><p class="sub">{esc(d.get("calibration_note", ""))}</p>'
            f'<div class="charts">{reliability_chart}{hist_chart}</div><p>{esc(line)}</p></section>')


def _cooc_section(d: Mapping[str, Any]) -> str:
    names: list[str] = d["class_names"]
    m = d.get("cooccurrence")
    if m is None or not names:
        return ""
    limit = 40
    n = min(len(names), limit)
    head = "".join(f'<th class="rot">{esc(names[j])}</th>' for j in range(n))
    rows = []
    for i in range(n):
        diag = m[i][i] or 1
        cells = []
        for j in range(n):
            v = int(m[i][j])
            frac = v / diag
            bg = "#1e3a8a" if i == j else f"rgba(37,99,235,{min(frac, 1):.3f})"
            fg = "#fff" if i == j or frac > 0.55 else "#1f2933"
            tip = f"{names[i]} and {names[j]}: {v} images ({frac:.0%} of {names[i]})"
            cells.append(f'<td style="background:{bg};color:{fg}" title="{esc(tip)}">{v}</td>')
        rows.append(f"<tr><th>{esc(names[i])}</th>{''.join(cells)}</tr>")
    more = f" (first {limit} of {len(names)} classes)" if len(names) > limit else ""
    return (f'<section><h2>Label co-occurrence</h2><p class="sub">{esc(d.get("cooccurrence_note", ""))}{esc(more)}. '
            'Cell (row, column): images carrying both labels; shade: the share of the row label\'s images.</p>'
            f'<div style="overflow-x:auto"><table class="cooc"><thead><tr><th></th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div></section>')


def _history_section(history: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    if not history:
        return '<section><h2>Training curves</h2><p class="muted">No training history recorded.</p></section>'
    palette = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2")
    blocks = []
    for stage, epochs in history.items():
        keys: list[str] = []
        for row in epochs:
            keys += [k for k, v in row.items() if k not in ("epoch", "lr") and k not in keys and _num(v)]
        xs = [float(r["epoch"]) if _num(r.get("epoch")) else float(i + 1) for i, r in enumerate(epochs)]
        # scores (mAP, F1, accuracy) on one axis, every loss term on the other
        score_keys = [k for k in keys if any(t in k.lower() for t in ("map", "f1", "acc", "precision", "recall"))]
        loss_keys = [k for k in keys if k not in score_keys]

        def ser(ks: list[str], offset: int = 0) -> list:
            return [(k, palette[(n + offset) % len(palette)], [(x, r.get(k)) for x, r in zip(xs, epochs)])
                    for n, k in enumerate(ks)]

        charts = line_chart(ser(loss_keys), title=f"{stage}: loss", x_label="epoch", y_label="loss")
        if score_keys:
            charts += line_chart(ser(score_keys, 2), title=f"{stage}: mAP", x_label="epoch", y_label="score")
        blocks.append(f'<h3>{esc(stage)} <span class="muted">({len(epochs)} epochs)</span></h3>'
                      f'<div class="charts">{charts}</div>')
    return f'<section><h2>Training curves</h2><p class="sub">Loss and mAP on separate axes.</p>{"".join(blocks)}</section>'


def _thumbs_section(d: Mapping[str, Any]) -> str:
    thumbs = d.get("thumbnails") or []
    if not thumbs:
        return ""
    cards = []
    for t in thumbs:
        true = set(t["true"])
        pred = {name for name, _ in t["pred"]}
        got = " ".join(
            f'<span class="{"tp" if name in true else "fp"}">{"&#10003;" if name in true else "&#10007;"}{esc(name)} {s:.2f}</span>'
            for name, s in t["pred"]) or '<span class="muted">nothing</span>'
        missed = " ".join(f'<span class="fn">{esc(name)}</span>' for name in t["true"] if name not in pred)
        truth = ", ".join(esc(x) for x in t["true"]) or '<span class="muted">none</span>'
        cards.append(
            f'<div class="thumb"><img src="{t["uri"]}" alt="{esc(t["id"])}" loading="lazy">'
            f'<div class="id" title="{esc(t["id"])}">{esc(t["id"])}</div>'
            f'<div>true: {truth}</div><div>pred: {got}</div>'
            + (f"<div>missed: {missed}</div>" if missed else "") + "</div>")
    return (f'<section><h2>Test images, worst mistakes first</h2><p class="sub">{esc(d.get("thumbnails_note", ""))} '
            '<span class="tp">&#10003; correct</span>, <span class="fp">&#10007; false positive</span>, '
            f'<span class="fn">missed</span>.</p><div class="thumbs">{"".join(cards)}</div></section>')


def _projection_section(d: Mapping[str, Any]) -> str:
    proj = d.get("projection")
    if not proj or not proj.get("points"):
        return ""
    names: list[str] = d["class_names"]
    options = '<option value="">all images (colour: first label)</option>' + "".join(
        f'<option value="{i}">{esc(n)}</option>' for i, n in enumerate(names))
    legend = "".join(f'<span><i style="background:{color(i, len(names))}"></i>{esc(n)}</span>'
                     for i, n in enumerate(names[:40]))
    return (f'<section><h2>Image embeddings (2-D projection)</h2><p class="sub">{esc(proj.get("note", ""))}</p>'
            f'<p>Highlight the images carrying <select id="proj-label">{options}</select></p>'
            f'{scatter(proj["points"], proj["labels"], names)}<p class="legend">{legend}</p></section>')


def render_page(d: Mapping[str, Any]) -> str:
    """The report page for the data dict of :func:`retdmctl.report.build.gather`."""
    footer = " · ".join(esc(f"{k}: {v}") for k, v in (d.get("footer") or {}).items())
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{esc(d["title"])}</title><style>{_CSS}</style></head><body><div class="container">'
        f"{_header(d)}{_metrics_section(d)}{_per_class_section(d)}{_pr_section(d)}{_calibration_section(d)}"
        f"{_history_section(d.get('history') or {})}{_thumbs_section(d)}{_projection_section(d)}"
        f"{_cooc_section(d)}{_config_section(d.get('config') or {})}"
        f"<footer>Generated by retdmctl · {footer}</footer></div>"
        f"<script>{_JS}</script></body></html>\n"
    )


def dumps(obj: Any) -> str:  # for debugging: the data dict as JSON
    return json.dumps(obj, default=str, indent=1)
