"""ONNX export: onnxruntime agrees with torch for every arch, at any batch size."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from coordinator.export import export_onnx, onnx_predict
from hfl import models

SHAPES = {"mnist-cnn": (1, 28, 28), "mnist-2nn": (1, 28, 28), "mlp": (1, 8, 8),
          "logreg": (1, 8, 8)}


@pytest.mark.parametrize("arch", models.ARCHS)
def test_onnx_matches_torch(arch: str) -> None:
    shape = SHAPES[arch]
    model = models.build(arch, shape, 10)
    models.unflatten_into(model, models.init_params(arch, shape, 10, seed=7))
    blob = export_onnx(model, shape)
    rng = np.random.default_rng(0)
    for batch in (3, 1, 17):  # the export traced batch 2: the batch axis must be dynamic
        x = rng.random((batch, *shape), dtype=np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        got = onnx_predict(blob, x)
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_export_names_io_and_leaves_model_alone() -> None:
    model = models.build("mlp", (1, 8, 8), 10).train()
    blob = export_onnx(model, (1, 8, 8))
    assert model.training
    proto = onnx.load_from_string(blob)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == ("input", "logits")
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 8, 8]
    # Self-contained: the weights are inside, no external data files.
    assert all(not t.external_data for t in proto.graph.initializer)
    assert len(blob) > 4 * models.num_params(model)
