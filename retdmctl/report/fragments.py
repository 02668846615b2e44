"""The small pieces of HTML the report page is built from: escaping and number
formatting, and round tick values for its SVG charts (:mod:`retdmctl.report.page`)."""

from __future__ import annotations

import html
import math


def esc(value: object) -> str:
    """HTML-escape ``str(value)``, quotes included."""
    return html.escape(str(value), quote=True)


def fmt(value: float | None, digits: int = 4) -> str:
    """Format a number with ``digits`` decimals; NaN/None becomes ``n/a``."""
    if value is None or not math.isfinite(float(value)):
        return '<span class="na">n/a</span>'
    return f"{float(value):.{digits}f}"


def tick_label(value: float) -> str:
    """Short tick label: up to 4 significant digits, no trailing zeros."""
    return f"{value:.4g}"


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> list[float]:
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
