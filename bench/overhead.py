"""Round overhead, hfl against Flower 1.42, alternated in one run (issue 7, target 2).

    .venv/bin/python bench/overhead.py                       # P = 1.66M, N ∈ {10, 50}
    .venv/bin/python bench/overhead.py -P 100000 1663370 10000000 -N 10 50 100 --reps 2

The same "model" of P float32 parameters, N clients that return a fixed delta (no
training), FedAvg, 5 rounds; the figures are the median seconds per round and the server's
peak RSS, and the server's CPU seconds per round (what the server itself spends, apart from
the clients it shares this machine with). Runs alternate hfl, Flower, hfl, Flower… so
both see the same machine load.

- hfl: a real Mosquitto with TLS client certificates and the roster's ACL on loopback; the
  coordinator and one aggregator in one process (the "server", whose peak RSS is
  reported), the N agents as nodes of another process, each with its own MQTT
  connection, envelopes signed and sealed as in a fleet; an app in this process requests
  the job and notes when the job's status announces each new version, which the
  coordinator publishes once the version is stored, exported to ONNX and sent (round 1
  from the request, each later one from the version before). `--secagg` turns SecAgg+
  on; `--no-tls` runs the broker without TLS (envelopes are still signed and sealed), to
  show what TLS costs. The model is `logreg` (or `mnist-cnn`) shaped to hold exactly P
  parameters, so the coordinator's ONNX export of each version is in hfl's time. The
  agents' trainer returns the fixed delta.
- Flower, in its own venv (created here on first use, torch left out; hfl never imports
  Flower), FedAvg over N NumPyClients returning the round model plus the fixed delta
  (bench/flower_app/overhead_app.py); without TLS unless `--flower-tls`. Plain:
  bench/overhead_flower.py, the legacy gRPC server (`start_server`) on loopback and the N
  clients as threads of one process. `--secagg` (or `--flower-deployment` for plain):
  Flower's deployment engine, the only one that runs its SecAgg+ (`SecAggPlusWorkflow`
  with `secaggplus_mod`), with settings after hfl's defaults (`flower_secagg`): a
  SuperLink, N SuperNodes and `flwr run`, which in Flower 1.42 talk HTTP/1.1, not gRPC.
  Its server side is the SuperLink, its SuperExec and the ServerApp process they start
  (CPU and peak RSS summed); each SuperNode starts a ClientApp process per message, four
  per round with SecAgg+. Each ClientApp has 30 s to start and take its task: on a loaded
  machine N of them starting at once miss it, and the run is given up (`_wait_for`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from aggregator.runner import aggregator_node  # noqa: E402
from application import JobStatus  # noqa: E402
from coordinator.runner import coordinator_node  # noqa: E402
from edge_agent import runner as agent_runner  # noqa: E402
from edge_agent.machine import Update  # noqa: E402
from fleet.ops.broker import free_port  # noqa: E402
from fleet.sim import procs  # noqa: E402
from fleet.sim.inproc import FleetLayout, InProcessFleet  # noqa: E402
from hfl.crypto.pki import Pki  # noqa: E402
from hfl.crypto.secagg import params_for  # noqa: E402
from hfl.runtime.node import run_in_thread  # noqa: E402
from hfl.wire.messages import Metrics, SecureSpec  # noqa: E402

FLOWER = "flwr==1.42.0"
FLOWER_VENV = HERE / ".venv-flower"
FLOWER_APP = HERE / "flower_app"
SITE, DATASET, ROUNDS = "site-a", "bench", 5
DELTA = 1e-3
MNIST_CNN = 1_663_370


def model_for(p: int) -> dict:
    """An architecture of exactly p parameters: mnist-cnn, or logreg over a (1, a, b) input
    with 10 classes (p = 10·a·b + 10)."""
    if p == MNIST_CNN:
        return {"task": "mnist-cnn", "options": {"input_shape": [1, 28, 28], "num_classes": 10}}
    features, rest = divmod(p - 10, 10)
    a = next((a for a in range(int(features**0.5), 0, -1) if features % a == 0), 1)
    if rest or features // a > 4096:
        raise SystemExit(f"P = {p}: want 10·a·b + 10 with a, b <= 4096")
    return {"task": "logreg",
            "options": {"input_shape": [1, a, features // a], "num_classes": 10}}


class FixedDelta:
    """Stands in for the agents' trainer: the same delta every round, no training."""

    delta: np.ndarray | None = None  # one array for all agents of the process

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __call__(self, t: object) -> Update:
        return Update(self.delta, Metrics(samples=600))


def _serve_until(stop: mp.synchronize.Event, nodes: list) -> None:
    stop.wait()
    for node, _ in nodes:
        node.stop_event.set()
    time.sleep(0.5)
    for node, _ in nodes:
        node.stop(timeout=5)


def _server(fleet: InProcessFleet, ready: mp.synchronize.Event, stop: mp.synchronize.Event,
            out: mp.Queue) -> None:
    ids, s = fleet.identities, fleet.settings
    coord, cm, registry = coordinator_node(ids["coordinator"], fleet.roster, s("coordinator"),
                                           fleet.topics, fleet.workdir / "coordinator",
                                           feed=fleet.feed(publish=True))
    agg, am = aggregator_node(ids[SITE], fleet.roster, s(SITE), fleet.topics, feed=fleet.feed())
    nodes = [(coord, cm), (agg, am)]
    for node, machine in nodes:
        node.start()
        run_in_thread(node, machine, "server")
    agents = set(fleet.layout.groups[SITE])
    while not agents <= am.online:
        time.sleep(0.05)
    cpu = time.process_time()
    ready.set()
    _serve_until(stop, nodes)
    registry.close()
    out.put((time.process_time() - cpu, procs.memory_mib(os.getpid()) * 2**20,
             {name: dict(node.rejections) for name, node in (("coordinator", coord), (SITE, agg))
              if node.rejections}))


def _clients(fleet: InProcessFleet, p: int, stop: mp.synchronize.Event) -> None:
    FixedDelta.delta = np.full(p, DELTA, np.float32)
    agent_runner.LocalTrainer = FixedDelta  # agent_node builds its trainer from this name
    nodes = []
    for agent in fleet.layout.groups[SITE]:
        node, machine = agent_runner.agent_node(fleet.identities[agent], fleet.roster,
                                                fleet.settings(agent), fleet.topics, SITE,
                                                {DATASET: None}, device="cpu",
                                                feed=fleet.feed())
        node.start()
        run_in_thread(node, machine, agent)
        nodes.append((node, machine))
    _serve_until(stop, nodes)


def run_hfl(p: int, n: int, secagg: bool, tls: bool = True, timeout: float = 600) -> dict:
    ctx = mp.get_context("fork")  # before any thread of ours: the children inherit the fleet
    with tempfile.TemporaryDirectory(prefix="hfl-overhead-") as tmp:
        layout = FleetLayout({SITE: {f"agent-{i + 1}": {} for i in range(n)}}, apps=("app",))
        fleet = InProcessFleet(layout, Path(tmp), tls=tls)
        fleet.enroll()
        fleet.start_broker()
        ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_server, args=(fleet, ready, stop, out)),
                 ctx.Process(target=_clients, args=(fleet, p, stop))]
        for proc in procs:
            proc.start()
        app, app_rejected = None, {}
        try:
            if not ready.wait(120):
                raise RuntimeError("the aggregator did not see every agent online")
            app = fleet.app("app", models=["bench"])
            app.start()
            spec = dict(name="bench", dataset=DATASET, aggregators=[SITE], rounds=ROUNDS,
                        min_agents=n, deadline_s=300, secagg={"enabled": secagg},
                        **model_for(p))
            marks = [time.perf_counter()]
            app.request(**spec)
            for event in app.events(timeout):
                if not isinstance(event, JobStatus) or event.meta.version < len(marks):
                    continue
                marks.append(time.perf_counter())
                row = event.meta.history[-1]
                if row["agents"] != n or row["dropped"]:
                    raise RuntimeError(f"version {row['version']}: {row['agents']} agents, "
                                       f"{row['dropped']} dropped; want {n}, 0")
                if event.meta.version >= ROUNDS or event.finished:
                    break
        finally:
            if app is not None:
                app_rejected = dict(app.node.rejections)
                app.stop()
            stop.set()
            for proc in procs:
                proc.join(30)
            fleet.broker.close()
        cpu, rss, rejected = out.get(timeout=10)
    if len(marks) != ROUNDS + 1:
        raise RuntimeError(f"{len(marks) - 1} of {ROUNDS} versions in {timeout} s; "
                           f"messages refused by the server: {rejected}, the app: {app_rejected}")
    return {"rounds": [b - a for a, b in zip(marks, marks[1:], strict=False)], "cpu": cpu,
            "peak_rss": rss}


def flower_python() -> Path:
    """Flower's venv: created with Flower pinned and without torch on first use."""
    python = FLOWER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(FLOWER_VENV)], check=True)
        # Without our PYTHONPATH, so that pip neither sees hfl nor checks its requirements.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        subprocess.run([str(python), "-m", "pip", "install", "-q", FLOWER], check=True, env=env)
    return python


def run_flower(p: int, n: int, tls: dict[str, Path] | None) -> dict:
    """Flower's legacy gRPC server (`start_server`) and its N clients as threads."""
    python, script = str(flower_python()), str(HERE / "overhead_flower.py")
    args = ["--port", str(free_port()), "-P", str(p), "-N", str(n), "--rounds", str(ROUNDS)]
    server_tls = [a for k, path in (tls or {}).items() for a in (f"--{k}", str(path))]
    server = subprocess.Popen([python, script, "server", *args, *server_tls],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(2)  # the gRPC server listening; clients retry their connection anyway
    client_tls = ["--ca", str(tls["ca"])] if tls else []
    clients = subprocess.Popen([python, script, "clients", *args, *client_tls],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        line, _ = server.communicate(timeout=600)
    finally:
        clients.kill()
        clients.wait()
    if server.returncode:
        raise RuntimeError(f"Flower's server exited with {server.returncode}")
    return json.loads(line.strip().splitlines()[-1])


def flower_tls(dir: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 (EC P-256, as hfl's broker has)."""
    pki = Pki.init(dir / "pki")
    pki.issue_broker("flower", ["127.0.0.1"])
    files = pki.device("flower")
    return {"ca": files.ca, "cert": files.cert, "key": files.tls_key}


def flower_secagg(n: int) -> dict[str, float]:
    """Flower's SecAgg+ settings for n clients, matched to hfl's defaults (SecureSpec): hfl's
    k neighbours and t shares; Flower counts a client's own share among its k + 1. Flower
    clips the model itself, not the delta; hfl's bound of 2 holds it (5 × 1e-3 here)."""
    spec = SecureSpec()
    params = params_for("bench", 1, n, 1, spec.threshold, spec.degree, spec.dropout, spec.corrupt)
    return {"num-shares": params.degree + 1, "threshold": params.threshold,
            "clipping-range": spec.clip}


def _tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc: Flower detaches its SuperExecs into sessions of
    their own, so a process group would not hold them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def _kill_trees(procs: list[subprocess.Popen]) -> None:
    """Stop every process of the trees first, so none starts another, then kill them all."""
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in {q for proc in procs for q in _tree(proc.pid)}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    for proc in procs:
        proc.wait()


def run_flower_deployment(p: int, n: int, secagg: bool, tmp: Path,
                          tls: dict[str, Path] | None, timeout: float = 3600) -> dict:
    """Flower's deployment engine on loopback: a SuperLink, N SuperNodes, the app in
    bench/flower_app submitted with `flwr run`. The SuperLink runs the ServerApp in a process
    of its own (through its SuperExec), each SuperNode a ClientApp process per message; the
    ServerApp writes its figures to a file. The server side is the SuperLink, its SuperExec
    and the ServerApp: the CPU seconds and peak RSS are their sums."""
    venv = flower_python().parent
    port, out, home, log_path = free_port(), tmp / "out.json", tmp / "flwr-home", tmp / "log"
    home.mkdir()  # flwr's config and installed apps, instead of ~/.flwr
    trust = f'root-certificates = "{tls["ca"]}"' if tls else "insecure = true"
    (home / "config.toml").write_text(f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
                                      f'address = "127.0.0.1:{port}"\n{trust}\n')
    link_tls = ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]),
                "--ssl-keyfile", str(tls["key"])] if tls else ["--insecure"]
    node_tls = ["--root-certificates", str(tls["ca"])] if tls else ["--insecure"]
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{venv}:{os.environ['PATH']}"}
    config = {"P": p, "N": n, "rounds": ROUNDS, "secagg": secagg, "out": str(out),
              **flower_secagg(n)}
    with open(log_path, "wb") as log:
        def spawn(*cmd: str) -> subprocess.Popen:
            return subprocess.Popen([str(venv / cmd[0]), *cmd[1:]], env=env, stdout=log,
                                    stderr=log, stdin=subprocess.DEVNULL)

        procs = [spawn("flower-superlink", *link_tls, "--port", str(port),
                       "--disable-runtime-dependency-installation")]
        try:
            procs += [spawn("flower-supernode", *node_tls, "--superlink", f"127.0.0.1:{port}",
                            "--port", str(free_port())) for _ in range(n)]
            config["superlink-pid"] = procs[0].pid
            run = [str(venv / "flwr"), "run", str(FLOWER_APP), "--run-config",
                   " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())]
            deadline = time.monotonic() + timeout
            _wait_for(lambda: _listening(port), deadline, procs[0], log_path, n)  # tens of s
            subprocess.run(run, env=env, stdout=log, stderr=log, check=True)
            _wait_for(out.exists, deadline, procs[0], log_path, n)
        finally:
            _kill_trees(procs)
    result = json.loads(out.read_text())
    if "error" in result:
        raise RuntimeError(f"Flower's ServerApp: {result['error']}")
    result["cpu"] += result["link_cpu"]
    result["peak_rss"] += result["link_peak_rss"]
    return result


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_for(ready: Callable[[], bool], deadline: float, superlink: subprocess.Popen,
              log: Path, n: int) -> None:
    """Until ready(). Fails once the deadline passes, the SuperLink exits, or ClientApps
    start too slowly: a SuperNode gives each 30 s to take its task, then starts another,
    which on a loaded machine snowballs until no round ends."""
    checked = time.monotonic()
    while not ready():
        why = ("timed out" if time.monotonic() > deadline else
               "the SuperLink exited" if superlink.poll() is not None else None)
        if why is None and time.monotonic() - checked > 10:
            checked = time.monotonic()
            expired = log.read_text(errors="replace").count("task-token authentication failed")
            if expired > 2 * n:
                why = f"{expired} ClientApps too slow to start (machine too loaded)"
        if why:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"Flower's run: {why}; its log ends:\n{tail}")
        time.sleep(0.2)


def flower(p: int, n: int, secagg: bool, deployment: bool, tls: bool) -> dict:
    """One Flower run, its final model checked: the mean of ROUNDS fixed deltas."""
    with tempfile.TemporaryDirectory(prefix="hfl-overhead-flower-") as tmp:
        certs = flower_tls(Path(tmp)) if tls else None
        if secagg or deployment:
            result = run_flower_deployment(p, n, secagg, Path(tmp), certs)
        else:
            result = run_flower(p, n, certs)
    if len(result["rounds"]) != ROUNDS or abs(result["final_mean"] - ROUNDS * DELTA) > 1e-5:
        raise RuntimeError(f"Flower: {len(result['rounds'])} rounds, the final model averages "
                           f"{result['final_mean']}; want {ROUNDS}, {ROUNDS * DELTA}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-P", type=int, nargs="+", default=[MNIST_CNN])
    ap.add_argument("-N", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--reps", type=int, default=1, help="alternations per configuration")
    ap.add_argument("--secagg", action="store_true",
                    help="SecAgg+ on both sides (Flower's on its deployment engine)")
    ap.add_argument("--flower-deployment", action="store_true",
                    help="plain Flower on its deployment engine too, not start_server")
    ap.add_argument("--no-tls", action="store_true", help="hfl's broker without TLS")
    ap.add_argument("--flower-tls", action="store_true", help="Flower with TLS (as hfl has)")
    args = ap.parse_args()
    deployment = args.secagg or args.flower_deployment
    print(f"## round overhead ({platform.machine()}, {os.cpu_count()} cpus, {ROUNDS} rounds, "
          f"{'SecAgg+' if args.secagg else 'plain'}; hfl: {'no ' * args.no_tls}TLS; Flower: "
          f"{'deployment engine (HTTP)' if deployment else 'start_server (gRPC)'}, "
          f"{'' if args.flower_tls else 'no '}TLS; "
          f"load average {os.getloadavg()[0]:.1f})\n")
    print("| P | N | hfl s/round | Flower s/round | hfl ÷ Flower | hfl server CPU s/round "
          "| Flower server CPU s/round | hfl server MiB | Flower server MiB | load |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in args.P:
        for n in args.N:
            runs: dict[str, list[dict]] = {"hfl": [], "flower": []}
            for _ in range(args.reps):
                runs["hfl"].append(run_hfl(p, n, args.secagg, not args.no_tls))
                runs["flower"].append(flower(p, n, args.secagg, args.flower_deployment,
                                             args.flower_tls))
            med = {k: statistics.median(t for r in v for t in r["rounds"])
                   for k, v in runs.items()}
            rss = {k: max(r["peak_rss"] for r in v) / 2**20 for k, v in runs.items()}
            cpu = {k: statistics.mean(r["cpu"] for r in v) / ROUNDS for k, v in runs.items()}
            print(f"| {p:,} | {n} | {med['hfl']:.3f} | {med['flower']:.3f} "
                  f"| {med['hfl'] / med['flower']:.3g} | {cpu['hfl']:.3f} | {cpu['flower']:.3f} "
                  f"| {rss['hfl']:.0f} "
                  f"| {rss['flower']:.0f} | {os.getloadavg()[0]:.1f} |", flush=True)
            for k, v in runs.items():
                print(f"<!-- {k} rounds: "
                      + "; ".join(" ".join(f"{t:.3f}" for t in r["rounds"]) for r in v)
                      + " -->", flush=True)
            if deployment:  # Flower's server side, apart
                print("<!-- Flower SuperLink + SuperExec / ServerApp: CPU s "
                      + "; ".join(f"{r['link_cpu']:.2f} / {r['cpu'] - r['link_cpu']:.2f}"
                                  for r in runs["flower"])
                      + ", peak MiB "
                      + "; ".join(f"{r['link_peak_rss'] / 2**20:.0f} / "
                                  f"{(r['peak_rss'] - r['link_peak_rss']) / 2**20:.0f}"
                                  for r in runs["flower"]) + " -->", flush=True)


if __name__ == "__main__":
    main()
