"""Flower's side of bench/overhead.py: run with Flower's own venv, never imported by hfl.

    bench/.venv-flower/bin/python bench/overhead_flower.py server --port 9092 -P 100000 -N 10
    bench/.venv-flower/bin/python bench/overhead_flower.py clients --port 9092 -P 100000 -N 10

The server is Flower's gRPC server (`start_server`, FedAvg, fit on every client, no
evaluation); it prints one JSON line: seconds of each round (round 1 from the end of its
configure_fit, once all N are connected; each later one from the end of the one before),
its CPU seconds over those rounds and its peak RSS. The clients are N `NumPyClient`s as
threads of one process that return the round model plus a fixed delta, with no training —
the same work hfl's agents do in bench/overhead.py.
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time

import flwr as fl
import numpy as np

SAMPLES = 600


class Timed(fl.server.strategy.FedAvg):
    """FedAvg that notes when the first round starts (its clients sampled: all connected)
    and when each round's aggregate ends."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.start = self.cpu = self.cpu_end = 0.0
        self.ends: list[float] = []

    def configure_fit(self, server_round, parameters, client_manager):
        out = super().configure_fit(server_round, parameters, client_manager)
        if server_round == 1:
            self.start, self.cpu = time.perf_counter(), time.process_time()
        return out

    def aggregate_fit(self, server_round, results, failures):
        out = super().aggregate_fit(server_round, results, failures)
        if failures:
            raise RuntimeError(f"round {server_round}: {len(failures)} failures")
        self.ends.append(time.perf_counter())
        self.cpu_end = time.process_time()
        return out


class FixedDelta(fl.client.NumPyClient):
    def __init__(self, delta: np.ndarray) -> None:
        self.delta = delta

    def fit(self, parameters, config):
        return [parameters[0] + self.delta], SAMPLES, {}


def server(args: argparse.Namespace) -> None:
    strategy = Timed(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=args.N,
                     min_available_clients=args.N, min_evaluate_clients=0,
                     initial_parameters=fl.common.ndarrays_to_parameters(
                         [np.zeros(args.P, np.float32)]))
    fl.server.start_server(server_address=f"127.0.0.1:{args.port}", strategy=strategy,
                           config=fl.server.ServerConfig(num_rounds=args.rounds))
    marks = [strategy.start, *strategy.ends]
    print(json.dumps({"rounds": [b - a for a, b in zip(marks, marks[1:], strict=False)],
                      "cpu": strategy.cpu_end - strategy.cpu,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}),
          flush=True)


def clients(args: argparse.Namespace) -> None:
    delta = np.full(args.P, 1e-3, np.float32)  # one array, shared read-only by every client
    address = f"127.0.0.1:{args.port}"
    threads = [threading.Thread(target=fl.client.start_client, daemon=True,
                                kwargs={"server_address": address,
                                        "client": FixedDelta(delta).to_client()})
               for _ in range(args.N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("role", choices=["server", "clients"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("-P", type=int, required=True)
    ap.add_argument("-N", type=int, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    {"server": server, "clients": clients}[args.role](args)
