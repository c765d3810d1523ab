"""The model registry keeps every version it is given, once: nothing is written over."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coordinator.registry import Registry


def test_a_stored_version_is_never_written_over(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry")
    first = reg.save_version("r1-m", "m", 1, {"w": np.ones(2, np.float32)}, b"first",
                             {"agents": 3})
    again = reg.save_version("r1-m", "m", 1, {"w": np.zeros(2, np.float32)}, b"second",
                             {"agents": 9})
    assert again == first and first.onnx.read_bytes() == b"first"
    assert [v.metrics for v in reg.versions("r1-m")] == [{"agents": 3}]
    reg.save_version("r1-m", "m", 2, {"w": np.ones(2, np.float32)}, b"v2", {})
    assert [v.version for v in reg.versions("r1-m")] == [1, 2]
    assert [v.version for v in reg.versions("r1-m", 2)] == [2]
