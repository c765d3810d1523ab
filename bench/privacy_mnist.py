"""Privacy–utility of client-level DP-FedAvg on MNIST: 1000 agents under 10 aggregators.

    .venv/bin/python bench/privacy_mnist.py                 # the benchmark (~45 min, 2 cores)
    .venv/bin/python bench/privacy_mnist.py --quick         # 3 rounds of each line, a smoke run

Each agent holds 60 MNIST training samples (IID shares, or `--partition shards`: two
label-sorted shards each, the non-IID split of the FedAvg and Geyer et al. papers);
100 agents per aggregator. One job per line, in one fleet and with the same settings:
the non-private run, DP-FedAvg at each ε of `--epsilons` (δ = 1e-5), and adaptive
clipping at the largest ε. The coordinator calibrates z for the job's rounds and the
groups' real sampling rate; agents clip to S and add their share of the noise
(`distributed`), then quantize and mask (SecAgg+). The final model is scored on the
10,000 MNIST test images.

The fleet is `fleet.sim.memsim`: the real machines, envelopes, sealing, SecAgg+, DP and
torch training, on an in-memory network instead of a broker. Writes `privacy_mnist.json`
and `privacy_mnist.png` (test accuracy per round, one line per job) into `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from coordinator.budget import sampling_rate
from fleet.sim.inproc import FleetLayout
from fleet.sim.memsim import MemFleet, MemRun
from fleet.sim.report import plot_curves, write_json
from fleet.sim.simulate import (
    APP,
    DataSection,
    FleetSection,
    SimConfig,
    TestSection,
    fleet_data,
)
from hfl.privacy.accounting import epsilon
from hfl.privacy.dp import adaptive_noise
from hfl.wire.messages import ModelSpec

HERE = Path(__file__).resolve().parent
DELTA = 1e-5


def config(args: argparse.Namespace) -> SimConfig:
    sampled = math.ceil(args.client_fraction * args.agents / args.aggregators)
    return SimConfig(
        fleet=FleetSection(aggregators=args.aggregators, agents=args.agents),
        data=DataSection(source="mnist", path=args.data, partition=args.partition,
                         shards_per_agent=2, local_test_fraction=0.0),
        test=TestSection(source="mnist", path=args.data, split="test"),
        model=dict(task="mnist-2nn", options={"input_shape": [1, 28, 28], "num_classes": 10},
                   rounds=args.rounds, epochs=args.epochs, batch_size=args.batch_size,
                   lr=args.lr, momentum=args.momentum, server_lr=args.server_lr,
                   server_momentum=args.server_momentum, client_fraction=args.client_fraction,
                   # The quorum is the sample: each agent's noise share is z·S/√m, so the
                   # group sum carries exactly N(0, z²S²) when nobody drops.
                   min_agents=sampled, deadline_s=600),
        seed=args.seed,
    )


def lines(args: argparse.Namespace) -> list[tuple[str, dict | None]]:
    """(label, the request's privacy section) of each job, the non-private one first."""
    dp = {"delta": DELTA, "clip": args.clip, "mode": "distributed", "accountant": args.accountant}
    out: list[tuple[str, dict | None]] = [("non-private", None)] if args.baseline else []
    out += [(f"eps={e:g}", {**dp, "epsilon": e}) for e in args.epsilons]
    if args.adaptive:
        top = max(args.epsilons)
        out.append((f"eps={top:g} adaptive", {**dp, "epsilon": top, "adaptive": True,
                                             "target_quantile": args.target_quantile,
                                             "clip_lr": args.clip_lr}))
    return out


def hierarchy_cost(run: MemRun, groups: int, group_size: int) -> dict:
    """What the hierarchy costs a DP job: each of the G group sums carries N(0, z²S²), so the
    global mean of G·m clipped updates carries std z·S·√G/(G·m) per coordinate - √G times a
    flat fleet's at the same z. A flat fleet (one group, same sampling rate and rounds) would
    reach that much noise with multiplier z·√G, and spend only `flat_epsilon_same_noise`."""
    spec, z = run.spec, run.z
    assert spec.privacy is not None and z is not None
    q = sampling_rate(spec, group_size)
    return {
        "noise_std_on_mean_per_S": z * math.sqrt(groups) / (groups * spec.min_agents),
        "flat_epsilon_same_noise": epsilon(z * math.sqrt(groups), len(run.rows),
                                           spec.privacy.delta, q, spec.privacy.accountant),
    }


def record(label: str, run: MemRun, fleet: MemFleet) -> dict:
    groups = fleet.layout.groups
    last = run.rows[-1] if run.rows else None
    p = run.spec.privacy
    z_update, bounds = run.z, None
    if p is not None and p.adaptive:  # the bit sum takes its share: the update gets z_Δ > z
        assert run.z is not None
        z_update = adaptive_noise(run.z, run.spec.min_agents)[1]
        bounds = sorted(round(m.clips[run.status.job].bound, 4)
                        for m in fleet.aggregators.values())
    return {
        "label": label,
        "state": run.status.state,
        "reason": run.status.reason,
        "target_epsilon": p.epsilon if p else None,
        "epsilon": last.epsilon if last else None,
        "delta": p.delta if p else None,
        "z": run.z,
        "z_update": z_update,
        "clip": p.clip if p else None,
        "final_clip_per_group": bounds,
        "adaptive": bool(p and p.adaptive),
        "rounds": len(run.rows),
        "accuracy": last.metrics["accuracy"] if last else None,
        "best_accuracy": max(r.metrics["accuracy"] for r in run.rows) if run.rows else None,
        "loss": last.loss if last else None,
        "agents_per_round": last.agents if last else None,
        "seconds": round(run.seconds, 1),
        "seconds_per_round": round(run.seconds / max(len(run.rows), 1), 2),
        "round_seconds": [round(s, 2) for s in run.round_seconds],
        "accuracy_per_round": [r.metrics["accuracy"] for r in run.rows],
        "epsilon_per_round": [r.epsilon for r in run.rows],
        "rejections": run.rejections,
        **(hierarchy_cost(run, len(groups), len(next(iter(groups.values()))))
           if p and run.rows else {}),
    }


def plot(results: list[dict], path: Path, title: str) -> None:
    curves = {}
    for r in results:
        name = r["label"] if r["epsilon"] is None else (
            f"{r['label']} (spent {r['epsilon']:.2f}, z = {r['z']:.2f})")
        curves[f"{name}: {r['accuracy']:.3f}"] = r["accuracy_per_round"]
    plot_curves(curves, path, title, (0.92, "Geyer et al. 2017, ε = 8: ~0.92"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "mnist",
                    help="folder of the MNIST IDX files, gzipped or not")
    ap.add_argument("--out", type=Path, default=HERE, help="where the JSON and PNG go")
    ap.add_argument("--quick", action="store_true", help="3 rounds a line: a smoke run")
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--aggregators", type=int, default=10)
    ap.add_argument("--partition", choices=("iid", "shards"), default="iid")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--no-adaptive", dest="adaptive", action="store_false")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="leave out the non-private job")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--accountant", choices=("rdp", "pld"), default="pld",
                    help="PLD is the tighter bound: a smaller z for the same (ε, δ)")
    ap.add_argument("--client-fraction", type=float, default=0.5, help="sampling rate q")
    ap.add_argument("--clip", type=float, default=0.5, help="L2 bound S (initial if adaptive)")
    ap.add_argument("--target-quantile", type=float, default=0.5)
    ap.add_argument("--clip-lr", type=float, default=0.2)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--momentum", type=float, default=0.0)
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--server-momentum", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds = 3
    torch.set_num_threads(1)  # batches of 10: a second thread buys nothing on 2 cores

    t0 = time.perf_counter()
    cfg = config(args)
    groups, test = fleet_data(cfg)
    fleet = MemFleet(FleetLayout(groups, apps=(APP,)), cfg.task_set())
    print(f"fleet: {args.agents} agents under {args.aggregators} aggregator(s), {len(test)} "
          f"test images, ready in {time.perf_counter() - t0:.1f} s", flush=True)
    results = []
    for i, (label, privacy) in enumerate(lines(args)):
        spec = ModelSpec.model_validate({**cfg.spec(sorted(groups)).model_dump(),
                                         "privacy": privacy})

        def show(row, label=label) -> None:
            eps = "" if row.epsilon is None else f" ε {row.epsilon:.3f}"
            print(f"  {label} round {row.round}: accuracy {row.metrics['accuracy']:.4f}{eps}",
                  flush=True)

        run = fleet.run(spec, f"bench{i}", test, on_row=show)
        results.append(record(label, run, fleet))
        r = results[-1]
        print(f"{label}: {r['state']} after {r['rounds']} rounds, accuracy {r['accuracy']:.4f}, "
              f"ε {r['epsilon']}, z {r['z']}, {r['seconds_per_round']} s/round", flush=True)
    doc = {
        "command": " ".join(["bench/privacy_mnist.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"{torch.get_num_threads()} torch thread(s), "
                   f"python {platform.python_version()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": round(time.perf_counter() - t0, 1),
        "results": results,
    }
    write_json(args.out / "privacy_mnist.json", doc)
    title = (f"MNIST, mnist-2nn, {args.agents} agents / {args.aggregators} aggregators "
             f"({args.partition}), q = {args.client_fraction:g}, {args.rounds} rounds, "
             f"δ = {DELTA:g}")
    plot(results, args.out / "privacy_mnist.png", title)
    print(json.dumps([{k: r[k] for k in ("label", "accuracy", "epsilon", "z", "rounds",
                                         "seconds_per_round")} for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
