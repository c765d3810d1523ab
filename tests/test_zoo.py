"""hfl's own tasks on the task API: sizes from the papers, the flat vector, seeded init."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from hfl.models.tasks import Layout, TaskSet, flatten, state_arrays, unflatten_into
from hfl.models.zoo import BUILTIN
from hfl.task import TaskError

MNIST = {"input_shape": [1, 28, 28], "num_classes": 10}
DIGITS = {"input_shape": [1, 8, 8], "num_classes": 10}
TASKS = TaskSet(BUILTIN.values())


def size(name: str, options: dict) -> int:
    return TASKS.prepare(name, options).layout.num_params


def test_param_counts_match_the_fedavg_paper() -> None:
    # McMahan et al. 2017 report 1,663,370 (CNN) and 199,210 (2NN) parameters.
    assert size("mnist-cnn", MNIST) == 1_663_370
    assert size("mnist-2nn", MNIST) == 199_210
    assert size("mlp", DIGITS) == 64 * 128 + 128 + 128 * 10 + 10
    assert size("logreg", {"input_shape": [3, 4], "num_classes": 5}) == 12 * 5 + 5


def test_the_builtin_tasks_are_installed_entry_points() -> None:
    installed = TaskSet.everything_installed()
    assert set(BUILTIN) <= set(installed.names())
    assert all(installed.classes[n] is BUILTIN[n] for n in BUILTIN)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_task_maps_a_batch_to_logits(name: str) -> None:
    opts = {**(MNIST if name.startswith("mnist") else DIGITS), "num_classes": 7}
    p = TASKS.prepare(name, opts)
    model = p.build()
    (x,) = p.example_input()
    assert model(torch.zeros(4, *x.shape[1:])).shape == (4, 7)
    assert [n for n, _, _ in p.layout.entries] == list(model.state_dict())
    assert p.layout.num_params == sum(t.numel() for t in model.parameters())


def test_bad_options_are_refused_with_the_field() -> None:
    with pytest.raises(TaskError, match="input_shape"):
        TASKS.prepare("mnist-cnn", DIGITS)
    with pytest.raises(TaskError, match="num_classes"):
        TASKS.prepare("mlp", {"input_shape": [1, 8, 8], "num_classes": 1})
    with pytest.raises(TaskError, match="hidden"):
        TASKS.prepare("mlp", {**DIGITS, "hidden": 3})
    with pytest.raises(TaskError, match="needs the option input_shape"):
        TASKS.prepare("mlp", {})
    with pytest.raises(TaskError, match="not allowed"):
        TASKS.prepare("resnet", DIGITS)


def test_fingerprint_follows_names_shapes_and_dtypes() -> None:
    a = TASKS.prepare("mlp", DIGITS).layout
    assert a == TASKS.prepare("mlp", dict(DIGITS)).layout
    assert a.fingerprint != TASKS.prepare("mlp", {**DIGITS, "num_classes": 9}).layout.fingerprint
    assert a.fingerprint != TASKS.prepare("logreg", DIGITS).layout.fingerprint
    renamed = Layout(tuple((f"x.{n}", s, d) for n, s, d in a.entries))
    halved = Layout(tuple((n, s, "float16") for n, s, d in a.entries))
    assert len({a.fingerprint, renamed.fingerprint, halved.fingerprint}) == 3
    assert a.num_params == renamed.num_params == halved.num_params


def test_flatten_is_a_contiguous_float32_copy() -> None:
    model = TASKS.prepare("mlp", DIGITS).build()
    vec = flatten(model)
    assert vec.dtype == np.float32 and vec.flags.c_contiguous
    vec[:] = 0
    assert flatten(model).any()  # the model did not change with the copy


def test_unflatten_round_trip_changes_outputs() -> None:
    p = TASKS.prepare("mnist-2nn", MNIST)
    a, b = p.build(), p.build()
    x = torch.rand(5, 1, 28, 28)
    assert not torch.allclose(a(x), b(x))
    unflatten_into(b, flatten(a))
    assert torch.equal(a(x), b(x))
    # Each slice lands in its own entry, in layout order.
    vec = np.arange(p.layout.num_params, dtype=np.float32)
    unflatten_into(b, vec)
    (_, s0, _), (name, shape, _) = p.layout.entries[:2]
    off = int(np.prod(s0))
    np.testing.assert_array_equal(b.state_dict()[name].numpy(),
                                  vec[off:off + int(np.prod(shape))].reshape(shape))


def test_unflatten_from_read_only_bytes_without_warnings() -> None:
    p = TASKS.prepare("logreg", DIGITS)
    vec = np.frombuffer(p.init_params(3).tobytes(), np.float32)
    assert not vec.flags.writeable
    model = p.build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unflatten_into(model, vec)
    np.testing.assert_array_equal(flatten(model), vec)


def test_unflatten_rejects_wrong_length_and_dtype() -> None:
    p = TASKS.prepare("logreg", DIGITS)
    model, n = p.build(), p.layout.num_params
    with pytest.raises(ValueError, match=str(n)):
        unflatten_into(model, np.zeros(n - 1, np.float32))
    with pytest.raises(ValueError, match="float32"):
        unflatten_into(model, np.zeros(n, np.float64))
    with pytest.raises(ValueError):
        unflatten_into(model, np.zeros((1, n), np.float32))


def test_state_arrays_load_into_a_fresh_model() -> None:
    p = TASKS.prepare("mnist-cnn", MNIST)
    src = p.build()
    arrays = state_arrays(src)
    assert all(a.dtype == np.float32 for a in arrays.values())
    dst = p.build()
    dst.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=True)
    np.testing.assert_array_equal(flatten(dst), flatten(src))


def test_init_params_is_seeded_and_leaves_global_rng_alone() -> None:
    p = TASKS.prepare("mnist-cnn", MNIST)
    state = torch.random.get_rng_state()
    a = p.init_params(seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    np.testing.assert_array_equal(a, p.init_params(seed=1))
    b = p.init_params(seed=2)
    assert a.shape == b.shape == (1_663_370,) and a.dtype == np.float32
    assert not np.array_equal(a, b)
    # torch's default init: the first conv's fan-in is 25, its bound 1/5.
    conv1 = a[: 32 * 25]
    assert np.abs(conv1).max() <= 0.2 and conv1.std() > 0.05
