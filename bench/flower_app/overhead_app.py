"""Flower's side of bench/overhead.py: the strategy and client both of its Flower runs use,
and the ServerApp and ClientApp of the run on Flower's deployment engine.

Runs in Flower's own venv (bench/.venv-flower), never imported by hfl. bench/overhead.py
starts a SuperLink and N SuperNodes and submits this app with `flwr run`; the SuperLink
runs the ServerApp in a process of its own, each SuperNode a ClientApp process per message.
The ServerApp writes one JSON object to the run config's `out`: the seconds of each round
(as `Timed` notes them), the CPU seconds over those rounds and the peak RSS of itself and
(`link_`) of the SuperLink with its SuperExec, and the mean of the final model (rounds ×
the delta if the sum came out right).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import flwr as fl
import numpy as np
from flwr.app import Context
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

DELTA, SAMPLES = 1e-3, 600


class Timed(fl.server.strategy.FedAvg):
    """FedAvg that notes when the first round starts (its clients sampled: all connected)
    and when each round's aggregate ends; `report` gives the figures as a dict."""

    def __init__(self, p: int, n: int) -> None:
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n,
                         min_available_clients=n, min_evaluate_clients=0,
                         initial_parameters=fl.common.ndarrays_to_parameters(
                             [np.zeros(p, np.float32)]))
        self.start = self.cpu = self.cpu_end = 0.0
        self.ends: list[float] = []
        self.final = None
        self.on_start = self.on_end = lambda: None  # hooks for other processes' clocks

    def configure_fit(self, server_round, parameters, client_manager):
        out = super().configure_fit(server_round, parameters, client_manager)
        if server_round == 1:
            self.start, self.cpu = time.perf_counter(), time.process_time()
            self.on_start()
        return out

    def aggregate_fit(self, server_round, results, failures):
        out = super().aggregate_fit(server_round, results, failures)
        if failures:
            raise RuntimeError(f"round {server_round}: {len(failures)} failures")
        self.ends.append(time.perf_counter())
        self.cpu_end = time.process_time()
        self.on_end()
        self.final = out[0]
        return out

    def report(self) -> dict:
        marks = [self.start, *self.ends]
        final = fl.common.parameters_to_ndarrays(self.final)[0]
        return {"rounds": [b - a for a, b in zip(marks, marks[1:], strict=False)],
                "cpu": self.cpu_end - self.cpu,
                "peak_rss": peak_rss("self"),
                "final_mean": float(final.mean())}


class FixedDelta(fl.client.NumPyClient):
    """Returns the round model plus a fixed delta, with no training."""

    def __init__(self, delta: np.ndarray) -> None:
        self.delta = delta

    def fit(self, parameters, config):
        return [parameters[0] + self.delta], SAMPLES, {}


def peak_rss(pid: int | str) -> int:
    """A process's own peak RSS. Not ru_maxrss: Linux carries that over from the parent
    across fork and exec, and bench/overhead.py's parent is far larger than Flower."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines()
                if line.startswith("VmHWM:"))


class Others:
    """CPU seconds (between two marks) and peak RSS of other processes, from /proc: the
    SuperLink and its SuperExec, the ServerApp's parent, the rest of Flower's server side."""

    def __init__(self, pids: list[int]) -> None:
        self.pids, self.cpu, self.start = pids, 0.0, 0.0

    def cpu_now(self) -> float:
        ticks = 0
        for pid in self.pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def mark_start(self) -> None:
        self.start = self.cpu_now()

    def mark_end(self) -> None:
        self.cpu = self.cpu_now() - self.start

    def peak_rss(self) -> int:
        return sum(peak_rss(pid) for pid in self.pids)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    strategy = Timed(int(cfg["P"]), int(cfg["N"]))
    link = Others([int(cfg["superlink-pid"]), os.getppid()])
    strategy.on_start, strategy.on_end = link.mark_start, link.mark_end
    fit = None
    if cfg["secagg"]:
        fit = SecAggPlusWorkflow(num_shares=int(cfg["num-shares"]),
                                 reconstruction_threshold=int(cfg["threshold"]),
                                 clipping_range=float(cfg["clipping-range"]))
    legacy = LegacyContext(context, fl.server.ServerConfig(num_rounds=int(cfg["rounds"])),
                           strategy)
    result: dict = {"error": "the ServerApp failed"}  # bench/overhead.py waits for a result
    try:
        DefaultWorkflow(fit_workflow=fit)(grid, legacy)
        result = {**strategy.report(), "link_cpu": link.cpu, "link_peak_rss": link.peak_rss()}
    except Exception as e:
        result["error"] = repr(e)
        raise
    finally:
        out = Path(str(cfg["out"]))
        out.with_suffix(".part").write_text(json.dumps(result))
        out.with_suffix(".part").replace(out)  # whole, for bench/overhead.py waiting on it


def _client(context: Context) -> fl.client.Client:
    return FixedDelta(np.full(int(context.run_config["P"]), DELTA, np.float32)).to_client()


def _secagg_if_asked(msg, context, call_next):
    """secaggplus_mod where the run asks for SecAgg+ (it expects its stages otherwise)."""
    if context.run_config["secagg"]:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


client_app = ClientApp(client_fn=_client, mods=[_secagg_if_asked])
