"""The one exception a decoder or a state machine raises for bad input."""

from __future__ import annotations


class Rejected(Exception):
    """Input refused with a short machine-readable reason (a counter key) and a detail.

    Decoders raise it for anything malformed, oversized, unsigned, stale or unexpected;
    runners count it by `reason` and log `detail`. It never means a bug on our side.
    `answer`: what a machine still sends about it (a refused request's reply to its app).
    """

    def __init__(self, reason: str, detail: str = "", answer: list | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.answer = answer or []


class TaskError(ValueError):
    """A task that cannot be used as declared (bad options, a broken model or layout, not
    installed). Here rather than in hfl.task so that reporting one needs no torch."""
