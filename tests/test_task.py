"""The task API: a user's task is found, its layout pinned, trained and evaluated by the
default loops, and whatever it does wrong becomes a decline that names it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_agent.machine import Declined, Train, Update
from edge_agent.runner import LocalData, LocalTrainer
from hfl.models.tasks import Layout, TaskSet, flatten, load
from hfl.task import DataError, Round, Samples, Source, TaskError, check_metrics
from hfl.wire.messages import ModelSpec
from tests import task_examples

LINE = "tests.task_examples:Line"
CPU = torch.device("cpu")


def spec(task: str = "line", **kw) -> ModelSpec:
    return ModelSpec(name="m", task=task, dataset="d", aggregators=["a"], **kw)


def test_a_task_is_found_by_reference_and_by_entry_point() -> None:
    assert load(LINE) is task_examples.Line
    assert load("mlp").name == "mlp"  # hfl's own, through the entry-point group
    for ref, why in (("tests.task_examples:Nope", "cannot import"),
                     ("no_such_module:Task", "cannot import"),
                     ("tests.task_examples:NotATask", "not a subclass"),
                     ("not-installed", "not installed")):
        with pytest.raises(TaskError, match=why):
            load(ref)


def test_two_tasks_of_one_name_are_refused() -> None:
    class Other(task_examples.Line):
        pass

    with pytest.raises(TaskError, match="two tasks are named 'line'"):
        TaskSet([LINE, Other])


def test_resolve_fills_in_what_the_task_declares() -> None:
    tasks = TaskSet([LINE])
    got, p = tasks.resolve(spec(options={"slope": 2.0}, epochs=3))
    assert got.task_version == "2" and got.layout == p.layout.fingerprint
    assert [(m.name, m.reduce, m.better) for m in got.metrics] == [("rmse", "rms", "lower")]
    assert (got.epochs, got.batch_size, got.lr, got.momentum) == (3, 10, 0.01, 0.0)
    with pytest.raises(TaskError, match="version 9 asked for, 2 installed"):
        tasks.resolve(spec(task_version="9"))
    with pytest.raises(TaskError, match="layout 000000000000 asked for"):
        tasks.resolve(spec(layout="0" * 64))
    with pytest.raises(TaskError, match="slope"):
        tasks.resolve(spec(options={"slope": "steep"}))


def test_float_buffers_travel_and_integer_ones_stay() -> None:
    model = task_examples.Normed().model()
    names = [n for n, _, _ in Layout.of(model).entries]
    assert "0.running_mean" in names and "0.running_var" in names
    assert "0.num_batches_tracked" not in names
    assert Layout.of(model).num_params == 2 + 2 + 2  # weight, bias, 2 statistics, linear


def test_samples_are_checked_on_the_way_in() -> None:
    with pytest.raises(DataError, match=r"pts row 2: x is not finite"):
        Samples(np.array([[1.0], [2.0], [np.nan]]), np.zeros(3), "pts")
    with pytest.raises(DataError, match="y has 2 rows, x has 3"):
        Samples(np.zeros((3, 1)), np.zeros(2))
    with pytest.raises(DataError, match="numbers"):
        Samples(np.array(["a", "b"]))
    s = Samples(np.arange(10.0)[:, None], np.arange(10))
    assert s.x.dtype == np.float32
    train, test = s.split(0.3, seed=0)
    assert (len(train), len(test)) == (7, 3)
    assert sorted([*train.y, *test.y]) == list(range(10))


def test_default_fit_learns_and_is_seeded() -> None:
    task = task_examples.Line()
    data = task.data(Source("d", {"n": 200}))
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(0)
        model = task.model()
        before = task.evaluate(model, data, Round())
        fit = task.fit(model, data, Round(epochs=20, batch_size=10, lr=0.01, seed=seed))
        after = task.evaluate(model, data, Round())
        assert fit.samples == 200 and after.loss < 0.1 * before.loss
        assert after.metrics["rmse"] == pytest.approx(after.loss ** 0.5, rel=1e-5)
        runs.append(flatten(model))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])  # another shuffle, another result


def test_check_metrics_wants_exactly_the_declared_ones() -> None:
    task = task_examples.Line()
    assert check_metrics(task, {"rmse": 1.5}) == {"rmse": 1.5}
    with pytest.raises(TaskError, match="declares"):
        check_metrics(task, {"rmse": 1.0, "mae": 1.0})
    with pytest.raises(TaskError, match="not finite"):
        check_metrics(task, {"rmse": float("inf")})


# ---------------------------------------------------------------- the agent's trainer


def trainer_for(ref: str) -> tuple[LocalTrainer, ModelSpec, np.ndarray]:
    tasks = TaskSet([ref])
    cls = load(ref)
    whole = cls().data(Source("d", {"n": 60}))
    local = LocalData(*whole.split(0.25, seed=0))
    s, p = tasks.resolve(spec(cls.name))
    return LocalTrainer("agent-1", tasks, {"d": local}, CPU), s, p.init_params(0)


def test_a_healthy_task_gives_an_update_with_its_metrics() -> None:
    trainer, s, params = trainer_for(LINE)
    out = trainer(Train("j", 0, s, params))
    assert isinstance(out, Update)
    assert out.delta.shape == params.shape and np.abs(out.delta).max() > 0
    m = out.metrics
    assert (m.samples, m.eval_samples) == (45, 15) and set(m.eval_metrics) == {"rmse"}


@pytest.mark.parametrize(("ref", "reason", "words"), [
    ("tests.task_examples:Exploding", "bad-update", "not finite"),
    ("tests.task_examples:Raising", "task-error", "RuntimeError: the sensor driver is gone"),
    ("tests.task_examples:WrongShapes", "task-error", "shape"),
])
def test_a_failing_task_is_a_decline_that_names_it(ref: str, reason: str, words: str) -> None:
    trainer, s, params = trainer_for(ref)
    out = trainer(Train("j", 0, s, params))
    assert isinstance(out, Declined) and out.reason == reason and words in out.detail


def test_another_version_or_layout_on_the_board_is_refused() -> None:
    trainer, s, params = trainer_for(LINE)
    cases = (
        (s.model_copy(update={"task_version": "1"}), params, "task-version", "2 is installed"),
        (s.model_copy(update={"layout": "f" * 64}), params, "task-layout", "ffffffffffff"),
        (s, np.zeros(params.size + 1, np.float32), "task-layout", f"({params.size + 1})"),
        (s.model_copy(update={"options": {"slope": []}}), params, "task-error", "slope"),
    )
    for job_spec, p, reason, words in cases:
        out = trainer(Train("j", 0, job_spec, p))
        assert isinstance(out, Declined) and out.reason == reason and words in out.detail, out


def test_unusable_data_is_a_decline_naming_the_source() -> None:
    class Broken:
        def load(self, task):  # noqa: ANN001, ANN202
            raise DataError("readings.csv", "not a number in ['x']", row=7)

    trainer, s, params = trainer_for(LINE)
    trainer.data["d"] = Broken()
    out = trainer(Train("j", 0, s, params))
    assert out == Declined("bad-data", "readings.csv row 7: not a number in ['x']")
    trainer.data["d"] = LocalData(Samples(np.zeros((0, 1)), np.zeros((0, 1))),
                                  Samples(np.zeros((0, 1)), np.zeros((0, 1))))
    assert trainer(Train("j", 0, s, params)).reason == "no-data"
