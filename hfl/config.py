"""Service configuration: one TOML file per board or service, validated with clear errors.

```toml
[identity]
id = "agent-1"
dir = "/etc/hfl/pki"             # from `hfl pki issue`: keys, certificate, CA, signed roster

[broker]
host = "broker.example"
port = 8883                      # TLS with the device's certificate (tls = false: plain 1883)

[agent]
aggregator = "site-a"
device = "auto"                  # cuda on a Jetson, else cpu
tasks = ["mlp", "logreg"]        # the tasks this board may run (entry points or module:Attr)

[agent.datasets.digits]          # a data source; a job names it (default: the task's name)
source = "digits"                # the rest of the table is the task's (see its data())
test_fraction = 0.2              # kept aside to evaluate each round model

[metrics]                        # optional
port = 9464                      # a Prometheus endpoint on 127.0.0.1 (off without a port)
```
Relative paths are taken from the config file's folder.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hfl.wire.messages import short_error

if sys.version_info >= (3, 11):
    import tomllib
else:  # Jetson images still ship Python 3.10
    import tomli as tomllib
from hfl.crypto.pki import DeviceFiles
from hfl.runtime.mqtt import DEFAULT_MAX_PAYLOAD, BrokerSettings
from hfl.wire.topics import DEFAULT_PREFIX, Topics, check_id

if TYPE_CHECKING:
    from hfl.models.tasks import TaskSet


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IdentitySection(_Section):
    id: str
    dir: Path = Field(description="the device directory written by `hfl pki issue`")

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_id(v)


class BrokerSection(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8883, ge=1, le=65535)
    tls: bool = Field(default=True, description="TLS with the device's certificate")
    keepalive: int = Field(default=30, ge=5, le=3600)
    session_expiry: int = Field(default=3600, ge=0)


class DatasetSection(BaseModel):
    """One of the board's data sources. hfl reads the keys below; every other key is the
    task's own (its `data()` gets them as `source.settings`)."""

    model_config = ConfigDict(extra="allow")

    path: Path | None = Field(default=None, description="a file or folder, relative to the "
                              "config's folder")
    test_fraction: float = Field(default=0.2, ge=0, lt=1, description="kept aside to "
                                 "evaluate each round model")
    seed: int = 0
    # Simulation only: take part `index` of `parts` from a partition of the whole set.
    partition: Literal["iid", "dirichlet", "shards", "contiguous"] | None = None
    parts: int = Field(default=1, ge=1)
    index: int = Field(default=0, ge=0)
    alpha: float = Field(default=0.5, gt=0)
    shards_per_part: int = Field(default=2, ge=1)

    @property
    def settings(self) -> dict[str, Any]:
        """The task's own keys."""
        return dict(self.model_extra or {})


BUILTIN_TASKS = ("mnist-cnn", "mnist-2nn", "mlp", "logreg")  # hfl.models.zoo


class AgentSection(_Section):
    aggregator: str
    device: str = "auto"
    tasks: list[str] = Field(default=list(BUILTIN_TASKS), min_length=1, description="the "
                             "tasks this board may run: entry-point names or module:Attr")
    datasets: dict[str, DatasetSection] = Field(min_length=1)
    state_dir: Path = Field(default=Path("state"), description="files the tasks keep across "
                            "restarts (a live window)")

    def task_set(self) -> TaskSet:
        from hfl.models.tasks import TaskSet

        return TaskSet(self.tasks)


class CoordinatorSection(_Section):
    state_dir: Path = Path("state")
    tasks: list[str] | None = Field(default=None, description="the tasks jobs may use "
                                    "(empty: every task installed)")

    def task_set(self) -> TaskSet:
        from hfl.models.tasks import TaskSet  # torch: only the roles that train or export load it

        return TaskSet(self.tasks) if self.tasks is not None else TaskSet.everything_installed()


class AggregatorSection(_Section):
    state_dir: Path = Field(default=Path("state"), description="checkpoints of the rounds "
                            "under way, so a restart resumes them")


class MetricsSection(_Section):
    port: int | None = Field(default=None, ge=1, le=65535,
                             description="serve Prometheus metrics here (off when absent)")
    host: str = Field(default="127.0.0.1", description="the metrics endpoint's address "
                      "(0.0.0.0 to be scraped from elsewhere)")
    telemetry_s: float = Field(default=5.0, ge=0, le=3600, description="publish telemetry "
                               "for hfl status at most this often (0: never)")


class Config(_Section):
    prefix: str = DEFAULT_PREFIX
    max_payload: int = Field(default=DEFAULT_MAX_PAYLOAD, ge=4096, le=256 * 1024 * 1024)
    identity: IdentitySection
    broker: BrokerSection = BrokerSection()
    agent: AgentSection | None = None
    aggregator: AggregatorSection | None = None
    coordinator: CoordinatorSection | None = None
    metrics: MetricsSection = MetricsSection()

    @property
    def topics(self) -> Topics:
        return Topics(self.prefix)

    @property
    def device(self) -> DeviceFiles:
        return DeviceFiles(self.identity.dir, self.identity.id)

    def broker_settings(self) -> BrokerSettings:
        b = self.broker
        settings = BrokerSettings(host=b.host, port=b.port, keepalive=b.keepalive,
                                  session_expiry=b.session_expiry)
        if b.tls:
            d = self.device
            settings = replace(settings, ca=str(d.ca), cert=str(d.cert), key=str(d.tls_key))
        return settings


def load_config(path: Path) -> Config:
    """Read and validate a TOML config; any problem is a ValueError naming file and field."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    try:
        cfg = Config.model_validate(doc)
    except ValidationError as e:
        raise ValueError(f"{path}: {short_error(e)}") from None
    return _resolve(cfg, path.parent)


def _resolve(cfg: Config, base: Path) -> Config:
    """Make relative paths relative to the config file, not to the working directory."""

    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p)

    cfg.identity.dir = fix(cfg.identity.dir)  # type: ignore[assignment]
    if cfg.agent:
        cfg.agent.state_dir = fix(cfg.agent.state_dir)  # type: ignore[assignment]
        for ds in cfg.agent.datasets.values():
            ds.path = fix(ds.path)
    for section in (cfg.coordinator, cfg.aggregator):
        if section:
            section.state_dir = fix(section.state_dir)  # type: ignore[assignment]
    return cfg
