"""ONNX export: onnxruntime agrees with torch for every built-in task and a user's
regression, at any batch size."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from coordinator.export import export_onnx, onnx_predict
from hfl.models.tasks import TaskSet, unflatten_into
from hfl.models.zoo import BUILTIN

TASKS = TaskSet([*BUILTIN.values(), "tests.task_examples:Line", "tests.task_examples:Normed"])
OPTIONS = {"mnist-cnn": {"input_shape": [1, 28, 28], "num_classes": 10},
           "mnist-2nn": {"input_shape": [1, 28, 28], "num_classes": 10},
           "mlp": {"input_shape": [1, 8, 8], "num_classes": 10},
           "logreg": {"input_shape": [1, 8, 8], "num_classes": 10},
           "line": {}, "normed": {}}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_onnx_matches_torch(name: str) -> None:
    p = TASKS.prepare(name, OPTIONS[name])
    model = p.build()
    unflatten_into(model, p.init_params(seed=7))
    example = p.example_input()
    blob = export_onnx(model, example)
    model.eval()
    rng = np.random.default_rng(0)
    for batch in (3, 1, 17):  # the export traced batch 2: the batch axis must be dynamic
        x = rng.random((batch, *example[0].shape[1:]), dtype=np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        got = onnx_predict(blob, x)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_export_names_io_and_leaves_model_alone() -> None:
    p = TASKS.prepare("mlp", OPTIONS["mlp"])
    model = p.build().train()
    blob = export_onnx(model, p.example_input())
    assert model.training
    proto = onnx.load_from_string(blob)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("input", "output")
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 8, 8]
    # Self-contained: the weights are inside, no external data files.
    assert all(not t.external_data for t in proto.graph.initializer)
    assert len(blob) > 4 * p.layout.num_params


def test_several_inputs_and_outputs_are_numbered() -> None:
    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple:
            y = self.fc(a + b)
            return y, y.sum(dim=1)

    proto = onnx.load_from_string(export_onnx(Two(), (torch.zeros(2, 3), torch.zeros(2, 3))))
    assert [i.name for i in proto.graph.input] == ["input_0", "input_1"]
    assert [o.name for o in proto.graph.output] == ["output_0", "output_1"]
