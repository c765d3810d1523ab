"""`hfl simulate` and `hfl demo`: a whole fleet on one machine, over a real broker.

A TOML config names the fleet (agents, aggregators), the data (read once through the task,
then split between the agents) and the model request. The run starts a Mosquitto on a free
loopback port, a coordinator, the aggregators and agents as in-process nodes (each its own
MQTT client), and an app that requests the model, receives every version and scores it
with onnxruntime, by the task's own loss and metrics, on data no agent holds.

```toml
tasks = ["my_tasks:Vibration"]   # tasks not installed as entry points (module:Attr)

[fleet]
aggregators = 2
agents = 6

[data]                       # what the task's data() reads (its source.settings), and:
source = "digits"
partition = "dirichlet"      # iid | contiguous | dirichlet | shards (the last two: classes)
alpha = 0.5
holdout = 0.2                # kept for the app's scoring (0: none); or a [test] table

[model]                      # the model request (see hfl.wire.messages.ModelSpec)
task = "mlp"
options = {input_shape = [1, 8, 8], num_classes = 10}
rounds = 12
```
"""

from __future__ import annotations

import math
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from application import JobStatus
from edge_agent.partition import partition
from edge_agent.runner import LocalData
from fleet.sim.follow import Outcome, follow
from fleet.sim.inproc import FleetLayout, InProcessFleet
from fleet.sim.memsim import MemFleet
from hfl.models.tasks import TaskSet
from hfl.task import Samples, Source, Task, TaskError
from hfl.wire.messages import ModelRequest, ModelSpec, short_error

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

APP = "sim-app"
MODEL_NAME = "model"
SOURCE = "data"  # the agents' data source, as the job names it


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FleetSection(_Section):
    aggregators: int = Field(default=2, ge=1, le=1000)
    agents: int = Field(default=6, ge=1, le=100_000, description="in all, spread evenly")
    device: str = "cpu"
    tls: bool = Field(default=True, description="a TLS broker with client certificates + ACL")
    network: Literal["mqtt", "memory"] = Field(
        default="mqtt", description="mqtt: a broker, one MQTT client per node; memory: the "
        "same machines on an in-memory network (fleet.sim.memsim), for thousands of agents")


class DataSection(BaseModel):
    """The agents' data: read once through the task (every key but hfl's below is the
    task's, as in an agent's `[agent.datasets.NAME]`), then split between them."""

    model_config = ConfigDict(extra="allow")

    path: Path | None = None
    partition: Literal["iid", "dirichlet", "shards", "contiguous"] = "iid"
    alpha: float = Field(default=0.5, gt=0)
    shards_per_agent: int = Field(default=2, ge=1)
    holdout: float = Field(default=0.2, ge=0, lt=1, description="kept for the app when "
                           "there is no [test] table (0: the app scores nothing)")
    local_test_fraction: float = Field(default=0.2, ge=0, lt=1)


class TestSection(BaseModel):
    """The app's held-out data, read through the task as well (e.g. MNIST's test split)."""

    model_config = ConfigDict(extra="allow")

    path: Path | None = None


class SimConfig(_Section):
    tasks: list[str] = Field(default_factory=list, description="tasks beyond the installed "
                             "entry points: module:Attribute references")
    fleet: FleetSection = FleetSection()
    data: DataSection = DataSection()
    test: TestSection | None = None
    model: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    timeout: float = Field(default=3600, gt=0)

    def spec(self, aggregators: list[str]) -> ModelSpec:
        fields = {"name": MODEL_NAME, "dataset": SOURCE, "seed": self.seed, **self.model,
                  "aggregators": aggregators}
        return ModelSpec.model_validate(fields)

    def task_set(self) -> TaskSet:
        return TaskSet([*TaskSet.everything_installed().classes.values(), *self.tasks])

    def task(self, tasks: TaskSet | None = None) -> Task:
        """The model's task with its options; ValueError when it cannot be used."""
        spec = self.spec(["check"])
        try:
            return (tasks or self.task_set()).prepare(spec.task, spec.options).task
        except TaskError as e:
            raise ValueError(str(e)) from None

    @property
    def rounds(self) -> int:
        return int(self.model.get("rounds", 10))


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
    for section in (cfg.data, cfg.test):
        if section is not None and section.path is not None and not section.path.is_absolute():
            section.path = Path(path).parent / section.path
    return cfg


def aggregator_ids(n: int) -> list[str]:
    return [f"site-{i + 1}" for i in range(n)]


def fleet_data(cfg: SimConfig, task: Task | None = None,
               ) -> tuple[dict[str, dict[str, dict[str, LocalData]]], Samples | None]:
    """Read the data through the task (the config's own by default), keep the app's
    held-out set, and split the rest between the agents as configured."""
    task = task or cfg.task()
    d = cfg.data
    got = task.data(Source(SOURCE, d.model_extra or {}, d.path))
    pool, held_out = got if isinstance(got, tuple) else (got, None)
    if cfg.test is not None:
        held_out = _whole(task.data(Source("test", cfg.test.model_extra or {}, cfg.test.path)))
    elif held_out is None and d.holdout > 0:
        pool, held_out = pool.split(d.holdout, seed=cfg.seed)
    layout = group_members(cfg)
    parts = partition(d.partition, len(pool), cfg.fleet.agents, seed=cfg.seed, labels=pool.y,
                      alpha=d.alpha, shards_per_part=d.shards_per_agent)
    groups: dict[str, dict[str, dict[str, LocalData]]] = {a: {} for a in layout}
    placed = ((agg, agent) for agg, agents in layout.items() for agent in agents)
    for i, (agg, agent) in enumerate(placed):  # agent-(i+1) holds part i
        train, test = pool.subset(parts[i]).split(d.local_test_fraction, seed=cfg.seed + i)
        groups[agg][agent] = {SOURCE: LocalData(train, test)}
    return groups, held_out


def _whole(got: Samples | tuple[Samples, Samples]) -> Samples:
    return got if isinstance(got, Samples) else got[0]


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
    tasks = cfg.task_set()
    spec = cfg.spec(aggregator_ids(cfg.fleet.aggregators))
    task = cfg.task(tasks)
    groups, held_out = fleet_data(cfg, task)
    # A fresh job id per run: a folder's registry keeps every run's versions, and no two
    # jobs share an id (the seed, not the id, makes a run reproducible).
    request_id = f"sim-s{cfg.seed}-{secrets.token_hex(3)}"
    if cfg.fleet.network == "memory":
        mem = MemFleet(FleetLayout(groups, apps=(APP,)), tasks, device=cfg.fleet.device)
        done = mem.run(spec, request_id, held_out, timeout_s=cfg.timeout, on_row=on_row)
        return (Outcome(done.rows, {done.status.job: JobStatus(done.status)}, {}), mem,
                time.monotonic() - t0)
    fleet = InProcessFleet(FleetLayout(groups, apps=(APP,)), workdir, tasks, tls=cfg.fleet.tls,
                           device=cfg.fleet.device)
    app = None
    try:
        fleet.start()
        app = fleet.app(APP, models=[MODEL_NAME])
        app.start()
        req = ModelRequest(request_id=request_id, models=[spec])
        outcome = follow(app, app.request(req), tasks, held_out, cfg.timeout, on_row=on_row)
    finally:
        if app is not None:
            app.stop()
        fleet.stop()
    return outcome, fleet, time.monotonic() - t0


def summary(cfg: SimConfig, outcome: Outcome, fleet: InProcessFleet | MemFleet,
            seconds: float) -> dict:
    """The `--report` document."""
    spec = cfg.spec(sorted(fleet.layout.groups))
    ours = [v for v in fleet.versions if v.job in outcome.status or v.job in outcome.refused]
    last = ours[-1] if ours else None  # this run's newest: the folder may hold earlier runs
    # The sites each version was made without, and why (the job's history rows).
    missing = {(j, row.get("version")): row.get("missing") or {}
               for j, s in outcome.status.items() for row in s.meta.history}
    return {
        "task": spec.task,
        "rounds": [
            {"round": r.round, "loss": r.loss, **r.metrics, "agents": r.agents,
             "dropped": r.dropped, "declines": r.declines,
             "missing": missing.get((r.job, r.round), {}), "train_loss": r.train_loss,
             "federated": {"loss": r.federated_loss, **r.federated}, "epsilon": r.epsilon}
            for r in outcome.rows
        ],
        "delta": spec.privacy.delta if spec.privacy else None,
        "security": {"tls": fleet.tls, "secagg": bool(spec.secagg.enabled)},
        "network": cfg.fleet.network,
        "onnx": str(last.onnx) if last else None,
        "safetensors": str(last.safetensors) if last else None,
        "seconds": round(seconds, 2),
        "jobs": {**{j: {"state": s.meta.state, "reason": s.meta.reason}
                    for j, s in outcome.status.items()},
                 **{j: {"state": "refused", "reason": why} for j, why in outcome.refused.items()}},
        "rejections": fleet.rejections(),
    }


DIGITS = {"input_shape": [1, 8, 8], "num_classes": 10}  # the built-in tasks' options


def demo_config(rounds: int | None = None, seed: int = 0, private: bool = True) -> SimConfig:
    """The demo, over TLS + SecAgg+ either way.

    private: client-level DP at ε = 8 (δ = 1e-5), which needs many clients: 2 sites x 50
    agents on IID shares of digits, logistic regression, 15 rounds, server momentum.
    Otherwise: 2 sites x 3 agents on non-IID digits, a small MLP, HierFAVG with κ1 = 2.
    """
    if private:
        return SimConfig(
            fleet=FleetSection(aggregators=2, agents=100),
            data=DataSection.model_validate({"source": "digits", "partition": "iid"}),
            model=dict(task="logreg", options=DIGITS, rounds=rounds or 15, epochs=5,
                       batch_size=16, lr=0.1, momentum=0.9, server_momentum=0.9,
                       min_agents=20, deadline_s=60,
                       privacy=dict(epsilon=8.0, clip=1.0, mode="distributed")),
            seed=seed,
            timeout=900,
        )
    return SimConfig(
        fleet=FleetSection(aggregators=2, agents=6),
        data=DataSection.model_validate({"source": "digits", "partition": "dirichlet",
                                         "alpha": 0.5}),
        model=dict(task="mlp", options=DIGITS, rounds=rounds or 12,
                   kappa1=2, epochs=2, batch_size=16, lr=0.05, momentum=0.9, min_agents=2,
                   deadline_s=30),
        seed=seed,
        timeout=600,
    )
