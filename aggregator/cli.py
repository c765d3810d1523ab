"""`hfl-aggregator` (also `hfl aggregator`): the aggregation layer's service."""

from __future__ import annotations

import logging

import typer

from aggregator.runner import aggregator_node
from hfl.cli import ConfigOption, VerboseOption, fail, open_config, setup_logging
from hfl.runtime.service import serve
from hfl.runtime.state import StateError
from hfl.wire.messages import Role

app = typer.Typer(help="The aggregation layer: run edge rounds for a site's agents.",
                  no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Keeps the subcommand on the command line (`hfl-aggregator run -c ...`) with one command."""


@app.command()
def run(config: ConfigOption, verbose: VerboseOption = False) -> None:
    """Serve as an aggregator for the agents the roster enrols under our id."""
    setup_logging(verbose)
    cfg, identity, roster, feed = open_config(config, Role.AGGREGATOR)
    if cfg.aggregator is None:
        logging.getLogger("hfl.aggregator").warning(
            "%s: no [aggregator] state_dir: a restart loses the rounds under way", config)
    try:
        node, machine = aggregator_node(
            identity, roster, cfg.broker_settings(), cfg.topics, max_payload=cfg.max_payload,
            feed=feed, state_dir=cfg.aggregator.state_dir if cfg.aggregator else None)
    except StateError as e:
        fail(str(e))
    raise typer.Exit(serve(node, machine, device_dir=cfg.device.dir, metrics=cfg.metrics))


def main() -> None:
    app()
