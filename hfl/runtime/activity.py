"""What a node is busy with, read off the actions its machine returns: no machine is asked.

The runner sees every action a machine emits (`Node.dispatch`): the messages it sends carry
job, round and stage in their headers, and its `Note`s name what just happened. Folding
them gives the service's one-line status for systemd (`STATUS=`) and the structured fields
of its journal entries (JOB, ROUND, BLOCK, AGG, ROLE, NODE); machines stay sans-I/O.

Two counters, so that neither jumps back and forth: `round` is the edge round (the round
an aggregator opens for its agents), `block` the global round, numbered by the model
version it trains from (a task, a partial, a job's status).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from hfl.runtime.actions import Note, Send
from hfl.wire.messages import Kind

# What the `round` in a sent message's header counts.
ROUND_OF: dict[Kind, str] = {
    Kind.ROUND: "round", Kind.UPDATE: "round",
    Kind.TASK: "block", Kind.PARTIAL: "block", Kind.JOB: "block",
}


@dataclass(frozen=True)
class Activity:
    role: str
    node: str
    agg: str | None = None  # an agent's aggregator, or the aggregator itself
    job: str = ""
    round: int | None = None
    block: int | None = None
    stage: str = ""

    def after(self, action: Any) -> Activity:
        """The activity once `action` is carried out; self when it says nothing new."""
        if isinstance(action, Send):
            if not action.job or action.kind is Kind.ACK:
                return self  # status, roster: not about a job; an ack: about another's step
            counter = ROUND_OF.get(action.kind)
            counts = {counter: action.round} if counter else {}
            return self._on(action.job, action.stage, **counts)
        if isinstance(action, Note) and isinstance(action.fields.get("job"), str):
            f = action.fields
            counts = {k: f[k] for k in ("round", "block") if isinstance(f.get(k), int)}
            return self._on(f["job"], action.event, **counts)
        return self

    def _on(self, job: str, stage: str, **counts: int) -> Activity:
        if job != self.job:  # another job's counters start afresh
            return replace(self, job=job, stage=stage, round=counts.get("round"),
                           block=counts.get("block"))
        new = replace(self, stage=stage, round=counts.get("round", self.round),
                      block=counts.get("block", self.block))
        return self if new == self else new

    @property
    def status(self) -> str:
        """`agent a1 (site-a): job j1, block 2, round 13: masked`."""
        who = f"{self.role} {self.node}" + (f" ({self.agg})" if self.agg else "")
        if not self.job:
            return f"{who}: serving, no job yet"
        where = [f"job {self.job}"]
        where += [f"block {self.block}"] if self.block is not None else []
        where += [f"round {self.round}"] if self.round is not None else []
        return f"{who}: {', '.join(where)}" + (f": {self.stage}" if self.stage else "")


def journal_fields(a: Activity) -> dict[str, str]:
    """The journal fields for a log entry written while the node is on `a` (only the
    known ones: `journalctl JOB=j1` then finds every line of that job)."""
    fields = {"ROLE": a.role, "NODE": a.node, "AGG": a.agg, "JOB": a.job,
              "ROUND": a.round, "BLOCK": a.block}
    return {k: str(v) for k, v in fields.items() if v is not None and v != ""}


class JournalContext(logging.Filter):
    """Stamps each log record with the current activity's journal fields (journald's
    handler sends upper-case record attributes as fields); set by the service loop."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in self.fields.items():
            if not hasattr(record, k):  # a caller's own `extra=` wins
                setattr(record, k, v)
        return True


context = JournalContext()  # one per process: a service serves one node
