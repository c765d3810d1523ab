"""Flower's side of bench/overhead.py: run with Flower's own venv, never imported by hfl.

    bench/.venv-flower/bin/python bench/overhead_flower.py server --port 9092 -P 100000 -N 10
    bench/.venv-flower/bin/python bench/overhead_flower.py clients --port 9092 -P 100000 -N 10

(with TLS: --ca, --cert and --key to the server, --ca to the clients).

The server is Flower's legacy gRPC server (`start_server`, FedAvg, fit on every client, no
evaluation); it prints one JSON line: seconds of each round (round 1 from the end of its
configure_fit, once all N are connected; each later one from the end of the one before),
its CPU seconds over those rounds and its peak RSS. The clients are N `NumPyClient`s as
threads of one process that return the round model plus a fixed delta, with no training —
the same work hfl's agents do in bench/overhead.py. The strategy and the client are those
of bench/flower_app, which runs the same work on Flower's deployment engine (SecAgg+).
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import flwr as fl
import numpy as np
from flower_app.overhead_app import DELTA, FixedDelta, Timed


def server(args: argparse.Namespace) -> None:
    strategy = Timed(args.P, args.N)
    certificates = None
    if args.ca:
        certificates = tuple(Path(p).read_bytes() for p in (args.ca, args.cert, args.key))
    fl.server.start_server(server_address=f"127.0.0.1:{args.port}", strategy=strategy,
                           config=fl.server.ServerConfig(num_rounds=args.rounds),
                           certificates=certificates)
    print(json.dumps(strategy.report()), flush=True)


def clients(args: argparse.Namespace) -> None:
    delta = np.full(args.P, DELTA, np.float32)  # one array, shared read-only by every client
    address = f"127.0.0.1:{args.port}"
    ca = Path(args.ca).read_bytes() if args.ca else None
    threads = [threading.Thread(target=fl.client.start_client, daemon=True,
                                kwargs={"server_address": address, "root_certificates": ca,
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
    ap.add_argument("--ca", help="TLS: the CA certificate (PEM) the server's chains to")
    ap.add_argument("--cert", help="TLS: the server's certificate (PEM)")
    ap.add_argument("--key", help="TLS: the server's private key (PEM)")
    args = ap.parse_args()
    {"server": server, "clients": clients}[args.role](args)
