"""Small line charts as inline SVG, for the dashboard: one line per job, version on x.

Our own few lines instead of a charting library: the page stays one request and no
third-party code is served. Every text is escaped; each line is a `<g class="series">`
with `data-name` and `data-points`, so a test (or a script) can read what is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape, quoteattr

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")
WIDTH, HEIGHT = 460, 230
LEFT, RIGHT, TOP, BOTTOM = 52, 14, 30, 34

Series = Mapping[str, Sequence[tuple[float, float]]]  # name → (x, y) points, x ascending


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round values (1, 2 or 5 × 10^k apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9) * step
    out, v = [], first
    while v <= hi + step * 1e-9:
        out.append(round(v, 10))
        v += step
    if out[-1] < hi:
        out.append(round(out[-1] + step, 10))
    return out


def _label(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def line_chart(series: Series, *, title: str, y_label: str,
               y_range: tuple[float, float] | None = None, chart_id: str = "") -> str:
    """An SVG line chart of `series`: x is the model version (integers from 1)."""
    points = [p for pts in series.values() for p in pts]
    xs = ticks(1, max((x for x, _ in points), default=1), 6)
    xs = [x for x in xs if x == int(x)] or [1.0]
    x_lo, x_hi = min(1.0, xs[0]), max(xs[-1], 2.0)
    if y_range is None:
        top = max((y for _, y in points), default=1.0)
        ys = ticks(0.0, top if top > 0 else 1.0)
    else:
        ys = ticks(*y_range)
    y_lo, y_hi = ys[0], ys[-1]
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * pw

    def sy(y: float) -> float:
        return TOP + ph - (min(max(y, y_lo), y_hi) - y_lo) / (y_hi - y_lo) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
           f'width="{WIDTH}" height="{HEIGHT}" role="img" class="chart" '
           f'id={quoteattr(chart_id)} aria-label={quoteattr(title)}>',
           f'<text x="{LEFT}" y="18" class="title" font-size="13" font-weight="600" '
           f'fill="#222">{escape(title)}</text>']
    for y in ys:
        out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                   f'stroke="#e3e3e3"/>')
        out.append(f'<text x="{LEFT - 6}" y="{sy(y) + 4:.1f}" text-anchor="end" font-size="11" '
                   f'fill="#555">{escape(_label(y))}</text>')
    for x in xs:
        out.append(f'<text x="{sx(x):.1f}" y="{HEIGHT - BOTTOM + 15}" text-anchor="middle" '
                   f'font-size="11" fill="#555">{int(x)}</text>')
    out.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + ph}" y2="{TOP + ph}" '
               f'stroke="#888"/>')
    out.append(f'<text x="{LEFT + pw / 2:.1f}" y="{HEIGHT - 4}" text-anchor="middle" '
               f'font-size="11" fill="#555">version</text>')
    out.append(f'<text transform="translate(13 {TOP + ph / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle" font-size="11" fill="#555">{escape(y_label)}</text>')
    if not points:
        out.append(f'<text x="{LEFT + pw / 2:.1f}" y="{TOP + ph / 2:.1f}" text-anchor="middle" '
                   f'font-size="12" fill="#888">no versions yet</text>')
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        out.append(f'<g class="series" data-name={quoteattr(name)} data-points="{len(pts)}">')
        if len(pts) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" '
                       f'stroke-width="2"/>')
        for x, y in pts:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}">'
                       f'<title>{escape(name)} v{int(x)}: {escape(_label(y))}</title></circle>')
        lx = WIDTH - RIGHT - 4
        out.append(f'<text x="{lx}" y="{18 + 13 * i}" text-anchor="end" font-size="11" '
                   f'fill="{color}">{escape(name)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)
