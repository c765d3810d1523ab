"""The one exception a decoder or a state machine raises for bad input."""

from __future__ import annotations


class Rejected(Exception):
    """Input refused with a short machine-readable reason (a counter key) and a detail.

    Decoders raise it for anything malformed, oversized, unsigned, stale or unexpected;
    runners count it by `reason` and log `detail`. It never means a bug on our side.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
