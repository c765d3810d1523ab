"""`hfl-agent` (also `hfl agent`): the client layer's service."""

from __future__ import annotations

import typer

from edge_agent.runner import agent_node, load_local
from hfl.cli import ConfigOption, VerboseOption, open_config, setup_logging
from hfl.messages import Role
from hfl.service import serve

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
    data = {name: load_local(ds) for name, ds in cfg.agent.datasets.items()}
    node, machine = agent_node(identity, roster, cfg.broker_settings(), cfg.topics,
                               cfg.agent.aggregator, data, device=cfg.agent.device,
                               max_payload=cfg.max_payload, feed=feed)
    raise typer.Exit(serve(node, machine, device_dir=cfg.device.dir))


def main() -> None:
    app()
