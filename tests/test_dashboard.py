"""`hfl dashboard`: its charts and JSON from a real registry, its HTTP answers, and the page
in a real headless browser (Debian's Chromium driven by playwright-core, which `make test`
installs into tests/browser/node_modules) while a job runs on a real in-process fleet:
the page loads, the job's curve grows version by version without a reload, and a
screenshot is saved in the test's tmp dir."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from coordinator.registry import Registry
from fleet.ops.charts import line_chart, ticks
from fleet.ops.dashboard import Dashboard, finite, job_rows, model_charts, serve_dashboard
from fleet.ops.view import FleetView
from fleet.sim.inproc import FleetLayout, InProcessFleet
from fleet.sim.simulate import demo_config, fleet_data
from hfl.crypto.identity import Roster
from hfl.wire.messages import ModelRequest, ModelSpec
from tests.test_status import observer_config

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "browser" / "dashboard.mjs"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def test_ticks_are_round_and_cover_the_range() -> None:
    assert ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert ticks(1, 7, 6) == [1, 2, 3, 4, 5, 6, 7]
    assert ticks(0, 23.5) == [0, 5, 10, 15, 20, 25]
    assert ticks(3, 3) == [3, 3.2, 3.4, 3.6, 3.8, 4.0]  # an empty range still gets an axis


def test_a_chart_draws_each_series_and_escapes_every_text() -> None:
    svg = line_chart({"r1-m": [(1, 0.5), (2, 0.7), (3, 1.5)], "<b>&": [(1, 0.1)]},
                     title="m <accuracy>", y_label="acc", y_range=(0, 1), chart_id="acc-m")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count('class="series"') == 2
    assert 'data-name="r1-m" data-points="3"' in svg and 'data-points="1"' in svg
    assert "<b>" not in svg and "&lt;b&gt;&amp;" in svg and "m &lt;accuracy&gt;" in svg
    assert svg.count("<polyline") == 1  # one point draws no line
    # 1.5 is past the range: drawn at the top of the plot, not outside it.
    ys = [float(p.split('cy="')[1].split('"')[0]) for p in svg.split("<circle")[1:]]
    assert min(ys) >= 30 - 1e-9
    assert "no versions yet" in line_chart({}, title="t", y_label="y")


def ev(accuracy: float, loss: float, **more) -> dict:
    """A version's metrics as the registry keeps them (Metrics.model_dump() and more)."""
    return {"eval_samples": 10.0, "eval_loss": loss, "eval_metrics": {"accuracy": accuracy},
            **more}


def fill(registry: Registry) -> None:
    w = {"w": np.zeros(2, np.float32)}
    for v, acc, eps in ((1, 0.4, 1.5), (2, 0.6, 2.5)):
        registry.save_version("r1-m", "m", v, w, b"onnx", ev(acc, 1.0 - acc, epsilon=eps))
    registry.save_version("r2-m", "m", 1, w, b"onnx", ev(0.3, 0.9, epsilon=None))
    registry.save_version("r1-k", "k", 1, w, b"onnx", {"eval_samples": 9.0, "eval_loss": 2.0,
                                                       "eval_metrics": {"rmse": float("nan")}})
    registry.save_job("r1-m", "app", "m", "done", "2 rounds", 2)
    registry.save_job("r2-m", "app", "m", "running", "", 1)


def test_charts_and_rows_from_the_registry(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    fill(reg)
    charts = {c["model"]: c for c in model_charts(reg.versions())}
    assert charts["m"]["versions"] == {"r1-m": 2, "r2-m": 1}
    accuracy, loss = charts["m"]["charts"]
    assert 'data-name="r1-m" data-points="2"' in accuracy and "m: accuracy" in accuracy
    assert 'data-name="r2-m" data-points="1"' in loss and "m: loss" in loss
    assert "k: rmse" in charts["k"]["charts"][0]
    assert 'data-name="r1-m" data-points="2"' in charts["m"]["epsilon_svg"]
    assert "r2-m" not in charts["m"]["epsilon_svg"]  # no DP: no ε line
    assert charts["k"]["epsilon_svg"] is None
    rows = {r["job"]: r for r in job_rows(reg.jobs(), reg.versions())}
    assert (rows["r1-m"]["evaluation"], rows["r1-m"]["epsilon"]) == ("loss 0.4, accuracy 0.6",
                                                                     2.5)
    assert rows["r1-m"]["onnx"].endswith("r1-m-v2.onnx")
    assert finite({"a": [float("nan"), 1.0, float("inf")]}) == {"a": [None, 1.0, None]}
    reg.close()


def test_each_job_row_names_the_sites_its_newest_version_was_made_without(
        tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    fill(reg)
    fleet = {"jobs": [{"job": "r1-m", "missing": {"site-b": "secure group too small"}},
                      {"job": "gone", "missing": {"site-a": "x"}}]}
    rows = {r["job"]: r for r in Dashboard(reg, lambda: fleet).state()["jobs"]}
    assert rows["r1-m"]["missing"] == {"site-b": "secure group too small"}
    assert rows["r2-m"]["missing"] == {} and "gone" not in rows  # the registry's jobs only
    page = (ROOT / "fleet" / "ops" / "web" / "dashboard.js").read_text()
    assert "j.missing" in page and "n.problems" in page and "n.stale" in page
    reg.close()


def test_the_server_answers_get_only_with_a_strict_policy(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    fill(reg)
    server = serve_dashboard(Dashboard(reg, lambda: FleetView(Roster()).snapshot(0.0), 1.5),
                             port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        page = urllib.request.urlopen(base + "/", timeout=10)
        assert "<title>hfl dashboard</title>" in page.read().decode()
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        state = json.loads(urllib.request.urlopen(base + "/api/state", timeout=10).read())
        assert state["refresh_s"] == 1.5 and [m["model"] for m in state["models"]] == ["k", "m"]
        assert {j["job"] for j in state["jobs"]} == {"r1-m", "r2-m"}
        assert state["fleet"]["aggregators"] == []
        js = urllib.request.urlopen(base + "/dashboard.js", timeout=10)
        assert js.headers["Content-Type"].startswith("text/javascript")
        for method, path, code in (("POST", "/api/state", 501), ("GET", "/../pyproject.toml",
                                                                    404), ("GET", "/x", 404)):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(urllib.request.Request(base + path, method=method,
                                                              data=b"" if method == "POST"
                                                              else None), timeout=10)
            assert e.value.code == code, (method, path)
    finally:
        server.shutdown()
        server.server_close()
        reg.close()


def _need_browser() -> None:
    if shutil.which("node") is None or not (DRIVER.parent / "node_modules").is_dir():
        pytest.fail("Node.js and tests/browser/node_modules are needed: `make test` installs "
                    "them (npm ci --prefix tests/browser)", pytrace=False)
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: `make test` installs Debian's chromium",
                    pytrace=False)


def test_the_page_follows_a_running_job_in_a_real_browser(tmp_path: Path) -> None:
    _need_browser()
    cfg = demo_config(seed=3, private=False)
    groups, _ = fleet_data(cfg)
    fleet = InProcessFleet(FleetLayout(groups, observers=("ops",)), tmp_path, telemetry_s=0.3)
    fleet.start()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]), "PYTHONUNBUFFERED": "1"}
    dash = subprocess.Popen(
        [sys.executable, "-c", "from fleet.cli import main; main()", "dashboard", "-c",
         str(observer_config(fleet, tmp_path / "ops.toml")), "--state-dir",
         str(tmp_path / "coordinator"), "--port", "0", "--refresh", "0.3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    shot = tmp_path / "dashboard.png"
    browser = None
    app = fleet.app("app", models=["digits"])
    try:
        banner = dash.stdout.readline()
        assert "hfl dashboard on http://127.0.0.1:" in banner, dash.stderr.read()
        url = banner.split(" on ")[1].split()[0]
        browser = subprocess.Popen(["node", str(DRIVER), url, "digits", str(shot), "150"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   cwd=DRIVER.parent, env={**os.environ, "CHROMIUM": CHROMIUM})
        ready = json.loads(browser.stdout.readline() or "{}").get("ready")
        assert ready is not None, browser.stderr.read()
        assert ready["points"] == 0 and ready["jobs"] == [["no jobs yet"]]
        # The page is up with no job: now one starts, with DP so its ε curve is drawn too.
        app.start()
        spec = ModelSpec(**{**cfg.spec(["site-1", "site-2"]).model_dump(), "name": "digits",
                            "rounds": 4, "kappa1": 1, "epochs": 3,
                            "privacy": {"epsilon": 100.0}})
        jobs = app.request(ModelRequest(request_id="web", models=[spec]))
        out, err = browser.communicate(timeout=180)
    finally:
        app.stop()
        for p in (browser, dash):
            if p is not None and p.poll() is None:
                p.kill()
        fleet.stop()
    assert browser.returncode == 0, err
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["errors"] == [] and seen["sameDocument"]
    # The curve grew while the page stayed open: 0 points, then 1, ..., up to the last version.
    counts = seen["counts"]
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] == 4
    assert len([c for c in counts if c > 0]) >= 2, counts  # a second version appeared live
    last = seen["last"]
    (row,) = last["jobs"]
    assert row[0] == jobs[0] and row[3] == "done" and row[4] == "4"
    assert last["epsilonCharts"] == 1 and float(row[6]) > 0
    fleet_rows = {r[0]: r for r in last["fleet"]}
    assert fleet_rows["site-1"][1] == "online" and fleet_rows["site-1"][2] == "3/3"
    assert fleet_rows["coordinator"][1] == "online"
    # Each site ran one edge round per version and summed its three agents' updates.
    assert [fleet_rows[s][7:9] for s in ("site-1", "site-2")] == [["4", "12"]] * 2
    assert "agents 6/6 online" in last["summary"]
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
