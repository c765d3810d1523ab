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


def io_names(prefix: str, n: int) -> list[str]:
    """`input`/`output` for one tensor, `input_0`, `input_1`, ... for several."""
    return [prefix] if n == 1 else [f"{prefix}_{i}" for i in range(n)]


def export_onnx(model: nn.Module, example: Sequence[torch.Tensor]) -> bytes:
    """One self-contained ONNX file from a task's example batch: inputs `input` (or
    `input_0`, ...) to outputs `output` (or `output_0`, ...), with a dynamic batch axis on
    each. The caller's model is left untouched (device and mode)."""
    # A CPU copy in eval mode: export traces, and must not move or switch the caller's model.
    m = copy.deepcopy(model).to("cpu").eval()
    example = tuple(t.to("cpu") for t in example)
    with torch.no_grad():
        out = m(*example)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    inputs, outputs = io_names("input", len(example)), io_names("output", n_out)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but 20x faster than the dynamo one here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            m,
            example,
            buf,  # type: ignore[arg-type]  # torch's stub names paths only; a file object works
            dynamo=False,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in inputs + outputs},
            opset_version=OPSET,
            do_constant_folding=True,
        )
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    return data


def onnx_predict(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """The first output for a batch `x` (the first input) from an exported model, on
    onnxruntime's CPU provider."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: keep the optimizer's notices out of app logs
    session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(x, dtype=np.float32)}
    return session.run([session.get_outputs()[0].name], feed)[0]
