"""The systemd units in deploy/systemd: what each must declare, `systemd-analyze verify` with
no warning at all, and an exposure score that stays low."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests import systemd_units as su

UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
ROLES = ("agent", "aggregator", "coordinator")
JETSON = UNITS / "hfl-agent.service.d" / "jetson-gpu.conf"

# The contract the Ansible roles and the services share (see hfl/runtime/sdnotify.py).
EXPECTED = {
    "Type": "notify",
    "NotifyAccess": "main",
    "Restart": "on-failure",
    "User": "hfl",
    "Group": "hfl",
    "StateDirectory": "hfl",
    "ConfigurationDirectory": "hfl",
    "UMask": "0077",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "PrivateUsers": "yes",
    "PrivateMounts": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectProc": "invisible",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
}
# Written empty on purpose: no capability at all, none in the bounding set.
EMPTY = ("CapabilityBoundingSet", "AmbientCapabilities")


def unit_path(role: str) -> Path:
    return UNITS / f"hfl-{role}.service"


def problems(unit: su.Unit, role: str) -> list[str]:
    """What a unit misses of the hardening and service contract (empty when it has all)."""
    out = []
    service = unit.get("Service", {})
    for key, want in EXPECTED.items():
        got = su.value(unit, "Service", key)
        if got != want:
            out.append(f"{key}={got!r}, want {want!r}")
    for key in EMPTY:
        if service.get(key) != []:
            out.append(f"{key}= must be present and empty")
    if not su.value(unit, "Service", "WatchdogSec"):
        out.append("no WatchdogSec=")
    for key in ("Wants", "After"):
        if "network-online.target" not in " ".join(unit.get("Unit", {}).get(key, [])):
            out.append(f"{key}= lacks network-online.target")
    if su.value(unit, "Install", "WantedBy") != "multi-user.target":
        out.append("not WantedBy=multi-user.target")
    if su.exec_start(unit) != [f"/opt/hfl/venv/bin/hfl-{role}", "run", "-c",
                               f"/etc/hfl/{role}.toml"]:
        out.append(f"ExecStart= is {su.exec_start(unit)}")
    return out


@pytest.mark.parametrize("role", ROLES)
def test_unit_declares_the_service_contract_and_the_sandbox(role: str) -> None:
    assert problems(su.parse(unit_path(role).read_text()), role) == []


def test_the_check_names_what_a_unit_lacks() -> None:
    text = unit_path("agent").read_text()
    weakened = text.replace("ProtectSystem=strict", "ProtectSystem=full").replace(
        "CapabilityBoundingSet=\n", "").replace("Type=notify", "Type=simple")
    assert problems(su.parse(weakened), "agent") == [
        "Type='simple', want 'notify'", "ProtectSystem='full', want 'strict'",
        "CapabilityBoundingSet= must be present and empty"]


def test_write_execute_memory_is_denied_only_where_no_torch_runs() -> None:
    # torch (agent training, coordinator ONNX export) JIT-compiles oneDNN kernels.
    mdwe = {r: su.value(su.parse(unit_path(r).read_text()), "Service", "MemoryDenyWriteExecute")
            for r in ROLES}
    assert mdwe == {"agent": None, "aggregator": "yes", "coordinator": None}


def test_jetson_dropin_opens_only_the_gpu() -> None:
    unit = su.load(unit_path("agent"))  # the drop-in folder sits beside the unit
    assert su.value(unit, "Service", "PrivateDevices") == "no"
    assert su.value(unit, "Service", "DevicePolicy") == "closed"
    assert unit["Service"]["DeviceAllow"] == ["char-nvhost* rw", "char-nvgpu* rw",
                                              "char-nvmap rw", "/dev/nvmap rw"]
    assert su.value(unit, "Service", "SupplementaryGroups") == "video"
    # Everything else of the sandbox still holds.
    assert su.value(unit, "Service", "ProtectSystem") == "strict"
    assert unit["Service"]["CapabilityBoundingSet"] == []


def test_dropins_apply_in_order_and_an_empty_assignment_resets() -> None:
    unit = su.parse("[Service]\nExecStart=/a run\nDeviceAllow=x\n")
    su.parse("[Service]\nExecStart=\nExecStart=/b run -c '/etc/my hfl.toml'\n", unit)
    assert su.exec_start(unit) == ["/b", "run", "-c", "/etc/my hfl.toml"]
    assert unit["Service"]["DeviceAllow"] == ["x"]


def stubs() -> list[str]:
    return [su.exec_start(su.parse(unit_path(r).read_text()))[0] for r in ROLES]


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    units = [unit_path(r) for r in ROLES]
    su.unit_tree(tmp_path, units, stubs())
    assert su.verify(*(u.name for u in units), root=tmp_path) == ""


def test_verify_catches_a_typo_that_only_warns(tmp_path: Path) -> None:
    # systemd ignores an unknown key with a warning and exits 0: the output is what fails.
    bad = tmp_path / "src" / "hfl-agent.service"
    bad.parent.mkdir()
    bad.write_text(unit_path("agent").read_text().replace("Restart=on-failure",
                                                          "Restrt=on-failure"))
    root = tmp_path / "root"
    su.unit_tree(root, [bad], stubs())
    run = subprocess.run([su.SYSTEMD_ANALYZE, "verify", f"--root={root}", "hfl-agent.service"],
                         capture_output=True, text=True)
    assert run.returncode == 0  # why a clean exit code proves nothing
    assert "Unknown key 'Restrt' in section [Service]" in su.verify("hfl-agent.service",
                                                                    root=root)


def test_verify_still_checks_the_executable(tmp_path: Path) -> None:
    # The stubs stand in for the deployed binaries; a unit naming another path fails.
    su.unit_tree(tmp_path, [unit_path("aggregator")], ["/opt/hfl/venv/bin/hfl-agent"])
    out = su.verify("hfl-aggregator.service", root=tmp_path)
    assert "/opt/hfl/venv/bin/hfl-aggregator is not executable" in out


@pytest.mark.parametrize("role", ROLES)
def test_exposure_stays_low(role: str, tmp_path: Path) -> None:
    # `systemd-analyze security` scores 0 (locked down) to 10; fail above 2.0 ("OK").
    shutil.copy(unit_path(role), tmp_path)
    if role == "agent":
        shutil.copytree(JETSON.parent, tmp_path / JETSON.parent.name)  # scored with the GPU
    run = subprocess.run([su.SYSTEMD_ANALYZE, "security", "--offline=yes", "--no-pager",
                          "--threshold=20", str(tmp_path / f"hfl-{role}.service")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr
