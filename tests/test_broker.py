"""fleet.ops.broker: the Mosquitto launcher."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from fleet.ops import broker as broker_mod
from fleet.ops.acl import acl
from fleet.ops.broker import Broker, BrokerTls, find_mosquitto, free_port, mosquitto_config
from hfl.crypto.pki import Pki
from hfl.wire.topics import Topics


def test_config_raises_queue_limits_and_optional_settings(tmp_path: Path) -> None:
    conf = mosquitto_config(port=1234, persistence_dir=tmp_path, max_packet_size=65536,
                            extra="# tls goes here")
    lines = conf.splitlines()
    assert "listener 1234 127.0.0.1" in lines
    assert "max_queued_messages 100000" in lines
    assert f"max_queued_bytes {1 << 30}" in lines
    assert "set_tcp_nodelay true" in lines
    assert "persistence true" in lines
    assert f"persistence_location {tmp_path}/" in lines
    assert "max_packet_size 65536" in lines
    assert lines[-1] == "# tls goes here"


def test_config_bounds_packets_just_above_hfls_chunks_by_default() -> None:
    lines = mosquitto_config(port=1234).splitlines()
    assert "persistence false" in lines and not [ln for ln in lines if "autosave" in ln]
    # A 256 KiB chunk (its HFC1 header included), then the PUBLISH header and topic.
    assert f"max_packet_size {256 * 1024 + 1024}" in lines
    assert "max_packet_size" not in mosquitto_config(port=1234, max_packet_size=None)


def test_persistence_is_saved_every_second_not_only_on_a_clean_stop(tmp_path: Path) -> None:
    lines = mosquitto_config(port=1234, persistence_dir=tmp_path).splitlines()
    assert lines.index("persistence true") < lines.index("autosave_interval 1")
    assert "autosave_on_changes false" in lines  # by time: a busy broker is not saved per message


def test_tls_config_replaces_the_anonymous_listener(tmp_path: Path) -> None:
    pki = Pki.init(tmp_path / "pki")
    pki.issue("site-a", "aggregator")
    tls = BrokerTls.from_pki(pki, "broker", tmp_path / "b", Topics(), hosts=["broker.lan"])
    assert stat.S_IMODE(os.stat(tls.key).st_mode) == 0o600
    assert tls.acl_file.read_text() == acl(pki.roster(), Topics())
    assert tls.ca.read_bytes() == pki.ca_path.read_bytes()
    conf = mosquitto_config(port=8883, host="0.0.0.0", tls=tls.under(Path("/etc/hfl")))
    lines = conf.splitlines()
    assert "allow_anonymous true" not in lines and "allow_anonymous false" in lines
    assert lines.index("listener 8883 0.0.0.0") < lines.index("cafile /etc/hfl/ca.crt")
    assert "crlfile /etc/hfl/crl.pem" in lines and "acl_file /etc/hfl/acl" in lines
    assert "max_queued_messages 100000" in lines
    with pytest.raises(ValueError, match="does not cover 10.9.9.9.*--force"):
        BrokerTls.from_pki(pki, "broker", tmp_path / "b", Topics(), hosts=["10.9.9.9"])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.broker
def test_start_stop_frees_the_port(mosquitto: str, tmp_path: Path) -> None:
    b = Broker(tmp_path, port=free_port())
    b.start()
    assert b.running and not port_is_free(b.port)
    with socket.create_connection((b.host, b.port), timeout=1):
        pass
    b.stop()
    assert not b.running and port_is_free(b.port)
    assert (tmp_path / "mosquitto.conf").read_text().startswith("per_listener_settings false")
    assert "running" in b.log_path.read_text()


@pytest.mark.broker
def test_reload_waits_for_the_broker_to_reread_its_config(mosquitto: str, tmp_path: Path) -> None:
    with Broker(tmp_path) as b:
        b.reload()
        b.reload()
        assert b.running and b.log_path.read_text().count("Reloading config.") == 2
    with pytest.raises(RuntimeError, match="not running"):
        b.reload()


@pytest.mark.broker
def test_start_failure_reports_the_log(mosquitto: str, tmp_path: Path) -> None:
    b = Broker(tmp_path, extra="no_such_option 1")
    with pytest.raises(RuntimeError, match="no_such_option"):
        b.start()
    assert not b.running


def test_missing_binary_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(broker_mod, "FALLBACK_PATHS", (str(tmp_path / "mosquitto"),))
    with pytest.raises(RuntimeError, match="apt-get install mosquitto"):
        find_mosquitto()
