"""Follow jobs as an app would: receive each model version, score it on held-out data with
onnxruntime, and stop when every job has finished."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from edge_agent.data import Dataset
from hfl.app import App, JobStatus, ModelVersion


@dataclass(frozen=True)
class RoundRow:
    job: str
    round: int  # the model version
    accuracy: float  # on the app's held-out test set (NaN without one)
    loss: float
    agents: int
    dropped: int  # agents whose masks were recovered (secure aggregation)
    train_loss: float
    federated_accuracy: float  # agents' own evaluation of the model they started from
    epsilon: float | None = None  # privacy budget spent so far (DP jobs)

    def as_dict(self) -> dict:
        return asdict(self)


def score(version: ModelVersion, test: Dataset, batch: int = 1024) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of a version's ONNX model on `test`."""
    correct, loss = 0, 0.0
    for i in range(0, len(test), batch):
        logits = version.predict(test.x[i : i + batch]).astype(np.float64)
        y = test.y[i : i + batch]
        shifted = logits - logits.max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss -= float(logp[np.arange(len(y)), y].sum())
        correct += int((logits.argmax(axis=1) == y).sum())
    n = max(len(test), 1)
    return correct / n, loss / n


@dataclass
class Outcome:
    rows: list[RoundRow]
    status: dict[str, JobStatus]
    latest: dict[str, ModelVersion]

    def finished(self, job: str) -> bool:
        """The job's final status came, and with it every version it announced."""
        st = self.status.get(job)
        got = self.latest[job].meta.version if job in self.latest else 0
        return st is not None and st.finished and got >= st.meta.version


def follow(
    app: App,
    jobs: list[str],
    test: Dataset | None,
    timeout: float,
    on_row: Callable[[RoundRow], None] | None = None,
) -> Outcome:
    """Collect every version of `jobs` until they all end or `timeout` seconds pass."""
    out = Outcome([], {}, {})
    for event in app.events(timeout):
        if isinstance(event, JobStatus) and event.meta.job in jobs:
            out.status[event.meta.job] = event
        elif isinstance(event, ModelVersion) and event.meta.job in jobs:
            m = event.meta
            acc, loss = score(event, test) if test is not None else (float("nan"),) * 2
            row = RoundRow(m.job, m.version, acc, loss, m.agents, m.dropped,
                           m.metrics.train_loss, m.metrics.eval_accuracy, m.epsilon)
            out.latest[m.job] = event
            out.rows.append(row)
            if on_row:
                on_row(row)
        if all(out.finished(j) for j in jobs):
            break
    return out
