"""`hfl-agent` (also `hfl agent`): the client layer's service and its pre-flight check."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hfl.cli import ConfigOption, VerboseOption, fail, open_config, setup_logging
from hfl.runtime.service import serve
from hfl.wire.messages import Role

if TYPE_CHECKING:
    from edge_agent.check import Check

app = typer.Typer(help="The client layer: train on local data, send updates to the aggregator.",
                  no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Keeps the subcommand on the command line (`hfl-agent run -c ...`) with one command."""


@app.command()
def run(config: ConfigOption, verbose: VerboseOption = False) -> None:
    """Serve as an agent: train each round the aggregator opens for us."""
    setup_logging(verbose)
    cfg, identity, roster, feed = open_config(config, Role.AGENT, "agent")
    assert cfg.agent is not None
    # torch and the tasks load here, not for every `hfl` command.
    from edge_agent.runner import agent_node, board_data
    from hfl.data import stop_live
    from hfl.task import TaskError

    try:
        tasks = cfg.agent.task_set()
    except TaskError as e:
        fail(str(e))
    data = board_data(cfg.agent.datasets, cfg.agent.state_dir)
    node, machine = agent_node(identity, roster, cfg.broker_settings(), cfg.topics,
                               cfg.agent.aggregator, tasks, data, device=cfg.agent.device,
                               max_payload=cfg.max_payload, feed=feed)
    try:
        code = serve(node, machine, device_dir=cfg.device.dir, metrics=cfg.metrics)
    finally:
        stop_live()  # the live sources' windows: what they hold pending is written
    raise typer.Exit(code)


MARKS = {"pass": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]",
         "skip": "[dim]skip[/]"}


def verdict_table(checks: list[Check]) -> Table:
    table = Table("", "check", "result", "fix", title="hfl agent check")
    for c in checks:
        table.add_row(MARKS[c.verdict], escape(c.name), escape(c.detail), escape(c.hint))
    return table


@app.command()
def check(
    config: ConfigOption,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for the broker.")] = 10,
) -> None:
    """Check this board before (or instead of) serving: config, keys, roster, certificate,
    clock, broker over TLS, data, device. Exit code 0 when nothing failed."""
    from edge_agent.check import passed, run_checks

    checks = run_checks(config, timeout=timeout)
    console = Console(width=max(Console().width, 120))
    console.print(verdict_table(checks))
    failed = [c.name for c in checks if c.verdict == "fail"]
    if passed(checks):
        console.print("[bold green]ready to serve[/]")
    else:
        console.print(f"[bold red]not ready[/]: {', '.join(failed)}")
    raise typer.Exit(0 if passed(checks) else 1)


def main() -> None:
    app()
