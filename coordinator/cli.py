"""`hfl-coordinator` (also `hfl coordinator`): serves the application layer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from coordinator.registry import Registry
from coordinator.runner import coordinator_node
from hfl.cli import ConfigOption, VerboseOption, fail, open_config, setup_logging
from hfl.messages import Role
from hfl.service import serve
from hfl.state import StateError

app = typer.Typer(help="The coordinator: turn app requests into jobs, average partials, "
                  "publish model versions.", no_args_is_help=True)


@app.command()
def run(config: ConfigOption, verbose: VerboseOption = False) -> None:
    """Serve as the coordinator."""
    setup_logging(verbose)
    cfg, identity, roster, feed = open_config(config, Role.COORDINATOR, "coordinator")
    assert cfg.coordinator is not None
    try:
        node, machine, registry = coordinator_node(identity, roster, cfg.broker_settings(),
                                                   cfg.topics, cfg.coordinator.state_dir,
                                                   max_payload=cfg.max_payload, feed=feed)
    except StateError as e:
        fail(str(e))
    try:
        code = serve(node, machine, device_dir=cfg.device.dir)
    finally:
        registry.close()
    raise typer.Exit(code)


@app.command()
def models(
    state_dir: Annotated[Path, typer.Option(help="The coordinator's state directory.")] = Path(
        "state"),
) -> None:
    """List model versions in the registry, with metrics and file paths."""
    reg_dir = state_dir / "registry"
    if not (reg_dir / "registry.sqlite").is_file():
        raise typer.BadParameter(f"no registry under {state_dir}", param_hint="--state-dir")
    reg = Registry(reg_dir)
    table = Table("job", "version", "train loss", "fed. accuracy", "onnx")
    for v in reg.versions():
        table.add_row(v.job, str(v.version), f"{v.metrics.get('train_loss', 0):.4f}",
                      f"{v.metrics.get('eval_accuracy', 0):.3f}", str(v.onnx))
    reg.close()
    Console().print(table)


def main() -> None:
    app()
