"""The operator's commands on the umbrella `hfl`: `status` (a live terminal view of the
fleet) and `dashboard` (the same and the registry's curves, as a web page). Both connect
as an observer: `hfl pki issue PKI ops --role observer` makes its device folder, and a
config names it and the broker (examples/services/observer.toml)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live

from coordinator.cli import StateDirOption, open_registry
from fleet.ops.dashboard import Dashboard, finite, serve_dashboard
from fleet.ops.view import render
from fleet.ops.watch import Watch
from hfl.cli import (
    VerboseOption,
    fail,
    open_config,
    setup_logging,
    table_console,
)
from hfl.wire.messages import Role

ObserverConfig = Annotated[Path, typer.Option(
    "--config", "-c", help="The observer's TOML config: its identity and the broker "
    "(examples/services/observer.toml).")]
WaitOption = Annotated[float, typer.Option(min=0.5, help="Seconds to wait for the broker "
                                                         "and its retained messages.")]


def open_watch(config: Path, wait: float) -> Watch:
    """Connect as the observer the config names, or stop with what to fix."""
    cfg, identity, roster, feed = open_config(config, Role.OBSERVER)
    watch = Watch(identity, roster, cfg.broker_settings(), cfg.topics, feed)
    try:
        watch.start(wait)
    except ConnectionError as e:
        fail(f"{identity.id}: {e}")
    return watch


def status(
    config: ObserverConfig,
    once: Annotated[bool, typer.Option("--once", help="Print one snapshot and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one snapshot as JSON and "
                                                         "exit.")] = False,
    agents: Annotated[bool, typer.Option("--agents", help="List every agent too.")] = False,
    refresh: Annotated[float, typer.Option(min=0.1, help="Seconds between redraws.")] = 1.0,
    wait: WaitOption = 10.0,
    verbose: VerboseOption = False,
) -> None:
    """The fleet, live: who is online, offline, lost or stale, each job's state, version, ε
    and the sites missing from it, each aggregator's round and stage, rounds, updates,
    rejected messages by reason, and what is failing and since when (health).

    Connects as an observer (an identity with role observer, see `hfl pki issue`)."""
    setup_logging(verbose, quiet=not verbose)
    watch = open_watch(config, wait)
    console = table_console()
    try:
        if once or as_json:
            watch.settle(timeout=wait)
            snap = watch.snapshot()
            if as_json:
                typer.echo(json.dumps(finite(snap), indent=1))
            else:
                console.print(render(snap, agents))
            return
        with Live(render(watch.snapshot(), agents), console=console, auto_refresh=False) as live:
            while True:
                watch.pump(refresh)
                live.update(render(watch.snapshot(), agents), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        watch.stop()


def dashboard(
    config: ObserverConfig,
    state_dir: StateDirOption = Path("state"),
    host: Annotated[str, typer.Option(help="Address to serve on (0.0.0.0: every "
                                           "interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8080,
    refresh: Annotated[float, typer.Option(min=0.2, help="Seconds between the page's "
                                                         "updates.")] = 2.0,
    wait: WaitOption = 10.0,
    verbose: VerboseOption = False,
) -> None:
    """Serve a read-only web page: jobs, accuracy and ε curves per model (from the
    coordinator's registry in --state-dir) and each site's health (from the status and
    telemetry topics, as an observer), updated live."""
    setup_logging(verbose)
    registry = open_registry(state_dir)
    watch = open_watch(config, wait)
    watch.run_in_thread()
    try:
        server = serve_dashboard(Dashboard(registry, watch.snapshot, refresh), host, port)
    except OSError as e:
        watch.stop()
        registry.close()
        fail(f"cannot serve on {host}:{port}: {e}")
    url = f"http://{host}:{server.server_port}/"
    typer.echo(f"hfl dashboard on {url} (read-only; Ctrl-C to stop)")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        watch.stop()
        registry.close()
