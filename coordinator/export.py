"""ONNX export of a global model version, so apps can serve it without PyTorch."""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

OPSET = 17  # old enough for the onnxruntime builds shipped on boards, new enough for our ops


def export_onnx(model: nn.Module, input_shape: Sequence[int]) -> bytes:
    """One self-contained ONNX file: `input` (batch, *input_shape) -> `logits` (batch, classes),
    with a dynamic batch axis. The caller's model is left untouched (device and mode)."""
    # A CPU copy in eval mode: export traces, and must not move or switch the caller's model.
    m = copy.deepcopy(model).to("cpu").eval()
    # Batch 2, not 1: a traced batch of 1 can get folded into constant shapes.
    example = torch.zeros((2, *(int(d) for d in input_shape)), dtype=torch.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but 20x faster than the dynamo one here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            m,
            (example,),
            buf,
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
        )
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    return data


def onnx_predict(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """Logits for a batch `x` from an exported model, on onnxruntime's CPU provider."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: keep the optimizer's notices out of app logs
    session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": np.ascontiguousarray(x, dtype=np.float32)})
    return logits
