"""Self-contained HTML evaluation report (inline CSS and SVG, no scripts, no external URLs).

Every string that comes from data (title, meta, class, stage and series names) goes
through :func:`html.escape` with ``quote=True`` before it reaches the page.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence

from retdmctl.metrics import HIGHER_IS_BETTER

_PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")

# Chart geometry (SVG user units).
_W, _H = 640, 280
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 150, 16, 40

_CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f6f9; color: #1f2933;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
.container { max-width: 980px; margin: 0 auto; padding: 32px 20px 48px; }
header h1 { margin: 0 0 12px; font-size: 26px; font-weight: 650; letter-spacing: -0.01em; }
section { background: #fff; border: 1px solid #e3e8ef; border-radius: 10px;
  padding: 18px 22px; margin: 18px 0; box-shadow: 0 1px 2px rgba(16, 24, 40, 0.04); }
h2 { margin: 0 0 12px; font-size: 18px; font-weight: 600; }
h3 { margin: 14px 0 6px; font-size: 15px; font-weight: 600; color: #374151; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 6px 10px; text-align: left; border-bottom: 1px solid #eef1f5; }
th { font-size: 12px; text-transform: uppercase; letter-spacing: 0.04em; color: #6b7280;
  font-weight: 600; }
tbody tr:hover { background: #f8fafc; }
td.num { text-align: right; font-variant-numeric: tabular-nums;
  font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
th.num { text-align: right; }
table.meta { width: auto; }
table.meta th { text-transform: none; letter-spacing: 0; font-size: 14px; color: #4b5563;
  padding-left: 0; }
.dir { font-size: 13px; color: #6b7280; }
.up { color: #059669; } .down { color: #b45309; }
.bar { position: relative; height: 12px; min-width: 160px; background: #eef2f7;
  border-radius: 6px; overflow: hidden; }
.bar span { position: absolute; left: 0; top: 0; bottom: 0; background: #3b82f6;
  border-radius: 6px; }
.na { color: #9ca3af; }
.muted { color: #6b7280; }
svg.chart { width: 100%; height: auto; max-width: 640px; display: block; }
svg.chart text { font: 11px system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif;
  fill: #4b5563; }
footer { color: #9ca3af; font-size: 12px; text-align: center; }
"""


def _esc(value: object) -> str:
    """HTML-escape ``str(value)``, quotes included."""
    return html.escape(str(value), quote=True)


def _is_number(value: object) -> bool:
    """True for a finite int/float (bools excluded)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _fmt(value: float | None, digits: int = 4) -> str:
    """Format a number with ``digits`` decimals; NaN/None becomes ``n/a``."""
    if value is None or not math.isfinite(float(value)):
        return '<span class="na">n/a</span>'
    return f"{float(value):.{digits}f}"


def _tick_label(value: float) -> str:
    """Short tick label: up to 4 significant digits, no trailing zeros."""
    return f"{value:.4g}"


def _nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
    """About ``count`` round tick values covering ``[lo, hi]`` (whole steps if ``integer``)."""
    if hi <= lo:
        pad = 1.0 if integer else abs(lo) * 0.1 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(count - 1, 1)
    if integer:
        raw = max(raw, 1.0)
    mag = 10 ** math.floor(math.log10(raw))
    factors = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = next(f * mag for f in factors if f * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = [start]
    while ticks[-1] < hi - 1e-9 * step:
        ticks.append(round(start + len(ticks) * step, 12))
    return ticks


def _header(title: str, meta: Mapping[str, str]) -> str:
    rows = "".join(
        f"<tr><th scope=\"row\">{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in meta.items()
    )
    table = f'<table class="meta">{rows}</table>' if rows else ""
    return f"<header><h1>{_esc(title)}</h1>{table}</header>"


def _metrics_section(metrics: Mapping[str, float]) -> str:
    rows = []
    for name, value in metrics.items():
        better = HIGHER_IS_BETTER.get(name)
        if better is None:
            direction = '<span class="dir">&ndash;</span>'
        elif better:
            direction = '<span class="dir"><span class="up">&#8593;</span> higher is better</span>'
        else:
            direction = '<span class="dir"><span class="down">&#8595;</span> lower is better</span>'
        rows.append(
            f'<tr><td>{_esc(name)}</td><td class="num">{_fmt(value)}</td><td>{direction}</td></tr>'
        )
    body = "".join(rows) or '<tr><td colspan="3" class="muted">No metrics.</td></tr>'
    return (
        "<section><h2>Metrics</h2><table><thead><tr><th>Metric</th>"
        '<th class="num">Value</th><th>Direction</th></tr></thead>'
        f"<tbody>{body}</tbody></table></section>"
    )


def _per_class_section(
    class_names: Sequence[str], per_class_ap: Sequence[float], class_support: Sequence[int]
) -> str:
    def ap_key(i: int) -> tuple[int, float]:
        ap = per_class_ap[i]
        return (1, 0.0) if ap is None or not math.isfinite(ap) else (0, -float(ap))

    rows = []
    for i in sorted(range(len(class_names)), key=ap_key):
        ap = per_class_ap[i]
        if ap is None or not math.isfinite(ap):
            bar = '<div class="bar" title="n/a"></div>'
        else:
            width = min(max(float(ap), 0.0), 1.0) * 100
            bar = f'<div class="bar"><span style="width:{width:.1f}%"></span></div>'
        rows.append(
            f"<tr><td>{_esc(class_names[i])}</td><td class=\"num\">{int(class_support[i])}</td>"
            f'<td class="num">{_fmt(ap)}</td><td>{bar}</td></tr>'
        )
    body = "".join(rows) or '<tr><td colspan="4" class="muted">No classes.</td></tr>'
    return (
        "<section><h2>Per-class average precision</h2><table><thead><tr><th>Class</th>"
        '<th class="num">Support</th><th class="num">AP</th><th>AP</th></tr></thead>'
        f"<tbody>{body}</tbody></table></section>"
    )


def _series(epochs: Sequence[dict]) -> dict[str, list[tuple[float, float | None]]]:
    """Map series name -> [(x, y or None)] in epoch order; x is ``epoch`` or the 1-based index."""
    names: list[str] = []
    for row in epochs:
        for key, value in row.items():
            if key != "epoch" and key not in names and _is_number(value):
                names.append(key)
    out: dict[str, list[tuple[float, float | None]]] = {name: [] for name in names}
    for i, row in enumerate(epochs):
        x = row.get("epoch")
        x = float(x) if _is_number(x) else float(i + 1)
        for name in names:
            y = row.get(name)
            out[name].append((x, float(y) if _is_number(y) else None))
    return out


def _segments(points: Iterable[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    """Split a series at missing values into runs of consecutive points."""
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if y is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append((x, y))
    return [run for run in runs if run]


def _chart(stage: str, epochs: Sequence[dict]) -> str:
    """One SVG line chart for a stage: axes, ticks, grid, one polyline per series, legend."""
    series = _series(epochs)
    label = f"Training curves for stage {stage}"
    open_tag = (
        f'<svg class="chart" viewBox="0 0 {_W} {_H}" role="img" aria-label="{_esc(label)}">'
        f"<title>{_esc(label)}</title>"
    )
    points = [(x, y) for pts in series.values() for x, y in pts if y is not None]
    if not points:
        return (
            f'{open_tag}<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle">'
            "No numeric values recorded.</text></svg>"
        )

    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    x_ticks = _nice_ticks(min(xs), max(xs), 7, integer=all(x.is_integer() for x in xs))
    y_ticks = _nice_ticks(min(ys), max(ys), 5)
    x0, x1 = x_ticks[0], x_ticks[-1]
    y0, y1 = y_ticks[0], y_ticks[-1]
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def px(x: float) -> float:
        return _LEFT + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return _TOP + ph - (y - y0) / (y1 - y0) * ph

    parts = [open_tag]
    for t in y_ticks:
        y = py(t)
        parts.append(
            f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_LEFT + pw}" y2="{y:.1f}" stroke="#eef1f5"/>'
            f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick_label(t)}</text>'
        )
    for t in x_ticks:
        x = px(t)
        parts.append(
            f'<line x1="{x:.1f}" y1="{_TOP + ph}" x2="{x:.1f}" y2="{_TOP + ph + 4}" stroke="#9ca3af"/>'
            f'<text x="{x:.1f}" y="{_TOP + ph + 17}" text-anchor="middle">{_tick_label(t)}</text>'
        )
    parts.append(
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_TOP + ph}" stroke="#9ca3af"/>'
        f'<line x1="{_LEFT}" y1="{_TOP + ph}" x2="{_LEFT + pw}" y2="{_TOP + ph}" stroke="#9ca3af"/>'
        f'<text x="{_LEFT + pw / 2}" y="{_H - 6}" text-anchor="middle">epoch</text>'
    )
    for k, (name, pts) in enumerate(series.items()):
        color = _PALETTE[k % len(_PALETTE)]
        for run in _segments(pts):
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in run)
            parts.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                f'stroke-linejoin="round" points="{coords}"/>'
            )
            for x, y in run:
                parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>')
        ly = _TOP + 8 + k * 18
        lx = _LEFT + pw + 16
        parts.append(
            f'<line x1="{lx}" y1="{ly}" x2="{lx + 18}" y2="{ly}" stroke="{color}" stroke-width="3"/>'
            f'<text x="{lx + 24}" y="{ly + 4}">{_esc(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _history_section(history: Mapping[str, list[dict]]) -> str:
    if not history:
        body = '<p class="muted">No training history recorded.</p>'
    else:
        body = "".join(
            f"<h3>{_esc(stage)}</h3>{_chart(stage, epochs or [])}" for stage, epochs in history.items()
        )
    return f"<section><h2>Training curves</h2>{body}</section>"


def render_report(
    *,
    title: str,
    metrics: dict[str, float],
    class_names: list[str],
    per_class_ap: list[float],
    class_support: list[int],
    history: dict[str, list[dict]],
    meta: dict[str, str],
) -> str:
    """Render the evaluation report as one self-contained HTML page.

    ``metrics`` values are shown with 4 decimals; ``per_class_ap`` may hold NaN (shown
    as "n/a", sorted last). ``history`` maps a stage name to per-epoch dicts; every
    numeric key other than ``"epoch"`` becomes a series and missing/None values leave a
    gap. Raises ``ValueError`` when the three per-class lists differ in length.
    """
    if not len(class_names) == len(per_class_ap) == len(class_support):
        raise ValueError(
            f"class_names, per_class_ap and class_support differ in length: "
            f"{len(class_names)}, {len(per_class_ap)}, {len(class_support)}"
        )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>"
        '<body><div class="container">'
        f"{_header(title, meta)}"
        f"{_metrics_section(metrics)}"
        f"{_per_class_section(class_names, per_class_ap, class_support)}"
        f"{_history_section(history)}"
        "<footer>Generated by retdmctl</footer>"
        "</div></body></html>\n"
    )
