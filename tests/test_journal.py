"""Logging under systemd without systemd-python: journald's priority prefix, and only when
stderr really is the journal stream that JOURNAL_STREAM names."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hfl.cli import setup_logging, stderr_is_journal
from hfl.runtime import activity

try:
    from systemd.journal import JournalHandler  # type: ignore[import-not-found]
except ImportError:
    JournalHandler = None


@pytest.fixture
def fake_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[
        tuple[Path, Callable[[], None]]]:
    """A real file as sys.stderr (set during the test: pytest's capture resets it between
    phases)."""
    path = tmp_path / "stderr"
    with path.open("w") as f:
        yield path, lambda: monkeypatch.setattr(sys, "stderr", f)
    logging.getLogger().handlers.clear()


def journal_stream(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def test_journal_stream_must_be_our_stderr(fake_stderr, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    stderr_file, use = fake_stderr
    use()
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream(stderr_file))
    assert stderr_is_journal()
    other = tmp_path / "elsewhere"
    other.touch()
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream(other))  # inherited, stderr moved
    assert not stderr_is_journal()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not stderr_is_journal()


def test_under_journald_lines_carry_their_priority(fake_stderr,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    stderr_file, use = fake_stderr
    use()
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream(stderr_file))
    setup_logging()
    (handler,) = logging.getLogger().handlers
    if JournalHandler is not None:  # the [systemd] extra: entries with fields instead
        assert isinstance(handler, JournalHandler) and activity.context in handler.filters
        return
    log = logging.getLogger("hfl.test")
    log.error("boom")
    log.warning("careful")
    log.info("fine")
    handler.flush()
    assert stderr_file.read_text().splitlines() == [
        "<3>hfl.test: boom", "<4>hfl.test: careful", "<6>hfl.test: fine"]


def test_elsewhere_plain_lines_with_the_level(fake_stderr,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    stderr_file, use = fake_stderr
    use()
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup_logging()
    logging.getLogger("hfl.test").error("boom")
    logging.getLogger().handlers[0].flush()
    assert stderr_file.read_text() == "ERROR hfl.test: boom\n"
