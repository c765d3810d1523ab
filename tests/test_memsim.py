"""The fast simulator (`fleet.sim.memsim`): real torch training on digits, SecAgg+ and DP-FedAvg
on the in-memory network. It learns, it spends exactly what the accountant says, and its
clock makes a round wait for its deadline only when an agent does not answer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fleet.cli import app
from fleet.sim.inproc import FleetLayout
from fleet.sim.memsim import MemFleet
from fleet.sim.simulate import APP, DataSection, FleetSection, SimConfig, fleet_data
from hfl.privacy.accounting import epsilon

logging.getLogger("absl").setLevel(logging.ERROR)

AGGS, AGENTS, SAMPLED = 3, 60, 8  # 20 agents a group, 8 of them sampled each round
DIGITS = {"input_shape": [1, 8, 8], "num_classes": 10}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Batches of 8 on a model of 650 parameters: a second thread only spins (and on a
    shared machine, oversubscribed spinning makes each step 10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fleet_and_config(**model) -> tuple[MemFleet, SimConfig, object]:
    cfg = SimConfig(
        fleet=FleetSection(aggregators=AGGS, agents=AGENTS),
        data=DataSection(source="digits", partition="iid", local_test_fraction=0.0),
        model=dict(task="logreg", options=DIGITS, rounds=4, epochs=5,
                   batch_size=8, lr=0.1, momentum=0.9, client_fraction=SAMPLED / 20,
                   min_agents=SAMPLED, deadline_s=30, **model),
        seed=1)
    groups, test = fleet_data(cfg)
    return MemFleet(FleetLayout(groups, apps=(APP,)), cfg.task_set()), cfg, test


@pytest.fixture(scope="module")
def private_run():
    fleet, cfg, test = fleet_and_config(privacy=dict(epsilon=30.0, clip=1.0))
    spec = cfg.spec(sorted(fleet.layout.groups))
    return spec, fleet.run(spec, "dp", test), fleet


def test_a_private_job_learns_digits_through_secure_rounds(private_run) -> None:
    spec, run, _ = private_run
    assert run.status.state == "done"
    assert [r.round for r in run.rows] == [1, 2, 3, 4]
    assert all(r.agents == AGGS * SAMPLED and r.dropped == 0 for r in run.rows)
    assert run.rows[-1].metrics["accuracy"] > 0.5  # ten classes: chance is 0.1
    assert not run.rejections


def test_the_epsilon_published_is_the_accountants_for_the_run(private_run) -> None:
    spec, run, _ = private_run
    z = run.z
    assert z is not None and z > 0  # calibrated by the coordinator: the request gave none
    q = SAMPLED / 20  # every agent is a candidate of every round of its group
    for r in run.rows:
        assert r.epsilon == pytest.approx(epsilon(z, r.round, 1e-5, q), rel=1e-9)
    assert run.status.epsilon == pytest.approx(run.rows[-1].epsilon, rel=1e-12)
    assert run.rows[-1].epsilon <= 30.0 + 1e-6


def test_a_silent_agent_holds_one_round_until_its_deadline_and_no_more() -> None:
    fleet, cfg, test = fleet_and_config()
    spec = cfg.spec(sorted(fleet.layout.groups)).model_copy(update={
        "client_fraction": 1.0, "min_agents": 10, "rounds": 2})
    start = fleet.net.now
    quiet = fleet.run(spec, "quiet", test)
    assert fleet.net.now == start  # everyone answered: no tick was needed
    assert [r.agents for r in quiet.rows] == [AGENTS, AGENTS]

    fleet.silent = {"agent-1", "agent-25"}  # one in site-1, one in site-2
    start = fleet.net.now
    late = fleet.run(spec, "late", test, tick_s=1.0)
    assert late.status.state == "done"
    assert [r.agents for r in late.rows] == [AGENTS - 2, AGENTS - 2]
    # The first round waited for its deadline (30 s of simulated time), not a tick longer;
    # the second left the two out (they let a round down) and waited for nothing.
    assert 30 <= fleet.net.now - start <= 30 + 1


def test_hfl_simulate_runs_a_config_on_the_memory_network(tmp_path: Path) -> None:
    cfg = tmp_path / "sim.toml"
    cfg.write_text('seed = 3\n[fleet]\naggregators = 2\nagents = 12\nnetwork = "memory"\n'
                   '[data]\nsource = "digits"\npartition = "iid"\n'
                   '[model]\ntask = "logreg"\n'
                   'options = {input_shape = [1, 8, 8], num_classes = 10}\n'
                   'rounds = 2\nepochs = 3\nlr = 0.1\nmomentum = 0.9\nmin_agents = 3\n')
    report = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["simulate", str(cfg), "--out", str(tmp_path / "o"),
                                   "--report", str(report)])
    assert res.exit_code == 0, res.output
    doc = json.loads(report.read_text())
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert all(r["agents"] == 12 for r in doc["rounds"])
    assert doc["security"] == {"tls": False, "secagg": True} and doc["network"] == "memory"
    ((job, state),) = doc["jobs"].items()  # a fresh id per run: sim-s{seed}-{random}-model
    assert job.startswith("sim-s3-") and state == {"state": "done", "reason": "2 rounds"}
    assert doc["rounds"][-1]["accuracy"] > 0.5
    assert (tmp_path / "o" / "metrics.png").is_file()


def test_the_report_names_the_sites_each_version_was_made_without(tmp_path: Path) -> None:
    cfg = tmp_path / "sim.toml"  # 5 agents on 2 sites: 3 and 2, too few for SecAgg+ there
    cfg.write_text('seed = 3\n[fleet]\naggregators = 2\nagents = 5\nnetwork = "memory"\n'
                   '[data]\nsource = "digits"\npartition = "iid"\n'
                   '[model]\ntask = "logreg"\n'
                   'options = {input_shape = [1, 8, 8], num_classes = 10}\n'
                   'rounds = 2\nepochs = 1\nmin_agents = 2\n')
    report = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["simulate", str(cfg), "--out", str(tmp_path / "o"),
                                   "--report", str(report)], terminal_width=300)
    assert res.exit_code == 0, res.output
    doc = json.loads(report.read_text())
    assert [r["agents"] for r in doc["rounds"]] == [3, 3]
    (why,) = {r["missing"]["site-2"] for r in doc["rounds"]}
    assert why.startswith("secure group too small: 2 agents available")
    assert all(list(r["missing"]) == ["site-2"] for r in doc["rounds"])
    assert "site-2 missing from 2 of 2 versions (1-2): secure group too small" in " ".join(
        res.output.split())
