"""The model zoo: sizes from the papers, the flat vector, seeded init."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from hfl import models

MNIST = (1, 28, 28)


def test_param_counts_match_the_fedavg_paper() -> None:
    # McMahan et al. 2017 report 1,663,370 (CNN) and 199,210 (2NN) parameters.
    assert models.num_params(models.build("mnist-cnn", MNIST, 10)) == 1_663_370
    assert models.num_params(models.build("mnist-2nn", MNIST, 10)) == 199_210
    assert models.num_params(models.build("mlp", (1, 8, 8), 10)) == 64 * 128 + 128 + 128 * 10 + 10
    assert models.num_params(models.build("logreg", (3, 4), 5)) == 12 * 5 + 5


@pytest.mark.parametrize("arch", models.ARCHS)
def test_every_arch_maps_a_batch_to_logits(arch: str) -> None:
    shape = MNIST if arch == "mnist-cnn" else (1, 8, 8)
    model = models.build(arch, shape, 7)
    assert model(torch.zeros(4, *shape)).shape == (4, 7)
    lay = models.layout(model)
    assert [n for n, _ in lay] == list(model.state_dict())
    assert sum(int(np.prod(s)) for _, s in lay) == models.num_params(model)


def test_build_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mnist-cnn"):
        models.build("resnet", MNIST, 10)
    with pytest.raises(ValueError, match=r"\(1, 28, 28\)"):
        models.build("mnist-cnn", (1, 8, 8), 10)
    with pytest.raises(ValueError):
        models.build("mlp", (), 10)


def test_flatten_is_a_contiguous_float32_copy() -> None:
    model = models.build("mlp", (1, 8, 8), 10)
    vec = models.flatten(model)
    assert vec.dtype == np.float32 and vec.flags.c_contiguous
    assert vec.shape == (models.num_params(model),)
    vec[:] = 0
    assert models.flatten(model).any()  # the model did not change with the copy


def test_unflatten_round_trip_changes_outputs() -> None:
    a = models.build("mnist-2nn", MNIST, 10)
    b = models.build("mnist-2nn", MNIST, 10)
    x = torch.rand(5, *MNIST)
    assert not torch.allclose(a(x), b(x))
    models.unflatten_into(b, models.flatten(a))
    assert torch.equal(a(x), b(x))
    np.testing.assert_array_equal(models.flatten(b), models.flatten(a))
    # Each slice lands in its own parameter, in layout order.
    vec = np.arange(models.num_params(b), dtype=np.float32)
    models.unflatten_into(b, vec)
    name, shape = models.layout(b)[1]
    off = int(np.prod(models.layout(b)[0][1]))
    np.testing.assert_array_equal(
        b.state_dict()[name].numpy(), vec[off:off + int(np.prod(shape))].reshape(shape)
    )


def test_unflatten_from_read_only_bytes_without_warnings() -> None:
    model = models.build("logreg", (1, 8, 8), 10)
    vec = np.frombuffer(models.init_params("logreg", (1, 8, 8), 10, 3).tobytes(), np.float32)
    assert not vec.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models.unflatten_into(model, vec)
    np.testing.assert_array_equal(models.flatten(model), vec)


def test_unflatten_rejects_wrong_length_and_dtype() -> None:
    model = models.build("logreg", (1, 8, 8), 10)
    n = models.num_params(model)
    with pytest.raises(ValueError, match=str(n)):
        models.unflatten_into(model, np.zeros(n - 1, np.float32))
    with pytest.raises(ValueError, match="float32"):
        models.unflatten_into(model, np.zeros(n, np.float64))
    with pytest.raises(ValueError):
        models.unflatten_into(model, np.zeros((1, n), np.float32))


def test_state_dict_arrays_load_into_a_fresh_model() -> None:
    src = models.build("mnist-cnn", MNIST, 10)
    arrays = models.state_dict_arrays(src)
    assert all(a.dtype == np.float32 for a in arrays.values())
    dst = models.build("mnist-cnn", MNIST, 10)
    dst.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=True)
    np.testing.assert_array_equal(models.flatten(dst), models.flatten(src))


def test_init_params_is_seeded_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a = models.init_params("mnist-cnn", MNIST, 10, seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    np.testing.assert_array_equal(a, models.init_params("mnist-cnn", MNIST, 10, seed=1))
    b = models.init_params("mnist-cnn", MNIST, 10, seed=2)
    assert a.shape == b.shape == (1_663_370,) and a.dtype == np.float32
    assert not np.array_equal(a, b)
    # Same scale as torch's default init: the first conv's fan-in is 25.
    conv1 = a[: 32 * 25]
    assert np.abs(conv1).max() <= 0.2 and conv1.std() > 0.05
