"""`hfl-coordinator` (also `hfl coordinator`): serves the application layer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from coordinator.registry import Registry
from hfl.cli import (
    ConfigOption,
    VerboseOption,
    fail,
    open_config,
    setup_logging,
    table_console,
)
from hfl.errors import TaskError
from hfl.runtime.service import serve
from hfl.runtime.state import StateError
from hfl.wire.messages import Role, evaluation_text

app = typer.Typer(help="The coordinator: turn app requests into jobs, average partials, "
                  "publish model versions.", no_args_is_help=True)


@app.command()
def run(config: ConfigOption, verbose: VerboseOption = False) -> None:
    """Serve as the coordinator."""
    setup_logging(verbose)
    cfg, identity, roster, feed = open_config(config, Role.COORDINATOR, "coordinator")
    assert cfg.coordinator is not None
    from coordinator.runner import coordinator_node  # torch and onnx: only to serve

    try:
        tasks = cfg.coordinator.task_set()
        node, machine, registry = coordinator_node(identity, roster, cfg.broker_settings(),
                                                   cfg.topics, cfg.coordinator.state_dir, tasks,
                                                   max_payload=cfg.max_payload, feed=feed)
    except (StateError, TaskError) as e:
        fail(str(e))
    try:
        code = serve(node, machine, device_dir=cfg.device.dir, metrics=cfg.metrics)
    finally:
        registry.close()
    raise typer.Exit(code)


StateDirOption = Annotated[Path, typer.Option(help="The coordinator's state directory.")]


def open_registry(state_dir: Path) -> Registry:
    if not (state_dir / "registry" / "registry.sqlite").is_file():
        raise typer.BadParameter(f"no registry under {state_dir}", param_hint="--state-dir")
    return Registry(state_dir / "registry")


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@app.command()
def models(state_dir: StateDirOption = Path("state")) -> None:
    """List model versions in the registry: metrics, ε spent and where the files are."""
    reg = open_registry(state_dir)
    try:
        versions = reg.versions()
    finally:
        reg.close()
    table = Table("job", "version", "agents", "train loss", "federated evaluation", "ε",
                  "created")
    table.add_column("onnx", overflow="fold")  # a path is no use cut short
    for v in versions:
        m = v.metrics
        table.add_row(v.job, str(v.version), _num(m.get("agents"), "d"),
                      _num(m.get("train_loss"), ".4f"), evaluation_text(m),
                      _num(m.get("epsilon"), ".2f"), _when(v.created), str(v.onnx))
    table_console().print(table)


@app.command()
def jobs(state_dir: StateDirOption = Path("state")) -> None:
    """List jobs in the registry: state, newest version, its evaluation and ε spent."""
    reg = open_registry(state_dir)
    try:
        rows = [(j, reg.versions(j["job"])) for j in reg.jobs()]
    finally:
        reg.close()
    table = Table("job", "model", "app", "state", "version", "federated evaluation", "ε",
                  "reason", "updated")
    for j, versions in rows:
        m = versions[-1].metrics if versions else {}
        table.add_row(j["job"], j["model"], j["app"], j["state"], str(j["version"]),
                      evaluation_text(m), _num(m.get("epsilon"), ".2f"), j["reason"],
                      _when(j["updated"]))
    table_console().print(table)


def main() -> None:
    app()
