"""The `hfl` command as a user meets it: help everywhere, keys, configs, the demo."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleet.cli import app
from hfl.identity import Roster

runner = CliRunner()

COMMANDS = ["demo", "simulate", "keys", "agent", "aggregator", "coordinator", "version"]


def test_help_lists_every_command() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in res.output


@pytest.mark.parametrize("args", [
    ["demo"], ["simulate"], ["keys", "init"], ["keys", "enroll"], ["keys", "show"],
    ["keys", "revoke"], ["agent", "run"], ["aggregator", "run"], ["coordinator", "run"],
    ["coordinator", "models"],
])
def test_every_command_explains_itself(args: list[str]) -> None:
    res = runner.invoke(app, [*args, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output and len(res.output) > 200


def test_keys_init_enroll_show_revoke(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    roster = keys / "roster.json"
    assert runner.invoke(app, ["keys", "init", "agent-1", "-r", "agent", "-d", str(keys)]
                         ).exit_code == 0
    assert stat.S_IMODE(os.stat(keys / "agent-1.key").st_mode) == 0o600
    again = runner.invoke(app, ["keys", "init", "agent-1", "-r", "agent", "-d", str(keys)])
    assert again.exit_code != 0 and "exists" in again.output
    res = runner.invoke(app, ["keys", "enroll", str(roster), "agent-1", "-r", "agent",
                              "--pub", str(keys / "agent-1.pub"), "--aggregator", "site-a"])
    assert res.exit_code == 0, res.output
    assert Roster.load(roster).group("site-a") == ["agent-1"]
    assert "agent-1" in runner.invoke(app, ["keys", "show", str(roster)]).output
    assert runner.invoke(app, ["keys", "revoke", str(roster), "agent-1"]).exit_code == 0
    assert len(Roster.load(roster)) == 0


def test_agent_without_its_section_gets_a_clear_error(tmp_path: Path) -> None:
    runner.invoke(app, ["keys", "init", "a1", "-r", "agent", "-d", str(tmp_path)])
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[identity]\nid = "a1"\nkey = "a1.key"\nroster = "roster.json"\n')
    res = runner.invoke(app, ["agent", "run", "-c", str(cfg)])
    assert res.exit_code != 0
    assert "[agent] section is required" in res.output


def test_bad_config_value_names_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[identity]\nid = "a1"\nkey = "k"\nroster = "r"\n[broker]\nport = "x"\n')
    res = runner.invoke(app, ["agent", "run", "-c", str(cfg)])
    assert res.exit_code != 0
    assert "broker.port" in res.output


def test_demo_writes_the_report(mosquitto: str, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "out"), "--rounds", "3",
                              "--report", str(report)])
    assert res.exit_code == 0, res.output
    doc = json.loads(report.read_text())
    assert [r["round"] for r in doc["rounds"]] == [1, 2, 3]
    assert {"accuracy", "loss", "agents"} <= set(doc["rounds"][0])
    assert all(r["agents"] == 6 for r in doc["rounds"])
    assert Path(doc["onnx"]).is_file() and Path(doc["safetensors"]).is_file()
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 1000


def test_simulate_runs_a_config(mosquitto: str, tmp_path: Path) -> None:
    cfg = tmp_path / "sim.toml"
    cfg.write_text('seed = 2\n[fleet]\naggregators = 2\nagents = 4\n'
                   '[data]\nsource = "digits"\npartition = "iid"\n'
                   '[model]\narch = "mlp"\ninput_shape = [1, 8, 8]\nnum_classes = 10\n'
                   'rounds = 2\nepochs = 2\nlr = 0.1\nmomentum = 0.9\nclient_fraction = 0.5\n'
                   'min_agents = 1\n')
    report = tmp_path / "r.json"
    res = runner.invoke(app, ["simulate", str(cfg), "--out", str(tmp_path / "o"),
                              "--report", str(report)])
    assert res.exit_code == 0, res.output
    doc = json.loads(report.read_text())
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert all(r["agents"] == 2 for r in doc["rounds"])  # C = 0.5 of 2 agents on each site
    assert doc["rounds"][-1]["accuracy"] > 0.6  # 10 classes: chance is 0.1


def test_simulate_config_error_names_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "sim.toml"
    cfg.write_text('[model]\narch = "resnet"\ninput_shape = [1, 8, 8]\nnum_classes = 10\n')
    res = runner.invoke(app, ["simulate", str(cfg)])
    assert res.exit_code == 1
    assert "arch" in res.output
