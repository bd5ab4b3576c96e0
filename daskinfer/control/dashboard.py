"""The pipelines page of the Dask dashboard: ``/daskinfer`` on the scheduler's HTTP server.

Per pipeline: a table of its partitions (owner worker, state, requests/s, lag, batch size,
p50/p99 latency, errors/s) and charts of throughput, lag, batch size, latency and errors over
time, drawn from the controller's time series (:mod:`daskinfer.control.series`) as inline
SVG (:mod:`daskinfer.control.charts`).  The page redraws itself every
``daskinfer.dashboard.refresh``; ``/daskinfer/figures.json`` gives the same figures as JSON.

The routes are a tornado application added to the scheduler's HTTP application with
``add_application``, the way distributed adds its own Jupyter server there.
"""

from __future__ import annotations

import html
import json
import time
from typing import TYPE_CHECKING, Any

from tornado import web

from daskinfer import settings
from daskinfer.control.charts import PALETTE, Line, line_chart

if TYPE_CHECKING:
    from distributed import Scheduler

    from daskinfer.control.controller import ControllerExtension

PAGE = "/daskinfer"
FIGURES = "/daskinfer/figures.json"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 16px; color: #222; }
header { display: flex; gap: 16px; align-items: baseline; border-bottom: 1px solid #ddd; margin-bottom: 8px; }
header h1 { font-size: 20px; margin: 0 0 6px 0; }
section.pipeline { margin: 12px 0 24px 0; }
section.pipeline h2 { font-size: 17px; margin: 4px 0; }
.facts { color: #555; font-size: 13px; margin-bottom: 6px; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 10px 0; }
th, td { padding: 3px 10px; text-align: right; border-bottom: 1px solid #eee; }
th:first-child, td:first-child, td.worker, th.worker { text-align: left; }
.charts { display: flex; flex-wrap: wrap; gap: 10px; }
svg.chart { background: #fff; border: 1px solid #e4e4e4; }
svg .title { font-size: 12px; font-weight: 600; fill: #333; }
svg .plot { fill: #fafafa; stroke: #ccc; }
svg .grid { stroke: #e6e6e6; }
svg .ylabel { font-size: 10px; fill: #666; text-anchor: end; }
svg .xlabel { font-size: 10px; fill: #666; text-anchor: middle; }
svg .legend { font-size: 10px; fill: #444; }
.failed { color: #b00; }
"""

_SCRIPT = """
setInterval(async () => {
  try {
    const r = await fetch(window.location.pathname + "?part=content", {cache: "no-store"});
    if (r.ok) document.getElementById("content").innerHTML = await r.text();
  } catch (e) {}
}, %d);
"""


def _num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.{digits}g}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g} ms"


def _series(points: list[dict[str, Any]], key: str, scale: float = 1.0) -> tuple[list[float], list[float | None]]:
    return [p["t"] for p in points], [None if p[key] is None else p[key] * scale for p in points]


def _charts(h: dict[str, Any], now: float, span: float) -> str:
    points = list(h["points"])
    parts = sorted((int(p), list(pts)) for p, pts in h["partition_points"].items())

    def lines(key: str, scale: float = 1.0, total: str | None = "all") -> list[Line]:
        out = [
            Line(f"p{p}", *_series(pts, key, scale), color=PALETTE[i % len(PALETTE)])
            for i, (p, pts) in enumerate(parts)
        ]
        if total is not None:  # drawn last, on top of the partitions' lines
            out.append(Line(total, *_series(points, key, scale), color="#222", width=2.0))
        return out

    latency = [
        Line("p50", *_series(points, "p50", 1e3), color=PALETTE[0], width=2.0),
        Line("p99", *_series(points, "p99", 1e3), color=PALETTE[3], width=2.0),
    ]
    charts = [
        line_chart("Throughput (requests/s)", lines("requests_s"), now=now, span=span),
        line_chart("Lag (requests waiting)", lines("lag"), now=now, span=span),
        line_chart("Batch size (mean rows)", lines("batch_rows"), now=now, span=span),
        line_chart("Latency, read to written (ms)", latency, unit="ms", now=now, span=span),
        line_chart("Errors (requests/s)", lines("errors_s"), now=now, span=span),
    ]
    return '<div class="charts">' + "".join(charts) + "</div>"


def _table(h: dict[str, Any]) -> str:
    rows = [
        '<table><tr><th>partition</th><th class="worker">worker</th><th>state</th><th>requests/s</th>'
        "<th>rows/s</th><th>lag</th><th>batch</th><th>p50</th><th>p99</th><th>errors/s</th></tr>"
    ]
    for p, owner in sorted((int(p), o) for p, o in h["owners"].items()):
        pts = h["partition_points"].get(p) or h["partition_points"].get(str(p)) or []
        last = pts[-1] if pts else None
        state = html.escape(str(owner.get("state")))
        cls = ' class="failed"' if owner.get("state") == "failed" else ""

        def cell(key: str, fmt: Any = _num, last: Any = last) -> str:
            return f"<td>{fmt(last[key]) if last else '-'}</td>"

        rows.append(
            f'<tr><td>{p}</td><td class="worker">{html.escape(str(owner.get("worker")))}</td>'
            f"<td{cls}>{state}</td>{cell('requests_s')}{cell('rows_s')}{cell('lag')}{cell('batch_rows')}"
            f"{cell('p50', _ms)}{cell('p99', _ms)}{cell('errors_s')}</tr>"
        )
    for p, why in sorted(h.get("failures", {}).items()):
        rows.append(
            f'<tr><td>{p}</td><td class="worker failed" colspan="9">failed to start: {html.escape(str(why))}</td></tr>'
        )
    rows.append("</table>")
    return "".join(rows)


def render_content(history: dict[str, dict[str, Any]], now: float | None = None) -> str:
    """The page's content: one section per pipeline (``history`` as the controller's
    ``history_of`` gives it)."""
    now = time.time() if now is None else now
    if not history:
        return '<p class="facts">No daskinfer pipelines run on this scheduler.</p>'
    out = []
    for name, h in sorted(history.items()):
        points = list(h["points"])
        span = max(60.0, now - points[0]["t"]) if points else 60.0
        totals = h["totals"]
        last = points[-1] if points else None
        facts = (
            f"inbox {html.escape(str(h['inbox']))} &middot; model {html.escape(str(h['model']))} &middot; "
            f"{len(h['owners'])}/{h['partitions']} partitions placed &middot; "
            f"{totals['answered']:,.0f} requests answered, {totals['errors']:,.0f} errors"
        )
        if last is not None:
            facts += f" &middot; now {_num(last['requests_s'])} requests/s, lag {last['lag']}, p99 {_ms(last['p99'])}"
        out.append(
            f'<section class="pipeline" data-pipeline="{html.escape(name)}"><h2>{html.escape(name)}</h2>'
            f'<div class="facts">{facts}</div>{_table(h)}{_charts(h, now, span)}</section>'
        )
    return "".join(out)


def render_page(history: dict[str, dict[str, Any]], scheduler_address: str, refresh: float) -> str:
    """The whole page: header, content, and the script that redraws the content."""
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>daskinfer pipelines</title>'
        f"<style>{_STYLE}</style></head><body><header><h1>daskinfer pipelines</h1>"
        f'<span class="facts">scheduler {html.escape(scheduler_address)}</span>'
        '<a class="facts" href="status">Dask dashboard</a></header>'
        f'<div id="content">{render_content(history)}</div>'
        f"<script>{_SCRIPT % int(max(refresh, 0.2) * 1000)}</script></body></html>"
    )


class _Handler(web.RequestHandler):
    def initialize(self, controller: ControllerExtension, refresh: float) -> None:
        self.controller = controller
        self.refresh = refresh

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")


class PageHandler(_Handler):
    def get(self) -> None:
        history = self.controller.history_of()
        self.set_header("Content-Type", "text/html; charset=utf-8")
        if self.get_argument("part", "") == "content":
            self.write(render_content(history))
        else:
            self.write(render_page(history, self.controller.scheduler.address or "", self.refresh))


class FiguresHandler(_Handler):
    def get(self) -> None:
        history = self.controller.history_of()
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(history, default=list))


def add_page(scheduler: Scheduler, controller: ControllerExtension) -> bool:
    """Serve the pipelines page on ``scheduler``'s HTTP server; False when it has none."""
    app = getattr(scheduler, "http_application", None)
    if app is None:
        return False
    kwargs = {"controller": controller, "refresh": settings.get_seconds("dashboard.refresh")}
    app.add_application(web.Application([(PAGE, PageHandler, kwargs), (FIGURES, FiguresHandler, kwargs)]))
    return True
