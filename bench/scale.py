"""Scale: a thousand agents under ten aggregators on one machine, SecAgg+ and DP on (issue 7,
target 6).

    .venv/bin/python bench/scale.py                  # 1000 agents, 10 aggregators, 3 rounds
    .venv/bin/python bench/scale.py --quick          # 100 agents, 2 aggregators, 2 rounds
    .venv/bin/python bench/scale.py --agents 2000 --aggregators 20 --out /tmp/scale.json

What runs, each part the real one (fleet.sim.procs):
- a Mosquitto with TLS client certificates and the roster's ACL, as in a fleet: every device
  has its own certificate (`--no-tls`: plain and anonymous; envelopes are signed and sealed
  either way);
- the coordinator and each aggregator as its own process (`hfl-coordinator run`,
  `hfl-aggregator run`, each with its state directory and checkpoints);
- the agents in processes of at most 250, each agent a real `AgentMachine` on its own MQTT
  connection that answers with a fixed delta instead of training (`FixedDeltaAgent`): DP
  clipping and noise share, fixed point, SecAgg+ (keys, Shamir shares, masking, unmasking
  shares), signing and sealing are all its own.
The job: logistic regression on 28×28 inputs (7,850 parameters: this is about fan-in, not
bandwidth), SecAgg+ in every group (degree k = 3·⌈log2 n⌉), client-level DP in distributed
mode (ε = 8, δ = 1e-5, clip S = 1, z calibrated by the coordinator), every agent of a group
in every round (C = 1, the quorum is the group, as DP's noise shares assume), κ1 = 1.

Measured: the time for all agents to connect (TLS handshake, CONNECT, SUBSCRIBE, the online
status) and for the aggregators to be told; the time of each round (the first from the
request, with the warm-up); each SecAgg+ stage per aggregator, from the stage messages an
observer sees (open → keys: adverts, after the agents' "training", DP and key generation;
keys → routed: Shamir shares; routed → unmask: masked inputs; unmask → closed: unmasking
shares and the aggregator's reconstruction); CPU seconds (per phase) and peak RSS of the
broker, the coordinator, the aggregators (max and sum) and the agents' processes; MQTT
payload bytes per agent per round from the nodes' own counters; and the checks: every
version counts every agent, none dropped, the job finishes, nothing rejected.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from application import App  # noqa: E402
from fleet.ops.acl import ANY, pattern  # noqa: E402
from fleet.ops.broker import Broker, BrokerTls  # noqa: E402
from fleet.sim import procs  # noqa: E402
from fleet.sim.follow import RoundRow, follow  # noqa: E402
from fleet.sim.report import write_json  # noqa: E402
from hfl.crypto.identity import Identity  # noqa: E402
from hfl.crypto.pki import Pki  # noqa: E402
from hfl.runtime.mqtt import BrokerSettings, Inbound, Session  # noqa: E402
from hfl.wire.chunks import FRAME_OVERHEAD  # noqa: E402
from hfl.wire.chunks import MAGIC as CHUNK  # noqa: E402
from hfl.wire.messages import ModelRequest, ModelSpec, Role  # noqa: E402
from hfl.wire.topics import Topics  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
STEP, SAMPLES = 1e-3, 10  # every agent's fixed delta (L2 norm 0.09 < S: never clipped)
STAGES = ("open", "keys", "routed", "unmask", "closed")  # what an aggregator broadcasts


# ---------------------------------------------------------------------- /proc


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def busy_s() -> float:
    """CPU seconds the whole machine spent busy so far (every core, every process)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    idle = int(fields[3]) + int(fields[4])  # idle, iowait
    return (sum(int(f) for f in fields[:8]) - idle) / TICK


class Probe:
    """CPU seconds and RSS of every process at named moments, their peak RSS at the end."""

    def __init__(self) -> None:
        self.pids: dict[str, int] = {}  # name → pid; names say the kind: "agg:agg03"
        self.cpu_at: dict[str, dict[str, float]] = {}
        self.wall: dict[str, float] = {}
        self.rss_at: dict[str, dict[str, float]] = {}
        self.peak: dict[str, float] = {}

    def mark(self, label: str) -> None:
        self.wall[label] = time.monotonic()
        self.cpu_at[label] = {n: cpu_s(p) for n, p in self.pids.items()}
        self.cpu_at[label]["machine"] = busy_s()  # everything, the benchmark's own included
        self.rss_at[label] = {n: procs.memory_mib(p, "VmRSS") for n, p in self.pids.items()}

    def take_peaks(self) -> None:
        self.peak = {n: procs.memory_mib(p) for n, p in self.pids.items()}

    def cpu(self, since: str, until: str) -> dict[str, float]:
        """CPU seconds each process spent between two marks (0 for one started later)."""
        return {n: c - self.cpu_at[since].get(n, 0.0) for n, c in self.cpu_at[until].items()}


def by_kind(values: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per kind of process: the sum and the largest (aggregators, agent processes)."""
    kinds: dict[str, list[float]] = {}
    for name, v in values.items():
        kinds.setdefault(name.split(":")[0], []).append(v)
    return {k: {"sum": sum(vs), "max": max(vs), "n": len(vs)} for k, vs in kinds.items()}


# ---------------------------------------------------------------------- the observer


def header(payload: bytes) -> dict | None:
    """The header of a whole envelope or of a message's first chunk (unverified: the
    observer only keeps time); None for a later chunk."""
    if payload.startswith(CHUNK):
        if int.from_bytes(payload[20:24], "little") != 0:
            return None
        payload = payload[FRAME_OVERHEAD:]
    size = int.from_bytes(payload[4:8], "little")
    return json.loads(payload[8 : 8 + size])


class StageClock:
    """An observer's inbox: when each aggregator's stage messages and each device's online
    status first went by, and the size of each stage's first message (for `routed`, sent to
    each agent on its own topic, one agent's). Runs on the MQTT thread (`put`), so it only
    takes notes."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, int, str], float] = {}  # (aggregator, round, stage) → t
        self.size: Counter[tuple[str, int, str]] = Counter()  # → payload bytes, all chunks
        self.selected: dict[tuple[str, int], int] = {}  # (aggregator, round) → agents asked
        self.online: dict[str, float] = {}
        self._last: dict[str, tuple[str, int, str]] = {}  # topic → the message being chunked

    def put(self, msg: Inbound, *args: object, **kwargs: object) -> None:
        now = time.monotonic()
        if not msg.payload or msg.retain:
            return
        h = header(msg.payload)
        if h is None:  # a later chunk of the topic's message under way
            if msg.topic in self._last:
                self.size[self._last[msg.topic]] += len(msg.payload)
            return
        if h["stage"] == "online":
            self.online.setdefault(h["sender"], now)
        elif h["stage"] in STAGES:
            key = (h["sender"], h["round"], h["stage"])
            if key not in self.seen:  # the first (routed: one agent's shares, each its own)
                self.seen[key] = now
                self.size[key] += len(msg.payload)
                self._last[msg.topic] = key
            else:
                self._last.pop(msg.topic, None)
            if h["stage"] == "open":
                self.selected[(h["sender"], h["round"])] = len(h["meta"]["selected"])

    def stages(self) -> list[dict]:
        """Per edge round: each stage's duration (median and max over the aggregators), and
        the spread of the round over them (first open to last closed)."""
        out = []
        for rnd in sorted({r for _, r, _ in self.seen}):
            aggs = sorted({a for a, r, _ in self.seen if r == rnd})
            t = {a: [self.seen.get((a, rnd, s)) for s in STAGES] for a in aggs}
            row: dict = {"edge_round": rnd, "aggregators": len(aggs), "kib": {
                s: statistics.median(self.size[(a, rnd, s)] for a in aggs) / 1024
                for s in STAGES}}
            for i, stage in enumerate(("advert", "shares", "masked", "unmask")):
                d = [ts[i + 1] - ts[i] for ts in t.values() if ts[i] and ts[i + 1]]
                if d:
                    row[stage] = {"median_s": statistics.median(d), "max_s": max(d)}
            opens = [ts[0] for ts in t.values() if ts[0]]
            closes = [ts[-1] for ts in t.values() if ts[-1]]
            if opens and closes:
                row["open_to_last_close_s"] = max(closes) - min(opens)
            out.append(row)
        return out


def wait_for(what: str, check: Callable[[], bool], timeout: float,
             alive: Callable[[], None] = lambda: None) -> float:
    t0 = time.monotonic()
    while not check():
        alive()
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


# ---------------------------------------------------------------------- the run


def spec(aggregators: list[str], group: int, args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(
        name="scale", task="logreg", options={"input_shape": [1, 28, 28], "num_classes": 10},
        dataset="d",
        aggregators=aggregators, rounds=args.rounds, min_agents=group,
        deadline_s=args.deadline, max_retries=1,
        secagg={"enabled": True, "stage_timeout_s": args.deadline},
        privacy={"epsilon": args.epsilon, "delta": 1e-5, "clip": 1.0, "mode": "distributed"})


def run(args: argparse.Namespace, workdir: Path) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * args.agents + 1024:  # the broker (which inherits it) holds one per agent
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    topics = Topics()
    aggs = [f"agg{j:02d}" for j in range(args.aggregators)]
    group = args.agents // args.aggregators
    agents = [(f"a{j:02d}-{i:04d}", agg, STEP, SAMPLES)
              for j, agg in enumerate(aggs) for i in range(group)]
    n = len(agents)
    report: dict = {"agents": n, "aggregators": len(aggs), "group": group,
                    "rounds": args.rounds, "tls": args.tls, "load_before": os.getloadavg()}

    t = time.monotonic()
    pki = Pki.init(workdir / "pki", name="hfl scale bench CA")
    pki.issue_many([("coordinator", Role.COORDINATOR, None), ("app", Role.APP, None),
                    ("ops", Role.OBSERVER, None), *((a, Role.AGGREGATOR, None) for a in aggs),
                    *((a, Role.AGENT, agg) for a, agg, _, _ in agents)])
    roster = pki.roster()
    tls = (BrokerTls.from_pki(pki, "broker", workdir / "broker" / "tls", topics)
           if args.tls else None)
    broker = Broker(workdir / "broker", tls=tls).start()
    report["issue_s"] = time.monotonic() - t

    def settings(id_: str) -> BrokerSettings:
        if not args.tls:
            return BrokerSettings(host=broker.host, port=broker.port)
        return pki.device(id_).broker_settings(broker.host, broker.port)

    probe = Probe()
    probe.pids["broker"] = broker.pid  # type: ignore[assignment]
    probe.pids["bench"] = os.getpid()  # this process: the observer and the app
    clock = StageClock()
    observer = Session("ops", settings("ops"), inbox=clock,  # type: ignore[arg-type]
                       subscriptions=[pattern(topics.status, ANY, ANY),
                                      pattern(topics.rounds, ANY, ANY),
                                      pattern(topics.round_to, ANY, ANY, ANY)])
    services: dict[str, subprocess.Popen] = {}
    agent_procs: list[subprocess.Popen] = []
    app: App | None = None
    try:
        observer.start()
        assert observer.wait_ready(10)
        for id_ in ["coordinator", *aggs]:
            config = procs.service_config(workdir / "config" / f"{id_}.toml", id_,
                                          pki.device(id_).dir, broker.host, broker.port,
                                          args.tls, workdir / "state" / id_)
            services[id_] = procs.spawn_service(id_, config, workdir / "logs" / f"{id_}.log",
                                                workdir)
            probe.pids["coordinator" if id_ == "coordinator" else f"agg:{id_}"] = (
                services[id_].pid)

        def services_alive() -> None:
            for id_, p in services.items():
                if p.poll() is not None:
                    raise SystemExit(f"{id_} exited with {p.returncode}: see "
                                     f"{workdir / 'logs' / (id_ + '.log')}")

        report["services_up_s"] = wait_for(
            "the services online", lambda: set(services) <= set(clock.online), 120,
            services_alive)
        probe.mark("services")

        # Connect: every agent at once, from processes of at most 250.
        t = time.monotonic()
        agent_procs += procs.spawn_agents(pki, broker.host, broker.port, agents, workdir,
                                          tls=args.tls, per_process=args.per_process)
        for k, p in enumerate(agent_procs):
            probe.pids[f"agents:{k}"] = p.pid
        ready = procs.wait_ready(agent_procs)
        report["connect_s"] = time.monotonic() - t
        report["connect_per_process_s"] = [s for s, _ in ready]
        ids = {a for a, _, _, _ in agents}
        report["online_seen_s"] = time.monotonic() - t + wait_for(
            "every agent online", lambda: ids <= set(clock.online), 120, services_alive)
        time.sleep(1.0)  # the aggregators read the same statuses: let the last ones land
        probe.mark("connected")
        at_ready: Counter[str] = Counter()
        for _, counters in ready:
            at_ready.update(counters)

        # The job.
        sp = spec(aggs, group, args)
        app = App(Identity.load(pki.device("app").dir, "app", Role.APP), roster,
                  settings("app"), topics, models=[sp.name])
        app.start()
        probe.mark("request")
        t_request = time.monotonic()
        jobs = app.request(ModelRequest(request_id="scale", models=[sp]))
        versions: list[tuple[float, RoundRow]] = []

        def on_row(row: RoundRow) -> None:
            versions.append((time.monotonic(), row))
            probe.mark(f"v{row.round}")
            print(f"  version {row.round}: {row.agents} agents, {row.dropped} dropped, "
                  f"ε {row.epsilon or 0:.2f}, {versions[-1][0] - t_request:.1f} s after the "
                  "request", flush=True)

        out = follow(app, jobs, None, None, args.timeout, on_row)
        probe.mark("end")
        probe.take_peaks()
        finished = all(out.finished(j) for j in jobs)
        final = {j: out.status[j].meta.state for j in jobs if j in out.status}
    finally:
        if app is not None:
            app.stop()
        agent_tally = procs.stop_agents(agent_procs)
        for p in services.values():
            p.terminate()
        for p in services.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        observer.stop()
        broker.close()
    tallies = {id_: procs.tally((workdir / "logs" / f"{id_}.log").read_text(errors="replace"),
                                id_) for id_ in services}

    # Figures.
    times = [t_request] + [t for t, _ in versions]
    report["round_s"] = [b - a for a, b in zip(times, times[1:], strict=False)]
    report["versions"] = [{"version": r.round, "agents": r.agents, "dropped": r.dropped,
                           "epsilon": r.epsilon} for _, r in versions]
    report["job"] = final
    report["selected_per_round"] = {f"{a}/{r}": k for (a, r), k in sorted(clock.selected.items())}
    report["secagg_stages"] = clock.stages()
    report["cpu_s"] = {
        "connect": by_kind(probe.cpu("services", "connected")),
        "rounds": by_kind(probe.cpu("request", "end")),
        "per_round": [by_kind(probe.cpu(a, b)) for a, b in zip(
            ["request", *[f"v{r.round}" for _, r in versions]],
            [f"v{r.round}" for _, r in versions], strict=False)],
    }
    report["peak_rss_mib"] = by_kind(probe.peak)
    # What else ran meanwhile: the machine's busy CPU minus the fleet's own processes.
    rounds_cpu = probe.cpu("request", "end")
    fleet_cpu = sum(v for k, v in rounds_cpu.items() if k != "machine")
    report["other_cpu_share_in_rounds"] = (rounds_cpu["machine"] - fleet_cpu) / (
        (probe.wall["end"] - probe.wall["request"]) * (os.cpu_count() or 1))
    rounds_done = max(len(versions), 1)
    agents_rounds = Counter({k: v - at_ready.get(k, 0) for k, v in agent_tally.items()})
    report["per_agent_per_round"] = {
        "bytes_sent": agents_rounds["bytes_sent"] / n / rounds_done,
        "bytes_received": agents_rounds["mqtt_bytes_received"] / n / rounds_done,
        "messages_sent": agents_rounds["sent"] / n / rounds_done,
        "messages_received": agents_rounds["mqtt_received"] / n / rounds_done,
    }
    agg_t = [tallies[a] for a in aggs]
    report["aggregator_tally"] = {
        "bytes_received": sum(t["mqtt"].get("bytes_received", 0) for t in agg_t),
        "received": sum(t["mqtt"].get("received", 0) for t in agg_t),
        "bytes_sent": sum(t["node"].get("bytes_sent", 0) for t in agg_t),
        "published": sum(t["mqtt"].get("published", 0) for t in agg_t),
    }
    # Messages through the broker during the rounds: every publish in, every delivery out.
    # (Agents: since they were connected; services: the whole run, minus the n online
    # statuses each aggregator and the coordinator took in while the agents connected.)
    services_msgs = sum(t["mqtt"].get("published", 0) + t["mqtt"].get("received", 0)
                        for t in tallies.values()) - n * (len(aggs) + 1)
    broker_msgs = agents_rounds["mqtt_published"] + agents_rounds["mqtt_received"] + services_msgs
    report["broker_messages_per_round"] = broker_msgs / rounds_done
    report["broker_bytes_per_round"] = (
        agents_rounds["bytes_sent"] + agents_rounds["mqtt_bytes_received"]
        + sum(t["node"].get("bytes_sent", 0) + t["mqtt"].get("bytes_received", 0)
              for t in tallies.values())) / rounds_done
    report["unit_costs"] = unit_costs(report, probe, n)
    if args.extrapolate:
        report["extrapolation"] = extrapolate(report, args.extrapolate)
    report["rejected"] = {i: t["rejected"] for i, t in tallies.items() if t["rejected"]}
    report["checks"] = {
        "finished": finished and set(final.values()) == {"done"},
        "every_version_counts_every_agent": len(versions) == args.rounds and all(
            r.agents == n and r.dropped == 0 for _, r in versions),
        "quorum": all(r.agents >= sp.min_agents * len(aggs) for _, r in versions),
        "nothing_rejected": not report["rejected"],
    }
    report["load_after"] = os.getloadavg()
    return report


def unit_costs(r: dict, probe: Probe, n: int) -> dict:
    """What the extrapolation scales: the costs per connection and per agent and round. The
    rounds after the first are the steady state (the first also warms up)."""
    steady = r["cpu_s"]["per_round"][1:] or r["cpu_s"]["per_round"]
    wall = r["round_s"][1:] or r["round_s"]

    def per_round(kind: str, how: str = "sum") -> float:
        return statistics.mean(rnd[kind][how] for rnd in steady)

    connect = r["cpu_s"]["connect"]
    broker_rss = probe.rss_at["connected"]["broker"] - probe.rss_at["services"]["broker"]
    return {
        "round_s": statistics.mean(wall),
        "broker_cpu_ms_per_connection": 1e3 * connect["broker"]["sum"] / n,
        "broker_rss_kib_per_connection": 1024 * broker_rss / n,
        "broker_cpu_ms_per_agent_round": 1e3 * per_round("broker") / n,
        "broker_cpu_us_per_message": 1e6 * per_round("broker") / r["broker_messages_per_round"],
        "broker_cpu_ms_per_mib": 1e3 * per_round("broker")
                                 / (r["broker_bytes_per_round"] / 2**20),
        "aggregator_cpu_s_per_round": per_round("agg", "max"),
        "aggregator_cpu_ms_per_agent_round": 1e3 * per_round("agg") / n,
        "coordinator_cpu_s_per_round": per_round("coordinator"),
        "agent_cpu_ms_per_round": 1e3 * per_round("agents") / n,
        "agent_connect_cpu_ms": 1e3 * connect["agents"]["sum"] / n,
    }


def extrapolate(r: dict, boards: int) -> dict:
    """This run's costs scaled to `boards` agents in groups of the same size: at a fixed
    group size (and so degree k) every cost per agent and per group stays what it was, and
    the fleet is boards / group such groups. The broker's work is this one Mosquitto's,
    per core; a cluster divides it among its nodes (see bench/RESULTS.md for the method)."""
    u, n, group = r["unit_costs"], r["agents"], r["group"]
    groups = boards / group
    return {
        "boards": boards, "group": group, "aggregators": groups,
        "broker_connections_gib": boards * u["broker_rss_kib_per_connection"] / 2**20,
        "broker_reconnect_storm_core_s": boards * u["broker_cpu_ms_per_connection"] / 1e3,
        "broker_messages_per_round": boards * r["broker_messages_per_round"] / n,
        "broker_gib_per_round": boards * r["broker_bytes_per_round"] / n / 2**30,
        "broker_core_s_per_round": boards * u["broker_cpu_ms_per_agent_round"] / 1e3,
        "aggregators_core_s_per_round": groups * u["aggregator_cpu_s_per_round"],
        # An upper bound: all of the coordinator's CPU counted as if per partial.
        "coordinator_s_per_round": groups / r["aggregators"] * u["coordinator_cpu_s_per_round"],
    }


def show(r: dict) -> None:
    cpu, peak = r["cpu_s"], r["peak_rss_mib"]
    print(f"\n## {r['agents']} agents, {r['aggregators']} aggregators ({r['group']} each), "
          f"SecAgg+ and DP (distributed), TLS {'on' if r['tls'] else 'off'}")
    print(f"load average before {r['load_before'][0]:.2f}, after {r['load_after'][0]:.2f}; "
          f"other processes used {100 * r['other_cpu_share_in_rounds']:.0f} % of the machine's "
          "CPU during the rounds")
    print(f"PKI + broker {r['issue_s']:.1f} s; services online {r['services_up_s']:.1f} s")
    print(f"connect: all {r['agents']} agents {r['connect_s']:.1f} s (processes: "
          f"{', '.join(f'{s:.1f}' for s in r['connect_per_process_s'])} s), "
          f"all seen online {r['online_seen_s']:.1f} s")
    print("rounds (s, the first from the request): "
          + ", ".join(f"{s:.1f}" for s in r["round_s"]))
    for v in r["versions"]:
        print(f"  version {v['version']}: {v['agents']} agents, {v['dropped']} dropped, "
              f"ε {v['epsilon'] or 0:.2f}")
    print("SecAgg+ stages per aggregator (median / max s):")
    for row in r["secagg_stages"]:
        parts = [f"{s} {row[s]['median_s']:.2f}/{row[s]['max_s']:.2f}"
                 for s in ("advert", "shares", "masked", "unmask") if s in row]
        print(f"  edge round {row['edge_round']}: {', '.join(parts)}; first open to last close "
              f"{row.get('open_to_last_close_s', float('nan')):.2f}")
    sizes = r["secagg_stages"][-1]["kib"] if r["secagg_stages"] else {}
    print("  each aggregator's broadcasts, KiB (to each of its agents): "
          + ", ".join(f"{s} {k:.1f}" for s, k in sizes.items()))
    print("CPU s (connect | all rounds) and peak RSS MiB:")
    for kind in ("broker", "coordinator", "agg", "agents"):
        c, d, m = cpu["connect"].get(kind), cpu["rounds"].get(kind), peak.get(kind)
        if c is None or d is None or m is None:
            continue
        extra = (f" (max {c['max']:.1f} | {d['max']:.1f}, peak max {m['max']:.0f}, "
                 f"{c['n']} processes)" if c["n"] > 1 else "")
        print(f"  {kind:12s} {c['sum']:7.1f} | {d['sum']:7.1f}   {m['sum']:7.0f}{extra}")
    print("per round: wall s | CPU s broker, coordinator, aggregators (sum / max), agents")
    for wall, c in zip(r["round_s"], cpu["per_round"], strict=False):
        print(f"  {wall:6.1f} | {c['broker']['sum']:5.2f} {c['coordinator']['sum']:5.2f} "
              f"{c['agg']['sum']:6.2f} / {c['agg']['max']:5.2f} {c['agents']['sum']:6.1f}")
    pa = r["per_agent_per_round"]
    print(f"per agent per round: {pa['bytes_sent'] / 1024:.1f} KiB sent in "
          f"{pa['messages_sent']:.1f} messages, {pa['bytes_received'] / 1024:.1f} KiB "
          f"received in {pa['messages_received']:.1f}")
    print(f"broker: {r['broker_messages_per_round']:.0f} messages, "
          f"{r['broker_bytes_per_round'] / 2**20:.1f} MiB per round (in + out)")
    print("unit costs: " + ", ".join(f"{k} {v:.3g}" for k, v in r["unit_costs"].items()))
    if "extrapolation" in r:
        print("linear extrapolation: " + ", ".join(
            f"{k} {v:.3g}" for k, v in r["extrapolation"].items()))
    print(f"checks: {r['checks']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--aggregators", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="global rounds (≥ 2: the first "
                    "includes the warm-up)")
    ap.add_argument("--quick", action="store_true", help="100 agents, 2 aggregators, 2 rounds")
    ap.add_argument("--no-tls", dest="tls", action="store_false")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--per-process", type=int, default=250, help="agents per process")
    ap.add_argument("--deadline", type=float, default=600.0, help="round and stage deadline")
    ap.add_argument("--timeout", type=float, default=1800.0, help="for the whole job")
    ap.add_argument("--extrapolate", type=int, default=100_000, metavar="BOARDS",
                    help="scale the measured costs to this many agents (0: don't)")
    ap.add_argument("--workdir", type=Path, help="keep the logs here (default: a temp dir)")
    ap.add_argument("--out", type=Path, help="write the report as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.agents, args.aggregators, args.rounds = 100, 2, 2
    if args.agents % args.aggregators or args.agents // args.aggregators < 3:
        ap.error("--agents must be a multiple of --aggregators, with at least 3 per group")
    with tempfile.TemporaryDirectory(prefix="hfl-scale-") as tmp:
        workdir = args.workdir or Path(tmp)
        report = run(args, workdir)
    report["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python " \
                        f"{platform.python_version()}"
    show(report)
    if args.out:
        write_json(args.out, report)
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
