"""The operator's view of a fleet, free of I/O: verified status, telemetry and job messages
in, one snapshot out (a JSON-ready dict), rendered as tables for `hfl status` and served
as JSON by `hfl dashboard`. The roster says who should be there; each node's retained
status says whether it is (online, offline, lost), its telemetry what it is doing.

What is wrong is said where an operator looks (`problems`, the health column): telemetry
older than three times the period its node promised is stale, an online node so is shown
"stale (28 s)"; an aggregator whose blocks keep failing says why and since when, and the
sites a job's newest version was made without are named with the reason; failing state
saves and the error counters are listed; a service that restarted says so, as its counters
count from its start.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from hfl.crypto.identity import Roster
from hfl.errors import Rejected
from hfl.wire.envelope import Envelope
from hfl.wire.messages import (
    JobMeta,
    Kind,
    Role,
    StatusMeta,
    TelemetryMeta,
    evaluation_text,
    parse_meta,
)
from hfl.wire.topics import Route

STATES = ("online", "offline", "lost", "unknown")  # unknown: enrolled, never heard of
STALE_TIMES = 3  # telemetry older than 3 of its node's periods (`every_s`) is stale
STALE_MIN_S = 10.0  # ... and than this (clocks differ a little between hosts)


@dataclass
class NodeView:
    state: str = "unknown"
    telemetry: TelemetryMeta | None = None
    seen: float | None = None  # when its telemetry was made (its clock)
    resets: int = 0  # restarts seen while watching (a later start time)


def stale_after(every_s: float) -> float:
    """How old a node's telemetry may be before it is stale, for its promised period."""
    return max(STALE_TIMES * every_s, STALE_MIN_S)


class FleetView:
    def __init__(self, roster: Roster) -> None:
        self.roster = roster  # kept current by the caller's roster feed
        self.nodes: dict[str, NodeView] = {}
        self.jobs: dict[str, JobMeta] = {}

    def apply(self, env: Envelope, route: Route) -> None:
        """Fold one verified envelope in; `Rejected` for bad meta or a kind not watched."""
        kind = Kind(env.type)
        if kind is Kind.STATUS:
            self._node(route.id).state = parse_meta(StatusMeta, env.meta).state
        elif kind is Kind.TELEMETRY:
            node = self._node(route.id)
            meta = parse_meta(TelemetryMeta, env.meta)
            old, created = node.telemetry, env.header.created
            if old is not None and node.seen is not None:
                if created < node.seen:
                    return  # a late copy of an older message
                if (meta.started or 0) > (old.started or 0) + 1 or (
                        meta.started is None and meta.uptime_s + 1 < old.uptime_s):
                    node.resets += 1  # it started again: its counters count from 0
            node.telemetry, node.seen = meta, created
        elif kind is Kind.JOB:
            job = parse_meta(JobMeta, env.meta)
            held = self.jobs.get(job.job)
            if held is None or job.version >= held.version:  # a late repeat never goes back
                self.jobs[job.job] = job
        else:
            raise Rejected("unexpected-type", f"the fleet view does not take {kind.value}")

    def _node(self, id_: str) -> NodeView:
        return self.nodes.setdefault(id_, NodeView())

    # ------------------------------------------------------------------ snapshot

    def snapshot(self, now: float) -> dict[str, Any]:
        """Everything the view knows, as plain JSON types."""
        agents = [self._doc(a, now) for a in self.roster.by_role(Role.AGENT)]
        aggregators = []
        for agg in self.roster.by_role(Role.AGGREGATOR):
            doc = self._doc(agg, now)
            states = Counter(a["state"] for a in agents if a["group"] == agg)
            doc["agents"] = {"enrolled": sum(states.values()),
                             **{s: states.get(s, 0) for s in STATES}}
            aggregators.append(doc)
        jobs = [_job_doc(m) for _, m in sorted(self.jobs.items())]
        job_states = {j["job"]: j["state"] for j in jobs}
        for doc in aggregators:
            # the running jobs whose newest version was made without this site
            doc["missing"] = [{"job": j["job"], "version": j["version"], "reason": why}
                              for j in jobs if j["state"] == "running"
                              for agg, why in j["missing"].items() if agg == doc["id"]]
            if doc["failing"] is not None:  # its job may have ended since: say how
                doc["failing"]["job_state"] = job_states.get(doc["failing"]["job"])
            doc["problems"] = problems(doc, now) + _missing_text(doc)
        coordinators = self._role(Role.COORDINATOR, now)
        rejections: dict[str, dict[str, int]] = {}
        for doc in [*aggregators, *agents, *coordinators]:
            for reason, n in doc["rejections"].items():
                rejections.setdefault(reason, {})[doc["id"]] = n
        return {
            "time": now,
            "roster_serial": self.roster.serial,
            "coordinators": coordinators,
            "aggregators": aggregators,
            "agents": agents,
            "jobs": jobs,
            "rejections": dict(sorted(rejections.items())),
        }

    def _role(self, role: Role, now: float) -> list[dict[str, Any]]:
        return [self._doc(i, now) for i in self.roster.by_role(role)]

    def _doc(self, id_: str, now: float) -> dict[str, Any]:
        member = self.roster.get(id_)
        node = self.nodes.get(id_, NodeView())
        t = node.telemetry
        seen_s = None if node.seen is None else max(now - node.seen, 0.0)
        every = t.every_s if t else None
        doc: dict[str, Any] = {
            "id": id_,
            "role": member.role.value if member else None,
            "group": member.group if member else None,
            "state": node.state,
            "seen_s": seen_s,
            # Online, but its telemetry is older than its period allows: hung, or cut off
            # from the broker in a way the broker has not noticed yet.
            "stale": bool(node.state == "online" and every is not None and seen_s is not None
                          and seen_s > stale_after(every)),
            "every_s": every,
            "uptime_s": t.uptime_s if t else None,
            "started": t.started if t else None,
            "restarts": t.restarts if t else None,
            "resets_seen": node.resets,
            "activity": t.activity.model_dump() if t else None,
            "counts": t.counts.model_dump() if t else None,
            "round_s": t.round_s.model_dump() if t else None,
            "rejections": dict(t.rejections) if t else {},
            "epsilon": dict(t.epsilon) if t else {},
            "failing": t.failing.model_dump() if t and t.failing else None,
            "saves_failing": t.saves_failing.model_dump() if t and t.saves_failing else None,
        }
        doc["problems"] = problems(doc, now)
        doc["restarted"] = restarted(doc)
        return doc


def _job_doc(m: JobMeta) -> dict[str, Any]:
    last = m.history[-1] if m.history else {}
    missing = last.get("missing")
    return {"job": m.job, "app": m.app, "model": m.model, "state": m.state,
            "reason": m.reason, "version": m.version, "rounds": m.rounds,
            "epsilon": m.epsilon, "delta": m.delta, "task": m.task,
            "evaluation": evaluation_text(last), "declines": last.get("declines", 0),
            # the sites its newest version was made without, and why
            "missing": {str(k): str(v) for k, v in missing.items()}
            if isinstance(missing, dict) else {}}


# ---------------------------------------------------------------------- what is wrong

ERRORS = ("internal_errors", "unsendable", "checkpoint_errors", "registry_errors")


def problems(doc: dict[str, Any], now: float) -> list[str]:
    """What is wrong with a node, in words: blocks failing, saves failing, its error
    counters (a bug, a full disk, a recipient gone)."""
    out = []
    if (f := doc["failing"]) and f.get("job_state") not in (None, "running"):
        out.append(f"its last {f['count']} blocks failed (job {f['job']}, "
                   f"now {f['job_state']}): {f['reason']}")
    elif f:
        out.append(f"blocks failing for {human_s(now - f['since'])} ({f['count']} in a row, "
                   f"job {f['job']}): {f['reason']}")
    if f := doc["saves_failing"]:
        out.append(f"state saves failing for {human_s(now - f['since'])} ({f['count']} "
                   f"tries): {f['reason']}")
    c = doc["counts"] or {}
    out += [f"{k.replace('_', ' ')} {c[k]}" for k in ERRORS if c.get(k)]
    return out


def _failing_now(doc: dict[str, Any]) -> bool:
    """Its blocks fail in a job still running (or one the observer has no status of)."""
    f = doc["failing"]
    return bool(f) and f.get("job_state") in (None, "running")


def _missing_text(doc: dict[str, Any]) -> list[str]:
    """The job versions an aggregator is missing from, unless its own failing says so."""
    failing = (doc["failing"] or {}).get("job")
    return [f"missing from {m['job']} v{m['version']}: {m['reason']}" for m in doc["missing"]
            if m["job"] != failing]


def restarted(doc: dict[str, Any]) -> str:
    """'' unless the node started before (its state folder says so, or we saw it): then
    when it last started, as its counters count from then."""
    restarts, seen = doc["restarts"] or 0, doc["resets_seen"]
    if not (restarts or seen) or doc["uptime_s"] is None:
        return ""
    what = f"start {restarts + 1}" if restarts else "seen restarting"
    return f"restarted {human_s(doc['uptime_s'])} ago ({what}): counters from then"


def human_s(seconds: float) -> str:
    s = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.0f} {unit}"
    return f"{s:.0f} s"


# ---------------------------------------------------------------------- terminal rendering

STYLE = {"online": "green", "offline": "yellow", "lost": "bold red", "unknown": "dim",
         "running": "cyan", "done": "green", "stopped": "yellow", "failed": "bold red"}


def render(snap: dict[str, Any], agents: bool = False) -> Group:
    """`hfl status`: a summary line, then jobs, services, agents (when asked) and
    rejections, as rich tables."""
    parts: list[Any] = [summary(snap), jobs_table(snap)]
    parts.append(services_table(snap))
    if agents:
        parts.append(agents_table(snap))
    if snap["rejections"]:
        parts.append(rejections_table(snap))
    if snap.get("refused"):  # what this observer itself refused (a forged status, say)
        parts.append(Text(f"this observer refused: {_pairs(snap['refused'])}", style="red"))
    return Group(*parts)


def _pairs(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))


def summary(snap: dict[str, Any]) -> Text:
    aggs, agents = snap["aggregators"], snap["agents"]
    states = Counter(a["state"] for a in agents)
    coord = ", ".join(("" if c["id"] == "coordinator" else f"{c['id']} ") + state_text(c)
                      for c in snap["coordinators"]) or "none"
    online_aggs = sum(a["state"] == "online" and not a["stale"] for a in aggs)
    trouble = [f"{n} {what}" for n, what in (
        (sum(a["stale"] for a in aggs), "stale"),
        (sum(bool(_failing_now(a) or a["saves_failing"] or a["missing"]) for a in aggs),
         "failing")) if n]
    line = (f"coordinator {coord} · aggregators {online_aggs}/{len(aggs)} online"
            + (f" ({', '.join(trouble)})" if trouble else "")
            + f" · agents {states['online']}/{len(agents)} online")
    others = [f"{states[s]} {s}" for s in ("offline", "lost") if states[s]]
    if states["unknown"]:
        others.append(f"{states['unknown']} never seen")
    if stale := sum(a["stale"] for a in agents):
        others.append(f"{stale} stale")
    if others:
        line += f" ({', '.join(others)})"
    return Text(f"{line} · roster serial {snap['roster_serial']}", style="bold")


def jobs_table(snap: dict[str, Any]) -> Table:
    table = Table("job", "model", "app", "state", "version", "ε", "evaluation", "declined",
                  "missing sites", "reason", title="jobs", title_justify="left")
    for j in snap["jobs"]:
        eps = "-" if j["epsilon"] is None else f"{j['epsilon']:.2f}"
        missing = "; ".join(f"{a}: {why}" for a, why in sorted(j["missing"].items()))
        table.add_row(escape(j["job"]), escape(j["model"]), escape(j["app"]),
                      _state(j["state"]), f"{j['version']}/{j['rounds']}", eps,
                      escape(j["evaluation"]), str(j["declines"] or "-"),
                      f"[red]{escape(missing)}[/]" if missing else "-", escape(j["reason"]))
    if not snap["jobs"]:
        table.add_row("[dim]none yet[/]", *[""] * 9)
    return table


def services_table(snap: dict[str, Any]) -> Table:
    table = Table("node", "state", "agents", "job", "block", "round", "stage", "rounds",
                  "updates", "round s (last/mean)", "rejected", "in / out", "seen", "health",
                  title="coordinator and aggregators", title_justify="left")
    for n in [*snap["coordinators"], *snap["aggregators"]]:
        agents = ""
        if "agents" in n:
            a = n["agents"]
            agents = f"{a['online']}/{a['enrolled']}" + "".join(
                f" [{STYLE[s]}]{a[s]} {s}[/]" for s in ("lost", "offline") if a[s])
        table.add_row(escape(n["id"]), _node_state(n), agents, *_activity(n),
                      *_work(n), _health(n))
    return table


def _health(n: dict[str, Any]) -> str:
    """A service's problems in red, then whether it restarted."""
    parts = [f"[red]{escape(p)}[/]" for p in n["problems"]]
    if n["restarted"]:
        parts.append(f"[yellow]{escape(n['restarted'])}[/]")
    return "; ".join(parts)


def agents_table(snap: dict[str, Any]) -> Table:
    table = Table("agent", "aggregator", "state", "job", "block", "round", "stage", "rounds",
                  "round s (last/mean)", "rejected", "in / out", "seen",
                  title="agents", title_justify="left")
    for n in snap["agents"]:
        work = _work(n)
        table.add_row(escape(n["id"]), escape(n["group"] or ""), _node_state(n),
                      *_activity(n), work[0], *work[2:])
    return table


def rejections_table(snap: dict[str, Any]) -> Table:
    table = Table("reason", "messages", "refused by", title="rejected messages",
                  title_justify="left")
    for reason, by in snap["rejections"].items():
        table.add_row(escape(reason), str(sum(by.values())),
                      escape(_pairs(by)))
    return table


def _state(state: str) -> str:
    return f"[{STYLE.get(state, '')}]{state}[/]" if state in STYLE else escape(state)


def state_text(n: dict[str, Any]) -> str:
    """A node's state in words: its status, or "stale (28 s)" when it says online but its
    telemetry is too old to believe it."""
    return f"stale ({human_s(n['seen_s'])})" if n["stale"] else n["state"]


def _node_state(n: dict[str, Any]) -> str:
    return f"[bold red]{escape(state_text(n))}[/]" if n["stale"] else _state(n["state"])


def _activity(n: dict[str, Any]) -> list[str]:
    a = n["activity"]
    if not a:
        return ["", "", "", ""]
    return [escape(a["job"]), _num(a["block"]), _num(a["round"]), escape(a["stage"])]


def _work(n: dict[str, Any]) -> list[str]:
    """rounds, updates, round seconds, rejected, bytes in / out, seen."""
    c, r = n["counts"], n["round_s"]
    if c is None:
        return ["", "", "", "", "", "[dim]no telemetry[/]"]
    times = "-"
    if r["count"]:
        times = f"{r['last_s']:.1f} / {r['total_s'] / r['count']:.1f}"
    rejected = sum(n["rejections"].values())
    updates = str(c["updates"]) if n["role"] == Role.AGGREGATOR.value else ""
    return [str(c["rounds"]), updates, times,
            f"[red]{rejected}[/]" if rejected else "0",
            f"{human_bytes(c['bytes_in'])} / {human_bytes(c['bytes_out'])}",
            f"{n['seen_s']:.0f} s ago"]


def _num(v: int | None) -> str:
    return "" if v is None else str(v)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
