"""`hfl dashboard`: a read-only web page over the coordinator's registry and the fleet's
status and telemetry topics.

The page (fleet/ops/web/) polls `/api/state` and redraws: jobs (with the sites their newest version
was made without), loss, metric and ε curves per model (inline SVG from fleet.ops.charts) and the
health of each aggregator's site (fleet.ops.view: stale telemetry, failing blocks or saves, error
counters, restarts). The server is the
standard library's, bound to localhost unless told otherwise; it answers GET and HEAD only,
and its pages load nothing from elsewhere (Content-Security-Policy).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from coordinator.registry import Registry, VersionRecord
from fleet.ops.charts import line_chart
from hfl.wire.messages import evaluation_text

log = logging.getLogger("hfl.dashboard")

WEB = Path(__file__).resolve().parent / "web"
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
          "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8")}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def model_charts(versions: list[VersionRecord]) -> list[dict[str, Any]]:
    """Per model: its jobs' curves of the agents' held-out loss and of each of the task's
    metrics and, for DP jobs, their ε curve."""
    by_model: dict[str, dict[str, list[VersionRecord]]] = {}
    for v in versions:
        by_model.setdefault(v.model, {}).setdefault(v.job, []).append(v)
    out = []
    for model, jobs in sorted(by_model.items()):
        names = list(dict.fromkeys(k for vs in jobs.values() for v in vs
                                   for k in v.metrics.get("eval_metrics") or {}))
        charts = []
        for name in names:
            pts = {j: [(v.version, float(v.metrics["eval_metrics"][name])) for v in vs
                       if name in (v.metrics.get("eval_metrics") or {})]
                   for j, vs in jobs.items()}
            ys = [y for p in pts.values() for _, y in p]
            unit = all(0.0 <= y <= 1.0 for y in ys if math.isfinite(y))  # a rate: 0 to 1
            charts.append(line_chart(pts, title=f"{model}: {name}", chart_id=f"m-{model}-{name}",
                                     y_label=f"agents' held-out {name}",
                                     y_range=(0, 1) if unit else None))
        loss = {j: [(v.version, float(v.metrics.get("eval_loss", 0.0))) for v in vs
                    if v.metrics.get("eval_samples")] for j, vs in jobs.items()}
        charts.append(line_chart(loss, title=f"{model}: loss", chart_id=f"loss-{model}",
                                 y_label="agents' held-out loss"))
        eps = {j: [(v.version, float(v.metrics["epsilon"])) for v in vs
                   if v.metrics.get("epsilon") is not None] for j, vs in jobs.items()}
        eps = {j: pts for j, pts in eps.items() if pts}
        out.append({
            "model": model,
            "versions": {j: len(vs) for j, vs in jobs.items()},
            "charts": charts,
            "epsilon_svg": line_chart(eps, title=f"{model}: ε spent", chart_id=f"eps-{model}",
                                      y_label="ε") if eps else None,
        })
    return out


def job_rows(jobs: list[dict[str, Any]], versions: list[VersionRecord]) -> list[dict[str, Any]]:
    """The registry's jobs, newest first, with their newest version's evaluation and ε."""
    last: dict[str, VersionRecord] = {}
    for v in versions:
        if v.job not in last or v.version > last[v.job].version:
            last[v.job] = v
    rows = []
    for j in sorted(jobs, key=lambda j: j["updated"], reverse=True):
        m = last[j["job"]].metrics if j["job"] in last else {}
        rows.append({**j, "evaluation": evaluation_text(m), "epsilon": m.get("epsilon"),
                     "onnx": str(last[j["job"]].onnx) if j["job"] in last else None})
    return rows


def finite(obj: Any) -> Any:
    """`obj` with NaN and infinities as None: JSON has no such numbers (a diverging
    model's loss must not take the page down)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


@dataclass
class Dashboard:
    """What the page shows: the registry (read under a lock: one SQLite connection) and
    the fleet as a `fleet.ops.watch.Watch` snapshot sees it."""

    registry: Registry
    fleet: Callable[[], dict[str, Any]]
    refresh_s: float = 2.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def state(self) -> dict[str, Any]:
        with self._lock:
            jobs, versions = self.registry.jobs(), self.registry.versions()
        fleet = self.fleet()
        rows = job_rows(jobs, versions)
        # The sites each job's newest version was made without, from its retained status.
        missing = {j["job"]: j["missing"] for j in fleet.get("jobs", [])}
        for row in rows:
            row["missing"] = missing.get(row["job"], {})
        return {"updated": time.time(), "refresh_s": self.refresh_s, "jobs": rows,
                "models": model_charts(versions), "fleet": fleet}


def handler(dash: Dashboard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "hfl-dashboard"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._answer(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(body=False)

        def _answer(self, body: bool) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/api/state":
                try:
                    data = json.dumps(finite(dash.state()), allow_nan=False).encode()
                except Exception:  # a broken registry must not kill the page's server
                    log.exception("dashboard state")
                    self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"state unavailable\n",
                               "text/plain; charset=utf-8", body)
                    return
                self._send(HTTPStatus.OK, data, "application/json", body)
            elif path in STATIC:
                name, ctype = STATIC[path]
                self._send(HTTPStatus.OK, (WEB / name).read_bytes(), ctype, body)
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8",
                           body)

        def _send(self, status: HTTPStatus, data: bytes, ctype: str, body: bool) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in HEADERS.items():
                self.send_header(k, v)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


def serve_dashboard(dash: Dashboard, host: str = "127.0.0.1",
                    port: int = 8080) -> ThreadingHTTPServer:
    """Bind (OSError when the address is taken); the caller runs `serve_forever`."""
    server = ThreadingHTTPServer((host, port), handler(dash))
    server.daemon_threads = True
    return server
