"""What the task API costs per round: the MNIST CNN through hfl before and after, side by side.

    .venv/bin/python bench/task_api.py --data ../shared/data/mnist [--runs 3]

The same job runs on both code bases in separate processes, alternated (baseline first,
then the task API, then the baseline again, ...): 10 agents of 600 MNIST images (IID)
under 2 aggregators, the FedAvg paper's CNN, one local epoch of batches of 10, SecAgg+, on
the in-memory network (fleet.sim.memsim: the same machines, envelopes, sealing and torch
training as over MQTT, without the broker's noise). The baseline is the commit before the
task API (`--baseline-rev`), checked out with `git worktree` beside this one. Prints, per
code base, the median seconds per round over the runs and the spread, the agents' share of
it (the local round: evaluate, train, delta) and the ratio task API ÷ baseline, with the
machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASELINE_REV = "5503445"  # main before the task API
MODEL = {"input_shape": [1, 28, 28], "num_classes": 10}
SETTINGS = dict(rounds=3, epochs=1, batch_size=10, lr=0.05, min_agents=5, deadline_s=600)


def worker(data: str, agents: int, rounds: int) -> dict:
    """One job on whichever hfl is on the path; returns seconds per round and the agents'."""
    import torch

    from fleet.sim.inproc import FleetLayout
    from fleet.sim.memsim import MemFleet
    from fleet.sim.simulate import APP, DataSection, FleetSection, SimConfig, fleet_data

    torch.set_num_threads(1)
    settings = {**SETTINGS, "rounds": rounds}
    try:
        from fleet.sim.simulate import TestSection

        api = "task"
        cfg = SimConfig(fleet=FleetSection(aggregators=2, agents=agents),
                        data=DataSection(source="mnist", path=data, partition="iid",
                                         local_test_fraction=0.0),
                        test=TestSection(source="mnist", path=data, split="test"),
                        model=dict(task="mnist-cnn", options=MODEL, **settings))
        groups, test = fleet_data(cfg)
        fleet = MemFleet(FleetLayout(groups, apps=(APP,)), cfg.task_set())
    except ImportError:  # the code base before the task API
        api = "baseline"
        cfg = SimConfig(fleet=FleetSection(aggregators=2, agents=agents),
                        data=DataSection(source="mnist", path=data, partition="iid",
                                         local_test_fraction=0.0),
                        model=dict(arch="mnist-cnn", **MODEL, **settings))
        groups, test = fleet_data(cfg)
        fleet = MemFleet(FleetLayout(groups, apps=(APP,)))
    test = test.subset(list(range(1000)))  # the app's scoring is not what we compare
    spent = [0.0]
    trainers = fleet.trainers

    def timed(trainer):
        def call(t):
            t0 = time.perf_counter()
            try:
                return trainer(t)
            finally:
                spent[0] += time.perf_counter() - t0
        return call

    fleet.net.trainer = lambda agent, t: timed(trainers[agent])(t)
    t0 = time.perf_counter()
    run = fleet.run(cfg.spec(sorted(groups)), f"bench-{api}", test)
    seconds = time.perf_counter() - t0
    assert len(run.rows) == rounds, run.status
    return {"api": api, "round_s": seconds / rounds, "agents_s": spent[0] / rounds,
            "rounds": rounds}


def baseline_tree(rev: str) -> Path:
    path = Path(tempfile.gettempdir()) / f"hfl-baseline-{rev}"
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=ROOT,
                       check=True, capture_output=True)
    return path


def one(tree: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                          "--data", args.data, "--agents", str(args.agents),
                          "--rounds", str(args.rounds)],
                         cwd=tree, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="the MNIST IDX files' folder")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--agents", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.data = str(Path(args.data).resolve())
    if args.worker:
        print(json.dumps(worker(args.data, args.agents, args.rounds)))
        return
    trees = {"baseline": baseline_tree(args.baseline_rev), "task": ROOT}
    got: dict[str, list[dict]] = {"baseline": [], "task": []}
    loads = [os.getloadavg()[0]]
    for i in range(args.runs):
        for name in (("baseline", "task") if i % 2 == 0 else ("task", "baseline")):
            r = one(trees[name], args)
            assert r["api"] == name, r
            got[name].append(r)
            loads.append(os.getloadavg()[0])
            print(f"run {i + 1} {name}: {r['round_s']:.2f} s/round, agents "
                  f"{r['agents_s']:.2f} s", flush=True)

    def med(name: str, key: str) -> tuple[float, float, float]:
        xs = [r[key] for r in got[name]]
        return statistics.median(xs), min(xs), max(xs)

    print(f"\n## task API cost per round ({platform.machine()}, {os.cpu_count()} cpus, "
          f"load {min(loads):.1f}-{max(loads):.1f}; {args.agents} agents, MNIST CNN, "
          f"E = 1, B = 10, SecAgg+, in-memory network; median of {args.runs} alternated runs)")
    print("\n| code | s per round (min-max) | agents' local rounds, s (min-max) |")
    print("|---|---:|---:|")
    for name, label in (("baseline", f"before ({args.baseline_rev})"), ("task", "task API")):
        r, a = med(name, "round_s"), med(name, "agents_s")
        print(f"| {label} | {r[0]:.2f} ({r[1]:.2f}-{r[2]:.2f}) | {a[0]:.2f} "
              f"({a[1]:.2f}-{a[2]:.2f}) |")
    ratio = med("task", "round_s")[0] / med("baseline", "round_s")[0]
    agents = med("task", "agents_s")[0] / med("baseline", "agents_s")[0]
    print(f"\ntask API ÷ before: {ratio:.3f} per round, {agents:.3f} for the agents' work")


if __name__ == "__main__":
    main()
