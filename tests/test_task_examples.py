"""The two reference tasks of examples/tasks, run as their docs say: the FedAvg blog's
linear regression through `hfl simulate`, and activity recognition from live sensor
readings across two sites."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from hfl.models.tasks import installed

ROOT = Path(__file__).resolve().parents[1]
HFL = Path(sys.executable).with_name("hfl")


def _need(task: str, package: str) -> None:
    if task not in installed():
        pytest.fail(f"the example task {task!r} is not installed: `make test` installs it "
                    f"(pip install -e examples/tasks/{package})", pytrace=False)


@pytest.mark.broker
def test_the_blog_regression_through_the_whole_stack(tmp_path: Path) -> None:
    _need("linear-regression", "linear-regression")
    report = tmp_path / "linreg.json"
    config = ROOT / "examples/tasks/linear-regression.toml"
    run = subprocess.run([str(HFL), "simulate", str(config), "--out", str(tmp_path / "out"),
                          "--report", str(report)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    doc = json.loads(report.read_text())
    assert doc["task"] == "linear-regression" and len(doc["rounds"]) == 10
    assert doc["security"] == {"tls": True, "secagg": False}
    assert all(r["agents"] == 2 for r in doc["rounds"])
    # The app's held-out RMSE: the noise is N(0, 1), so a good line scores about 1.
    assert doc["rounds"][-1]["rmse"] < 1.3
    onnx = Path(doc["onnx"])
    assert onnx.name.endswith("-v10.onnx") and onnx.is_file()
    session = ort.InferenceSession(onnx.read_bytes(), providers=["CPUExecutionProvider"])
    (pred,) = session.run(["output"], {"input": np.array([[0.0], [10.0]], np.float32)})
    # The truth is 1 and 31; the least-squares line through the 100 points gives 1.22, 31.16.
    assert abs(pred[0, 0] - 1) < 1.0 and abs(pred[1, 0] - 31) < 1.0, pred


@pytest.mark.broker
def test_activity_recognition_from_live_sensor_readings(tmp_path: Path) -> None:
    _need("activity", "activity")
    run = subprocess.run([sys.executable, str(ROOT / "examples/tasks/activity/demo.py"),
                          "--out", str(tmp_path / "demo"), "--rounds", "3"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = re.findall(r"^\s+(\d+)\s+(\d+)\s+([0-9.]+)\s+([0-9.]+) on windows", run.stdout, re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    assert all(int(r[1]) == 6 for r in rows)  # every board trained on its own window
    assert float(rows[-1][3]) > 0.5  # three activities: chance is a third
    assert (tmp_path / "demo" / "activity-v3.onnx").is_file()
    # Each board's window is its own file, bounded, and kept on disk for a restart.
    windows = sorted((tmp_path / "demo" / "boards").glob("agent-*/accel.sqlite"))
    assert len(windows) == 6
