"""bench/scale.py's smoke run (`--quick`: 100 agents under 2 aggregators, 2 rounds, SecAgg+
and DP, TLS): real processes over a real Mosquitto, and every check the benchmark makes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.broker
def test_scale_bench_quick_run_counts_every_agent(mosquitto: str, tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "scale.py"), "--quick",
                          "--out", str(out), "--workdir", str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["checks"] == {"finished": True, "every_version_counts_every_agent": True,
                                "quorum": True, "nothing_rejected": True}
    assert [v["agents"] for v in report["versions"]] == [100, 100]
    assert len(report["round_s"]) == 2 and report["connect_s"] > 0
    assert report["cpu_s"]["rounds"]["agg"]["n"] == 2
    assert report["per_agent_per_round"]["messages_sent"] == pytest.approx(4, abs=0.5)
