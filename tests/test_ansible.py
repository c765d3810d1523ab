"""deploy/ansible: ansible-lint's production profile and the playbook's syntax check, both
clean, with the tools of the .venv-ansible that `make test` installs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ANSIBLE = REPO / "deploy" / "ansible"
BIN = REPO / ".venv-ansible" / "bin"


def run(tool: str, *args: str, home: Path, cwd: Path = ANSIBLE) -> subprocess.CompletedProcess[str]:
    if not (BIN / tool).exists():
        pytest.fail(f"{BIN / tool} is missing: run `make test`, which installs it",
                    pytrace=False)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "NO_COLOR": "1",
           "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_HOME": str(home)}
    return subprocess.run([str(BIN / tool), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


def test_ansible_lint_production_profile_is_clean(tmp_path: Path) -> None:
    # The profile and offline mode come from deploy/ansible/.ansible-lint.
    out = run("ansible-lint", "--nocolor", "site.yml", "roles", "inventory", home=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Profile 'production' was required, and it passed" in out.stderr


def test_ansible_lint_fails_on_a_short_module_name(tmp_path: Path) -> None:
    # The same check on a copy with one task written as `copy:`, not ansible.builtin.copy.
    copy = tmp_path / "ansible"
    shutil.copytree(ANSIBLE, copy, ignore=shutil.ignore_patterns(".ansible"))
    tasks = copy / "roles" / "mosquitto" / "tasks" / "main.yml"
    tasks.write_text(tasks.read_text().replace("ansible.builtin.copy:", "copy:", 1))
    out = run("ansible-lint", "--nocolor", "site.yml", "roles", "inventory", home=tmp_path,
              cwd=copy)
    assert out.returncode != 0
    assert "fqcn[action-core]" in out.stdout + out.stderr


def test_playbook_syntax_check_is_clean(tmp_path: Path) -> None:
    out = run("ansible-playbook", "--syntax-check", "site.yml", home=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "WARNING" not in out.stdout + out.stderr, out.stderr
