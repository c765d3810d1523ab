"""Follow jobs as an app would: receive each model version, score it on held-out data with
onnxruntime and the task's own loss and metrics, and stop when every job has finished."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from application import App, JobStatus, ModelVersion, RequestReply
from hfl.models.tasks import TaskSet
from hfl.task import Evaluation, Samples, Task
from hfl.wire.messages import ModelMeta

NAN = float("nan")


@dataclass(frozen=True)
class RoundRow:
    job: str
    round: int  # the model version
    loss: float  # on the app's held-out data (NaN without any)
    metrics: dict[str, float]  # the task's metrics on it
    agents: int
    dropped: int  # agents whose masks were recovered (secure aggregation)
    train_loss: float
    federated_loss: float  # the agents' own evaluation of the model they started from
    federated: dict[str, float] = field(default_factory=dict)
    epsilon: float | None = None  # privacy budget spent so far (DP jobs)
    declines: int = 0  # agents that sat the block out

    def as_dict(self) -> dict:
        return asdict(self)


def score(task: Task, predict: Callable[[np.ndarray], np.ndarray], test: Samples,
          batch: int = 1024) -> Evaluation:
    """The task's loss and metrics of a model's outputs on `test`, the outputs computed in
    batches by `predict` (an exported model's onnxruntime session)."""
    out = np.concatenate([predict(test.x[i:i + batch]) for i in range(0, len(test), batch)])
    target = None if test.y is None else torch.from_numpy(np.ascontiguousarray(test.y))
    return task.score(torch.from_numpy(out), target)


def version_row(meta: ModelMeta, held_out: Evaluation | None) -> RoundRow:
    """A table row for a version's meta and its held-out evaluation."""
    m = meta.metrics
    return RoundRow(meta.job, meta.version, held_out.loss if held_out else NAN,
                    dict(held_out.metrics) if held_out else {}, meta.agents, meta.dropped,
                    m.train_loss, m.eval_loss if m.eval_samples else NAN, dict(m.eval_metrics),
                    meta.epsilon, meta.declines)


@dataclass
class Outcome:
    rows: list[RoundRow]
    status: dict[str, JobStatus]
    latest: dict[str, ModelVersion]
    refused: dict[str, str] = field(default_factory=dict)  # job → why the coordinator refused

    def finished(self, job: str) -> bool:
        """The job was refused, or its final status came with every version it announced."""
        if job in self.refused:
            return True
        st = self.status.get(job)
        got = self.latest[job].meta.version if job in self.latest else 0
        return st is not None and st.finished and got >= st.meta.version


def follow(
    app: App,
    jobs: list[str],
    tasks: TaskSet | None,
    test: Samples | None,
    timeout: float,
    on_row: Callable[[RoundRow], None] | None = None,
) -> Outcome:
    """Collect every version of `jobs` until they all end or `timeout` seconds pass, each
    scored on `test` by its own task (named in the version, with its options)."""
    out = Outcome([], {}, {})
    for event in app.events(timeout):
        if isinstance(event, JobStatus) and event.meta.job in jobs:
            out.status[event.meta.job] = event
        elif isinstance(event, RequestReply):
            for job in jobs:  # `{request_id}-{model}`: the refusal names the model
                if not job.startswith(f"{event.meta.request_id}-"):
                    continue  # the answer to another request (of ours, or in our name)
                model = job.removeprefix(f"{event.meta.request_id}-")
                why = event.meta.refused.get(model) or event.meta.refused.get("")
                if why and job not in event.meta.accepted:
                    out.refused[job] = why
        elif isinstance(event, ModelVersion) and event.meta.job in jobs:
            held_out = None
            if tasks is not None and test is not None and len(test):
                task = tasks.prepare(event.meta.task, event.meta.options).task
                held_out = score(task, event.predict, test)
            row = version_row(event.meta, held_out)
            out.latest[event.meta.job] = event
            out.rows.append(row)
            if on_row:
                on_row(row)
        if all(out.finished(j) for j in jobs):
            break
    return out

