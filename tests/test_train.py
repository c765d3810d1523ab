"""The trainer on the bundled digits: it learns, it is seeded, and the delta is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_agent import data
from edge_agent.train import TrainConfig, evaluate, local_update, pick_device, train
from hfl import models

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> tuple[data.Dataset, data.Dataset]:
    return data.split(data.load_digits(), 0.25, seed=0)


def _model(seed: int = 0) -> torch.nn.Module:
    model = models.build("mlp", (1, 8, 8), 10)
    models.unflatten_into(model, models.init_params("mlp", (1, 8, 8), 10, seed))
    return model


def test_training_reduces_loss_and_learns(digits: tuple[data.Dataset, data.Dataset]) -> None:
    tr, te = digits
    model = _model()
    before = evaluate(model, te, device=CPU)
    assert before["samples"] == len(te) and before["accuracy"] < 0.3
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.1, momentum=0.5)
    m = train(model, tr, cfg, device=CPU, seed=0)
    assert m["samples"] == len(tr)
    assert m["steps"] == 2 * -(-len(tr) // 32)
    after = evaluate(model, te, device=CPU)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > 0.85
    assert m["loss"] < before["loss"]


def test_training_is_deterministic_for_a_seed(digits: tuple[data.Dataset, data.Dataset]) -> None:
    tr = digits[0].subset(np.arange(200))
    cfg = TrainConfig(batch_size=16)
    runs = []
    for seed in (1, 1, 2):
        model = _model()
        train(model, tr, cfg, device=CPU, seed=seed)
        runs.append(models.flatten(model))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])  # another shuffle, another result


def test_local_update_delta_is_the_parameter_change(
    digits: tuple[data.Dataset, data.Dataset],
) -> None:
    tr = digits[0].subset(np.arange(300))
    params = models.init_params("mlp", (1, 8, 8), 10, seed=4)
    wire = np.frombuffer(params.tobytes(), dtype=np.float32)  # read-only, as off the wire
    model = models.build("mlp", (1, 8, 8), 10)
    delta, m = local_update(model, wire, tr, TrainConfig(lr=0.05), device=CPU, seed=0)
    assert delta.dtype == np.float32 and delta.shape == params.shape
    assert np.abs(delta).max() > 0
    np.testing.assert_array_equal(delta, models.flatten(model) - params)
    np.testing.assert_allclose(params + delta, models.flatten(model), atol=1e-6)
    assert m["samples"] == 300 and m["steps"] == 10


def test_empty_dataset_gives_zeros() -> None:
    empty = data.Dataset(np.zeros((0, 1, 8, 8)), np.zeros(0, np.int64))
    model = _model()
    assert evaluate(model, empty, device=CPU) == {"loss": 0.0, "accuracy": 0.0, "samples": 0}
    before = models.flatten(model)
    assert train(model, empty, TrainConfig(), device=CPU, seed=0)["steps"] == 0
    np.testing.assert_array_equal(models.flatten(model), before)


def test_evaluate_batches_agree_and_restore_mode(
    digits: tuple[data.Dataset, data.Dataset],
) -> None:
    te = digits[1]
    model = _model().train()
    a = evaluate(model, te, device=CPU, batch_size=7)
    b = evaluate(model, te, device=CPU)
    assert a["accuracy"] == b["accuracy"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert model.training


def test_pick_device_and_config_validation() -> None:
    assert pick_device("cpu") == CPU
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            pick_device("cuda")
    with pytest.raises(ValueError):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError):
        TrainConfig(momentum=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_local_update_on_cuda_matches_shapes(digits: tuple[data.Dataset, data.Dataset]) -> None:
    params = models.init_params("mlp", (1, 8, 8), 10, seed=0)
    model = models.build("mlp", (1, 8, 8), 10)
    dev = pick_device("cuda")
    delta, m = local_update(model, params, digits[0], TrainConfig(), device=dev, seed=0)
    assert delta.dtype == np.float32 and np.isfinite(delta).all() and m["loss"] > 0
    np.testing.assert_array_equal(delta, models.flatten(model) - params)
