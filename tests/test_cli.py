"""The `hfl` command as a user meets it: help everywhere, the PKI, configs, the demo."""

from __future__ import annotations

import json
import os
import platform
import stat
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

from aggregator.cli import app as aggregator_app
from coordinator.cli import app as coordinator_app
from edge_agent.cli import app as agent_app
from fleet.cli import app
from hfl.crypto.pki import Pki

runner = CliRunner()

COMMANDS = ["demo", "simulate", "pki", "agent", "aggregator", "coordinator", "version"]


def test_help_lists_every_command() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in res.output


@pytest.mark.parametrize("args", [
    ["demo"], ["simulate"], ["pki", "init"], ["pki", "issue"], ["pki", "revoke"], ["pki", "list"],
    ["pki", "broker-config"], ["agent", "run"], ["agent", "check"], ["aggregator", "run"],
    ["coordinator", "run"], ["coordinator", "models"],
])
def test_every_command_explains_itself(args: list[str]) -> None:
    res = runner.invoke(app, [*args, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output and len(res.output) > 200


@pytest.mark.parametrize("role_app", [agent_app, aggregator_app, coordinator_app])
def test_each_role_command_keeps_its_subcommand(role_app, tmp_path: Path) -> None:
    """`hfl-agent run -c FILE`, as the systemd units spell it (not `hfl-agent -c FILE`)."""
    res = runner.invoke(role_app, ["run", "-c", str(tmp_path / "missing.toml")])
    assert res.exit_code == 1 and "no such config file" in res.output, res.output
    assert runner.invoke(role_app, ["-c", str(tmp_path / "missing.toml")]).exit_code == 2


def test_version_names_what_a_bug_report_needs() -> None:
    res = runner.invoke(app, ["version"])
    assert res.exit_code == 0
    names = [line.split(":")[0] for line in res.output.splitlines()]
    assert names == ["hfl", "python", "torch", "onnxruntime", "paho-mqtt", "cryptography",
                     "machine", "cuda"]
    assert f"torch:        {torch.__version__}" in res.output
    assert platform.machine() in res.output


def test_pki_init_issue_list_revoke(tmp_path: Path) -> None:
    pki = str(tmp_path / "pki")

    def hfl(*args: str) -> Result:
        return runner.invoke(app, ["pki", *args])

    assert hfl("init", pki).exit_code == 0
    assert "already holds a fleet CA" in hfl("init", pki).output
    assert hfl("issue", pki, "site-a", "--role", "aggregator").exit_code == 0
    res = hfl("issue", pki, "agent-1", "--role", "agent", "--aggregator", "site-a")
    assert res.exit_code == 0 and "roster serial 3" in res.output, res.output
    key = tmp_path / "pki" / "devices" / "agent-1" / "agent-1.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    again = hfl("issue", pki, "agent-1", "--role", "agent", "--aggregator", "site-a")
    assert again.exit_code == 1 and "--force" in again.output
    orphan = hfl("issue", pki, "agent-2", "--role", "agent", "--aggregator", "site-z")
    assert orphan.exit_code == 1 and "hfl pki issue" in orphan.output
    assert hfl("issue", pki, "x", "--role", "agent", "--host", "h").exit_code == 2
    listed = hfl("list", pki).output
    assert "agent-1" in listed and "site-a" in listed and "serial 3" in listed
    assert hfl("revoke", pki, "agent-1").exit_code == 0
    assert Pki(tmp_path / "pki").roster().group("site-a") == []
    assert "yes" in hfl("list", pki).output  # the revoked column
    assert "no fleet CA" in hfl("list", str(tmp_path / "none")).output


def test_pki_broker_config_writes_the_broker_files(tmp_path: Path) -> None:
    pki, out = str(tmp_path / "pki"), tmp_path / "out"
    runner.invoke(app, ["pki", "init", pki])
    runner.invoke(app, ["pki", "issue", pki, "site-a", "--role", "aggregator"])
    no_host = runner.invoke(app, ["pki", "broker-config", pki, "--out", str(out)])
    assert no_host.exit_code == 1 and "--host" in no_host.output
    res = runner.invoke(app, ["pki", "broker-config", pki, "--host", "broker.lan", "--out",
                              str(out), "--port", "8884", "--install-dir", "/opt/mq"])
    assert res.exit_code == 0, res.output
    conf = (out / "mosquitto.conf").read_text().splitlines()
    assert "listener 8884 0.0.0.0" in conf and "acl_file /opt/mq/acl" in conf
    assert "keyfile /opt/mq/broker.tls.key" in conf and "crlfile /opt/mq/crl.pem" in conf
    assert f"max_packet_size {256 * 1024 + 1024}" in conf  # hfl's chunks pass, nothing larger
    assert "persistence_location /var/lib/mosquitto/" in conf and "autosave_interval 1" in conf
    assert "user site-a" in (out / "acl").read_text()
    assert stat.S_IMODE(os.stat(out / "broker.tls.key").st_mode) == 0o600
    assert {p.name for p in out.iterdir()} == {"mosquitto.conf", "acl", "ca.crt", "crl.pem",
                                               "broker.crt", "broker.tls.key"}
    bigger = runner.invoke(app, ["pki", "broker-config", pki, "--host", "broker.lan", "--out",
                                 str(out), "--max-packet-size", str(16 << 20),
                                 "--autosave-interval", "10"])
    assert bigger.exit_code == 0, bigger.output
    conf = (out / "mosquitto.conf").read_text().splitlines()
    assert f"max_packet_size {16 << 20}" in conf and "autosave_interval 10" in conf


def test_agent_without_its_section_gets_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[identity]\nid = "a1"\ndir = "pki/devices/a1"\n')
    res = runner.invoke(app, ["agent", "run", "-c", str(cfg)])
    assert res.exit_code != 0
    assert "[agent] section is required" in res.output


def test_a_device_run_with_another_role_or_missing_files_is_told_what_to_fix(
        tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    runner.invoke(app, ["pki", "init", str(pki)])
    runner.invoke(app, ["pki", "issue", str(pki), "site-a", "--role", "aggregator"])
    cfg = tmp_path / "agg.toml"
    cfg.write_text('[identity]\nid = "site-a"\ndir = "pki/devices/site-a"\n')
    res = runner.invoke(app, ["coordinator", "run", "-c", str(cfg)])  # an aggregator's files
    assert res.exit_code == 1 and "[coordinator] section is required" in res.output
    cfg.write_text('[identity]\nid = "site-b"\ndir = "pki/devices/site-a"\n')
    res = runner.invoke(app, ["aggregator", "run", "-c", str(cfg)])
    assert res.exit_code == 1 and "hfl pki issue" in res.output  # no site-b key files


def test_bad_config_value_names_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[identity]\nid = "a1"\ndir = "k"\n[broker]\nport = "x"\n')
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
    assert all(r["agents"] == 100 and r["dropped"] == 0 for r in doc["rounds"])
    assert doc["security"] == {"tls": True, "secagg": True}
    eps = [r["epsilon"] for r in doc["rounds"]]
    assert eps == sorted(eps) and eps[0] > 0 and eps[-1] <= 8.0  # calibrated for 3 rounds
    assert doc["delta"] == 1e-5
    assert Path(doc["onnx"]).is_file() and Path(doc["safetensors"]).is_file()
    assert (tmp_path / "out" / "metrics.png").stat().st_size > 1000


def test_simulate_runs_a_config(mosquitto: str, tmp_path: Path) -> None:
    cfg = tmp_path / "sim.toml"
    # One agent per site and round: too few to hide anyone, so plain rounds on a plain
    # broker, which a config can ask for.
    cfg.write_text('seed = 2\n[fleet]\naggregators = 2\nagents = 4\ntls = false\n'
                   '[data]\nsource = "digits"\npartition = "iid"\n'
                   '[model]\ntask = "mlp"\noptions = {input_shape = [1, 8, 8], num_classes = 10}\n'
                   'rounds = 2\nepochs = 2\nlr = 0.1\nmomentum = 0.9\nclient_fraction = 0.5\n'
                   'min_agents = 1\nsecagg = { enabled = false }\n')
    report = tmp_path / "r.json"
    res = runner.invoke(app, ["simulate", str(cfg), "--out", str(tmp_path / "o"),
                              "--report", str(report)])
    assert res.exit_code == 0, res.output
    doc = json.loads(report.read_text())
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert all(r["agents"] == 2 for r in doc["rounds"])  # C = 0.5 of 2 agents on each site
    assert doc["security"] == {"tls": False, "secagg": False} and doc["network"] == "mqtt"
    assert doc["rounds"][-1]["accuracy"] > 0.6  # 10 classes: chance is 0.1

    # Again in the same folder, a round longer: a job of its own, nothing of the first
    # run's written over, and the report names this run's files.
    first_onnx = Path(doc["onnx"])
    before = {f: f.read_bytes() for f in first_onnx.parent.iterdir()}
    cfg.write_text(cfg.read_text().replace("rounds = 2", "rounds = 3"))
    res = runner.invoke(app, ["simulate", str(cfg), "--out", str(tmp_path / "o"),
                              "--report", str(report)])
    assert res.exit_code == 0, res.output
    again = json.loads(report.read_text())
    (job,) = again["jobs"]
    assert job not in doc["jobs"] and Path(again["onnx"]).name == f"{job}-v3.onnx"
    assert {f: f.read_bytes() for f in before} == before  # the first run's versions


def test_simulate_config_error_names_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "sim.toml"
    cfg.write_text('[model]\ntask = "res net"\n')
    res = runner.invoke(app, ["simulate", str(cfg)])
    assert res.exit_code == 1
    assert "task" in res.output and "pattern" in res.output
    cfg.write_text('[model]\ntask = "resnet"\n')
    res = runner.invoke(app, ["simulate", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "task 'resnet' is not allowed here (allowed: " in res.output
    assert "logreg, mlp, mnist-2nn, mnist-cnn" in res.output


def test_the_operators_commands_load_no_torch() -> None:
    """`hfl --help`, status, jobs, models and dashboard start fast: a command loads only
    what it runs (torch, onnx and dp-accounting take seconds on a board)."""
    import subprocess
    import sys

    code = ("import sys, fleet.cli, fleet.ops.ops_cli, fleet.ops.view, fleet.ops.watch, "
            "fleet.ops.dashboard;"
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'dp_accounting', "
            "'sklearn', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_tasks_lists_the_installed_and_the_named() -> None:
    res = runner.invoke(app, ["tasks", "tests.task_examples:Line", "nope"])
    assert res.exit_code == 0, res.output
    rows = {line.split("│")[1].strip(): line for line in res.output.splitlines()
            if line.startswith("│")}
    assert "hfl.models.zoo:Mlp" in rows["mlp"] and "input_shape, num_classes" in rows["mlp"]
    assert "rmse (lower is better)" in rows["line"] and "slope" in rows["line"]
    assert "not installed" in rows["nope"]


def test_privacy_prints_the_epsilon_of_each_round_and_plots_it(tmp_path: Path) -> None:
    cfg = tmp_path / "dp.toml"
    base = ('[fleet]\naggregators = 2\nagents = 20\n[model]\ntask = "logreg"\n'
            'options = {input_shape = [1, 8, 8], num_classes = 10}\nrounds = 6\n'
            'client_fraction = 0.5\n')
    cfg.write_text(base + '[model.privacy]\nepsilon = 4.0\n')
    plot = tmp_path / "eps.png"
    res = runner.invoke(app, ["privacy", str(cfg), "--plot", str(plot)])
    assert res.exit_code == 0, res.output
    assert "q = 0.500" in res.output and "target ε = 4" in res.output
    eps = [float(line.split("│")[2]) for line in res.output.splitlines()
           if line.startswith("│") and line.split("│")[1].strip().isdigit()]
    assert len(eps) == 6 and eps == sorted(eps) and 3.9 < eps[-1] <= 4.0  # calibrated
    assert plot.stat().st_size > 1000
    cfg.write_text(base)
    res = runner.invoke(app, ["privacy", str(cfg)])
    assert res.exit_code == 1 and "not differentially private" in res.output
    cfg.write_text(base + '[model.privacy]\nepsilon = 0.001\ndelta = 1e-9\n')
    res = runner.invoke(app, ["privacy", str(cfg)])
    assert res.exit_code == 1 and "cannot be met" in res.output
