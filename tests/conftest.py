"""Shared fixtures: a real Mosquitto per test, on a free port (never the system broker)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.ops.broker import Broker, find_mosquitto


@pytest.fixture(scope="session")
def mosquitto() -> str:
    """Path of the mosquitto binary; fail (not skip) without it: CI installs it."""
    try:
        return find_mosquitto()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def broker(mosquitto: str, tmp_path: Path) -> Iterator[Broker]:
    """A started broker with its run dir (config, log) in the test's tmp_path."""
    with Broker(tmp_path / "broker") as b:
        yield b


@pytest.fixture(autouse=True)
def _hfl_log_level() -> Iterator[None]:
    """A quiet command run in-process (CliRunner) sets the hfl logger to errors only: give
    the next test its warnings back, whatever order the tests run in."""
    yield
    logging.getLogger("hfl").setLevel(logging.NOTSET)
