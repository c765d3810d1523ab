"""The FedAvg paper's MNIST CNN (McMahan et al. 2017, Table 2) through the whole stack.

    .venv/bin/python bench/fedavg_mnist.py                        # IID, lr grid, ≤ 20 rounds
    .venv/bin/python bench/fedavg_mnist.py --partition shards     # pathological non-IID, ≤ 229
    .venv/bin/python bench/fedavg_mnist.py --quick                # 2 rounds of 20 agents

The setting is `examples/simulate-mnist.toml`: 100 agents of 600 samples (IID shares, or
2 label-sorted shards of 300 each), 2 aggregators, C = 0.1, E = 5, B = 10, the paper's CNN
(1,663,370 parameters), SecAgg+ on, over a TLS Mosquitto with the roster's ACL. As in the
paper only the learning rate is tuned, on a grid; each run stops at the round whose model
first reaches the target on the 10,000 MNIST test images (scored by the app with
onnxruntime), or after `--rounds`. Writes `fedavg_mnist_{partition}.json` and `.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fleet.sim.follow import RoundRow
from fleet.sim.report import plot_curves, write_json
from fleet.sim.simulate import load_sim_config, run

HERE = Path(__file__).resolve().parent
SETTING = HERE.parent / "examples" / "simulate-mnist.toml"
PAPER_ROUNDS = {"iid": 20, "shards": 229}  # Table 2, CNN, E = 5, B = 10, to 99 %


class Reached(Exception):
    """The target accuracy was reached: the run stops there."""


def one_run(args: argparse.Namespace, lr: float, save: Callable[[dict], None]) -> dict:
    """Train with learning rate `lr` until the target or `--rounds`; `save` gets the result
    so far after every round, so a run cut short still leaves its curve."""
    cfg = load_sim_config(SETTING)
    cfg.data.path = args.data
    if cfg.test is not None:
        cfg.test.path = args.data
    cfg.data.partition = args.partition
    cfg.seed = args.seed  # the partition, the initial model, agent sampling, local shuffling
    cfg.fleet.agents, cfg.timeout = args.agents, args.rounds * 900
    cfg.model.update(lr=lr, rounds=args.rounds, min_agents=max(1, round(
        cfg.model["client_fraction"] * args.agents / cfg.fleet.aggregators)))
    if args.int8:  # int8 updates are for plain rounds: SecAgg+ masks 32-bit fixed point
        cfg.model.update(compression="int8", secagg={"enabled": False})
    rows: list[RoundRow] = []
    stamps: list[float] = []
    t0 = time.perf_counter()

    def result(ended: str) -> dict:
        gaps = sorted(b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True))
        return {
            "lr": lr,
            "ended": ended,
            "rounds_to_target": next(
                (r.round for r in rows if r.metrics["accuracy"] >= args.target), None),
            "rounds_run": len(rows),
            "best_accuracy": max((r.metrics["accuracy"] for r in rows), default=None),
            "accuracy_per_round": [r.metrics["accuracy"] for r in rows],
            "agents_per_round": [r.agents for r in rows],
            "seconds": round(time.perf_counter() - t0, 1),
            "seconds_per_round_median": round(gaps[len(gaps) // 2], 1) if gaps else None,
        }

    def on_row(row: RoundRow) -> None:
        rows.append(row)
        stamps.append(time.perf_counter())
        print(f"  lr {lr:g} round {row.round}: accuracy {row.metrics['accuracy']:.4f} "
              f"({row.agents} agents)", flush=True)
        save(result("running"))
        if row.metrics["accuracy"] >= args.target:
            raise Reached

    ended = "target reached"
    with tempfile.TemporaryDirectory(prefix="hfl-fedavg-") as work:
        try:
            outcome = run(cfg, Path(work), on_row=on_row)[0]
            ended = "; ".join(f"{s.meta.state}: {s.meta.reason}" for s in outcome.status.values())
        except Reached:
            pass
    return result(ended)


def plot(doc: dict, path: Path) -> None:
    """The accuracy curve of each learning rate, the target line, the paper's figure."""
    a = doc["settings"]
    target = a["target"]
    curves = {f"lr {r['lr']:g}: " + (f"{target:.0%} at round {r['rounds_to_target']}"
                                     if r["rounds_to_target"] else
                                     f"best {r['best_accuracy']:.4f} in {r['rounds_run']}")
              : r["accuracy_per_round"] for r in doc["results"]}
    plot_curves(curves, path,
                f"FedAvg, MNIST CNN through hfl: {a['partition']}, {a['agents']} agents, "
                f"2 aggregators, {'int8 updates' if a.get('int8') else 'SecAgg+'}, TLS\n"
                f"C = 0.1, E = 5, B = 10; the paper reaches {target:.0%} in "
                f"{doc['paper_rounds']} rounds", (target, f"target {target:.0%}"),
                ylim=(0.9, 1.0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "mnist",
                    help="folder of the MNIST IDX files, gzipped or not")
    ap.add_argument("--out", type=Path, default=HERE, help="where the JSON and PNG go")
    ap.add_argument("--partition", choices=("iid", "shards"), default="iid")
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.1, 0.2],
                    help="the learning-rate grid")
    ap.add_argument("--rounds", type=int, help="at most (default: the paper's figure)")
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--seed", type=int, default=0, help="the simulation's seed (default 0)")
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--int8", action="store_true",
                    help="int8 update compression (SecAgg+ off): its accuracy cost")
    ap.add_argument("--quick", action="store_true", help="60 agents, 2 rounds, one lr")
    args = ap.parse_args(argv)
    paper = PAPER_ROUNDS[args.partition]
    args.rounds = args.rounds or paper
    if args.quick:
        args.agents, args.rounds, args.lrs = 60, 2, args.lrs[:1]  # SecAgg+ needs 3 a group

    t0 = time.perf_counter()
    name = f"fedavg_mnist_{args.partition}{'_int8' if args.int8 else ''}"
    doc = {
        "command": " ".join(["bench/fedavg_mnist.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"python {platform.python_version()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "setting": str(SETTING.relative_to(HERE.parent)),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "paper_rounds": paper,
    }
    results: list[dict] = []

    def save(current: dict | None = None) -> None:
        doc.update(seconds=round(time.perf_counter() - t0, 1),
                   results=results + ([current] if current else []))
        write_json(args.out / f"{name}.json", doc)

    for lr in args.lrs:
        results.append(one_run(args, lr, save))
        r = results[-1]
        print(f"lr {lr:g}: {args.target:.0%} at round {r['rounds_to_target']} (best "
              f"{r['best_accuracy']} in {r['rounds_run']} rounds, {r['ended']}), "
              f"{r['seconds_per_round_median']} s/round", flush=True)
    save()
    plot(doc, args.out / f"{name}.png")
    print(json.dumps([{k: r[k] for k in ("lr", "rounds_to_target", "best_accuracy",
                                         "seconds_per_round_median")} for r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
