"""`hfl simulate` and `hfl demo`: a whole fleet on one machine, over a real broker.

A TOML config names the fleet (agents, aggregators), the data (digits, MNIST IDX files or
an .npz, and how to split it between agents) and the model request. The run starts a
Mosquitto on a free loopback port, a coordinator, the aggregators and agents as
in-process nodes (each its own MQTT client), and an app that requests the model, receives
every version and scores it with onnxruntime on data no agent holds.

```toml
[fleet]
aggregators = 2
agents = 6

[data]
source = "digits"            # digits | mnist | npz
partition = "dirichlet"      # iid | dirichlet | shards
alpha = 0.5

[model]                      # the model request (see hfl.messages.ModelSpec)
arch = "mlp"
rounds = 12
```
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge_agent import data as datasets
from edge_agent.data import Dataset
from edge_agent.partition import partition
from edge_agent.runner import LocalData
from fleet.follow import Outcome, follow
from fleet.inproc import FleetLayout, InProcessFleet
from fleet.memsim import MemFleet
from hfl.app import JobStatus
from hfl.messages import ModelRequest, ModelSpec, short_error

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

APP = "sim-app"
MODEL_NAME = "model"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FleetSection(_Section):
    aggregators: int = Field(default=2, ge=1, le=1000)
    agents: int = Field(default=6, ge=1, le=100_000, description="in all, spread evenly")
    device: str = "cpu"
    tls: bool = Field(default=True, description="a TLS broker with client certificates + ACL")
    network: Literal["mqtt", "memory"] = Field(
        default="mqtt", description="mqtt: a broker, one MQTT client per node; memory: the "
        "same machines on an in-memory network (fleet.memsim), for thousands of agents")


class DataSection(_Section):
    source: Literal["digits", "mnist", "npz"] = "digits"
    path: Path | None = None
    test_path: Path | None = Field(default=None, description="npz held out for the app")
    partition: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    alpha: float = Field(default=0.5, gt=0)
    shards_per_agent: int = Field(default=2, ge=1)
    holdout: float = Field(default=0.2, gt=0, lt=1, description="kept for the app when the "
                           "source has no test split")
    local_test_fraction: float = Field(default=0.2, ge=0, lt=1)


class SimConfig(_Section):
    fleet: FleetSection = FleetSection()
    data: DataSection = DataSection()
    model: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    timeout: float = Field(default=3600, gt=0)

    def spec(self, aggregators: list[str]) -> ModelSpec:
        fields = {"name": MODEL_NAME, "dataset": "data", "seed": self.seed, **self.model,
                  "aggregators": aggregators}
        return ModelSpec.model_validate(fields)


def load_sim_config(path: Path) -> SimConfig:
    """Read a simulation config; problems become a ValueError naming the field."""
    try:
        doc = tomllib.loads(Path(path).read_text())
        cfg = SimConfig.model_validate(doc)
        cfg.spec(["check"])  # the model section must make a valid request
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    except ValidationError as e:
        raise ValueError(f"{path}: {short_error(e)}") from None
    if cfg.data.path is not None and not cfg.data.path.is_absolute():
        cfg.data.path = Path(path).parent / cfg.data.path
    return cfg


def aggregator_ids(n: int) -> list[str]:
    return [f"site-{i + 1}" for i in range(n)]


def fleet_data(cfg: SimConfig) -> tuple[dict[str, dict[str, dict[str, LocalData]]], Dataset]:
    """Split the data over the agents (non-IID as configured), keeping the app's test set."""
    d = cfg.data
    path = str(d.path) if d.path else None
    if d.source == "mnist":
        pool, held_out = datasets.load("mnist", path=path), datasets.load("mnist", path=path,
                                                                          split="test")
    elif d.test_path is not None:
        pool, held_out = datasets.load(d.source, path=path), datasets.load_npz(d.test_path)
    else:
        pool, held_out = datasets.split(datasets.load(d.source, path=path), d.holdout,
                                        seed=cfg.seed)
    layout = group_members(cfg)
    parts = partition(d.partition, pool.y, cfg.fleet.agents, seed=cfg.seed, alpha=d.alpha,
                      shards_per_part=d.shards_per_agent)
    groups: dict[str, dict[str, dict[str, LocalData]]] = {a: {} for a in layout}
    placed = ((agg, agent) for agg, agents in layout.items() for agent in agents)
    for i, (agg, agent) in enumerate(placed):  # agent-(i+1) holds part i
        train, test = datasets.split(pool.subset(parts[i]), d.local_test_fraction,
                                     seed=cfg.seed + i)
        groups[agg][agent] = {"data": LocalData(train, test)}
    return groups, held_out


def group_members(cfg: SimConfig) -> dict[str, list[str]]:
    """Which agents each aggregator serves: agent-1..n spread evenly, in order."""
    aggs = aggregator_ids(cfg.fleet.aggregators)
    per_group = math.ceil(cfg.fleet.agents / len(aggs))
    out: dict[str, list[str]] = {a: [] for a in aggs}
    for i in range(cfg.fleet.agents):
        out[aggs[i // per_group]].append(f"agent-{i + 1}")
    return out


def run(cfg: SimConfig, workdir: Path,
        on_row=None) -> tuple[Outcome, InProcessFleet | MemFleet, float]:
    """Run one simulated job end to end in `workdir` (keys, broker, registry, ONNX files);
    returns what the app saw, the (stopped) fleet and the seconds it took.

    With `network = "memory"` nothing is written: the versions are scored with torch, and
    `timeout` counts simulated seconds."""
    t0 = time.monotonic()
    groups, held_out = fleet_data(cfg)
    if cfg.fleet.network == "memory":
        mem = MemFleet(FleetLayout(groups, apps=(APP,)), device=cfg.fleet.device)
        done = mem.run(cfg.spec(sorted(groups)), f"sim-seed{cfg.seed}", held_out,
                       timeout_s=cfg.timeout, on_row=on_row)
        return (Outcome(done.rows, {done.status.job: JobStatus(done.status)}, {}), mem,
                time.monotonic() - t0)
    fleet = InProcessFleet(FleetLayout(groups, apps=(APP,)), workdir, tls=cfg.fleet.tls,
                           device=cfg.fleet.device)
    app = None
    try:
        fleet.start()
        app = fleet.app(APP, models=[MODEL_NAME])
        app.start()
        req = ModelRequest(request_id=f"sim-seed{cfg.seed}",  # reproducible runs
                           models=[cfg.spec(sorted(groups))])
        outcome = follow(app, app.request(req), held_out, cfg.timeout, on_row=on_row)
    finally:
        if app is not None:
            app.stop()
        fleet.stop()
    return outcome, fleet, time.monotonic() - t0


def summary(cfg: SimConfig, outcome: Outcome, fleet: InProcessFleet | MemFleet,
            seconds: float) -> dict:
    """The `--report` document."""
    spec = cfg.spec(sorted(fleet.layout.groups))
    last = fleet.versions[-1] if fleet.versions else None
    return {
        "rounds": [
            {"round": r.round, "accuracy": r.accuracy, "loss": r.loss, "agents": r.agents,
             "dropped": r.dropped, "federated_accuracy": r.federated_accuracy,
             "train_loss": r.train_loss, "epsilon": r.epsilon}
            for r in outcome.rows
        ],
        "delta": spec.privacy.delta if spec.privacy else None,
        "security": {"tls": fleet.tls, "secagg": bool(spec.secagg.enabled)},
        "network": cfg.fleet.network,
        "onnx": str(last.onnx) if last else None,
        "safetensors": str(last.safetensors) if last else None,
        "seconds": round(seconds, 2),
        "jobs": {j: {"state": s.meta.state, "reason": s.meta.reason}
                 for j, s in outcome.status.items()},
        "rejections": fleet.rejections(),
    }


def demo_config(rounds: int | None = None, seed: int = 0, private: bool = True) -> SimConfig:
    """The demo, over TLS + SecAgg+ either way.

    private: client-level DP at ε = 8 (δ = 1e-5), which needs many clients: 2 sites x 50
    agents on IID shares of digits, logistic regression, 15 rounds, server momentum.
    Otherwise: 2 sites x 3 agents on non-IID digits, a small MLP, HierFAVG with κ1 = 2.
    """
    if private:
        return SimConfig(
            fleet=FleetSection(aggregators=2, agents=100),
            data=DataSection(source="digits", partition="iid"),
            model=dict(arch="logreg", input_shape=(1, 8, 8), num_classes=10,
                       rounds=rounds or 15, epochs=5, batch_size=16, lr=0.1, momentum=0.9,
                       server_momentum=0.9, min_agents=20, deadline_s=60,
                       privacy=dict(epsilon=8.0, clip=1.0, mode="distributed")),
            seed=seed,
            timeout=900,
        )
    return SimConfig(
        fleet=FleetSection(aggregators=2, agents=6),
        data=DataSection(source="digits", partition="dirichlet", alpha=0.5),
        model=dict(arch="mlp", input_shape=(1, 8, 8), num_classes=10, rounds=rounds or 12,
                   kappa1=2, epochs=2, batch_size=16, lr=0.05, momentum=0.9, min_agents=2,
                   deadline_s=30),
        seed=seed,
        timeout=600,
    )
