"""`hfl`: the umbrella command. Each role's commands are mounted here, beside the fleet's
own: keys, broker, demo, simulate, version, and the operator's status, jobs, models and
dashboard."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import hfl
from aggregator.cli import app as aggregator_app
from coordinator import cli as coordinator_cli
from edge_agent.cli import app as agent_app
from fleet.ops import ops_cli, pki_cli
from hfl.cli import VerboseOption, fail, setup_logging, table_console

if TYPE_CHECKING:  # torch comes with it: only the commands that train load it
    from fleet.sim.follow import RoundRow

app = typer.Typer(
    help="hfl: hierarchical federated learning for edge fleets over MQTT.\n\n"
    "Agents train on data that never leaves the board, aggregators sum their updates per "
    "site, the coordinator averages the sites and publishes each model version to apps.",
    no_args_is_help=True,
)
app.add_typer(agent_app, name="agent")
app.add_typer(aggregator_app, name="aggregator")
app.add_typer(coordinator_cli.app, name="coordinator")
app.add_typer(pki_cli.app, name="pki")

console = Console()


def versions() -> dict[str, str]:
    """What a bug report from a board needs: hfl, Python, the native libraries, the machine."""
    import platform
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    import torch

    out = {"hfl": f"{hfl.__version__} ({hfl.__released__})",
           "python": f"{platform.python_version()} ({platform.python_implementation()})"}
    for name in ("torch", "onnxruntime", "paho-mqtt", "cryptography"):
        try:
            out[name] = dist_version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    out["machine"] = f"{platform.machine()} ({platform.system()} {platform.release()})"
    cuda = torch.cuda.is_available()
    out["cuda"] = (f"yes: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})" if cuda
                   else f"no (torch built for CUDA {torch.version.cuda})" if torch.version.cuda
                   else "no (CPU build of torch)")
    return out


@app.command()
def version() -> None:
    """Print the versions of hfl, Python and its native libraries, the machine and CUDA."""
    for name, v in versions().items():
        typer.echo(f"{name + ':':<14}{v}")


def progress_bar(total: int) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, transient=False,
    )


def _num(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None or v != v else format(v, fmt)  # v != v: NaN, nothing measured


def rounds_table(rows: list[RoundRow]) -> Table:
    """One row per version: the app's held-out loss and the task's metrics (onnxruntime),
    then the agents' own (federated) evaluation of the model they started from."""
    names = list(dict.fromkeys(k for r in rows for k in (*r.metrics, *r.federated)))
    declines = any(r.declines for r in rows)
    jobs = len({r.job for r in rows}) > 1  # one job: its name is in the lines below
    table = Table(*(["job"] if jobs else []), "round", "loss", *names, "agents", "dropped",
                  *(["declined"] if declines else []), "train loss", "fed. loss",
                  *(f"fed. {n}" for n in names), "ε",
                  title="global rounds (loss and metrics on held-out data, via onnxruntime)")
    for r in rows:
        table.add_row(*([r.job] if jobs else []), str(r.round), _num(r.loss),
                      *(_num(r.metrics.get(n)) for n in names),
                      str(r.agents), str(r.dropped), *([str(r.declines)] if declines else []),
                      _num(r.train_loss), _num(r.federated_loss),
                      *(_num(r.federated.get(n)) for n in names), _num(r.epsilon, ".2f"))
    return table


def missing_lines(rounds: list[dict]) -> list[str]:
    """The sites versions were made without, by site and reason, with those versions."""
    by: dict[tuple[str, str], list[int]] = {}
    for r in rounds:
        for site, why in sorted((r.get("missing") or {}).items()):
            by.setdefault((site, why), []).append(r["round"])
    return [f"{site} missing from {len(vs)} of {len(rounds)} versions ({_spans(vs)}): {why}"
            for (site, why), vs in by.items()]


def _spans(vs: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    out: list[list[int]] = []
    for v in sorted(vs):
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def headline(r: RoundRow) -> str:
    """A version's score in a few words: the task's first metric on held-out data (or the
    agents' own evaluation when the app has none), else the loss."""
    for values, loss in ((r.metrics, r.loss), (r.federated, r.federated_loss)):
        if values:
            name, v = next(iter(values.items()))
            return f"{name} {v:.3f}"
        if loss == loss:
            return f"loss {loss:.4g}"
    return f"train loss {r.train_loss:.4g}"


def run_and_report(cfg, out: Path, report: Path | None, title: str, verbose: bool) -> None:
    """Run a simulated fleet with a progress bar, then print the table, plot and paths."""
    from fleet.sim.report import plot_rounds, write_json
    from fleet.sim.simulate import run, summary

    setup_logging(verbose, quiet=not verbose)
    rounds = cfg.rounds
    spec = cfg.spec(["check"])
    dp = spec.privacy
    memory = cfg.fleet.network == "memory"
    guards = [g for g, on in (("in-memory network", memory),
                              ("TLS + ACL", cfg.fleet.tls and not memory),
                              ("SecAgg+", spec.secagg.enabled),
                              (f"DP (ε ≤ {dp.epsilon:g}, δ = {dp.delta:g})" if dp else "",
                               dp is not None)) if on]
    console.print(f"[bold]{title}[/]: task {spec.task}, {cfg.fleet.aggregators} aggregators, "
                  f"{cfg.fleet.agents} agents, {rounds} rounds, "
                  f"{' and '.join(guards) or 'no TLS, no secure aggregation'}, "
                  f"working in {out}/")
    try:
        with progress_bar(rounds) as progress:
            bar = progress.add_task("training", total=rounds)

            def on_row(r: RoundRow) -> None:
                progress.update(bar, completed=r.round,
                                description=f"round {r.round}: {headline(r)}")

            outcome, fleet, secs = run(cfg, out, on_row=on_row)
    except (RuntimeError, ValueError) as e:  # no broker binary, bad data path, a bad task
        fail(str(e))
    doc = summary(cfg, outcome, fleet, secs)
    console.print(rounds_table(outcome.rows))
    for line in missing_lines(doc["rounds"]):
        console.print(f"[yellow]{escape(line)}[/]")
    if outcome.rows:
        console.print(f"plot:         {plot_rounds(outcome.rows, out / 'metrics.png', title)}")
    if doc["onnx"]:
        console.print(f"ONNX model:   {doc['onnx']}\nsafetensors:  {doc['safetensors']}")
    for job, st in doc["jobs"].items():
        console.print(f"job {job}: {st['state']} ({st['reason']}) in {secs:.1f} s")
    if doc["rejections"]:
        console.print(f"rejected messages: {doc['rejections']}")
    if report:
        write_json(report, doc)
        console.print(f"report: {report}")
    if not outcome.rows or any(s["state"] in ("failed", "refused")
                               for s in doc["jobs"].values()):
        fail("the job did not complete")
    console.print(f"[bold green]final {headline(outcome.rows[-1])}[/]")


OutOption = Annotated[Path, typer.Option(help="Working folder: keys, broker, registry, plot.")]
ReportOption = Annotated[Path | None, typer.Option(help="Also write the run as JSON here.")]


@app.command()
def demo(
    out: OutOption = Path("hfl-demo"),
    rounds: Annotated[int | None, typer.Option(
        min=1, help="Global rounds (model versions) [default: 15, or 12 with --no-dp].")] = None,
    dp: Annotated[bool, typer.Option(help="Differential privacy at ε = 8 (100 agents); "
                                          "--no-dp: 6 agents on non-IID data.")] = True,
    report: ReportOption = None,
    seed: Annotated[int, typer.Option(help="Seed for the data split and model init.")] = 0,
    verbose: VerboseOption = False,
) -> None:
    """Run the whole stack here: a fleet CA, a Mosquitto broker with TLS and ACLs, a
    coordinator, 2 aggregators with their agents on shares of digits (secure aggregation,
    and client-level DP unless --no-dp), and an app that scores every model version."""
    from fleet.sim.simulate import demo_config

    run_and_report(demo_config(rounds, seed, private=dp), out, report, "hfl demo on digits",
                   verbose)


@app.command()
def simulate(
    config: Annotated[Path, typer.Argument(help="The simulation's TOML config.")],
    out: OutOption = Path("hfl-sim"),
    report: ReportOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Run a fleet described by a TOML config (agents, aggregators, data, partitioning,
    model request) over a real broker on this machine; see examples/simulate-*.toml."""
    from fleet.sim.simulate import load_sim_config

    try:
        cfg = load_sim_config(config)
    except ValueError as e:
        fail(str(e))
    run_and_report(cfg, out, report, f"hfl simulate {config.name}", verbose)


@app.command()
def privacy(
    config: Annotated[Path, typer.Argument(help="A simulation TOML config with "
                                                "[model.privacy].")],
    plot: Annotated[Path, typer.Option(help="Where to write the PNG plot.")] = Path(
        "privacy.png"),
) -> None:
    """Before a DP job runs: the noise it will use and the ε it spends round by round.

    Uses the same calibration and accounting as the coordinator (dp-accounting, worst case
    over agents, each group's real sampling rate)."""
    from coordinator.budget import Budget, sampling_rate
    from fleet.sim.report import plot_epsilon
    from fleet.sim.simulate import group_members, load_sim_config
    from hfl.privacy.accounting import epsilon_curve

    try:
        cfg = load_sim_config(config)
        members = group_members(cfg)
        spec = cfg.spec(sorted(members))
        if spec.privacy is None:
            raise ValueError(f"{config}: no [model.privacy] section, the job is not "
                             "differentially private")
        budget = Budget(spec, members.__getitem__)
    except ValueError as e:
        fail(str(e))
    p = budget.privacy
    q = max(sampling_rate(spec, len(m)) for m in members.values())
    steps = epsilon_curve(budget.z, q, spec.rounds * spec.kappa1, p.delta, p.accountant)
    curve = steps[spec.kappa1 - 1 :: spec.kappa1]  # after each global round
    console.print(f"noise multiplier z = {budget.z:.3f}, sampling rate q = {q:.3f}, "
                  f"{spec.rounds * spec.kappa1} edge rounds, {p.mode} noise, clip S = "
                  f"{p.clip:g}, δ = {p.delta:g}, {p.accountant.upper()} accounting")
    table = Table("round", "ε", title="ε spent after each global round")
    for i, eps in enumerate(curve, start=1):
        table.add_row(str(i), f"{eps:.3f}")
    console.print(table)
    console.print(f"target ε = {p.epsilon:g}; the job stops before a round that would "
                  f"exceed it. Plot: {plot_epsilon(curve, plot, f'hfl privacy {config.name}')}")


@app.command()
def tasks(
    ref: Annotated[list[str] | None, typer.Argument(
        help="Also these tasks, by entry-point name or module:Attribute.")] = None,
) -> None:
    """List the tasks installed here (the entry points of group hfl.tasks) and any named:
    version, where the code is, the metrics it reports and the options it takes."""
    from hfl.models.tasks import installed, load
    from hfl.task import TaskError

    table = Table("task", "version", "code", "metrics", "options",
                  title="tasks (docs/tasks.md: how to write one)")
    for name in [*installed(), *(ref or [])]:
        try:
            cls = load(name)
        except TaskError as e:
            table.add_row(name, "-", f"[red]{e}[/]", "", "")
            continue
        metrics = ", ".join(f"{m.name} ({m.better} is better)" for m in cls.metrics) or "-"
        table.add_row(cls.name, cls.version, f"{cls.__module__}:{cls.__qualname__}", metrics,
                      ", ".join(cls.Options.model_fields) or "-")
    table_console().print(table)


# The operator's view: the same listings as `hfl coordinator jobs/models`, and the live ones.
app.command("jobs")(coordinator_cli.jobs)
app.command("models")(coordinator_cli.models)
app.command("status")(ops_cli.status)
app.command("dashboard")(ops_cli.dashboard)


def main() -> None:
    # `module:Attribute` task references from a config or the command line are found in the
    # current folder too, as for a script run here (services do not: hfl-agent and friends
    # import only what is installed).
    sys.path.insert(0, os.getcwd())
    app()
