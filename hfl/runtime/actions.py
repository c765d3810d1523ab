"""What a state machine asks its runner to do. Machines return these; runners do the I/O."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hfl.wire.messages import Kind


@dataclass(frozen=True)
class Send:
    """Sign and publish one envelope (QoS 1; retained when `retain`), its tensors sealed for
    the ids in `to` when that is not empty."""

    kind: Kind
    topic: str
    job: str
    round: int
    stage: str
    meta: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    retain: bool = False
    to: tuple[str, ...] = ()


@dataclass(frozen=True)
class Note:
    """Something worth a log line, a progress bar tick or a metric; no effect on the protocol.

    `level` is the log level the runner writes it at (a machine does no I/O: it says how
    loud); `text`, when given, is that line for an operator instead of the raw fields."""

    event: str
    fields: dict[str, Any] = field(default_factory=dict)
    level: int = logging.DEBUG
    text: str = ""


def log_note(logger: logging.Logger, who: str, note: Note) -> None:
    """Write `note` at its level: its text, or its event and fields."""
    if logger.isEnabledFor(note.level):
        if note.text:
            logger.log(note.level, "%s: %s", who, note.text)
        else:
            logger.log(note.level, "%s: %s %s", who, note.event, note.fields)


Action = Any  # Send | Note | a role's own action (Train, NewVersion)


def effects(actions: list[Action]) -> bool:
    """Whether any of `actions` reaches beyond the machine (anything but a `Note`)."""
    return any(not isinstance(a, Note) for a in actions)
